"""The netlink package without root: the codec on hand-made messages, error texts, the package's exports and
its import graph."""

from __future__ import annotations

import ast
import errno
import ipaddress
import struct
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

import pytest

import pyflannel.netlink
from pyflannel.netlink import (
    IFA_ADDRESS,
    IFA_LOCAL,
    IFF_UP,
    IFINFO,
    IFLA_EXT_MASK,
    IFLA_IFNAME,
    NLM_F_ACK,
    NLM_F_ACK_TLVS,
    NLM_F_CAPPED,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REQUEST,
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_GETLINK,
    RTM_GETROUTE,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTN_BLACKHOLE,
    RTNH_F_ONLINK,
    Address,
    Fdb,
    IpipInfo,
    KernelEvent,
    Link,
    Neigh,
    Netlink,
    NetlinkError,
    Op,
    Route,
    VxlanInfo,
    codec,
    decode_addr,
    decode_error,
    decode_event,
    decode_link,
    decode_neigh,
    decode_route,
    encode_addr,
    encode_link_del,
    encode_link_dump,
    encode_link_get,
    encode_link_new,
    encode_link_set,
    encode_op,
    encode_route_get,
    format_mac,
    ipip_info_data,
    is_missing,
    iter_nla,
    parse_mac,
    vxlan_info_data,
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


class RefusingRaw:
    """A RawRoute whose requests the kernel refuses with `code`."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.sent: list[bytes] = []

    def request(self, encode: Any, what: str) -> None:
        self.sent.append(encode(7))
        raise NetlinkError(self.code, f"{what}: {errno.errorcode[self.code]}")


def test_create_link_errors() -> None:
    # What this machine's kernel answers for `type ipip` / `type wireguard`: it has no such module.
    nl = Netlink()
    try:
        raw = RefusingRaw(errno.EOPNOTSUPP)
        nl._raw = raw  # type: ignore[assignment]
        with pytest.raises(NetlinkError) as ei:
            nl._create_w("flannel.ipip", "ipip", 1480, None, ipip_info_data(IPv4Address("192.168.0.1"), False))
        assert ei.value.errno == errno.EOPNOTSUPP
        assert str(ei.value) == (
            "[Errno 95] create ipip flannel.ipip: the kernel lacks the `ipip` module (modprobe ipip): "
            "Operation not supported"
        )
        link = decode_link(raw.sent[0], 16, len(raw.sent[0]))
        assert (link.name, link.kind, link.mtu) == ("flannel.ipip", "ipip", 1480)
        assert link.ipip is not None and link.ipip.local == IPv4Address("192.168.0.1") and not link.ipip.pmtudisc
        # Any other refusal keeps its errno and names the request.
        nl._raw = RefusingRaw(errno.EEXIST)  # type: ignore[assignment]
        with pytest.raises(NetlinkError) as ei:
            nl._create_w("wg0", "wireguard", None, None, b"")
        assert ei.value.errno == errno.EEXIST and "create wireguard wg0" in str(ei.value)
        assert "module" not in str(ei.value)
    finally:
        nl._raw = None
        nl._pool.shutdown()


def test_link_requests_decode_back() -> None:
    # What encode_link_new sends is an RTM_NEWLINK body, so the one link decoder reads it back.
    data = vxlan_info_data(1, IPv4Address("192.168.0.1"), 3, 4789, False, True)
    msg = encode_link_new(9, "flannel.1", "vxlan", 1450, "0a:00:00:00:00:01", data)
    n, kind, flags, seq, _ = struct.unpack_from("=IHHII", msg)
    assert (n, kind, seq) == (len(msg), RTM_NEWLINK, 9)
    assert flags == NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    link = decode_link(msg, 16, len(msg))
    assert (link.name, link.kind, link.mtu, link.mac) == ("flannel.1", "vxlan", 1450, "0a:00:00:00:00:01")
    assert link.vxlan == VxlanInfo(vni=1, local=IPv4Address("192.168.0.1"), port=4789, learning=False, gbp=True, link=3)
    v6 = vxlan_info_data(2, IPv6Address("fd00::1"), None, 0, True, False)
    link6 = decode_link(m := encode_link_new(1, "flannel-v6.2", "vxlan", None, None, v6), 16, len(m))
    assert link6.vxlan == VxlanInfo(vni=2, local=IPv6Address("fd00::1"), port=0, learning=True, gbp=False, link=None)
    up = encode_link_set(3, 12, up=True, mtu=1400)
    _fam, _t, index, iflags, change = IFINFO.unpack_from(up, 16)
    assert (index, iflags, change) == (12, IFF_UP, IFF_UP)
    assert decode_link(up, 16, len(up)).mtu == 1400
    assert struct.unpack_from("=HH", encode_link_del(4, 12), 4)[0] == RTM_DELLINK


@pytest.mark.parametrize("iface", ["10.5.0.0/32", "192.168.1.7/24", "fd00:5::/128", "fd00::7/64"])
def test_address_requests_decode_back(iface: str) -> None:
    ifc = ipaddress.ip_interface(iface)
    for action, kind in (("add", RTM_NEWADDR), ("replace", RTM_NEWADDR), ("del", RTM_DELADDR)):
        msg = encode_addr(5, action, 12, ifc)  # type: ignore[arg-type]
        assert struct.unpack_from("=IH", msg)[1] == kind
        assert decode_addr(msg, 16, len(msg)) == Address(index=12, address=ifc, scope=0)
    # A point-to-point address: IFA_LOCAL is ours, IFA_ADDRESS the peer's.
    peer = (
        struct.pack("=BBBBI", 2, 32, 0, 0, 4)
        + nla(IFA_LOCAL, bytes([10, 0, 0, 1]))
        + nla(IFA_ADDRESS, bytes([10, 0, 0, 2]))
    )
    assert decode_addr(peer, 0, len(peer)) == Address(index=4, address=ipaddress.ip_interface("10.0.0.1/32"))


def test_route_get_request() -> None:
    msg = encode_route_get(8, IPv4Address("10.1.2.3"))
    assert struct.unpack_from("=IH", msg)[1] == RTM_GETROUTE
    fam, dst_len = struct.unpack_from("=BB", msg, 16)
    assert (fam, dst_len) == (2, 32)
    assert decode_route(msg, 16, len(msg)) is not None


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


def test_encode_chunks_numbers_every_op_and_acks_only_each_chunks_last() -> None:
    from pyflannel.netlink.raw import encode_chunks

    ops = [
        Op.replace(Route(dst=IPv4Network(f"10.1.{i}.0/24"), gateway=IPv4Address(f"10.1.{i}.0"), oif=3, onlink=True))
        for i in range(200)
    ]
    chunks = list(encode_chunks(ops, 41, max_chunk=1024))
    assert len(chunks) > 5
    # Consecutive and complete: each chunk starts where the one before ended.
    assert [i for _, i, _ in chunks] == [0] + [j for _, _, j in chunks[:-1]]
    assert chunks[-1][2] == len(ops)
    for data, i, j in chunks:
        assert len(data) <= 1024
        off = 0
        for k in range(i, j):
            n, _kind, flags, seq, _pid = struct.unpack_from("=IHHII", data, off)
            assert seq == 41 + k
            assert bool(flags & NLM_F_ACK) == (k == j - 1)
            assert data[off : off + n] == encode_op(ops[k], 41 + k, ack=k == j - 1)
            off += n
        assert off == len(data)


def test_codec_is_pure() -> None:
    """No sockets are opened, no threads or event loops, no pyroute2 in the codec."""
    allowed = {"__future__", "errno", "ipaddress", "socket", "struct", "collections.abc", "dataclasses", "typing"}
    assert imports_of(PKG / "codec.py") <= allowed
    src = (PKG / "codec.py").read_text()
    assert "socket.socket" not in src and "socket.AF_NETLINK" not in src
