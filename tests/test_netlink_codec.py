"""The netlink package without root: the codec on hand-made messages, error texts, the package's exports and
its import graph."""

from __future__ import annotations

import ast
import errno
import struct
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

import pytest
from pyroute2.netlink.exceptions import NetlinkError as Pyroute2Error

import pyflannel.netlink
from pyflannel.netlink import (
    IFLA_EXT_MASK,
    IFLA_IFNAME,
    NLM_F_ACK_TLVS,
    NLM_F_CAPPED,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    RTM_DELLINK,
    RTM_GETLINK,
    RTM_NEWLINK,
    RTN_BLACKHOLE,
    RTNH_F_ONLINK,
    Fdb,
    IpipInfo,
    KernelEvent,
    Link,
    Neigh,
    NetlinkError,
    Op,
    Route,
    VxlanInfo,
    codec,
    decode_error,
    decode_event,
    decode_link,
    decode_neigh,
    decode_route,
    encode_link_dump,
    encode_link_get,
    encode_op,
    format_mac,
    iproute,
    is_missing,
    iter_nla,
    parse_mac,
)

NLA_F_NESTED = 0x8000
IFF_UP_RUNNING = 0x1 | 0x40 | 0x10000  # IFF_UP | IFF_RUNNING | IFF_LOWER_UP


def nla(kind: int, payload: bytes, nested: bool = False) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind | (NLA_F_NESTED if nested else 0)) + payload + b"\0" * (-n & 3)


def newlink(index: int, flags: int, *attrs: bytes, ifi_type: int = 1) -> bytes:
    """A whole RTM_NEWLINK message as the kernel sends it: nlmsghdr, ifinfomsg, attributes."""
    body = struct.pack("=BxHiII", 0, ifi_type, index, flags, 0) + b"".join(attrs)
    return struct.pack("=IHHII", 16 + len(body), RTM_NEWLINK, 0, 0, 0) + body


def linkinfo(kind: str, *data: bytes) -> bytes:
    info = nla(1, kind.encode() + b"\0")  # IFLA_INFO_KIND
    if data:
        info += nla(2, b"".join(data), nested=True)  # IFLA_INFO_DATA
    return nla(18, info, nested=True)  # IFLA_LINKINFO


def u8(v: int) -> bytes:
    return struct.pack("=B", v)


def u32(v: int) -> bytes:
    return struct.pack("=I", v)


def test_codec_round_trip() -> None:
    r = Route(dst=IPv4Network("10.1.2.0/24"), gateway=IPv4Address("10.1.2.0"), oif=7, onlink=True)
    buf = encode_op(Op.replace(r), 5, ack=True)
    assert decode_route(buf, 16, len(buf)) == r
    r6 = Route(dst=IPv6Network("fd00:1:2::/64"), gateway=IPv6Address("fe80::1"), oif=3)
    buf = encode_op(Op.replace(r6), 6, ack=False)
    assert decode_route(buf, 16, len(buf)) == r6
    bh = Route(dst=IPv4Network("10.244.1.0/24"), type=RTN_BLACKHOLE)
    buf = encode_op(Op.replace(bh), 9, ack=True)
    assert decode_route(buf, 16, len(buf)) == bh and bh != Route(dst=bh.dst)
    n = Neigh(ifindex=4, dst=IPv4Address("10.1.2.0"), lladdr="0a:00:00:00:00:01")
    buf = encode_op(Op.replace(n), 7, ack=False)
    assert decode_neigh(buf, 16, len(buf)) == n
    f = Fdb(ifindex=4, lladdr="0a:00:00:00:00:01", dst=IPv4Address("192.168.0.2"))
    buf = encode_op(Op.replace(f), 8, ack=False)
    assert decode_neigh(buf, 16, len(buf)) == f
    assert format_mac(parse_mac("0A-0B-0C-0D-0E-0F")) == "0a:0b:0c:0d:0e:0f"
    with pytest.raises(ValueError):
        parse_mac("0a:0b")


def test_route_wire_form() -> None:
    """An onlink route on the wire, field by field: what `ip route replace ... onlink` sends."""
    r = Route(dst=IPv4Network("10.1.2.0/24"), gateway=IPv4Address("10.1.2.0"), oif=7, onlink=True)
    buf = encode_op(Op.replace(r), 5, ack=True)
    length, mtype, flags, seq, _pid = struct.unpack_from("=IHHII", buf)
    assert (length, mtype, seq) == (len(buf), 24, 5)  # RTM_NEWROUTE
    assert flags == NLM_F_REQUEST | 0x4 | 0x400 | 0x100  # ACK | CREATE | REPLACE
    fam, dst_len, _s, _t, table, _p, scope, rtype, rflags = struct.unpack_from("=BBBBBBBBI", buf, 16)
    assert (fam, dst_len, table, scope, rtype, rflags) == (2, 24, 254, 0, 1, RTNH_F_ONLINK)
    attrs = {k: bytes(buf[a:b]) for k, a, b in iter_nla(buf, 16 + 12, len(buf))}
    assert attrs == {15: u32(254), 1: bytes([10, 1, 2, 0]), 5: bytes([10, 1, 2, 0]), 4: u32(7)}


def test_decode_vxlan_link() -> None:
    msg = newlink(
        6,
        IFF_UP_RUNNING,
        nla(IFLA_IFNAME, b"flannel.1\0"),
        nla(4, u32(1450)),  # IFLA_MTU
        nla(1, bytes.fromhex("0a0000000001")),  # IFLA_ADDRESS
        linkinfo(
            "vxlan",
            nla(1, u32(1)),  # IFLA_VXLAN_ID
            nla(3, u32(2)),  # IFLA_VXLAN_LINK
            nla(4, bytes([192, 168, 0, 1])),  # IFLA_VXLAN_LOCAL
            nla(7, u8(0)),  # IFLA_VXLAN_LEARNING
            nla(15, struct.pack("!H", 8472)),  # IFLA_VXLAN_PORT, big endian
            nla(23, b""),  # IFLA_VXLAN_GBP (a flag)
        ),
    )
    want = Link(
        index=6,
        name="flannel.1",
        kind="vxlan",
        mtu=1450,
        mac="0a:00:00:00:00:01",
        up=True,
        vxlan=VxlanInfo(vni=1, local=IPv4Address("192.168.0.1"), port=8472, learning=False, gbp=True, link=2),
    )
    assert decode_link(msg, 16, len(msg)) == want
    assert decode_event(msg, 0, len(msg), RTM_NEWLINK) == KernelEvent("link", "new", want)


def test_decode_ipip_link() -> None:
    """What the kernel's ipip_fill_info() sends for `ip link add flannel.ipip type ipip local 192.168.0.1`."""
    data = [
        nla(1, u32(0)),  # IFLA_IPTUN_LINK: no dev
        nla(2, bytes([192, 168, 0, 1])),  # IFLA_IPTUN_LOCAL
        nla(3, bytes(4)),  # IFLA_IPTUN_REMOTE 0.0.0.0: any
        nla(4, u8(0)),  # IFLA_IPTUN_TTL: inherit
        nla(5, u8(0)),  # IFLA_IPTUN_TOS
        nla(9, u8(4)),  # IFLA_IPTUN_PROTO: IPPROTO_IPIP
        nla(10, u8(1)),  # IFLA_IPTUN_PMTUDISC
        nla(20, u32(0)),  # IFLA_IPTUN_FWMARK
    ]
    msg = newlink(
        9,
        0,
        nla(IFLA_IFNAME, b"flannel.ipip\0"),
        nla(4, u32(1480)),
        nla(1, bytes([192, 168, 0, 1])),  # IFLA_ADDRESS of a tunnel: the local IPv4 address, not a MAC
        linkinfo("ipip", *data),
        ifi_type=768,  # ARPHRD_TUNNEL
    )
    ipip = IpipInfo(local=IPv4Address("192.168.0.1"), remote=None, link=None, ttl=0, pmtudisc=True)
    want = Link(index=9, name="flannel.ipip", kind="ipip", mtu=1480, mac=None, up=False, ipip=ipip)
    assert decode_link(msg, 16, len(msg)) == want
    assert decode_event(msg, 0, len(msg), RTM_DELLINK) == KernelEvent("link", "del", want)

    # A point-to-point tunnel on a device, with a fixed TTL and no PMTU discovery.
    data = [nla(1, u32(3)), nla(2, bytes(4)), nla(3, bytes([10, 0, 0, 2])), nla(4, u8(64)), nla(10, u8(0))]
    msg = newlink(10, 0, nla(IFLA_IFNAME, b"t1\0"), linkinfo("ipip", *data), ifi_type=768)
    got = decode_link(msg, 16, len(msg))
    assert got.ipip == IpipInfo(local=None, remote=IPv4Address("10.0.0.2"), link=3, ttl=64, pmtudisc=False)
    assert got.vxlan is None

    # The fallback device `tunl0` of a namespace, and an ipip link without IFLA_INFO_DATA.
    msg = newlink(2, 0, nla(IFLA_IFNAME, b"tunl0\0"), linkinfo("ipip", nla(2, bytes(4)), nla(3, bytes(4))))
    assert decode_link(msg, 16, len(msg)).ipip == IpipInfo(None, None, None, 0, False)
    msg = newlink(2, 0, nla(IFLA_IFNAME, b"x\0"), linkinfo("ipip"))
    assert decode_link(msg, 16, len(msg)).ipip is None


def test_decode_tun_link() -> None:
    """`ip tuntap add dev tun0 mode tun`: kind "tun", no hardware address, IFLA_TUN_* data ignored."""
    data = [nla(3, u8(1)), nla(4, u8(0)), nla(5, u8(0)), nla(6, u8(1)), nla(7, u8(0))]  # TYPE PI VNET PERSIST MQ
    msg = newlink(
        4,
        0x1000,  # IFF_MULTICAST
        nla(IFLA_IFNAME, b"tun0\0"),
        nla(13, u32(500)),  # IFLA_TXQLEN: not ours
        nla(4, u32(1500)),
        linkinfo("tun", *data),
        ifi_type=65534,  # ARPHRD_NONE
    )
    assert decode_link(msg, 16, len(msg)) == Link(index=4, name="tun0", kind="tun", mtu=1500, mac=None, up=False)


def test_decode_link_without_linkinfo() -> None:
    msg = newlink(1, 0x1 | 0x8, nla(IFLA_IFNAME, b"lo\0"), nla(4, u32(65536)), nla(1, bytes(6)))
    assert decode_link(msg, 16, len(msg)) == Link(1, "lo", None, 65536, "00:00:00:00:00:00", True)


def test_link_requests() -> None:
    def parse(buf: bytes) -> tuple[tuple[int, ...], tuple[int, ...], dict[int, bytes]]:
        hdr = struct.unpack_from("=IHHII", buf)
        assert hdr[0] == len(buf)
        ifi = struct.unpack_from("=BxHiII", buf, 16)
        return hdr[1:4], ifi, {k: bytes(buf[a:b]) for k, a, b in iter_nla(buf, 32, len(buf))}

    hdr, ifi, attrs = parse(encode_link_get(7, name="flannel.1"))
    assert hdr == (RTM_GETLINK, NLM_F_REQUEST, 7) and ifi == (0, 0, 0, 0, 0)
    assert attrs == {IFLA_IFNAME: b"flannel.1\0", IFLA_EXT_MASK: u32(1 << 3)}  # RTEXT_FILTER_SKIP_STATS
    hdr, ifi, attrs = parse(encode_link_get(8, index=5))
    assert hdr == (RTM_GETLINK, NLM_F_REQUEST, 8) and ifi[2] == 5 and IFLA_IFNAME not in attrs
    hdr, ifi, attrs = parse(encode_link_dump(9))
    assert hdr == (RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, 9) and ifi == (0, 0, 0, 0, 0)


def test_decode_error() -> None:
    # NLMSG_ERROR with a capped request (its header only) and the kernel's extended-ack text.
    orig = struct.pack("=IHHII", 40, 24, 0x405, 3, 0)
    body = struct.pack("=i", -errno.ENETUNREACH) + orig + nla(1, b"Nexthop has invalid gateway\0")
    assert decode_error(body, 0, len(body), NLM_F_CAPPED | NLM_F_ACK_TLVS) == (
        errno.ENETUNREACH,
        "Nexthop has invalid gateway",
    )
    ack = struct.pack("=i", 0) + orig
    assert decode_error(ack, 0, len(ack), NLM_F_CAPPED) == (0, "")
    assert is_missing(NetlinkError(errno.ESRCH, "x")) and not is_missing(NetlinkError(errno.EEXIST, "x"))


class FakeIPRoute:
    """Answers `link add` like pyroute2 does when the kernel refuses it."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.calls: list[dict[str, Any]] = []

    def link(self, what: str, **kw: Any) -> None:
        self.calls.append({"what": what, **kw})
        raise Pyroute2Error(self.code, errno.errorcode[self.code])


def test_create_link_errors() -> None:
    # What this machine's kernel answers for `type ipip` / `type wireguard`: it has no such module.
    ipr = FakeIPRoute(errno.EOPNOTSUPP)
    with pytest.raises(NetlinkError) as ei:
        iproute.create_link(ipr, "flannel.ipip", "ipip", 1480, None, {"ipip_local": "192.168.0.1"})
    assert ei.value.errno == errno.EOPNOTSUPP
    assert str(ei.value) == (
        "[Errno 95] create ipip flannel.ipip: the kernel lacks the `ipip` module (modprobe ipip): "
        "Operation not supported"
    )
    assert ipr.calls == [
        {"what": "add", "ifname": "flannel.ipip", "kind": "ipip", "ipip_local": "192.168.0.1", "mtu": 1480}
    ]
    # Any other refusal keeps its errno and names the request.
    with pytest.raises(NetlinkError) as ei:
        iproute.create_link(FakeIPRoute(errno.EEXIST), "wg0", "wireguard", None, None, {})
    assert ei.value.errno == errno.EEXIST and "create wireguard wg0" in str(ei.value)
    assert "module" not in str(ei.value)


# ---------------------------------------------------------------- the package itself

PKG = Path(pyflannel.netlink.__file__).parent

# Every name imported from pyflannel.netlink by pyflannel/, tests/ and bench/ when it became a package.
CALLERS_IMPORT = (
    "AF_INET",
    "AF_INET6",
    "NTF_SELF",
    "NUD_PERMANENT",
    "RT_TABLE_MAIN",
    "RTN_UNICAST",
    "RTN_BLACKHOLE",
    "RTPROT_KERNEL",
    "RESYNC",
    "Fdb",
    "IPAddress",
    "IPNetwork",
    "KernelEvent",
    "KernelMonitor",
    "Link",
    "Neigh",
    "Netlink",
    "NetlinkError",
    "Op",
    "Route",
    "is_missing",
    "parse_mac",
    "format_mac",
    "encode_op",
    "decode_route",
    "decode_neigh",
)


def test_package_exports() -> None:
    for name in CALLERS_IMPORT:
        assert name in pyflannel.netlink.__all__ and hasattr(pyflannel.netlink, name), name
    # The package re-exports every public name of the codec, and codec.__all__ lists them all.
    tree = ast.parse((PKG / "codec.py").read_text())
    defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)}
    defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    public = {n for n in defined if not n.startswith("_")}
    assert public == set(codec.__all__)
    assert set(codec.__all__) <= set(pyflannel.netlink.__all__)
    assert all(hasattr(pyflannel.netlink, n) for n in pyflannel.netlink.__all__)


def imports_of(path: Path) -> set[str]:
    """Modules a file imports (relative imports resolved against pyflannel.netlink), including lazy ones."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                out.add(node.module or "")
            else:
                base = ["pyflannel", "netlink"][: 3 - node.level]
                out.add(".".join([*base, *([node.module] if node.module else [])]))
    return out


def test_package_imports_nothing_of_pyflannel_outside_it() -> None:
    for path in PKG.glob("*.py"):
        outside = {m for m in imports_of(path) if m.startswith("pyflannel") and not m.startswith("pyflannel.netlink")}
        assert not outside, f"{path.name} imports {outside}: the netlink package must not depend on the rest"


def test_codec_is_pure() -> None:
    """No sockets are opened, no threads or event loops, no pyroute2 in the codec."""
    allowed = {"__future__", "errno", "ipaddress", "socket", "struct", "collections.abc", "dataclasses", "typing"}
    assert imports_of(PKG / "codec.py") <= allowed
    src = (PKG / "codec.py").read_text()
    assert "socket.socket" not in src and "socket.AF_NETLINK" not in src
