"""The flannel CNI plugin with Debian's real bridge/host-local/portmap, in namespaces this test creates.

Every plugin runs inside a node namespace (`ip netns exec NODE`), so cni0, the veths and portmap's iptables
rules live there; state directories (flannel's dataDir, host-local's dataDir, the runtime cache) live in
the scope's temp dir. Assertions read the kernel (`ip -n`, `iptables -S` inside the node), the files
host-local keeps, and packets that cross (ping, a TCP hostPort connection from another node).

`node1` runs each test twice: its `flannel` client served by a CNI server in the node namespace (a call that
falls back trips the test), and falling back to the standalone plugin (no server); the flanneld test's clients
are served by the agents themselves.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from needs import need
from test_cni_plugin import TRIPWIRE_SCRIPT, wait_socket

from pyflannel.cni.driver import CNIError, Driver, RuntimeConf, kube_flannel_conflist
from pyflannel.cni.launcher import STANDALONE_SUFFIX, build_client
from pyflannel.cni.launcher import install as install_launcher
from pyflannel.lab import netns
from pyflannel.lab.netns import RunScope, ns_exec, run
from pyflannel.lab.testbed import Testbed

pytestmark = pytest.mark.integration

REF_PLUGINS = Path("/usr/lib/cni")
NETWORK = "10.244.0.0/16"


def _need_plugins() -> None:
    need(files=[REF_PLUGINS / p for p in ("bridge", "host-local", "portmap", "loopback")])


def flannel_bin_dir(tmp: Path, served: bool = False) -> Path:
    """A CNI bin dir holding `flannel`: the client and the standalone plugin's launcher of this interpreter's
    pyflannel (see cni.launcher); for `served` nodes a tripwire in the standalone plugin's place."""
    d = tmp / ("cni-bin-served" if served else "cni-bin")
    d.mkdir(exist_ok=True)
    target = d / "flannel"
    if not target.exists():
        if served:
            build_client(target)
            tripwire = d / ("flannel" + STANDALONE_SUFFIX)
            tripwire.write_text(TRIPWIRE_SCRIPT)
            tripwire.chmod(0o755)
        else:
            install_launcher(target)
    return d


def start_cni_server(scope: RunScope, ns: str, sock: Path) -> Path:
    """A CNI server (no agent) in namespace `ns`, as flanneld serves its node."""
    log = sock.parent.parent / f"{sock.parent.name}.log"
    sock.parent.mkdir(parents=True, exist_ok=True)
    proc = scope.spawn(ns, [sys.executable, "-m", "pyflannel.cniserver", "--socket", str(sock)], log=log)
    wait_socket(sock, proc, log)
    return sock


class CniNode:
    """A node namespace with its subnet.env, the kube-flannel conflist and a runtime driver."""

    def __init__(
        self,
        scope: RunScope,
        name: str,
        subnet: str,
        *,
        ns: str | None = None,
        subnet_file: Path | None = None,
        version: str = "0.3.1",
        socket: Path | None = None,
    ) -> None:
        """`socket`: a CNI server's, which must serve every call; None: no server (the standalone plugin)."""
        self.scope = scope
        self.name = name
        self.ns = ns or scope.add_ns(name)
        self.dir = scope.tmpdir / f"cni-{name}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.subnet = ipaddress.IPv4Network(subnet)
        self.subnet_file = subnet_file or self.dir / "subnet.env"
        if subnet_file is None:
            self.subnet_file.write_text(
                f"FLANNEL_NETWORK={NETWORK}\nFLANNEL_SUBNET={self.subnet.network_address + 1}/{self.subnet.prefixlen}\n"
                "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
            )
        self.data_dir = self.dir / "flannel"
        self.ipam_dir = self.dir / "ipam"
        self.conflist = kube_flannel_conflist(
            cni_version=version,
            subnet_file=str(self.subnet_file),
            data_dir=str(self.data_dir),
            ipam_data_dir=str(self.ipam_dir),
        )
        self.served = socket is not None
        self.driver = Driver(
            [flannel_bin_dir(scope.tmpdir, self.served), REF_PLUGINS],
            self.dir / "cache",
            exec_prefix=["ip", "netns", "exec", self.ns],
            env={**os.environ, "FLANNEL_CNI_SOCKET": str(socket or self.dir / "no-agent.sock")},
        )

    def pod(self, short: str, **caps: Any) -> tuple[str, RuntimeConf]:
        ns = self.scope.add_ns(f"{self.name}{short}")
        rt = RuntimeConf(
            container_id=f"ctr-{self.name}-{short}",
            netns=f"/run/netns/{ns}",
            ifname="eth0",
            args=(("IgnoreUnknown", "1"), ("K8S_POD_NAME", short)),
            capability_args=caps,
        )
        return ns, rt

    def add(self, rt: RuntimeConf) -> str:
        res = self.driver.add(self.conflist, rt)
        ips = [ipaddress.ip_interface(i["address"]) for i in res["ips"]]
        assert len(ips) == 1
        return str(ips[0].ip)

    def allocated(self) -> list[str]:
        """IPs host-local holds for this network (files named by address)."""
        d = self.ipam_dir / self.conflist["name"]
        if not d.exists():
            return []
        out = []
        for f in d.iterdir():
            try:
                ipaddress.ip_address(f.name)
            except ValueError:
                continue
            out.append(f.name)
        return sorted(out)


def ping(ns: str, dst: str, count: int = 1) -> bool:
    out = run(["ip", "netns", "exec", ns, "ping", "-c", str(count), "-W", "1", dst], check=False, timeout=15)
    return f"{count} received" in out


def wait_ping(ns: str, dst: str, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ping(ns, dst):
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(params=["served", "fallback"])
def node1(request: pytest.FixtureRequest, scope: RunScope) -> CniNode:
    _need_plugins()
    if request.param == "fallback":
        return CniNode(scope, "n1", "10.244.1.0/24")
    ns = scope.add_ns("n1")
    sock = start_cni_server(scope, ns, scope.tmpdir / "srv-n1" / "cni.sock")
    return CniNode(scope, "n1", "10.244.1.0/24", ns=ns, socket=sock)


def test_pods_get_ips_reach_bridge_and_del_releases(scope: RunScope, node1: CniNode) -> None:
    pods = [node1.pod(f"p{i}") for i in range(3)]
    ips = [node1.add(rt) for _, rt in pods]
    assert len(set(ips)) == 3
    for ip in ips:
        assert ipaddress.ip_address(ip) in node1.subnet
    assert node1.allocated() == sorted(ips)

    # The bridge lives in the node namespace only, with flannel's gateway address and subnet.env's MTU.
    link = json.loads(run(["ip", "-n", node1.ns, "-j", "addr", "show", "cni0"]))[0]
    assert link["mtu"] == 1450
    assert {(a["local"], a["prefixlen"]) for a in link["addr_info"] if a["family"] == "inet"} == {("10.244.1.1", 24)}
    assert run(["ip", "link", "show", "cni0"], check=False).strip() == ""
    for (ns, _), ip in zip(pods, ips, strict=True):
        addrs = run(["ip", "-n", ns, "-o", "-4", "addr", "show", "eth0"])
        assert f"{ip}/24" in addrs
        routes = run(["ip", "-n", ns, "route"])
        assert f"{NETWORK} via 10.244.1.1" in routes
        assert "default via 10.244.1.1" in routes  # delegate isDefaultGateway from the kube-flannel conflist
        assert ping(ns, "10.244.1.1")
    assert ping(pods[0][0], ips[1])

    # The stored delegate config is upstream's, with the conflist's extras.
    stored = json.loads((node1.data_dir / pods[0][1].container_id).read_bytes())
    assert stored["ipam"]["ranges"] == [[{"subnet": "10.244.1.0/24"}]]
    assert (stored["hairpinMode"], stored["isDefaultGateway"], stored["mtu"]) == (True, True, 1450)

    # CHECK goes through flannel (stored config + prevResult) to bridge, then portmap.
    cl = dict(node1.conflist, cniVersion="1.0.0")
    _, rt4 = node1.pod("p4")
    res = node1.driver.add(cl, rt4)
    assert res["cniVersion"] == "1.0.0"
    node1.driver.check(cl, rt4)
    node1.driver.delete(cl, rt4)

    for _, rt in pods:
        node1.driver.delete(node1.conflist, rt)
    assert node1.allocated() == []
    assert os.listdir(node1.data_dir) == []
    for ns, _ in pods:
        assert run(["ip", "-n", ns, "link", "show", "eth0"], check=False).strip() == ""
    # Repeated DEL after everything is gone is still success.
    node1.driver.delete(node1.conflist, pods[0][1])


def test_cni_version_110_answered_as_110(scope: RunScope, node1: CniNode) -> None:
    cl = {"name": "cbr0", "cniVersion": "1.1.0", "plugins": [node1.conflist["plugins"][0]]}
    _, rt = node1.pod("v11")
    res = node1.driver.add(cl, rt)
    assert res["cniVersion"] == "1.1.0"
    assert res["ips"][0]["address"].startswith("10.244.1.")
    stored = json.loads((node1.data_dir / rt.container_id).read_bytes())
    assert stored["cniVersion"] == "1.1.0"
    node1.driver.status(cl)  # subnet.env readable: ready
    node1.driver.gc(cl, [rt])  # Debian's bridge predates GC: nothing collected, nothing broken
    assert (node1.data_dir / rt.container_id).exists()
    node1.driver.delete(cl, rt)
    assert node1.allocated() == []
    node1.subnet_file.rename(node1.subnet_file.with_suffix(".away"))
    with pytest.raises(CNIError) as ei:
        node1.driver.status(cl)
    assert ei.value.code == 50


def test_thirty_concurrent_adds(scope: RunScope, node1: CniNode) -> None:
    pods = [node1.pod(f"c{i}") for i in range(30)]
    with ThreadPoolExecutor(max_workers=30) as ex:
        ips = list(ex.map(lambda p: node1.add(p[1]), pods))
    assert len(set(ips)) == 30
    assert all(ipaddress.ip_address(ip) in node1.subnet for ip in ips)
    assert node1.allocated() == sorted(ips)
    assert len(os.listdir(node1.data_dir)) == 30
    brif = run(["ip", "-n", node1.ns, "-o", "link", "show", "master", "cni0"])
    assert len(brif.strip().splitlines()) == 30
    with ThreadPoolExecutor(max_workers=30) as ex:
        list(ex.map(lambda p: node1.driver.delete(node1.conflist, p[1]), pods))
    assert node1.allocated() == []
    assert os.listdir(node1.data_dir) == []
    assert run(["ip", "-n", node1.ns, "-o", "link", "show", "master", "cni0"]).strip() == ""


def test_bad_input_leaves_nothing_behind(scope: RunScope, node1: CniNode) -> None:
    cases: list[tuple[RuntimeConf, int]] = [
        (RuntimeConf(container_id="../escape", netns="/run/netns/x"), 4),
        (RuntimeConf(container_id="ok", netns="/run/netns/x", ifname="a" * 16), 4),
        (RuntimeConf(container_id="ok", netns="/run/netns/x", ifname="eth:0"), 4),
    ]
    for rt, code in cases:
        with pytest.raises(CNIError) as ei:
            node1.driver.add(node1.conflist, rt)
        assert ei.value.code == code
    bad_name = dict(node1.conflist, name="no spaces allowed")
    with pytest.raises(CNIError) as ei:
        node1.driver.add(bad_name, RuntimeConf(container_id="ok", netns="/run/netns/x"))
    assert ei.value.code == 7
    bad_version = dict(node1.conflist, cniVersion="0.0.7")
    with pytest.raises(CNIError) as ei:
        node1.driver.add(bad_version, RuntimeConf(container_id="ok", netns="/run/netns/x"))
    assert ei.value.code == 1
    assert run(["ip", "-n", node1.ns, "link", "show", "cni0"], check=False).strip() == ""
    assert not node1.data_dir.exists()
    assert node1.allocated() == []


SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 80))
s.listen(8)
s.settimeout(60)
for _ in range(20):
    c, peer = s.accept()
    c.sendall(("hello " + peer[0]).encode())
    c.close()
"""

CLIENT = """
import socket, sys, time
deadline = time.monotonic() + 15
while True:
    try:
        c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
        print(c.recv(100).decode())
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
"""


def _underlay(scope: RunScope, a: CniNode, b: CniNode) -> None:
    """Two nodes on one link, each routing the other's pod subnet to it (what host-gw would program)."""
    netns.veth(a.ns, "ul0", b.ns, "ul0")
    for n, me, peer_node, peer in ((a, "192.168.50.1", b, "192.168.50.2"), (b, "192.168.50.2", a, "192.168.50.1")):
        run(["ip", "-n", n.ns, "addr", "add", f"{me}/24", "dev", "ul0"])
        run(["ip", "-n", n.ns, "link", "set", "ul0", "up"])
        run(["ip", "-n", n.ns, "route", "add", str(peer_node.subnet), "via", peer])


def test_cross_node_pods_and_host_port_from_another_host(scope: RunScope, node1: CniNode) -> None:
    node2 = CniNode(scope, "n2", "10.244.2.0/24")
    _underlay(scope, node1, node2)
    ns1, rt1 = node1.pod("web", portMappings=[{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}])
    ns2, rt2 = node2.pod("cli")
    ip1 = node1.add(rt1)
    ip2 = node2.add(rt2)
    assert wait_ping(ns1, ip2)
    assert wait_ping(ns2, ip1)

    nat = run(["ip", "netns", "exec", node1.ns, "iptables", "-t", "nat", "-S"])
    assert "--dport 8080" in nat and f"{ip1}:80" in nat
    scope.spawn(ns1, [sys.executable, "-c", SERVER])
    # From the other host's own namespace (not a pod) to node1's underlay address and the hostPort.
    out = ns_exec(node2.ns, [sys.executable, "-c", CLIENT, "192.168.50.1", "8080"], timeout=30)
    assert out.strip() == "hello 192.168.50.2"

    node1.driver.delete(node1.conflist, rt1)
    node2.driver.delete(node2.conflist, rt2)
    nat = run(["ip", "netns", "exec", node1.ns, "iptables", "-t", "nat", "-S"])
    assert "--dport 8080" not in nat
    assert node1.allocated() == [] and node2.allocated() == []


def test_pods_across_flanneld_nodes(scope: RunScope) -> None:
    """Real flanneld (vxlan) writes subnet.env on each node; pods made through the conflist reach each other."""
    _need_plugins()
    need(tools=("etcd", "etcdctl"))
    tb = Testbed(scope)
    tb.start_etcd()
    tb.put_config({"Network": NETWORK, "Backend": {"Type": "vxlan"}})
    nodes = [tb.add_node(n) for n in ("f1", "f2", "f3")]
    for n in nodes:
        tb.start_agent(n)
    pods: list[tuple[CniNode, str, RuntimeConf, str]] = []
    for n in nodes:
        env = tb.wait_ready(n)
        # Served by the node's agent (its socket is beside its subnet.env): a fallback trips the test.
        cn = CniNode(scope, n.name, str(env.subnet), ns=n.ns, subnet_file=n.subnet_file, socket=n.dir / "cni.sock")
        ns, rt = cn.pod("p")
        ip = cn.add(rt)
        assert ipaddress.ip_address(ip) in env.subnet
        assert json.loads((cn.data_dir / rt.container_id).read_bytes())["mtu"] == env.mtu
        pods.append((cn, ns, rt, ip))
    failures = [f"{a[1]}->{b[3]}" for a in pods for b in pods if a is not b and not wait_ping(a[1], b[3], timeout=20)]
    assert failures == []
    for cn, _, rt, _ in pods:
        cn.driver.delete(cn.conflist, rt)
        assert cn.allocated() == []
