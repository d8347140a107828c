"""Choosing the traffic manager: the daemon's single entry point into pyflannel.traffic."""

from __future__ import annotations

from collections.abc import Sequence

from pyflannel.traffic.base import CommandRunner, RuleObserver, TrafficManager
from pyflannel.traffic.iptables import IPTablesManager, remove_chains
from pyflannel.traffic.nftables import NFTablesManager, delete_tables


def create_traffic_manager(
    use_nftables: bool,
    *,
    cmd_prefix: Sequence[str] = (),
    search_path: str | None = None,
    timeout: float = 30.0,
    observer: RuleObserver | None = None,
) -> TrafficManager:
    """`use_nftables` is net-conf.json's EnableNFTables.

    `cmd_prefix` runs every tool through a wrapper (tests: `["ip", "netns", "exec", NS]`); the daemon, already
    inside its node namespace, leaves it empty. `search_path` overrides $PATH for finding the tools. `observer`
    hears of every resync and restore (the agent's metrics).
    """
    runner = CommandRunner(cmd_prefix=tuple(cmd_prefix), search_path=search_path, timeout=timeout)
    tm: TrafficManager
    if use_nftables:
        tm = NFTablesManager(runner, other_mode_cleanup=remove_chains)
    else:
        tm = IPTablesManager(runner, other_mode_cleanup=delete_tables)
    if observer is not None:
        tm.observer = observer
    return tm
