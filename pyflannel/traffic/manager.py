"""Choosing the traffic manager: the daemon's single entry point into pyflannel.traffic."""

from __future__ import annotations

from collections.abc import Sequence

from pyflannel.traffic.base import CommandRunner, TrafficManager
from pyflannel.traffic.iptables import IPTablesManager, remove_chains
from pyflannel.traffic.nftables import NFTablesManager, delete_tables


def create_traffic_manager(
    use_nftables: bool,
    *,
    cmd_prefix: Sequence[str] = (),
    search_path: str | None = None,
    timeout: float = 30.0,
) -> TrafficManager:
    """`use_nftables` is net-conf.json's EnableNFTables.

    `cmd_prefix` runs every tool through a wrapper (tests: `["ip", "netns", "exec", NS]`); the daemon, already
    inside its node namespace, leaves it empty. `search_path` overrides $PATH for finding the tools.
    """
    runner = CommandRunner(cmd_prefix=tuple(cmd_prefix), search_path=search_path, timeout=timeout)
    if use_nftables:
        return NFTablesManager(runner, other_mode_cleanup=remove_chains)
    return IPTablesManager(runner, other_mode_cleanup=delete_tables)
