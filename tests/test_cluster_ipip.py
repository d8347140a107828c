"""The ipip backend with three real agents on real etcd, in the stock-kernel VM (this host's kernel has no ipip).

Assertions read the kernel (`ip -d link`, `ip route`) and the wire (pings, a capture on the underlay), so they fail
when the programming is wrong, not only when an agent crashes. The bad-input tests at the end run on the host too:
they must fail before the kernel is touched, where ipip is missing as much as where it is present.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_cluster import NETWORK, Cluster, _one_shot, all_pairs_ping, ip

from pyflannel.lab import netns
from pyflannel.lab.testbed import Node, Testbed

DEV = "flannel.ipip"
# Under emulation (the VM pass, TCG) an agent takes tens of seconds to start and fail.
ONE_SHOT_TIMEOUT = 120


def _ipip_cluster(tag: str, *, direct_routing: bool = False) -> Iterator[Cluster]:
    scope = netns.RunScope(tag=tag)
    try:
        tb = Testbed(scope)
        tb.start_etcd()
        backend: dict[str, object] = {"Type": "ipip"}
        if direct_routing:
            backend["DirectRouting"] = True
        tb.put_config({"Network": NETWORK, "Backend": backend})
        cl = Cluster(tb, "ipip")
        far = tb.add_segment("192.168.78.0/24") if direct_routing else "br0"
        for name, segment in (("n1", "br0"), ("n2", "br0"), ("n3", far)):
            node = tb.add_node(name, segment)
            # No periodic pass within a test's time: repairs must come from the kernel's notifications.
            node.extra_args = ("--reconcile-interval=300",)
            tb.start_agent(node)
        for node in tb.nodes.values():
            cl.env[node.name] = tb.wait_ready(node)
            tb.add_pod(node, cl.env[node.name])
        yield cl
    finally:
        scope.close()


@pytest.fixture(scope="module")
def cluster(require_kernel_module: Callable[..., None]) -> Iterator[Cluster]:
    require_kernel_module("ipip")
    yield from _ipip_cluster("ipip")


@pytest.fixture(scope="module")
def dr_cluster(require_kernel_module: Callable[..., None]) -> Iterator[Cluster]:
    require_kernel_module("ipip")
    yield from _ipip_cluster("ipipdr", direct_routing=True)


@pytest.mark.integration
@pytest.mark.vm_only
def test_every_pod_reaches_every_other_pod(cluster: Cluster) -> None:
    assert all_pairs_ping(cluster) == []


@pytest.mark.integration
@pytest.mark.vm_only
def test_device_lease_subnet_env_and_routes_are_upstreams(cluster: Cluster) -> None:
    tb = cluster.tb
    for node in tb.nodes.values():
        link = ip(node.ns, "-d", "link", "show", DEV)
        assert "mtu 1480 " in link, link
        assert re.search(rf"ipip (ipip )?remote any local {re.escape(node.ip)} ttl inherit nopmtudisc", link), link
        assert re.search(r"<[^>]*\bUP\b", link), link
        addrs = ip(node.ns, "-4", "addr", "show", "dev", DEV)
        assert re.findall(r"inet (\S+)", addrs) == [f"{cluster.gw(node)}/32"], addrs
        text = node.subnet_file.read_text()
        assert "FLANNEL_MTU=1480\n" in text
        lease = cluster.lease_of(node)
        assert lease["BackendType"] == "ipip"
        assert lease.get("BackendData") is None
        assert lease["PublicIP"] == node.ip
        # tunl0 (made by the module in every namespace) is left as it was: down, not ours.
        assert not re.search(r"<[^>]*\bUP\b", ip(node.ns, "link", "show", "tunl0"))
        for peer in tb.nodes.values():
            if peer is node:
                continue
            routes = ip(node.ns, "route", "show", cluster.subnet(peer))
            assert routes.strip() == f"{cluster.subnet(peer)} via {peer.ip} dev {DEV} onlink", routes
        # Nothing else of the pod network is routed via the tunnel.
        assert len(ip(node.ns, "route", "show", "dev", DEV).strip().splitlines()) == 2


@pytest.mark.integration
@pytest.mark.vm_only
def test_underlay_carries_ip_in_ip_with_the_pod_addresses_inside(cluster: Cluster) -> None:
    tb = cluster.tb
    n1, n2 = tb.nodes["n1"], tb.nodes["n2"]
    src, dst = n1.pods[0], n2.pods[0]
    # Everything n1 sends on its underlay port while one pod pings the other: no filter, so UDP would show.
    cap = subprocess.Popen(
        ["ip", "netns", "exec", tb.ul_ns, "tcpdump", "-i", n1.name, "-n", "-l", "-c", "40", "-vv", "ip"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert netns.wait_for(lambda: cap.poll() is not None or _listening(cap), timeout=15)
        assert tb.ping(src.ns, dst.ip, count=3, wait=2)
        time.sleep(1)
    finally:
        cap.terminate()
        out, _ = cap.communicate(timeout=10)
    # tcpdump prints the outer header, then the inner one: node to node, protocol 4, pod to pod inside.
    outer = rf"IP \(.*proto IPIP \(4\).*\)\s+{re.escape(n1.ip)} > {re.escape(n2.ip)}: .*IP \(.*proto ICMP"
    assert re.search(outer, out, re.S), out
    assert f"{src.ip} > {dst.ip}: ICMP echo request" in out, out
    assert "proto UDP" not in out, out


def _listening(p: subprocess.Popen[str]) -> bool:
    assert p.stderr is not None
    return "listening on" in p.stderr.readline()


@pytest.mark.integration
@pytest.mark.vm_only
def test_hand_deleted_route_comes_back(cluster: Cluster) -> None:
    tb = cluster.tb
    n1, n2 = tb.nodes["n1"], tb.nodes["n2"]
    sn = cluster.subnet(n2)
    netns.run(["ip", "-n", n1.ns, "route", "del", sn])
    assert netns.wait_for(lambda: f"{sn} via {n2.ip} dev {DEV} onlink" in ip(n1.ns, "route", "show", sn), timeout=20)
    assert tb.wait_ping(n1.pods[0].ns, n2.pods[0].ip)


@pytest.mark.integration
@pytest.mark.vm_only
def test_deleted_device_comes_back_with_all_peers(cluster: Cluster) -> None:
    tb = cluster.tb
    n1 = tb.nodes["n1"]
    netns.run(["ip", "-n", n1.ns, "link", "del", DEV])
    peers = [tb.nodes["n2"], tb.nodes["n3"]]
    assert netns.wait_for(lambda: all(cluster.subnet(p) in ip(n1.ns, "route") for p in peers), timeout=20)
    assert f"inet {cluster.gw(n1)}/32" in ip(n1.ns, "addr", "show", "dev", DEV)
    for peer in peers:
        assert tb.wait_ping(n1.pods[0].ns, peer.pods[0].ip)


@pytest.mark.integration
@pytest.mark.vm_only
def test_stale_route_is_swept(cluster: Cluster) -> None:
    n1 = cluster.tb.nodes["n1"]
    stale = "10.244.250.0/24"
    netns.run(["ip", "-n", n1.ns, "route", "add", stale, "via", "192.168.77.250", "dev", DEV, "onlink"])
    assert netns.wait_for(lambda: stale not in ip(n1.ns, "route"), timeout=20)


@pytest.mark.integration
@pytest.mark.vm_only
def test_restart_keeps_the_data_plane(cluster: Cluster) -> None:
    tb = cluster.tb
    n1, n2 = tb.nodes["n1"], tb.nodes["n2"]
    routes_before = ip(n1.ns, "route")
    link_before = ip(n2.ns, "-d", "link", "show", DEV)
    pinger = subprocess.Popen(
        ["ip", "netns", "exec", n1.pods[0].ns, "ping", "-c", "40", "-i", "0.2", "-W", "1", n2.pods[0].ip],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(0.5)
        assert tb.stop_agent(n2) == 0
        assert DEV in ip(n2.ns, "link")
        t0 = time.time()
        tb.start_agent(n2)
        tb.wait_ready(n2, timeout=120, since=t0 - 1)
        out, _ = pinger.communicate(timeout=60)
    finally:
        if pinger.poll() is None:
            pinger.kill()
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert m and m.group(1) == m.group(2) == "40", out
    assert ip(n1.ns, "route") == routes_before
    # The device was reused, not recreated (same index).
    assert ip(n2.ns, "-d", "link", "show", DEV).split(":")[0] == link_before.split(":")[0]


@pytest.mark.integration
@pytest.mark.vm_only
def test_node_that_leaves_is_removed_everywhere(cluster: Cluster) -> None:
    tb = cluster.tb
    n3 = tb.nodes["n3"]
    gone = cluster.subnet(n3)
    tb.stop_agent(n3)
    tb.etcdctl("del", f"{tb.prefix}/subnets/{gone.replace('/', '-')}")
    for node in (tb.nodes["n1"], tb.nodes["n2"]):
        assert netns.wait_for(lambda node=node: gone not in ip(node.ns, "route"), timeout=20)  # type: ignore[misc]
    assert tb.wait_ping(tb.nodes["n1"].pods[0].ns, tb.nodes["n2"].pods[0].ip)


@pytest.mark.integration
@pytest.mark.vm_only
def test_direct_routing_same_segment_direct_far_one_tunnelled(dr_cluster: Cluster) -> None:
    cl = dr_cluster
    tb = cl.tb
    n1, n2, n3 = tb.nodes["n1"], tb.nodes["n2"], tb.nodes["n3"]
    assert n3.ip.startswith("192.168.78.")
    # n1 and n2 share br0: host-gw's direct route; n3 is behind the router: the tunnel.
    assert ip(n1.ns, "route", "show", cl.subnet(n2)).strip() == f"{cl.subnet(n2)} via {n2.ip} dev eth0"
    assert ip(n1.ns, "route", "show", cl.subnet(n3)).strip() == f"{cl.subnet(n3)} via {n3.ip} dev {DEV} onlink"
    assert ip(n3.ns, "route", "show", cl.subnet(n1)).strip() == f"{cl.subnet(n1)} via {n1.ip} dev {DEV} onlink"
    assert all_pairs_ping(cl) == []
    # A hand-deleted direct route comes back too.
    netns.run(["ip", "-n", n1.ns, "route", "del", cl.subnet(n2)])
    assert netns.wait_for(lambda: f"via {n2.ip} dev eth0" in ip(n1.ns, "route", "show", cl.subnet(n2)), timeout=20)


# ---- bad input: refused before anything is built (host and VM) -------------------------------------------------


def _ipip_node(scope: netns.RunScope, **conf: object) -> tuple[Testbed, Node]:
    tb = Testbed(scope)
    tb.start_etcd()
    tb.put_config({"Network": NETWORK, "Backend": {"Type": "ipip"}, **conf})
    return tb, tb.add_node("n1")


def _refused(tb: Testbed, node: Node, needle: str) -> None:
    """The agent exits 1 with `needle` in one clear line, having taken no lease and written no subnet.env."""
    code, out = _one_shot(tb, node, timeout=ONE_SHOT_TIMEOUT)
    assert code == 1, out
    assert needle in out, out
    assert "Traceback" not in out
    assert not node.subnet_file.exists()
    assert tb.leases() == {}


@pytest.mark.integration
@pytest.mark.kernel_vm
def test_foreign_device_with_our_name_is_refused(scope: netns.RunScope) -> None:
    tb, node = _ipip_node(scope)
    netns.run(["ip", "-n", node.ns, "link", "add", DEV, "type", "bridge"])
    _refused(tb, node, f"{DEV} already exists and is not one flannel made: it is a bridge device")
    assert "bridge" in ip(node.ns, "-d", "link", "show", DEV)  # the user's device is left alone


@pytest.mark.integration
@pytest.mark.kernel_vm
def test_underlay_mtu_too_small(scope: netns.RunScope) -> None:
    tb, node = _ipip_node(scope)
    # A second underlay interface with a tiny MTU, chosen by --iface (etcd stays reachable over eth0).
    netns.run(["ip", "-n", node.ns, "link", "add", "eth1", "mtu", "80", "type", "veth", "peer", "eth1p", "mtu", "80"])
    netns.run(["ip", "-n", node.ns, "addr", "add", "10.99.0.1/24", "dev", "eth1"])
    netns.run(["ip", "-n", node.ns, "link", "set", "eth1", "up"])
    node.extra_args = ("--iface=eth1",)
    _refused(tb, node, "ipip: MTU 80 of eth1 is too small")
    assert DEV not in ip(node.ns, "link")


@pytest.mark.integration
@pytest.mark.kernel_vm
def test_ipv6_is_a_config_error(scope: netns.RunScope) -> None:
    tb, node = _ipip_node(scope, EnableIPv6=True, IPv6Network="fd00:10:244::/56")
    _refused(tb, node, "ipip carries IPv4 only")


def _kernel_has_ipip() -> bool:
    # A dry run: loading the module here would add tunl0 to the root namespace.
    return Path("/sys/module/ipip").exists() or subprocess.run(["modprobe", "-n", "-q", "ipip"]).returncode == 0


@pytest.mark.integration
@pytest.mark.kernel_vm
def test_a_kernel_without_ipip_is_named(scope: netns.RunScope) -> None:
    """On this host's kernel (no ipip module) the agent says which module is missing and builds nothing; where
    the module exists (the VM pass) the same start comes up with the device instead."""
    tb, node = _ipip_node(scope)
    if _kernel_has_ipip():
        tb.start_agent(node)
        tb.wait_ready(node, timeout=120)
        assert "ipip" in ip(node.ns, "-d", "link", "show", DEV)
        return
    _refused(tb, node, "the kernel lacks the `ipip` module")
    assert DEV not in ip(node.ns, "link")
