"""The agent's Prometheus metrics: one Metrics per agent, on a registry of its own, rendered for /metrics.

Every figure has the `flannel_` prefix (the README lists them). The stores, the traffic-rule manager and the
backends never import this module: they report through small observer protocols (store.base.StoreObserver,
traffic.base.RuleObserver, backend.base.RepairObserver) that Metrics implements, and backends describe their own
figures as backend.base.Figure values, turned into metric families here when scraped.

prometheus_client's package import loads its whole exposition side (http.server, wsgiref, email): about 25 ms
and 1.6 MB of resident memory on top of the agent's own imports (bench/bench_memory.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector

from .backend.base import Figure

# The classic text format: what generate_latest writes, and what every Prometheus server reads.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# From a single peer's batch on an idle node (milliseconds) to a cold start with thousands of peers (seconds).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PASS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# Label values every scrape shows from the start (at 0), so a rate() over a first event is defined.
WATCH_CAUSES = ("compaction", "gone", "reconnect", "failover")
REPAIR_KINDS = ("route", "neighbour", "fdb", "device", "blackhole", "resync")
LEASE_OUTCOMES = (("acquire", "ok"), ("acquire", "error"), ("renew", "ok"), ("renew", "error"), ("renew", "revoked"))


class _Figures(Collector):
    """The backend's figures of the scrape in progress, as metric families."""

    def __init__(self) -> None:
        self.current: Sequence[Figure] = ()

    def collect(self) -> Iterator[Metric]:
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for f in self.current:
            fam = families.get(f.name)
            if fam is None:
                cls = CounterMetricFamily if f.kind == "counter" else GaugeMetricFamily
                # A counter family's name is without _total; the library adds it to the sample.
                name = "flannel_" + (f.name.removesuffix("_total") if f.kind == "counter" else f.name)
                fam = families[f.name] = cls(name, f.doc, labels=[k for k, _ in f.labels])
            fam.add_metric([v for _, v in f.labels], f.value)
        yield from families.values()


class Metrics:
    """The metric set. Observer methods (kernel_repair, watch_restart, ...) are what the stores, the traffic
    manager and the backends call; the agent sets the rest directly."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = r = registry
        self.leases = Gauge("flannel_leases", "Leases the agent knows, its own included, by backend type",
                            ["backend"], registry=r)  # fmt: skip
        self.peers = Gauge("flannel_peers_programmed", "Peer leases whose kernel programming succeeded", registry=r)
        self.lease_expiry = Gauge(
            "flannel_lease_expiry_timestamp_seconds", "When this node's lease expires (unix time; 0: never)", registry=r
        )
        self.lease_operations = Counter(
            "flannel_lease_operations", "Lease acquire, renew and revoke calls, by outcome", ["operation", "outcome"],
            registry=r,
        )  # fmt: skip
        self.watch_restarts = Counter(
            "flannel_store_watch_restarts", "Store watches started again with a full re-list, by cause", ["cause"],
            registry=r,
        )  # fmt: skip
        self.store_errors = Counter("flannel_store_request_errors", "Store requests that failed", registry=r)
        self.event_latency = Histogram(
            "flannel_lease_event_to_kernel_seconds",
            "From a lease event's arrival to the kernel holding what it asks for (one sample per lease)",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.reconcile_passes = Counter(
            "flannel_reconcile_passes", "Full passes making the kernel match the leases, by outcome", ["outcome"],
            registry=r,
        )  # fmt: skip
        self.reconcile_duration = Histogram(
            "flannel_reconcile_duration_seconds", "How long a reconcile pass took", buckets=PASS_BUCKETS, registry=r
        )
        self.kernel_repairs = Counter(
            "flannel_kernel_repairs",
            "Kernel changes the agent repaired (entries of ours deleted or altered), by what changed",
            ["kind"], registry=r,
        )  # fmt: skip
        self.kernel_call_failures = Counter(
            "flannel_kernel_call_failures", "Kernel programming calls that failed, by call", ["call"], registry=r
        )
        self.rule_resyncs = Counter(
            "flannel_traffic_rule_resyncs", "Periodic checks of the masquerade/forward rules", ["mode"], registry=r
        )
        self.rule_restores = Counter(
            "flannel_traffic_rule_restores", "Rule sets found missing or altered and written again",
            ["mode", "family", "outcome"], registry=r,
        )  # fmt: skip
        self.build = Info("flannel_build", "The agent's version, backend type and store", registry=r)
        self._figures = _Figures()
        r.register(self._figures)
        for cause in WATCH_CAUSES:
            self.watch_restarts.labels(cause)
        for kind in REPAIR_KINDS:
            self.kernel_repairs.labels(kind)
        for op, outcome in LEASE_OUTCOMES:
            self.lease_operations.labels(op, outcome)
        for outcome in ("ok", "error"):
            self.reconcile_passes.labels(outcome)

    def render(self, figures: Sequence[Figure] = ()) -> bytes:
        """The text exposition of every metric, with `figures` (the backend's, read for this scrape)."""
        # No await between setting and rendering: concurrent scrapes each see their own figures.
        self._figures.current = figures
        try:
            return generate_latest(self.registry)
        finally:
            self._figures.current = ()

    # --- store.base.StoreObserver -------------------------------------------------------------------
    def watch_restart(self, cause: str) -> None:
        self.watch_restarts.labels(cause).inc()

    def store_error(self) -> None:
        self.store_errors.inc()

    def lease_operation(self, operation: str, outcome: str) -> None:
        self.lease_operations.labels(operation, outcome).inc()

    # --- traffic.base.RuleObserver ------------------------------------------------------------------
    def rules_resync(self, mode: str) -> None:
        self.rule_resyncs.labels(mode).inc()

    def rules_restore(self, mode: str, family: int, ok: bool) -> None:
        self.rule_restores.labels(mode, f"ipv{family}", "ok" if ok else "error").inc()

    # --- backend.base.RepairObserver ----------------------------------------------------------------
    def kernel_repair(self, kind: str, count: int = 1) -> None:
        self.kernel_repairs.labels(kind).inc(count)


__all__ = ["CONTENT_TYPE", "Metrics"]
