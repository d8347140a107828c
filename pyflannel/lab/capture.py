"""Captures for `trace`: tcpdump at the points the tutorials capture at, all listening before one probe is sent.

    pod        the destination pod's eth0 (tcpdump inside the pod)
    cni0       the source node's bridge, where the pod's packet enters the node
    flannel.1  the source node's VTEP, after the node routed the packet (vxlan only)
    underlay   the source node's port on the underlay bridge: what crosses between the nodes

Each capture is decoded as tcpdump decodes it (-n -e -vv; VXLAN with -T vxlan), so the reader sees the TTL of
each point: the pod sends 64, each node that routes the packet takes one, the bridges take none.
"""

from __future__ import annotations

import ipaddress
import re
import select
import shlex
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

POINTS = ("cni0", "flannel.1", "underlay", "pod")  # in the order the packet passes them
VXLAN_PORT = 8472
UDP_PORT = 8285
WIREGUARD_PORT = 51820
WIREGUARD_PORT6 = 51821  # flannel-wg-v6's (the wireguard backend's default "separate" mode)
LISTEN_TIMEOUT = 5.0
# A line of tcpdump -X's hex dump: "\t0x0010:  c0a8 4d0b ...  ..M." (the offset, two spaces, the bytes, two
# spaces, the ASCII). Header text such as IPv6's "flowlabel 0x0..." or "tos 0x0" is no part of the dump.
_HEX_LINE = re.compile(r"^\s*0x[0-9a-f]{4,}:  ")


@dataclass
class Point:
    """One capture: tcpdump on `iface` inside namespace `ns`, stopping after `count` packets."""

    name: str
    where: str  # for the reader: "the underlay port of n1"
    ns: str
    iface: str
    filt: list[str]
    count: int = 1

    def command(self) -> list[str]:
        return ["tcpdump", "-i", self.iface, "-n", "-e", "-vv", "-l", "-c", str(self.count), *self.filt]

    def shown(self) -> str:
        return shlex.join(["ip", "netns", "exec", self.ns, *self.command()])


def underlay_filter(backend: str, src_ip: str, family: int = 4) -> list[str]:
    """What the underlay carries for a pod's packet, per backend (for an IPv6 pod: its VXLAN over IPv6)."""
    if backend == "vxlan":
        return ["-T", "vxlan", "ip6" if family == 6 else "ip", "and", "udp", "port", str(VXLAN_PORT)]
    if backend == "ipip":
        return ["ip", "proto", "4"]  # tcpdump prints the outer and the inner IPv4 header
    if backend == "udp":
        # tcpdump does not decode the payload: -X shows it starts with the inner IPv4 header (45 00 ...).
        return ["-X", "udp", "port", str(UDP_PORT)]
    if backend == "wireguard":
        # tcpdump names WireGuard's message types; -X shows the payload is ciphertext (no 45 00, no pod address).
        return ["-X", "udp", "port", str(WIREGUARD_PORT6 if family == 6 else WIREGUARD_PORT)]
    return ["icmp6" if ":" in src_ip else "icmp", "and", "host", src_ip]


def icmp_filter(src_ip: str, dst_ip: str) -> list[str]:
    """The echo request alone, so one packet ends the capture (ICMPv6 type 128 right after the IPv6 header: the
    pod's ping carries no extension header)."""
    echo = "icmp6 and ip6[40] == 128" if ":" in src_ip else "icmp[icmptype] == icmp-echo"
    return [echo, "and", "src", "host", src_ip, "and", "dst", "host", dst_ip]


def addresses_visible(out: str, addrs: Sequence[str]) -> list[str]:
    """Which of `addrs` a tcpdump -X capture shows, as text or as their bytes in the hex dump: the proof that an
    encrypting backend (wireguard, ipsec) let no pod address through in clear."""
    dump = "".join(line.split("  ")[1] for line in out.splitlines() if _HEX_LINE.match(line))
    dump = dump.replace(" ", "")
    return [ip for ip in addrs if ip in out or ipaddress.ip_address(ip).packed.hex() in dump]


def _start(p: Point) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", p.ns, *p.command()], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    # tcpdump says "listening on" once the socket is bound: send before that and the packet is missed.
    deadline = time.monotonic() + LISTEN_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        r, _, _ = select.select([proc.stderr], [], [], 0.2)
        if r and "listening on" in proc.stderr.readline():
            break
    return proc


def _finish(proc: subprocess.Popen[str], deadline: float) -> str:
    try:
        out, err = proc.communicate(timeout=max(0.5, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, err = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
    lines = [x for x in err.splitlines() if not x.startswith(("tcpdump:", "listening on")) and "packets" not in x]
    return out.rstrip() or "\n".join(lines).strip() or "(nothing captured)"


def capture(points: Sequence[Point], send: Callable[[], object], timeout: float = 8.0) -> list[str]:
    """Start every capture, send once, and return each capture's tcpdump output (in the order given)."""
    procs: list[subprocess.Popen[str]] = []
    try:
        for p in points:
            procs.append(_start(p))
        send()
        deadline = time.monotonic() + timeout
        return [_finish(proc, deadline) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)


def ttl_story(backend: str, src: str, dst: str, src_node: str, dst_node: str, family: int = 4) -> str:
    """Why each point sees the TTL (IPv6: the hop limit, tcpdump's hlim) it sees."""
    if family == 6:
        outer = "inside the VXLAN packet on the underlay (the outer IPv6 header is the node's own)"
        return (
            f"hop limit (IPv6's TTL, hlim): {src} sends at 64 and its node's cni0 only bridges it; node {src_node} "
            f"routes it, 63 from there on: on {'flannel-v6.1' if backend == 'vxlan' else 'the way out of the node'} "
            f"and {outer if backend == 'vxlan' else 'on the underlay'}; "
            f"the underlay bridge does not route; node {dst_node} routes it into its cni0, so {dst} receives it at "
            "62. 64 -> 63 -> 62."
        )
    tunnel = {
        "vxlan": "inside the VXLAN packet on the underlay (the outer IPv4 header is the node's own)",
        "ipip": "inside the IP-in-IP packet on the underlay (the outer header is the node's own)",
        "udp": "inside flanneld's UDP datagram on the underlay (the outer header is the node's own)",
        "wireguard": "encrypted inside WireGuard's UDP datagram on the underlay (the outer header is the node's own)",
        "ipsec": "encrypted inside ESP on the underlay (the outer header, of the SA's tunnel, is the node's own)",
    }.get(backend, "on the underlay, where host-gw sends it as it is")
    return (
        f"TTL: {src} sends at 64 and its node's cni0 only bridges it (64 on cni0); node {src_node} routes it, "
        f"63 from there on: on flannel.1 and {tunnel}; the underlay bridge does not route; node {dst_node} routes "
        f"it into its cni0, so {dst} receives it at 62. 64 -> 63 -> 62."
    )
