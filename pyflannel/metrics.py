"""The agent's Prometheus metrics: one Metrics per agent, on a registry of its own, rendered for /metrics.

Every figure has the `flannel_` prefix (the README lists them). The stores, the traffic-rule manager and the
backends never import this module: they report through small observer protocols (store.base.StoreObserver,
traffic.base.RuleObserver, backend.base.RepairObserver) that Metrics implements, and backends describe their own
figures as backend.base.Figure values, turned into metric families here when scraped.

prometheus_client's package import loads its whole exposition side (http.server, wsgiref, email): about 25 ms
and 1.6 MB of resident memory on top of the agent's own imports (bench/bench_memory.py). So a Metrics made without
a registry imports it only when a metric is first touched: what the observer methods and build_info record until
then is kept (a bounded list) and replayed. An agent's start reaches no metric before its first sync's kernel
batch is in, so the import is off the path of a cold start.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from .backend.base import Figure

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
    from prometheus_client.core import Metric

# The classic text format: what generate_latest writes, and what every Prometheus server reads
# (prometheus_client's CONTENT_TYPE_PLAIN_0_0_4, which a test compares this with).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Calls recorded before the metrics are built; past this many they are built at once (a store that keeps failing
# before the first sync must not grow the list without end).
MAX_RECORDED = 256

# From a single peer's batch on an idle node (milliseconds) to a cold start with thousands of peers (seconds).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PASS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# Label values every scrape shows from the start (at 0), so a rate() over a first event is defined.
WATCH_CAUSES = ("compaction", "gone", "reconnect", "failover")
REPAIR_KINDS = ("route", "neighbour", "fdb", "device", "blackhole", "resync")
LEASE_OUTCOMES = (("acquire", "ok"), ("acquire", "error"), ("renew", "ok"), ("renew", "error"), ("renew", "revoked"))


class _Figures:
    """The backend's figures of the scrape in progress, as metric families (a collector: registries call
    collect())."""

    def __init__(self) -> None:
        self.current: Sequence[Figure] = ()

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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


class _Families:
    """The metric objects, on `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter, Gauge, Histogram, Info

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
        self.figures = _Figures()
        r.register(self.figures)  # a collector by its collect(), which is all a registry asks of one
        for cause in WATCH_CAUSES:
            self.watch_restarts.labels(cause)
        for kind in REPAIR_KINDS:
            self.kernel_repairs.labels(kind)
        for op, outcome in LEASE_OUTCOMES:
            self.lease_operations.labels(op, outcome)
        for outcome in ("ok", "error"):
            self.reconcile_passes.labels(outcome)


class Metrics:
    """The metric set. Observer methods (kernel_repair, watch_restart, ...) and build_info are what the stores,
    the traffic manager, the backends and the agent's start call; the agent sets the rest directly, through the
    properties (which build the metrics, on `registry` or on a registry of their own, when first read)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._registry = registry
        self._families: _Families | None = None
        self._recorded: list[Callable[[_Families], None]] = []
        if registry is not None:
            self._built()  # the caller has prometheus_client loaded already

    def _built(self) -> _Families:
        f = self._families
        if f is None:
            if self._registry is None:
                from prometheus_client import CollectorRegistry

                self._registry = CollectorRegistry()
            f = self._families = _Families(self._registry)
            recorded, self._recorded = self._recorded, []
            for call in recorded:
                call(f)
        return f

    def _record(self, call: Callable[[_Families], None]) -> None:
        """`call` now if the metrics are built, else once they are."""
        if self._families is not None:
            call(self._families)
            return
        self._recorded.append(call)
        if len(self._recorded) >= MAX_RECORDED:
            self._built()

    @property
    def registry(self) -> CollectorRegistry:
        return self._built().registry

    @property
    def leases(self) -> Gauge:
        return self._built().leases

    @property
    def peers(self) -> Gauge:
        return self._built().peers

    @property
    def lease_expiry(self) -> Gauge:
        return self._built().lease_expiry

    @property
    def lease_operations(self) -> Counter:
        return self._built().lease_operations

    @property
    def watch_restarts(self) -> Counter:
        return self._built().watch_restarts

    @property
    def store_errors(self) -> Counter:
        return self._built().store_errors

    @property
    def event_latency(self) -> Histogram:
        return self._built().event_latency

    @property
    def reconcile_passes(self) -> Counter:
        return self._built().reconcile_passes

    @property
    def reconcile_duration(self) -> Histogram:
        return self._built().reconcile_duration

    @property
    def kernel_repairs(self) -> Counter:
        return self._built().kernel_repairs

    @property
    def kernel_call_failures(self) -> Counter:
        return self._built().kernel_call_failures

    @property
    def rule_resyncs(self) -> Counter:
        return self._built().rule_resyncs

    @property
    def rule_restores(self) -> Counter:
        return self._built().rule_restores

    @property
    def build(self) -> Info:
        return self._built().build

    def build_info(self, version: str, backend: str, store: str) -> None:
        """flannel_build_info's labels (recorded: the agent sets them at its start)."""
        self._record(lambda f: f.build.info({"version": version, "backend": backend, "store": store}))

    def render(self, figures: Sequence[Figure] = ()) -> bytes:
        """The text exposition of every metric, with `figures` (the backend's, read for this scrape)."""
        from prometheus_client.exposition import generate_latest

        f = self._built()
        # No await between setting and rendering: concurrent scrapes each see their own figures.
        f.figures.current = figures
        try:
            return generate_latest(f.registry)
        finally:
            f.figures.current = ()

    # --- store.base.StoreObserver -------------------------------------------------------------------
    def watch_restart(self, cause: str) -> None:
        self._record(lambda f: f.watch_restarts.labels(cause).inc())

    def store_error(self) -> None:
        self._record(lambda f: f.store_errors.inc())

    def lease_operation(self, operation: str, outcome: str) -> None:
        self._record(lambda f: f.lease_operations.labels(operation, outcome).inc())

    # --- traffic.base.RuleObserver ------------------------------------------------------------------
    def rules_resync(self, mode: str) -> None:
        self._record(lambda f: f.rule_resyncs.labels(mode).inc())

    def rules_restore(self, mode: str, family: int, ok: bool) -> None:
        self._record(lambda f: f.rule_restores.labels(mode, f"ipv{family}", "ok" if ok else "error").inc())

    # --- backend.base.RepairObserver ----------------------------------------------------------------
    def kernel_repair(self, kind: str, count: int = 1) -> None:
        self._record(lambda f: f.kernel_repairs.labels(kind).inc(count))


__all__ = ["CONTENT_TYPE", "Metrics"]
