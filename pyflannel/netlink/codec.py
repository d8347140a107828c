"""The pure part of rtnetlink: constants, the value types, and the hand-written codec.

No sockets, no threads, no pyroute2: everything here turns bytes into values and back, so it is tested without
root. Requests are packed with `struct` (encode_op, encode_link_new/set/del, encode_addr, encode_route_get, ...);
replies, dumps and notifications are decoded by hand (decode_route, decode_neigh, decode_link, decode_addr,
decode_error). Buffers are `bytes | memoryview`, and
every decoder takes (buf, off, end): the body of one message, after its 16-byte header.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network
from typing import Literal

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
RTM_GETLINK = 18
RTM_NEWROUTE = 24
RTM_DELROUTE = 25
RTM_GETROUTE = 26
RTM_NEWNEIGH = 28
RTM_DELNEIGH = 29
RTM_GETNEIGH = 30
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_GETADDR = 22
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

# addresses
IFA_ADDRESS = 1
IFA_LOCAL = 2

# links (what Link carries and what creating one needs)
IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_LINKINFO = 18
IFLA_EXT_MASK = 29
RTEXT_FILTER_SKIP_STATS = 1 << 3  # in IFLA_EXT_MASK: leave the counters out of link replies
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
IFLA_VXLAN_ID = 1
IFLA_VXLAN_LINK = 3
IFLA_VXLAN_LOCAL = 4
IFLA_VXLAN_LEARNING = 7
IFLA_VXLAN_PORT = 15
IFLA_VXLAN_LOCAL6 = 17
IFLA_VXLAN_GBP = 23
# ipip (IFLA_IPTUN_* of linux/if_tunnel.h)
IFLA_IPTUN_LINK = 1
IFLA_IPTUN_LOCAL = 2
IFLA_IPTUN_REMOTE = 3
IFLA_IPTUN_TTL = 4
IFLA_IPTUN_TOS = 5
IFLA_IPTUN_ENCAP_LIMIT = 6
IFLA_IPTUN_FLOWINFO = 7
IFLA_IPTUN_FLAGS = 8
IFLA_IPTUN_PROTO = 9
IFLA_IPTUN_PMTUDISC = 10

HDR = struct.Struct("=IHHII")
IFINFO = struct.Struct("=BxHiII")
IFADDRMSG = struct.Struct("=BBBBI")
_U8 = struct.Struct("=B")
_BE16 = struct.Struct("!H")
RTMSG = struct.Struct("=BBBBBBBBI")
NDMSG = struct.Struct("=BxxxiHBB")
_NLA = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_RTNH = struct.Struct("=HBBi")
# One attribute with its header, packed in one call: encode_op runs 15000 times in a cold sync of 5000 peers.
_NLA_U32 = struct.Struct("=HHI")
_NLA_IP4 = struct.Struct("=HH4s")
_NLA_IP6 = struct.Struct("=HH16s")
_NLA_MAC = struct.Struct("=HH6s2x")


class NetlinkError(OSError):
    """A netlink request failed; `errno` is the kernel's error, the message says which request."""


def is_missing(err: BaseException | None) -> bool:
    """True for the errors a delete of an absent route/neighbour/FDB entry returns."""
    return isinstance(err, OSError) and err.errno in (errno.ENOENT, errno.ESRCH, errno.ENODEV)


def format_mac(raw: bytes) -> str:
    """`aa:bb:cc:dd:ee:ff`, lower case: how every MAC is written in a lease and compared with the kernel's."""
    return raw.hex(":")


def parse_mac(mac: str) -> bytes:
    """Parse `aa:bb:cc:dd:ee:ff` (also `-` separated); raises ValueError."""
    # Six pairs of hex digits, each pair followed by a separator but the last (sliced, not split: this runs
    # for every neighbour and FDB entry of a sync).
    if len(mac) == 17 and not mac[2::3].strip(":-"):
        digits = mac[0:2] + mac[3:5] + mac[6:8] + mac[9:11] + mac[12:14] + mac[15:17]
        if digits.isascii() and digits.isalnum():
            try:
                return bytes.fromhex(digits)
            except ValueError:
                pass
    raise ValueError(f"not a MAC address: {mac!r}")


def _ip(family: int, raw: bytes) -> IPAddress:
    return IPv4Address(raw) if family == AF_INET else IPv6Address(raw)


@dataclass(frozen=True, slots=True)
class VxlanInfo:
    vni: int
    local: IPAddress | None
    port: int
    learning: bool
    gbp: bool
    link: int | None


@dataclass(frozen=True, slots=True)
class IpipInfo:
    """An ipip device's tunnel parameters; local/remote None is "any" (0.0.0.0), link None is no `dev`."""

    local: IPv4Address | None
    remote: IPv4Address | None
    link: int | None
    ttl: int  # 0: inherit the inner packet's
    pmtudisc: bool


@dataclass(frozen=True, slots=True)
class Link:
    index: int
    name: str
    kind: str | None
    mtu: int
    mac: str | None
    up: bool  # administratively up (IFF_UP)
    vxlan: VxlanInfo | None = None
    ipip: IpipInfo | None = None


@dataclass(frozen=True, slots=True)
class Address:
    index: int
    address: IPInterface
    scope: int = 0


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
class Neigh:
    ifindex: int
    dst: IPAddress
    lladdr: str | None
    state: int = field(default=NUD_PERMANENT, compare=False)


@dataclass(frozen=True, slots=True)
class Fdb:
    """A `self` FDB entry of a vxlan device: frames for `lladdr` are sent to `dst`."""

    ifindex: int
    lladdr: str
    dst: IPAddress | None
    state: int = field(default=NUD_PERMANENT, compare=False)
    flags: int = field(default=NTF_SELF, compare=False)


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
class DeviceState:
    """One read of the tables a backend owns entries in (see Netlink.snapshot())."""

    routes: list[Route]
    neighbours: list[Neigh]
    fdb: list[Fdb]


@dataclass(frozen=True, slots=True)
class DefaultRouteInfo:
    link: Link
    gateway: IPAddress | None
    addresses: list[Address]


# ---------------------------------------------------------------- codec


def pack_nla(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return _NLA.pack(n, kind) + payload + b"\0" * (-n & 3)


def iter_nla(buf: bytes | memoryview, off: int, end: int) -> Iterator[tuple[int, int, int]]:
    """Yield (type, start, stop) of each attribute in buf[off:end]."""
    while off + 4 <= end:
        n, kind = _NLA.unpack_from(buf, off)
        if n < 4:
            return
        yield kind & 0x3FFF, off + 4, off + n
        off += (n + 3) & ~3


def pack_msg(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    return HDR.pack(16 + len(body), kind, flags, seq, 0) + body


def _nla_ip(kind: int, ip: IPAddress) -> bytes:
    return _NLA_IP4.pack(8, kind, ip.packed) if ip.version == 4 else _NLA_IP6.pack(20, kind, ip.packed)


def encode_op(op: Op, seq: int, ack: bool) -> bytes:
    o = op.obj
    base = NLM_F_REQUEST | (NLM_F_ACK if ack else 0)
    if isinstance(o, Route):
        dst = o.dst
        fam = AF_INET if dst.version == 4 else AF_INET6
        plen = dst.prefixlen
        blackhole = o.type == RTN_BLACKHOLE
        attrs = _NLA_U32.pack(8, RTA_TABLE, o.table)
        if plen:
            attrs += _nla_ip(RTA_DST, dst.network_address)
        # A blackhole has no next hop; the kernel rejects one (and an IPv6 one read back names `lo`).
        if o.gateway is not None and not blackhole:
            attrs += _nla_ip(RTA_GATEWAY, o.gateway)
        if o.oif is not None and not blackhole:
            attrs += _NLA_U32.pack(8, RTA_OIF, o.oif)
        if o.priority:
            attrs += _NLA_U32.pack(8, RTA_PRIORITY, o.priority)
        table = o.table if o.table < 256 else RT_TABLE_UNSPEC
        if op.action == "delete":
            # Type 0 deletes whatever route has the key; a blackhole delete names its type so that it cannot
            # take a unicast route of the same prefix with it.
            rtm = RTMSG.pack(fam, plen, 0, 0, table, 0, RT_SCOPE_NOWHERE, RTN_BLACKHOLE if blackhole else 0, 0)
            return pack_msg(RTM_DELROUTE, base, seq, rtm + attrs)
        if blackhole:
            rtm = RTMSG.pack(fam, plen, 0, 0, table, o.protocol, RT_SCOPE_UNIVERSE, RTN_BLACKHOLE, 0)
            return pack_msg(RTM_NEWROUTE, base | NLM_F_CREATE | NLM_F_REPLACE, seq, rtm + attrs)
        scope = RT_SCOPE_UNIVERSE if o.gateway is not None else RT_SCOPE_LINK
        flags = RTNH_F_ONLINK if o.onlink else 0
        rtm = RTMSG.pack(fam, plen, 0, 0, table, o.protocol, scope, RTN_UNICAST, flags)
        return pack_msg(RTM_NEWROUTE, base | NLM_F_CREATE | NLM_F_REPLACE, seq, rtm + attrs)
    if isinstance(o, Neigh):
        fam = AF_INET if o.dst.version == 4 else AF_INET6
        attrs = _nla_ip(NDA_DST, o.dst)
        if op.action == "delete":
            return pack_msg(RTM_DELNEIGH, base, seq, NDMSG.pack(fam, o.ifindex, 0, 0, 0) + attrs)
        if o.lladdr is not None:
            attrs += _NLA_MAC.pack(10, NDA_LLADDR, parse_mac(o.lladdr))
        ndm = NDMSG.pack(fam, o.ifindex, o.state, 0, RTN_UNICAST)
        return pack_msg(RTM_NEWNEIGH, base | NLM_F_CREATE | NLM_F_REPLACE, seq, ndm + attrs)
    attrs = _NLA_MAC.pack(10, NDA_LLADDR, parse_mac(o.lladdr))
    if o.dst is not None:
        attrs += _nla_ip(NDA_DST, o.dst)
    if op.action == "delete":
        return pack_msg(RTM_DELNEIGH, base, seq, NDMSG.pack(AF_BRIDGE, o.ifindex, 0, o.flags, 0) + attrs)
    mode = NLM_F_APPEND if op.action == "append" else NLM_F_REPLACE
    ndm = NDMSG.pack(AF_BRIDGE, o.ifindex, o.state, o.flags, 0)
    return pack_msg(RTM_NEWNEIGH, base | NLM_F_CREATE | mode, seq, ndm + attrs)


def decode_route(buf: bytes | memoryview, off: int, end: int) -> Route | None:
    fam, dst_len, _src_len, _tos, table, proto, scope, rtype, flags = RTMSG.unpack_from(buf, off)
    if fam not in (AF_INET, AF_INET6):
        return None
    dst_raw = gw_raw = b""
    oif: int | None = None
    prio = 0
    for kind, a, b in iter_nla(buf, off + RTMSG.size, end):
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
            for k2, a2, b2 in iter_nla(buf, a + _RTNH.size, a + nh_len):
                if k2 == RTA_GATEWAY:
                    gw_raw = bytes(buf[a2:b2])
    zero = b"\0" * (4 if fam == AF_INET else 16)
    # The class itself, not ip_network(), which tries IPv4 first and catches the failure for IPv6; and from the
    # packed bytes: given an address object, ipaddress formats it and parses the text again (3x the time).
    dst: IPNetwork = (IPv4Network if fam == AF_INET else IPv6Network)((dst_raw or zero, dst_len))
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
    fam, ifindex, state, flags, _type = NDMSG.unpack_from(buf, off)
    dst_raw = ll_raw = b""
    for kind, a, b in iter_nla(buf, off + NDMSG.size, end):
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
    for kind, a, b in iter_nla(buf, off, end):
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


def _ip4_or_none(raw: bytes) -> IPv4Address | None:
    return IPv4Address(raw) if raw != b"\0\0\0\0" else None


def _decode_ipip(buf: bytes | memoryview, off: int, end: int) -> IpipInfo:
    local: IPv4Address | None = None
    remote: IPv4Address | None = None
    link: int | None = None
    ttl = 0
    pmtudisc = False
    for kind, a, b in iter_nla(buf, off, end):
        if kind == IFLA_IPTUN_LOCAL and b - a == 4:
            local = _ip4_or_none(bytes(buf[a:b]))
        elif kind == IFLA_IPTUN_REMOTE and b - a == 4:
            remote = _ip4_or_none(bytes(buf[a:b]))
        elif kind == IFLA_IPTUN_LINK and b - a >= 4:
            link = _U32.unpack_from(buf, a)[0] or None
        elif kind == IFLA_IPTUN_TTL and b > a:
            ttl = buf[a]
        elif kind == IFLA_IPTUN_PMTUDISC and b > a:
            pmtudisc = bool(buf[a])
    return IpipInfo(local=local, remote=remote, link=link, ttl=ttl, pmtudisc=pmtudisc)


def decode_link(buf: bytes | memoryview, off: int, end: int) -> Link:
    """An RTM_NEWLINK/RTM_DELLINK body: the one link decoder, for dumps, gets and notifications alike."""
    _fam, _type, index, flags, _change = IFINFO.unpack_from(buf, off)
    name = ""
    mtu = 0
    mac: str | None = None
    kind: str | None = None
    vx: VxlanInfo | None = None
    ipip: IpipInfo | None = None
    for t, a, b in iter_nla(buf, off + IFINFO.size, end):
        if t == IFLA_IFNAME:
            name = bytes(buf[a:b]).rstrip(b"\0").decode(errors="replace")
        elif t == IFLA_MTU:
            mtu = _U32.unpack_from(buf, a)[0]
        elif t == IFLA_ADDRESS and b - a == 6:
            mac = format_mac(bytes(buf[a:b]))
        elif t == IFLA_LINKINFO:
            data: tuple[int, int] | None = None
            for t2, a2, b2 in iter_nla(buf, a, b):
                if t2 == IFLA_INFO_KIND:
                    kind = bytes(buf[a2:b2]).rstrip(b"\0").decode(errors="replace")
                elif t2 == IFLA_INFO_DATA:
                    data = (a2, b2)
            if kind == "vxlan" and data is not None:
                vx = _decode_vxlan(buf, *data)
            elif kind == "ipip" and data is not None:
                ipip = _decode_ipip(buf, *data)
    return Link(index=index, name=name, kind=kind, mtu=mtu, mac=mac, up=bool(flags & IFF_UP), vxlan=vx, ipip=ipip)


def encode_link_get(seq: int, *, index: int = 0, name: str | None = None) -> bytes:
    """RTM_GETLINK for one link, by index or (index 0) by name; the reply is one RTM_NEWLINK or an error."""
    attrs = pack_nla(IFLA_EXT_MASK, _U32.pack(RTEXT_FILTER_SKIP_STATS))
    if name is not None:
        attrs += pack_nla(IFLA_IFNAME, name.encode() + b"\0")
    return pack_msg(RTM_GETLINK, NLM_F_REQUEST, seq, IFINFO.pack(0, 0, index, 0, 0) + attrs)


def encode_link_dump(seq: int) -> bytes:
    """RTM_GETLINK dump of every link (AF_UNSPEC: each link once)."""
    attrs = pack_nla(IFLA_EXT_MASK, _U32.pack(RTEXT_FILTER_SKIP_STATS))
    return pack_msg(RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, seq, IFINFO.pack(0, 0, 0, 0, 0) + attrs)


def vxlan_info_data(
    vni: int, local: IPAddress | None, dev_index: int | None, port: int, learning: bool, gbp: bool
) -> bytes:
    """IFLA_INFO_DATA of `type vxlan id VNI local LOCAL dev DEV [dstport PORT] [no]learning [gbp]`."""
    out = pack_nla(IFLA_VXLAN_ID, _U32.pack(vni)) + pack_nla(IFLA_VXLAN_LEARNING, _U8.pack(int(learning)))
    if local is not None:
        out += pack_nla(IFLA_VXLAN_LOCAL if local.version == 4 else IFLA_VXLAN_LOCAL6, local.packed)
    if dev_index:
        out += pack_nla(IFLA_VXLAN_LINK, _U32.pack(dev_index))
    if port:
        out += pack_nla(IFLA_VXLAN_PORT, _BE16.pack(port))
    if gbp:
        out += pack_nla(IFLA_VXLAN_GBP, b"")
    return out


def ipip_info_data(local: IPv4Address | None, pmtudisc: bool) -> bytes:
    """IFLA_INFO_DATA of `type ipip [local LOCAL] [no]pmtudisc` (remote any, no dev, ttl inherit)."""
    out = pack_nla(IFLA_IPTUN_PMTUDISC, _U8.pack(int(pmtudisc)))
    if local is not None:
        out += pack_nla(IFLA_IPTUN_LOCAL, local.packed)
    return out


def encode_link_new(seq: int, name: str, kind: str, mtu: int | None, mac: str | None, info_data: bytes) -> bytes:
    """`ip link add NAME [mtu MTU] [address MAC] type KIND ...`: fails with EEXIST when NAME exists."""
    attrs = pack_nla(IFLA_IFNAME, name.encode() + b"\0")
    if mtu:
        attrs += pack_nla(IFLA_MTU, _U32.pack(mtu))
    if mac:
        attrs += pack_nla(IFLA_ADDRESS, parse_mac(mac))
    info = pack_nla(IFLA_INFO_KIND, kind.encode())
    if info_data:
        info += pack_nla(IFLA_INFO_DATA, info_data)
    attrs += pack_nla(IFLA_LINKINFO, info)
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    return pack_msg(RTM_NEWLINK, flags, seq, IFINFO.pack(0, 0, 0, 0, 0) + attrs)


def encode_link_set(seq: int, index: int, *, up: bool | None = None, mtu: int | None = None) -> bytes:
    """`ip link set dev INDEX [up|down] [mtu MTU]`."""
    flags = change = 0
    if up is not None:
        flags, change = (IFF_UP if up else 0), IFF_UP
    attrs = pack_nla(IFLA_MTU, _U32.pack(mtu)) if mtu else b""
    return pack_msg(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, seq, IFINFO.pack(0, 0, index, flags, change) + attrs)


def encode_link_del(seq: int, index: int) -> bytes:
    return pack_msg(RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, seq, IFINFO.pack(0, 0, index, 0, 0))


def encode_addr(seq: int, action: Literal["add", "replace", "del"], index: int, iface: IPInterface) -> bytes:
    """`ip addr add|replace|del IP/LEN dev INDEX`: IFA_LOCAL and IFA_ADDRESS both the address, as iproute2 sends
    it for an address without a peer."""
    fam = AF_INET if iface.version == 4 else AF_INET6
    body = IFADDRMSG.pack(fam, iface.network.prefixlen, 0, RT_SCOPE_UNIVERSE, index)
    body += pack_nla(IFA_LOCAL, iface.ip.packed) + pack_nla(IFA_ADDRESS, iface.ip.packed)
    if action == "del":
        return pack_msg(RTM_DELADDR, NLM_F_REQUEST | NLM_F_ACK, seq, body)
    mode = NLM_F_EXCL if action == "add" else NLM_F_REPLACE
    return pack_msg(RTM_NEWADDR, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | mode, seq, body)


def encode_addr_dump(seq: int, family: int | None) -> bytes:
    return pack_msg(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, seq, IFADDRMSG.pack(family or 0, 0, 0, 0, 0))


def decode_addr(buf: bytes | memoryview, off: int, end: int) -> Address | None:
    fam, plen, _flags, scope, index = IFADDRMSG.unpack_from(buf, off)
    if fam not in (AF_INET, AF_INET6):
        return None
    local = addr = b""
    for kind, a, b in iter_nla(buf, off + IFADDRMSG.size, end):
        if kind == IFA_LOCAL:
            local = bytes(buf[a:b])
        elif kind == IFA_ADDRESS:
            addr = bytes(buf[a:b])
    # IFA_LOCAL is the interface's own address on point-to-point links; IFA_ADDRESS is the peer there.
    raw = local or addr
    if len(raw) != (4 if fam == AF_INET else 16):
        return None
    # From the packed bytes, as decode_route builds its networks.
    iface: IPInterface = (IPv4Interface if fam == AF_INET else IPv6Interface)((raw, plen))
    return Address(index=index, address=iface, scope=scope)


def encode_route_get(seq: int, target: IPAddress) -> bytes:
    """`ip route get TARGET`: the reply is one RTM_NEWROUTE (decode_route) or an error."""
    fam = AF_INET if target.version == 4 else AF_INET6
    body = RTMSG.pack(fam, target.max_prefixlen, 0, 0, 0, 0, 0, 0, 0) + pack_nla(RTA_DST, target.packed)
    return pack_msg(RTM_GETROUTE, NLM_F_REQUEST, seq, body)


EventKind = Literal["link", "route", "neigh", "fdb", "resync"]


@dataclass(frozen=True, slots=True)
class KernelEvent:
    """One change the kernel announced. kind "resync": notifications were lost (socket overrun), so the
    consumer must re-read the kernel state; action and obj carry nothing then."""

    kind: EventKind
    action: Literal["new", "del"]
    obj: Link | Route | Neigh | Fdb | None


RESYNC = KernelEvent("resync", "new", None)


def decode_error(buf: bytes | memoryview, off: int, end: int, flags: int) -> tuple[int, str]:
    """An NLMSG_ERROR body: (errno, the kernel's extended-ack text or ""); errno 0 is an ack."""
    code = -struct.unpack_from("=i", buf, off)[0]
    msg = ""
    if flags & NLM_F_ACK_TLVS:
        start = off + 4 + 16
        if not flags & NLM_F_CAPPED:
            start = off + 4 + HDR.unpack_from(buf, off + 4)[0]
        for kind, a, b in iter_nla(buf, start, end):
            if kind == NLMSGERR_ATTR_MSG:
                msg = bytes(buf[a:b]).rstrip(b"\0").decode(errors="replace")
    return code, msg


# Every public name above; pyflannel.netlink re-exports them all.
__all__ = [
    "AF_BRIDGE",
    "AF_INET",
    "AF_INET6",
    "HDR",
    "IFADDRMSG",
    "IFA_ADDRESS",
    "IFA_LOCAL",
    "IFF_UP",
    "IFINFO",
    "IFLA_ADDRESS",
    "IFLA_EXT_MASK",
    "IFLA_IFNAME",
    "IFLA_INFO_DATA",
    "IFLA_INFO_KIND",
    "IFLA_IPTUN_ENCAP_LIMIT",
    "IFLA_IPTUN_FLAGS",
    "IFLA_IPTUN_FLOWINFO",
    "IFLA_IPTUN_LINK",
    "IFLA_IPTUN_LOCAL",
    "IFLA_IPTUN_PMTUDISC",
    "IFLA_IPTUN_PROTO",
    "IFLA_IPTUN_REMOTE",
    "IFLA_IPTUN_TOS",
    "IFLA_IPTUN_TTL",
    "IFLA_LINKINFO",
    "IFLA_MTU",
    "IFLA_VXLAN_GBP",
    "IFLA_VXLAN_ID",
    "IFLA_VXLAN_LEARNING",
    "IFLA_VXLAN_LINK",
    "IFLA_VXLAN_LOCAL",
    "IFLA_VXLAN_LOCAL6",
    "IFLA_VXLAN_PORT",
    "IP6_RT_PRIO_USER",
    "NDA_DST",
    "NDA_LLADDR",
    "NDMSG",
    "NETLINK_CAP_ACK",
    "NETLINK_EXT_ACK",
    "NETLINK_ROUTE",
    "NLMSGERR_ATTR_MSG",
    "NLMSG_DONE",
    "NLMSG_ERROR",
    "NLM_F_ACK",
    "NLM_F_ACK_TLVS",
    "NLM_F_APPEND",
    "NLM_F_CAPPED",
    "NLM_F_CREATE",
    "NLM_F_DUMP",
    "NLM_F_DUMP_INTR",
    "NLM_F_EXCL",
    "NLM_F_MULTI",
    "NLM_F_REPLACE",
    "NLM_F_REQUEST",
    "NTF_SELF",
    "NUD_NOARP",
    "NUD_PERMANENT",
    "RESYNC",
    "RTA_DST",
    "RTA_GATEWAY",
    "RTA_MULTIPATH",
    "RTA_OIF",
    "RTA_PRIORITY",
    "RTA_TABLE",
    "RTEXT_FILTER_SKIP_STATS",
    "RTMSG",
    "RTM_DELADDR",
    "RTM_DELLINK",
    "RTM_DELNEIGH",
    "RTM_DELROUTE",
    "RTM_GETADDR",
    "RTM_GETLINK",
    "RTM_GETNEIGH",
    "RTM_GETROUTE",
    "RTM_NEWADDR",
    "RTM_NEWLINK",
    "RTM_NEWNEIGH",
    "RTM_NEWROUTE",
    "RTNH_F_ONLINK",
    "RTNLGRP_IPV4_ROUTE",
    "RTNLGRP_IPV6_ROUTE",
    "RTNLGRP_LINK",
    "RTNLGRP_NEIGH",
    "RTN_BLACKHOLE",
    "RTN_UNICAST",
    "RTPROT_BOOT",
    "RTPROT_KERNEL",
    "RT_SCOPE_LINK",
    "RT_SCOPE_NOWHERE",
    "RT_SCOPE_UNIVERSE",
    "RT_TABLE_MAIN",
    "RT_TABLE_UNSPEC",
    "SOL_NETLINK",
    "SO_RCVBUFFORCE",
    "SO_SNDBUFFORCE",
    "Address",
    "DefaultRouteInfo",
    "DeviceState",
    "EventKind",
    "Fdb",
    "IPAddress",
    "IPInterface",
    "IPNetwork",
    "IpipInfo",
    "KernelEvent",
    "Link",
    "Neigh",
    "NetlinkError",
    "Op",
    "Route",
    "VxlanInfo",
    "decode_addr",
    "decode_error",
    "decode_link",
    "decode_neigh",
    "decode_route",
    "encode_addr",
    "encode_addr_dump",
    "encode_link_del",
    "encode_link_dump",
    "encode_link_get",
    "encode_link_new",
    "encode_link_set",
    "encode_op",
    "encode_route_get",
    "format_mac",
    "ipip_info_data",
    "is_missing",
    "iter_nla",
    "pack_msg",
    "pack_nla",
    "parse_mac",
    "vxlan_info_data",
]
