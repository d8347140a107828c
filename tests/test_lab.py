"""flannel-lab end to end: every subcommand through the real CLI, asserting on what the kernel and etcd hold.

Each lab here has its own state dir and a namespace prefix `pflt<pytest pid>lab<tag>-`: the test suite's sweep
(stem pflt) cleans it after a crash, and a user's lab (prefix pfll-, /run/pyflannel-lab) is never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from needs import require

from pyflannel.lab import netns
from pyflannel.lab.lab import check_prefix
from pyflannel.lab.state import LabError

pytestmark = pytest.mark.integration


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", "etcd", "etcdctl", "tcpdump", "bridge"):
        if shutil.which(tool) is None:
            return f"needs {tool} (run scripts/setup.sh)"
    if not Path("/usr/lib/cni/bridge").is_file():
        return "needs Debian's containernetworking-plugins in /usr/lib/cni"
    return None


@dataclass
class LabRun:
    prefix: str
    state_dir: Path

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pyflannel.lab.cli", "--state-dir", str(self.state_dir), "--prefix", self.prefix,
             *args],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def ok(self, *args: str, timeout: float = 120) -> str:
        p = self.cli(*args, timeout=timeout)
        assert p.returncode == 0, f"flannel-lab {' '.join(args)}: exit {p.returncode}\n{p.stdout}\n{p.stderr}"
        return p.stdout

    def status(self) -> dict[str, Any]:
        d: dict[str, Any] = json.loads(self.ok("status", "--json"))
        return d

    def namespaces(self) -> list[str]:
        return [ns for ns in netns.list_ns() if ns.startswith(self.prefix)]

    def processes(self) -> list[int]:
        """Live processes whose command line names this lab's state dir (agents, etcd)."""
        needle = str(self.state_dir) + "/"
        out = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
                except OSError:
                    continue
                if needle in cmd and state != "Z":
                    out.append(int(d.name))
        return out

    def node_route(self, node_ns: str) -> str:
        return netns.run(["ip", "-n", node_ns, "route"], check=False)

    def teardown(self) -> None:
        """What a test's lab leaves once the test is done, whatever state it got to: nothing (`down`, then any
        namespace of its prefix deleted and its state dir removed, should `down` have failed)."""
        self.cli("down", timeout=60)
        for ns in self.namespaces():
            netns.delete_ns(ns)
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def assert_gone(self) -> None:
        assert self.namespaces() == []
        assert netns.wait_for(lambda: self.processes() == [], timeout=10), self.processes()
        assert not self.state_dir.exists()


def _new_lab(tag: str) -> LabRun:
    require(_skip_reason())
    prefix = f"{netns.STEM_TEST}{os.getpid()}lab{tag}-"
    return LabRun(prefix=prefix, state_dir=Path(tempfile.gettempdir()) / prefix.rstrip("-"))


@contextlib.contextmanager
def running_lab(tag: str, *up: str) -> Iterator[LabRun]:
    """A lab brought up with `flannel-lab up UP...` for a module's tests, torn down after them (or after a failed
    up)."""
    lab = _new_lab(tag)
    try:
        lab.ok("up", *up)
        yield lab
    finally:
        lab.teardown()


@pytest.fixture
def lab_factory() -> Iterator[Callable[[str], LabRun]]:
    made: list[LabRun] = []

    def make(tag: str) -> LabRun:
        lab = _new_lab(tag)
        made.append(lab)
        return lab

    yield make
    for lab in made:
        lab.teardown()


@pytest.fixture(scope="module")
def vx() -> Iterator[LabRun]:
    with running_lab("vx") as lab:  # the defaults: 3 nodes, vxlan, 2 pods per node
        yield lab


# ---- the default vxlan lab ------------------------------------------------------------------------------


def test_up_defaults_and_status_json(vx: LabRun) -> None:
    st = vx.status()
    assert st["backend"] == "vxlan" and st["store"] == "etcd" and st["kube"] is None
    assert st["network"] == "10.244.0.0/16"
    assert [n["name"] for n in st["nodes"]] == ["n1", "n2", "n3"]
    assert len(st["pods"]) == 6
    have = set(vx.namespaces())
    for n in st["nodes"]:
        assert set(n) >= {"name", "netns", "ip", "subnet", "pid", "ready"}
        assert n["netns"] in have and n["ready"] is True
        assert n["pid"] in netns.ns_pids(n["netns"])  # the agent really runs inside its node
        assert re.fullmatch(r"10\.244\.\d+\.0/24", n["subnet"])
        assert re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", n["vtep_mac"])
    assert len({n["subnet"] for n in st["nodes"]}) == 3
    subnet_of = {n["name"]: n["subnet"] for n in st["nodes"]}
    for p in st["pods"]:
        assert set(p) == {"name", "node", "netns", "ip", "ip6"} and p["ip6"] is None
        assert p["netns"] in have
        # The address came from host-local through the flannel plugin, inside the node's subnet.
        assert p["ip"].rsplit(".", 1)[0] == subnet_of[p["node"]].rsplit(".", 1)[0]
        assert f"{p['ip']}/24" in netns.run(["ip", "-n", p["netns"], "-o", "-4", "addr", "show", "eth0"])
    # The human form lists the same things, and names the store.
    text = vx.ok("status")
    assert text.startswith(f"store etcd ({st['etcd']['endpoint']}")
    p = vx.cli("get", "nodes")
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "etcd mode" in p.stderr
    for n in st["nodes"]:
        assert n["subnet"] in text
    # Agents are detached from `up`: they outlived it and run in their own session.
    for n in st["nodes"]:
        assert os.getsid(n["pid"]) == n["pid"]


def test_nodes_hold_vxlan_routes_to_every_peer(vx: LabRun) -> None:
    st = vx.status()
    for n in st["nodes"]:
        routes = vx.node_route(n["netns"])
        for peer in st["nodes"]:
            if peer is not n:
                net = peer["subnet"].split("/")[0]
                assert f"{peer['subnet']} via {net} dev flannel.1 onlink" in routes
        assert f"{n['subnet']} dev cni0" in routes


def test_check_matrix_all_pairs(vx: LabRun) -> None:
    out = vx.ok("check")
    assert "30/30 pairs ok" in out
    assert "FAIL" not in out
    assert json.loads(vx.ok("check", "--json")) == {"ok": True, "failed": [], "pairs": 30}
    assert "IPv6" not in out  # an IPv4 lab: one matrix, as before


def test_exec_in_pod_and_node(vx: LabRun) -> None:
    st = vx.status()
    dst = st["pods"][-1]
    out = vx.ok("exec", "n1-p1", "--", "ping", "-c", "1", "-W", "2", dst["ip"])
    assert "1 received" in out
    assert dst["ip"] in vx.ok("exec", "n3-p2", "--", "ip", "-o", "-4", "addr", "show", "eth0")
    assert "flannel.1" in vx.ok("exec", "n1", "--", "ip", "link", "show")
    assert vx.cli("exec", "n1", "--", "sh", "-c", "exit 7").returncode == 7
    p = vx.cli("exec", "nosuch", "--", "true")
    assert p.returncode == 1 and "no pod or node 'nosuch'" in p.stderr


def test_show_node(vx: LabRun) -> None:
    st = vx.status()
    n1, n2 = st["nodes"][0], st["nodes"][1]
    out = vx.ok("show", "n1")
    assert f"FLANNEL_SUBNET={n1['subnet'].replace('.0/24', '.1/24')}" in out
    assert f'{{"PublicIP":"{n1["ip"]}","PublicIPv6":null,"BackendType":"vxlan"' in out  # the lease, from etcd
    assert "vxlan id 1 local " + n1["ip"] in out and "dstport 8472" in out
    assert f"{n2['subnet'].split('/')[0]} lladdr {n2['vtep_mac']} PERMANENT" in out
    assert f"{n2['vtep_mac']} dst {n2['ip']} self permanent" in out
    assert "master cni0" in out
    assert "FLANNEL-FWD" in out
    assert '--comment "flanneld masq" -j MASQUERADE' in out  # ip-masq is on by default, as in kube-flannel
    assert vx.cli("show", "nosuch").returncode == 1


def test_trace_vxlan_with_capture(vx: LabRun) -> None:
    st = vx.status()
    nodes = {n["name"]: n for n in st["nodes"]}
    pods = {p["name"]: p for p in st["pods"]}
    out = vx.ok("trace", "n1-p1", "n2-p1")
    n1, n2, dst = nodes["n1"], nodes["n2"], pods["n2-p1"]
    net2 = n2["subnet"].split("/")[0]
    assert f"{n2['subnet']} via {net2} dev flannel.1 onlink" in out  # host route
    assert f"{net2} lladdr {n2['vtep_mac']} PERMANENT" in out  # neighbour
    assert f"{n2['vtep_mac']} dst {n2['ip']} self permanent" in out  # FDB
    assert f"UDP {n1['ip']} -> {n2['ip']}:8472" in out
    # The capture on the underlay: outer UDP to 8472 with VXLAN decoded, inner ICMP to the pod.
    assert re.search(
        rf"{re.escape(n1['ip'])}\.\d+ > {re.escape(n2['ip'])}\.8472: VXLAN, flags \[I\] \(0x08\), vni 1", out
    )
    # The inner packet carries the pod's own address: flanneld's masq rules leave pod-to-pod traffic alone.
    assert re.search(rf"{re.escape(pods['n1-p1']['ip'])} > {re.escape(dst['ip'])}: ICMP echo request", out)
    # Same node: the bridge, no tunnel.
    same = vx.ok("trace", "n1-p1", "n1-p2", "--no-capture")
    assert "same node" in same and "flannel.1" not in same
    p = vx.cli("trace", "n1-p1", "n2-p1", "-6")
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "has no IPv6 (up --ip-family ipv4)" in p.stderr


def test_diagram(vx: LabRun, tmp_path: Path) -> None:
    st = vx.status()
    text = vx.ok("diagram")
    for p in st["pods"]:
        assert p["ip"] in text
    svg = tmp_path / "lab.svg"
    vx.ok("diagram", "-o", str(svg))
    root = ET.fromstring(svg.read_text())
    assert root.tag.endswith("svg")
    words = " ".join(t.text or "" for t in root.iter() if t.tag.endswith("text"))
    for n in st["nodes"]:
        assert f"node {n['name']}" in words and n["subnet"] in words and n["vtep_mac"] in words
    png = tmp_path / "lab.png"
    p = vx.cli("diagram", "-o", str(png))
    if p.returncode == 0:
        assert png.read_bytes()[:4] == b"\x89PNG"
    else:
        assert "cannot write PNG" in p.stderr and not png.exists()


def test_up_when_up_refuses(vx: LabRun) -> None:
    before = vx.namespaces()
    p = vx.cli("up")
    assert p.returncode == 1 and "already up" in p.stderr
    assert vx.namespaces() == before
    assert all(n["ready"] for n in vx.status()["nodes"])


def test_churn_add_restart_remove(vx: LabRun) -> None:
    out = vx.ok("add-node", "--pods", "1")
    st = vx.status()
    n1 = st["nodes"][0]
    n4 = next(n for n in st["nodes"] if n["name"] == "n4")
    assert n4["ready"] and n4["netns"] in vx.namespaces() and n4["subnet"] in out
    assert [p["name"] for p in st["pods"] if p["node"] == "n4"] == ["n4-p1"]
    assert netns.wait_for(lambda: f"{n4['subnet']} via" in vx.node_route(n1["netns"]))
    assert "42/42 pairs ok" in vx.ok("check")

    old = next(n for n in st["nodes"] if n["name"] == "n2")["pid"]
    vx.ok("restart-agent", "n2")
    n2 = next(n for n in vx.status()["nodes"] if n["name"] == "n2")
    assert n2["pid"] != old and n2["ready"] and n2["pid"] in netns.ns_pids(n2["netns"])
    assert old not in vx.processes()
    assert f"{n4['subnet']} via" in vx.node_route(n2["netns"])

    vx.ok("remove-node", "n4")
    st = vx.status()
    assert [n["name"] for n in st["nodes"]] == ["n1", "n2", "n3"]
    assert not any(p["node"] == "n4" for p in st["pods"])
    assert not any(ns.startswith(f"{vx.prefix}n4") for ns in vx.namespaces())
    # Its lease is gone from etcd, so the other agents drop the route.
    assert netns.wait_for(lambda: n4["subnet"] not in vx.node_route(n1["netns"]))
    assert "30/30 pairs ok" in vx.ok("check")


# ---- host-gw, failures, crashes -------------------------------------------------------------------------


def test_hostgw_up_check_trace_down(lab_factory: Callable[[str], LabRun]) -> None:
    lab = lab_factory("hg")
    lab.ok("up", "--backend", "host-gw", "--nodes", "2", "--pods-per-node", "1", "--ip-masq")
    st = lab.status()
    n1, n2 = st["nodes"]
    assert st["backend"] == "host-gw" and st["ip_masq"] is True
    routes = lab.node_route(n1["netns"])
    assert f"{n2['subnet']} via {n2['ip']} dev eth0" in routes
    assert "flannel.1" not in routes
    assert "2/2 pairs ok" in lab.ok("check")
    out = lab.ok("trace", "n1-p1", "n2-p1")
    assert f"next hop is the peer's underlay IP {n2['ip']}" in out
    # With --ip-masq flanneld (not the bridge plugin) does SNAT, so pod IPs cross the underlay unchanged.
    src, dst = st["pods"][0]["ip"], st["pods"][1]["ip"]
    assert f"{src} > {dst}: ICMP echo request" in out
    assert "FLANNEL-POSTRTG" in lab.ok("show", "n1")
    lab.ok("down")
    lab.assert_gone()


def _kernel_has_ipip() -> bool:
    # A dry run: loading the module here would add tunl0 to the root namespace.
    return Path("/sys/module/ipip").exists() or subprocess.run(["modprobe", "-n", "-q", "ipip"]).returncode == 0


@pytest.mark.kernel_vm
@pytest.mark.vm_only
def test_ipip_up_show_trace_down(lab_factory: Callable[[str], LabRun]) -> None:
    lab = lab_factory("ip")
    lab.ok("up", "--backend", "ipip", "--nodes", "2", "--pods-per-node", "1", timeout=400)
    st = lab.status()
    n1, n2 = st["nodes"]
    assert st["backend"] == "ipip"
    assert f"{n2['subnet']} via {n2['ip']} dev flannel.ipip onlink" in lab.node_route(n1["netns"])
    assert "2/2 pairs ok" in lab.ok("check")
    show = lab.ok("show", "n1")
    assert "flannel.ipip (the IP-in-IP tunnel" in show and f"remote any local {n1['ip']}" in show
    assert "FLANNEL_MTU=1480" in show
    out = lab.ok("trace", "n1-p1", "n2-p1")
    assert f"flannel.ipip encapsulates: a second IPv4 header {n1['ip']} -> {n2['ip']} (protocol 4" in out
    src, dst = st["pods"][0]["ip"], st["pods"][1]["ip"]
    # The capture shows both headers: the nodes' (proto IPIP) and, inside, the pods'.
    outer, inner = f"{n1['ip']} > {n2['ip']}: ", f"{src} > {dst}: ICMP echo request"
    assert re.search(re.escape(outer) + ".*" + re.escape(inner), out, re.S), out
    assert "proto IPIP (4)" in out and "proto UDP" not in out, out
    lab.ok("down")
    lab.assert_gone()


def test_ipip_where_the_kernel_cannot(lab_factory: Callable[[str], LabRun]) -> None:
    """On a kernel without ipip (this host's), `up --backend ipip` fails at once in one line that says what to use
    instead, and makes nothing. On a host whose kernel has it, the same command brings the lab up (the VM pass covers
    ipip labs in test_ipip_up_show_trace_down)."""
    lab = lab_factory("noip")
    if _kernel_has_ipip():
        lab.ok("up", "--backend", "ipip", "--nodes", "1", "--pods-per-node", "0", timeout=400)
        lab.ok("down")
        lab.assert_gone()
        return
    p = lab.cli("up", "--backend", "ipip")
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1, p.stderr
    assert "needs the kernel's ipip module" in p.stderr and "use --backend vxlan or host-gw" in p.stderr
    lab.assert_gone()


def test_up_failing_half_way_leaves_nothing(lab_factory: Callable[[str], LabRun]) -> None:
    lab = lab_factory("fail")
    p = lab.cli("up", "--backend", "nosuch", "--nodes", "2")  # an agent that cannot start: unknown backend
    assert p.returncode == 1
    assert "did not become ready" in p.stderr and "nosuch" in p.stderr
    assert "everything it made was removed" in p.stderr
    lab.assert_gone()
    # Options are checked before anything is made.
    p = lab.cli("up", "--network", "10.9.0.0/26")
    assert p.returncode == 1 and "--network" in p.stderr
    lab.assert_gone()


def test_down_after_sigkill_and_without_state(lab_factory: Callable[[str], LabRun]) -> None:
    lab = lab_factory("kill")
    lab.ok("up", "--nodes", "2", "--pods-per-node", "1")
    st = lab.status()
    pids = [n["pid"] for n in st["nodes"]] + [st["etcd"]["pid"]]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert netns.wait_for(lambda: lab.processes() == [])
    assert not any(n["running"] for n in lab.status()["nodes"])
    lab.ok("down")
    lab.assert_gone()

    # The state file lost while everything runs: down still finds the namespaces and processes.
    lab.ok("up", "--nodes", "2", "--pods-per-node", "1")
    assert lab.processes() != []
    n2_ns = next(n["netns"] for n in lab.status()["nodes"] if n["name"] == "n2")
    (lab.state_dir / "state.json").unlink()
    # And a namespace deleted by hand: its agent keeps running in an unnamed namespace, found by command line.
    netns.run(["ip", "netns", "delete", n2_ns])
    assert any(f"{lab.state_dir}/n2/" in Path(f"/proc/{p}/cmdline").read_text() for p in lab.processes())
    assert lab.cli("status").returncode == 1
    assert "removed" in lab.ok("down")
    assert lab.namespaces() == []
    assert netns.wait_for(lambda: lab.processes() == [], timeout=10)


def test_force_replaces_a_lab(lab_factory: Callable[[str], LabRun]) -> None:
    lab = lab_factory("force")
    lab.ok("up", "--nodes", "1", "--pods-per-node", "1")
    first = lab.status()["nodes"][0]["pid"]
    lab.ok("up", "--force", "--nodes", "2", "--pods-per-node", "0")
    st = lab.status()
    assert len(st["nodes"]) == 2 and st["pods"] == []
    assert first not in lab.processes()
    lab.ok("down")
    lab.assert_gone()


def test_prefix_must_be_a_lab_or_test_stem() -> None:
    for bad in ("", "-", "pfll", "foo-", "p-"):
        with pytest.raises(LabError):
            check_prefix(bad)
    check_prefix("pfll-")
    check_prefix("pflt123lab-")
