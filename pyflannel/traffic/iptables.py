"""iptables mode: FLANNEL-POSTRTG (nat) and FLANNEL-FWD (filter), applied with `iptables-restore --noflush`.

Each change is one iptables-restore transaction per family. Declaring `:FLANNEL-POSTRTG - [0:0]` under
--noflush empties that chain before the new rules go in, so replacing the rules of an old subnet, repairing
a half-deleted chain and the first install are all the same atomic step. The only rule outside our own
chains is the jump from POSTROUTING/FORWARD; that one is counted in iptables-save first and only appended
when absent (extra copies are deleted), because a blind re-append would duplicate it.
"""

from __future__ import annotations

import logging
import platform
import re
from dataclasses import dataclass

from pyflannel.traffic.base import CommandRunner, IPNetwork, LeftoverCleanup, MasqSpec, TrafficError, TrafficManager

log = logging.getLogger(__name__)

KUBE_PROXY_MARK = "0x4000/0x4000"
MASQ_COMMENT = "flanneld masq"
FWD_COMMENT = "flanneld forward"
MASQ_CHAIN = "FLANNEL-POSTRTG"
FWD_CHAIN = "FLANNEL-FWD"


def _multicast(fam: int) -> str:
    return "224.0.0.0/4" if fam == 4 else "ff00::/8"


def masq_rules(network: IPNetwork, subnet: IPNetwork, random_fully: bool) -> list[str]:
    """FLANNEL-POSTRTG's rules in upstream's order, in iptables-save form (also valid restore input)."""
    net, pod = str(network), str(subnet)
    c = f'-m comment --comment "{MASQ_COMMENT}"'
    masq = "MASQUERADE --random-fully" if random_fully else "MASQUERADE"
    a = f"-A {MASQ_CHAIN}"
    return [
        # kube-proxy marks what it will masquerade itself: NATing it twice breaks on some kernels
        f"{a} -m mark --mark {KUBE_PROXY_MARK} {c} -j RETURN",
        # pod to pod inside the overlay keeps its source
        f"{a} -s {pod} -d {net} {c} -j RETURN",
        f"{a} -s {net} -d {pod} {c} -j RETURN",
        # external traffic that arrives at our own pods keeps its source
        f"{a} ! -s {net} -d {pod} {c} -j RETURN",
        f"{a} -s {net} ! -d {_multicast(network.version)} {c} -j {masq}",
        # the host talking into the overlay gets a source address the other nodes can route back
        f"{a} ! -s {net} -d {net} {c} -j {masq}",
    ]


def masq_jump() -> str:
    return f'-A POSTROUTING -m comment --comment "{MASQ_COMMENT}" -j {MASQ_CHAIN}'


def forward_rules(network: IPNetwork) -> list[str]:
    c = f'-m comment --comment "{FWD_COMMENT}"'
    return [
        f"-A {FWD_CHAIN} -s {network} {c} -j ACCEPT",
        f"-A {FWD_CHAIN} -d {network} {c} -j ACCEPT",
    ]


def forward_jump() -> str:
    return f'-A FORWARD -m comment --comment "{FWD_COMMENT}" -j {FWD_CHAIN}'


@dataclass(frozen=True)
class ChainSet:
    """One flannel chain, its rules, and the jump into it from a built-in chain."""

    table: str
    chain: str
    hook: str
    jump: str
    comment: str
    rules: tuple[str, ...]


def golden_rules(
    network: IPNetwork, subnet: IPNetwork | None, *, random_fully: bool = True, forward: bool = True
) -> dict[str, list[str]]:
    """The full rule text per table as iptables-save prints it (jumps first, like iptables-save)."""
    out: dict[str, list[str]] = {}
    if subnet is not None:
        out["nat"] = [masq_jump(), *masq_rules(network, subnet, random_fully)]
    if forward:
        out["filter"] = [forward_jump(), *forward_rules(network)]
    return out


def parse_save(text: str) -> dict[str, list[str]]:
    """iptables-save output as {table: lines}, keeping chain declarations and rules, dropping comments."""
    tables: dict[str, list[str]] = {}
    cur: list[str] | None = None
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.startswith("*"):
            cur = tables.setdefault(line[1:], [])
        elif line == "COMMIT":
            cur = None
        elif cur is not None and line and not line.startswith("#"):
            cur.append(line)
    return tables


def _version(text: str) -> tuple[int, int, int] | None:
    m = re.search(r"v(\d+)\.(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def _kernel_at_least(major: int, minor: int) -> bool:
    m = re.match(r"(\d+)\.(\d+)", platform.release())
    if m is None:
        return True  # an unparsable release string: let the kernel reject the rule if it must
    return (int(m.group(1)), int(m.group(2))) >= (major, minor)


class IPTablesManager(TrafficManager):
    mode = "iptables"

    def __init__(self, runner: CommandRunner, other_mode_cleanup: LeftoverCleanup | None = None) -> None:
        super().__init__(runner, other_mode_cleanup)
        # rules as iptables-save printed them right after our apply: the resync compares against this, so a
        # tool that canonicalises differently from our text cannot cause a restore on every pass
        self._fingerprint: dict[tuple[int, str], tuple[str, ...]] = {}
        self._random_fully: dict[int, bool] = {}

    @staticmethod
    def _tool(fam: int, base: str) -> str:
        return base.replace("iptables", "ip6tables") if fam == 6 else base

    async def supports_random_fully(self, fam: int) -> bool:
        """--random-fully needs iptables >= 1.6.2 (and kernel >= 3.13, which any kernel with nft has)."""
        if fam not in self._random_fully:
            out = await self.runner.check(self._tool(fam, "iptables"), ["--version"])
            v = _version(out)
            self._random_fully[fam] = v is not None and v >= (1, 6, 2) and _kernel_at_least(3, 13)
            if not self._random_fully[fam]:
                log.warning("iptables: --random-fully unsupported (%s); masquerading without it", out.strip())
        return self._random_fully[fam]

    async def _chainsets(self, fam: int) -> list[ChainSet]:
        sets: list[ChainSet] = []
        spec: MasqSpec | None = self._masq.get(fam)
        if spec is not None:
            rf = spec.fully_random and await self.supports_random_fully(fam)
            rules = masq_rules(spec.network, spec.subnet, rf)
            sets.append(ChainSet("nat", MASQ_CHAIN, "POSTROUTING", masq_jump(), MASQ_COMMENT, tuple(rules)))
        net = self._forward.get(fam)
        if net is not None:
            sets.append(
                ChainSet("filter", FWD_CHAIN, "FORWARD", forward_jump(), FWD_COMMENT, tuple(forward_rules(net)))
            )
        return sets

    async def _save(self, fam: int) -> dict[str, list[str]]:
        return parse_save(await self.runner.check(self._tool(fam, "iptables-save"), []))

    async def _restore(self, fam: int, payload: str) -> None:
        log.debug("iptables: ipv%d restore payload:\n%s", fam, payload)
        await self.runner.check(self._tool(fam, "iptables-restore"), ["--noflush", "-w"], input=payload)

    async def _apply(self, fam: int) -> None:
        sets = await self._chainsets(fam)
        if not sets:
            return
        # fail early and clearly when the restore tool is missing, before reading any state
        self.runner.which(self._tool(fam, "iptables-restore"))
        saved = await self._save(fam)
        by_table: dict[str, list[str]] = {}
        for cs in sets:
            lines = by_table.setdefault(cs.table, [])
            lines.append(f":{cs.chain} - [0:0]")
            lines.extend(cs.rules)
            lines.extend(_fix_hook(saved.get(cs.table, []), cs))
        payload = "".join(f"*{t}\n" + "\n".join(ls) + "\nCOMMIT\n" for t, ls in by_table.items())
        await self._restore(fam, payload)
        after = await self._save(fam)
        for cs in sets:
            self._fingerprint[(fam, cs.chain)] = _chain_rules(after.get(cs.table, []), cs.chain)
        log.info("iptables: ipv%d rules in place (%s)", fam, ", ".join(cs.chain for cs in sets))

    async def _check_family(self, fam: int) -> bool:
        saved = await self._save(fam)
        for cs in await self._chainsets(fam):
            lines = saved.get(cs.table, [])
            if not any(ln.startswith(f":{cs.chain} ") for ln in lines):
                return False
            if _chain_rules(lines, cs.chain) != self._fingerprint.get((fam, cs.chain)):
                return False
            if _fix_hook(lines, cs):
                return False
        return True


def _chain_rules(lines: list[str], chain: str) -> tuple[str, ...]:
    return tuple(ln for ln in lines if ln.startswith(f"-A {chain} "))


def _fix_hook(lines: list[str], cs: ChainSet) -> list[str]:
    """Restore lines that leave exactly one jump into our chain and no other flannel rule in the hook chain.

    Older flannel versions put their rules straight into POSTROUTING/FORWARD with the same comment; those are
    removed too, which upgrades such a node in place.
    """
    mine = [ln for ln in lines if ln.startswith(f"-A {cs.hook} ") and (f'"{cs.comment}"' in ln or ln == cs.jump)]
    fixes = ["-D" + ln[2:] for ln in mine if ln != cs.jump]
    jumps = sum(1 for ln in mine if ln == cs.jump)
    if jumps == 0:
        fixes.append(cs.jump)
    else:
        fixes.extend(["-D" + cs.jump[2:]] * (jumps - 1))
    return fixes


async def remove_chains(runner: CommandRunner) -> None:
    """Remove every flannel chain and jump, IPv4 and IPv6, one restore per family (the nftables mode's cleanup)."""
    for fam in (4, 6):
        save = IPTablesManager._tool(fam, "iptables-save")
        try:
            runner.which(save)
        except TrafficError:
            log.debug("%s not installed: no iptables leftovers to clean up", save)
            continue
        tables = parse_save(await runner.check(save, []))
        payload = ""
        for table, lines in tables.items():
            body: list[str] = []
            for hook, chain, comment in (
                ("POSTROUTING", MASQ_CHAIN, MASQ_COMMENT),
                ("FORWARD", FWD_CHAIN, FWD_COMMENT),
            ):
                body += [
                    "-D" + ln[2:]
                    for ln in lines
                    if ln.startswith(f"-A {hook} ") and (f'"{comment}"' in ln or ln.endswith(f"-j {chain}"))
                ]
            for chain in (MASQ_CHAIN, FWD_CHAIN):
                if any(ln.startswith(f":{chain} ") for ln in lines):
                    body += [f":{chain} - [0:0]", f"-X {chain}"]
            if body:
                payload += f"*{table}\n" + "\n".join(body) + "\nCOMMIT\n"
        if payload:
            log.info("iptables: removing ipv%d flannel chains left by the iptables mode", fam)
            await runner.check(IPTablesManager._tool(fam, "iptables-restore"), ["--noflush", "-w"], input=payload)


__all__ = [
    "IPTablesManager",
    "forward_jump",
    "forward_rules",
    "golden_rules",
    "masq_jump",
    "masq_rules",
    "parse_save",
    "remove_chains",
]
