"""vxlan: the kernel's VXLAN device, programmed exactly as upstream flannel does.

Device `flannel.<VNI>` (IPv6 underlay: `flannel-v6.<VNI>`) with `local <iface addr> dev <external>`, learning
off, address `<own subnet network address>/32` (/128). Per peer lease, in upstream's order:
  neighbour  <peer subnet address> lladdr <VtepMAC> nud permanent dev flannel.<VNI>
  FDB        <VtepMAC> dst <peer PublicIP> self permanent dev flannel.<VNI>
  route      <peer subnet> via <peer subnet address> dev flannel.<VNI> onlink
With `DirectRouting`, a peer whose PublicIP is on a directly connected subnet of the external interface
gets `<peer subnet> via <PublicIP> dev <external>` instead and no VXLAN entries.

Beyond upstream: reconcile() sweeps entries of departed peers, and recreates the device (with the MAC we
advertised, so peers' FDB/neighbour entries for us stay valid) if it was deleted under us.

MTU: flannel.<VNI> is the external MTU - 50, flannel-v6.<VNI> - 70 (the outer IPv6 header is 20 bytes longer).
With both families the MTU handed to the pods (subnet.env's FLANNEL_MTU) is the smaller one, 1430 on a 1500
underlay, where upstream v0.20.2 writes the IPv4 device's 1450: the CNI bridge gives a pod one MTU for both
families and IPv6 packets are never fragmented on the way, so at 1450 a pod's full-size IPv6 packets would be
dropped at the node and depend on ICMPv6 Packet Too Big reaching the pod (a UDP sender or a filtered ICMPv6
loses them for good). The 20 bytes IPv4 gives up per full packet buy a path on which every packet fits.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Interface, IPv6Interface
from typing import Any

from ..config import NetConfig, ci_get
from ..lease import Lease
from ..netlink import (
    AF_INET,
    AF_INET6,
    NTF_SELF,
    NUD_PERMANENT,
    RT_TABLE_MAIN,
    RTN_UNICAST,
    RTPROT_KERNEL,
    Fdb,
    IPAddress,
    IPNetwork,
    KernelEvent,
    Link,
    Neigh,
    Netlink,
    NetlinkError,
    Op,
    Route,
    format_mac,
    parse_mac,
)
from .base import Backend, BackendAttrs, BackendError, ExternalInterface, KernelView, kernel_view
from .device import configure_device, delete_device, device_event_needs_repair
from .entries import Entry, OwnedEntries, apply_ops, describe, device_names
from .options import opt_bool, opt_int
from .route_network import L2Segment, diff_routes, in_network

log = logging.getLogger(__name__)

BACKEND_TYPE = "vxlan"
DEFAULT_VNI = 1
KERNEL_DEFAULT_PORT = 8472
# Outer Ethernet + IP + UDP + VXLAN headers; the kernel refuses a larger MTU than lower MTU minus these.
OVERHEAD_V4 = 50
OVERHEAD_V6 = 70
ZERO_MAC = "00:00:00:00:00:00"


def random_mac() -> str:
    b = bytearray(os.urandom(6))
    b[0] = (b[0] & 0xFE) | 0x02  # unicast, locally administered
    return format_mac(bytes(b))


def _vtep_mac(data: object) -> str | None:
    """The VtepMAC of a lease's BackendData, normalised, or None when the data is malformed."""
    if not isinstance(data, dict):
        return None
    mac = ci_get(data, "VtepMAC")
    if not isinstance(mac, str):
        return None
    try:
        raw = parse_mac(mac)
    except ValueError:
        return None
    if raw == b"\0" * 6 or raw[0] & 1:
        return None
    return format_mac(raw)


@dataclass
class _Dev:
    """One VXLAN device (one per address family) and what we want it to look like."""

    version: int
    name: str
    local: IPAddress
    mtu: int
    mac: str | None = None  # the MAC we advertise; kept across recreation
    index: int = 0
    addr: IPv4Interface | IPv6Interface | None = None
    network: IPNetwork | None = None
    # What we programmed on this device, by peer subnet; it answers the kernel's events about them.
    owned: OwnedEntries[IPNetwork] = field(default_factory=OwnedEntries)

    @property
    def family(self) -> int:
        return AF_INET if self.version == 4 else AF_INET6


class VxlanBackend(Backend):
    def __init__(self, cfg: NetConfig, ext: ExternalInterface, nl: Netlink) -> None:
        super().__init__(cfg, ext, nl)
        self.vni = opt_int(cfg, "VNI", DEFAULT_VNI, 0, 0xFFFFFF)
        self.port = opt_int(cfg, "Port", 0, 0, 0xFFFF)
        self.gbp = opt_bool(cfg, "GBP")
        self.learning = opt_bool(cfg, "Learning")
        self.direct_routing = opt_bool(cfg, "DirectRouting")
        mtu_opt = opt_int(cfg, "MTU", 0, 0, 65535)
        if mtu_opt and mtu_opt < 68:
            raise BackendError(f"Backend.MTU: {mtu_opt} is below the minimum of 68")
        self._own: Lease | None = None
        self._l2 = L2Segment(nl, ext)
        self._lock = asyncio.Lock()
        self.devs: dict[int, _Dev] = {}
        if cfg.enable_ipv4:
            local4 = ext.iface_addr or ext.public_ip
            if local4 is None:
                raise BackendError("vxlan: IPv4 is enabled but the external interface has no IPv4 address")
            self.devs[4] = _Dev(4, f"flannel.{self.vni}", local4, mtu_opt or ext.mtu - OVERHEAD_V4)
            self.devs[4].network = cfg.network
        if cfg.enable_ipv6:
            local6 = ext.iface_addr6 or ext.public_ipv6
            if local6 is None:
                raise BackendError("vxlan: IPv6 is enabled but the external interface has no IPv6 address")
            self.devs[6] = _Dev(6, f"flannel-v6.{self.vni}", local6, mtu_opt or ext.mtu - OVERHEAD_V6)
            self.devs[6].network = cfg.ipv6_network
        log.info(
            "VXLAN config: VNI=%d Port=%d GBP=%s Learning=%s DirectRouting=%s",
            self.vni,
            self.port,
            self.gbp,
            self.learning,
            self.direct_routing,
        )

    # ------------------------------------------------------------ device

    def _incompat(self, dev: _Dev, link: Link) -> str:
        if link.kind != "vxlan" or link.vxlan is None:
            return f"link type: {link.kind} vs vxlan"
        vx = link.vxlan
        if vx.vni != self.vni:
            return f"vni: {vx.vni} vs {self.vni}"
        if vx.link and vx.link != self.ext.index:
            return f"vtep (external) interface: {vx.link} vs {self.ext.index}"
        if vx.local is not None and vx.local != dev.local:
            return f"vtep (external) IP: {vx.local} vs {dev.local}"
        want_port = self.port or KERNEL_DEFAULT_PORT
        if vx.port and vx.port != want_port:
            return f"port: {vx.port} vs {want_port}"
        if vx.gbp != self.gbp:
            return f"gbp: {vx.gbp} vs {self.gbp}"
        if vx.learning != self.learning:
            return f"learning: {vx.learning} vs {self.learning}"
        return ""

    async def _create(self, dev: _Dev) -> Link:
        if dev.mac is None:
            dev.mac = random_mac()
        try:
            return await self.nl.create_vxlan(
                dev.name,
                vni=self.vni,
                local=dev.local,
                dev_index=self.ext.index,
                port=self.port,
                learning=self.learning,
                gbp=self.gbp,
                mtu=dev.mtu,
                mac=dev.mac,
            )
        except NetlinkError as e:
            raise BackendError(f"failed to create vxlan interface {dev.name}: {e}") from e

    async def _ensure_device(self, dev: _Dev) -> bool:
        """Make the device exist with our parameters; True when it was (re)created."""
        link = await self.nl.link_by_name(dev.name)
        created = False
        if link is not None:
            why = self._incompat(dev, link)
            if why:
                log.warning("%r already exists with incompatible configuration: %s; recreating device", dev.name, why)
                await delete_device(self.nl, link)
                link = None
            elif dev.mac is None:
                # Reuse across restarts: keeping the MAC keeps every peer's neighbour/FDB entry for us valid.
                log.info("reusing existing VXLAN device %s (%s)", dev.name, link.mac)
                dev.mac = link.mac
            elif link.mac != dev.mac:
                # Someone recreated it with another MAC; ours is what peers were told.
                log.warning("%s has MAC %s but we advertise %s; recreating", dev.name, link.mac, dev.mac)
                await delete_device(self.nl, link)
                link = None
        if link is None:
            if dev.index:
                log.warning("VXLAN device %s is gone; recreating it with MAC %s", dev.name, dev.mac)
            link = await self._create(dev)
            self.made_device(dev.name, link.index)
            created = True
        elif link.mtu != dev.mtu:
            try:
                await self.nl.set_mtu(link.index, dev.mtu)
            except NetlinkError as e:
                raise BackendError(f"failed to set MTU {dev.mtu} on {dev.name}: {e}") from e
        dev.index = link.index
        if dev.addr is not None:
            await configure_device(self.nl, link, dev.addr)
        return created

    def restore_backend_data(self, data: Any, v6_data: Any) -> None:
        """The VtepMACs we advertised last (the kube store keeps them in our Node's annotations) are the ones to
        create a device with: a node whose device vanished in a reboot comes back with the MAC peers know."""
        for v, d in ((4, data), (6, v6_data)):
            dev = self.devs.get(v)
            mac = _vtep_mac(d)
            if mac and dev is not None and dev.mac is None:
                dev.mac = mac

    # ------------------------------------------------------------ Backend API

    async def prepare(self) -> BackendAttrs:
        async with self._lock:
            for dev in self.devs.values():
                await self._ensure_device(dev)
            await self._l2.refresh()
        d4, d6 = self.devs.get(4), self.devs.get(6)
        data = {"VNI": self.vni, "VtepMAC": d4.mac} if d4 is not None and self.ext.public_ip is not None else None
        data6 = {"VNI": self.vni, "VtepMAC": d6.mac} if d6 is not None and self.ext.public_ipv6 is not None else None
        # With both families, pods must fit through the smaller of the two devices.
        mtu = min(d.mtu for d in self.devs.values())
        return BackendAttrs(backend_type=BACKEND_TYPE, backend_data=data, backend_v6_data=data6, mtu=mtu)

    async def start(self, own: Lease) -> None:
        async with self._lock:
            self._own = own
            for dev in self.devs.values():
                sn = own.subnet if dev.version == 4 else own.ipv6_subnet
                if sn is None:
                    raise BackendError(f"vxlan: our lease {own.key} has no IPv{dev.version} subnet")
                dev.addr = (
                    IPv4Interface((sn.network_address, 32))
                    if dev.version == 4
                    else IPv6Interface((sn.network_address, 128))
                )
                link = await self.nl.link_by_index(dev.index) if dev.index else None
                if link is None or link.name != dev.name:
                    await self._ensure_device(dev)
                else:
                    await configure_device(self.nl, link, dev.addr)

    def _own_subnets(self) -> set[IPNetwork]:
        own = self._own
        return {s for s in (own.subnet, own.ipv6_subnet) if s is not None} if own else set()

    def _entries(
        self, dev: _Dev, lease: Lease, warn: bool = True, own: set[IPNetwork] | None = None
    ) -> tuple[IPNetwork | None, list[Route | Neigh | Fdb]]:
        """The peer's subnet of dev's family and the kernel entries for it ([] when the lease is skipped).
        `own`: _own_subnets(), when the caller has it (a pass over thousands of peers)."""
        sn = lease.subnet if dev.version == 4 else lease.ipv6_subnet
        if sn is None or sn in (self._own_subnets() if own is None else own):
            return None, []
        if lease.attrs.backend_type != BACKEND_TYPE:
            if warn:
                log.warning("ignoring non-vxlan subnet %s: type=%s", sn, lease.attrs.backend_type or "(none)")
            return sn, []
        pub = lease.attrs.public_ip if dev.version == 4 else lease.attrs.public_ipv6
        data = lease.attrs.backend_data if dev.version == 4 else lease.attrs.backend_v6_data
        mac = _vtep_mac(data)
        if pub is None or mac is None:
            if warn:
                log.warning("ignoring vxlan subnet %s: malformed lease (PublicIP %s, BackendData %r)", sn, pub, data)
            return sn, []
        if self.direct_routing and self._l2.contains(pub):
            return sn, [Route(dst=sn, gateway=pub, oif=self.ext.index)]
        gw = sn.network_address
        return sn, [
            Neigh(ifindex=dev.index, dst=gw, lladdr=mac),
            Fdb(ifindex=dev.index, lladdr=mac, dst=pub),
            Route(dst=sn, gateway=gw, oif=dev.index, onlink=True),
        ]

    async def add_peers(self, leases: Sequence[Lease]) -> None:
        async with self._lock:
            ops: list[Op] = []
            for lease in leases:
                for dev in self.devs.values():
                    sn, new = self._entries(dev, lease)
                    if sn is None:
                        continue
                    ops += dev.owned.program(sn, new)
                    if new:
                        log.debug(
                            "vxlan: peer %s via %s",
                            sn,
                            lease.attrs.public_ip if dev.version == 4 else lease.attrs.public_ipv6,
                        )
            what = f"vxlan add {leases[0].key}" if len(leases) == 1 else f"vxlan add {len(leases)} peers"
            await apply_ops(self.nl, what, ops)

    async def remove_peer(self, lease: Lease) -> None:
        async with self._lock:
            ops: list[Op] = []
            for dev in self.devs.values():
                sn = lease.subnet if dev.version == 4 else lease.ipv6_subnet
                if sn is None or sn in self._own_subnets():
                    continue
                old = dev.owned.pop(sn)
                if old is None:
                    # Not programmed by this process (e.g. before a restart): delete what the lease implies.
                    _, old = self._entries(dev, lease, warn=False)
                ops += [Op.delete(o) for o in reversed(old)]
                log.info("vxlan: removing peer %s", sn)
            await apply_ops(self.nl, f"vxlan remove {lease.key}", ops)

    async def reconcile(self, peers: Sequence[Lease]) -> None:
        async with self._lock:
            await self._l2.refresh()
            for dev in self.devs.values():
                if await self._ensure_device(dev):
                    dev.owned.reset()
                await self._reconcile_dev(dev, peers)

    def _ours_route(self, dev: _Dev, r: Route, own: set[IPNetwork]) -> bool:
        """A route a reconcile pass of `dev` owns: kept when a lease wants it, swept otherwise."""
        if r.type != RTN_UNICAST or r.protocol == RTPROT_KERNEL or r.dst in own:
            return False
        if not in_network(r.dst, dev.network):
            return False
        # Direct routes via the external interface are ours only when DirectRouting could have made them.
        return r.oif == dev.index or (self.direct_routing and r.oif == self.ext.index and r.gateway is not None)

    def kernel_event_needs_repair(self, ev: KernelEvent) -> bool:
        obj = ev.obj
        if ev.kind == "resync":
            return True
        if isinstance(obj, Link):
            if any(device_event_needs_repair(ev, dev.name, dev.index) for dev in self.devs.values()):
                return True
            return self.direct_routing and obj.index == self.ext.index
        if isinstance(obj, Route):
            if obj.table != RT_TABLE_MAIN:
                return False
            dev = self.devs.get(obj.dst.version)
        elif isinstance(obj, Neigh):
            dev = self.devs.get(obj.dst.version)
            if dev is None or obj.ifindex != dev.index:
                return False
        elif isinstance(obj, Fdb):
            if not obj.flags & NTF_SELF or obj.lladdr == ZERO_MAC:
                return False
            dev = next((d for d in self.devs.values() if d.index == obj.ifindex), None)
        else:
            return False
        if dev is None:
            return False
        verdict = dev.owned.verdict(ev)
        if verdict is not None:
            return verdict
        if ev.action != "new":
            return False
        # Not ours: a repair only when a pass would sweep it (the same rules as the sweep below).
        if isinstance(obj, Route):
            return self._ours_route(dev, obj, self._own_subnets())
        if isinstance(obj, Neigh):
            return bool(obj.state & NUD_PERMANENT) and not obj.dst.is_multicast
        return bool(obj.state & NUD_PERMANENT)

    async def _reconcile_dev(self, dev: _Dev, peers: Sequence[Lease]) -> None:
        # One pass over the peers, and no hashing of addresses for lookups in empty sets: with 5000 peers this
        # is most of a cold start's own work before the kernel's (ipaddress hashes in Python).
        own = self._own_subnets()
        desired: dict[IPNetwork, list[Route | Neigh | Fdb]] = {}
        want_routes: list[Route] = []
        want_neigh: dict[IPAddress, Neigh] = {}
        want_fdb_objs: list[Fdb] = []
        for lease in peers:
            sn, entries = self._entries(dev, lease, own=own)
            if sn is None or not entries:
                continue
            desired[sn] = entries
            for o in entries:
                if isinstance(o, Route):
                    want_routes.append(o)
                elif isinstance(o, Neigh):
                    want_neigh[o.dst] = o
                else:
                    want_fdb_objs.append(o)

        state = await self.nl.snapshot(dev.family, neigh_ifindex=dev.index, fdb_ifindex=dev.index)
        want_fdb = {(o.lladdr, o.dst) for o in want_fdb_objs} if state.fdb else set()
        route_ops = diff_routes(state.routes, want_routes, lambda r: self._ours_route(dev, r, own))
        neigh_del: list[Op] = []
        neigh_add: list[Op] = []
        seen_neigh: set[object] = set()
        for n in state.neighbours:
            w = want_neigh.get(n.dst)
            if w is None:
                # Only static entries can be ours: the kernel itself adds NOARP entries for multicast
                # addresses (IPv6 MLD/RS on the device) and dynamic ones from traffic.
                if n.state & NUD_PERMANENT and not n.dst.is_multicast:
                    neigh_del.append(Op.delete(n))
            elif n.lladdr == w.lladdr and n.state & NUD_PERMANENT:
                seen_neigh.add(n.dst)
        neigh_add = [Op.replace(w) for d, w in want_neigh.items() if not seen_neigh or d not in seen_neigh]

        fdb_del: list[Op] = []
        seen_fdb: set[tuple[str, IPAddress | None]] = set()
        for f in state.fdb:
            if not f.flags & NTF_SELF or f.lladdr == ZERO_MAC:
                continue
            if (f.lladdr, f.dst) in want_fdb:
                seen_fdb.add((f.lladdr, f.dst))
            elif f.state & NUD_PERMANENT:
                fdb_del.append(Op.delete(Fdb(ifindex=dev.index, lladdr=f.lladdr, dst=f.dst)))
        fdb_add = [Op.replace(o) for o in want_fdb_objs if not seen_fdb or (o.lladdr, o.dst) not in seen_fdb]

        route_del = [op for op in route_ops if op.action == "delete"]
        route_add = [op for op in route_ops if op.action != "delete"]
        # Stale entries go first; then upstream's order per peer: neighbour and FDB before the route, so the
        # kernel never has to resolve the onlink gateway by ARP over the overlay.
        ops = route_del + neigh_del + fdb_del + neigh_add + fdb_add + route_add
        if ops:
            log.info(
                "vxlan reconcile %s: %d peers; removing %d routes, %d neighbours, %d fdb; adding %d/%d/%d",
                dev.name,
                len(desired),
                len(route_del),
                len(neigh_del),
                len(fdb_del),
                len(route_add),
                len(neigh_add),
                len(fdb_add),
            )
        try:
            await apply_ops(self.nl, f"vxlan reconcile {dev.name}", ops)
        finally:
            # After the write, off the way of the kernel's first entries; still before any notification of the
            # batch is judged (a bulk write holds the monitors, and this runs before the loop gets to them).
            dev.owned.reset(desired)

    async def inspect(self, peers: Sequence[Lease]) -> KernelView:
        want: dict[str, list[Entry]] = {lease.key: [] for lease in peers}
        held: list[Entry] = []
        async with self._lock:  # not between a batch's bookkeeping and its write
            own = self._own_subnets()
            for dev in self.devs.values():
                for lease in peers:
                    sn = lease.subnet if dev.version == 4 else lease.ipv6_subnet
                    if sn is not None:
                        want[lease.key] += dev.owned.get(sn) or []
                if not dev.index:
                    continue
                # What a pass of this device owns: the same rules as its sweep (_reconcile_dev).
                state = await self.nl.snapshot(dev.family, neigh_ifindex=dev.index, fdb_ifindex=dev.index)
                held += [r for r in state.routes if self._ours_route(dev, r, own)]
                held += [n for n in state.neighbours if n.state & NUD_PERMANENT and not n.dst.is_multicast]
                held += [
                    Fdb(ifindex=dev.index, lladdr=f.lladdr, dst=f.dst)
                    for f in state.fdb
                    if f.flags & NTF_SELF and f.lladdr != ZERO_MAC and f.state & NUD_PERMANENT
                ]
        names = await device_names(self.nl)
        return kernel_view(
            {k: [describe(o, names) for o in es] for k, es in want.items()}, (describe(o, names) for o in held)
        )

    async def close(self) -> None:
        # The data plane stays for the next start, unless this run never got a lease (Backend.remove_half_built).
        await self.remove_half_built(self._own)


BACKEND = VxlanBackend
