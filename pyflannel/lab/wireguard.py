"""The wireguard backend in the lab: what `show` lists (the peers, the way `wg show` does, private key hidden) and
the hops `trace` explains (the route into flannel-wg, the peer whose allowed IPs hold the destination, the UDP
datagram to its endpoint), plus what the underlay capture filters on.

`wg` itself reads the device: in the node namespace for kernel WireGuard, and inside wireguard-go's own mount
namespace (nsenter) for the userspace fallback, whose UAPI socket exists only there. Key material never reaches
the output: wg prints the private and preshared keys as "(hidden)" unless asked, and any line naming one is
rewritten here anyway.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

from .capture import WIREGUARD_PORT, WIREGUARD_PORT6, addresses_visible
from .netns import ns_pids, output_or_error, url_host

DEV = "flannel-wg"
PORT = WIREGUARD_PORT
DEV6 = "flannel-wg-v6"  # the IPv6 device of the backend's default "separate" mode, on its own port
PORT6 = WIREGUARD_PORT6
_SECRET_LINE = re.compile(r"^(\s*(?:private|preshared) key:).*$", re.M)


def wireguard_go_pid(ns: str, dev: str = DEV) -> int | None:
    """The wireguard-go process serving this node's device `dev` (one per device: its argv ends with the
    device's name), or None (kernel WireGuard, or none)."""
    for pid in ns_pids(ns):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() != "wireguard-go":
                continue
            if Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")[-1].decode() == dev:
                return pid
        except OSError:
            continue
    return None


def implementation(ns: str, dev: str = DEV) -> str:
    kind = output_or_error(["ip", "-n", ns, "-d", "link", "show", dev])
    if "wireguard" in kind:
        return "kernel WireGuard"
    pid = wireguard_go_pid(ns, dev)
    return f"wireguard-go (userspace), pid {pid}" if pid else "(no WireGuard device)"


def wg_command(ns: str, dev: str = DEV) -> list[str]:
    """How to run `wg` against this node's device `dev`: where its configuration interface is."""
    pid = wireguard_go_pid(ns, dev)
    if pid is not None:
        return ["nsenter", "-t", str(pid), "-m", "-n", "wg"]
    return ["ip", "netns", "exec", ns, "wg"]


def redact(text: str) -> str:
    return _SECRET_LINE.sub(r"\1 (hidden)", text)


def wg_show(ns: str, dev: str = DEV) -> str:
    """`wg show DEV`: interface, public key, port, and each peer's endpoint, allowed IPs, handshake, transfer."""
    return redact(output_or_error([*wg_command(ns, dev), "show", dev])) or "(no such device)"


def shown_command(ns: str, dev: str = DEV) -> str:
    pid = wireguard_go_pid(ns, dev)
    if pid is not None:
        return f"nsenter -t {pid} -m -n wg show {dev}   (wireguard-go's socket lives in its own mount namespace)"
    return f"ip netns exec {ns} wg show {dev}"


def peer_for(ns: str, dst_ip: str, dev: str = DEV) -> tuple[str, str, str]:
    """(public key, endpoint, allowed IPs) of the peer whose allowed IPs hold `dst_ip` (wg's cryptokey routing)."""
    addr = ipaddress.ip_address(dst_ip)
    out = output_or_error([*wg_command(ns, dev), "show", dev, "dump"])
    for line in out.splitlines()[1:]:  # the first line is the interface's own, with its private key
        f = line.split("\t")
        if len(f) < 4:
            continue
        for cidr in f[3].split(","):
            try:
                if addr in ipaddress.ip_network(cidr, strict=False):
                    return f[0], f[2], f[3]
            except ValueError:
                continue
    return "?", "?", "?"


def device(family: int) -> tuple[str, int]:
    """The device and listen port carrying IP version `family` (the default "separate" mode)."""
    return (DEV6, PORT6) if family == 6 else (DEV, PORT)


def trace_hops(
    src_ns: str, src_ip: str, dst_ns: str, dst_pod_ip: str, src_pod_ip: str, family: int = 4
) -> list[tuple[str, str, str]]:
    """(what, command, entry) for the source node and the destination node of a pod-to-pod packet."""
    dev, port = device(family)
    key, endpoint, allowed = peer_for(src_ns, dst_pod_ip, dev)
    back_key, back_ep, back_allowed = peer_for(dst_ns, src_pod_ip, dev)
    return [
        (
            f"{dev} ({implementation(src_ns, dev)}) looks up the peer whose allowed IPs hold {dst_pod_ip} (cryptokey "
            f"routing), encrypts the packet for it and sends it as UDP {url_host(src_ip)}:{port} -> {endpoint}",
            f"wg show {dev} dump | grep {_prefix(dst_pod_ip)}",
            f"peer {key}\n  endpoint {endpoint}\n  allowed ips {allowed}",
        ),
        (
            f"{dev} ({implementation(dst_ns, dev)}) receives UDP {port}, decrypts it with the session of the sender's "
            f"key, and accepts the inner packet only because its source {src_pod_ip} is in that peer's allowed IPs",
            f"wg show {dev} dump | grep {_prefix(src_pod_ip)}",
            f"peer {back_key}\n  endpoint {back_ep}\n  allowed ips {back_allowed}",
        ),
    ]


def _prefix(ip: str) -> str:
    """What to grep for a pod's subnet in `wg show dump`: the address without its host part."""
    return ip.rsplit(":", 1)[0] if ":" in ip else ip.rsplit(".", 1)[0]


def capture_note(out: str, src_pod: str, dst_pod: str, family: int = 4) -> str:
    """What the underlay capture proves: only UDP 51820 (IPv6: 51821) between the nodes, and neither pod address in
    clear."""
    port = device(family)[1]
    if "(nothing captured)" in out:
        return f"     note: nothing was captured on UDP {port}, so this capture proves nothing about encryption"
    pods = addresses_visible(out, (src_pod, dst_pod))
    if pods:
        return f"     WARNING: {', '.join(pods)} visible on the underlay: this is not encrypted traffic"
    return (
        f"     encrypted: the underlay carries only UDP {port} between the nodes' own addresses; after WireGuard's "
        f"header (type 4: transport data) the payload is ciphertext, and neither pod address ({src_pod}, "
        f"{dst_pod}) appears in it, as text or as bytes"
    )
