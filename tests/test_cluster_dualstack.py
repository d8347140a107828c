"""Dual-stack and IPv6-only clusters of real agents on real etcd, over an IPv4+IPv6 (or IPv6-only) underlay.

What is checked is what the kernel holds (routes, neighbours, FDB of both families), what etcd holds (lease keys
and values byte for byte in upstream's shape), what subnet.env says, and what crosses the wire: every pod pings
every other over both families, SNAT towards an outside IPv6 host shows the node's address while pod-to-pod keeps
the pod's own, a full-size IPv6 packet crosses flannel-v6.1 at the MTU subnet.env gives the pods.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network

import pytest
from clusters import py_in, py_spawn
from needs import need

from pyflannel.lab import netns
from pyflannel.lab.testbed import Node, Pod, Testbed
from pyflannel.lease import make_subnet_key, parse_subnet_key
from pyflannel.subnetenv import SubnetEnv

pytestmark = pytest.mark.integration

NETWORK = "10.244.0.0/16"
NETWORK6 = "fd00:244::/48"
OUTSIDE4 = "192.168.77.200"
OUTSIDE6 = "fd77:77::200"
AGENT_ARGS = ("--ip-masq", "--reconcile-interval=300")


def ip(ns: str, *args: str) -> str:
    return netns.run(["ip", "-n", ns, *args], check=False)


def lines(text: str, *, skip_link_local: bool = True) -> set[str]:
    out = {ln.strip() for ln in text.splitlines() if ln.strip()}
    return {ln for ln in out if not (skip_link_local and ln.startswith("fe80:"))}


def mac_of(ns: str, dev: str) -> str:
    info = json.loads(netns.run(["ip", "-n", ns, "-j", "link", "show", dev]))
    return str(info[0]["address"])


@dataclass
class DsCluster:
    tb: Testbed
    backend: str
    env: dict[str, SubnetEnv] = field(default_factory=dict)
    outside: str = ""

    def sn4(self, node: Node) -> IPv4Network:
        sn = self.env[node.name].subnet
        assert sn is not None
        return sn

    def sn6(self, node: Node) -> IPv6Network:
        sn = self.env[node.name].ipv6_subnet
        assert sn is not None
        return sn

    def key(self, node: Node) -> str:
        env = self.env[node.name]
        return make_subnet_key(env.subnet, env.ipv6_subnet)

    def raw_lease(self, node: Node) -> str:
        return self.tb.etcdctl("get", f"{self.tb.prefix}/subnets/{self.key(node)}", "--print-value-only").strip()

    def peers(self, node: Node) -> list[Node]:
        return [n for n in self.tb.nodes.values() if n is not node and n.proc is not None]


def make_cluster(
    tag: str, backend: str, family: str, nodes: tuple[str, ...] = ("n1", "n2", "n3")
) -> Iterator[DsCluster]:
    need(tools=("ip", "etcd", "etcdctl", "ip6tables"), files=("/usr/lib/cni/bridge", "/usr/lib/cni/host-local"))
    scope = netns.RunScope(tag=tag)
    try:
        tb = Testbed(scope, ip_family=family)
        tb.start_etcd()
        conf: dict[str, object] = {"EnableIPv6": True, "IPv6Network": NETWORK6, "Backend": {"Type": backend}}
        conf = {"Network": NETWORK, **conf} if family == "dual" else {"EnableIPv4": False, **conf}
        tb.put_config(conf)
        cl = DsCluster(tb, backend)
        cl.outside = tb.add_host("out", OUTSIDE4)
        for name in nodes:
            node = tb.add_node(name)
            node.extra_args = AGENT_ARGS
            tb.start_agent(node)
        for node in tb.nodes.values():
            cl.env[node.name] = tb.wait_ready(node)
            # Through the real CNI chain: the flannel plugin reads both subnets and host-local gives both addresses.
            tb.add_cni_pod(node)
        yield cl
    finally:
        scope.close()


@pytest.fixture(scope="module", params=["vxlan", "host-gw"])
def dual(request: pytest.FixtureRequest) -> Iterator[DsCluster]:
    yield from make_cluster(f"ds{request.param.replace('-', '')}", request.param, "dual")


@pytest.fixture(scope="module", params=["vxlan", "host-gw"])
def v6only(request: pytest.FixtureRequest) -> Iterator[DsCluster]:
    yield from make_cluster(f"v6{request.param.replace('-', '')}", request.param, "ipv6")


def all_pairs_ping(tb: Testbed, family: int, timeout: float = 20) -> list[str]:
    failures = []
    pods = tb.all_pods()
    for a in pods:
        for b in pods:
            dst = b.ip6 if family == 6 else b.ip
            assert dst is not None
            if a is not b and not tb.wait_ping(a.ns, dst, timeout=timeout):
                failures.append(f"{a.name}->{b.name} ({dst})")
    return failures


# A one-connection TCP server that answers with the address it sees the client at, and its client: what the far
# end sees of a connection is the proof of (no) SNAT, without a capture tool.
_SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(4)
s.settimeout(30)
for _ in range(int(sys.argv[3])):
    c, a = s.accept()
    head = b""
    while len(head) < 16:
        more = c.recv(16 - len(head))
        if not more:
            break
        head += more
    want = int(head.decode() or 0)
    got = 0
    while got < want:
        chunk = c.recv(65536)
        if not chunk:
            break
        got += len(chunk)
    c.sendall(f"{a[0]} {got}".encode())
    c.close()
"""
_CLIENT = """
import socket, sys, time
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
deadline = time.monotonic() + 15
while True:
    try:
        c = socket.create_connection((host, port), timeout=5)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
c.settimeout(20)
c.sendall(str(size).encode().ljust(16))
c.sendall(b"x" * size)
c.shutdown(socket.SHUT_WR)
print(c.recv(256).decode())
"""


def seen_by(
    tb: Testbed, server_ns: str, listen: str, client_ns: str, dst: str, size: int = 0, port: int = 7777
) -> tuple[str, int]:
    """(the client's address as the server saw it, bytes the server received) for one TCP connection."""
    log = tb.scope.tmpdir / f"srv-{server_ns}-{port}.log"
    srv = py_spawn(tb.scope, server_ns, _SERVER, listen, str(port), "1", log=log)
    try:
        out = py_in(client_ns, _CLIENT, dst, str(port), str(size), timeout=40).split()
    finally:
        try:
            srv.wait(timeout=10)
        except subprocess.TimeoutExpired:
            srv.kill()
            srv.wait(timeout=5)
    return out[0], int(out[1])


# --- wire formats (no root) ------------------------------------------------------------------------------------
def test_lease_key_of_the_wire_format_example_round_trips() -> None:
    sn, sn6 = parse_subnet_key("10.12.13.0-24&fd00:12:13::-56")
    assert (str(sn), str(sn6)) == ("10.12.13.0/24", "fd00:12:13::/56")
    assert make_subnet_key(sn, sn6) == "10.12.13.0-24&fd00:12:13::-56"
    assert make_subnet_key(None, IPv6Network("fd00:12:13::/56")) == "0.0.0.0-0&fd00:12:13::-56"


# --- dual stack ------------------------------------------------------------------------------------------------
def test_dual_leases_byte_for_byte(dual: DsCluster) -> None:
    tb = dual.tb
    keys = {dual.key(n) for n in tb.nodes.values()}
    assert keys == set(tb.leases()), "one dual-stack lease per node, nothing else"
    for node in tb.nodes.values():
        sn, sn6 = dual.sn4(node), dual.sn6(node)
        assert dual.key(node) == f"{sn.network_address}-{sn.prefixlen}&{sn6.network_address}-{sn6.prefixlen}"
        assert sn.subnet_of(IPv4Network(NETWORK)) and sn6.subnet_of(IPv6Network(NETWORK6)) and sn6.prefixlen == 64
        if dual.backend == "vxlan":
            mac4, mac6 = mac_of(node.ns, "flannel.1"), mac_of(node.ns, "flannel-v6.1")
            assert mac4 != mac6, "each device has its own VtepMAC"
            want = (
                f'{{"PublicIP":"{node.ip}","PublicIPv6":"{node.ip6}","BackendType":"vxlan",'
                f'"BackendData":{{"VNI":1,"VtepMAC":"{mac4}"}},"BackendV6Data":{{"VNI":1,"VtepMAC":"{mac6}"}}}}'
            )
        else:
            want = f'{{"PublicIP":"{node.ip}","PublicIPv6":"{node.ip6}","BackendType":"host-gw"}}'
        assert dual.raw_lease(node) == want
    assert len({dual.sn4(n) for n in tb.nodes.values()}) == len({dual.sn6(n) for n in tb.nodes.values()}) == 3


def test_dual_subnet_env(dual: DsCluster) -> None:
    for node in dual.tb.nodes.values():
        sn, sn6 = dual.sn4(node), dual.sn6(node)
        mtu = 1430 if dual.backend == "vxlan" else 1500
        assert node.subnet_file.read_text() == (
            f"FLANNEL_NETWORK={NETWORK}\nFLANNEL_SUBNET={sn.network_address + 1}/{sn.prefixlen}\n"
            f"FLANNEL_IPV6_NETWORK={NETWORK6}\nFLANNEL_IPV6_SUBNET={sn6.network_address + 1}/{sn6.prefixlen}\n"
            f"FLANNEL_MTU={mtu}\nFLANNEL_IPMASQ=true\n"
        )
        pod = node.pods[0]
        assert pod.ip6 is not None and ipaddress.ip_address(pod.ip6) in sn6
        assert ipaddress.ip_address(pod.ip) in sn


def masq_rules(ns: str, tool: str = "ip6tables-save") -> list[str]:
    return [ln for ln in netns.ns_exec(ns, [tool, "-t", "nat"]).splitlines() if "flanneld masq" in ln]


def test_dual_ip6tables_rules_are_upstreams(dual: DsCluster) -> None:
    c = '-m comment --comment "flanneld masq"'
    for node in dual.tb.nodes.values():
        pod, pod6, net, net6 = dual.sn4(node), dual.sn6(node), NETWORK, NETWORK6
        for tool, p, n, mcast in (
            ("ip6tables-save", pod6, net6, "ff00::/8"),
            ("iptables-save", pod, net, "224.0.0.0/4"),
        ):
            assert masq_rules(node.ns, tool) == [
                f"-A POSTROUTING {c} -j FLANNEL-POSTRTG",
                f"-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {c} -j RETURN",
                f"-A FLANNEL-POSTRTG -s {p} -d {n} {c} -j RETURN",
                f"-A FLANNEL-POSTRTG -s {n} -d {p} {c} -j RETURN",
                f"-A FLANNEL-POSTRTG ! -s {n} -d {p} {c} -j RETURN",
                f"-A FLANNEL-POSTRTG -s {n} ! -d {mcast} {c} -j MASQUERADE --random-fully",
                f"-A FLANNEL-POSTRTG ! -s {n} -d {n} {c} -j MASQUERADE --random-fully",
            ], tool
            fwd = [ln for ln in netns.ns_exec(node.ns, [tool, "-t", "filter"]).splitlines() if "flanneld forward" in ln]
            cf = '-m comment --comment "flanneld forward"'
            assert fwd == [
                f"-A FORWARD {cf} -j FLANNEL-FWD",
                f"-A FLANNEL-FWD -s {n} {cf} -j ACCEPT",
                f"-A FLANNEL-FWD -d {n} {cf} -j ACCEPT",
            ], tool


def test_dual_every_pod_pings_every_other_over_both_families(dual: DsCluster) -> None:
    assert all_pairs_ping(dual.tb, 4) == []
    assert all_pairs_ping(dual.tb, 6) == []


def expected_entries(cl: DsCluster, node: Node, family: int) -> dict[str, set[str]]:
    """The exact kernel entries `node` must hold for its peers in one family, by command."""
    peers = cl.peers(node)

    def sub(n: Node) -> IPv4Network | IPv6Network:
        return cl.sn6(n) if family == 6 else cl.sn4(n)

    def pub(n: Node) -> str | None:
        return n.ip6 if family == 6 else n.ip

    if cl.backend == "host-gw":
        if family == 6:
            return {"route": {f"{sub(p)} via {pub(p)} metric 1024 pref medium" for p in peers}}
        return {"route": {f"{sub(p)} via {pub(p)}" for p in peers}}
    dev = "flannel-v6.1" if family == 6 else "flannel.1"
    data = "BackendV6Data" if family == 6 else "BackendData"
    macs = {p.name: json.loads(cl.raw_lease(p))[data]["VtepMAC"] for p in peers}
    own = sub(node).network_address
    if family == 6:
        routes = {f"{sub(p)} via {sub(p).network_address} metric 1024 onlink pref medium" for p in peers}
        routes.add(f"{own} proto kernel metric 256 pref medium")
    else:
        routes = {f"{sub(p)} via {sub(p).network_address} onlink" for p in peers}
    return {
        "dev": {dev},
        "route": routes,
        "neigh": {f"{sub(p).network_address} lladdr {macs[p.name]} PERMANENT" for p in peers},
        "fdb": {f"{macs[p.name]} dst {pub(p)} self permanent" for p in peers},
    }


def in_net(cidr: str, net: IPv4Network | IPv6Network) -> bool:
    return ipaddress.ip_address(cidr.split("/")[0]) in net


def kernel_entries(cl: DsCluster, node: Node, family: int) -> dict[str, set[str]]:
    fam = f"-{family}"
    if cl.backend == "host-gw":
        routes = lines(ip(node.ns, fam, "route", "show", "dev", "eth0"))
        net = ipaddress.ip_network(NETWORK6 if family == 6 else NETWORK)
        # Only the routes into the pod network: eth0's own and default routes are not the backend's.
        return {"route": {r for r in routes if "/" in r.split()[0] and in_net(r.split()[0], net)}}
    dev = "flannel-v6.1" if family == 6 else "flannel.1"
    return {
        "dev": {dev} if ip(node.ns, "link", "show", dev).strip() else set(),
        "route": lines(ip(node.ns, fam, "route", "show", "dev", dev)),
        "neigh": lines(ip(node.ns, fam, "neigh", "show", "dev", dev)),
        "fdb": lines(netns.run(["bridge", "-n", node.ns, "fdb", "show", "dev", dev], check=False)),
    }


def settles(cl: DsCluster, node: Node, family: int, timeout: float = 10) -> bool:
    """Whether the node's kernel entries of `family` become exactly the expected ones within `timeout`."""

    def same() -> bool:
        return kernel_entries(cl, node, family) == expected_entries(cl, node, family)

    return netns.wait_for(same, timeout=timeout)


def test_dual_kernel_holds_exact_entries_of_both_families(dual: DsCluster) -> None:
    for node in dual.tb.nodes.values():
        for family in (4, 6):
            assert settles(dual, node, family), (node.name, family, kernel_entries(dual, node, family))
    if dual.backend == "vxlan":
        n1 = dual.tb.nodes["n1"]
        details = ip(n1.ns, "-d", "link", "show", "flannel-v6.1")
        assert f"vxlan id 1 local {n1.ip6} dev eth0 " in details and "nolearning" in details
        assert "mtu 1430 " in details
        assert f"inet6 {dual.sn6(n1).network_address}/128 " in ip(n1.ns, "-6", "addr", "show", "dev", "flannel-v6.1")


def test_dual_snat_to_outside_v6_host_and_none_between_pods(dual: DsCluster) -> None:
    tb = dual.tb
    n1, n2 = tb.nodes["n1"], tb.nodes["n2"]
    pod1, pod2 = n1.pods[0], n2.pods[0]
    assert pod1.ip6 is not None and pod2.ip6 is not None
    # Towards a host outside the cluster the pod's IPv6 source becomes its node's underlay address...
    assert seen_by(tb, dual.outside, "::", pod1.ns, OUTSIDE6)[0] == n1.ip6
    assert seen_by(tb, dual.outside, "0.0.0.0", pod1.ns, OUTSIDE4, port=7778)[0] == n1.ip
    # ...and between pods it stays the pod's own.
    assert seen_by(tb, pod2.ns, "::", pod1.ns, pod2.ip6, port=7779)[0] == pod1.ip6


def test_dual_mtu_full_size_v6_packets_cross(dual: DsCluster) -> None:
    """subnet.env's MTU is the smaller device's (flannel-v6.1's 1430 beside flannel.1's 1450): the CNI bridge puts
    one MTU on the pod for both families, and IPv6 is never fragmented on the way, so a pod MTU of 1450 would make
    1450-byte IPv6 packets depend on Packet Too Big reaching the pod. Here a full-size packet of each family
    crosses with DF set, a larger one is refused at the pod itself (not lost silently on the way), and a bulk
    TCP transfer over IPv6 arrives whole."""
    tb = dual.tb
    pod1, pod2 = tb.nodes["n1"].pods[0], tb.nodes["n2"].pods[0]
    assert pod2.ip6 is not None
    mtu = dual.env["n1"].mtu
    assert mtu == (1430 if dual.backend == "vxlan" else 1500)
    assert f"mtu {mtu} " in ip(pod1.ns, "link", "show", "eth0")

    def df_ping(dst: str, size: int, six: bool) -> subprocess.CompletedProcess[str]:
        fam = ["-6"] if six else []
        return subprocess.run(
            ["ip", "netns", "exec", pod1.ns, "ping", *fam, "-c", "2", "-W", "2", "-i", "0.3", "-M", "do",
             "-s", str(size), dst],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip

    assert df_ping(pod2.ip6, mtu - 48, True).returncode == 0  # 40 IPv6 + 8 ICMPv6 header bytes: exactly `mtu`
    assert df_ping(pod2.ip, mtu - 28, False).returncode == 0
    too_big = df_ping(pod2.ip6, mtu - 47, True)
    assert too_big.returncode != 0 and "mtu" in (too_big.stdout + too_big.stderr).lower()
    peer, got = seen_by(tb, pod2.ns, "::", pod1.ns, pod2.ip6, size=2_000_000, port=7780)
    assert (peer, got) == (pod1.ip6, 2_000_000)
    if dual.backend == "vxlan":
        # Why not upstream's 1450: a pod at that MTU sends 1450-byte IPv6 packets flannel-v6.1 cannot carry.
        netns.run(["ip", "-n", pod1.ns, "link", "set", "eth0", "mtu", "1450"])
        try:
            assert df_ping(pod2.ip6, 1402, True).returncode != 0
        finally:
            netns.run(["ip", "-n", pod1.ns, "link", "set", "eth0", "mtu", str(mtu)])
            netns.run(["ip", "-n", pod1.ns, "-6", "route", "flush", "cache"], check=False)


def test_dual_upstream_written_lease_is_programmed_for_both_families(dual: DsCluster) -> None:
    """A dual-stack lease as upstream writes it (key and JSON), of a node that is no pyflannel agent here."""
    tb = dual.tb
    n1 = tb.nodes["n1"]
    key = "10.244.250.0-24&fd00:244:0:fa::-64"
    if dual.backend == "vxlan":
        value = (
            '{"PublicIP":"192.168.77.250","PublicIPv6":"fd77:77::250","BackendType":"vxlan",'
            '"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"},"BackendV6Data":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:46"}}'
        )
        want = {
            4: ("flannel.1", "10.244.250.0/24 via 10.244.250.0 onlink", "c6:d2:32:6f:8f:44 dst 192.168.77.250 "),
            6: (
                "flannel-v6.1",
                "fd00:244:0:fa::/64 via fd00:244:0:fa:: metric 1024 onlink pref medium",
                "c6:d2:32:6f:8f:46 dst fd77:77::250 ",
            ),
        }
    else:
        value = '{"PublicIP":"192.168.77.250","PublicIPv6":"fd77:77::250","BackendType":"host-gw"}'
        want = {
            4: ("eth0", "10.244.250.0/24 via 192.168.77.250", ""),
            6: ("eth0", "fd00:244:0:fa::/64 via fd77:77::250 metric 1024 pref medium", ""),
        }
    tb.etcdctl("put", f"{tb.prefix}/subnets/{key}", value)
    try:
        for family, (dev, route, fdb) in want.items():

            def programmed(f: int = family, d: str = dev, r: str = route, b: str = fdb) -> bool:
                ok = r in lines(ip(n1.ns, f"-{f}", "route", "show", "dev", d))
                return ok and (not b or b in netns.run(["bridge", "-n", n1.ns, "fdb", "show", "dev", d]))

            assert netns.wait_for(programmed, timeout=10), (family, ip(n1.ns, f"-{family}", "route"))
    finally:
        tb.etcdctl("del", f"{tb.prefix}/subnets/{key}")
    for family in (4, 6):
        assert settles(dual, n1, family), (family, kernel_entries(dual, n1, family))


def test_dual_hand_deleted_v6_entries_come_back(dual: DsCluster) -> None:
    """With no periodic pass in the test's time (--reconcile-interval=300), the repair comes from the kernel's
    notifications, for the IPv6 entries as for the IPv4 ones."""
    tb = dual.tb
    n1, n2 = tb.nodes["n1"], tb.nodes["n2"]
    sn6 = dual.sn6(n2)
    if dual.backend == "vxlan":
        mac6 = json.loads(dual.raw_lease(n2))["BackendV6Data"]["VtepMAC"]
        netns.run(["ip", "-n", n1.ns, "-6", "route", "del", str(sn6), "dev", "flannel-v6.1"])
        netns.run(["ip", "-n", n1.ns, "-6", "neigh", "del", str(sn6.network_address), "dev", "flannel-v6.1"])
        netns.run(["bridge", "-n", n1.ns, "fdb", "del", mac6, "dev", "flannel-v6.1", "dst", str(n2.ip6)])
    else:
        netns.run(["ip", "-n", n1.ns, "-6", "route", "del", str(sn6), "dev", "eth0"])
    assert settles(dual, n1, 6), kernel_entries(dual, n1, 6)
    assert tb.wait_ping(n1.pods[0].ns, str(n2.pods[0].ip6), timeout=10)


def test_dual_restart_reclaims_both_halves(dual: DsCluster) -> None:
    """Restarted without its subnet.env, a node gets its own dual-stack lease back (found by its PublicIP and
    PublicIPv6), and the data plane of both families keeps working."""
    tb = dual.tb
    n2 = tb.nodes["n2"]
    key = dual.key(n2)
    tb.stop_agent(n2)
    n2.subnet_file.unlink()
    since = time.time()
    tb.start_agent(n2)
    dual.env["n2"] = tb.wait_ready(n2, since=since)
    assert dual.key(n2) == key, tb.log_tail(n2)
    assert set(tb.leases()) == {dual.key(n) for n in tb.nodes.values()}
    for family in (4, 6):
        assert settles(dual, n2, family), (family, kernel_entries(dual, n2, family))
    assert all_pairs_ping(tb, 4) == [] and all_pairs_ping(tb, 6) == []


def test_dual_node_leaving_removes_both_families_elsewhere(dual: DsCluster) -> None:
    tb = dual.tb
    n1, n3 = tb.nodes["n1"], tb.nodes["n3"]
    gone4, gone6 = str(dual.sn4(n3)), str(dual.sn6(n3))
    tb.stop_agent(n3)
    tb.etcdctl("del", f"{tb.prefix}/subnets/{dual.key(n3)}")
    for family in (4, 6):
        assert settles(dual, n1, family), (family, kernel_entries(dual, n1, family))
    everything = ip(n1.ns, "-4", "route") + ip(n1.ns, "-6", "route") + ip(n1.ns, "neigh")
    everything += netns.run(["bridge", "-n", n1.ns, "fdb", "show"], check=False)
    assert gone4 not in everything and gone6 not in everything
    if dual.backend == "vxlan":
        assert f"dst {n3.ip6} " not in everything and f"dst {n3.ip} " not in everything
    assert all_pairs_ping_between(tb, ["n1", "n2"]) == []


def all_pairs_ping_between(tb: Testbed, names: list[str]) -> list[str]:
    pods: list[Pod] = [p for n in names for p in tb.nodes[n].pods]
    bad = []
    for a in pods:
        for b in pods:
            for dst in (b.ip, b.ip6):
                if a is not b and dst is not None and not tb.wait_ping(a.ns, dst, timeout=10):
                    bad.append(f"{a.name}->{dst}")
    return bad


def test_vxlan_direct_routing_over_ipv6(scope: netns.RunScope) -> None:
    """DirectRouting: a peer on the same L2 segment gets `<subnet6> via <PublicIPv6> dev eth0`, no VXLAN entries."""
    need(files=("/usr/lib/cni/bridge", "/usr/lib/cni/host-local"))
    tb = Testbed(scope, ip_family="dual")
    tb.start_etcd()
    tb.put_config({"Network": NETWORK, "EnableIPv6": True, "IPv6Network": NETWORK6,
                   "Backend": {"Type": "vxlan", "DirectRouting": True}})  # fmt: skip
    cl = DsCluster(tb, "vxlan")
    for name in ("n1", "n2"):
        tb.start_agent(tb.add_node(name), "--reconcile-interval=300")
    for node in tb.nodes.values():
        cl.env[node.name] = tb.wait_ready(node)
        tb.add_cni_pod(node)
    n1, n2 = tb.nodes["n1"], tb.nodes["n2"]

    def direct() -> bool:
        routes = ip(n1.ns, "-6", "route", "show", "dev", "eth0")
        return f"{cl.sn6(n2)} via {n2.ip6} metric 1024 pref medium" in routes

    assert netns.wait_for(direct, timeout=10), ip(n1.ns, "-6", "route")
    assert f"{cl.sn4(n2)} via {n2.ip} " in ip(n1.ns, "-4", "route", "show", "dev", "eth0")
    assert lines(netns.run(["bridge", "-n", n1.ns, "fdb", "show", "dev", "flannel-v6.1"])) == set()
    assert lines(ip(n1.ns, "-6", "neigh", "show", "dev", "flannel-v6.1")) == set()
    assert all_pairs_ping(tb, 6) == [] and all_pairs_ping(tb, 4) == []


# --- IPv6 only -------------------------------------------------------------------------------------------------
def test_v6only_leases_subnet_env_and_no_ipv4_anywhere(v6only: DsCluster) -> None:
    tb = v6only.tb
    assert len({v6only.sn6(n) for n in tb.nodes.values()}) == 3, "distinct subnets"
    assert set(tb.leases()) == {v6only.key(n) for n in tb.nodes.values()}
    for node in tb.nodes.values():
        sn6 = v6only.sn6(node)
        assert v6only.env[node.name].subnet is None
        assert v6only.key(node) == f"0.0.0.0-0&{sn6.network_address}-64"
        if v6only.backend == "vxlan":
            mac6 = mac_of(node.ns, "flannel-v6.1")
            assert v6only.raw_lease(node) == (
                f'{{"PublicIP":"0.0.0.0","PublicIPv6":"{node.ip6}","BackendType":"vxlan",'
                f'"BackendV6Data":{{"VNI":1,"VtepMAC":"{mac6}"}}}}'
            )
        else:
            assert (
                v6only.raw_lease(node) == f'{{"PublicIP":"0.0.0.0","PublicIPv6":"{node.ip6}","BackendType":"host-gw"}}'
            )
        mtu = 1430 if v6only.backend == "vxlan" else 1500
        assert node.subnet_file.read_text() == (
            f"FLANNEL_IPV6_NETWORK={NETWORK6}\nFLANNEL_IPV6_SUBNET={sn6.network_address + 1}/64\n"
            f"FLANNEL_MTU={mtu}\nFLANNEL_IPMASQ=true\n"
        )
        assert ip(node.ns, "link", "show", "flannel.1").strip() == ""
        assert ip(node.ns, "-4", "route").strip() == "" and ip(node.ns, "-4", "neigh").strip() == ""
        assert "FLANNEL" not in netns.ns_exec(node.ns, ["iptables-save"])
        assert node.pods[0].ip6 is not None and ipaddress.ip_address(node.pods[0].ip6) in sn6


def test_v6only_pings_kernel_entries_and_snat(v6only: DsCluster) -> None:
    tb = v6only.tb
    assert all_pairs_ping(tb, 6) == []
    for node in tb.nodes.values():
        assert settles(v6only, node, 6), (node.name, kernel_entries(v6only, node, 6))
    n1, n2 = tb.nodes["n1"], tb.nodes["n2"]
    assert seen_by(tb, v6only.outside, "::", n1.pods[0].ns, OUTSIDE6)[0] == n1.ip6
    assert seen_by(tb, n2.pods[0].ns, "::", n1.pods[0].ns, str(n2.pods[0].ip6), port=7779)[0] == n1.pods[0].ip6


def test_v6only_restart_reclaims_own_lease_not_a_peers(v6only: DsCluster) -> None:
    """Every IPv6-only lease says PublicIP 0.0.0.0; upstream v0.20.2 takes the first such lease as its own. The
    lease is ours by PublicIPv6: a node restarted without its subnet.env (so the previous subnet is no hint) must
    get its own lease back, and each node its own after all restart."""
    tb = v6only.tb
    n1 = tb.nodes["n1"]
    before = {n.name: v6only.key(n) for n in tb.nodes.values()}
    assert len(set(before.values())) == 3
    for node in (n1, *[n for n in tb.nodes.values() if n is not n1]):
        tb.stop_agent(node)
        node.subnet_file.unlink()
        since = time.time()
        tb.start_agent(node)
        v6only.env[node.name] = tb.wait_ready(node, since=since)
        assert v6only.key(node) == before[node.name], (node.name, before, tb.log_tail(node))
    assert set(tb.leases()) == set(before.values())
    assert all_pairs_ping(tb, 6) == []


def test_v6only_node_leaving_removes_its_entries(v6only: DsCluster) -> None:
    tb = v6only.tb
    n1, n3 = tb.nodes["n1"], tb.nodes["n3"]
    tb.stop_agent(n3)
    tb.etcdctl("del", f"{tb.prefix}/subnets/{v6only.key(n3)}")
    assert settles(v6only, n1, 6), kernel_entries(v6only, n1, 6)
    assert str(v6only.sn6(n3)) not in ip(n1.ns, "-6", "route")


# --- interface selection over the real IPv6 underlay -----------------------------------------------------------
@pytest.mark.parametrize(
    "family,args,pub4,pub6",
    [
        ("dual", ("--iface=fd99::11",), "10.99.0.11", "fd99::11"),
        ("dual", ("--iface-can-reach=fd99::1",), "10.99.0.11", "fd99::11"),
        ("dual", ("--public-ipv6=fd77:77::99",), "192.168.77.11", "fd77:77::99"),
        ("dual", (), "192.168.77.11", "fd77:77::11"),
        ("ipv6", ("--iface-can-reach=fd99::1",), "0.0.0.0", "fd99::11"),
        ("ipv6", (), "0.0.0.0", "fd77:77::11"),
    ],
)
def test_interface_selection_picks_public_ipv6(
    scope: netns.RunScope, family: str, args: tuple[str, ...], pub4: str, pub6: str
) -> None:
    tb = Testbed(scope, ip_family=family)
    tb.start_etcd()
    conf: dict[str, object] = {"EnableIPv6": True, "IPv6Network": NETWORK6, "Backend": {"Type": "alloc"}}
    tb.put_config({"Network": NETWORK, **conf} if family == "dual" else {"EnableIPv4": False, **conf})
    node = tb.add_node("n1")
    # A second interface with addresses of both families: where --iface and --iface-can-reach must lead.
    # (A veth pair inside the node: the kernel may lack the dummy module.)
    netns.run(["ip", "-n", node.ns, "link", "add", "ext2", "type", "veth", "peer", "name", "ext2p"])
    netns.run(["ip", "-n", node.ns, "link", "set", "ext2p", "up"])
    netns.run(["ip", "-n", node.ns, "addr", "add", "10.99.0.11/24", "dev", "ext2"])
    netns.run(["ip", "-n", node.ns, "addr", "add", "fd99::11/64", "dev", "ext2", "nodad"])
    netns.run(["ip", "-n", node.ns, "link", "set", "ext2", "up"])
    tb.start_agent(node, *args)
    env = tb.wait_ready(node)
    lease = tb.leases()[make_subnet_key(env.subnet, env.ipv6_subnet)]
    assert (lease["PublicIP"], lease["PublicIPv6"]) == (pub4, pub6), tb.log_tail(node)


# --- traffic rules: nftables, blackhole ------------------------------------------------------------------------
def test_nftables_v6_masq_and_forward_rules_do_snat(scope: netns.RunScope) -> None:
    need(tools=("nft",))
    tb = Testbed(scope, ip_family="dual")
    tb.start_etcd()
    tb.put_config({"Network": NETWORK, "EnableIPv6": True, "IPv6Network": NETWORK6, "EnableNFTables": True,
                   "Backend": {"Type": "vxlan"}})  # fmt: skip
    outside = tb.add_host("out", OUTSIDE4)
    node = tb.add_node("n1")
    tb.start_agent(node, "--ip-masq", "--iptables-resync=1")
    env = tb.wait_ready(node)
    sn6 = env.ipv6_subnet
    assert sn6 is not None
    table = netns.ns_exec(node.ns, ["nft", "list", "table", "ip6", "flannel-ipv6"])
    for rule in (
        f"ip6 saddr {sn6} ip6 daddr {NETWORK6} return",
        f"ip6 saddr {NETWORK6} ip6 daddr {sn6} return",
        f"ip6 saddr != {NETWORK6} ip6 daddr {sn6} return",
        f"ip6 saddr {NETWORK6} ip6 daddr != ff00::/8 masquerade fully-random",
        f"ip6 saddr != {NETWORK6} ip6 daddr {NETWORK6} masquerade fully-random",
        f"ip6 saddr {NETWORK6} accept",
        f"ip6 daddr {NETWORK6} accept",
    ):
        assert rule in table, (rule, table)
    assert "type nat hook postrouting" in table and "type filter hook forward" in table
    assert "FLANNEL" not in netns.ns_exec(node.ns, ["ip6tables-save"])
    # Beyond upstream, the nft rules are checked too: a table deleted by hand is rebuilt within the resync period.
    netns.ns_exec(node.ns, ["nft", "delete", "table", "ip6", "flannel-ipv6"])

    def rebuilt() -> bool:
        return (
            netns.run(["ip", "netns", "exec", node.ns, "nft", "list", "table", "ip6", "flannel-ipv6"], check=False)
            == table
        )

    assert netns.wait_for(rebuilt, timeout=15)
    pod = tb.add_cni_pod(node)
    assert pod.ip6 is not None
    assert seen_by(tb, outside, "::", pod.ns, OUTSIDE6)[0] == node.ip6


@pytest.mark.parametrize("family", ["dual", "ipv6"])
def test_blackhole_route_for_ipv6(scope: netns.RunScope, family: str) -> None:
    tb = Testbed(scope, ip_family=family)
    tb.start_etcd()
    conf: dict[str, object] = {"EnableIPv6": True, "IPv6Network": NETWORK6, "Backend": {"Type": "host-gw"}}
    tb.put_config({"Network": NETWORK, **conf} if family == "dual" else {"EnableIPv4": False, **conf})
    node = tb.add_node("n1")
    tb.start_agent(node, "--ip-blackhole-route", "--reconcile-interval=300")
    env = tb.wait_ready(node)

    def has6() -> bool:
        return f"blackhole {env.ipv6_subnet} dev lo metric 4096 " in ip(
            node.ns, "-6", "route", "show", "type", "blackhole"
        )

    assert netns.wait_for(has6, timeout=10), ip(node.ns, "-6", "route")
    v4 = ip(node.ns, "-4", "route", "show", "type", "blackhole").split("\n")[0].strip()
    assert v4 == (f"blackhole {env.subnet} metric 4096" if family == "dual" else "")
    # Hand-deleted, it comes back (from the kernel's notification: no periodic pass in the test's time).
    netns.run(["ip", "-n", node.ns, "-6", "route", "del", "blackhole", str(env.ipv6_subnet), "metric", "4096"])
    assert netns.wait_for(has6, timeout=10)


# --- bad input -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "family,conf,needle",
    [
        ("dual", {"Network": NETWORK, "EnableIPv6": True, "Backend": {"Type": "vxlan"}}, "IPv6Network"),
        (
            "ipv4",
            {"Network": NETWORK, "EnableIPv6": True, "IPv6Network": NETWORK6, "Backend": {"Type": "vxlan"}},
            "no global IPv6 address, which EnableIPv6 needs",
        ),
        (
            "ipv4",
            {"Network": NETWORK, "EnableIPv6": True, "IPv6Network": NETWORK6, "Backend": {"Type": "host-gw"}},
            "no global IPv6 address, which EnableIPv6 needs",
        ),
        (
            "ipv4",
            {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": NETWORK6, "Backend": {"Type": "vxlan"}},
            "no IPv6 default route",
        ),
    ],
)
def test_bad_v6_input_is_one_clear_line_and_nothing_half_built(
    scope: netns.RunScope, family: str, conf: dict[str, object], needle: str
) -> None:
    tb = Testbed(scope, ip_family=family)
    tb.start_etcd()
    tb.put_config(conf)
    node = tb.add_node("n1")
    proc = tb.start_agent(node, "--ip-masq")
    assert proc.wait(timeout=60) != 0
    log = node.log_file.read_text()
    errors = [ln for ln in log.splitlines() if ln.startswith(("E", "F"))]
    assert len(errors) == 1 and needle in errors[0], log
    assert "Traceback" not in log
    assert not node.subnet_file.exists()
    assert tb.leases() == {}
    links = ip(node.ns, "-o", "link", "show")
    assert "flannel" not in links and "cni0" not in links
    for tool in ("iptables-save", "ip6tables-save"):
        assert "FLANNEL" not in netns.ns_exec(node.ns, [tool])


def test_no_free_ipv6_subnet_removes_only_what_this_run_made(scope: netns.RunScope) -> None:
    """The vxlan devices are made before the lease is taken (the lease carries their MACs). An agent that then
    finds no free subnet removes the devices it made, so a node that never joined keeps nothing; a node whose
    devices a previous run left keeps them (their MACs are in its peers' entries)."""
    tb = Testbed(scope, ip_family="dual")
    tb.start_etcd()
    tb.put_config({"Network": NETWORK, "EnableIPv6": True, "IPv6Network": "fd00::/62", "Backend": {"Type": "vxlan"}})
    old, new = tb.add_node("n1"), tb.add_node("n2")
    tb.start_agent(old, "--ip-masq")
    env = tb.wait_ready(old)
    assert tb.stop_agent(old) == 0
    macs = (mac_of(old.ns, "flannel.1"), mac_of(old.ns, "flannel-v6.1"))
    tb.etcdctl("del", f"{tb.prefix}/subnets/{make_subnet_key(env.subnet, env.ipv6_subnet)}")
    for i in (1, 2, 3):  # reservations (no TTL) on all three IPv6 subnets of fd00::/62
        value = json.dumps({"PublicIP": f"192.168.77.20{i}", "PublicIPv6": f"fd77:77::20{i}"})
        tb.etcdctl("put", f"{tb.prefix}/subnets/10.244.{i}0.0-24&fd00:0:0:{i}::-64", value)
    for node in (old, new):
        node.subnet_file.unlink(missing_ok=True)
        proc = tb.start_agent(node, "--ip-masq")
        assert proc.wait(timeout=60) == 1
        log = node.log_file.read_text()
        assert "no free subnets between IPv6SubnetMin and IPv6SubnetMax" in log and "Traceback" not in log
        tb.stop_agent(node)
        assert not node.subnet_file.exists()
    assert (mac_of(old.ns, "flannel.1"), mac_of(old.ns, "flannel-v6.1")) == macs
    assert "flannel" not in ip(new.ns, "-o", "link", "show")
    for tool in ("iptables-save", "ip6tables-save"):
        assert "FLANNEL" not in netns.ns_exec(new.ns, [tool])
