"""host-gw: every peer subnet is routed via the peer's public IP on the external interface.

This only works when all nodes share one L2 segment; a peer whose public IP is not on a directly
connected subnet of the external interface is skipped with a warning (the kernel would refuse the route).
The route helpers here are also what vxlan's DirectRouting uses.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from ipaddress import IPv4Network, IPv6Network

from ..config import NetConfig
from ..lease import Lease
from ..netlink import (
    AF_INET,
    AF_INET6,
    RT_TABLE_MAIN,
    IPAddress,
    IPNetwork,
    KernelEvent,
    Link,
    Netlink,
    NetlinkError,
    Op,
    Route,
    is_missing,
)
from .base import Backend, BackendAttrs, BackendError, ExternalInterface

log = logging.getLogger(__name__)

BACKEND_TYPE = "host-gw"


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


async def apply_ops(nl: Netlink, what: str, ops: Sequence[Op]) -> None:
    """One batch to the kernel; a BackendError naming `what` if any op failed."""
    exc = errors_to_exception(what, ops, await nl.apply(ops))
    if exc is not None:
        raise exc


def errors_to_exception(what: str, ops: Sequence[Op], errs: Sequence[NetlinkError | None]) -> BackendError | None:
    """Log every failed op (deletes of absent entries are fine) and summarise them in one BackendError."""
    bad = [
        (op, e)
        for op, e in zip(ops, errs, strict=True)
        if e is not None and not (op.action == "delete" and is_missing(e))
    ]
    for _op, e in bad[:20]:
        log.error("%s: %s", what, e)
    if not bad:
        return None
    return BackendError(f"{what}: {len(bad)} of {len(ops)} kernel requests failed; first: {bad[0][1]}")


class HostGwBackend(Backend):
    def __init__(self, cfg: NetConfig, ext: ExternalInterface, nl: Netlink) -> None:
        self.cfg = cfg
        self.ext = ext
        self.nl = nl
        self._own: Lease | None = None
        self._l2 = L2Segment(nl, ext)
        self._lock = asyncio.Lock()
        self._programmed: dict[IPNetwork, Route] = {}

    async def prepare(self) -> BackendAttrs:
        if self.cfg.enable_ipv4 and self.ext.public_ip is None:
            raise BackendError("host-gw: IPv4 is enabled but the external interface has no IPv4 address")
        if self.cfg.enable_ipv6 and self.ext.public_ipv6 is None:
            raise BackendError("host-gw: IPv6 is enabled but the external interface has no IPv6 address")
        return BackendAttrs(backend_type=BACKEND_TYPE, backend_data=None, backend_v6_data=None, mtu=self.ext.mtu)

    async def start(self, own: Lease) -> None:
        self._own = own
        await self._l2.refresh()

    def _own_subnets(self) -> set[IPNetwork]:
        own = self._own
        return {s for s in (own.subnet, own.ipv6_subnet) if s is not None} if own else set()

    def _routes_for(self, lease: Lease) -> list[Route]:
        own = self._own_subnets()
        if lease.attrs.backend_type != BACKEND_TYPE:
            if not (lease.subnet in own or lease.ipv6_subnet in own):
                log.warning("ignoring non-host-gw subnet %s: type=%s", lease.key, lease.attrs.backend_type or "(none)")
            return []
        pairs: list[tuple[IPv4Network | IPv6Network | None, IPAddress | None]] = []
        if self.cfg.enable_ipv4:
            pairs.append((lease.subnet, lease.attrs.public_ip))
        if self.cfg.enable_ipv6:
            pairs.append((lease.ipv6_subnet, lease.attrs.public_ipv6))
        out = []
        for sn, gw in pairs:
            if sn is None or sn in own:
                continue
            if gw is None:
                log.warning("host-gw: lease %s has no public IPv%d; skipping", lease.key, sn.version)
                continue
            if not self._l2.contains(gw):
                log.warning(
                    "host-gw: peer %s (public IP %s) is not on the L2 segment of %s; skipping "
                    "(host-gw needs all nodes on one segment)",
                    sn,
                    gw,
                    self.ext.name,
                )
                continue
            out.append(Route(dst=sn, gateway=gw, oif=self.ext.index))
        return out

    async def add_peers(self, leases: Sequence[Lease]) -> None:
        async with self._lock:
            routes = [r for lease in leases for r in self._routes_for(lease)]
            for r in routes:
                self._programmed[r.dst] = r
                log.debug("host-gw: route %s via %s dev %s", r.dst, r.gateway, self.ext.name)
            what = f"host-gw add {leases[0].key}" if len(leases) == 1 else f"host-gw add {len(leases)} peers"
            await apply_ops(self.nl, what, [Op.replace(r) for r in routes])

    async def remove_peer(self, lease: Lease) -> None:
        async with self._lock:
            ops = []
            pairs = ((lease.subnet, lease.attrs.public_ip), (lease.ipv6_subnet, lease.attrs.public_ipv6))
            for sn, gw in pairs:
                if sn is None or sn in self._own_subnets():
                    continue
                r = self._programmed.pop(sn, None)
                if r is None and gw is not None:
                    # Not programmed by this process (e.g. added before a restart): delete exactly what we
                    # would have added, never some other route to that subnet.
                    r = Route(dst=sn, gateway=gw, oif=self.ext.index)
                if r is not None:
                    ops.append(Op.delete(r))
            await apply_ops(self.nl, f"host-gw remove {lease.key}", ops)

    def _ours(self, family_net: IPNetwork | None) -> Callable[[Route], bool]:
        own = self._own_subnets()
        idx = self.ext.index

        def ours(r: Route) -> bool:
            return r.oif == idx and r.gateway is not None and in_network(r.dst, family_net) and r.dst not in own

        return ours

    def kernel_event_needs_repair(self, ev: KernelEvent) -> bool:
        obj = ev.obj
        if ev.kind == "resync":
            return True
        if isinstance(obj, Link):
            # Taking the external interface down flushes our routes without a route notification.
            return obj.index == self.ext.index
        if not isinstance(obj, Route) or obj.table != RT_TABLE_MAIN:
            return False
        have = self._programmed.get(obj.dst)
        if have is not None and route_key(have) == route_key(obj):
            # A "new" equal to what we programmed is our own write (or a no-op replace).
            return ev.action == "del" or have != obj
        if ev.action != "new":
            return False
        net: IPNetwork | None
        if obj.dst.version == 4:
            net = self.cfg.network if self.cfg.enable_ipv4 else None
        else:
            net = self.cfg.ipv6_network if self.cfg.enable_ipv6 else None
        return net is not None and self._ours(net)(obj)

    async def reconcile(self, peers: Sequence[Lease]) -> None:
        async with self._lock:
            await self._l2.refresh()
            desired: list[Route] = []
            for lease in peers:
                desired.extend(self._routes_for(lease))
            ops: list[Op] = []
            for enabled, net in (
                (self.cfg.enable_ipv4, self.cfg.network),
                (self.cfg.enable_ipv6, self.cfg.ipv6_network),
            ):
                if not enabled or net is None:
                    continue
                state = await self.nl.snapshot(family_of(net.version))
                ops += diff_routes(state.routes, [r for r in desired if r.dst.version == net.version], self._ours(net))
            self._programmed = {r.dst: r for r in desired}
            if ops:
                log.info("host-gw reconcile: %d route changes", len(ops))
            await apply_ops(self.nl, "host-gw reconcile", ops)

    async def close(self) -> None:
        pass
