"""Three real flanneld agents in kube mode (`--kube-subnet-mgr`) against the fake API server, in namespaces.

    underlay 192.168.77.0/24: kapi ns (pyflannel/lab/fakekube.py on 192.168.77.11:6443), nodes n1..n3 (flanneld)

The Node objects carry podCIDRs as the controller manager would set them; assertions read the kernel routes
of every node, the Node annotations the agents wrote, and pings between pod namespaces.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from needs import require

from pyflannel.lab import netns
from pyflannel.lab.fakekube import KubeAdmin
from pyflannel.lab.testbed import Node, Testbed

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
FAKE = [sys.executable, "-m", "pyflannel.lab.fakekube"]
P = "flannel.alpha.coreos.com/"
NET_CONF = '{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}'
CIDRS = {"n1": "10.244.1.0/24", "n2": "10.244.2.0/24", "n3": "10.244.3.0/24"}
# The agent command; the daemon's kube wiring is what is under test.
AGENT = [sys.executable, "-m", "pyflannel.cli"]


def _skip_reason() -> str | None:
    daemon = (REPO / "pyflannel" / "daemon.py").read_text()
    if "--kube-subnet-mgr is not implemented" in daemon:
        return "the daemon does not wire the kube store yet"
    return None


def routes(node: Node) -> str:
    return netns.run(["ip", "-n", node.ns, "route", "show", "dev", "flannel.1"], check=False)


class KubeCluster:
    """The fake API server on a host of the underlay (`ip_family` as Testbed's: on "ipv6" it is reached over
    IPv6, as everything else there), the agents' net-conf.json, and Nodes registered as kubelet does."""

    def __init__(self, scope: netns.RunScope, ip_family: str = "ipv4", net_conf: str = NET_CONF) -> None:
        self.tb = Testbed(scope, ip_family=ip_family)
        api = self.tb.add_node("kapi")  # a host on the underlay for the API server, not a flannel node
        del self.tb.nodes["kapi"]
        host = f"[{api.ip}]" if ":" in api.ip else api.ip
        self.url = f"http://{host}:6443"
        self.sock = str(scope.tmpdir / "kube.sock")
        scope.spawn(
            api.ns,
            [*FAKE, "--listen", f"{host}:6443", "--unix", self.sock, "--history", "200"],
            log=scope.tmpdir / "fakekube.log",
        )
        assert netns.wait_for(lambda: os.path.exists(self.sock), 10), "fake API server did not start"
        self.kube = KubeAdmin(unix_path=self.sock)
        self.net_conf = scope.tmpdir / "net-conf.json"
        self.net_conf.write_text(net_conf)

    def add_node(self, name: str, cidrs: str | list[str] | None) -> Node:
        """A node namespace and its Node object with these podCIDRs (one, or a dual-stack pair)."""
        node = self.tb.add_node(name)
        pod_cidrs = [cidrs] if isinstance(cidrs, str) else cidrs
        self.kube.create_node(name, pod_cidrs, internal_ip=node.ip)
        return node

    def start(self, node: Node) -> None:
        cmd = [
            *AGENT,
            "--kube-subnet-mgr",
            f"--kube-api-url={self.url}",
            f"--net-config-path={self.net_conf}",
            f"--subnet-file={node.subnet_file}",
            f"--iface={node.ip}",
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "NODE_NAME": node.name}
        node.proc = self.tb.scope.spawn(node.ns, cmd, log=node.log_file, env=env)


@pytest.fixture
def cluster(scope: netns.RunScope) -> Iterator[KubeCluster]:
    require(_skip_reason())
    c = KubeCluster(scope)
    yield c
    for node in c.tb.nodes.values():
        c.tb.stop_agent(node)


def test_kube_mode_three_nodes(cluster: KubeCluster) -> None:
    tb, kube = cluster.tb, cluster.kube
    nodes = {name: cluster.add_node(name, cidr) for name, cidr in CIDRS.items()}
    # A Node of the cluster that runs no flannel: never a peer.
    kube.create_node("plain", ["10.244.9.0/24"], internal_ip="192.168.77.99")
    for node in nodes.values():
        cluster.start(node)
    for name, node in nodes.items():
        env = tb.wait_ready(node)
        assert str(env.subnet) == CIDRS[name]
        ann = kube.node(name)["metadata"]["annotations"]
        assert ann[P + "kube-subnet-manager"] == "true"
        assert ann[P + "backend-type"] == "vxlan"
        assert ann[P + "public-ip"] == node.ip
        conds = {c["type"]: c for c in kube.node(name)["status"]["conditions"]}
        assert conds["NetworkUnavailable"]["reason"] == "FlannelIsUp"

    def has_peers(node: Node, want: set[str]) -> bool:
        r = routes(node)
        got = {c for c in [*CIDRS.values(), "10.244.9.0/24", "10.244.4.0/24"] if c in r}
        return got == want

    def peers_are(node: Node, want: set[str]) -> Callable[[], bool]:
        return lambda: has_peers(node, want)

    for name, node in nodes.items():
        others = {c for n, c in CIDRS.items() if n != name}
        assert netns.wait_for(peers_are(node, others)), routes(node)

    # Pods through the real chain: the flannel plugin reads the subnet.env flanneld wrote, then bridge/host-local.
    pods = {name: tb.add_cni_pod(node) for name, node in nodes.items()}
    for name, pod in pods.items():
        assert ipaddress.ip_address(pod.ip) in ipaddress.ip_network(CIDRS[name])
    for src in pods.values():
        for dst in pods.values():
            if src is not dst:
                assert tb.wait_ping(src.ns, dst.ip), f"{src.name} -> {dst.name}"

    # Break the watches: a 410 mid-stream, then a dropped connection; changes made meanwhile still arrive.
    kube.expire()
    n4 = cluster.add_node("n4", "10.244.4.0/24")
    cluster.start(n4)
    tb.wait_ready(n4)
    kube.drop_watches()
    kube.delete_node("n3")
    want = {"n1": {"10.244.2.0/24", "10.244.4.0/24"}, "n2": {"10.244.1.0/24", "10.244.4.0/24"}}
    for name, cidrs in want.items():
        node = nodes[name]
        assert netns.wait_for(peers_are(node, cidrs)), routes(node)
    assert netns.wait_for(lambda: has_peers(n4, {"10.244.1.0/24", "10.244.2.0/24"})), routes(n4)
    assert tb.wait_ping(pods["n1"].ns, pods["n2"].ip)


def test_restart_after_reboot_keeps_the_annotated_vtep_mac(cluster: KubeCluster) -> None:
    """A node whose vxlan device vanished (a reboot) comes back with the VtepMAC its Node annotation holds,
    so the peers' neighbour and FDB entries for it stay right."""
    tb, kube = cluster.tb, cluster.kube
    node = cluster.add_node("n1", CIDRS["n1"])
    cluster.start(node)
    tb.wait_ready(node)
    mac = json.loads(kube.node("n1")["metadata"]["annotations"][P + "backend-data"])["VtepMAC"]
    assert tb.stop_agent(node) == 0
    netns.run(["ip", "-n", node.ns, "link", "del", "flannel.1"])
    node.subnet_file.unlink()  # so that readiness below is the restarted agent's
    cluster.start(node)
    tb.wait_ready(node)
    assert f"link/ether {mac}" in netns.run(["ip", "-n", node.ns, "link", "show", "flannel.1"])
    assert json.loads(kube.node("n1")["metadata"]["annotations"][P + "backend-data"])["VtepMAC"] == mac


def test_pod_cidr_outside_network_is_a_clear_error(cluster: KubeCluster) -> None:
    node = cluster.add_node("n1", "10.99.1.0/24")
    cluster.start(node)
    assert node.proc is not None
    assert node.proc.wait(timeout=30) == 1
    log = node.log_file.read_text()
    assert "podCIDR 10.99.1.0/24 is not inside Network 10.244.0.0/16" in log
    assert not node.subnet_file.exists()
