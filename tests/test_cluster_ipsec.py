"""The ipsec backend with real agents, real charon and real etcd. The traffic tests need ESP in the kernel (esp4),
which this host lacks: they run in the stock-kernel VM (`python -m pyflannel.lab.vm -- tests/test_cluster_ipsec.py`).
Bad input runs on both.

What charon holds is read with swanctl (strongSwan's tool, not our code) on the VICI socket in charon's private
/run; the policies with `ip xfrm policy` in the node's namespace; the wire from a capture on the underlay, with a
positive control on the pod's side.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from clusters import build_cluster, pcap_ipv4
from needs import need
from test_cluster import NETWORK, Cluster, all_pairs_ping, ip

from pyflannel.lab import netns
from pyflannel.lab.testbed import Node, Testbed

pytestmark = [pytest.mark.integration]

PSK = secrets.token_hex(50)  # 100 characters
PATTERN = "c0ffee00deadbeef5a5a0123456789ab"
HEALTH = ("--healthz-port=8471", "--healthz-ip=127.0.0.1")
ARGS = ("--reconcile-interval=300", *HEALTH)


def _need() -> None:
    need(tools=("ip", "etcd", "etcdctl", "swanctl", "tcpdump"), files=("/usr/lib/ipsec/charon",))


def charon_pids(node: Node) -> list[int]:
    out = []
    for pid in netns.ns_pids(node.ns):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "charon":
                out.append(pid)
        except OSError:
            continue
    return out


def charon_pid(node: Node) -> int | None:
    """The node's one charon (two would fight over UDP 500)."""
    pids = charon_pids(node)
    assert len(pids) <= 1, f"{node.name} runs several charons: {pids}"
    return pids[0] if pids else None


def swanctl(node: Node, *args: str) -> str:
    pid = charon_pid(node)
    assert pid is not None, f"no charon on {node.name}"
    return netns.run(["swanctl", *args, "--uri", f"unix:///proc/{pid}/root/run/charon.vici"], timeout=30)


def sas(node: Node) -> dict[str, int]:
    """IKE_SA name -> its installed CHILD_SAs, for the ESTABLISHED ones (swanctl --list-sas)."""
    out: dict[str, int] = {}
    cur = None
    for line in swanctl(node, "--list-sas").splitlines():
        m = re.match(r"^(\S+): #\d+, (\w+),", line)
        if m:
            cur = m.group(1) if m.group(2) == "ESTABLISHED" else None
            if cur is not None:
                out.setdefault(cur, 0)
                out[cur] += 0
            continue
        if cur is not None and re.match(r"^\s+\S+: #\d+, reqid 11, INSTALLED, TUNNEL", line):
            out[cur] += 1
    return out


def shared_ids(node: Node) -> set[str]:
    """The ids of the shared keys charon holds (strongSwan's own binding; never their data)."""
    import vici

    pid = charon_pid(node)
    assert pid is not None
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(f"/proc/{pid}/root/run/charon.vici")
        return {k.decode() for k in vici.Session(s).get_shared()["keys"]}


def conns(node: Node) -> set[str]:
    return {m.group(1) for m in re.finditer(r"^(\S+): ", swanctl(node, "--list-conns"), re.M)}


def policies(node: Node) -> set[str]:
    """`ip xfrm policy` of the node as one line per policy: `SRC DST DIR TMPL-SRC TMPL-DST PROTO REQID MODE`."""
    out, cur = set(), ""
    text = ip(node.ns, "xfrm", "policy")
    for line in text.splitlines():
        if line.startswith("src "):
            if cur:
                out.add(cur)
            f = line.split()
            cur = f"{f[1]} {f[3]}"
        elif line.strip().startswith("socket "):
            cur = ""  # a socket policy (charon's IKE bypass), not a node's
        elif line.strip().startswith("dir "):
            cur += f" {line.split()[1]}"
        elif line.strip().startswith("tmpl "):
            f = line.split()
            cur += f" {f[2]} {f[4]}"
        elif line.strip().startswith("proto "):
            f = line.split()
            cur += f" {f[1]} {f[3]} {f[5]}"
    if cur:
        out.add(cur)
    return out


def expected_policies(cl: Cluster, node: Node, others: list[Node]) -> set[str]:
    me, sub = node.ip, cl.subnet(node)
    want = set()
    for o in others:
        osub = cl.subnet(o)
        want.add(f"{sub} {osub} out {me} {o.ip} esp 11 tunnel")
        want.add(f"{osub} {sub} in {o.ip} {me} esp 11 tunnel")
        want.add(f"{osub} {sub} fwd {o.ip} {me} esp 11 tunnel")
    return want


def conn_name(cl: Cluster, a: Node, b: Node) -> str:
    return f"{a.ip}-{cl.subnet(a)}-{cl.subnet(b)}-{b.ip}"


def all_established(cl: Cluster, timeout: float = 120) -> bool:
    nodes = list(cl.tb.nodes.values())

    def ok() -> bool:
        for n in nodes:
            s = sas(n)
            if any(s.get(conn_name(cl, n, o), 0) < 1 for o in nodes if o is not n):
                return False
        return True

    return netns.wait_for(ok, timeout=timeout, step=1)


def _diagnose(cl: Cluster) -> str:
    out = []
    for n in cl.tb.nodes.values():
        try:
            s = swanctl(n, "--list-sas")
        except Exception as e:  # diagnostics only
            s = str(e)
        out.append(f"{n.name}: {s}\n{ip(n.ns, 'xfrm', 'policy')}\n{ip(n.ns, 'route')}\n{cl.tb.log_tail(n, 1500)}")
    return "\n".join(out).replace(PSK, "(psk)")


def _capture(ns: str, iface: str, pcap: Path) -> subprocess.Popen[str]:
    cap = subprocess.Popen(
        ["ip", "netns", "exec", ns, "tcpdump", "-i", iface, "-n", "-U", "-w", str(pcap)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert cap.stderr is not None
    assert "listening on" in cap.stderr.readline()
    return cap


def _stop(cap: subprocess.Popen[str]) -> None:
    time.sleep(0.5)
    cap.terminate()
    try:
        cap.wait(timeout=10)
    except subprocess.TimeoutExpired:
        cap.kill()
        cap.wait(timeout=10)


def _default_route(node: Node) -> None:
    # Upstream adds no route: a pod's packet follows the node's default route, which the out policy then tunnels.
    if "default" not in ip(node.ns, "route"):
        netns.run(["ip", "-n", node.ns, "route", "add", "default", "via", "192.168.77.1"])


def _make(tag: str, backend: dict[str, Any], nodes: tuple[str, ...] = ("n1", "n2", "n3")) -> Iterator[Cluster]:
    _need()
    yield from build_cluster(tag, {"Type": "ipsec", "PSK": PSK, **backend}, nodes=nodes, extra_args=ARGS,
                             before_start=_default_route)  # fmt: skip


@pytest.fixture(scope="module")
def cluster(require_kernel_module: Callable[..., None]) -> Iterator[Cluster]:
    require_kernel_module("esp4", "xfrm_user")
    yield from _make("ips", {})


def _wire(cl: Cluster, esp_udp: bool) -> None:
    """One ping n1-p1 -> n2-p1: the pod's port shows the pattern, the underlay only ESP (or ESP in UDP 4500)."""
    tb = cl.tb
    n1, n2 = tb.nodes["n1"], tb.nodes["n2"]
    src, dst = n1.pods[0], n2.pods[0]
    under, inner = tb.scope.tmpdir / "underlay.pcap", tb.scope.tmpdir / "pod.pcap"
    caps = [_capture(tb.ul_ns, n1.name, under), _capture(n1.ns, "vp1", inner)]
    try:
        p = subprocess.run(["ip", "netns", "exec", src.ns, "ping", "-c", "4", "-i", "0.3", "-W", "2", "-p", PATTERN,
                            "-s", "200", dst.ip], capture_output=True, text=True, timeout=60)  # fmt: skip
        assert p.returncode == 0, p.stdout + p.stderr + _diagnose(cl)
    finally:
        for c in caps:
            _stop(c)
    pattern = bytes.fromhex(PATTERN)
    assert pattern in inner.read_bytes()
    data = under.read_bytes()
    assert pattern not in data and pattern[:8] not in data
    pods = {bytes(map(int, a.split("."))) for a in (src.ip, dst.ip)}
    ends = {bytes(map(int, n1.ip.split("."))), bytes(map(int, n2.ip.split(".")))}
    esp = 0
    for pkt in pcap_ipv4(under):
        ihl = (pkt[0] & 15) * 4
        s, d = pkt[12:16], pkt[16:20]
        assert s not in pods and d not in pods, "a pod address on the underlay"
        assert pkt[9] != 1 or {s, d} != ends, "plaintext ICMP between the nodes"
        if {s, d} != ends:
            continue
        ports = (int.from_bytes(pkt[ihl : ihl + 2], "big"), int.from_bytes(pkt[ihl + 2 : ihl + 4], "big"))
        if pkt[9] == 17 and ports == (500, 500):
            continue  # IKE (DPD, rekeying)
        if esp_udp:
            assert pkt[9] == 17 and ports == (4500, 4500), (
                f"node to node traffic that is not ESP in UDP: {pkt[:40].hex()}"
            )
            if pkt[ihl + 8 : ihl + 12] != b"\0\0\0\0":  # not IKE's non-ESP marker
                esp += 1
        else:
            assert pkt[9] == 50, f"node to node traffic that is not ESP: proto {pkt[9]}"
            esp += 1
    assert esp >= 4, netns.run(["tcpdump", "-n", "-r", str(under)])


@pytest.mark.vm_only
def test_ike_sas_between_every_pair_and_every_pod_reaches_every_other(cluster: Cluster) -> None:
    assert all_established(cluster), _diagnose(cluster)
    nodes = list(cluster.tb.nodes.values())
    for n in nodes:
        s = sas(n)
        # One IKE_SA and one CHILD_SA per pair: only one end initiates.
        assert sorted(s) == sorted(conn_name(cluster, n, o) for o in nodes if o is not n), s
        assert all(v == 1 for v in s.values()), s
    assert all_pairs_ping(cluster) == [], _diagnose(cluster)


@pytest.mark.vm_only
def test_underlay_carries_only_esp(cluster: Cluster) -> None:
    _wire(cluster, esp_udp=False)


@pytest.mark.vm_only
def test_policies_lease_subnet_env_and_no_secret_anywhere(cluster: Cluster) -> None:
    tb = cluster.tb
    nodes = list(tb.nodes.values())
    for n in nodes:
        others = [o for o in nodes if o is not n]
        assert policies(n) == expected_policies(cluster, n, others), ip(n.ns, "xfrm", "policy")
        lease = cluster.lease_of(n)
        assert lease["BackendType"] == "ipsec" and lease.get("BackendData") is None, lease
        assert "FLANNEL_MTU=1423\n" in n.subnet_file.read_text()  # 1500 - 77, upstream's overhead
        assert conns(n) == {conn_name(cluster, n, o) for o in others}
        code = "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:8471/readyz',timeout=5).read().decode())"
        status = netns.ns_exec(n.ns, ["python3", "-c", code])
        assert status.startswith("ok") and "charon" in status, status
        for text in (status, n.log_file.read_text(errors="replace"), ip(n.ns, "xfrm", "state")):
            assert PSK not in text and PSK[:24] not in text


@pytest.mark.vm_only
def test_hand_deleted_policy_comes_back(cluster: Cluster) -> None:
    tb = cluster.tb
    n1, n2 = tb.nodes["n1"], tb.nodes["n2"]
    others = [tb.nodes["n2"], tb.nodes["n3"]]
    restores = n1.log_file.read_text().count("were missing or stale; restored")
    netns.run(["ip", "-n", n1.ns, "xfrm", "policy", "delete", "src", cluster.subnet(n1), "dst", cluster.subnet(n2),
               "dir", "out"])  # fmt: skip
    assert netns.wait_for(lambda: policies(n1) == expected_policies(cluster, n1, others), timeout=60)
    assert n1.log_file.read_text().count("were missing or stale; restored") > restores
    assert tb.wait_ping(n1.pods[0].ns, n2.pods[0].ip)


@pytest.mark.vm_only
def test_charon_killed_is_restarted_and_sas_come_back(cluster: Cluster) -> None:
    tb = cluster.tb
    for name in ("n1", "n3"):  # the lowest PublicIP (an initiator only) and the highest (a responder only)
        node = tb.nodes[name]
        pid = charon_pid(node)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # a process of this test's namespace, by its pid
        assert netns.wait_for(lambda node=node, pid=pid: (charon_pid(node) or pid) != pid, timeout=60)  # type: ignore[misc]
        assert all_established(cluster, timeout=180), _diagnose(cluster)
        assert all_pairs_ping(cluster) == [], _diagnose(cluster)


@pytest.mark.vm_only
def test_agent_restart_keeps_the_tunnels(cluster: Cluster) -> None:
    tb = cluster.tb
    n1, n2 = tb.nodes["n1"], tb.nodes["n2"]
    pid = charon_pid(n2)
    pinger = subprocess.Popen(
        ["ip", "netns", "exec", n1.pods[0].ns, "ping", "-i", "0.2", "-W", "1", n2.pods[0].ip],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(1)
        assert tb.stop_agent(n2) == 0
        since = time.time()
        tb.start_agent(n2)
        tb.wait_ready(n2, since=since - 1)
        time.sleep(2)
    finally:
        pinger.send_signal(signal.SIGINT)
        out, _ = pinger.communicate(timeout=20)
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert m, out
    sent, got = int(m.group(1)), int(m.group(2))
    # A functional bound, not a benchmark: charon outlives the agent and is adopted, so the tunnel stays.
    gap = (sent - got) * 0.2
    print(f"agent restart: {sent} pings, {got} replies, gap about {gap:.1f} s")
    assert sent >= 10 and gap <= 10, out
    assert charon_pid(n2) == pid
    assert all_established(cluster)


@pytest.mark.vm_only
def test_node_leaving_is_removed_everywhere(cluster: Cluster) -> None:
    tb = cluster.tb
    n4 = tb.add_node("n4")
    _default_route(n4)
    n4.extra_args = ARGS
    tb.start_agent(n4)
    cluster.env["n4"] = tb.wait_ready(n4)
    tb.add_pod(n4, cluster.env["n4"])
    rest = [tb.nodes[n] for n in ("n1", "n2", "n3")]
    try:
        assert all_established(cluster), _diagnose(cluster)
        assert tb.wait_ping(rest[0].pods[0].ns, n4.pods[0].ip)
        tb.stop_agent(n4)
        tb.etcdctl("del", f"{tb.prefix}/subnets/{cluster.subnet(n4).replace('/', '-')}")
        for node in rest:
            others = [o for o in rest if o is not node]
            want_p, want_c = expected_policies(cluster, node, others), {conn_name(cluster, node, o) for o in others}
            assert netns.wait_for(lambda node=node, w=want_p: policies(node) == w, timeout=60), policies(node)  # type: ignore[misc]
            assert netns.wait_for(lambda node=node, w=want_c: conns(node) == w, timeout=60), conns(node)  # type: ignore[misc]
            assert netns.wait_for(lambda node=node: f"flannel-{n4.ip}" not in shared_ids(node), timeout=30)  # type: ignore[misc]
    finally:
        del tb.nodes["n4"]
        cluster.env.pop("n4", None)
        tb.scope.remove_ns(n4.ns)
    assert all_pairs_ping(cluster) == []


# ---- UDPEncap ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encap_cluster(require_kernel_module: Callable[..., None]) -> Iterator[Cluster]:
    require_kernel_module("esp4", "xfrm_user")
    yield from _make("ipsu", {"UDPEncap": True}, nodes=("n1", "n2"))


@pytest.mark.vm_only
def test_udp_encap_carries_esp_in_udp_4500(encap_cluster: Cluster) -> None:
    assert all_established(encap_cluster), _diagnose(encap_cluster)
    assert all_pairs_ping(encap_cluster) == [], _diagnose(encap_cluster)
    n1 = encap_cluster.tb.nodes["n1"]
    assert "FLANNEL_MTU=1415\n" in n1.subnet_file.read_text()  # 8 more for the UDP header
    assert "encap" in ip(n1.ns, "xfrm", "state")
    _wire(encap_cluster, esp_udp=True)


# ---- a node with another PSK ---------------------------------------------------------------------------------------


@pytest.mark.vm_only
def test_wrong_psk_node_is_isolated_and_the_others_keep_working(
    scope: netns.RunScope, require_kernel_module: Callable[..., None]
) -> None:
    _need()
    require_kernel_module("esp4", "xfrm_user")
    wrong = secrets.token_hex(50)
    tb = Testbed(scope)
    tb.start_etcd()
    cl = Cluster(tb, "ipsec")
    for name, psk in (("n1", PSK), ("n2", PSK), ("n3", wrong)):
        # Each agent reads the config once at start: n3 starts while it names the wrong PSK.
        tb.put_config({"Network": NETWORK, "Backend": {"Type": "ipsec", "PSK": psk}})
        node = tb.add_node(name)
        _default_route(node)
        node.extra_args = ARGS
        tb.start_agent(node)
        cl.env[name] = tb.wait_ready(node)
        tb.add_pod(node, cl.env[name])
    tb.put_config({"Network": NETWORK, "Backend": {"Type": "ipsec", "PSK": PSK}})
    n1, n2, n3 = tb.nodes["n1"], tb.nodes["n2"], tb.nodes["n3"]
    assert tb.wait_ping(n1.pods[0].ns, n2.pods[0].ip, timeout=60), _diagnose(cl)
    assert tb.wait_ping(n2.pods[0].ns, n1.pods[0].ip)
    for a, b in ((n3, n1), (n3, n2), (n1, n3), (n2, n3)):
        assert not tb.ping(a.pods[0].ns, b.pods[0].ip, count=3, wait=1), f"{a.name} reached {b.name}"
    assert conn_name(cl, n1, n3) not in sas(n1)
    assert tb.wait_ping(n1.pods[0].ns, n2.pods[0].ip)
    for node in (n1, n2, n3):
        text = node.log_file.read_text(errors="replace")
        assert PSK not in text and wrong not in text


# ---- bad input: a clear error, nothing built (host and VM) ---------------------------------------------------------


def _refused(scope: netns.RunScope, backend: dict[str, Any], needle: str) -> str:
    need(tools=("ip", "etcd", "etcdctl"))
    tb = Testbed(scope)
    tb.start_etcd()
    tb.put_config({"Network": NETWORK, "Backend": {"Type": "ipsec", **backend}})
    node = tb.add_node("n1")
    p = subprocess.run(["ip", "netns", "exec", node.ns, *tb.agent_cmd(node)], capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    out = p.stderr + p.stdout
    assert p.returncode == 1, out
    assert needle in out, out
    assert "Traceback" not in out
    assert policies(node) == set() and ip(node.ns, "xfrm", "state").strip() == ""
    assert charon_pid(node) is None
    assert not node.subnet_file.exists()
    assert tb.leases() == {}
    return out


@pytest.mark.kernel_vm
def test_short_psk_is_refused_without_echo(scope: netns.RunScope) -> None:
    short = "s3cr3t" * 10
    out = _refused(scope, {"PSK": short}, "Backend.PSK is too short: 60 characters, at least 96 needed")
    assert short not in out and short[:12] not in out


@pytest.mark.kernel_vm
def test_missing_psk_is_refused(scope: netns.RunScope) -> None:
    _refused(scope, {}, "Backend.PSK is required")


@pytest.mark.kernel_vm
def test_unknown_proposal_is_refused(scope: netns.RunScope) -> None:
    out = _refused(scope, {"PSK": PSK, "ESPProposal": "aes128gcm16-magic512"}, "unknown algorithm keyword 'magic512'")
    assert PSK not in out


@pytest.mark.kernel_vm
def test_missing_charon_is_refused(scope: netns.RunScope) -> None:
    out = _refused(
        scope,
        {"PSK": PSK, "CharonExecutablePath": "/nonexistent/charon"},
        "charon (strongSwan's IKE daemon) not found in /nonexistent/charon",
    )
    assert PSK not in out
