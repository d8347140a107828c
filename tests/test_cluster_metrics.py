"""/metrics and /status of real agents on real etcd (vxlan): each figure moves when its event happens, /status
shows what the kernel lost before the repair and agrees with the kernel after it, and the endpoints answer
under load and refuse malformed requests without stopping the agent.

The metrics are parsed by prometheus_client's own parser; the kernel is read with ip and bridge.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusters import build_cluster
from needs import need
from prometheus_client.parser import text_string_to_metric_families
from test_cluster import Cluster

from pyflannel.lab import netns
from pyflannel.lab.agentstatus import fetch, status
from pyflannel.lab.testbed import Node, Testbed
from pyflannel.subnetenv import SubnetEnv

pytestmark = [pytest.mark.integration]

# Real nodes take subnets of 10.0.0.0/16; the load test's fake peers live above it (10.12.0.0 - 10.15.255.0).
CONFIG = {"Network": "10.0.0.0/12", "SubnetMin": "10.0.1.0", "SubnetMax": "10.0.255.0", "Backend": {"Type": "vxlan"}}
HEALTH = ("--reconcile-interval=300", "--healthz-port=8471", "--healthz-ip=127.0.0.1")


class Bed:
    def __init__(self, tb: Testbed, hold: Path) -> None:
        self.tb = tb
        self.hold = hold  # n1's PYFLANNEL_TEST_HOLD_REPAIRS file
        self.env: dict[str, SubnetEnv] = {}

    def node(self, name: str) -> Node:
        return self.tb.nodes[name]

    def subnet(self, name: str) -> str:
        return str(self.env[name].subnet)


@pytest.fixture(scope="module")
def bed() -> Iterator[Bed]:
    need(tools=("ip", "bridge", "etcd", "etcdctl", "iptables", "iptables-restore"))
    scope = netns.RunScope(tag="cmet")
    try:
        tb = Testbed(scope)
        tb.start_etcd()
        tb.put_config(CONFIG)
        b = Bed(tb, scope.tmpdir / "n1.hold")
        for name in ("n1", "n2"):
            node = tb.add_node(name)
            # n1 also keeps masquerade rules, re-checked every second.
            node.extra_args = (*HEALTH, "--ip-masq", "--iptables-resync=1") if name == "n1" else HEALTH
            env = {"PYFLANNEL_TEST_HOLD_REPAIRS": str(b.hold)} if name == "n1" else {}
            tb.start_agent(node, env=env)
        for name in ("n1", "n2"):
            b.env[name] = tb.wait_ready(tb.nodes[name])
        yield b
    finally:
        scope.close()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(node: Node) -> Samples:
    code, text = fetch(node.ns, "/metrics")
    assert code == 200, text
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def ip(ns: str, *args: str) -> str:
    return netns.run(["ip", "-n", ns, *args], check=False)


def wait_metric(node: Node, name: str, above: float, timeout: float = 30, **labels: str) -> float:
    got = [0.0]

    def check() -> bool:
        got[0] = value(scrape(node), name, **labels)
        return got[0] > above

    netns.wait_for(check, timeout=timeout, step=0.5)
    return got[0]


def test_metrics_parse_and_describe_the_agent(bed: Bed) -> None:
    n1 = bed.node("n1")
    m = scrape(n1)
    build = [labels for (name, labels) in m if name == "flannel_build_info"]
    assert [dict(b) for b in build] == [{"version": "v0.1.0", "backend": "vxlan", "store": "etcd"}]
    assert value(m, "flannel_leases", backend="vxlan") == 2
    assert value(m, "flannel_peers_programmed") == 1
    assert value(m, "flannel_lease_operations_total", operation="acquire", outcome="ok") == 1
    expiry = value(m, "flannel_lease_expiry_timestamp_seconds")
    assert time.time() < expiry < time.time() + 24 * 3600 + 60
    assert value(m, "flannel_reconcile_passes_total", outcome="ok") >= 1
    assert value(m, "flannel_reconcile_duration_seconds_count") >= 1
    # The label values that exist before their first event are there at 0.
    for cause in ("compaction", "gone", "reconnect", "failover"):
        assert ("flannel_store_watch_restarts_total", frozenset({("cause", cause)})) in m


def test_startup_lines_name_version_store_backend_and_interface(bed: Bed) -> None:
    log = bed.node("n1").log_file.read_text()
    for line in (
        "flanneld version v0.1.0 (pyflannel)",
        "Created subnet manager: etcd",
        "Found network config - Backend type: vxlan",
        f"Using interface with name eth0 and address {bed.node('n1').ip}",
        f"Using {bed.node('n1').ip} as external address",
    ):
        assert line in log, line


def test_deleted_route_moves_the_route_repair_counter_by_one(bed: Bed) -> None:
    n1 = bed.node("n1")
    sn = bed.subnet("n2")
    before = scrape(n1)
    ip(n1.ns, "route", "del", sn)
    assert netns.wait_for(lambda: "flannel.1" in ip(n1.ns, "route", "show", sn), timeout=30), "not repaired"
    passes = before[("flannel_reconcile_passes_total", frozenset({("outcome", "ok")}))]
    wait_metric(n1, "flannel_reconcile_passes_total", passes, outcome="ok")
    after = scrape(n1)
    assert value(after, "flannel_kernel_repairs_total", kind="route") == (
        value(before, "flannel_kernel_repairs_total", kind="route") + 1
    )
    assert value(after, "flannel_kernel_repairs_total", kind="neighbour") == value(
        before, "flannel_kernel_repairs_total", kind="neighbour"
    )


def _kernel_lines(ns: str, sn: str, gw: str) -> set[str]:
    """The peer's entries as the kernel holds them, in /status's form."""
    out = set()
    for r in ip(ns, "route", "show", sn).splitlines():
        out.add("route " + r.strip())
    for n in ip(ns, "neigh", "show", "dev", "flannel.1", gw).splitlines():
        parts = n.split()
        if "lladdr" in parts and "PERMANENT" in parts:
            out.add(f"neigh {parts[0]} lladdr {parts[2]} dev flannel.1")
    for f in netns.run(["bridge", "-n", ns, "fdb", "show", "dev", "flannel.1"], check=False).splitlines():
        parts = f.split()
        if "dst" in parts and "permanent" in parts and parts[0] != "00:00:00:00:00:00":
            out.add(f"fdb {parts[0]} dst {parts[parts.index('dst') + 1]} dev flannel.1")
    return out


def test_status_shows_the_missing_entry_until_the_repair_then_agrees_with_the_kernel(bed: Bed) -> None:
    n1 = bed.node("n1")
    sn = bed.subnet("n2")
    gw = sn.split("/")[0]
    stray = "10.0.254.0/24"

    def peer() -> dict[str, object]:
        doc = status(n1.ns)
        return next(p for p in doc["peers"] if p["subnet"] == sn)

    assert peer()["missing"] == []
    route = f"route {sn} via {gw} dev flannel.1 onlink"
    assert route in peer()["present"]  # type: ignore[operator]
    bed.hold.write_text("held by the test\n")
    try:
        ip(n1.ns, "route", "del", sn)
        ip(n1.ns, "route", "add", stray, "via", "10.0.254.0", "dev", "flannel.1", "onlink")
        # Held: the agent saw the deletion but has not repaired it.
        assert netns.wait_for(lambda: route in peer()["missing"], timeout=20), status(n1.ns)  # type: ignore[operator]
        assert ip(n1.ns, "route", "show", sn).strip() == ""
        doc = status(n1.ns)
        p = next(p for p in doc["peers"] if p["subnet"] == sn)
        assert p["missing"] == [route]
        assert {x.split()[0] for x in p["present"]} == {"neigh", "fdb"}
        assert f"route {stray} via 10.0.254.0 dev flannel.1 onlink" in doc["unexpected"]
        assert doc["summary"]["missing"] == 1 and doc["summary"]["complete"] == 0
        assert netns.wait_for(lambda: "repairs held while" in n1.log_file.read_text(), timeout=20)
    finally:
        bed.hold.unlink()
    assert netns.wait_for(lambda: peer()["missing"] == [], timeout=30), status(n1.ns)
    doc = status(n1.ns)
    p = next(p for p in doc["peers"] if p["subnet"] == sn)
    assert set(p["present"]) == _kernel_lines(n1.ns, sn, gw)
    assert len(p["present"]) == 3
    assert doc["unexpected"] == []
    assert ip(n1.ns, "route", "show", stray).strip() == ""
    assert doc["lease"]["subnet"] == bed.subnet("n1") and doc["lease"]["public_ip"] == n1.ip
    assert "BackendData" not in json.dumps(doc) and "VtepMAC" not in json.dumps(doc)


def test_traffic_rule_resyncs_count_and_a_flushed_chain_is_one_restore(bed: Bed) -> None:
    n1 = bed.node("n1")
    before = scrape(n1)
    resyncs = value(before, "flannel_traffic_rule_resyncs_total", mode="iptables")
    wait_metric(n1, "flannel_traffic_rule_resyncs_total", resyncs, mode="iptables")
    restores = value(before, "flannel_traffic_rule_restores_total", mode="iptables", family="ipv4", outcome="ok")
    netns.run(["ip", "netns", "exec", n1.ns, "iptables", "-w", "-t", "nat", "-F", "FLANNEL-POSTRTG"])
    got = wait_metric(n1, "flannel_traffic_rule_restores_total", restores, mode="iptables", family="ipv4", outcome="ok")
    assert got == restores + 1
    rules = netns.run(["ip", "netns", "exec", n1.ns, "iptables", "-w", "-t", "nat", "-S", "FLANNEL-POSTRTG"])
    assert "MASQUERADE" in rules


def test_etcd_restart_moves_the_watch_restart_counter(bed: Bed) -> None:
    n1 = bed.node("n1")
    before = value(scrape(n1), "flannel_store_watch_restarts_total", cause="reconnect")
    errors = value(scrape(n1), "flannel_store_request_errors_total")
    bed.tb.stop_etcd()
    bed.tb.restart_etcd()
    wait_metric(n1, "flannel_store_watch_restarts_total", before, timeout=60, cause="reconnect")
    assert value(scrape(n1), "flannel_store_request_errors_total") >= errors


# In the node: 200 GETs of the four pages, half of them sent before the first of 1000 vxlan leases is written to
# etcd (through its JSON gateway) and half after the 500th, so every request is in flight while peers arrive.
# Prints how many got a 200, of how many, and what the others got.
_LOAD = """
import asyncio, base64, http.client, json, sys
host, port = sys.argv[1].split("//")[1].split(":")
conn = http.client.HTTPConnection(host, int(port), timeout=30)
def b64(s):
    return base64.b64encode(s.encode()).decode()
def put(first, last):
    for i in range(first, last):
        key = f"{sys.argv[2]}/subnets/10.{12 + i // 256}.{i % 256}.0-24"
        val = json.dumps({"PublicIP": f"192.168.{100 + i // 250}.{1 + i % 250}", "BackendType": "vxlan",
                          "BackendData": {"VNI": 1, "VtepMAC": f"0a:00:00:00:{i // 256:02x}:{i % 256:02x}"}})
        conn.request("POST", "/v3/kv/put", json.dumps({"key": b64(key), "value": b64(val)}))
        r = conn.getresponse()
        r.read()
        assert r.status == 200, r.status
async def one(path):
    r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", 8471), 60)
    w.write(f"GET {path} HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n".encode())
    await w.drain()
    data = await asyncio.wait_for(r.read(), 120)
    w.close()
    return data.split(b"\\r\\n", 1)[0]
async def main():
    paths = ["/metrics", "/status", "/healthz", "/readyz"] * 25
    first = [asyncio.create_task(one(p)) for p in paths]
    await asyncio.sleep(0)
    await asyncio.to_thread(put, 0, 500)
    second = [asyncio.create_task(one(p)) for p in paths]
    await asyncio.sleep(0)
    await asyncio.to_thread(put, 500, 1000)
    got = await asyncio.gather(*first, *second, return_exceptions=True)
    ok = sum(1 for g in got if g == b"HTTP/1.1 200 OK")
    print(ok, len(got), sorted({repr(g)[:80] for g in got if g != b"HTTP/1.1 200 OK"}))
asyncio.run(main())
"""


def test_endpoints_answer_200_requests_while_1000_peers_arrive(bed: Bed) -> None:
    n1 = bed.node("n1")
    tb = bed.tb
    samples = value(scrape(n1), "flannel_lease_event_to_kernel_seconds_count")
    try:
        out = netns.ns_exec(n1.ns, [sys.executable, "-c", _LOAD, tb.endpoints[0], tb.prefix], timeout=300)
        ok, total, _ = out.split(" ", 2)
        assert (int(ok), int(total)) == (200, 200), out
        assert netns.wait_for(lambda: value(scrape(n1), "flannel_peers_programmed") == 1001, timeout=120)
        after = scrape(n1)
        assert value(after, "flannel_leases", backend="vxlan") == 1002
        assert value(after, "flannel_lease_event_to_kernel_seconds_count") >= samples + 1000
        doc = status(n1.ns)
        assert doc["summary"]["peers"] == 1001 and doc["summary"]["complete"] == 1001, doc["summary"]
        assert len(ip(n1.ns, "route", "show", "dev", "flannel.1").splitlines()) >= 1001
    finally:
        tb.etcdctl("del", "--prefix", f"{tb.prefix}/subnets/10.1")
    assert netns.wait_for(lambda: value(scrape(n1), "flannel_peers_programmed") == 1, timeout=120)


_MALFORMED = """
import socket, sys
cases = [b"GARBAGE\\r\\n\\r\\n", b"GET\\r\\n\\r\\n", b"GET / HTTP/1.1 extra\\r\\n\\r\\n",
         b"GET metrics HTTP/1.1\\r\\n\\r\\n",
         b"GET /metrics HTTP/1.1\\r\\nno colon here\\r\\n\\r\\n", b"GET /" + b"a" * 20000 + b" HTTP/1.1\\r\\n\\r\\n",
         b"\\x00\\x01\\x02\\xff\\r\\n\\r\\n", b"GET /metrics HTTP/1.1\\r\\n" + b"X-A: b\\r\\n" * 200 + b"\\r\\n",
         b"GET /status SPDY/3\\r\\n\\r\\n", b"POST /metrics HTTP/1.1\\r\\nContent-Length: 3\\r\\n\\r\\nabc"]
for c in cases:
    s = socket.create_connection(("127.0.0.1", 8471), timeout=20)
    try:
        s.sendall(c)
    except OSError:
        pass
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    s.close()
    print(data.split(b"\\r\\n", 1)[0].decode("latin-1"))
"""


def test_malformed_requests_get_400_and_the_agent_goes_on(bed: Bed) -> None:
    n1 = bed.node("n1")
    lines = netns.ns_exec(n1.ns, [sys.executable, "-c", _MALFORMED], timeout=120).splitlines()
    assert lines == ["HTTP/1.1 400 Bad Request"] * 9 + ["HTTP/1.1 405 Method Not Allowed"]
    code, body = fetch(n1.ns, "/healthz")
    assert (code, body) == (200, "ok\n")
    assert n1.proc is not None and n1.proc.poll() is None
    assert fetch(n1.ns, "/nope")[0] == 404
    assert value(scrape(n1), "flannel_peers_programmed") >= 1


def test_sigterm_still_exits_cleanly(bed: Bed) -> None:
    # Last: the agent with its health server open stops as before.
    n2 = bed.node("n2")
    assert bed.tb.stop_agent(n2, signal.SIGTERM) == 0


@pytest.fixture(scope="module")
def udp_cluster() -> Iterator[Cluster]:
    yield from build_cluster("cmetudp", {"Type": "udp"}, nodes=("n1", "n2"), extra_args=HEALTH)


def test_udp_figures_and_status_read_the_data_path(udp_cluster: Cluster) -> None:
    tb = udp_cluster.tb
    n1, n2 = tb.nodes["n1"], tb.nodes["n2"]
    pods = tb.all_pods()
    assert tb.wait_ping(pods[0].ns, pods[1].ip)
    m = scrape(n1)
    assert value(m, "flannel_udp_packets_total", direction="tx") > 0
    assert value(m, "flannel_udp_packets_total", direction="rx") > 0
    assert ("flannel_udp_drops_total", frozenset({("reason", "no_peer")})) in m
    doc = status(n1.ns)
    (peer,) = doc["peers"]
    assert peer["present"] == [f"udp peer {udp_cluster.subnet(n2)} via {n2.ip}:8285"] and peer["missing"] == []
    assert doc["own"]["present"] == ["route 10.244.0.0/16 dev flannel0"]
