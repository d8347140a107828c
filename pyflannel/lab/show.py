"""`show NODE` and `trace SRC DST`: what the flannel tutorials look at, read live from the kernel.

Every section names the command it ran, so the reader can run it again with `flannel-lab exec`.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import capture as cap
from . import ipsec as labipsec
from . import kubemode, kubeproxy, services
from . import wireguard as labwg
from .capture import UDP_PORT, VXLAN_PORT
from .lab import Lab
from .netns import VAR_LIB_CNI, run
from .state import LabError, NodeState, PodState

IPIP_DEV = "flannel.ipip"
VXLAN_DEV = "flannel.1"
VXLAN6_DEV = "flannel-v6.1"
UDP_DEV = "flannel0"


def sh(ns: str, *cmd: str) -> str:
    return run(["ip", "netns", "exec", ns, *cmd], check=False, timeout=20).rstrip()


def ipj(ns: str, *args: str) -> list[dict[str, Any]]:
    out = run(["ip", "-n", ns, "-j", *args], check=False, timeout=20)
    try:
        d = json.loads(out) if out.strip() else []
    except ValueError:
        return []
    return d if isinstance(d, list) else []


def _indent(text: str, pad: str = "    ") -> str:
    return "\n".join(pad + line for line in (text.splitlines() or ["(none)"]))


def _section(title: str, cmd: str, body: str) -> str:
    return f"-- {title}   [{cmd}]\n{_indent(body)}\n"


def flannel_rules(ns: str) -> str:
    """FLANNEL chains and rules from iptables-save, and nft tables named flannel*, inside `ns`."""
    out: list[str] = []
    table = ""
    for line in sh(ns, "iptables-save").splitlines():
        if line.startswith("*"):
            table = line
        elif "FLANNEL" in line or "flannel" in line:
            if table:
                out.append(table)
                table = ""
            out.append(line)
    for line in sh(ns, "nft", "list", "tables").splitlines():
        parts = line.split()
        if len(parts) == 3 and "flannel" in parts[2]:
            out.append(sh(ns, "nft", "list", "table", parts[1], parts[2]))
    return "\n".join(out)


def nat_rules(ns: str) -> str:
    """POSTROUTING and the chains it jumps to: flanneld's (--ip-masq) or the bridge plugin's (ipMasq) SNAT."""
    lines = sh(ns, "iptables-save", "-t", "nat").splitlines()
    keep = [x for x in lines if x.startswith("-A POSTROUTING") or x.startswith("-A CNI-")]
    return "\n".join(keep)


def lease_text(lab: Lab, node: NodeState) -> str:
    """The node's lease as etcdctl prints it (key, then value)."""
    name = lab.lease_key(node)
    if name is None:
        return "(no subnet yet)"
    key = f"{lab.st.etcd_prefix}/subnets/{name}"
    out = run(
        [
            "ip",
            "netns",
            "exec",
            lab.st.etcd_ns,
            "env",
            "ETCDCTL_API=3",
            "etcdctl",
            "--endpoints",
            lab.st.endpoint,
            "get",
            key,
        ],
        check=False,
    )
    return out.rstrip() or f"{key}: (no lease)"


CNI_NET = "cbr0"  # the conflist's name, which libcni and host-local name their files after


def cni_files(lab: Lab, n: NodeState) -> list[tuple[str, str, str]]:
    """(tutorial path, what it is, content) of the CNI files of each pod on `n`: the node's own /var/lib/cni,
    read through its run directory, which is what the node's mount namespace shows at that path."""
    root = Path(n.dir) / VAR_LIB_CNI
    out: list[tuple[str, str, str]] = []
    for pod in lab.st.pods_of(n.name):
        cid = pod.container_id
        out.append((f"/var/lib/cni/flannel/{cid}", "the delegate config flannel stored for the sandbox (DEL reads it)",
                    _read(root / "flannel" / cid)))  # fmt: skip
        res = root / "results" / f"{CNI_NET}-{cid}-eth0"
        out.append((f"/var/lib/cni/results/{CNI_NET}-{cid}-eth0", "the runtime's result cache (libcni), its result:",
                    _cached_result(res)))  # fmt: skip
        out.append((f"/var/lib/cni/networks/{CNI_NET}/{pod.ip}", "host-local's allocation: the container ID",
                    _read(root / "networks" / CNI_NET / pod.ip)))  # fmt: skip
    return out


def _read(p: Path) -> str:
    try:
        return p.read_text(errors="replace").rstrip() or "(empty)"
    except OSError:
        return "(missing)"


def _cached_result(p: Path) -> str:
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError):
        return "(missing)"
    rest = ", ".join(k for k in d if k != "result")
    return f"{json.dumps(d.get('result'), separators=(',', ':'))}\n(and {rest})"


def _vtep_sections(ns: str, fam: int) -> list[str]:
    """flanneld's VXLAN device of IP version `fam`, its neighbours and its FDB, as the tutorials list them."""
    dev = vxlan_dev(fam)
    v = f"-{fam}"
    what = "neighbours (NDP, all permanent)" if fam == 6 else "neighbours (ARP)"
    return [
        _section(
            f"{dev} (the {'IPv6 ' if fam == 6 else ''}VTEP)",
            f"ip -d link show {dev}",
            sh(ns, "ip", "-d", "link", "show", dev),
        ),
        _section(f"{what} on {dev}", f"ip {v} neigh show dev {dev}", sh(ns, "ip", v, "neigh", "show", "dev", dev)),
        _section(f"FDB of {dev}", f"bridge fdb show dev {dev}", sh(ns, "bridge", "fdb", "show", "dev", dev)),
    ]


def show_node(lab: Lab, name: str) -> str:
    n = lab.st.node(name)
    ns = n.netns
    vx = lab.st.options.backend == "vxlan"
    subnet_file = Path(n.dir) / "subnet.env"
    try:
        env_text = subnet_file.read_text().rstrip()
    except FileNotFoundError:
        env_text = "(not written: the agent is not ready)"
    parts = [f"== node {n.name}: netns {ns}, underlay {n.ip} on eth0, backend {lab.st.options.backend}\n"]
    parts.append(_section("subnet.env", f"cat {subnet_file}", env_text))
    if lab.st.options.store == "kube":
        parts.append(
            _section(
                "the Node's flannel annotations and podCIDR",
                f"flannel-lab get node {n.name} -o yaml | grep -e flannel.alpha -e podCIDR",
                kubemode.flannel_annotations(lab.st, n.name),
            )
        )
    else:
        parts.append(_section("lease in etcd", "etcdctl get <prefix>/subnets/<subnet>", lease_text(lab, n)))
    families = lab.st.options.families
    if 4 in families:
        parts.append(_section("routes", "ip route", sh(ns, "ip", "route")))
    if 6 in families:
        parts.append(_section("IPv6 routes", "ip -6 route", sh(ns, "ip", "-6", "route")))
    if vx:
        for fam in families:
            parts += _vtep_sections(ns, fam)
    elif lab.st.options.backend == "ipip":
        parts.append(
            _section(
                f"{IPIP_DEV} (the IP-in-IP tunnel: local = this node's underlay IP, remote any)",
                f"ip -d link show {IPIP_DEV}",
                sh(ns, "ip", "-d", "addr", "show", IPIP_DEV),
            )
        )
    elif lab.st.options.backend == "wireguard":
        for fam in families:
            dev = labwg.device(fam)[0]
            v = f"-{fam}"
            parts.append(
                _section(
                    f"{dev} ({labwg.implementation(ns, dev)}): the route into it",
                    f"ip addr show {dev}; ip {v} route show dev {dev}",
                    sh(ns, "ip", "addr", "show", dev) + "\n" + sh(ns, "ip", v, "route", "show", "dev", dev),
                )
            )
            parts.append(
                _section(
                    # IPv4's title as it always was (tests/test_cluster_wireguard.py reads it).
                    f"WireGuard peers{'' if fam == 4 else f' of {dev}'} (private key hidden)",
                    labwg.shown_command(ns, dev),
                    labwg.wg_show(ns, dev),
                )
            )
    elif lab.st.options.backend == "udp":
        parts.append(
            _section(
                f"{UDP_DEV} (TUN: what the kernel routes there, flanneld reads and sends as UDP {UDP_PORT})",
                f"ip -d addr show {UDP_DEV}; ip route show dev {UDP_DEV}",
                sh(ns, "ip", "-d", "addr", "show", UDP_DEV) + "\n" + sh(ns, "ip", "route", "show", "dev", UDP_DEV),
            )
        )
        parts.append(
            _section(
                "flanneld's UDP socket (the userspace hop)",
                f"ss -uanp 'sport = :{UDP_PORT}'",
                sh(ns, "ss", "-uanp", f"sport = :{UDP_PORT}"),
            )
        )
    elif lab.st.options.backend == "ipsec":
        parts += [_section(title, cmd, body) for title, cmd, body in labipsec.show_sections(ns)]
    else:
        parts.append(
            _section("neighbours (ARP) on eth0", "ip neigh show dev eth0", sh(ns, "ip", "neigh", "show", "dev", "eth0"))
        )
        if 6 in families:
            parts.append(
                _section(
                    "IPv6 neighbours (NDP) on eth0",
                    "ip -6 neigh show dev eth0",
                    sh(ns, "ip", "-6", "neigh", "show", "dev", "eth0"),
                )
            )
    parts.append(_section("cni0 bridge", "ip addr show cni0", sh(ns, "ip", "addr", "show", "cni0")))
    parts.append(
        _section("cni0 ports", "bridge link show master cni0", sh(ns, "bridge", "link", "show", "master", "cni0"))
    )
    files = cni_files(lab, n)
    body = "\n".join(f"{path}   ({what})\n{_indent(content, '  ')}" for path, what, content in files)
    parts.append(_section("CNI files of its pods", f"flannel-lab exec {n.name} -- cat <path>", body or "(no pods)"))
    parts.append(
        _section("FLANNEL rules", "iptables-save | grep FLANNEL; nft list table ... flannel*", flannel_rules(ns))
    )
    parts.append(
        _section("NAT: who rewrites pod sources", "iptables-save -t nat | grep POSTROUTING/CNI-", nat_rules(ns))
    )
    return "\n".join(parts)


# ---- trace -----------------------------------------------------------------------------------------------


@dataclass
class Hop:
    where: str
    what: str
    cmd: str
    entry: str

    def render(self, i: int) -> str:
        return f"{i}. {self.where}: {self.what}\n     [{self.cmd}]\n{_indent(self.entry, '     ')}"


def _best_route(ns: str, dst: str) -> str:
    """The route entry that decides `dst` (longest prefix in the main table), as `ip route` prints it."""
    addr = ipaddress.ip_address(dst)
    fam = f"-{addr.version}"
    best: tuple[int, str] | None = None
    for r in ipj(ns, fam, "route", "show"):
        d = r.get("dst", "")
        if d == "default":
            d_net = "0.0.0.0/0" if addr.version == 4 else "::/0"
        else:
            d_net = d if "/" in d else f"{d}/{addr.max_prefixlen}"
        net = ipaddress.ip_network(d_net, strict=False)
        if addr in net and (best is None or net.prefixlen > best[0]):
            best = (net.prefixlen, d)
    if best is None:
        return "(no route)"
    return sh(ns, "ip", fam, "route", "show", "exact", best[1]) or best[1]


def _route_get(ns: str, dst: str, src: str | None = None, iif: str | None = None) -> tuple[str, dict[str, Any]]:
    args = ["route", "get", dst]
    if src and iif:
        args += ["from", src, "iif", iif]
    j = ipj(ns, *args)
    if not j and src:
        return _route_get(ns, dst)
    text = sh(ns, "ip", *args).splitlines()
    return (text[0].strip() if text else "(no route)"), (j[0] if j else {})


def _veth_peer(pod: PodState, node: NodeState) -> str:
    links = ipj(pod.netns, "link", "show", "eth0")
    idx = links[0].get("link_index") if links else None
    for link in ipj(node.netns, "link", "show"):
        if link.get("ifindex") == idx:
            return f"{link['ifname']} (master {link.get('master', '-')})"
    return "(peer not found)"


def _mac(ns: str, dev: str) -> str:
    links = ipj(ns, "link", "show", dev)
    return str(links[0].get("address", "?")) if links else "?"


def trace_family(lab: Lab, family: int) -> int:
    """The IP version a trace follows: `family` (4 or 6; 0: IPv4 when the pod network has it, else IPv6)."""
    families = lab.st.options.families
    if family == 0:
        return families[0]
    if family not in families:
        raise LabError(f"this lab's pod network has no IPv{family} (up --ip-family {lab.st.options.ip_family})")
    return family


def node_addr(n: NodeState, family: int) -> str:
    """The node's underlay address of IP version `family`."""
    return n.ip6 if family == 6 else n.ip


def vxlan_dev(family: int) -> str:
    """flanneld's VXLAN device for IP version `family` (VNI 1)."""
    return VXLAN6_DEV if family == 6 else VXLAN_DEV


def trace_hops(lab: Lab, src_name: str, dst_name: str, family: int = 0) -> tuple[list[Hop], NodeState, NodeState]:
    src, dst = lab.st.pod(src_name), lab.st.pod(dst_name)
    if src is dst:
        raise LabError("source and destination are the same pod")
    sn, dn = lab.st.node(src.node), lab.st.node(dst.node)
    fam = trace_family(lab, family)
    sip, dip = src.addr(fam), dst.addr(fam)
    snip, dnip = node_addr(sn, fam), node_addr(dn, fam)
    vdev = vxlan_dev(fam)
    hops: list[Hop] = []
    txt, _ = _route_get(src.netns, dip)
    hops.append(
        Hop(
            f"pod {src.name}",
            f"its route to {dip} (entry: {_best_route(src.netns, dip)})",
            f"ip route get {dip}",
            txt,
        )
    )
    hops.append(
        Hop(
            f"pod {src.name} -> node {sn.name}",
            "eth0 is one end of a veth; the other end is a port of cni0",
            "ip -j link show eth0 -> link_index; bridge link show master cni0",
            _veth_peer(src, sn),
        )
    )
    if sn.name == dn.name:
        mac = _mac(dst.netns, "eth0")
        learned = [x for x in sh(sn.netns, "bridge", "fdb", "show", "br", "cni0").splitlines() if x.startswith(mac)]
        entry = "\n".join(learned) or "(not learned yet: the bridge floods until it is)"
        hops.append(
            Hop(
                f"node {sn.name}",
                f"same node: cni0 bridges it straight to the port of {dst.name} ({_veth_peer(dst, sn)})",
                f"bridge fdb show br cni0 | grep {mac}",
                entry,
            )
        )
        return hops, sn, dn
    txt, rg = _route_get(sn.netns, dip, sip, "cni0")
    hops.append(
        Hop(
            f"node {sn.name}",
            f"cni0 hands it to the host, which routes it (entry: {_best_route(sn.netns, dip)})",
            f"ip route get {dip} from {sip} iif cni0",
            txt,
        )
    )
    if lab.st.options.backend == "vxlan":
        gw = str(rg.get("gateway", ""))
        neigh = sh(sn.netns, "ip", "neigh", "show", gw, "dev", vdev) if gw else ""
        hops.append(
            Hop(
                f"node {sn.name}",
                f"{vdev} needs the MAC of the next hop {gw} (the peer's VTEP): a permanent "
                + ("neighbour entry (IPv6: no NDP is sent for it)" if fam == 6 else "ARP entry"),
                f"ip neigh show {gw} dev {vdev}",
                neigh or "(missing)",
            )
        )
        mac = neigh.split("lladdr ")[1].split()[0] if "lladdr " in neigh else ""
        fdb = "\n".join(
            line
            for line in sh(sn.netns, "bridge", "fdb", "show", "dev", vdev).splitlines()
            if mac and line.startswith(mac)
        )
        hops.append(
            Hop(
                f"node {sn.name}",
                "the FDB says which underlay IP owns that MAC",
                f"bridge fdb show dev {vdev} | grep {mac or '<mac>'}",
                fdb or "(missing)",
            )
        )
        peer_ip = fdb.split(" dst ")[1].split()[0] if " dst " in fdb else "?"
        link = sh(sn.netns, "ip", "-d", "link", "show", vdev).splitlines()
        vxline = next((x.strip() for x in link if x.strip().startswith("vxlan")), "?").split(" ttl ")[0]
        out, _ = _route_get(sn.netns, peer_ip) if peer_ip != "?" else ("?", {})
        hops.append(
            Hop(
                f"node {sn.name}",
                f"{vdev} encapsulates: UDP {snip} -> {peer_ip}:{VXLAN_PORT} over the underlay",
                f"ip -d link show {vdev}; ip route get {peer_ip}",
                f"{vxline}\n{out}",
            )
        )
        hops.append(
            Hop(
                f"node {dn.name}",
                f"{vdev} (MAC {_mac(dn.netns, vdev)}) receives UDP {VXLAN_PORT} and decapsulates",
                f"ip -j link show {vdev}",
                f"{vdev} address {_mac(dn.netns, vdev)}",
            )
        )
    elif lab.st.options.backend == "udp" and rg.get("dev") == UDP_DEV:
        hops += _udp_hops(lab, sn, dn, dst)
    elif lab.st.options.backend == "wireguard" and rg.get("dev") == labwg.device(fam)[0]:
        wg_hops = labwg.trace_hops(sn.netns, snip, dn.netns, dip, sip, fam)
        for (what, cmd, entry), node in zip(wg_hops, (sn, dn), strict=True):
            hops.append(Hop(f"node {node.name}", what, cmd, entry))
    elif lab.st.options.backend == "ipsec":
        sec_hops = labipsec.trace_hops(sn.netns, snip, dn.netns, dnip, sip, dip)
        for (what, cmd, entry), node in zip(sec_hops, (sn, sn, dn), strict=True):
            hops.append(Hop(f"node {node.name}", what, cmd, entry))
    elif lab.st.options.backend == "ipip" and rg.get("dev") == IPIP_DEV:
        gw = str(rg.get("gateway", ""))
        link = sh(sn.netns, "ip", "-d", "link", "show", IPIP_DEV).splitlines()
        ipline = next((x.strip() for x in link if x.strip().startswith("ipip")), "?").split(" ttl ")[0]
        out, _ = _route_get(sn.netns, gw) if gw else ("?", {})
        hops.append(
            Hop(
                f"node {sn.name}",
                f"{IPIP_DEV} encapsulates: a second IPv4 header {snip} -> {gw} (protocol 4, IP-in-IP) goes in front "
                "of the pod's packet; no UDP, no MAC lookup (the route's next hop is the peer's underlay IP, onlink)",
                f"ip -d link show {IPIP_DEV}; ip route get {gw}",
                f"{ipline}\n{out}",
            )
        )
        hops.append(
            Hop(
                f"node {dn.name}",
                f"{IPIP_DEV} (local {dnip}) receives protocol 4 for its address and strips the outer header",
                f"ip -d link show {IPIP_DEV}",
                next(
                    (x.strip() for x in sh(dn.netns, "ip", "-d", "link", "show", IPIP_DEV).splitlines() if "ipip" in x),
                    "?",
                ),
            )
        )
    else:
        gw = str(rg.get("gateway", ""))
        what = "host-gw" if lab.st.options.backend == "host-gw" else "DirectRouting (same L2 segment)"
        hops.append(
            Hop(
                f"node {sn.name}",
                f"{what}: a direct route, next hop is the peer's underlay IP {gw}",
                f"ip neigh show {gw} dev eth0",
                sh(sn.netns, "ip", "neigh", "show", gw, "dev", "eth0") or "(not resolved yet)",
            )
        )
    txt, _ = _route_get(dn.netns, dip)
    hops.append(
        Hop(
            f"node {dn.name}",
            f"the host routes it to its own subnet (entry: {_best_route(dn.netns, dip)})",
            f"ip route get {dip}",
            txt,
        )
    )
    hops.append(
        Hop(
            f"node {dn.name}",
            "cni0 forwards it out of the pod's port",
            f"ip neigh show {dip} dev cni0; port of pod {dst.name}",
            (sh(dn.netns, "ip", "neigh", "show", dip, "dev", "cni0") or "(ARP not resolved yet)")
            + f"\nport {_veth_peer(dst, dn)}",
        )
    )
    hops.append(
        Hop(
            f"pod {dst.name}",
            "delivered to eth0",
            "ip addr show eth0",
            " ".join(sh(dst.netns, "ip", "-br", "addr", "show", "eth0").split()),
        )
    )
    return hops, sn, dn


def _udp_hops(lab: Lab, sn: NodeState, dn: NodeState, dst: PodState) -> list[Hop]:
    """The udp backend's path: into flannel0, up to flanneld, out as UDP, and the same in reverse."""
    peer_subnet = lab.subnet_of(dn)
    sock = f"ss -uanp 'sport = :{UDP_PORT}'"
    return [
        Hop(
            f"node {sn.name}",
            f"{UDP_DEV} is a TUN device: the kernel queues the packet for the process holding it, flanneld",
            f"ip -d link show {UDP_DEV}",
            next(
                (x.strip() for x in sh(sn.netns, "ip", "-d", "link", "show", UDP_DEV).splitlines() if "tun" in x), "?"
            ),
        ),
        Hop(
            f"flanneld on {sn.name} (userspace)",
            f"reads the packet, finds the lease whose subnet holds {dst.ip} and sends the packet, as it is, as "
            f"one UDP datagram to that node's PublicIP:{UDP_PORT} from its own socket",
            f"etcdctl get <prefix>/subnets/{(peer_subnet or '?').replace('/', '-')}; {sock}",
            f"{lease_text(lab, dn)}\n{sh(sn.netns, 'ss', '-uanp', f'sport = :{UDP_PORT}')}",
        ),
        Hop(
            f"flanneld on {dn.name} (userspace)",
            f"receives UDP {UDP_PORT} from {sn.ip} (a node that holds a lease; others are dropped) and writes the "
            f"payload to its {UDP_DEV}, where the kernel takes it as a packet received on that device",
            sock,
            sh(dn.netns, "ss", "-uanp", f"sport = :{UDP_PORT}"),
        ),
    ]


def _esp_note(out: str, src_pod: str, dst_pod: str) -> str:
    """What the underlay capture of the ipsec backend proves: ESP between the nodes, no pod address in clear."""
    seen = cap.addresses_visible(out, (src_pod, dst_pod))
    if seen:
        return f"     WARNING: {', '.join(seen)} visible on the underlay: this is not encrypted traffic"
    if "ESP(" not in out and "UDP-encap" not in out and "NONESP-encap" not in out:
        return "     note: no ESP was captured (no SA yet? `flannel-lab show <node>` lists them)"
    return (
        f"     encrypted: the underlay carries only ESP (protocol {labipsec.ESP_PROTO}, or UDP {labipsec.NATT_PORT} "
        "with UDPEncap) between the nodes' own addresses; after the ESP header (SPI, sequence number) the payload is "
        f"ciphertext, and neither pod address ({src_pod}, {dst_pod}) appears in it, as text or as bytes"
    )


def capture_points(lab: Lab, src: PodState, dst: PodState, names: Sequence[str], family: int = 4) -> list[cap.Point]:
    """The capture points `names` (cap.POINTS) for a packet from `src` to `dst` over IP version `family`;
    LabError for one that does not exist on this lab's path."""
    sn = lab.st.node(src.node)
    backend = lab.st.options.backend
    sip, dip = src.addr(family), dst.addr(family)
    points = []
    for name in sorted(set(names), key=lambda x: cap.POINTS.index(x) if x in cap.POINTS else -1):
        if name == "underlay":
            # The underlay bridge port of a node carries the node's name; -c 2: the request and the reply.
            filt = labipsec.underlay_filter() if backend == "ipsec" else cap.underlay_filter(backend, sip, family)
            points.append(cap.Point(name, f"the underlay port of {sn.name}", lab.st.ul_ns, sn.name, filt, 2))
        elif name == "cni0":
            points.append(cap.Point(name, f"cni0 of {sn.name}", sn.netns, "cni0", cap.icmp_filter(sip, dip)))
        elif name == "flannel.1":
            if backend != "vxlan":
                raise LabError(f"no flannel.1 with the {backend} backend: capture on cni0, pod or underlay")
            dev = vxlan_dev(family)
            points.append(cap.Point(name, f"{dev} of {sn.name}", sn.netns, dev, cap.icmp_filter(sip, dip)))
        elif name == "pod":
            filt = cap.icmp_filter(sip, dip)
            points.append(cap.Point(name, f"eth0 of pod {dst.name}", dst.netns, "eth0", filt))
        else:
            raise LabError(f"no capture point {name!r}: {', '.join(cap.POINTS)}")
    return points


def trace(
    lab: Lab, src: str, dst: str, *, do_capture: bool = True, captures: Sequence[str] = (), family: int = 0
) -> str:
    hops, sn, dn = trace_hops(lab, src, dst, family)
    s, d = lab.st.pod(src), lab.st.pod(dst)
    fam = trace_family(lab, family)
    sip, dip = s.addr(fam), d.addr(fam)
    backend = lab.st.options.backend
    over = f", over IPv{fam}" if len(lab.st.options.families) > 1 else ""
    lines = [f"trace {s.name} ({sip} on {sn.name}) -> {d.name} ({dip} on {dn.name}), backend {backend}{over}", ""]
    lines += [h.render(i) for i, h in enumerate(hops, 1)]
    if not do_capture or (sn.name == dn.name and not captures):
        return "\n".join(lines)
    points = capture_points(lab, s, d, captures or ["underlay"], fam)

    def ping() -> None:
        run(["ip", "netns", "exec", s.netns, "ping", "-c", "1", "-W", "2", dip], check=False)

    outs = cap.capture(points, ping)
    decoded = backend != "udp"  # tcpdump shows udp's inner packet only as hex
    for p, out in zip(points, outs, strict=True):
        lines += ["", f"capture on {p.name} ({p.where}): one ping {s.name} -> {d.name}", f"     [{p.shown()}]"]
        lines.append(_indent(out, "     "))
        if p.name != "underlay":
            continue
        if backend == "wireguard":
            lines.append(labwg.capture_note(out, sip, dip, fam))
            continue
        if backend == "ipsec":
            lines.append(_esp_note(out, sip, dip))
            continue
        if backend == "vxlan" and fam == 6:
            lines.append(
                f"     VXLAN over IPv6: the outer header is {node_addr(sn, 6)} -> {node_addr(dn, 6)} (the nodes' "
                f"IPv6 underlay, {vxlan_dev(6)}'s local), UDP {VXLAN_PORT}; inside, the pod's own IPv6 packet"
            )
        if not decoded:
            lines.append(
                "     the UDP payload starts at byte 28 (0x001c, after the outer IPv4 and UDP headers) with 4500...: "
                f"the pod's own IPv4 header, {sip} -> {dip} as hex further on unless SNATed"
            )
        elif f"{sip} > " not in out and " > " in out:
            lines.append(
                f"     note: the inner source is not {sip}: it was SNATed on {sn.name} (NAT section of `flannel-lab "
                f"show {sn.name}`): without --ip-masq the bridge plugin masquerades all that leaves the node's "
                "subnet; `up --ip-masq` keeps pod IPs between pods, as kube-flannel does"
            )
    if sn.name != dn.name:
        lines += ["", cap.ttl_story(backend, s.name, d.name, sn.name, dn.name, fam)]
    return "\n".join(lines)


# ---- Services ------------------------------------------------------------------------------------------


def kube_rules(ns: str) -> str:
    """kube-proxy's chains and the jumps into them, as iptables-save prints them, per table."""
    out: list[str] = []
    for table in ("nat", "filter"):
        lines = [x for x in sh(ns, "iptables-save", "-t", table).splitlines() if "KUBE-" in x]
        if lines:
            out += [f"*{table}", *lines]
    return "\n".join(out)


def show_services(lab: Lab, name: str) -> str:
    n = lab.st.node(name)
    parts = [f"== kube-proxy on node {n.name} ({n.netns}): {len(lab.st.services)} Services\n"]
    legend = []
    for s in lab.st.services:
        spn = f"{s.namespace}/{s.name}:{s.port_name}"
        legend.append(f"{kubeproxy.svc_chain(spn, s.protocol)}  {spn} ({s.protocol}) {s.cluster_ip}:{s.port}")
        if s.node_port is not None:
            legend.append(f"{kubeproxy.ext_chain(spn, s.protocol)}  {spn} NodePort {s.node_port}")
        legend += [f"{kubeproxy.sep_chain(spn, s.protocol, ep)}  {spn} -> {ep}" for ep in s.endpoints]
    parts.append(
        _section(
            "chain names: base32(sha256(service port name + protocol [+ endpoint]))[:16], as kube-proxy names them",
            "flannel-lab service list",
            "\n".join(legend) or "(no services: `flannel-lab service add`)",
        )
    )
    parts.append(_section("kube-proxy's rules", "iptables-save | grep KUBE-", kube_rules(n.netns) or "(none)"))
    if any(s.mode == "ipvs" for s in lab.st.services):
        parts.append(_section("IPVS virtual servers", "ipvsadm -Ln", sh(n.netns, "ipvsadm", "-Ln")))
        parts.append(
            _section("ClusterIPs on lo", "ip -4 addr show dev lo", sh(n.netns, "ip", "-4", "addr", "show", "lo"))
        )
    parts.append(
        _section(
            "POSTROUTING: KUBE-POSTROUTING masquerades what carries 0x4000; FLANNEL-POSTRTG returns on it",
            "iptables-save -t nat | grep -e '-A POSTROUTING' -e 0x4000",
            "\n".join(
                x
                for x in sh(n.netns, "iptables-save", "-t", "nat").splitlines()
                if x.startswith("-A POSTROUTING") or "0x4000" in x
            ),
        )
    )
    return "\n".join(parts)


def _syn_to(ip: str | None, port: int) -> list[str]:
    f = ["tcp[tcpflags] & tcp-syn != 0", "and", "tcp[tcpflags] & tcp-ack == 0", "and", "dst", "port", str(port)]
    return [*f, "and", "dst", "host", ip] if ip else f


def trace_service(lab: Lab, src_name: str, target: str) -> str:
    """The path of one request from a pod to a Service: the pod's route, the node's DNAT chain, and which
    backend answered (captured on the pod and on every backend)."""
    resolved = services.resolve(lab.st, target)
    assert resolved is not None
    svc, port = resolved
    src = lab.st.pod(src_name)
    sn = lab.st.node(src.node)
    spn = f"{svc.namespace}/{svc.name}:{svc.port_name}"
    url = f"http://{svc.cluster_ip}:{port}/"
    lines = [f"trace {src.name} ({src.ip} on {sn.name}) -> service {svc.name} {svc.cluster_ip}:{port} ({svc.mode})", ""]
    txt, _ = _route_get(src.netns, svc.cluster_ip)
    hops = [
        Hop(
            f"pod {src.name}",
            "no route of its own for the ClusterIP: the default one, to its node",
            f"ip route get {svc.cluster_ip}",
            txt,
        )
    ]
    save = sh(sn.netns, "iptables-save", "-t", "nat").splitlines()
    if svc.mode == "iptables":
        chain = kubeproxy.svc_chain(spn, svc.protocol)
        entry = [x for x in save if x.startswith("-A KUBE-SERVICES") and chain in x]
        hops.append(
            Hop(
                f"node {sn.name}",
                "nat PREROUTING -> KUBE-SERVICES matches the ClusterIP and port",
                "iptables-save -t nat | grep 'KUBE-SERVICES.*cluster IP'",
                "\n".join(entry),
            )
        )
        svc_rules = [x for x in save if x.startswith(f"-A {chain} ")]
        hops.append(
            Hop(
                f"node {sn.name}",
                f"{chain} picks an endpoint at random (each rule's probability is 1/(the "
                "endpoints left)); sources outside the pod network are marked for masquerade",
                f"iptables-save -t nat | grep -- '-A {chain}'",
                "\n".join(svc_rules),
            )
        )
        seps = [kubeproxy.sep_chain(spn, svc.protocol, ep) for ep in svc.endpoints]
        dnat = [x for x in save if any(x.startswith(f"-A {c} ") for c in seps)]
        hops.append(
            Hop(
                f"node {sn.name}",
                "the endpoint's KUBE-SEP chain DNATs to the pod (and marks a pod that "
                "reaches itself, the hairpin, for masquerade)",
                "iptables-save -t nat | grep -- '-A KUBE-SEP'",
                "\n".join(dnat),
            )
        )
    else:
        hops.append(
            Hop(
                f"node {sn.name}",
                "the ClusterIP is a local address (lo), so IPVS takes the packet in "
                "INPUT and NATs it to a real server (round robin)",
                f"ipvsadm -Ln -t {svc.cluster_ip}:{port}",
                sh(sn.netns, "ipvsadm", "-Ln", "-t", f"{svc.cluster_ip}:{port}"),
            )
        )
    lines += [h.render(i) for i, h in enumerate(hops, 1)]
    backends = [(b.rsplit(":", 1)[0], int(b.rsplit(":", 1)[1])) for b in svc.backends]
    points = [cap.Point("pod", f"eth0 of {src.name}", src.netns, "eth0", _syn_to(svc.cluster_ip, port))]
    points += [cap.Point(b, f"eth0 of backend {b}", lab.st.pod(b).netns, "eth0", _syn_to(None, p)) for b, p in backends]
    answer: list[str] = []

    def request() -> None:
        answer.append(sh(src.netns, "curl", "-s", "--max-time", "5", url))

    outs = cap.capture(points, request, timeout=3.0)
    lines += ["", f"one request: curl {url} from {src.name}", f"     answer: {answer[0] or '(none)'}"]
    for p, out in zip(points, outs, strict=True):
        lines += ["", f"capture on {p.where}", f"     [{p.shown()}]", _indent(out, "     ")]
    seen = [p.name for p, out in zip(points[1:], outs[1:], strict=True) if "Flags [S]" in out]
    who = answer[0].split()[0] if answer[0] else "nobody"
    lines += [
        "",
        f"DNAT: the pod sent to {svc.cluster_ip}:{port}; the node rewrote the destination to "
        f"{', '.join(seen) or '?'}'s address, and the pod network carried it there (cni0, or flannel.1 for another "
        f"node's pod); {who} answered (conntrack rewrites the reply's source back to {svc.cluster_ip}:{port})",
    ]
    return "\n".join(lines)
