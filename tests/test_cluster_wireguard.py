"""The wireguard backend with real agents on real etcd: on this host's kernel (no WireGuard module) it runs on
wireguard-go; in the stock-kernel VM (`python -m pyflannel.lab.vm -- tests/test_cluster_wireguard.py`) the same
tests run on kernel WireGuard, plus a mixed kernel + wireguard-go pair.

What the devices hold is read with `wg show DEV dump` (wireguard-tools, not our code): in the node namespace for
kernel devices, and inside wireguard-go's own mount namespace (nsenter) for userspace ones, whose UAPI socket
exists only there. The private key column of the dump is dropped as soon as it is read, so no assertion message
can print it. The wire is read from a capture on the underlay, with a positive control on the pod's side.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from clusters import build_cluster, pcap_ipv4
from needs import need
from test_cluster import NETWORK, Cluster, all_pairs_ping, ip
from test_lab import _new_lab

from pyflannel.lab import netns
from pyflannel.lab import wireguard as labwg
from pyflannel.lab.testbed import Node, Testbed
from pyflannel.lab.vm import IN_VM_ENV

pytestmark = [pytest.mark.integration]

DEV = "flannel-wg"
PORT = 51820
IN_VM = os.environ.get(IN_VM_ENV) == "1"
# Auto picks the kernel where it has WireGuard (the VM) and wireguard-go where it has not (this host).
EXPECTED = "kernel" if IN_VM else "userspace"
PATTERN = "c0ffee00deadbeef5a5a0123456789ab"  # ping -p: 16 bytes repeated through the payload
HEALTH = ("--healthz-port=8471", "--healthz-ip=127.0.0.1")


@pytest.fixture(scope="module", autouse=True)
def _host_key_file_untouched() -> Iterator[None]:
    """Every agent here keeps its key in its node's directory: none may fall back to this machine's own."""
    host = Path("/run/flannel/wgkey")
    before = host.exists()
    yield
    assert host.exists() == before, "an agent wrote this machine's /run/flannel/wgkey"


def _need_wg() -> None:
    need(tools=("ip", "etcd", "etcdctl", "wg", "wireguard-go", "nsenter", "tcpdump"))


def wg_go_pid(node: Node) -> int | None:
    for pid in netns.ns_pids(node.ns):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "wireguard-go":
                return pid
        except OSError:
            continue
    return None


@dataclass(frozen=True)
class Peer:
    psk: bool
    endpoint: str
    allowed_ips: tuple[str, ...]
    keepalive: str


@dataclass(frozen=True)
class Dump:
    public_key: str
    port: int
    peers: dict[str, Peer]


def wg_dump(node: Node, dev: str = DEV) -> Dump | None:
    """`wg show DEV dump` on the node, wherever the device's implementation serves it; None if it cannot."""
    kind = ip(node.ns, "-d", "link", "show", dev)
    if "wireguard" in kind:
        prefix = ["ip", "netns", "exec", node.ns]
    else:
        pid = wg_go_pid(node)
        if pid is None:
            return None
        prefix = ["nsenter", "-t", str(pid), "-m", "-n"]
    p = subprocess.run([*prefix, "wg", "show", dev, "dump"], capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        return None
    lines = p.stdout.splitlines()
    if not lines:
        return None
    _private, public, port, _fwmark = lines[0].split("\t")
    peers = {}
    for line in lines[1:]:
        key, psk, endpoint, allowed, _hs, _rx, _tx, keepalive = line.split("\t")
        peers[key] = Peer(psk != "(none)", endpoint, tuple(sorted(allowed.split(","))), keepalive)
    return Dump(public, int(port), peers)


def wg_cmd(node: Node, *args: str) -> None:
    """`wg ARGS` against the node's device (kernel or wireguard-go)."""
    if "wireguard" in ip(node.ns, "-d", "link", "show", DEV):
        prefix = ["ip", "netns", "exec", node.ns]
    else:
        pid = wg_go_pid(node)
        assert pid is not None
        prefix = ["nsenter", "-t", str(pid), "-m", "-n"]
    netns.run([*prefix, "wg", *args])


def lease_key(cl: Cluster, node: Node) -> str:
    data = cl.lease_of(node)["BackendData"]
    assert isinstance(data, dict)
    return str(data["PublicKey"])


def readyz(node: Node) -> str:
    code = "import urllib.request;r=urllib.request.urlopen('http://127.0.0.1:8471/readyz',timeout=5);print(r.read().decode())"
    return netns.ns_exec(node.ns, ["python3", "-c", code])


def expect_peers(cl: Cluster, node: Node, others: list[Node], psk: bool = False) -> None:
    """node's device holds exactly one peer per other node: its lease's key, endpoint and subnet."""
    d = wg_dump(node)
    assert d is not None
    want = {lease_key(cl, o): Peer(psk, f"{o.ip}:{PORT}", (cl.subnet(o),), "off") for o in others}
    assert d.peers == want


def _wg_env(node: Node) -> dict[str, str]:
    return {"WIREGUARD_KEY_FILE": str(node.dir / "wgkey")}


@pytest.fixture(scope="module")
def cluster(require_kernel_module: Callable[..., None]) -> Iterator[Cluster]:
    _need_wg()
    if IN_VM:
        require_kernel_module("wireguard")
    yield from build_cluster("wg", {"Type": "wireguard"}, extra_args=("--reconcile-interval=300", *HEALTH))


def _diagnose(cl: Cluster) -> str:
    """What each node holds, for a failure message (public keys only)."""
    out = []
    for n in cl.tb.nodes.values():
        out.append(f"{n.name}: {wg_dump(n)}\n{ip(n.ns, 'route')}\n{cl.tb.log_tail(n, 1200)}")
    return "\n".join(out)


@pytest.mark.kernel_vm
def test_every_pod_reaches_every_other_pod(cluster: Cluster) -> None:
    failed = all_pairs_ping(cluster)
    assert failed == [], _diagnose(cluster)


@pytest.mark.kernel_vm
def test_devices_peers_lease_and_subnet_env(cluster: Cluster) -> None:
    tb = cluster.tb
    nodes = list(tb.nodes.values())
    for node in nodes:
        link = ip(node.ns, "-d", "link", "show", DEV)
        assert " mtu 1420 " in link, link
        assert ("wireguard" in link) == (EXPECTED == "kernel"), link
        assert ("tun type tun" in link) == (EXPECTED == "userspace"), link
        assert re.search(r"<[^>]*\bUP\b", link), link
        addrs = ip(node.ns, "-4", "addr", "show", "dev", DEV)
        assert re.findall(r"inet (\S+)", addrs) == [f"{cluster.gw(node)}/32"], addrs
        assert ip(node.ns, "route", "show", "dev", DEV).split() == [NETWORK, "scope", "link"]
        assert "FLANNEL_MTU=1420\n" in node.subnet_file.read_text()
        d = wg_dump(node)
        assert d is not None and d.port == PORT
        # The lease, byte for byte: upstream's fields plus the Port, the key the device really holds.
        key = cluster.subnet(node).replace("/", "-")
        raw = tb.etcdctl("get", f"{tb.prefix}/subnets/{key}", "--print-value-only").strip()
        want = {"PublicIP": node.ip, "PublicIPv6": None, "BackendType": "wireguard",
                "BackendData": {"PublicKey": d.public_key, "Port": PORT}}  # fmt: skip
        assert raw == json.dumps(want, separators=(",", ":"))
        expect_peers(cluster, node, [o for o in nodes if o is not node])
        # The key file: 0400, the device's key, never printed by /readyz, which names the implementation.
        kf = node.dir / "wgkey"
        assert kf.stat().st_mode & 0o777 == 0o400
        secret = kf.read_text().strip()
        status = readyz(node)
        assert status.startswith("ok\n") and f"wireguard implementation: {EXPECTED}" in status, status
        assert secret not in status and secret not in node.log_file.read_text()
        assert "wireguard-go" in status if EXPECTED == "userspace" else "wireguard-go" not in status


def _capture(ns: str, iface: str, pcap: Path) -> subprocess.Popen[str]:
    cap = subprocess.Popen(
        ["ip", "netns", "exec", ns, "tcpdump", "-i", iface, "-n", "-U", "-w", str(pcap)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert cap.stderr is not None
    assert "listening on" in cap.stderr.readline()
    return cap


def _stop(cap: subprocess.Popen[str]) -> None:
    time.sleep(0.5)  # the last replies in flight
    cap.terminate()
    try:
        cap.wait(timeout=10)
    except subprocess.TimeoutExpired:
        cap.kill()
        cap.wait(timeout=10)


@pytest.mark.kernel_vm
def test_underlay_carries_udp_51820_and_no_plaintext(cluster: Cluster) -> None:
    tb = cluster.tb
    n1, n2 = tb.nodes["n1"], tb.nodes["n2"]
    src, dst = n1.pods[0], n2.pods[0]
    under, inner = tb.scope.tmpdir / "underlay.pcap", tb.scope.tmpdir / "pod.pcap"
    # The pod's port on cni0 (in the node) sees the plaintext: the positive control that the pattern is findable.
    caps = [_capture(tb.ul_ns, n1.name, under), _capture(n1.ns, "vp1", inner)]
    try:
        p = subprocess.run(["ip", "netns", "exec", src.ns, "ping", "-c", "4", "-i", "0.3", "-W", "2", "-p", PATTERN,
                            "-s", "200", dst.ip], capture_output=True, text=True, timeout=60)  # fmt: skip
        assert p.returncode == 0, p.stdout + p.stderr
    finally:
        for c in caps:
            _stop(c)
    pattern = bytes.fromhex(PATTERN)
    assert pattern in inner.read_bytes()
    data = under.read_bytes()
    assert pattern not in data and pattern[:8] not in data
    pods = {bytes(map(int, a.split("."))) for a in (src.ip, dst.ip)}
    seen = 0
    for pkt in pcap_ipv4(under):
        ihl = (pkt[0] & 15) * 4
        s, d = pkt[12:16], pkt[16:20]
        assert s not in pods and d not in pods, "a pod address on the underlay"
        if {s, d} == {bytes(map(int, n1.ip.split("."))), bytes(map(int, n2.ip.split(".")))}:
            assert pkt[9] == 17, "node to node traffic that is not UDP"
            assert (int.from_bytes(pkt[ihl : ihl + 2], "big"), int.from_bytes(pkt[ihl + 2 : ihl + 4], "big")) == (
                PORT,
                PORT,
            )
            seen += 1
    # 4 requests and 4 replies went by, encrypted (a capture may miss its first packets while it attaches).
    assert seen >= 4, netns.run(["tcpdump", "-n", "-r", str(under)])


@pytest.mark.kernel_vm
def test_peer_removed_by_hand_is_restored(cluster: Cluster) -> None:
    tb = cluster.tb
    n1, n2 = tb.nodes["n1"], tb.nodes["n2"]
    key = lease_key(cluster, n2)
    restores = n1.log_file.read_text().count("peers; restored")
    wg_cmd(n1, "set", DEV, "peer", key, "remove")
    # The periodic check (every 5 s) may put it back before the next read (the VM is slow): then the agent has
    # logged the restore, which proves the removal happened and was repaired.
    gone = key not in (wg_dump(n1) or Dump("", 0, {})).peers
    assert gone or n1.log_file.read_text().count("peers; restored") > restores
    assert netns.wait_for(lambda: key in (wg_dump(n1) or Dump("", 0, {})).peers, timeout=60)
    expect_peers(cluster, n1, [tb.nodes["n2"], tb.nodes["n3"]])
    assert tb.wait_ping(n1.pods[0].ns, n2.pods[0].ip)


@pytest.mark.kernel_vm
def test_lost_device_is_rebuilt_with_every_peer(cluster: Cluster) -> None:
    """Userspace: wireguard-go killed (its TUN device goes with it); kernel: the device deleted."""
    tb = cluster.tb
    n1 = tb.nodes["n1"]
    pid = wg_go_pid(n1)
    if EXPECTED == "userspace":
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # a process of this test's namespace, by its pid
        assert netns.wait_for(lambda: (wg_go_pid(n1) or pid) != pid, timeout=30)
    else:
        assert pid is None
        netns.run(["ip", "-n", n1.ns, "link", "del", DEV])
    others = [tb.nodes["n2"], tb.nodes["n3"]]
    assert netns.wait_for(lambda: len((wg_dump(n1) or Dump("", 0, {})).peers) == 2, timeout=60)
    expect_peers(cluster, n1, others)
    assert f"inet {cluster.gw(n1)}/32" in ip(n1.ns, "addr", "show", "dev", DEV)
    assert ip(n1.ns, "route", "show", "dev", DEV).split() == [NETWORK, "scope", "link"]
    for o in others:
        assert tb.wait_ping(n1.pods[0].ns, o.pods[0].ip)
        assert tb.wait_ping(o.pods[0].ns, n1.pods[0].ip)


@pytest.mark.kernel_vm
def test_restart_keeps_the_key_and_loses_no_pings(cluster: Cluster) -> None:
    tb = cluster.tb
    n1, n2 = tb.nodes["n1"], tb.nodes["n2"]
    key_before, file_before = lease_key(cluster, n2), (n2.dir / "wgkey").read_bytes()
    pinger = subprocess.Popen(
        ["ip", "netns", "exec", n1.pods[0].ns, "ping", "-i", "0.1", "-W", "1", n2.pods[0].ip],
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
        pinger.send_signal(signal.SIGINT)  # ping prints its summary on SIGINT
        out, _ = pinger.communicate(timeout=20)
    m = re.search(r"(\d+) packets transmitted", out)
    assert m and int(m.group(1)) >= 20, out
    # Every request got its reply but perhaps the last, which SIGINT may have cut off in flight.
    replied = {int(x) for x in re.findall(r"icmp_seq=(\d+) ", out)}
    assert set(range(1, int(m.group(1)))) <= replied, out
    assert lease_key(cluster, n2) == key_before
    assert (n2.dir / "wgkey").read_bytes() == file_before
    expect_peers(cluster, tb.nodes["n1"], [n2, tb.nodes["n3"]])


@pytest.mark.kernel_vm
def test_malformed_peer_key_is_skipped_and_the_rest_keeps_working(cluster: Cluster) -> None:
    tb = cluster.tb
    n1 = tb.nodes["n1"]
    bad = {"PublicIP": "192.168.77.99", "PublicIPv6": None, "BackendType": "wireguard",
           "BackendData": {"PublicKey": "not-a-key", "Port": PORT}}  # fmt: skip
    key = f"{tb.prefix}/subnets/10.244.250.0-24"
    tb.etcdctl("put", key, json.dumps(bad))
    try:
        assert netns.wait_for(lambda: "10.244.250.0-24 has no valid PublicKey" in n1.log_file.read_text(), timeout=30)
        expect_peers(cluster, n1, [tb.nodes["n2"], tb.nodes["n3"]])
        assert all_pairs_ping(cluster) == []
    finally:
        tb.etcdctl("del", key)
    assert "Traceback" not in n1.log_file.read_text()


@pytest.mark.kernel_vm
def test_node_leaving_is_removed(cluster: Cluster) -> None:
    tb = cluster.tb
    n1 = tb.nodes["n1"]
    n4 = tb.add_node("n4")
    n4.extra_args = ("--reconcile-interval=300",)
    tb.start_agent(n4)
    env = tb.wait_ready(n4)
    cluster.env["n4"] = env
    key4 = lease_key(cluster, n4)
    assert netns.wait_for(lambda: key4 in (wg_dump(n1) or Dump("", 0, {})).peers, timeout=30)
    tb.stop_agent(n4)
    tb.etcdctl("del", f"{tb.prefix}/subnets/{cluster.subnet(n4).replace('/', '-')}")
    for node in (n1, tb.nodes["n2"], tb.nodes["n3"]):
        assert netns.wait_for(lambda node=node: key4 not in (wg_dump(node) or Dump("", 0, {})).peers, timeout=30)  # type: ignore[misc]
    del tb.nodes["n4"], cluster.env["n4"]
    tb.scope.remove_ns(n4.ns)
    expect_peers(cluster, n1, [tb.nodes["n2"], tb.nodes["n3"]])


@pytest.mark.kernel_vm
def test_lab_lists_peers_like_wg_show_without_secrets_and_traces_the_peer(cluster: Cluster) -> None:
    tb = cluster.tb
    n1, n2, n3 = tb.nodes["n1"], tb.nodes["n2"], tb.nodes["n3"]
    text = labwg.wg_show(n1.ns)
    assert "interface: flannel-wg" in text and f"public key: {lease_key(cluster, n1)}" in text
    assert "private key: (hidden)" in text and "listening port: 51820" in text
    for o in (n2, n3):
        assert f"peer: {lease_key(cluster, o)}" in text
        assert f"endpoint: {o.ip}:{PORT}" in text and f"allowed ips: {cluster.subnet(o)}" in text
    assert (n1.dir / "wgkey").read_text().strip() not in text
    assert ("wireguard-go" in labwg.implementation(n1.ns)) == (EXPECTED == "userspace")
    hops = labwg.trace_hops(n1.ns, n1.ip, n2.ns, n2.pods[0].ip, n1.pods[0].ip)
    assert f"peer {lease_key(cluster, n2)}" in hops[0][2] and f"endpoint {n2.ip}:{PORT}" in hops[0][2]
    assert f"peer {lease_key(cluster, n1)}" in hops[1][2] and cluster.subnet(n1) in hops[1][2]
    assert (
        labwg.redact("  preshared key: abc=\nprivate key: xyz=") == "  preshared key: (hidden)\nprivate key: (hidden)"
    )


def test_lab_up_show_and_trace_prove_the_encryption() -> None:
    """`flannel-lab up --backend wireguard` on this host: show lists the peers without keys, trace's underlay
    capture holds UDP 51820 and no pod address."""
    _need_wg()
    lab = _new_lab("wg")
    try:
        lab.ok("up", "--nodes", "2", "--backend", "wireguard", "--pods-per-node", "1", timeout=300)
        show = lab.ok("show", "n1")
        assert "WireGuard peers (private key hidden)" in show and "private key: (hidden)" in show
        assert re.search(r"peer: \S+=\n\s+endpoint: 192\.168\.77\.12:51820\n\s+allowed ips: 10\.244\.", show), show
        for n in ("n1", "n2"):
            key = (lab.state_dir / n / "wgkey").read_text().strip()
            assert key not in show
        trace = lab.ok("trace", "n1-p1", "n2-p1")
        assert "udp port 51820" in trace and "192.168.77.11.51820 > 192.168.77.12.51820" in trace, trace
        assert "encrypted: the underlay carries only UDP 51820" in trace, trace
        assert "WARNING" not in trace
    finally:
        lab.cli("down", timeout=60)
        for ns in lab.namespaces():
            netns.delete_ns(ns)


# ---- PSK: a cluster sharing one, and a node started while the config named another --------------------------------


def _psk() -> str:
    return netns.run(["wg", "genpsk"]).strip()


@pytest.fixture(scope="module")
def psk_cluster(require_kernel_module: Callable[..., None]) -> Iterator[tuple[Cluster, str]]:
    _need_wg()
    if IN_VM:
        require_kernel_module("wireguard")
    good, wrong = _psk(), _psk()
    scope = netns.RunScope(tag="wgpsk")
    try:
        tb = Testbed(scope)
        tb.start_etcd()
        cl = Cluster(tb, "wireguard")
        for name, psk in (("n1", good), ("n2", good), ("n3", wrong)):
            # Each agent reads the config once at start: n3 starts while it names the wrong PSK.
            tb.put_config({"Network": NETWORK, "Backend": {"Type": "wireguard", "PSK": psk}})
            node = tb.add_node(name)
            node.extra_args = ("--reconcile-interval=300",)
            tb.start_agent(node)
            cl.env[name] = tb.wait_ready(node)
            tb.add_pod(node, cl.env[name])
        tb.put_config({"Network": NETWORK, "Backend": {"Type": "wireguard", "PSK": good}})
        yield cl, good
    finally:
        scope.close()


@pytest.mark.kernel_vm
def test_psk_on_traffic_flows_and_a_wrong_psk_node_is_isolated(psk_cluster: tuple[Cluster, str]) -> None:
    cl, good = psk_cluster
    tb = cl.tb
    n1, n2, n3 = tb.nodes["n1"], tb.nodes["n2"], tb.nodes["n3"]
    expect_peers(cl, n1, [n2, n3], psk=True)
    assert tb.wait_ping(n1.pods[0].ns, n2.pods[0].ip) and tb.wait_ping(n2.pods[0].ns, n1.pods[0].ip)
    for a, b in ((n3, n1), (n3, n2), (n1, n3), (n2, n3)):
        assert not tb.ping(a.pods[0].ns, b.pods[0].ip, count=3, wait=1), f"{a.name} reached {b.name}"
    # The good pair still works after the failed handshakes, and no log carries a PSK.
    assert tb.wait_ping(n1.pods[0].ns, n2.pods[0].ip)
    for node in (n1, n2, n3):
        assert good not in node.log_file.read_text()


# ---- mixed: one node on kernel WireGuard, one on wireguard-go (the VM has both) -----------------------------------


@pytest.mark.vm_only
def test_kernel_and_wireguard_go_nodes_interoperate(
    scope: netns.RunScope, require_kernel_module: Callable[..., None]
) -> None:
    _need_wg()
    require_kernel_module("wireguard", "tun")  # wireguard-go's device is a TUN
    tb = Testbed(scope)
    tb.start_etcd()
    cl = Cluster(tb, "wireguard")
    for name, impl in (("n1", "kernel"), ("n2", "userspace")):
        tb.put_config({"Network": NETWORK, "Backend": {"Type": "wireguard", "Implementation": impl}})
        node = tb.add_node(name)
        node.extra_args = ("--reconcile-interval=300",)
        tb.start_agent(node)
        cl.env[name] = tb.wait_ready(node)
        tb.add_pod(node, cl.env[name])
    n1, n2 = tb.nodes["n1"], tb.nodes["n2"]
    assert "wireguard" in ip(n1.ns, "-d", "link", "show", DEV)
    assert "tun type tun" in ip(n2.ns, "-d", "link", "show", DEV)
    assert all_pairs_ping(cl) == []
    expect_peers(cl, n1, [n2])
    expect_peers(cl, n2, [n1])


# ---- bad input: a clear error, nothing built (host and VM) ---------------------------------------------------------


def _wg_node(scope: netns.RunScope, backend: dict[str, Any]) -> tuple[Testbed, Node]:
    _need_wg()
    tb = Testbed(scope)
    tb.start_etcd()
    tb.put_config({"Network": NETWORK, "Backend": {"Type": "wireguard", **backend}})
    return tb, tb.add_node("n1")


def _refused(tb: Testbed, node: Node, needle: str) -> str:
    """The agent exits 1 with `needle` in one clear line, having built nothing: no device, no lease, no
    subnet.env, no wireguard-go."""
    p = subprocess.run(
        ["ip", "netns", "exec", node.ns, *tb.agent_cmd(node)],
        capture_output=True, text=True, timeout=120, env={**os.environ, **_wg_env(node)},
    )  # fmt: skip
    out = p.stderr + p.stdout
    assert p.returncode == 1, out
    assert needle in out, out
    assert "Traceback" not in out
    assert DEV not in ip(node.ns, "link")
    assert wg_go_pid(node) is None
    assert not node.subnet_file.exists()
    assert tb.leases() == {}
    return out


@pytest.mark.kernel_vm
@pytest.mark.parametrize(
    "backend,needle",
    [
        ({"Mode": "both"}, 'Backend.Mode: "both" is not one of separate, auto, ipv4, ipv6'),
        ({"Implementation": "magic"}, "Backend.Implementation"),
        ({"ListenPort": 70000}, "Backend.ListenPort: 70000 is out of range"),
        ({"MTU": 140}, "MTU 140 leaves 60 after WireGuard's 80 bytes, below the minimum of 68"),
    ],
)
def test_bad_options_are_refused(scope: netns.RunScope, backend: dict[str, Any], needle: str) -> None:
    tb, node = _wg_node(scope, backend)
    _refused(tb, node, needle)
    assert not (node.dir / "wgkey").exists()


@pytest.mark.kernel_vm
def test_a_psk_that_is_not_a_key_is_refused_without_echo(scope: netns.RunScope) -> None:
    bad = "c2VjcmV0LXRoYXQtaXMtbm90LWEta2V5LWF0LWFsbA=="  # 44 characters of base64, but 31 bytes
    tb, node = _wg_node(scope, {"PSK": bad})
    out = _refused(tb, node, "Backend.PSK: not a WireGuard key")
    assert bad not in out and bad[:16] not in out


@pytest.mark.kernel_vm
@pytest.mark.parametrize("content", [b"garbage\n", b"", b"\xff" * 44, b"A" * 5000])
def test_malformed_key_file_is_refused_and_kept(scope: netns.RunScope, content: bytes) -> None:
    tb, node = _wg_node(scope, {})
    kf = node.dir / "wgkey"
    kf.write_bytes(content)
    kf.chmod(0o400)
    out = _refused(tb, node, f"{kf}")
    assert "key file" in out
    if content.strip():
        assert content.decode(errors="replace").strip()[:8] not in out.replace(str(kf), "")
    assert kf.read_bytes() == content  # never replaced


@pytest.mark.kernel_vm
def test_unreadable_key_file_is_refused(scope: netns.RunScope) -> None:
    tb, node = _wg_node(scope, {})
    (node.dir / "wgkey").mkdir()
    _refused(tb, node, "it is a directory")
