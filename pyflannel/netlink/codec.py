"""The one module that talks to the kernel over netlink (rtnetlink).

Links and addresses go through pyroute2's IPRoute. Routes, neighbours and FDB entries, which a backend
programs by the thousand, go through a small hand-written codec on a raw NETLINK_ROUTE socket: requests are
packed with `struct`, many of them are sent in one sendmsg() without per-request acks (the kernel processes
a multi-message buffer in order and replies only on error; the last request of a chunk asks for an ack so
we know the chunk is done), and dumps are decoded by hand. pyroute2 spends ~0.3 ms per request in Python,
which is 5 s for 5000 peers; the raw path does the same in a few tens of milliseconds.

Threading: every socket belongs to one dedicated worker thread and every call hops onto it with
run_in_executor. pyroute2's sync IPRoute runs its own event loop, so it cannot live on the daemon's loop
thread; one thread also serialises requests, which keeps netlink sequence numbers trivially consistent.
`Netlink(netns="name")` opens the sockets inside that (existing) namespace without moving the process.
The one exception is the kernel-change monitor (Netlink.monitor()): its socket only receives notifications
and is read by the event loop, so neither side waits for the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import ipaddress
import logging
import socket
import struct
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network
from typing import TYPE_CHECKING, Any, Literal, TypeVar

if TYPE_CHECKING:
    from ..iface import LinkAddrs

log = logging.getLogger(__name__)

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network
IPInterface = IPv4Interface | IPv6Interface

AF_INET = socket.AF_INET
AF_INET6 = socket.AF_INET6
AF_BRIDGE = 7
NETLINK_ROUTE = 0

# nlmsghdr types and flags
NLMSG_ERROR = 2
NLMSG_DONE = 3
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_NEWROUTE = 24
RTM_DELROUTE = 25
RTM_GETROUTE = 26
RTM_NEWNEIGH = 28
RTM_DELNEIGH = 29
RTM_GETNEIGH = 30
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_APPEND = 0x800
NLM_F_CAPPED = 0x100  # in an error reply: the original request is not echoed
NLM_F_ACK_TLVS = 0x200  # in an error reply: extended ack attributes follow

SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
NLMSGERR_ATTR_MSG = 1
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33

# routes
RT_TABLE_UNSPEC = 0
RT_TABLE_MAIN = 254
RTPROT_KERNEL = 2
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_SCOPE_NOWHERE = 255
RTN_UNICAST = 1
RTN_BLACKHOLE = 6
RTNH_F_ONLINK = 4
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_PRIORITY = 6
RTA_MULTIPATH = 9
RTA_TABLE = 15
# IPv6 routes without an explicit metric get this one; we report it as 0 ("kernel default") so that a route
# read back compares equal to the one we asked for.
IP6_RT_PRIO_USER = 1024

# neighbours / fdb
NDA_DST = 1
NDA_LLADDR = 2
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
IFF_UP = 0x1

# multicast groups of the kernel-change monitor
RTNLGRP_LINK = 1
RTNLGRP_NEIGH = 3  # neighbours, and bridge/vxlan FDB entries (AF_BRIDGE)
RTNLGRP_IPV4_ROUTE = 7
RTNLGRP_IPV6_ROUTE = 11
MONITOR_GROUPS = (RTNLGRP_LINK, RTNLGRP_NEIGH, RTNLGRP_IPV4_ROUTE, RTNLGRP_IPV6_ROUTE)

# links (only what Link carries)
IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_LINKINFO = 18
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
IFLA_VXLAN_ID = 1
IFLA_VXLAN_LINK = 3
IFLA_VXLAN_LOCAL = 4
IFLA_VXLAN_LEARNING = 7
IFLA_VXLAN_PORT = 15
IFLA_VXLAN_LOCAL6 = 17
IFLA_VXLAN_GBP = 23

_HDR = struct.Struct("=IHHII")
_IFINFO = struct.Struct("=BxHiII")
_BE16 = struct.Struct("!H")
_RTMSG = struct.Struct("=BBBBBBBBI")
_NDMSG = struct.Struct("=BxxxiHBB")
_NLA = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_RTNH = struct.Struct("=HBBi")

# A sendmsg() may carry at most about sk_sndbuf bytes; stay well below the default.
_CHUNK_BYTES = 64 * 1024
_SOCK_BUF = 8 * 1024 * 1024
# Programming 5000 peers makes 15000 notifications of ~1 KiB kernel memory each; the monitor's queue must hold
# a burst that the event loop is slow to read, or every bulk write would end in an overrun and a full resync.
_MONITOR_BUF = 32 * 1024 * 1024
# Decoded events waiting for the consumer; beyond this we drop them and ask for a resync instead.
_MONITOR_MAX_PENDING = 100_000
_TIMEOUT = 30.0

T = TypeVar("T")


class NetlinkError(OSError):
    """A netlink request failed; `errno` is the kernel's error, the message says which request."""


def is_missing(err: BaseException | None) -> bool:
    """True for the errors a delete of an absent route/neighbour/FDB entry returns."""
    return isinstance(err, OSError) and err.errno in (errno.ENOENT, errno.ESRCH, errno.ENODEV)


def format_mac(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def parse_mac(mac: str) -> bytes:
    """Parse `aa:bb:cc:dd:ee:ff` (also `-` separated); raises ValueError."""
    parts = mac.replace("-", ":").split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"not a MAC address: {mac!r}")
    return bytes(int(p, 16) for p in parts)


def _family(a: IPAddress | IPNetwork) -> int:
    return AF_INET if a.version == 4 else AF_INET6


def _ip(family: int, raw: bytes) -> IPAddress:
    return IPv4Address(raw) if family == AF_INET else IPv6Address(raw)


@dataclass(frozen=True)
class VxlanInfo:
    vni: int
    local: IPAddress | None
    port: int
    learning: bool
    gbp: bool
    link: int | None


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    kind: str | None
    mtu: int
    mac: str | None
    up: bool  # administratively up (IFF_UP)
    vxlan: VxlanInfo | None = None


@dataclass(frozen=True)
class Address:
    index: int
    address: IPInterface
    scope: int = 0


@dataclass(frozen=True)
class Route:
    """A route: unicast (the default) or blackhole (`type=RTN_BLACKHOLE`, which has no gateway and no oif).
    Equality covers what we program; kernel bookkeeping fields are compare=False."""

    dst: IPNetwork
    gateway: IPAddress | None = None
    oif: int | None = None
    onlink: bool = False
    table: int = RT_TABLE_MAIN
    priority: int = 0
    protocol: int = field(default=RTPROT_BOOT, compare=False)
    scope: int = field(default=RT_SCOPE_UNIVERSE, compare=False)
    type: int = RTN_UNICAST


@dataclass(frozen=True)
class Neigh:
    ifindex: int
    dst: IPAddress
    lladdr: str | None
    state: int = field(default=NUD_PERMANENT, compare=False)


@dataclass(frozen=True)
class Fdb:
    """A `self` FDB entry of a vxlan device: frames for `lladdr` are sent to `dst`."""

    ifindex: int
    lladdr: str
    dst: IPAddress | None
    state: int = field(default=NUD_PERMANENT, compare=False)
    flags: int = field(default=NTF_SELF, compare=False)


@dataclass(frozen=True)
class Op:
    """One route/neighbour/FDB request for Netlink.apply(). `append` is for FDB only (`bridge fdb append`)."""

    action: Literal["replace", "delete", "append"]
    obj: Route | Neigh | Fdb

    @classmethod
    def replace(cls, obj: Route | Neigh | Fdb) -> Op:
        return cls("replace", obj)

    @classmethod
    def delete(cls, obj: Route | Neigh | Fdb) -> Op:
        return cls("delete", obj)


@dataclass(frozen=True)
class DeviceState:
    """One read of the tables a backend owns entries in (see Netlink.snapshot())."""

    routes: list[Route]
    neighbours: list[Neigh]
    fdb: list[Fdb]


@dataclass(frozen=True)
class DefaultRouteInfo:
    link: Link
    gateway: IPAddress | None
    addresses: list[Address]


# ---------------------------------------------------------------- codec


def _nla(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return _NLA.pack(n, kind) + payload + b"\0" * (-n & 3)


def _iter_nla(buf: bytes | memoryview, off: int, end: int) -> Iterator[tuple[int, int, int]]:
    """Yield (type, start, stop) of each attribute in buf[off:end]."""
    while off + 4 <= end:
        n, kind = _NLA.unpack_from(buf, off)
        if n < 4:
            return
        yield kind & 0x3FFF, off + 4, off + n
        off += (n + 3) & ~3


def _msg(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    return _HDR.pack(16 + len(body), kind, flags, seq, 0) + body


def encode_op(op: Op, seq: int, ack: bool) -> bytes:
    o = op.obj
    base = NLM_F_REQUEST | (NLM_F_ACK if ack else 0)
    if isinstance(o, Route):
        fam = _family(o.dst)
        blackhole = o.type == RTN_BLACKHOLE
        attrs = [_nla(RTA_TABLE, _U32.pack(o.table))]
        if o.dst.prefixlen:
            attrs.append(_nla(RTA_DST, o.dst.network_address.packed))
        # A blackhole has no next hop; the kernel rejects one (and an IPv6 one read back names `lo`).
        if o.gateway is not None and not blackhole:
            attrs.append(_nla(RTA_GATEWAY, o.gateway.packed))
        if o.oif is not None and not blackhole:
            attrs.append(_nla(RTA_OIF, _U32.pack(o.oif)))
        if o.priority:
            attrs.append(_nla(RTA_PRIORITY, _U32.pack(o.priority)))
        table = o.table if o.table < 256 else RT_TABLE_UNSPEC
        if op.action == "delete":
            # Type 0 deletes whatever route has the key; a blackhole delete names its type so that it cannot
            # take a unicast route of the same prefix with it.
            rtm = _RTMSG.pack(
                fam, o.dst.prefixlen, 0, 0, table, 0, RT_SCOPE_NOWHERE, RTN_BLACKHOLE if blackhole else 0, 0
            )
            return _msg(RTM_DELROUTE, base, seq, rtm + b"".join(attrs))
        if blackhole:
            rtm = _RTMSG.pack(fam, o.dst.prefixlen, 0, 0, table, o.protocol, RT_SCOPE_UNIVERSE, RTN_BLACKHOLE, 0)
            return _msg(RTM_NEWROUTE, base | NLM_F_CREATE | NLM_F_REPLACE, seq, rtm + b"".join(attrs))
        scope = RT_SCOPE_UNIVERSE if o.gateway is not None else RT_SCOPE_LINK
        flags = RTNH_F_ONLINK if o.onlink else 0
        rtm = _RTMSG.pack(fam, o.dst.prefixlen, 0, 0, table, o.protocol, scope, RTN_UNICAST, flags)
        return _msg(RTM_NEWROUTE, base | NLM_F_CREATE | NLM_F_REPLACE, seq, rtm + b"".join(attrs))
    if isinstance(o, Neigh):
        fam = _family(o.dst)
        attrs = [_nla(NDA_DST, o.dst.packed)]
        if op.action == "delete":
            return _msg(RTM_DELNEIGH, base, seq, _NDMSG.pack(fam, o.ifindex, 0, 0, 0) + b"".join(attrs))
        if o.lladdr is not None:
            attrs.append(_nla(NDA_LLADDR, parse_mac(o.lladdr)))
        ndm = _NDMSG.pack(fam, o.ifindex, o.state, 0, RTN_UNICAST)
        return _msg(RTM_NEWNEIGH, base | NLM_F_CREATE | NLM_F_REPLACE, seq, ndm + b"".join(attrs))
    attrs = [_nla(NDA_LLADDR, parse_mac(o.lladdr))]
    if o.dst is not None:
        attrs.append(_nla(NDA_DST, o.dst.packed))
    if op.action == "delete":
        return _msg(RTM_DELNEIGH, base, seq, _NDMSG.pack(AF_BRIDGE, o.ifindex, 0, o.flags, 0) + b"".join(attrs))
    mode = NLM_F_APPEND if op.action == "append" else NLM_F_REPLACE
    ndm = _NDMSG.pack(AF_BRIDGE, o.ifindex, o.state, o.flags, 0)
    return _msg(RTM_NEWNEIGH, base | NLM_F_CREATE | mode, seq, ndm + b"".join(attrs))


def decode_route(buf: bytes | memoryview, off: int, end: int) -> Route | None:
    fam, dst_len, _src_len, _tos, table, proto, scope, rtype, flags = _RTMSG.unpack_from(buf, off)
    if fam not in (AF_INET, AF_INET6):
        return None
    dst_raw = gw_raw = b""
    oif: int | None = None
    prio = 0
    for kind, a, b in _iter_nla(buf, off + _RTMSG.size, end):
        if kind == RTA_DST:
            dst_raw = bytes(buf[a:b])
        elif kind == RTA_GATEWAY:
            gw_raw = bytes(buf[a:b])
        elif kind == RTA_OIF:
            oif = _U32.unpack_from(buf, a)[0]
        elif kind == RTA_TABLE:
            table = _U32.unpack_from(buf, a)[0]
        elif kind == RTA_PRIORITY:
            prio = _U32.unpack_from(buf, a)[0]
        elif kind == RTA_MULTIPATH and oif is None and b - a >= _RTNH.size:
            # Only the first hop matters to our callers (which interface a default route leaves by).
            nh_len, nh_flags, _hops, nh_if = _RTNH.unpack_from(buf, a)
            oif = nh_if
            flags |= nh_flags
            for k2, a2, b2 in _iter_nla(buf, a + _RTNH.size, a + nh_len):
                if k2 == RTA_GATEWAY:
                    gw_raw = bytes(buf[a2:b2])
    zero = b"\0" * (4 if fam == AF_INET else 16)
    dst: IPNetwork = ipaddress.ip_network((_ip(fam, dst_raw or zero), dst_len))
    if fam == AF_INET6 and prio == IP6_RT_PRIO_USER:
        prio = 0
    if rtype == RTN_BLACKHOLE:
        oif = None  # IPv6 reports `dev lo`: dropped so a blackhole read back equals the one we asked for
    return Route(
        dst=dst,
        gateway=_ip(fam, gw_raw) if gw_raw else None,
        oif=oif,
        onlink=bool(flags & RTNH_F_ONLINK),
        table=table,
        priority=prio,
        protocol=proto,
        scope=scope,
        type=rtype,
    )


def decode_neigh(buf: bytes | memoryview, off: int, end: int) -> Neigh | Fdb | None:
    fam, ifindex, state, flags, _type = _NDMSG.unpack_from(buf, off)
    dst_raw = ll_raw = b""
    for kind, a, b in _iter_nla(buf, off + _NDMSG.size, end):
        if kind == NDA_DST:
            dst_raw = bytes(buf[a:b])
        elif kind == NDA_LLADDR:
            ll_raw = bytes(buf[a:b])
    if fam == AF_BRIDGE:
        if len(ll_raw) != 6:
            return None
        dst: IPAddress | None = None
        if len(dst_raw) in (4, 16):
            dst = _ip(AF_INET if len(dst_raw) == 4 else AF_INET6, dst_raw)
        return Fdb(ifindex=ifindex, lladdr=format_mac(ll_raw), dst=dst, state=state, flags=flags)
    if fam not in (AF_INET, AF_INET6) or not dst_raw:
        return None
    return Neigh(
        ifindex=ifindex,
        dst=_ip(fam, dst_raw),
        lladdr=format_mac(ll_raw) if len(ll_raw) == 6 else None,
        state=state,
    )


def _decode_vxlan(buf: bytes | memoryview, off: int, end: int) -> VxlanInfo:
    vni = port = 0
    local: IPAddress | None = None
    link: int | None = None
    learning = gbp = False
    for kind, a, b in _iter_nla(buf, off, end):
        if kind == IFLA_VXLAN_ID:
            vni = _U32.unpack_from(buf, a)[0]
        elif kind == IFLA_VXLAN_LINK:
            link = _U32.unpack_from(buf, a)[0] or None
        elif kind == IFLA_VXLAN_LOCAL and b - a == 4:
            local = IPv4Address(bytes(buf[a:b]))
        elif kind == IFLA_VXLAN_LOCAL6 and b - a == 16:
            local = IPv6Address(bytes(buf[a:b]))
        elif kind == IFLA_VXLAN_LEARNING:
            learning = bool(buf[a])
        elif kind == IFLA_VXLAN_PORT:
            port = _BE16.unpack_from(buf, a)[0]
        elif kind == IFLA_VXLAN_GBP:
            gbp = True
    return VxlanInfo(vni=vni, local=local, port=port, learning=learning, gbp=gbp, link=link)


def decode_link(buf: bytes | memoryview, off: int, end: int) -> Link:
    """An RTM_NEWLINK/RTM_DELLINK body, in the same shape as the pyroute2-based link queries return."""
    _fam, _type, index, flags, _change = _IFINFO.unpack_from(buf, off)
    name = ""
    mtu = 0
    mac: str | None = None
    kind: str | None = None
    vx: VxlanInfo | None = None
    for t, a, b in _iter_nla(buf, off + _IFINFO.size, end):
        if t == IFLA_IFNAME:
            name = bytes(buf[a:b]).rstrip(b"\0").decode(errors="replace")
        elif t == IFLA_MTU:
            mtu = _U32.unpack_from(buf, a)[0]
        elif t == IFLA_ADDRESS and b - a == 6:
            mac = format_mac(bytes(buf[a:b]))
        elif t == IFLA_LINKINFO:
            data: tuple[int, int] | None = None
            for t2, a2, b2 in _iter_nla(buf, a, b):
                if t2 == IFLA_INFO_KIND:
                    kind = bytes(buf[a2:b2]).rstrip(b"\0").decode(errors="replace")
                elif t2 == IFLA_INFO_DATA:
                    data = (a2, b2)
            if kind == "vxlan" and data is not None:
                vx = _decode_vxlan(buf, *data)
    return Link(index=index, name=name, kind=kind, mtu=mtu, mac=mac, up=bool(flags & IFF_UP), vxlan=vx)


EventKind = Literal["link", "route", "neigh", "fdb", "resync"]


@dataclass(frozen=True)
class KernelEvent:
    """One change the kernel announced. kind "resync": notifications were lost (socket overrun), so the
    consumer must re-read the kernel state; action and obj carry nothing then."""

    kind: EventKind
    action: Literal["new", "del"]
    obj: Link | Route | Neigh | Fdb | None


RESYNC = KernelEvent("resync", "new", None)


def decode_event(buf: bytes | memoryview, off: int, end: int, mtype: int) -> KernelEvent | None:
    """Decode one notification (header at off) into a KernelEvent; None for messages we do not follow."""
    body = off + 16
    if mtype in (RTM_NEWROUTE, RTM_DELROUTE):
        r = decode_route(buf, body, end)
        return None if r is None else KernelEvent("route", "new" if mtype == RTM_NEWROUTE else "del", r)
    if mtype in (RTM_NEWNEIGH, RTM_DELNEIGH):
        n = decode_neigh(buf, body, end)
        if n is None:
            return None
        return KernelEvent("fdb" if isinstance(n, Fdb) else "neigh", "new" if mtype == RTM_NEWNEIGH else "del", n)
    if mtype in (RTM_NEWLINK, RTM_DELLINK):
        return KernelEvent("link", "new" if mtype == RTM_NEWLINK else "del", decode_link(buf, body, end))
    return None


def _route_socket(netns: str | None) -> socket.socket:
    if netns is None:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
    from pyroute2 import netns as pr_netns

    # flags=0: fail on a missing namespace instead of silently creating an empty one.
    sock: socket.socket = pr_netns.create_socket(
        netns=netns, family=socket.AF_NETLINK, socket_type=socket.SOCK_RAW, proto=NETLINK_ROUTE, flags=0
    )
    return sock


def _set_buf(sock: socket.socket, force: int, plain: int, size: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, plain, size)


# ---------------------------------------------------------------- the kernel-change monitor (event loop thread)


class KernelMonitor:
    """Kernel notifications (links, IPv4/IPv6 routes, neighbours, FDB) of one namespace as an async iterator
    of KernelEvent. The socket is read by the event loop (add_reader), never by the netlink worker thread, so
    a long dump or batch there does not delay events, and events never delay requests. Iteration ends when
    close() is called (also by Netlink.close())."""

    def __init__(
        self, sock: socket.socket, loop: asyncio.AbstractEventLoop, on_close: Callable[[KernelMonitor], None]
    ) -> None:
        self._sock: socket.socket | None = sock
        self._loop = loop
        self._on_close = on_close
        self._pending: deque[KernelEvent] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.overruns = 0
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._readable)

    def fileno(self) -> int:
        return -1 if self._sock is None else self._sock.fileno()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _resync(self, why: str) -> None:
        self.overruns += 1
        log.warning("kernel monitor: %s; notifications were lost, a full resync is needed", why)
        self._pending.clear()
        self._pending.append(RESYNC)

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        pending = self._pending
        # Bounded per call so that a flood of notifications cannot starve the rest of the loop.
        for _ in range(512):
            try:
                buf = sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self._resync("socket overrun (ENOBUFS)")
                    continue
                log.error("kernel monitor: receive failed, stopping: %s", e)
                self.close()
                return
            off = 0
            size = len(buf)
            while off + 16 <= size:
                n, mtype, _flags, _seq, _pid = _HDR.unpack_from(buf, off)
                if n < 16 or off + n > size:
                    break
                ev = decode_event(buf, off, off + n, mtype)
                if ev is not None:
                    pending.append(ev)
                off += (n + 3) & ~3
            if len(pending) > _MONITOR_MAX_PENDING:
                self._resync(f"more than {_MONITOR_MAX_PENDING} events unread")
        if pending:
            self._wake()

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        with contextlib.suppress(Exception):
            self._loop.remove_reader(sock.fileno())
        sock.close()
        self._on_close(self)
        self._wake()

    def __aiter__(self) -> KernelMonitor:
        return self

    async def __anext__(self) -> KernelEvent:
        while not self._pending:
            if self._sock is None:
                raise StopAsyncIteration
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._pending.popleft()


# ---------------------------------------------------------------- the raw socket (worker thread only)


class _RawRoute:
    """A NETLINK_ROUTE socket with batched requests and hand-decoded dumps. Not thread safe."""

    def __init__(self, netns: str | None) -> None:
        sock = _route_socket(netns)
        self.sock = sock
        for force, plain in ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
            _set_buf(sock, force, plain, _SOCK_BUF)
        # Error replies without an echo of the request keep the receive queue small; ext-ack gives the
        # kernel's reason text.
        with contextlib.suppress(OSError):
            sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        with contextlib.suppress(OSError):
            sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        sock.bind((0, 0))
        sock.settimeout(_TIMEOUT)
        self.seq = 1
        self.max_chunk = _CHUNK_BYTES

    def close(self) -> None:
        self.sock.close()

    def _next_seq(self) -> int:
        self.seq = (self.seq + 1) & 0x7FFFFFFF or 1
        return self.seq

    def _recv(self) -> bytes:
        try:
            return self.sock.recv(1 << 20)
        except TimeoutError:
            raise NetlinkError(errno.ETIMEDOUT, "netlink: no reply from the kernel") from None
        except OSError as e:
            # ENOBUFS: replies were dropped, so which requests succeeded is unknown; the caller must re-read.
            raise NetlinkError(e.errno or errno.EIO, f"netlink receive: {e}") from e

    def _send(self, data: bytes) -> None:
        try:
            self.sock.send(data)
        except OSError as e:
            raise NetlinkError(e.errno or errno.EIO, f"netlink send: {e}") from e

    @staticmethod
    def _error(buf: bytes, off: int, end: int, flags: int) -> tuple[int, str]:
        code = -struct.unpack_from("=i", buf, off)[0]
        msg = ""
        if flags & NLM_F_ACK_TLVS:
            start = off + 4 + 16
            if not flags & NLM_F_CAPPED:
                start = off + 4 + _HDR.unpack_from(buf, off + 4)[0]
            for kind, a, b in _iter_nla(buf, start, end):
                if kind == NLMSGERR_ATTR_MSG:
                    msg = bytes(buf[a:b]).rstrip(b"\0").decode(errors="replace")
        return code, msg

    def apply(self, ops: Sequence[Op]) -> list[NetlinkError | None]:
        results: list[NetlinkError | None] = [None] * len(ops)
        i = 0
        while i < len(ops):
            # One chunk: requests without acks, the last one with an ack that marks the chunk's end.
            seq0 = self.seq + 1
            parts: list[bytes] = []
            size = 0
            j = i
            while j < len(ops) and size < self.max_chunk:
                last = j + 1 == len(ops) or size >= self.max_chunk - 512
                m = encode_op(ops[j], self._next_seq(), ack=last)
                parts.append(m)
                size += len(m)
                j += 1
                if last:
                    break
            last_seq = self.seq
            self._send(b"".join(parts))
            done = False
            while not done:
                buf = self._recv()
                off = 0
                while off + 16 <= len(buf):
                    n, kind, flags, seq, _pid = _HDR.unpack_from(buf, off)
                    if n < 16:
                        break
                    if kind == NLMSG_ERROR and seq0 <= seq <= last_seq:
                        code, text = self._error(buf, off + 16, off + n, flags)
                        k = i + (seq - seq0)
                        if code:
                            results[k] = NetlinkError(
                                code, f"{ops[k].action} {ops[k].obj}: {text or errno.errorcode.get(code, code)}"
                            )
                        if seq == last_seq:
                            done = True
                    off += (n + 3) & ~3
            i = j
        return results

    def dump(self, kind: int, family: int) -> list[Route | Neigh | Fdb]:
        for _attempt in range(5):
            out, interrupted = self._dump_once(kind, family)
            if not interrupted:
                return out
        raise NetlinkError(errno.EINTR, "netlink dump kept being interrupted by concurrent changes")

    def _dump_once(self, kind: int, family: int) -> tuple[list[Route | Neigh | Fdb], bool]:
        seq = self._next_seq()
        body = _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0) if kind == RTM_GETROUTE else _NDMSG.pack(family, 0, 0, 0, 0)
        self._send(_msg(kind, NLM_F_REQUEST | NLM_F_DUMP, seq, body))
        decode: Callable[[bytes, int, int], Route | Neigh | Fdb | None] = (
            decode_route if kind == RTM_GETROUTE else decode_neigh
        )
        out: list[Route | Neigh | Fdb] = []
        interrupted = False
        while True:
            buf = self._recv()
            off = 0
            while off + 16 <= len(buf):
                n, mtype, flags, mseq, _pid = _HDR.unpack_from(buf, off)
                if n < 16:
                    break
                if mseq == seq:
                    if flags & NLM_F_DUMP_INTR:
                        interrupted = True
                    if mtype == NLMSG_DONE:
                        return out, interrupted
                    if mtype == NLMSG_ERROR:
                        code, text = self._error(buf, off + 16, off + n, flags)
                        if code:
                            raise NetlinkError(code, f"dump {kind}: {text or errno.errorcode.get(code, code)}")
                        return out, interrupted
                    obj = decode(buf, off + 16, off + n)
                    if obj is not None:
                        out.append(obj)
                off += (n + 3) & ~3


# ---------------------------------------------------------------- pyroute2 message conversion


def _link_from_msg(m: Any) -> Link:
    kind = m.get(("linkinfo", "kind"))
    vx: VxlanInfo | None = None
    if kind == "vxlan":
        d = m.get(("linkinfo", "data"))
        if d is not None:
            local = d.get("vxlan_local") or d.get("vxlan_local6")
            vx = VxlanInfo(
                vni=int(d.get("vxlan_id") or 0),
                local=ipaddress.ip_address(local) if local else None,
                port=int(d.get("vxlan_port") or 0),
                learning=bool(d.get("vxlan_learning")),
                gbp=bool(d.get("vxlan_gbp")),
                link=d.get("vxlan_link") or None,
            )
    return Link(
        index=int(m["index"]),
        name=str(m.get("ifname")),
        kind=kind,
        mtu=int(m.get("mtu") or 0),
        mac=m.get("address"),
        up=bool(m["flags"] & IFF_UP),
        vxlan=vx,
    )


def _addr_from_msg(m: Any) -> Address | None:
    a = m.get("address")
    if a is None:
        return None
    # IFA_LOCAL is the interface's own address on point-to-point links; IFA_ADDRESS is the peer there.
    local = m.get("local") or a
    return Address(index=int(m["index"]), address=ipaddress.ip_interface(f"{local}/{m['prefixlen']}"), scope=m["scope"])


def _oserror(e: Exception, what: str) -> NetlinkError:
    code = getattr(e, "code", None) or getattr(e, "errno", None) or errno.EIO
    return NetlinkError(code, f"{what}: {e}")


# ---------------------------------------------------------------- the public, async API


class Netlink:
    """rtnetlink bound to the current network namespace, or to `netns` (an existing named namespace).

    Every method is a coroutine that runs on the instance's single worker thread. Call close() when done.
    """

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netlink")
        self._ipr: Any = None
        self._raw: _RawRoute | None = None
        self._monitors: set[KernelMonitor] = set()

    async def __aenter__(self) -> Netlink:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _run(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kw))

    # worker-thread helpers
    def _ipr_w(self) -> Any:
        if self._ipr is None:
            from pyroute2 import IPRoute

            try:
                # groups=0: no multicast subscriptions, whose unread notifications would pile up in the socket.
                self._ipr = IPRoute(netns=self.netns, flags=0, groups=0) if self.netns else IPRoute(groups=0)
            except OSError as e:
                raise NetlinkError(e.errno or errno.EIO, f"cannot open netlink in netns {self.netns}: {e}") from e
        return self._ipr

    def _raw_w(self) -> _RawRoute:
        if self._raw is None:
            try:
                self._raw = _RawRoute(self.netns)
            except OSError as e:
                raise NetlinkError(e.errno or errno.EIO, f"cannot open netlink in netns {self.netns}: {e}") from e
        return self._raw

    def _close_w(self) -> None:
        if self._ipr is not None:
            with contextlib.suppress(Exception):
                self._ipr.close()
            self._ipr = None
        if self._raw is not None:
            self._raw.close()
            self._raw = None

    async def close(self) -> None:
        for mon in list(self._monitors):
            mon.close()
        with contextlib.suppress(RuntimeError):
            await self._run(self._close_w)
        self._pool.shutdown(wait=True)

    # ------------------------------------------------------------ kernel-change monitor

    @staticmethod
    def _monitor_socket_w(netns: str | None, rcvbuf: int) -> socket.socket:
        try:
            sock = _route_socket(netns)
        except OSError as e:
            raise NetlinkError(e.errno or errno.EIO, f"cannot open netlink in netns {netns}: {e}") from e
        try:
            _set_buf(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, rcvbuf)
            groups = 0
            for g in MONITOR_GROUPS:
                groups |= 1 << (g - 1)
            sock.bind((0, groups))
        except OSError as e:
            sock.close()
            raise NetlinkError(e.errno or errno.EIO, f"cannot subscribe to kernel notifications: {e}") from e
        return sock

    async def monitor(self, *, rcvbuf: int = _MONITOR_BUF) -> KernelMonitor:
        """Subscribe to link, route (IPv4 and IPv6), neighbour and FDB changes in this instance's namespace.

        Iterate the result for KernelEvents; our own writes are announced too. A "resync" event means
        notifications were lost. The socket is open (subscribed) when this returns; close() or Netlink.close()
        ends the iteration."""
        sock = await self._run(self._monitor_socket_w, self.netns, rcvbuf)
        mon = KernelMonitor(sock, asyncio.get_running_loop(), self._monitors.discard)
        self._monitors.add(mon)
        return mon

    # ------------------------------------------------------------ links

    def _links_w(self) -> list[Link]:
        return [_link_from_msg(m) for m in self._ipr_w().link("dump")]

    async def links(self) -> list[Link]:
        return await self._run(self._links_w)

    def _link_get_w(self, **kw: Any) -> Link | None:
        try:
            msgs = self._ipr_w().link("get", **kw)
        except Exception as e:
            if getattr(e, "code", None) in (errno.ENODEV, errno.ENOENT):
                return None
            raise _oserror(e, f"link get {kw}") from e
        return _link_from_msg(msgs[0]) if msgs else None

    async def link_by_name(self, name: str) -> Link | None:
        return await self._run(self._link_get_w, ifname=name)

    async def link_by_index(self, index: int) -> Link | None:
        return await self._run(self._link_get_w, index=index)

    def _create_vxlan_w(
        self,
        name: str,
        vni: int,
        local: IPAddress | None,
        dev_index: int | None,
        port: int,
        learning: bool,
        gbp: bool,
        mtu: int | None,
        mac: str | None,
    ) -> Link:
        kw: dict[str, Any] = {"ifname": name, "kind": "vxlan", "vxlan_id": vni, "vxlan_learning": int(learning)}
        if local is not None:
            kw["vxlan_local" if local.version == 4 else "vxlan_local6"] = str(local)
        if dev_index:
            kw["vxlan_link"] = dev_index
        if port:
            kw["vxlan_port"] = port
        if gbp:
            kw["vxlan_gbp"] = True
        if mtu:
            kw["mtu"] = mtu
        if mac:
            kw["address"] = mac
        try:
            self._ipr_w().link("add", **kw)
        except Exception as e:
            raise _oserror(e, f"create vxlan {name}") from e
        link = self._link_get_w(ifname=name)
        if link is None:
            raise NetlinkError(errno.ENODEV, f"vxlan {name} vanished right after creation")
        return link

    async def create_vxlan(
        self,
        name: str,
        *,
        vni: int,
        local: IPAddress | None,
        dev_index: int | None,
        port: int = 0,
        learning: bool = False,
        gbp: bool = False,
        mtu: int | None = None,
        mac: str | None = None,
    ) -> Link:
        """`ip link add NAME type vxlan id VNI local LOCAL dev DEV [dstport PORT] [no]learning [gbp]`.

        port 0 leaves the destination port to the kernel (8472)."""
        return await self._run(self._create_vxlan_w, name, vni, local, dev_index, port, learning, gbp, mtu, mac)

    def _link_op_w(self, what: str, **kw: Any) -> None:
        try:
            self._ipr_w().link(what, **kw)
        except Exception as e:
            raise _oserror(e, f"link {what} {kw}") from e

    async def delete_link(self, index: int) -> None:
        await self._run(self._link_op_w, "del", index=index)

    async def set_up(self, index: int) -> None:
        await self._run(self._link_op_w, "set", index=index, state="up")

    async def set_mtu(self, index: int, mtu: int) -> None:
        await self._run(self._link_op_w, "set", index=index, mtu=mtu)

    # ------------------------------------------------------------ addresses

    def _addresses_w(self, index: int | None, family: int | None) -> list[Address]:
        kw: dict[str, Any] = {}
        if family is not None:
            kw["family"] = family
        out = []
        for m in self._ipr_w().addr("dump", **kw):
            if index is not None and m["index"] != index:
                continue
            a = _addr_from_msg(m)
            if a is not None:
                out.append(a)
        return out

    async def addresses(self, index: int | None = None, family: int | None = None) -> list[Address]:
        return await self._run(self._addresses_w, index, family)

    def _addr_op_w(self, what: str, index: int, iface: IPInterface) -> None:
        try:
            self._ipr_w().addr(what, index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        except Exception as e:
            raise _oserror(e, f"addr {what} {iface} dev {index}") from e

    async def add_address(self, index: int, iface: IPInterface) -> None:
        await self._run(self._addr_op_w, "add", index, iface)

    async def replace_address(self, index: int, iface: IPInterface) -> None:
        await self._run(self._addr_op_w, "replace", index, iface)

    async def delete_address(self, index: int, iface: IPInterface) -> None:
        await self._run(self._addr_op_w, "del", index, iface)

    async def links_with_addresses(self) -> list[tuple[Link, list[Address]]]:
        """Every link with its addresses, for choosing the external interface (--iface, --iface-regex)."""

        def work() -> list[tuple[Link, list[Address]]]:
            addrs = self._addresses_w(None, None)
            return [(ln, [a for a in addrs if a.index == ln.index]) for ln in self._links_w()]

        return await self._run(work)

    # ------------------------------------------------------------ routes, neighbours, FDB

    def _routes_w(self, family: int, table: int | None, oif: int | None) -> list[Route]:
        out = []
        for r in self._raw_w().dump(RTM_GETROUTE, family):
            assert isinstance(r, Route)
            if (table is None or r.table == table) and (oif is None or r.oif == oif):
                out.append(r)
        return out

    async def routes(
        self, family: int = AF_INET, *, table: int | None = RT_TABLE_MAIN, oif: int | None = None
    ) -> list[Route]:
        """Unicast and other routes of `family` (table None: every table), optionally only those leaving by `oif`."""
        return await self._run(self._routes_w, family, table, oif)

    def _neigh_w(self, ifindex: int | None, family: int) -> list[Neigh]:
        return [
            n
            for n in self._raw_w().dump(RTM_GETNEIGH, family)
            if isinstance(n, Neigh) and (ifindex is None or n.ifindex == ifindex)
        ]

    async def neighbours(self, ifindex: int | None = None, family: int = AF_INET) -> list[Neigh]:
        return await self._run(self._neigh_w, ifindex, family)

    def _fdb_w(self, ifindex: int | None) -> list[Fdb]:
        return [
            f
            for f in self._raw_w().dump(RTM_GETNEIGH, AF_BRIDGE)
            if isinstance(f, Fdb) and (ifindex is None or f.ifindex == ifindex)
        ]

    async def fdb(self, ifindex: int | None = None) -> list[Fdb]:
        return await self._run(self._fdb_w, ifindex)

    def _snapshot_w(self, family: int, neigh_ifindex: int | None, fdb_ifindex: int | None) -> DeviceState:
        routes = self._routes_w(family, RT_TABLE_MAIN, None)
        neigh = self._neigh_w(neigh_ifindex, family) if neigh_ifindex is not None else []
        fdb = self._fdb_w(fdb_ifindex) if fdb_ifindex is not None else []
        return DeviceState(routes=routes, neighbours=neigh, fdb=fdb)

    async def snapshot(
        self, family: int = AF_INET, *, neigh_ifindex: int | None = None, fdb_ifindex: int | None = None
    ) -> DeviceState:
        """The main routing table of `family`, plus the neighbours/FDB of the given devices, in one hop."""
        return await self._run(self._snapshot_w, family, neigh_ifindex, fdb_ifindex)

    async def apply(self, ops: Sequence[Op]) -> list[NetlinkError | None]:
        """Send many route/neighbour/FDB requests in a few batched writes; one result per op (None = done).

        Requests are processed in order, so a delete followed by a replace of the same key is well defined."""
        if not ops:
            return []
        return await self._run(lambda: self._raw_w().apply(ops))

    async def _one(self, op: Op, missing_ok: bool = False) -> None:
        (err,) = await self.apply([op])
        if err is not None and not (missing_ok and is_missing(err)):
            raise err

    async def replace_route(self, route: Route) -> None:
        await self._one(Op.replace(route))

    async def delete_route(self, route: Route, *, missing_ok: bool = True) -> None:
        await self._one(Op.delete(route), missing_ok)

    async def replace_neigh(self, neigh: Neigh) -> None:
        await self._one(Op.replace(neigh))

    async def delete_neigh(self, neigh: Neigh, *, missing_ok: bool = True) -> None:
        await self._one(Op.delete(neigh), missing_ok)

    async def replace_fdb(self, entry: Fdb) -> None:
        await self._one(Op.replace(entry))

    async def append_fdb(self, entry: Fdb) -> None:
        await self._one(Op("append", entry))

    async def delete_fdb(self, entry: Fdb, *, missing_ok: bool = True) -> None:
        await self._one(Op.delete(entry), missing_ok)

    # ------------------------------------------------------------ interface selection

    async def links_with_addrs(self) -> list[LinkAddrs]:
        """links_with_addresses() in the shape pyflannel.iface selects from."""
        from ..iface import LinkAddrs

        return [
            LinkAddrs(name=ln.name, index=ln.index, mtu=ln.mtu, addrs=tuple(a.address for a in addrs))
            for ln, addrs in await self.links_with_addresses()
        ]

    async def default_route_index(self, version: int = 4) -> int | None:
        """The ifindex holding the IPv`version` default route, or None."""
        info = await self.default_route(AF_INET if version == 4 else AF_INET6)
        return info.link.index if info is not None else None

    async def route_get_index(self, target: IPAddress) -> int | None:
        """`ip route get TARGET`: the ifindex the kernel would send to `target` by (for --iface-can-reach)."""

        def work() -> int | None:
            try:
                msgs = self._ipr_w().route("get", dst=str(target))
            except Exception as e:
                if getattr(e, "code", None) in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ESRCH):
                    return None
                raise _oserror(e, f"route get {target}") from e
            for m in msgs:
                oif = m.get("oif")
                if oif:
                    return int(oif)
            return None

        return await self._run(work)

    async def default_route(self, family: int = AF_INET) -> DefaultRouteInfo | None:
        """The interface holding the default route of `family` (lowest metric), with its addresses and MTU."""

        def work() -> DefaultRouteInfo | None:
            defaults = [
                r
                for r in self._routes_w(family, RT_TABLE_MAIN, None)
                if r.dst.prefixlen == 0 and r.oif is not None and r.type == RTN_UNICAST
            ]
            if not defaults:
                return None
            best = min(defaults, key=lambda r: r.priority)
            assert best.oif is not None
            link = self._link_get_w(index=best.oif)
            if link is None:
                return None
            return DefaultRouteInfo(link=link, gateway=best.gateway, addresses=self._addresses_w(best.oif, None))

        return await self._run(work)
