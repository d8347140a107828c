"""The metric set, the health server's request reading, and the store observers against real etcd and the
Kubernetes fake: each watch-restart cause and the request errors move when their event happens.

Metrics are read back through prometheus_client's own text parser, as a Prometheus server would read them.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from test_store_etcd import PREFIX, Ctl, Etcd, _next, _store, etcd  # noqa: F401 (etcd: the fixture)
from test_store_kube import Follower, kns, peer_annotations, run, store_for  # noqa: F401 (kns, run: fixtures)

from pyflannel.backend.base import Figure, kernel_view
from pyflannel.health import MAX_HEADERS, MAX_LINE, HealthServer, _BadRequest, _read_head
from pyflannel.lab.fakekube import FakeKube, KubeAdmin
from pyflannel.lease import LeaseSnapshot
from pyflannel.metrics import CONTENT_TYPE, Metrics

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(m: Metrics, figures: list[Figure] | None = None) -> tuple[Samples, dict[str, str]]:
    """Samples by (name, labels), and each family's type."""
    samples: Samples = {}
    types: dict[str, str] = {}
    for fam in text_string_to_metric_families(m.render(figures or []).decode()):
        types[fam.name] = fam.type
        for s in fam.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


# The README's table, which this keeps honest: every name and type it lists is what the agent serves.
DOCUMENTED = {
    "flannel_leases": "gauge",
    "flannel_peers_programmed": "gauge",
    "flannel_lease_expiry_timestamp_seconds": "gauge",
    "flannel_lease_operations": "counter",
    "flannel_store_watch_restarts": "counter",
    "flannel_store_request_errors": "counter",
    "flannel_lease_event_to_kernel_seconds": "histogram",
    "flannel_reconcile_passes": "counter",
    "flannel_reconcile_duration_seconds": "histogram",
    "flannel_kernel_repairs": "counter",
    "flannel_kernel_call_failures": "counter",
    "flannel_traffic_rule_resyncs": "counter",
    "flannel_traffic_rule_restores": "counter",
    "flannel_build_info": "gauge",  # an Info: one sample at 1 carrying the labels
}


def test_every_documented_metric_is_served_with_its_type() -> None:
    m = Metrics(CollectorRegistry())
    m.build.info({"version": "v0.1.0", "backend": "vxlan", "store": "etcd"})
    m.kernel_call_failures.labels("add").inc()
    m.rule_resyncs.labels("iptables").inc()
    m.rule_restores.labels("iptables", "ipv4", "ok").inc()
    m.leases.labels("vxlan").set(3)
    _, types = parse(m)
    for name, kind in DOCUMENTED.items():
        assert types.get(name) == kind, (name, types.get(name))
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for name in DOCUMENTED:
        assert f"`{name}" in readme, f"{name} is not in the README's metrics table"


def test_two_agents_never_share_a_metric() -> None:
    a, b = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    a.kernel_repair("route")
    assert value(parse(a)[0], "flannel_kernel_repairs_total", kind="route") == 1
    assert value(parse(b)[0], "flannel_kernel_repairs_total", kind="route") == 0


def test_observer_calls_move_their_counters() -> None:
    m = Metrics(CollectorRegistry())
    m.watch_restart("compaction")
    m.watch_restart("compaction")
    m.store_error()
    m.lease_operation("revoke", "ok")
    m.rules_resync("nftables")
    m.rules_restore("nftables", 6, False)
    m.kernel_repair("wireguard_peer", 3)
    s, _ = parse(m)
    assert value(s, "flannel_store_watch_restarts_total", cause="compaction") == 2
    assert value(s, "flannel_store_watch_restarts_total", cause="gone") == 0
    assert value(s, "flannel_store_request_errors_total") == 1
    assert value(s, "flannel_lease_operations_total", operation="revoke", outcome="ok") == 1
    assert value(s, "flannel_traffic_rule_resyncs_total", mode="nftables") == 1
    assert value(s, "flannel_traffic_rule_restores_total", mode="nftables", family="ipv6", outcome="error") == 1
    assert value(s, "flannel_kernel_repairs_total", kind="wireguard_peer") == 3


def test_metrics_without_a_registry_import_prometheus_client_only_when_read() -> None:
    # The agent's start records its calls; the library is loaded (and they are replayed) at the first read.
    code = """
import sys
from pyflannel.metrics import MAX_RECORDED, Metrics
m = Metrics()
m.build_info("v0.1.0", "vxlan", "etcd")
m.lease_operation("acquire", "ok")
m.rules_restore("iptables", 4, True)
m.kernel_repair("route", 2)
assert "prometheus_client" not in sys.modules
m.peers.set(7)
assert "prometheus_client" in sys.modules
text = m.render().decode()
for line in ('flannel_build_info{backend="vxlan",store="etcd",version="v0.1.0"} 1.0',
             'flannel_lease_operations_total{operation="acquire",outcome="ok"} 1.0',
             'flannel_traffic_rule_restores_total{family="ipv4",mode="iptables",outcome="ok"} 1.0',
             'flannel_kernel_repairs_total{kind="route"} 2.0', "flannel_peers_programmed 7.0"):
    assert line in text, line
# Recorded calls are bounded: past MAX_RECORDED the metrics are built.
m2 = Metrics()
for _ in range(MAX_RECORDED):
    m2.store_error()
assert m2._families is not None and not m2._recorded
assert b"flannel_store_request_errors_total " + str(float(MAX_RECORDED)).encode() in m2.render()
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_content_type_is_the_librarys() -> None:
    from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

    assert CONTENT_TYPE == CONTENT_TYPE_PLAIN_0_0_4


def test_backend_figures_become_families_for_that_scrape_only() -> None:
    m = Metrics(CollectorRegistry())
    figures = [
        Figure("udp_packets_total", "packets", "counter", 5, (("direction", "tx"),)),
        Figure("udp_packets_total", "packets", "counter", 7, (("direction", "rx"),)),
        Figure("wireguard_peers_with_handshake", "peers", "gauge", 2),
    ]
    s, types = parse(m, figures)
    assert types["flannel_udp_packets"] == "counter" and types["flannel_wireguard_peers_with_handshake"] == "gauge"
    assert value(s, "flannel_udp_packets_total", direction="tx") == 5
    assert value(s, "flannel_udp_packets_total", direction="rx") == 7
    assert value(s, "flannel_wireguard_peers_with_handshake") == 2
    assert "flannel_udp_packets" not in parse(m)[1]


def test_kernel_view_compares_lines() -> None:
    v = kernel_view({"a": ["route x", "neigh y"], "b": []}, ["route x", "route stray"], ["own r"], [])
    assert v.peers["a"].present == ("route x",) and v.peers["a"].missing == ("neigh y",)
    assert v.peers["b"].present == () and v.peers["b"].missing == ()
    assert v.unexpected == ("route stray",)
    assert v.own.missing == ("own r",)


# --- the request reader ------------------------------------------------------------------------------


def head(data: bytes) -> tuple[str, str]:
    async def go() -> tuple[str, str]:
        r = asyncio.StreamReader(limit=MAX_LINE)
        r.feed_data(data)
        r.feed_eof()
        return await _read_head(r)

    return asyncio.run(go())


def test_requests_are_read_as_method_and_path() -> None:
    assert head(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n") == ("GET", "/metrics")
    assert head(b"HEAD /status?pretty=1 HTTP/1.0\r\n\r\n") == ("HEAD", "/status")
    assert head(b"GET /healthz HTTP/1.1\n\n") == ("GET", "/healthz")
    # EOF right after the request line (a client that closes its side) is still a request.
    assert head(b"GET /readyz HTTP/1.1\r\n") == ("GET", "/readyz")


@pytest.mark.parametrize(
    "data",
    [
        b"GARBAGE\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET /x\r\n\r\n",  # HTTP/0.9
        b"GET / HTTP/1.1 x\r\n\r\n",
        b"GET metrics HTTP/1.1\r\n\r\n",
        b"GET http://h/metrics HTTP/1.1\r\n\r\n",
        b"GET / HTTP/2.0\r\n\r\n",
        b"G\x00T / HTTP/1.1\r\n\r\n",
        b"GET /\xff HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
        b"GET / HTTP/1.1\r\n folded: x\r\n\r\n",
        b"GET /" + b"a" * (MAX_LINE + 1) + b" HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: " + b"a" * (MAX_LINE + 1) + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * (MAX_HEADERS + 1) + b"\r\n",
    ],
)
def test_malformed_requests_are_bad_requests(data: bytes) -> None:
    with pytest.raises(_BadRequest):
        head(data)


def test_nothing_sent_is_no_request() -> None:
    with pytest.raises(ConnectionError):
        head(b"")


# --- the stores' observers ---------------------------------------------------------------------------


def test_etcd_compaction_and_a_closed_stream_move_the_watch_restart_counter(etcd: Etcd) -> None:  # noqa: F811
    async def body(c: Ctl) -> None:
        m = Metrics(CollectorRegistry())
        await c.put(f"{PREFIX}/subnets/10.5.1.0-24", '{"PublicIP":"192.0.2.1"}')
        store = _store(c.endpoint)
        store.observer = m
        it = store.watch_leases()
        try:
            assert isinstance(await _next(it), LeaseSnapshot)
            assert value(parse(m)[0], "flannel_store_watch_restarts_total", cause="compaction") == 0
            # The watcher is behind (it has not asked for more): changes, then their history is compacted.
            await c.put(f"{PREFIX}/subnets/10.5.2.0-24", '{"PublicIP":"192.0.2.2"}')
            await c.put("/unrelated", "x")
            await c.etcdctl("compact", str(await c.revision()))
            assert isinstance(await _next(it), LeaseSnapshot)
            s = parse(m)[0]
            assert value(s, "flannel_store_watch_restarts_total", cause="compaction") == 1
            assert value(s, "flannel_store_watch_restarts_total", cause="reconnect") == 0
            # etcd killed under the watch: a reconnect, and the failed re-lists are request errors.
            pending = asyncio.create_task(_next(it, timeout=90))
            await asyncio.sleep(0.5)
            await c.ask("kill")
            await asyncio.sleep(2)
            await c.ask("start")
            await pending
            s = parse(m)[0]
            assert value(s, "flannel_store_watch_restarts_total", cause="reconnect") >= 1
            assert value(s, "flannel_store_request_errors_total") >= 1
        finally:
            await it.aclose()
            await store.close()

    etcd.run(body, kill=etcd.kill, start=etcd.start)


def test_kube_410_and_a_dropped_watch_move_the_watch_restart_counter(run: Any) -> None:  # noqa: F811
    async def body(fk: FakeKube, kube: KubeAdmin, tmp: Path) -> None:
        m = Metrics(CollectorRegistry())
        kube.create_node("a", ["10.244.1.0/24"], peer_annotations("192.168.77.11"))
        st = store_for(fk, tmp)
        st.observer = m
        f = Follower(st)
        try:
            await f.until(lambda: f.snapshots == 1)
            await f.until(lambda: kube.stats().get("watch", 0) == 1)
            kube.expire()
            kube.create_node("c", ["10.244.3.0/24"], peer_annotations("192.168.77.13"))
            await f.until(lambda: f.snapshots == 2)
            s = parse(m)[0]
            assert value(s, "flannel_store_watch_restarts_total", cause="gone") == 1
            assert value(s, "flannel_store_watch_restarts_total", cause="reconnect") == 0
            await f.until(lambda: kube.stats().get("watch", 0) == 2)
            kube.fail("GET", "/api/v1/nodes", 503, count=2)
            kube.drop_watches()
            await f.until(lambda: f.snapshots == 3)
            s = parse(m)[0]
            assert value(s, "flannel_store_watch_restarts_total", cause="reconnect") == 1
            assert value(s, "flannel_store_request_errors_total") >= 2
        finally:
            await f.stop()
            await st.close()

    run(body)


class _Writer:
    """What the server's handler uses of a StreamWriter, collecting what it writes."""

    def __init__(self) -> None:
        self.data = b""
        self.closed = False

    def write(self, b: bytes) -> None:
        self.data += b

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    async def wait_closed(self) -> None:
        pass


def serve(server: HealthServer, request: bytes) -> bytes:
    async def go() -> bytes:
        r = asyncio.StreamReader(limit=MAX_LINE)
        r.feed_data(request)
        r.feed_eof()
        w = _Writer()
        await server._handle(r, w)  # type: ignore[arg-type]
        assert w.closed
        return w.data

    return asyncio.run(go())


def test_a_failing_page_is_a_500_and_the_others_still_answer() -> None:
    async def boom() -> tuple[str, bytes]:
        raise RuntimeError("a bug")

    async def fine() -> tuple[str, bytes]:
        return "application/json", b"{}"

    server = HealthServer("127.0.0.1", 0, lambda: (False, "waiting"), {"/boom": boom, "/ok": fine})
    assert serve(server, b"GET /boom HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 500 ")
    ok = serve(server, b"GET /ok HTTP/1.1\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n") and ok.endswith(
        b"\r\n\r\n{}"
    )
    head_only = serve(server, b"HEAD /ok HTTP/1.1\r\n\r\n")
    assert b"Content-Length: 2\r\n" in head_only and head_only.endswith(b"\r\n\r\n")
    assert serve(server, b"GET /readyz HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 503 ")
    assert serve(server, b"DELETE /ok HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405 ")
    assert serve(server, b"NOT HTTP\r\n\r\n").startswith(b"HTTP/1.1 400 ")
