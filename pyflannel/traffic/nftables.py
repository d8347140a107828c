"""nftables mode (`"EnableNFTables": true`): tables `ip flannel-ipv4` / `ip6 flannel-ipv6`.

Every change rebuilds a family's whole table in one `nft -f -` transaction (add, delete, re-add): nft commits
it atomically, so the kernel goes straight from the old rule set to the new one, and chains or rules left by
an older subnet or by hand edits disappear with it. Unlike upstream, the resync reads the table back with
`nft -j list table` and restores it when a rule, chain or the table itself has gone.

The rule text follows upstream's (knftables) except for the fourth masq rule: upstream writes
`saddr != <pod> daddr <net> return`, which is not its own iptables rule `! -s <net> -d <pod> -j RETURN` and
makes the last rule (host traffic into the overlay is masqueraded) dead. We write the iptables meaning,
`saddr != <net> daddr <pod> return`, so both modes NAT the same packets.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pyflannel.traffic.base import CommandRunner, IPNetwork, LeftoverCleanup, TrafficError, TrafficManager

log = logging.getLogger(__name__)

POSTRTG = "postrtg"
FORWARD = "forward"
KUBE_PROXY_MARK = "0x4000"
_RANDOM_CHECK_TABLE = "flannel-randomfully-check"


def table_name(fam: int) -> str:
    return f"flannel-ipv{fam}"


def family_kw(fam: int) -> str:
    return "ip" if fam == 4 else "ip6"


def masq_rule_text(network: IPNetwork, subnet: IPNetwork, fully_random: bool) -> list[str]:
    """The postrtg chain's rules in upstream's order and spelling."""
    f = family_kw(network.version)
    net, pod = str(network), str(subnet)
    multicast = "224.0.0.0/4" if network.version == 4 else "ff00::/8"
    masq = "masquerade fully-random" if fully_random else "masquerade"
    return [
        f"meta mark {KUBE_PROXY_MARK} return",
        f"{f} saddr {pod} {f} daddr {net} return",
        f"{f} saddr {net} {f} daddr {pod} return",
        f"{f} saddr != {net} {f} daddr {pod} return",
        f"{f} saddr {net} {f} daddr != {multicast} {masq}",
        f"{f} saddr != {net} {f} daddr {net} {masq}",
    ]


def forward_rule_text(network: IPNetwork) -> list[str]:
    f = family_kw(network.version)
    return [f"{f} saddr {network} accept", f"{f} daddr {network} accept"]


def render_script(
    fam: int,
    masq: tuple[IPNetwork, IPNetwork, bool] | None,
    forward: IPNetwork | None,
) -> str:
    """One family's whole table as an `nft -f` transaction."""
    t = f"{family_kw(fam)} {table_name(fam)}"
    lines = [
        # add-then-delete makes the delete valid whether or not the table exists
        f"add table {t}",
        f"delete table {t}",
        f'add table {t} {{ comment "rules for {table_name(fam)}" ; }}',
    ]
    if masq is not None:
        lines.append(
            f"add chain {t} {POSTRTG} {{ type nat hook postrouting priority srcnat ; "
            f'comment "chain to manage traffic masquerading by flannel" ; }}'
        )
        lines += [f"add rule {t} {POSTRTG} {r}" for r in masq_rule_text(*masq)]
    if forward is not None:
        lines.append(
            f"add chain {t} {FORWARD} {{ type filter hook forward priority filter ; "
            f'comment "chain to accept flannel traffic" ; }}'
        )
        lines += [f"add rule {t} {FORWARD} {r}" for r in forward_rule_text(forward)]
    return "\n".join(lines) + "\n"


Snapshot = dict[str, tuple[tuple[Any, ...], tuple[str, ...]]]


def parse_table_json(text: str) -> Snapshot:
    """`nft -j list table` as {chain: ((type, hook, prio, policy), (rule exprs...))}, without handles."""
    chains: dict[str, tuple[Any, ...]] = {}
    rules: dict[str, list[str]] = {}
    for item in json.loads(text).get("nftables", []):
        if "chain" in item:
            c = item["chain"]
            chains[c["name"]] = (c.get("type"), c.get("hook"), c.get("prio"), c.get("policy"))
        elif "rule" in item:
            r = item["rule"]
            rules.setdefault(r["chain"], []).append(json.dumps(r.get("expr"), sort_keys=True))
    return {name: (attrs, tuple(rules.get(name, []))) for name, attrs in chains.items()}


class NFTablesManager(TrafficManager):
    mode = "nftables"

    def __init__(self, runner: CommandRunner, other_mode_cleanup: LeftoverCleanup | None = None) -> None:
        super().__init__(runner, other_mode_cleanup)
        self._fingerprint: dict[int, Snapshot] = {}
        self._fully_random: bool | None = None

    async def supports_fully_random(self) -> bool:
        """Ask the kernel (a check-only transaction, never committed), as upstream does."""
        if self._fully_random is None:
            t = f"ip {_RANDOM_CHECK_TABLE}"
            script = (
                f"add table {t}\n"
                f"add chain {t} {POSTRTG} {{ type nat hook postrouting priority srcnat ; }}\n"
                f"add rule {t} {POSTRTG} ip saddr != 127.0.0.1 masquerade fully-random\n"
            )
            r = await self.runner.run("nft", ["-c", "-f", "-"], input=script)
            self._fully_random = r.rc == 0
            if r.rc != 0:
                log.warning("nftables: masquerade fully-random unsupported (%s)", r.stderr.strip())
        return self._fully_random

    async def _script(self, fam: int) -> str | None:
        spec = self._masq.get(fam)
        fwd = self._forward.get(fam)
        if spec is None and fwd is None:
            return None
        masq = None
        if spec is not None:
            masq = (spec.network, spec.subnet, spec.fully_random and await self.supports_fully_random())
        return render_script(fam, masq, fwd)

    async def _list(self, fam: int) -> Snapshot | None:
        r = await self.runner.run("nft", ["-j", "list", "table", family_kw(fam), table_name(fam)])
        if r.rc != 0:
            if "No such file or directory" in r.stderr:
                return None
            raise TrafficError(f"nft list table {family_kw(fam)} {table_name(fam)}: exit {r.rc}: {r.stderr.strip()}")
        return parse_table_json(r.stdout)

    async def _apply(self, fam: int) -> None:
        script = await self._script(fam)
        if script is None:
            return
        log.debug("nftables: ipv%d transaction:\n%s", fam, script)
        await self.runner.check("nft", ["-f", "-"], input=script)
        snap = await self._list(fam)
        if snap is None:
            raise TrafficError(f"nft: table {table_name(fam)} missing right after it was written")
        self._fingerprint[fam] = snap
        log.info("nftables: table %s %s in place (%s)", family_kw(fam), table_name(fam), ", ".join(snap))

    async def _check_family(self, fam: int) -> bool:
        if fam not in self._fingerprint:
            return False  # never applied successfully: an absent table must not look "as expected"
        return await self._list(fam) == self._fingerprint[fam]


async def delete_tables(runner: CommandRunner) -> None:
    """Remove both flannel tables in one transaction (the iptables mode's cleanup); absent ones are skipped."""
    try:
        runner.which("nft")
    except TrafficError:
        log.debug("nft not installed: no nftables leftovers to clean up")
        return
    out = await runner.check("nft", ["-j", "list", "tables"])
    present = {(t["table"]["family"], t["table"]["name"]) for t in json.loads(out).get("nftables", []) if "table" in t}
    script = "".join(
        f"delete table {family_kw(fam)} {table_name(fam)}\n"
        for fam in (4, 6)
        if (family_kw(fam), table_name(fam)) in present
    )
    if script:
        log.info("nftables: removing tables left by the nftables mode")
        await runner.check("nft", ["-f", "-"], input=script)
