"""Kube mode (`--kube-subnet-mgr`) on dual-stack and IPv6-only clusters: real agents, vxlan, the fake API server.

    underlay 192.168.77.0/24 + fd77:77::/64: kapi (fakekube, .11), nodes n1.. (.12..; fd77:77::12..)

Nodes carry `spec.podCIDRs` of both families (`spec.podCIDR` the first), as the controller manager sets them with
a dual-stack --cluster-cidr. Assertions read the annotations the agents wrote (byte for byte, against the MACs
of the devices in the kernel), each node's vxlan entries of both families, and pings between CNI pods.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator

import pytest
from needs import require
from test_cluster_kube import KubeCluster, P, _skip_reason

from pyflannel.lab import netns
from pyflannel.lab.fakekube import KubeAdmin
from pyflannel.lab.testbed import Node, Pod

pytestmark = pytest.mark.integration

DUAL_CONF = json.dumps(
    {"Network": "10.244.0.0/16", "EnableIPv6": True, "IPv6Network": "fd00:244::/56", "Backend": {"Type": "vxlan"}}
)
V6_CONF = json.dumps(
    {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd00:244::/56", "Backend": {"Type": "vxlan"}}
)
# n3 lists its IPv6 podCIDR first, as Nodes of an IPv6-primary cluster do.
DUAL_CIDRS = {
    "n1": ["10.244.1.0/24", "fd00:244:0:1::/64"],
    "n2": ["10.244.2.0/24", "fd00:244:0:2::/64"],
    "n3": ["fd00:244:0:3::/64", "10.244.3.0/24"],
}
DEV4, DEV6 = "flannel.1", "flannel-v6.1"


def _cluster(scope: netns.RunScope, ip_family: str, conf: str) -> Iterator[KubeCluster]:
    require(_skip_reason())
    c = KubeCluster(scope, ip_family=ip_family, net_conf=conf)
    yield c
    for node in c.tb.nodes.values():
        c.tb.stop_agent(node)


@pytest.fixture
def dual(scope: netns.RunScope) -> Iterator[KubeCluster]:
    yield from _cluster(scope, "dual", DUAL_CONF)


@pytest.fixture
def v6only(scope: netns.RunScope) -> Iterator[KubeCluster]:
    yield from _cluster(scope, "ipv6", V6_CONF)


def mac(node: Node, dev: str) -> str:
    out = netns.run(["ip", "-n", node.ns, "-j", "link", "show", "dev", dev])
    return str(json.loads(out)[0]["address"])


def has_link(node: Node, dev: str) -> bool:
    return netns.run(["ip", "-n", node.ns, "link", "show", "dev", dev], check=False).strip() != ""


def flannel_annotations(kube: KubeAdmin, name: str) -> dict[str, str]:
    ann = kube.node(name)["metadata"]["annotations"]
    return {k: v for k, v in ann.items() if k.startswith(P)}


def vxlan_entries(node: Node, dev: str, family: str) -> set[str]:
    """What the agent programmed on `dev` for its peers, one normalised line per entry:
    "route <subnet> via <gw>", "neigh <addr> <mac>", "fdb <mac> <dst>". A missing device holds nothing."""
    if not has_link(node, dev):
        return set()
    out: set[str] = set()
    for r in json.loads(netns.run(["ip", "-n", node.ns, "-j", family, "route", "show", "dev", dev]) or "[]"):
        if r.get("protocol") == "kernel":
            continue  # the device's own address and link-local routes, the kernel's
        out.add(f"route {r['dst']} via {r.get('gateway', '-')}")
    for n in json.loads(netns.run(["ip", "-n", node.ns, "-j", family, "neigh", "show", "dev", dev]) or "[]"):
        if "PERMANENT" in n.get("state", []):
            out.add(f"neigh {n['dst']} {n.get('lladdr')}")
    for f in json.loads(netns.run(["bridge", "-n", node.ns, "-j", "fdb", "show", "dev", dev]) or "[]"):
        if "dst" in f:
            out.add(f"fdb {f['mac']} {f['dst']}")
    return out


def expected_entries(peers: dict[str, tuple[Node, list[str]]], version: int) -> set[str]:
    """The entries a node must hold for `peers` (name: (node, podCIDRs)) on the device of `version`."""
    dev = DEV4 if version == 4 else DEV6
    out: set[str] = set()
    for node, cidrs in peers.values():
        net = next(n for n in map(ipaddress.ip_network, cidrs) if n.version == version)
        vtep, gw = mac(node, dev), str(net.network_address)
        underlay = node.ip6 if version == 6 else node.ip
        out |= {f"route {net} via {gw}", f"neigh {gw} {vtep}", f"fdb {vtep} {underlay}"}
    return out


def wait_entries(node: Node, dev: str, family: str, want: set[str]) -> None:
    assert netns.wait_for(lambda: vxlan_entries(node, dev, family) == want, 30), (
        f"{node.name} {dev}: have {sorted(vxlan_entries(node, dev, family))}, want {sorted(want)}"
    )


def ping_all(cluster: KubeCluster, pods: list[Pod], v4: bool = True) -> None:
    for src in pods:
        for dst in pods:
            if src is dst:
                continue
            assert dst.ip6 is not None
            assert cluster.tb.wait_ping(src.ns, dst.ip6), f"{src.name} -> {dst.name} over IPv6 ({dst.ip6})"
            if v4:
                assert cluster.tb.wait_ping(src.ns, dst.ip), f"{src.name} -> {dst.name} over IPv4 ({dst.ip})"


def test_dual_stack_three_nodes(dual: KubeCluster) -> None:
    tb, kube = dual.tb, dual.kube
    nodes = {name: dual.add_node(name, cidrs) for name, cidrs in DUAL_CIDRS.items()}
    # A dual-stack Node of the cluster that runs no flannel: never a peer.
    kube.create_node("plain", ["10.244.9.0/24", "fd00:244:0:9::/64"], internal_ip="192.168.77.99")
    for node in nodes.values():
        dual.start(node)
    for name, node in nodes.items():
        env = tb.wait_ready(node)
        nets = {ipaddress.ip_network(c).version: c for c in DUAL_CIDRS[name]}
        assert (str(env.subnet), str(env.ipv6_subnet)) == (nets[4], nets[6])
        # Upstream's six annotations; the backend data carries each device's own MAC, compact JSON, VNI first.
        assert node.ip6 is not None
        assert flannel_annotations(kube, name) == {
            P + "kube-subnet-manager": "true",
            P + "backend-type": "vxlan",
            P + "backend-data": f'{{"VNI":1,"VtepMAC":"{mac(node, DEV4)}"}}',
            P + "public-ip": node.ip,
            P + "backend-v6-data": f'{{"VNI":1,"VtepMAC":"{mac(node, DEV6)}"}}',
            P + "public-ipv6": node.ip6,
        }, name
        assert kube.node(name)["spec"]["podCIDR"] == DUAL_CIDRS[name][0]
        conds = {c["type"]: c for c in kube.node(name)["status"]["conditions"]}
        assert conds["NetworkUnavailable"]["reason"] == "FlannelIsUp"

    def peers_of(name: str, gone: tuple[str, ...] = ()) -> dict[str, tuple[Node, list[str]]]:
        return {n: (nodes[n], DUAL_CIDRS[n]) for n in nodes if n != name and n not in gone}

    for name, node in nodes.items():
        wait_entries(node, DEV4, "-4", expected_entries(peers_of(name), 4))
        wait_entries(node, DEV6, "-6", expected_entries(peers_of(name), 6))

    # Pods through the real chain: the flannel plugin gives each pod an address of both of its node's subnets.
    pods = [tb.add_cni_pod(node) for node in nodes.values()]
    for pod in pods:
        pod_nets = {n.version: n for n in map(ipaddress.ip_network, DUAL_CIDRS[pod.node])}
        assert pod.ip6 is not None
        assert ipaddress.ip_address(pod.ip) in pod_nets[4] and ipaddress.ip_address(pod.ip6) in pod_nets[6], pod
    ping_all(dual, pods)

    # A Node deleted: both families' route, neighbour and FDB entries for it leave the others.
    kube.delete_node("n3")
    for name in ("n1", "n2"):
        wait_entries(nodes[name], DEV4, "-4", expected_entries(peers_of(name, ("n3",)), 4))
        wait_entries(nodes[name], DEV6, "-6", expected_entries(peers_of(name, ("n3",)), 6))
    ping_all(dual, pods[:2])


def test_ipv6_only_cluster(v6only: KubeCluster) -> None:
    """EnableIPv4 false, IPv6 podCIDRs only, an underlay without IPv4: no IPv4 annotation, device or route."""
    tb, kube = v6only.tb, v6only.kube
    cidrs = {"n1": ["fd00:244:0:1::/64"], "n2": ["fd00:244:0:2::/64"]}
    nodes = {name: v6only.add_node(name, c) for name, c in cidrs.items()}
    for node in nodes.values():
        v6only.start(node)
    for name, node in nodes.items():
        env = tb.wait_ready(node)
        assert (env.subnet, str(env.ipv6_subnet)) == (None, cidrs[name][0])
        assert flannel_annotations(kube, name) == {
            P + "kube-subnet-manager": "true",
            P + "backend-type": "vxlan",
            P + "backend-v6-data": f'{{"VNI":1,"VtepMAC":"{mac(node, DEV6)}"}}',
            P + "public-ipv6": node.ip,
        }, name
        assert not has_link(node, DEV4)
    for name, node in nodes.items():
        peers = {n: (nodes[n], cidrs[n]) for n in nodes if n != name}
        wait_entries(node, DEV6, "-6", expected_entries(peers, 6))
    pods = [tb.add_cni_pod(node) for node in nodes.values()]
    for pod in pods:
        assert pod.ip6 is not None and ipaddress.ip_address(pod.ip6) in ipaddress.ip_network(cidrs[pod.node][0])
    ping_all(v6only, pods, v4=False)


@pytest.mark.parametrize("cidr", ["10.244.1.0/24", "fd00:244:0:1::/64"])
def test_one_family_pod_cidr_on_a_dual_stack_config_is_refused(dual: KubeCluster, cidr: str) -> None:
    """The controller manager gave this Node one family only (a single-stack --cluster-cidr) while net-conf.json
    enables both: the agent exits 1 at once with one clear line, and leaves the Node, the node's kernel and
    subnet.env as they were (upstream v0.20.2 annotates the Node and then panics)."""
    kube = dual.kube
    node = dual.add_node("n1", cidr)
    before = kube.node("n1")
    dual.start(node)
    assert node.proc is not None
    assert node.proc.wait(timeout=60) == 1
    log = node.log_file.read_text()
    family = "IPv6" if ":" not in cidr else "IPv4"
    assert f"node n1 has no {family} podCIDR (it has {cidr}) but {dual.net_conf} enables {family}" in log
    assert "Traceback" not in log
    assert not node.subnet_file.exists()
    assert kube.node("n1") == before  # no annotation, no condition: no peer will ever program it
    for dev in (DEV4, DEV6):  # refused before the backend made anything (Store.preflight)
        assert not has_link(node, dev)
