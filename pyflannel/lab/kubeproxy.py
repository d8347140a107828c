"""kube-proxy's rules for the lab's Services, as kube-proxy writes them (pure functions: text in, text out).

iptables mode (pkg/proxy/iptables/proxier.go), one iptables-restore --noflush transaction per node:

    nat   PREROUTING, OUTPUT -> KUBE-SERVICES             ("kubernetes service portals")
          KUBE-SERVICES   -d <ClusterIP>/32 --dport <port>  -> KUBE-SVC-<hash>
                          last: --dst-type LOCAL             -> KUBE-NODEPORTS
          KUBE-NODEPORTS  --dport <nodePort>                 -> KUBE-EXT-<hash> (-> KUBE-MARK-MASQ, KUBE-SVC-<hash>)
          KUBE-SVC-<hash> ! -s <cluster CIDR> -> KUBE-MARK-MASQ; then one rule per endpoint, each but the last
                          `-m statistic --mode random --probability 1/(n-i)` -> KUBE-SEP-<hash>
          KUBE-SEP-<hash> -s <endpoint IP> -> KUBE-MARK-MASQ (hairpin); DNAT --to-destination <ip:port>
          KUBE-MARK-MASQ  MARK --or-mark 0x4000
          POSTROUTING -> KUBE-POSTROUTING: unmarked RETURN; clear the mark; MASQUERADE --random-fully
    filter FORWARD -> KUBE-FORWARD: INVALID dropped, marked and established traffic accepted

flanneld's FLANNEL-POSTRTG returns at once on the 0x4000 mark, so what kube-proxy masquerades is not NATed twice.

The chain names are kube-proxy's: the first 16 characters of the base32 of the SHA-256 of the service port's
name ("namespace/name:port-name") and the protocol ("tcp"), and for an endpoint chain also "ip:port".

ipvs mode (pkg/proxy/ipvs), dummy-free: the ClusterIP on the node's lo instead of a kube-ipvs0 dummy, one
virtual server per ClusterIP:port and node-IP:nodePort with the endpoints as masquerading real servers
(`ipvsadm -R`), and the same masquerade chains matched per service instead of through ipsets.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

MASQ_MARK = "0x4000"
JUMPS = {
    "nat": [
        ("PREROUTING", '-m comment --comment "kubernetes service portals" -j KUBE-SERVICES'),
        ("OUTPUT", '-m comment --comment "kubernetes service portals" -j KUBE-SERVICES'),
        ("POSTROUTING", '-m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING'),
    ],
    "filter": [("FORWARD", '-m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD')],
}
NODEPORTS_LAST = (
    '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this '
    'chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS'
)


@dataclass(frozen=True)
class ServicePort:
    namespace: str
    name: str
    port_name: str
    protocol: str  # lower case, as kube-proxy hashes it
    cluster_ip: str
    port: int
    endpoints: tuple[str, ...]  # "ip:port"
    node_port: int | None = None

    @property
    def spn(self) -> str:
        """ServicePortName.String(): "namespace/name:port-name" (no colon when the port has no name)."""
        return f"{self.namespace}/{self.name}" + (f":{self.port_name}" if self.port_name else "")


def _hash(*parts: str) -> str:
    return base64.b32encode(hashlib.sha256("".join(parts).encode()).digest()).decode()[:16]


def svc_chain(spn: str, protocol: str) -> str:
    return "KUBE-SVC-" + _hash(spn, protocol)


def ext_chain(spn: str, protocol: str) -> str:
    return "KUBE-EXT-" + _hash(spn, protocol)


def sep_chain(spn: str, protocol: str, endpoint: str) -> str:
    return "KUBE-SEP-" + _hash(spn, protocol, endpoint)


def probability(n: int) -> str:
    return f"{1.0 / n:0.10f}"


def _common_nat() -> list[str]:
    return [
        f"-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN",
        f"-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
        "-j MASQUERADE --random-fully",
        f"-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}",
    ]


def _filter_rules() -> list[str]:
    return [
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
        f'-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark {MASQ_MARK}/{MASQ_MARK} '
        "-j ACCEPT",
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" '
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    ]


def iptables_rules(services: Sequence[ServicePort], cluster_cidr: str) -> dict[str, tuple[list[str], list[str]]]:
    """{table: (chains, rules)} of iptables mode, in kube-proxy's order."""
    chains = ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"]
    rules = _common_nat()
    for s in services:
        p, spn = s.protocol, s.spn
        svc = svc_chain(spn, p)
        chains.append(svc)
        dst = f'-d {s.cluster_ip}/32 -p {p} -m comment --comment "{spn} cluster IP" -m {p} --dport {s.port}'
        rules.append(f"-A KUBE-SERVICES {dst} -j {svc}")
        if s.node_port is not None:
            ext = ext_chain(spn, p)
            chains.append(ext)
            rules.append(f'-A KUBE-NODEPORTS -p {p} -m comment --comment "{spn}" -m {p} --dport {s.node_port} -j {ext}')
            rules.append(
                f'-A {ext} -m comment --comment "masquerade traffic for {spn} external destinations" -j KUBE-MARK-MASQ'
            )
            rules.append(f"-A {ext} -j {svc}")
        rules.append(f"-A {svc} ! -s {cluster_cidr} {dst} -j KUBE-MARK-MASQ")
        n = len(s.endpoints)
        for i, ep in enumerate(s.endpoints):
            sep = sep_chain(spn, p, ep)
            chains.append(sep)
            stat = f" -m statistic --mode random --probability {probability(n - i)}" if i < n - 1 else ""
            rules.append(f'-A {svc} -m comment --comment "{spn} -> {ep}"{stat} -j {sep}')
            ip = ep.rsplit(":", 1)[0]
            rules.append(f'-A {sep} -s {ip}/32 -m comment --comment "{spn}" -j KUBE-MARK-MASQ')
            rules.append(f'-A {sep} -p {p} -m comment --comment "{spn}" -m {p} -j DNAT --to-destination {ep}')
    rules.append(NODEPORTS_LAST)
    return {"nat": (chains, rules), "filter": (["KUBE-FORWARD"], _filter_rules())}


def ipvs_iptables_rules(services: Sequence[ServicePort], cluster_cidr: str) -> dict[str, tuple[list[str], list[str]]]:
    """{table: (chains, rules)} of ipvs mode: only the masquerade marking (IPVS does the DNAT)."""
    rules = _common_nat()
    for s in services:
        rules.append(
            f"-A KUBE-SERVICES ! -s {cluster_cidr} -d {s.cluster_ip}/32 -p {s.protocol} -m comment --comment "
            f'"Kubernetes service cluster ip + port for masquerade purpose" -m {s.protocol} --dport {s.port} '
            "-j KUBE-MARK-MASQ"
        )
    rules.append("-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT")
    for s in services:
        if s.node_port is not None:
            rules.append(
                f"-A KUBE-NODE-PORT -p {s.protocol} -m comment --comment "
                f'"Kubernetes nodeport {s.protocol.upper()} port for masquerade purpose" -m {s.protocol} '
                f"--dport {s.node_port} -j KUBE-MARK-MASQ"
            )
    chains = ["KUBE-SERVICES", "KUBE-NODE-PORT", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"]
    return {"nat": (chains, rules), "filter": (["KUBE-FORWARD"], _filter_rules())}


def existing(save: str) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """From iptables-save: the KUBE-* chains and the rules of every table."""
    chains: dict[str, set[str]] = {}
    rules: dict[str, set[str]] = {}
    table = ""
    for line in save.splitlines():
        if line.startswith("*"):
            table = line[1:]
            chains.setdefault(table, set())
            rules.setdefault(table, set())
        elif line.startswith(":KUBE-") and table:
            chains[table].add(line[1:].split()[0])
        elif line.startswith("-A ") and table:
            rules[table].add(line)
    return chains, rules


def restore_input(want: dict[str, tuple[list[str], list[str]]] | None, save: str) -> str:
    """One iptables-restore --noflush input that takes the node from `save` to `want` (None: no KUBE-* at all).

    Declaring a chain under --noflush empties it, so every chain we keep is rewritten whole; chains of
    Services that are gone are emptied and deleted (-X); the jumps from the built-in chains are inserted
    first in their chain only when absent (a blind insert would duplicate them), and deleted with the rest."""
    have_chains, have_rules = existing(save)
    out: list[str] = []
    for table in ("nat", "filter"):
        chains, rules = want[table] if want is not None else ([], [])
        keep = set(chains)
        stale = sorted(c for c in have_chains.get(table, set()) if c not in keep)
        if not chains and not stale:
            continue
        out.append(f"*{table}")
        jumps = [f"-A {hook} {spec}" for hook, spec in JUMPS[table]]
        if want is None:
            out += [f"-D {j[3:]}" for j in jumps if j in have_rules.get(table, set())]
        out += [f":{c} - [0:0]" for c in [*chains, *stale]]
        out += rules
        out += [f"-X {c}" for c in stale]
        if want is not None:
            out += [f"-I {hook} 1 {spec}" for (hook, spec), j in zip(JUMPS[table], jumps, strict=True)
                    if j not in have_rules.get(table, set())]  # fmt: skip
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


def ipvsadm_input(services: Sequence[ServicePort], node_ip: str, scheduler: str = "rr") -> str:
    """`ipvsadm -R` input: clear, then a virtual server per ClusterIP:port (and node-IP:nodePort) with the
    endpoints as masquerading (NAT) real servers."""
    lines = ["-C"]
    for s in services:
        vips = [f"{s.cluster_ip}:{s.port}"] + ([f"{node_ip}:{s.node_port}"] if s.node_port is not None else [])
        for vip in vips:
            lines.append(f"-A -t {vip} -s {scheduler}")
            lines += [f"-a -t {vip} -r {ep} -m -w 1" for ep in s.endpoints]
    return "\n".join(lines) + "\n"
