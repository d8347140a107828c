"""flanneld: wires config, store, backend, traffic rules and subnet.env together and runs the loops.

Order at start (as upstream): network config -> external interface -> backend.prepare() (its attrs go into
the lease) -> acquire lease -> backend.start() -> blackhole route (--ip-blackhole-route) -> traffic rules ->
subnet.env (the node is now ready) -> follow every lease. The blackhole route is kept like a backend's
entries: re-applied by every reconcile pass and at once when the kernel announces its removal.
SIGTERM stops the loops but leaves the kernel as it is (blackhole route included), so pods keep talking while
the agent restarts; the restart reuses the same subnet (the lease carries our PublicIP) and re-applies the
same entries, which the backends do without removing anything that is still right.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import Any, NoReturn

from . import VERSION
from .backend.base import Backend, BackendError, Entries, ExternalInterface, KernelView, kernel_view
from .backend.entries import OwnedEntries, describe
from .backend.registry import backend_class
from .backoff import Backoff
from .cniserver import serve_cni
from .config import ConfigError, NetConfig, parse_ip
from .flags import Options
from .health import HealthServer
from .iface import IfaceError, IfaceRequest, external_interface, link_addrs
from .lease import EventType, Lease, LeaseAttrs, LeaseSnapshot, WatchUpdate
from .metrics import CONTENT_TYPE, Metrics
from .netlink import (
    AF_INET,
    AF_INET6,
    RTN_BLACKHOLE,
    KernelMonitor,
    Netlink,
    NetlinkError,
    Op,
    Route,
)
from .store.base import LeaseRevokedError, Store, StoreError, SubnetExhaustedError
from .store.options import EtcdOptions, KubeOptions
from .store.registry import create_store
from .subnetenv import SubnetEnv, read_subnet_env, write_subnet_env
from .traffic import TrafficManager, create_traffic_manager

log = logging.getLogger(__name__)

# How long each shutdown step may take before the agent gives up on it and exits anyway.
SHUTDOWN_STEP_TIMEOUT = 5.0

# Above the kernel's metric for connected routes (0 for IPv4, 256 for IPv6) and IPv6's default user metric.
BLACKHOLE_METRIC = 4096

# Failures that are the user's or the environment's, reported as one clear line rather than a traceback.
FATAL = (ConfigError, IfaceError, BackendError, StoreError, NetlinkError)

# A test and debug aid, never set in production: while the file it names exists, repair passes wait, so what
# the kernel lost can be seen in /status before the agent puts it back.
HOLD_REPAIRS_ENV = "PYFLANNEL_TEST_HOLD_REPAIRS"
HOLD_POLL = 0.2

# flannel_kernel_repairs_total's kind for the kernel event that called for a repair.
REPAIR_KIND = {"link": "device", "route": "route", "neigh": "neighbour", "fdb": "fdb", "resync": "resync"}


@dataclass
class AgentConfig:
    etcd: EtcdOptions
    subnet_file: str
    iface: IfaceRequest
    ip_masq: bool = False
    ip_masq_fully_random: bool = True
    iptables_resync: float = 5.0
    iptables_forward_rules: bool = True
    ip_blackhole_route: bool = False
    healthz_ip: str = "0.0.0.0"
    healthz_port: int = 0
    # The periodic full pass is only a backstop: kernel change notifications trigger repairs at once.
    reconcile_interval: float = 30.0
    # The CNI plugin's work is served here (pyflannel/cniserver.py); "" = not served.
    cni_socket: str = ""
    # HOLD_REPAIRS_ENV's file; "" = repairs never wait.
    hold_repairs_file: str = ""


def agent_config_from_options(opts: Options) -> AgentConfig:
    endpoints = [e.strip() for e in str(opts["etcd-endpoints"]).split(",") if e.strip()]
    return AgentConfig(
        etcd=EtcdOptions(
            endpoints=endpoints,
            prefix=opts["etcd-prefix"],
            keyfile=opts["etcd-keyfile"] or None,
            certfile=opts["etcd-certfile"] or None,
            cafile=opts["etcd-cafile"] or None,
            username=opts["etcd-username"] or None,
            password=opts["etcd-password"] or None,
            renew_margin=opts["subnet-lease-renew-margin"] * 60,
        ),
        subnet_file=opts["subnet-file"],
        iface=IfaceRequest(
            ifaces=tuple(opts["iface"]),
            iface_regexes=tuple(opts["iface-regex"]),
            can_reach=opts["iface-can-reach"],
            public_ip=opts["public-ip"],
            public_ipv6=opts["public-ipv6"],
        ),
        ip_masq=opts["ip-masq"],
        ip_masq_fully_random=not opts["ip-masq-fully-random-disable"],
        iptables_resync=opts["iptables-resync"],
        iptables_forward_rules=opts["iptables-forward-rules"],
        ip_blackhole_route=opts["ip-blackhole-route"],
        healthz_ip=opts["healthz-ip"],
        healthz_port=opts["healthz-port"],
        reconcile_interval=opts["reconcile-interval"],
        cni_socket=(
            os.path.join(os.path.dirname(opts["subnet-file"]), "cni.sock")
            if opts["cni-socket"] is None
            else opts["cni-socket"]
        ),
    )


def kube_options_from_cli(opts: Options, environ: Mapping[str, str]) -> KubeOptions:
    """The flags and environment upstream's kube subnet manager reads."""
    return KubeOptions(
        api_url=str(opts["kube-api-url"]),
        kubeconfig_file=str(opts["kubeconfig-file"]),
        annotation_prefix=str(opts["kube-annotation-prefix"]),
        node_name=environ.get("NODE_NAME", ""),
        pod_name=environ.get("POD_NAME", ""),
        pod_namespace=environ.get("POD_NAMESPACE", ""),
        net_config_path=str(opts["net-config-path"]),
        set_node_network_unavailable=bool(opts["set-node-network-unavailable"]),
        service_host=environ.get("KUBERNETES_SERVICE_HOST", ""),
        service_port=environ.get("KUBERNETES_SERVICE_PORT", ""),
    )


@dataclass
class Agent:
    cfg: AgentConfig
    store: Store
    netlink: Netlink
    own: Lease | None = None
    backend: Backend | None = None
    peers: dict[str, Lease] = field(default_factory=dict)
    synced: bool = False
    ready_reason: str = "starting"
    traffic: TrafficManager | None = None
    # Set when applying a lease event failed or the kernel lost one of our entries: the reconcile loop runs at
    # once instead of at its next tick.
    repair: asyncio.Event = field(default_factory=asyncio.Event)
    # The --ip-blackhole-route routes, which kernel events are matched against like a backend's entries.
    blackholes: OwnedEntries[str] = field(default_factory=OwnedEntries)
    # The agent's own registry: nothing is registered anywhere global.
    metrics: Metrics = field(default_factory=Metrics)
    # The /status being built, shared by the requests that arrive meanwhile (a burst of them costs one read of
    # the kernel).
    _status: asyncio.Task[bytes] | None = None

    def readiness(self) -> tuple[bool, str]:
        if self.ready_reason:
            return False, self.ready_reason
        if self.traffic is not None and not self.traffic.ready:
            return False, f"traffic rules: {self.traffic.last_error}"
        return True, self.backend.status() if self.backend is not None else ""

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT (exit 0, data plane kept) or a fatal error (exit 1, one clear line)."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        health: HealthServer | None = None
        if self.cfg.healthz_port:
            pages = {"/metrics": self._metrics_page, "/status": self._status_page}
            health = HealthServer(self.cfg.healthz_ip, self.cfg.healthz_port, self.readiness, pages)
            try:
                await health.start()
            except OSError as e:
                log.error("cannot serve health checks on %s:%d: %s", self.cfg.healthz_ip, self.cfg.healthz_port, e)
                return 1
        main = asyncio.create_task(self._main(), name="flanneld-main")
        stopper = asyncio.create_task(stop.wait(), name="flanneld-stop")
        try:
            done, _ = await asyncio.wait({main, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if main in done:
                return self._exit_code(main)
            log.info("Exiting cleanly: the kernel keeps this node's routes and rules for the next start")
            main.cancel()
            # Bounded: a stop request must end the process even if some call does not honour cancellation.
            await asyncio.wait({main}, timeout=SHUTDOWN_STEP_TIMEOUT)
            if not main.done():
                log.warning("shutdown: the loops did not stop within %.0fs; exiting anyway", SHUTDOWN_STEP_TIMEOUT)
            return 0
        finally:
            stopper.cancel()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self._close(health)

    async def _close(self, health: HealthServer | None) -> None:
        """Release sockets and channels (never the data plane), each step bounded in time."""
        steps: list[tuple[str, Coroutine[Any, Any, None]]] = []
        if self.backend is not None:
            steps.append(("backend", self.backend.close()))
        steps += [("store", self.store.close()), ("netlink", self.netlink.close())]
        if health is not None:
            steps.append(("health server", health.close()))
        for name, step in steps:
            try:
                await asyncio.wait_for(step, SHUTDOWN_STEP_TIMEOUT)
            except TimeoutError:
                log.warning("shutdown: closing the %s took over %.0fs; leaving it", name, SHUTDOWN_STEP_TIMEOUT)
            except Exception as e:
                log.warning("shutdown: closing the %s failed: %s", name, e)

    def _exit_code(self, main: asyncio.Task[None]) -> int:
        exc: BaseException | None = main.exception()
        # The loops run in a TaskGroup: report the failure that stopped them, not the group wrapping it.
        while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
            exc = exc.exceptions[0]
        if exc is None:
            return 0
        if isinstance(exc, LeaseRevokedError):
            log.error(
                "Lease has been revoked: %s. Shutting down flanneld so that it acquires a new one on restart", exc
            )
        elif isinstance(exc, SubnetExhaustedError):
            log.error("failed to acquire a lease: %s", exc)
        elif isinstance(exc, FATAL):
            log.error("%s", exc)
        else:
            log.error("internal error: %s: %s", type(exc).__name__, exc, exc_info=exc)
        return 1

    async def _main(self) -> None:
        log.info("Created subnet manager: %s", self.store.name or type(self.store).__name__)
        # Waits for <prefix>/config as long as it takes, as upstream does; SIGTERM ends the wait.
        net = await self.store.get_network_config()
        log.info("Found network config - Backend type: %s", net.backend.type)
        log.info("network config: %s", _describe(net))
        backend_cls = backend_class(net.backend.type)
        backend_cls.check_config(net)
        self.metrics.build_info(VERSION, net.backend.type.lower(), self.store.name)
        # A store may name our public address (kube: <p>/node-public-ip); it wins over --public-ip, as upstream.
        ip4, ip6 = await self.store.public_ip_overrides()
        if ip4 or ip6:
            self.cfg.iface = dataclasses.replace(
                self.cfg.iface,
                public_ip=str(ip4) if ip4 else self.cfg.iface.public_ip,
                public_ipv6=str(ip6) if ip6 else self.cfg.iface.public_ipv6,
            )
        ext = await self._external_interface(net)
        # Upstream's lines, then what they leave out.
        if ext.iface_addr is not None:
            log.info("Using interface with name %s and address %s", ext.name, ext.iface_addr)
        if ext.iface_addr6 is not None:
            log.info("Using interface with name %s and v6 address %s", ext.name, ext.iface_addr6)
        for pub in (ext.public_ip, ext.public_ipv6):
            if pub is not None:
                log.info("Using %s as external address", pub)
        log.info("interface %s: index %d, MTU %d", ext.name, ext.index, ext.mtu)
        backend = backend_cls(net, ext, self.netlink)
        backend.observer = self.metrics
        self.backend = backend
        await self.store.preflight(net)
        backend.restore_backend_data(*await self.store.previous_backend_data(net.backend.type))
        battrs = await backend.prepare()
        attrs = LeaseAttrs(
            public_ip=ext.public_ip,
            public_ipv6=ext.public_ipv6,
            backend_type=battrs.backend_type,
            backend_data=battrs.backend_data,
            backend_v6_data=battrs.backend_v6_data,
        )
        prev = read_subnet_env(self.cfg.subnet_file)
        own = await self._acquire(net, attrs, prev)
        self.own = own
        backend.lease_taken()
        self.metrics.lease_operation("acquire", "ok")
        log.info("acquired lease %s", _describe_lease(own))
        await backend.start(own)
        await self._ensure_blackholes()
        self.ready_reason = "waiting for the traffic rules"
        # Subscribed before the first snapshot's pass, so no change after that pass's reads goes unnoticed.
        monitor = await self.netlink.monitor()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._kernel_monitor_loop(monitor), name="kernel-monitor")
            # The peers' sync does not wait for the traffic rules: their iptables/nft runs are other processes
            # (the other core), and the first pass's kernel work happens in the netlink worker meanwhile.
            tg.create_task(self._watch_loop(), name="watch")
            tg.create_task(self._renew_loop(), name="renew")
            tg.create_task(self._reconcile_loop(), name="reconcile")
            tg.create_task(backend.run(), name="backend")
            await self._traffic_rules(net, own, prev)
            write_subnet_env(
                self.cfg.subnet_file,
                SubnetEnv(
                    networks=(net.network,) if net.network else (),
                    subnet=own.subnet,
                    ipv6_networks=(net.ipv6_network,) if net.ipv6_network else (),
                    ipv6_subnet=own.ipv6_subnet,
                    mtu=battrs.mtu,
                    ipmasq=self.cfg.ip_masq,
                ),
            )
            log.info("wrote %s", self.cfg.subnet_file)
            self.ready_reason = ""
            if self.traffic is not None:
                tg.create_task(self.traffic.run_resync(self.cfg.iptables_resync), name="traffic-resync")
            if self.cfg.cni_socket:  # after subnet.env: until then the plugin answers "try again later" anyway
                tg.create_task(serve_cni(self.cfg.cni_socket), name="cni-server")

    async def _external_interface(self, net: NetConfig) -> ExternalInterface:
        req = dataclasses.replace(self.cfg.iface, need_ipv4=net.enable_ipv4, need_ipv6=net.enable_ipv6)
        links = link_addrs(await self.netlink.links_with_addresses())
        default_index = await self.netlink.default_route_index(6 if not net.enable_ipv4 else 4)
        reach_index = None
        if req.can_reach:
            try:
                target: IPv4Address | IPv6Address = parse_ip(req.can_reach)
            except ValueError:
                raise IfaceError(f"--iface-can-reach {req.can_reach!r} is not an IP address") from None
            reach_index = await self.netlink.route_get_index(target)
        return external_interface(req, links, default_index, reach_index)

    async def _acquire(self, net: NetConfig, attrs: LeaseAttrs, prev: SubnetEnv | None) -> Lease:
        backoff = Backoff(1.0, 30.0)
        while True:
            try:
                return await self.store.acquire_lease(net, attrs, prev)
            except (SubnetExhaustedError, LeaseRevokedError):
                self.metrics.lease_operation("acquire", "error")
                raise
            except StoreError as e:
                self.metrics.lease_operation("acquire", "error")
                self.ready_reason = f"cannot acquire a lease: {e}"
                delay = backoff.next()
                log.warning("failed to acquire a lease, retrying in %.0fs: %s", delay, e)
                await asyncio.sleep(delay)

    async def _traffic_rules(self, net: NetConfig, own: Lease, prev: SubnetEnv | None) -> None:
        """ip-masq and forward rules. A failure leaves /readyz at 503 with the reason and is retried by the
        resync loop; it does not stop the agent (the overlay itself works without them)."""
        if not (self.cfg.ip_masq or self.cfg.iptables_forward_rules):
            return
        tm = create_traffic_manager(net.enable_nftables, observer=self.metrics)
        self.traffic = tm
        await tm.cleanup_other_mode()
        if self.cfg.ip_masq:
            await tm.setup_and_ensure_masq_rules(
                net.network, own.subnet, net.ipv6_network, own.ipv6_subnet, prev, self.cfg.ip_masq_fully_random
            )
        if self.cfg.iptables_forward_rules:
            await tm.setup_and_ensure_forward_rules(net.network, net.ipv6_network)

    def _blackholes(self) -> list[Route]:
        """--ip-blackhole-route: traffic to an unused address of our own subnet(s) is dropped here instead of
        following the default route out of the node. The route has a high metric: with metric 0 (as upstream
        adds it) it sorts before cni0's connected route of the same prefix and swallows the node's own pods'
        traffic; above it, it only takes over while cni0 is down or not yet addressed."""
        own = self.own
        if not self.cfg.ip_blackhole_route or own is None:
            return []
        return [
            Route(dst=sn, type=RTN_BLACKHOLE, priority=BLACKHOLE_METRIC)
            for sn in (own.subnet, own.ipv6_subnet)
            if sn is not None
        ]

    async def _ensure_blackholes(self) -> None:
        """Replace is idempotent and one request per family, so every pass just re-applies it. A failure is
        logged and retried by the reconcile loop; it never stops the agent."""
        routes = self._blackholes()
        self.blackholes.reset({"blackhole": routes})
        if not routes:
            return
        try:
            errs: list[NetlinkError | None] = list(await self.netlink.apply([Op.replace(r) for r in routes]))
        except NetlinkError as e:
            errs = [e]
        failed = [str(e) for e in errs if e is not None]
        if failed:
            log.warning("cannot program the blackhole route, will retry: %s", "; ".join(failed))
            self.metrics.kernel_call_failures.labels("blackhole").inc()
            self.repair.set()

    async def _watch_loop(self) -> None:
        assert self.backend is not None and self.own is not None
        async for update in self.store.watch_leases():
            await self._apply(update, time.monotonic())

    async def _apply(self, update: WatchUpdate, received: float | None = None) -> None:
        """`received`: when the update arrived (monotonic), the start of each lease's latency sample."""
        assert self.backend is not None and self.own is not None
        since = time.monotonic() if received is None else received
        own_key = self.own.key
        if isinstance(update, LeaseSnapshot):
            current = {lease.key: lease for lease in update.leases}
            if own_key not in current:
                raise LeaseRevokedError(f"our lease {own_key} is no longer in the store")
            current.pop(own_key)
            gone = [lease for key, lease in self.peers.items() if key not in current]
            for lease in gone:
                log.info("peer %s is gone (noticed on re-list)", _describe_lease(lease))
            added = [k for k in current if k not in self.peers]
            self.peers = current
            self.synced = True
            # One bulk pass programs every peer and sweeps entries of leases that no longer exist.
            if await self._reconcile():
                self._programmed(len(added), since)
            log.info("synced %d peer leases (%d new, %d gone)", len(current), len(added), len(gone))
            return
        # New and changed peers are collected and programmed in one kernel batch; a removal first flushes what
        # was collected so the kernel sees the store's order.
        pending: list[Lease] = []
        for ev in update:
            key = ev.lease.key
            if key == own_key:
                if ev.type is EventType.REMOVED:
                    raise LeaseRevokedError(f"our lease {own_key} was deleted from the store")
                continue
            old = self.peers.get(key)
            if ev.type is EventType.ADDED:
                self.peers[key] = ev.lease
                if old is not None and old.attrs == ev.lease.attrs:
                    continue  # a renewal: nothing in the kernel changes
                # Programming replaces what the subnet had (a restarted peer's new VtepMAC or IP) without
                # removing the route first, so traffic to that peer is not interrupted by the update.
                pending.append(ev.lease)
                log.info("%s peer %s", "updated" if old else "added", _describe_lease(ev.lease))
            elif old is not None:
                await self._program(pending, since)
                pending = []
                del self.peers[key]
                log.info("removed peer %s", _describe_lease(old))
                if await self._kernel_call(self.backend.remove_peer(old), f"removal of {key}", "remove"):
                    self._programmed(1, since)
        await self._program(pending, since)

    async def _program(self, leases: list[Lease], since: float) -> None:
        if leases:
            assert self.backend is not None
            what = leases[0].key if len(leases) == 1 else f"{len(leases)} peers"
            if await self._kernel_call(self.backend.add_peers(leases), f"programming of {what}", "add"):
                self._programmed(len(leases), since)

    def _programmed(self, leases: int, since: float) -> None:
        """`leases` lease events (arrived at `since`) are now in the kernel."""
        self.metrics.peers.set(len(self.peers))
        latency = time.monotonic() - since
        for _ in range(leases):
            self.metrics.event_latency.observe(latency)

    async def _kernel_call(self, call: Coroutine[Any, Any, None], what: str, kind: str) -> bool:
        """Whether the call succeeded; a failure is counted, logged and left to a repair pass."""
        try:
            await call
        except (BackendError, NetlinkError) as e:
            # The kernel refused (e.g. our device vanished): the reconcile pass rebuilds from self.peers.
            log.warning("%s failed, repairing: %s", what, e)
            self.metrics.kernel_call_failures.labels(kind).inc()
            self.repair.set()
            return False
        return True

    async def _renew_loop(self) -> None:
        margin = self.cfg.etcd.renew_margin
        while True:
            own = self.own
            assert own is not None
            if own.expiration is None:
                return  # a reservation or a store without TTLs: nothing to renew
            await asyncio.sleep(max(own.expiration - margin - time.time(), 1.0))
            backoff = Backoff(1.0, 30.0)
            while True:
                try:
                    self.own = await self.store.renew_lease(own)
                    self.metrics.lease_operation("renew", "ok")
                    log.info("renewed lease %s", self.own.key)
                    break
                except LeaseRevokedError:
                    self.metrics.lease_operation("renew", "revoked")
                    raise
                except StoreError as e:
                    self.metrics.lease_operation("renew", "error")
                    delay = backoff.next()
                    log.warning("failed to renew lease %s, retrying in %.0fs: %s", own.key, delay, e)
                    await asyncio.sleep(delay)

    async def _reconcile(self) -> bool:
        """One full pass; whether the backend's part succeeded."""
        assert self.backend is not None
        t0 = time.monotonic()
        await self._ensure_blackholes()
        try:
            await self.backend.reconcile(list(self.peers.values()))
        except (BackendError, NetlinkError) as e:
            log.warning("reconcile failed, will retry: %s", e)
            self.metrics.reconcile_passes.labels("error").inc()
            self.metrics.kernel_call_failures.labels("reconcile").inc()
            self.repair.set()
            return False
        finally:
            self.metrics.reconcile_duration.observe(time.monotonic() - t0)
        self.metrics.reconcile_passes.labels("ok").inc()
        self.metrics.peers.set(len(self.peers))
        return True

    async def _kernel_monitor_loop(self, monitor: KernelMonitor) -> None:
        backend = self.backend
        assert backend is not None
        try:
            async for ev in monitor:
                if self.repair.is_set():
                    continue  # a pass is already due; it reads the whole state anyway
                blackhole = self.blackholes.verdict(ev) is True
                if ev.kind == "resync" or blackhole or backend.kernel_event_needs_repair(ev):
                    log.info("kernel change needs a repair: %s %s %s", ev.action, ev.kind, ev.obj or "(events lost)")
                    self.metrics.kernel_repair("blackhole" if blackhole else REPAIR_KIND[ev.kind])
                    self.repair.set()
        finally:
            monitor.close()
        # The socket failed (already logged): the periodic pass is all that is left.
        log.warning("kernel change monitor stopped; repairs rely on the pass every %gs", self.cfg.reconcile_interval)

    async def _reconcile_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.repair.wait(), self.cfg.reconcile_interval)
            if self.repair.is_set():
                self.repair.clear()
                # A failure that repeats at once (device cannot be created) must not spin the loop.
                await asyncio.sleep(0.5)
            await self._hold_repairs()
            if self.synced:  # before the first snapshot we do not know the peers: sweeping would drop live routes
                await self._reconcile()
            else:
                await self._ensure_blackholes()

    async def _hold_repairs(self) -> None:
        """HOLD_REPAIRS_ENV: wait while its file exists (test and debug aid)."""
        path = self.cfg.hold_repairs_file
        if not path or not os.path.exists(path):
            return
        log.warning("repairs held while %s exists (%s)", path, HOLD_REPAIRS_ENV)
        while os.path.exists(path):
            await asyncio.sleep(HOLD_POLL)
        log.info("repairs no longer held")

    # --- /metrics and /status ------------------------------------------------------------------------

    async def _metrics_page(self) -> tuple[str, bytes]:
        m = self.metrics
        leases = [*self.peers.values(), *([self.own] if self.own is not None else [])]
        by_type: dict[str, int] = {}
        for lease in leases:
            t = lease.attrs.backend_type or "udp"  # upstream's udp leases carry no BackendType
            by_type[t] = by_type.get(t, 0) + 1
        m.leases.clear()
        for t, n in by_type.items():
            m.leases.labels(t).set(n)
        expiry = self.own.expiration if self.own is not None else None
        m.lease_expiry.set(expiry or 0)
        figures = await self.backend.figures() if self.backend is not None else []
        return CONTENT_TYPE, m.render(figures)

    async def _status_page(self) -> tuple[str, bytes]:
        task = self._status
        if task is None or task.done():
            task = self._status = asyncio.create_task(self._status_json(), name="status")
        # Shielded: a client that goes away must not cancel the answer the others wait for.
        return "application/json", await asyncio.shield(task)

    async def _status_json(self) -> bytes:
        """What the agent believes (its lease, the peers' leases) beside what the kernel holds for each."""
        peers = sorted(self.peers.values(), key=lambda lease: lease.key)
        error = ""
        view = KernelView(inspected=False)
        if self.backend is not None:
            try:
                view = await self.backend.inspect(peers)
            except (BackendError, NetlinkError) as e:
                error = str(e)
        own = view.own
        blackholes = await self._blackhole_view()
        own = Entries(own.present + blackholes.present, own.missing + blackholes.missing)
        ready, why = self.readiness()
        entries = [view.peers.get(p.key, Entries()) for p in peers]
        doc: dict[str, Any] = {
            "version": VERSION,
            "store": self.store.name,
            "backend": self.backend.cfg.backend.type if self.backend is not None else None,
            "ready": ready,
            "reason": "" if ready else why,
            "lease": _lease_json(self.own) if self.own is not None else None,
            "own": {"present": list(own.present), "missing": list(own.missing)},
            "peers": [
                {**_lease_json(p), "present": list(e.present), "missing": list(e.missing)}
                for p, e in zip(peers, entries, strict=True)
            ],
            "unexpected": list(view.unexpected),
            "kernel_inspected": view.inspected and not error,
            "summary": {
                "peers": len(peers),
                "complete": sum(1 for e in entries if not e.missing),
                "missing": sum(len(e.missing) for e in entries) + len(own.missing),
                "unexpected": len(view.unexpected),
            },
        }
        if error:
            doc["kernel_error"] = error
        return (json.dumps(doc, indent=1) + "\n").encode()

    async def _blackhole_view(self) -> Entries:
        routes = self._blackholes()
        if not routes:
            return Entries()
        held: set[Route] = set()
        for version in {r.dst.version for r in routes}:
            state = await self.netlink.snapshot(AF_INET if version == 4 else AF_INET6)
            held |= set(state.routes)
        names: dict[int, str] = {}
        return kernel_view({}, [], [describe(r, names) for r in routes], [describe(r, names) for r in held]).own


def _lease_json(lease: Lease) -> dict[str, Any]:
    """A lease as /status shows it: where it is and how it is reached (never its BackendData)."""
    a = lease.attrs
    return {
        "key": lease.key,
        "subnet": str(lease.subnet) if lease.subnet is not None else None,
        "ipv6_subnet": str(lease.ipv6_subnet) if lease.ipv6_subnet is not None else None,
        "public_ip": str(a.public_ip) if a.public_ip is not None else None,
        "public_ipv6": str(a.public_ipv6) if a.public_ipv6 is not None else None,
        "backend_type": a.backend_type,
        "expiration": lease.expiration,
    }


def _describe(net: NetConfig) -> str:
    parts = []
    if net.enable_ipv4:
        parts.append(f"Network {net.network} SubnetLen {net.subnet_len} range {net.subnet_min}-{net.subnet_max}")
    if net.enable_ipv6:
        parts.append(f"IPv6Network {net.ipv6_network} IPv6SubnetLen {net.ipv6_subnet_len}")
    parts.append(f"backend {net.backend.type}")
    return ", ".join(parts)


def _describe_lease(lease: Lease) -> str:
    subnets = " ".join(str(s) for s in (lease.subnet, lease.ipv6_subnet) if s is not None)
    return f"{subnets} (public IP {lease.attrs.public_ip}, backend {lease.attrs.backend_type or '-'})"


def run_daemon(opts: Options) -> NoReturn:
    cfg = dataclasses.replace(agent_config_from_options(opts), hold_repairs_file=os.environ.get(HOLD_REPAIRS_ENV, ""))
    log.info("flanneld version %s (pyflannel)", VERSION)

    async def _run() -> int:
        metrics = Metrics()
        try:
            netlink = Netlink()
            options = kube_options_from_cli(opts, os.environ) if opts["kube-subnet-mgr"] else cfg.etcd
            store = create_store(options, observer=metrics)
        except FATAL as e:
            log.error("%s", e)
            return 1
        return await Agent(cfg=cfg, store=store, netlink=netlink, metrics=metrics).run()

    try:
        code = asyncio.run(_run())
    except KeyboardInterrupt:
        code = 0
    # Leave without waiting for library threads (gRPC, a netlink worker stuck in a call): everything worth
    # keeping is in the kernel and the store, and a stop request must not hang the node's restart.
    logging.shutdown()
    sys.stdout.flush()
    os._exit(code)
