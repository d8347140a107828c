"""Three real flanneld agents on real etcd, pods in namespaces, for the vxlan and host-gw backends.

The assertions read what the kernel holds (`ip route`, `ip neigh`, `bridge fdb`) and what crosses the wire
(pings between pod namespaces), so they fail when the programming is wrong, not only when the agent crashes.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator

import pytest
from needs import need

from pyflannel.lab import netns
from pyflannel.lab.testbed import Node, Testbed
from pyflannel.subnetenv import SubnetEnv

pytestmark = [pytest.mark.integration, pytest.mark.kernel_vm]

NETWORK = "10.244.0.0/16"


def ip(ns: str, *args: str) -> str:
    return netns.run(["ip", "-n", ns, *args], check=False)


def fdb(ns: str, dev: str) -> str:
    return netns.run(["bridge", "-n", ns, "fdb", "show", "dev", dev], check=False)


class Cluster:
    def __init__(self, tb: Testbed, backend: str) -> None:
        self.tb = tb
        self.backend = backend
        self.env: dict[str, SubnetEnv] = {}

    def lease_of(self, node: Node) -> dict[str, object]:
        env = self.env[node.name]
        assert env.subnet is not None
        return self.tb.leases()[f"{env.subnet.network_address}-{env.subnet.prefixlen}"]

    def subnet(self, node: Node) -> str:
        return str(self.env[node.name].subnet)

    def gw(self, node: Node) -> str:
        sn = self.env[node.name].subnet
        assert sn is not None
        return str(sn.network_address)


def _make_cluster(backend: str) -> Iterator[Cluster]:
    need(tools=("ip", "etcd", "etcdctl"))
    scope = netns.RunScope(tag=f"c{backend.replace('-', '')}")
    try:
        tb = Testbed(scope)
        tb.start_etcd()
        tb.put_config({"Network": NETWORK, "Backend": {"Type": backend}})
        cl = Cluster(tb, backend)
        for name in ("n1", "n2", "n3"):
            node = tb.add_node(name)
            # No periodic pass within a test's time: repairs below must come from the kernel's notifications.
            node.extra_args = ("--reconcile-interval=300", "--healthz-port=8471", "--healthz-ip=127.0.0.1")
            tb.start_agent(node)
        for node in tb.nodes.values():
            cl.env[node.name] = tb.wait_ready(node)
            tb.add_pod(node, cl.env[node.name])
        yield cl
    finally:
        scope.close()


@pytest.fixture(scope="module", params=["vxlan", "host-gw"])
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    yield from _make_cluster(request.param)


def all_pairs_ping(cl: Cluster, timeout: float = 20) -> list[str]:
    failures = []
    pods = cl.tb.all_pods()
    for a in pods:
        for b in pods:
            if a is not b and not cl.tb.wait_ping(a.ns, b.ip, timeout=timeout):
                failures.append(f"{a.name}->{b.name}")
    return failures


def test_subnets_distinct_and_subnet_env_matches_lease(cluster: Cluster) -> None:
    tb = cluster.tb
    subnets = {cluster.subnet(n) for n in tb.nodes.values()}
    assert len(subnets) == 3
    for node in tb.nodes.values():
        env = cluster.env[node.name]
        text = node.subnet_file.read_text()
        assert f"FLANNEL_NETWORK={NETWORK}\n" in text
        assert re.search(r"^FLANNEL_SUBNET=10\.244\.\d+\.1/24$", text, re.M)
        mtu = 1450 if cluster.backend == "vxlan" else 1500
        assert env.mtu == mtu
        lease = cluster.lease_of(node)
        assert lease["PublicIP"] == node.ip
        assert lease["PublicIPv6"] is None
        if cluster.backend == "vxlan":
            assert lease["BackendType"] == "vxlan"
            assert isinstance(lease["BackendData"], dict)
            assert lease["BackendData"]["VNI"] == 1  # type: ignore[index]
        else:
            assert lease["BackendType"] == "host-gw"
            assert "BackendData" not in lease
    # Wire format: exactly upstream's compact field order.
    raw = tb.etcdctl(
        "get", f"{tb.prefix}/subnets/{cluster.subnet(tb.nodes['n1']).replace('/', '-')}", "--print-value-only"
    )
    assert raw.startswith('{"PublicIP":"192.168.77.')
    assert '"PublicIPv6":null' in raw


def test_every_pod_reaches_every_other_pod(cluster: Cluster) -> None:
    assert all_pairs_ping(cluster) == []


def test_kernel_holds_upstream_entries(cluster: Cluster) -> None:
    tb = cluster.tb
    n1 = tb.nodes["n1"]
    for peer in (tb.nodes["n2"], tb.nodes["n3"]):
        routes = ip(n1.ns, "route", "show", cluster.subnet(peer))
        if cluster.backend == "vxlan":
            mac = cluster.lease_of(peer)["BackendData"]["VtepMAC"]  # type: ignore[index]
            assert f"via {cluster.gw(peer)} dev flannel.1 onlink" in routes
            neigh = ip(n1.ns, "neigh", "show", "dev", "flannel.1")
            assert f"{cluster.gw(peer)} lladdr {mac} PERMANENT" in neigh
            assert f"{mac} dst {peer.ip} self permanent" in fdb(n1.ns, "flannel.1")
        else:
            assert f"via {peer.ip} dev eth0" in routes
    if cluster.backend == "vxlan":
        link = ip(n1.ns, "-d", "link", "show", "flannel.1")
        assert "vxlan id 1 " in link
        assert f"local {n1.ip} dev eth0" in link
        assert "dstport 8472" in link
        assert "nolearning" in link
        assert "mtu 1450" in link
        addr = ip(n1.ns, "addr", "show", "dev", "flannel.1")
        assert f"inet {cluster.gw(n1)}/32" in addr


def test_hand_deleted_entries_come_back(cluster: Cluster) -> None:
    """Each deletion is announced by the kernel and repaired at once (the periodic pass is 300 s away)."""
    tb = cluster.tb
    n1, n2 = tb.nodes["n1"], tb.nodes["n2"]
    sn = cluster.subnet(n2)
    netns.run(["ip", "-n", n1.ns, "route", "del", sn])
    assert netns.wait_for(lambda: sn in ip(n1.ns, "route", "show", sn), timeout=10)
    if cluster.backend == "vxlan":
        mac = str(cluster.lease_of(n2)["BackendData"]["VtepMAC"])  # type: ignore[index]
        netns.run(["ip", "-n", n1.ns, "neigh", "del", cluster.gw(n2), "dev", "flannel.1"])
        netns.run(["bridge", "-n", n1.ns, "fdb", "del", mac, "dev", "flannel.1", "dst", n2.ip, "self"])
        assert netns.wait_for(lambda: mac in ip(n1.ns, "neigh", "show", "dev", "flannel.1"), timeout=10)
        assert netns.wait_for(lambda: f"{mac} dst {n2.ip}" in fdb(n1.ns, "flannel.1"), timeout=10)
    assert tb.wait_ping(n1.pods[0].ns, n2.pods[0].ip)


def test_lost_device_or_flushed_routes_come_back_with_all_peers(cluster: Cluster) -> None:
    """vxlan: the deleted device is recreated with its MAC and every peer. host-gw has no device: taking eth0 down
    flushes every route via it without a route notification, and the link event brings them back once it is up."""
    tb = cluster.tb
    n1 = tb.nodes["n1"]
    peers = [tb.nodes["n2"], tb.nodes["n3"]]
    if cluster.backend == "host-gw":
        netns.run(["ip", "-n", n1.ns, "link", "set", "eth0", "down"])
        assert netns.wait_for(lambda: not any(cluster.subnet(p) in ip(n1.ns, "route") for p in peers), timeout=10)
        netns.run(["ip", "-n", n1.ns, "link", "set", "eth0", "up"])
        # The default route went with the link; the test bed's, not the agent's, so put it back by hand.
        netns.run(["ip", "-n", n1.ns, "route", "replace", "default", "via", tb.gateway])
        assert netns.wait_for(lambda: all(cluster.subnet(p) in ip(n1.ns, "route") for p in peers), timeout=20)
        for peer in peers:
            assert tb.wait_ping(n1.pods[0].ns, peer.pods[0].ip)
        return
    mac = cluster.lease_of(n1)["BackendData"]["VtepMAC"]  # type: ignore[index]
    netns.run(["ip", "-n", n1.ns, "link", "del", "flannel.1"])
    assert netns.wait_for(lambda: all(cluster.subnet(p) in ip(n1.ns, "route") for p in peers), timeout=10)
    # Same MAC as in our lease, so the peers' neighbour/FDB entries for us are still right.
    assert f"link/ether {mac}" in ip(n1.ns, "link", "show", "flannel.1")
    for peer in peers:
        assert tb.wait_ping(n1.pods[0].ns, peer.pods[0].ip)
        assert tb.wait_ping(peer.pods[0].ns, n1.pods[0].ip)


def test_stale_entry_is_swept(cluster: Cluster) -> None:
    """An entry for a subnet no lease holds is removed by the agent as soon as the kernel announces it."""
    n1 = cluster.tb.nodes["n1"]
    stale = "10.244.250.0/24"
    if cluster.backend == "vxlan":
        mac = "0a:00:00:00:fa:00"
        netns.run(["ip", "-n", n1.ns, "neigh", "add", "10.244.250.0", "lladdr", mac, "nud", "permanent", "dev",
                   "flannel.1"])  # fmt: skip
        netns.run(["bridge", "-n", n1.ns, "fdb", "append", mac, "dev", "flannel.1", "dst", "192.168.77.250", "self",
                   "permanent"])  # fmt: skip
        netns.run(["ip", "-n", n1.ns, "route", "add", stale, "via", "10.244.250.0", "dev", "flannel.1", "onlink"])
        assert netns.wait_for(lambda: mac not in ip(n1.ns, "neigh", "show", "dev", "flannel.1"), timeout=10)
        assert netns.wait_for(lambda: mac not in fdb(n1.ns, "flannel.1"), timeout=10)
    else:
        netns.run(["ip", "-n", n1.ns, "route", "add", stale, "via", "192.168.77.250", "dev", "eth0"])
    assert netns.wait_for(lambda: stale not in ip(n1.ns, "route"), timeout=10)


def test_garbage_lease_is_skipped_and_the_rest_still_works(cluster: Cluster) -> None:
    tb = cluster.tb
    tb.etcdctl("put", f"{tb.prefix}/subnets/10.244.251.0-24", "this is not json")
    tb.etcdctl("put", f"{tb.prefix}/subnets/not-a-subnet", '{"PublicIP":"192.168.77.99"}')
    try:
        n1 = tb.nodes["n1"]
        assert netns.wait_for(lambda: "10.244.251.0-24" in n1.log_file.read_text(), timeout=10)
        for node in tb.nodes.values():
            assert node.proc is not None and node.proc.poll() is None
        assert "10.244.251.0" not in ip(n1.ns, "route")
        assert all_pairs_ping(cluster) == []
    finally:
        tb.etcdctl("del", f"{tb.prefix}/subnets/10.244.251.0-24")
        tb.etcdctl("del", f"{tb.prefix}/subnets/not-a-subnet")


def test_upstream_written_lease_is_programmed_and_carries_traffic(cluster: Cluster) -> None:
    """A node configured by hand the way upstream flanneld would, announcing itself with upstream's exact JSON."""
    tb = cluster.tb
    up = tb.add_node("up")
    subnet, gw = "10.244.200.0/24", "10.244.200.0"
    mac = "c6:d2:32:6f:8f:44"
    netns.run(["ip", "-n", up.ns, "link", "add", "cni0", "type", "bridge"])
    netns.run(["ip", "-n", up.ns, "addr", "add", "10.244.200.1/24", "dev", "cni0"])
    netns.run(["ip", "-n", up.ns, "link", "set", "cni0", "up"])
    if cluster.backend == "vxlan":
        netns.run(["ip", "-n", up.ns, "link", "add", "flannel.1", "address", mac, "type", "vxlan", "id", "1",
                   "local", up.ip, "dev", "eth0", "dstport", "8472", "nolearning"])  # fmt: skip
        netns.run(["ip", "-n", up.ns, "addr", "add", f"{gw}/32", "dev", "flannel.1"])
        netns.run(["ip", "-n", up.ns, "link", "set", "flannel.1", "up"])
        value = (
            f'{{"PublicIP":"{up.ip}","PublicIPv6":null,"BackendType":"vxlan",'
            f'"BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}'
        )
    else:
        value = f'{{"PublicIP":"{up.ip}","PublicIPv6":null,"BackendType":"host-gw"}}'
    # The hand-made node's own side, as upstream would program it from the others' leases.
    for node in (tb.nodes["n1"], tb.nodes["n2"], tb.nodes["n3"]):
        if cluster.backend == "vxlan":
            peer_mac = str(cluster.lease_of(node)["BackendData"]["VtepMAC"])  # type: ignore[index]
            netns.run(["ip", "-n", up.ns, "neigh", "replace", cluster.gw(node), "lladdr", peer_mac, "dev",
                       "flannel.1", "nud", "permanent"])  # fmt: skip
            netns.run(["bridge", "-n", up.ns, "fdb", "append", peer_mac, "dev", "flannel.1", "dst", node.ip,
                       "self", "permanent"])  # fmt: skip
            netns.run(["ip", "-n", up.ns, "route", "replace", cluster.subnet(node), "via", cluster.gw(node),
                       "dev", "flannel.1", "onlink"])  # fmt: skip
        else:
            netns.run(["ip", "-n", up.ns, "route", "replace", cluster.subnet(node), "via", node.ip])
    # Lease with a TTL, as upstream creates it.
    lease_id = tb.etcdctl("lease", "grant", "600").split()[1]
    tb.etcdctl("put", "--lease", lease_id, f"{tb.prefix}/subnets/10.244.200.0-24", value)
    try:
        n1 = tb.nodes["n1"]
        if cluster.backend == "vxlan":
            assert netns.wait_for(
                lambda: f"{gw} lladdr {mac} PERMANENT" in ip(n1.ns, "neigh", "show", "dev", "flannel.1")
            )
            assert netns.wait_for(lambda: f"{mac} dst {up.ip} self permanent" in fdb(n1.ns, "flannel.1"))
        assert netns.wait_for(lambda: subnet in ip(n1.ns, "route", "show", subnet))
        for node in (tb.nodes["n1"], tb.nodes["n2"], tb.nodes["n3"]):
            assert tb.wait_ping(node.pods[0].ns, "10.244.200.1"), f"{node.name} pod cannot reach the upstream node"
    finally:
        tb.etcdctl("del", f"{tb.prefix}/subnets/10.244.200.0-24")
    assert netns.wait_for(lambda: subnet not in ip(tb.nodes["n1"].ns, "route"))
    tb.scope.remove_ns(up.ns)
    del tb.nodes["up"]


def test_restart_keeps_subnet_and_pods_keep_talking(cluster: Cluster) -> None:
    tb = cluster.tb
    n1, n2 = tb.nodes["n1"], tb.nodes["n2"]
    before = cluster.subnet(n2)
    routes_before = ip(n1.ns, "route", "show", before)
    # A steady ping across the restart: with the data plane left in place no packet may be lost.
    pinger = subprocess.Popen(
        ["ip", "netns", "exec", n1.pods[0].ns, "ping", "-c", "40", "-i", "0.1", "-W", "1", n2.pods[0].ip],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(0.5)
        assert tb.stop_agent(n2) == 0
        assert "flannel" in ip(n2.ns, "link") or cluster.backend == "host-gw"
        t0 = time.time()
        tb.start_agent(n2)
        env = tb.wait_ready(n2, since=t0 - 1)
        out, _ = pinger.communicate(timeout=30)
    finally:
        if pinger.poll() is None:
            pinger.kill()
    assert str(env.subnet) == before
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert m and m.group(1) == m.group(2) == "40", out
    assert ip(n1.ns, "route", "show", before) == routes_before
    assert all_pairs_ping(cluster) == []


def test_sigterm_exits_zero_and_leaves_data_plane(cluster: Cluster) -> None:
    tb = cluster.tb
    n3 = tb.nodes["n3"]
    assert tb.stop_agent(n3) == 0
    try:
        assert "Exiting cleanly" in n3.log_file.read_text()
        assert "Traceback" not in n3.log_file.read_text()
        assert tb.ping(tb.nodes["n1"].pods[0].ns, n3.pods[0].ip, count=2)
    finally:
        t0 = time.time()
        tb.start_agent(n3)
        tb.wait_ready(n3, since=t0 - 1)


def test_node_that_leaves_is_removed_everywhere(cluster: Cluster) -> None:
    tb = cluster.tb
    n1, n3 = tb.nodes["n1"], tb.nodes["n3"]
    gone = cluster.subnet(n3)
    gw = cluster.gw(n3)
    tb.stop_agent(n3)
    tb.etcdctl("del", f"{tb.prefix}/subnets/{gone.replace('/', '-')}")
    for node in (n1, tb.nodes["n2"]):
        assert netns.wait_for(lambda node=node: gone not in ip(node.ns, "route"), timeout=10)  # type: ignore[misc]
        if cluster.backend == "vxlan":
            assert netns.wait_for(lambda node=node: gw not in ip(node.ns, "neigh", "show", "dev", "flannel.1"))  # type: ignore[misc]
            assert netns.wait_for(lambda node=node: f"dst {n3.ip} " not in fdb(node.ns, "flannel.1"))  # type: ignore[misc]
    # The node comes back and gets a lease again (its old one was deleted, so it may differ).
    t0 = time.time()
    n3.subnet_file.unlink()
    tb.start_agent(n3)
    cluster.env["n3"] = tb.wait_ready(n3, since=t0 - 1)
    # Its pod keeps the old address; re-address it for the new subnet.
    pod = n3.pods[0]
    env = cluster.env["n3"]
    assert env.subnet is not None
    new_ip = str(env.subnet.network_address + 11)
    netns.run(["ip", "-n", n3.ns, "addr", "flush", "dev", "cni0"])
    tb.ensure_bridge(n3, env)
    netns.run(["ip", "-n", pod.ns, "addr", "flush", "dev", "eth0"])
    netns.run(["ip", "-n", pod.ns, "addr", "add", f"{new_ip}/24", "dev", "eth0"])
    netns.run(["ip", "-n", pod.ns, "route", "add", "default", "via", str(env.subnet.network_address + 1)])
    pod.ip = new_ip
    assert all_pairs_ping(cluster) == []


def test_own_lease_deleted_makes_agent_exit_clearly(cluster: Cluster) -> None:
    tb = cluster.tb
    n2 = tb.nodes["n2"]
    tb.etcdctl("del", f"{tb.prefix}/subnets/{cluster.subnet(n2).replace('/', '-')}")
    assert n2.proc is not None
    assert n2.proc.wait(timeout=15) == 1
    log = n2.log_file.read_text()
    assert "Lease has been revoked" in log
    assert "Traceback" not in log
    n2.proc = None
    # Data plane still there for its pods; restart reacquires (PublicIP-matching lease is gone: a new subnet
    # or the previous one from subnet.env, which is free again).
    t0 = time.time()
    tb.start_agent(n2)
    env = tb.wait_ready(n2, since=t0 - 1)
    assert str(env.subnet) == cluster.subnet(n2)


def test_etcd_outage_keeps_kernel_state_and_recovers(cluster: Cluster) -> None:
    tb = cluster.tb
    n1, n2 = tb.nodes["n1"], tb.nodes["n2"]
    tb.stop_etcd()
    try:
        time.sleep(3)
        for node in tb.nodes.values():
            assert node.proc is not None and node.proc.poll() is None, tb.log_tail(node)
        assert tb.ping(n1.pods[0].ns, n2.pods[0].ip, count=2)
    finally:
        tb.restart_etcd()
    # After the outage the agents follow the store again: a new lease is programmed everywhere.
    value = '{"PublicIP":"192.168.77.240","PublicIPv6":null,"BackendType":"host-gw"}'
    if cluster.backend == "vxlan":
        value = (
            '{"PublicIP":"192.168.77.240","PublicIPv6":null,"BackendType":"vxlan",'
            '"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:45"}}'
        )
    tb.etcdctl("put", f"{tb.prefix}/subnets/10.244.201.0-24", value)
    try:
        for node in tb.nodes.values():
            assert netns.wait_for(lambda node=node: "10.244.201.0/24" in ip(node.ns, "route"), timeout=30), tb.log_tail(
                node
            )
    finally:
        tb.etcdctl("del", f"{tb.prefix}/subnets/10.244.201.0-24")
    for node in tb.nodes.values():
        assert netns.wait_for(lambda node=node: "10.244.201.0/24" not in ip(node.ns, "route"), timeout=15)


def test_readyz_and_healthz(cluster: Cluster) -> None:
    n1 = cluster.tb.nodes["n1"]
    for path in ("/healthz", "/readyz"):
        out = netns.ns_exec(n1.ns, ["python3", "-c", (
            "import urllib.request,sys;"
            f"r=urllib.request.urlopen('http://127.0.0.1:8471{path}',timeout=5);print(r.status)"
        )])  # fmt: skip
        assert out.strip() == "200"


def _one_shot(tb: Testbed, node: Node, timeout: float = 120) -> tuple[int, str]:
    p = subprocess.run(
        ["ip", "netns", "exec", node.ns, *tb.agent_cmd(node)], capture_output=True, text=True, timeout=timeout
    )
    return p.returncode, p.stderr + p.stdout


@pytest.mark.parametrize(
    "conf,needle",
    [
        ('{"Network": "10.5.0.0/16", "SubnetLen": 31}', "SubnetLen"),
        ('{"Network": "10.5.0.0/30"}', "Network is too small"),
        ('{"Network": "not-a-cidr"}', "Network"),
        ("{not json", "not valid JSON"),
        ('{"Network": "10.5.0.0/16", "Backend": {"Type": "nosuch"}}', "nosuch"),
    ],
)
def test_bad_config_is_a_clear_error(scope: netns.RunScope, conf: str, needle: str) -> None:
    tb = Testbed(scope)
    tb.start_etcd()
    tb.put_config(conf)
    node = tb.add_node("n1")
    code, out = _one_shot(tb, node)
    assert code == 1, out
    assert needle in out
    assert "Traceback" not in out
    assert not node.subnet_file.exists()
    assert "flannel" not in ip(node.ns, "link")


def test_exhausted_range_is_a_clear_error(scope: netns.RunScope) -> None:
    tb = Testbed(scope)
    tb.start_etcd()
    tb.put_config({"Network": "10.9.0.0/28", "Backend": {"Type": "host-gw"}})
    for i, sn in enumerate(("10.9.0.4-30", "10.9.0.8-30", "10.9.0.12-30")):
        tb.etcdctl("put", f"{tb.prefix}/subnets/{sn}", json.dumps({"PublicIP": f"192.168.77.{200 + i}"}))
    node = tb.add_node("n1")
    code, out = _one_shot(tb, node)
    assert code == 1, out
    assert "no free" in out.lower() or "exhausted" in out.lower()
    assert "Traceback" not in out
