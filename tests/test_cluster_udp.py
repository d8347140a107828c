"""The udp backend with three real agents on real etcd, on this host's kernel (TUN is all it needs).

Assertions read the kernel (`ip link/addr/route`), the wire (a capture on the underlay, parsed here), what pods
receive, and the counters the agent logs at shutdown, so they fail when forwarding is wrong, not only when an
agent crashes. Datagrams are injected from the underlay to show what the data path refuses; each refusal has
a positive control (the same packet from a node that holds a lease does arrive), so the test can fail.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
from clusters import build_cluster, logged_counters, pcap_ipv4, py_in, py_spawn, restart
from needs import need
from test_cluster import NETWORK, Cluster, all_pairs_ping, ip

from pyflannel.backend.udp_forward import inet_checksum
from pyflannel.lab import netns
from pyflannel.lab.probe import restart_gap
from pyflannel.lab.testbed import Node, Pod

pytestmark = [pytest.mark.integration]

DEV = "flannel0"
PORT = 8285
SINK_PORT = 9999


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    yield from build_cluster("udp", {"Type": "udp"})


def test_every_pod_reaches_every_other_pod(cluster: Cluster) -> None:
    assert all_pairs_ping(cluster) == []


def test_device_address_route_mtu_and_lease_are_upstreams(cluster: Cluster) -> None:
    tb = cluster.tb
    for node in tb.nodes.values():
        link = ip(node.ns, "-d", "link", "show", DEV)
        assert " mtu 1472 " in link, link
        assert "tun type tun pi off" in link, link
        assert re.search(r"<[^>]*\bUP\b", link), link
        addrs = ip(node.ns, "-4", "addr", "show", "dev", DEV)
        assert re.findall(r"inet (\S+)", addrs) == [f"{cluster.gw(node)}/32"], addrs
        # One route for the whole Network, and nothing else through the device.
        assert ip(node.ns, "route", "show", "dev", DEV).split() == [NETWORK, "scope", "link"]
        assert "FLANNEL_MTU=1472\n" in node.subnet_file.read_text()
        # The lease carries neither BackendType nor BackendData: exactly upstream's bytes.
        key = cluster.subnet(node).replace("/", "-")
        raw = tb.etcdctl("get", f"{tb.prefix}/subnets/{key}", "--print-value-only").strip()
        assert raw == json.dumps({"PublicIP": node.ip, "PublicIPv6": None}, separators=(",", ":")), raw


def test_underlay_carries_the_inner_ipv4_packet_as_udp_8285_payload(cluster: Cluster) -> None:
    need(tools=("tcpdump",))
    tb = cluster.tb
    n1, n2 = tb.nodes["n1"], tb.nodes["n2"]
    src, dst = n1.pods[0], n2.pods[0]
    pcap = tb.scope.tmpdir / "udp8285.pcap"
    cap = subprocess.Popen(
        ["ip", "netns", "exec", tb.ul_ns, "tcpdump", "-i", n1.name, "-n", "-U", "-c", "6", "-w", str(pcap),
         "udp port 8285"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert cap.stderr is not None
        assert "listening on" in cap.stderr.readline()
        assert tb.ping(src.ns, dst.ip, count=3, wait=2)
        cap.wait(timeout=15)
    finally:
        if cap.poll() is None:
            cap.terminate()
            cap.wait(timeout=10)
    seen = []
    for pkt in pcap_ipv4(pcap):
        ihl = (pkt[0] & 15) * 4
        assert pkt[9] == 17
        sport, dport = struct.unpack_from("!HH", pkt, ihl)
        inner = pkt[ihl + 8 :]
        seen.append((bytes(pkt[12:16]), bytes(pkt[16:20]), sport, dport, inner))
    out = [s for s in seen if s[0] == _b(n1.ip)]
    assert out, seen
    for _s, d, sport, dport, inner in out:
        assert (d, sport, dport) == (_b(n2.ip), PORT, PORT)
        # No header of our own: the payload is the pod's IPv4 packet, ICMP echo from pod to pod.
        assert inner[0] == 0x45 and inner[9] == 1
        assert (inner[12:16], inner[16:20]) == (_b(src.ip), _b(dst.ip))
        assert struct.unpack_from("!H", inner, 2)[0] == len(inner)


def _b(addr: str) -> bytes:
    return bytes(int(x) for x in addr.split("."))


_TCP_SINK = """
import hashlib, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
s.settimeout(60)
c, _ = s.accept()
c.settimeout(60)
h, n = hashlib.sha256(), 0
while chunk := c.recv(1 << 16):
    h.update(chunk)
    n += len(chunk)
print(n, h.hexdigest(), flush=True)
"""

_TCP_SOURCE = """
import socket, sys
data = open(sys.argv[3], "rb").read()
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
s.sendall(data)
s.close()
"""


def test_large_ping_and_20mb_tcp_transfer_arrive_intact(cluster: Cluster) -> None:
    tb = cluster.tb
    src, dst = tb.nodes["n1"].pods[0], tb.nodes["n3"].pods[0]
    p = subprocess.run(
        ["ip", "netns", "exec", src.ns, "ping", "-c", "3", "-W", "2", "-s", "1400", "-M", "do", dst.ip],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert p.returncode == 0 and "1408 bytes from" in p.stdout, p.stdout + p.stderr
    blob = tb.scope.tmpdir / "blob"
    blob.write_bytes(os.urandom(20 << 20))
    want = hashlib.sha256(blob.read_bytes()).hexdigest()
    log = tb.scope.tmpdir / "tcpsink.log"
    sink = py_spawn(tb.scope, dst.ns, _TCP_SINK, dst.ip, "5201", log=log)
    time.sleep(0.5)
    py_in(src.ns, _TCP_SOURCE, dst.ip, "5201", str(blob), timeout=120)
    sink.wait(timeout=60)
    assert log.read_text().split() == [str(20 << 20), want]


# A pod that reports every UDP datagram it gets on SINK_PORT within a time window, then "done".
_UDP_SINK = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(0.2)
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    try:
        print(s.recv(2048).decode(errors="replace"), flush=True)
    except socket.timeout:
        pass
print("done", flush=True)
"""

_SEND = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
for hexdata in sys.argv[3:]:
    s.sendto(bytes.fromhex(hexdata), (sys.argv[2], 8285))
"""


def _inner_udp(src: str, dst: str, payload: bytes) -> bytes:
    """An IPv4/UDP packet src -> dst:SINK_PORT (UDP checksum 0: none, allowed over IPv4)."""
    udp = struct.pack("!HHHH", 40000, SINK_PORT, 8 + len(payload), 0) + payload
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, _b(src), _b(dst)))
    hdr[10:12] = struct.pack("!H", inet_checksum(hdr))
    return bytes(hdr) + udp


def _inject(cluster: Cluster, sender_ns: str, sender_ip: str, target: Node, pod: Pod, datagrams: list[bytes]) -> str:
    """Send `datagrams` to target's port 8285 from sender_ip; what `pod` received on SINK_PORT meanwhile."""
    tb = cluster.tb
    log = tb.scope.tmpdir / f"sink-{time.monotonic_ns()}.log"
    sink = py_spawn(tb.scope, pod.ns, _UDP_SINK, pod.ip, str(SINK_PORT), "3", log=log)
    time.sleep(0.7)
    py_in(sender_ns, _SEND, sender_ip, target.ip, *(d.hex() for d in datagrams))
    sink.wait(timeout=20)
    text = log.read_text()
    assert text.endswith("done\n"), text
    return text


def test_datagrams_without_a_lease_or_not_a_whole_ipv4_packet_are_dropped_and_counted(cluster: Cluster) -> None:
    tb = cluster.tb
    n1, n2 = tb.nodes["n1"], tb.nodes["n2"]
    pod = n2.pods[0]
    src_pod = n1.pods[0].ip
    # From the underlay's own address (192.168.77.1), which holds no lease: a well-formed packet for the pod.
    got = _inject(cluster, tb.ul_ns, tb.gateway, n2, pod, [_inner_udp(src_pod, pod.ip, b"from-nowhere")])
    assert "from-nowhere" not in got
    # Truncated (shorter than an IPv4 header), claiming more bytes than it has, and IPv6: from a real peer.
    whole = _inner_udp(src_pod, pod.ip, b"cut-short")
    bad = [whole[:12], whole[:-4], bytes([0x60]) + whole[1:]]
    got = _inject(cluster, n1.ns, n1.ip, n2, pod, bad)
    assert "cut-short" not in got
    # Positive control: the same kind of packet from that peer's address does reach the pod.
    got = _inject(cluster, n1.ns, n1.ip, n2, pod, [_inner_udp(src_pod, pod.ip, b"from-a-peer")])
    assert "from-a-peer" in got
    # The agent counted each refusal (it logs its counters when it stops); the first of each was logged.
    tb.stop_agent(n2)
    counters = logged_counters(n2)
    assert counters["drop_unknown_source"] >= 1, counters
    assert counters["drop_malformed_udp"] >= 3, counters
    text = n2.log_file.read_text()
    assert f"dropped datagram from an address without a lease: {tb.gateway}:" in text
    assert "dropped malformed datagram" in text
    restart(tb, n2)
    assert tb.wait_ping(n1.pods[0].ns, pod.ip)


def test_restart_gap_is_measured(cluster: Cluster, record_property: Callable[[str, object], None]) -> None:
    """Reported, not asserted (timing belongs to bench/): only that traffic resumes after the restart."""
    tb = cluster.tb
    n1, n2 = tb.nodes["n1"], tb.nodes["n2"]
    gap, lost = restart_gap(tb, n1, n1.pods[0], n2.pods[0])
    record_property("udp_restart_gap_seconds", round(gap, 3))
    print(f"\nudp restart gap: {gap:.3f} s without traffic, {lost} probes lost")
    assert tb.wait_ping(n1.pods[0].ns, n2.pods[0].ip)
    # flannel0 outlived the agent: the restarted one attached to it (same ifindex).
    assert logged_counters(n1), "the stopped agent logged no counters"


def test_a_node_that_leaves_is_unreachable_with_icmp_net_unreachable(cluster: Cluster) -> None:
    """Last: n3 leaves for good (agent stopped, lease deleted)."""
    tb = cluster.tb
    n1, n3 = tb.nodes["n1"], tb.nodes["n3"]
    src, gone = n1.pods[0], n3.pods[0]
    assert tb.wait_ping(src.ns, gone.ip)
    tb.stop_agent(n3)
    tb.etcdctl("del", f"{tb.prefix}/subnets/{cluster.subnet(n3).replace('/', '-')}")

    def unreachable() -> bool:
        p = subprocess.run(
            ["ip", "netns", "exec", src.ns, "ping", "-c", "1", "-W", "1", gone.ip],
            capture_output=True, text=True, timeout=15,
        )  # fmt: skip
        # From the Network's address: the agent's reply (the node's own would be a martian on the TUN).
        net_addr = NETWORK.split("/")[0]
        return p.returncode != 0 and f"From {net_addr} icmp_seq=1 Destination Net Unreachable" in p.stdout

    assert netns.wait_for(unreachable, timeout=20)
    # The other peer is still served.
    assert tb.wait_ping(src.ns, tb.nodes["n2"].pods[0].ip)
    tb.stop_agent(n1)
    assert logged_counters(n1)["drop_no_peer"] >= 1
