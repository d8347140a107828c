"""Backends whose peers are routes and nothing else (host-gw, ipip), as upstream's route_network.go serves them;
plus the route pieces vxlan's DirectRouting shares.

A RouteNetwork subclass says which route a peer's subnet gets (`route_to`) and which devices its routes leave
by (`route_oifs`); a backend with a tunnel device also ensures it (`ensure_device`, `configure`). Everything
else is here once: programming a batch of peers, removing one, the reconcile pass that adds what is missing and
sweeps routes of departed peers, and the kernel-event check that decides whether a pass is needed.
"""

from __future__ import annotations

import asyncio
import logging
from abc import abstractmethod
from collections.abc import Callable, Iterable, Sequence
from ipaddress import IPv4Network, IPv6Network
from typing import ClassVar

from ..config import NetConfig
from ..iface import ExternalInterface
from ..lease import Lease
from ..netlink import (
    AF_INET,
    AF_INET6,
    RT_TABLE_MAIN,
    RTN_UNICAST,
    RTPROT_KERNEL,
    IPAddress,
    IPNetwork,
    KernelEvent,
    Link,
    Netlink,
    Op,
    Route,
)
from .base import Backend, BackendAttrs, BackendError, KernelView, kernel_view
from .entries import OwnedEntries, apply_ops, describe, device_names

log = logging.getLogger(__name__)


def route_key(r: Route) -> tuple[IPNetwork, int, int]:
    """What the kernel matches on for NLM_F_REPLACE: a replace with this key overwrites the old route."""
    return (r.dst, r.table, r.priority)


def diff_routes(actual: Sequence[Route], desired: Iterable[Route], ours: Callable[[Route], bool]) -> list[Op]:
    """Ops that make `actual` hold `desired`, deleting routes for which ours() holds and no desired route
    has the same key. Deletes come first so a later replace of the same key is never undone."""
    want = {route_key(r): r for r in desired}
    present = set(actual)
    deletes = [Op.delete(r) for r in actual if ours(r) and route_key(r) not in want]
    replaces = [Op.replace(r) for r in want.values() if r not in present]
    return deletes + replaces


def in_network(dst: IPNetwork, network: IPNetwork | None) -> bool:
    """True for a strict subnet of `network` (the Network route itself, if any, is not a peer's)."""
    if network is None or dst.version != network.version:
        return False
    assert isinstance(dst, type(network))
    return dst.prefixlen > network.prefixlen and dst.subnet_of(network)  # type: ignore[arg-type]


def family_of(version: int) -> int:
    return AF_INET if version == 4 else AF_INET6


class L2Segment:
    """The directly connected subnets of the external interface: which public IPs we can route to as a
    next hop without an overlay."""

    def __init__(self, nl: Netlink, ext: ExternalInterface) -> None:
        self._nl = nl
        self._ext = ext
        self._nets: list[IPNetwork] = []

    async def refresh(self) -> None:
        addrs = await self._nl.addresses(self._ext.index)
        self._nets = [a.address.network for a in addrs if a.address.network.prefixlen < a.address.max_prefixlen]

    def contains(self, ip: IPAddress) -> bool:
        return any(ip in n for n in self._nets if n.version == ip.version)

    def direct_route(self, dst: IPNetwork, gw: IPAddress) -> Route | None:
        """`dst via gw dev <external>` when gw is on this segment (host-gw's route; DirectRouting's), else None."""
        return Route(dst=dst, gateway=gw, oif=self._ext.index) if self.contains(gw) else None


class RouteNetwork(Backend):
    """A backend that programs one route per peer subnet (see the module doc)."""

    backend_type: ClassVar[str]

    def __init__(self, cfg: NetConfig, ext: ExternalInterface, nl: Netlink) -> None:
        super().__init__(cfg, ext, nl)
        self._own: Lease | None = None
        self._l2 = L2Segment(nl, ext)
        self._lock = asyncio.Lock()
        self._owned: OwnedEntries[IPNetwork] = OwnedEntries()

    # ------------------------------------------------------------ what a subclass defines

    @abstractmethod
    def route_to(self, dst: IPNetwork, gw: IPAddress, warn: bool) -> Route | None:
        """The route to peer subnet `dst` whose node has public IP `gw`, or None to skip it (logged if warn)."""

    @abstractmethod
    def route_oifs(self) -> set[int]:
        """The interfaces our peer routes leave by: a pass sweeps peer-like routes there that no lease wants."""

    def mtu(self) -> int:
        return self.ext.mtu

    async def ensure_device(self) -> None:
        """Make the backend's device exist as it must be (recreated if it vanished); configured if started."""

    def device_event_needs_repair(self, ev: KernelEvent) -> bool:
        return False

    # ------------------------------------------------------------ the Backend API

    async def prepare(self) -> BackendAttrs:
        if self.cfg.enable_ipv4 and self.ext.public_ip is None:
            raise BackendError(f"{self.backend_type}: IPv4 is enabled but the external interface has no IPv4 address")
        if self.cfg.enable_ipv6 and self.ext.public_ipv6 is None:
            raise BackendError(f"{self.backend_type}: IPv6 is enabled but the external interface has no IPv6 address")
        async with self._lock:
            await self.ensure_device()
        return BackendAttrs(backend_type=self.backend_type, backend_data=None, backend_v6_data=None, mtu=self.mtu())

    async def start(self, own: Lease) -> None:
        async with self._lock:
            self._own = own
            await self.ensure_device()
            await self._l2.refresh()

    def own_subnets(self) -> set[IPNetwork]:
        own = self._own
        return {s for s in (own.subnet, own.ipv6_subnet) if s is not None} if own else set()

    def _pairs(self, lease: Lease) -> list[tuple[IPv4Network | IPv6Network | None, IPAddress | None]]:
        pairs: list[tuple[IPv4Network | IPv6Network | None, IPAddress | None]] = []
        if self.cfg.enable_ipv4:
            pairs.append((lease.subnet, lease.attrs.public_ip))
        if self.cfg.enable_ipv6:
            pairs.append((lease.ipv6_subnet, lease.attrs.public_ipv6))
        return pairs

    def _routes_for(self, lease: Lease, warn: bool = True) -> dict[IPNetwork, list[Route]]:
        """Each of the lease's subnets (of the enabled families, not ours) with its route ([] when skipped)."""
        own = self.own_subnets()
        subnets = {sn: pub for sn, pub in self._pairs(lease) if sn is not None and sn not in own}
        if not subnets:
            return {}
        if lease.attrs.backend_type != self.backend_type:
            if warn:
                log.warning(
                    "ignoring non-%s subnet %s: type=%s",
                    self.backend_type,
                    lease.key,
                    lease.attrs.backend_type or "(none)",
                )
            return {sn: [] for sn in subnets}
        out: dict[IPNetwork, list[Route]] = {}
        for sn, gw in subnets.items():
            if gw is None:
                if warn:
                    log.warning("%s: lease %s has no public IPv%d; skipping", self.backend_type, lease.key, sn.version)
                out[sn] = []
                continue
            r = self.route_to(sn, gw, warn)
            out[sn] = [r] if r is not None else []
        return out

    async def add_peers(self, leases: Sequence[Lease]) -> None:
        async with self._lock:
            ops: list[Op] = []
            for lease in leases:
                for sn, routes in self._routes_for(lease).items():
                    ops += self._owned.program(sn, routes)
                    for r in routes:
                        log.debug("%s: route %s via %s dev %d", self.backend_type, r.dst, r.gateway, r.oif)
            n = len(leases)
            what = f"{self.backend_type} add {leases[0].key}" if n == 1 else f"{self.backend_type} add {n} peers"
            await apply_ops(self.nl, what, ops)

    async def remove_peer(self, lease: Lease) -> None:
        async with self._lock:
            ops: list[Op] = []
            implied = None
            for sn, _gw in self._pairs(lease):
                if sn is None or sn in self.own_subnets():
                    continue
                old = self._owned.pop(sn)
                if old is None:
                    # Not programmed by this process (e.g. added before a restart): delete exactly what we would
                    # have added, never some other route to that subnet.
                    implied = implied if implied is not None else self._routes_for(lease, warn=False)
                    old = list(implied.get(sn, []))
                ops += [Op.delete(o) for o in old]
            await apply_ops(self.nl, f"{self.backend_type} remove {lease.key}", ops)

    def _network(self, version: int) -> IPNetwork | None:
        if version == 4:
            return self.cfg.network if self.cfg.enable_ipv4 else None
        return self.cfg.ipv6_network if self.cfg.enable_ipv6 else None

    def _sweepable(self, r: Route, oifs: set[int], own: set[IPNetwork]) -> bool:
        """A route a pass owns: kept when a lease wants it, swept otherwise."""
        return (
            r.type == RTN_UNICAST
            and r.protocol != RTPROT_KERNEL
            and r.gateway is not None
            and r.oif in oifs
            and r.dst not in own
            and in_network(r.dst, self._network(r.dst.version))
        )

    def kernel_event_needs_repair(self, ev: KernelEvent) -> bool:
        obj = ev.obj
        if ev.kind == "resync":
            return True
        if isinstance(obj, Link):
            # Taking the external interface down flushes the routes via it without a route notification.
            return obj.index == self.ext.index or self.device_event_needs_repair(ev)
        if not isinstance(obj, Route) or obj.table != RT_TABLE_MAIN:
            return False
        verdict = self._owned.verdict(ev)
        if verdict is not None:
            return verdict
        return ev.action == "new" and self._sweepable(obj, self.route_oifs(), self.own_subnets())

    async def reconcile(self, peers: Sequence[Lease]) -> None:
        async with self._lock:
            await self.ensure_device()
            await self._l2.refresh()
            desired: dict[IPNetwork, list[Route]] = {}
            for lease in peers:
                desired.update((sn, rs) for sn, rs in self._routes_for(lease).items() if rs)
            oifs, own = self.route_oifs(), self.own_subnets()
            ops: list[Op] = []
            for version in (4, 6):
                if self._network(version) is None:
                    continue
                state = await self.nl.snapshot(family_of(version))
                want = [r for rs in desired.values() for r in rs if r.dst.version == version]
                ops += diff_routes(state.routes, want, lambda r: self._sweepable(r, oifs, own))
            self._owned.reset(desired)
            if ops:
                log.info("%s reconcile: %d route changes", self.backend_type, len(ops))
            await apply_ops(self.nl, f"{self.backend_type} reconcile", ops)

    async def inspect(self, peers: Sequence[Lease]) -> KernelView:
        async with self._lock:  # not between a batch's bookkeeping and its write
            want = {
                lease.key: [r for sn, _ in self._pairs(lease) if sn is not None for r in self._owned.get(sn) or []]
                for lease in peers
            }
            oifs, own = self.route_oifs(), self.own_subnets()
            held: list[Route] = []
            for version in (4, 6):
                if self._network(version) is not None:
                    state = await self.nl.snapshot(family_of(version))
                    held += [r for r in state.routes if self._sweepable(r, oifs, own)]
        names = await device_names(self.nl)
        return kernel_view(
            {k: [describe(r, names) for r in rs] for k, rs in want.items()}, (describe(r, names) for r in held)
        )

    async def close(self) -> None:
        # The data plane stays: pods keep talking while the agent restarts, and the next start reuses it.
        pass


__all__ = ["L2Segment", "RouteNetwork", "diff_routes", "family_of", "in_network", "route_key"]
