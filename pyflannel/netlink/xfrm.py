"""IPsec policies (the kernel's xfrm SPD) over NETLINK_XFRM: the codec, pure like codec.py, and Xfrm, which sends
its requests through RawRoute on the Netlink worker thread (the package's one concurrency model).

Only what the ipsec backend needs: tunnel-mode ESP policies with one template, added or replaced
(XFRM_MSG_UPDPOLICY, idempotent), deleted (XFRM_MSG_DELPOLICY by selector and direction) and dumped
(XFRM_MSG_GETPOLICY with NLM_F_DUMP). SAs are charon's business: it installs them through its own kernel plugin.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import TYPE_CHECKING

from .codec import (
    AF_INET,
    AF_INET6,
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    IPAddress,
    IPNetwork,
    NetlinkError,
    iter_nla,
    pack_msg,
    pack_nla,
)
from .raw import RawRoute

if TYPE_CHECKING:
    from .api import Netlink

NETLINK_XFRM = 6
XFRM_MSG_NEWPOLICY = 0x13
XFRM_MSG_DELPOLICY = 0x14
XFRM_MSG_GETPOLICY = 0x15
XFRM_MSG_UPDPOLICY = 0x19
XFRMA_TMPL = 5
XFRM_POLICY_IN = 0
XFRM_POLICY_OUT = 1
XFRM_POLICY_FWD = 2
XFRM_POLICY_ALLOW = 0
XFRM_MODE_TRANSPORT = 0
XFRM_MODE_TUNNEL = 1
IPPROTO_ESP = 50
XFRM_INF = (1 << 64) - 1
DIRS = {XFRM_POLICY_IN: "in", XFRM_POLICY_OUT: "out", XFRM_POLICY_FWD: "fwd"}

# struct xfrm_selector: daddr, saddr (xfrm_address_t, 16 bytes each), dport, dport_mask, sport, sport_mask (be16),
# family (u16), prefixlen_d, prefixlen_s, proto (u8), 3 bytes of padding, ifindex (int), user (uid).
SELECTOR = struct.Struct("=16s16sHHHHHBBB3xiI")
# struct xfrm_lifetime_cfg (8 u64) and xfrm_lifetime_cur (4 u64).
LIFETIME_CFG = struct.Struct("=8Q")
LIFETIME_CUR = struct.Struct("=4Q")
# struct xfrm_userpolicy_info: selector, lft, curlft, priority, index (u32), dir, action, flags, share (u8),
# padded to 8 bytes.
POLICY_INFO = struct.Struct("=" + "56s64s32s" + "IIBBBB4x")
# struct xfrm_userpolicy_id: selector, index (u32), dir (u8), padded.
POLICY_ID = struct.Struct("=56sIB3x")
# struct xfrm_user_tmpl: xfrm_id (daddr 16, spi be32, proto u8, 3 pad), family (u16, 2 pad), saddr (16),
# reqid (u32), mode, share, optional (u8, 1 pad), aalgos, ealgos, calgos (u32).
TMPL = struct.Struct("=16sIB3xH2x16sIBBBxIII")

assert SELECTOR.size == 56 and POLICY_INFO.size == 168 and POLICY_ID.size == 64 and TMPL.size == 64


@dataclass(frozen=True, slots=True, order=True)
class XfrmTmpl:
    """One template of a policy: what the kernel needs to find (or ask for) the SA."""

    src: IPAddress
    dst: IPAddress
    reqid: int
    proto: int = IPPROTO_ESP
    mode: int = XFRM_MODE_TUNNEL


@dataclass(frozen=True, slots=True)
class XfrmPolicy:
    """`ip xfrm policy add src SRC dst DST dir DIR tmpl src .. dst .. proto esp reqid R mode tunnel`."""

    src: IPNetwork
    dst: IPNetwork
    dir: int
    tmpls: tuple[XfrmTmpl, ...] = ()
    priority: int = 0
    action: int = XFRM_POLICY_ALLOW

    @property
    def key(self) -> tuple[IPNetwork, IPNetwork, int]:
        """What identifies a policy to the kernel (with no mark, no interface, no ports)."""
        return (self.src, self.dst, self.dir)

    def __str__(self) -> str:
        t = " ".join(
            f"tmpl src {x.src} dst {x.dst} proto {'esp' if x.proto == IPPROTO_ESP else x.proto} reqid {x.reqid} "
            f"mode {'tunnel' if x.mode == XFRM_MODE_TUNNEL else x.mode}"
            for x in self.tmpls
        )
        return f"src {self.src} dst {self.dst} dir {DIRS.get(self.dir, self.dir)} priority {self.priority} {t}".strip()


def _family(n: IPNetwork | IPAddress) -> int:
    return AF_INET if n.version == 4 else AF_INET6


def _addr(a: IPAddress) -> bytes:
    return a.packed.ljust(16, b"\0")


def _from_addr(family: int, raw: bytes) -> IPAddress:
    return IPv4Address(raw[:4]) if family == AF_INET else IPv6Address(raw[:16])


def _selector(src: IPNetwork, dst: IPNetwork) -> bytes:
    if src.version != dst.version:
        raise ValueError("a selector's source and destination are of one IP version")
    return SELECTOR.pack(
        _addr(dst.network_address), _addr(src.network_address), 0, 0, 0, 0,
        _family(src), dst.prefixlen, src.prefixlen, 0, 0, 0,
    )  # fmt: skip


def encode_tmpl(t: XfrmTmpl) -> bytes:
    # aalgos/ealgos/calgos all ones: any algorithm, as `ip xfrm policy` sets them.
    return TMPL.pack(_addr(t.dst), 0, t.proto, _family(t.dst), _addr(t.src), t.reqid, t.mode, 0, 0,
                     0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)  # fmt: skip


def encode_policy_update(seq: int, p: XfrmPolicy) -> bytes:
    """XFRM_MSG_UPDPOLICY: add the policy, or replace the one with the same selector and direction."""
    lft = LIFETIME_CFG.pack(XFRM_INF, XFRM_INF, XFRM_INF, XFRM_INF, 0, 0, 0, 0)
    body = POLICY_INFO.pack(_selector(p.src, p.dst), lft, bytes(32), p.priority, 0, p.dir, p.action, 0, 0)
    body += pack_nla(XFRMA_TMPL, b"".join(encode_tmpl(t) for t in p.tmpls))
    return pack_msg(XFRM_MSG_UPDPOLICY, NLM_F_REQUEST | NLM_F_ACK, seq, body)


def encode_policy_delete(seq: int, src: IPNetwork, dst: IPNetwork, direction: int) -> bytes:
    return pack_msg(XFRM_MSG_DELPOLICY, NLM_F_REQUEST | NLM_F_ACK, seq, POLICY_ID.pack(_selector(src, dst), 0,
                                                                                        direction))  # fmt: skip


def encode_policy_dump(seq: int) -> bytes:
    return pack_msg(XFRM_MSG_GETPOLICY, NLM_F_REQUEST | NLM_F_DUMP, seq, bytes(POLICY_ID.size))


def decode_policy(buf: bytes | memoryview, off: int, end: int) -> XfrmPolicy | None:
    """One XFRM_MSG_NEWPOLICY body (a dump reply); None for what is not a plain IPv4/IPv6 policy."""
    if end - off < POLICY_INFO.size:
        return None
    sel, _lft, _cur, priority, _index, direction, action, _flags, _share = POLICY_INFO.unpack_from(buf, off)
    daddr, saddr, _dp, _dpm, _sp, _spm, family, plen_d, plen_s, _proto, _ifindex, _user = SELECTOR.unpack(sel)
    if family not in (AF_INET, AF_INET6):
        return None
    net = IPv4Network if family == AF_INET else IPv6Network
    try:
        src = net((_from_addr(family, saddr), plen_s), strict=False)
        dst = net((_from_addr(family, daddr), plen_d), strict=False)
    except ValueError:
        return None
    tmpls: list[XfrmTmpl] = []
    for kind, a, b in iter_nla(buf, off + POLICY_INFO.size, end):
        if kind != XFRMA_TMPL:
            continue
        for o in range(a, b - TMPL.size + 1, TMPL.size):
            t_dst, _spi, proto, t_family, t_src, reqid, mode, _sh, _opt, _aa, _ea, _ca = TMPL.unpack_from(buf, o)
            if t_family not in (AF_INET, AF_INET6):
                continue
            tmpls.append(XfrmTmpl(_from_addr(t_family, t_src), _from_addr(t_family, t_dst), reqid, proto, mode))
    return XfrmPolicy(src, dst, direction, tuple(tmpls), priority, action)


def tunnel_policies(
    own_subnet: IPNetwork, peer_subnet: IPNetwork, own_ip: IPAddress, peer_ip: IPAddress, reqid: int
) -> tuple[XfrmPolicy, XfrmPolicy, XfrmPolicy]:
    """The three policies of one tunnel between two subnets (upstream's): out from our subnet through our public IP
    to the peer's, in and fwd from the peer's subnet to ours, the template naming the tunnel's ends as they appear
    on the packets each one matches."""
    out = XfrmPolicy(own_subnet, peer_subnet, XFRM_POLICY_OUT, (XfrmTmpl(own_ip, peer_ip, reqid),))
    back = (XfrmTmpl(peer_ip, own_ip, reqid),)
    return (
        out,
        XfrmPolicy(peer_subnet, own_subnet, XFRM_POLICY_IN, back),
        XfrmPolicy(peer_subnet, own_subnet, XFRM_POLICY_FWD, back),
    )


def _del(p: XfrmPolicy, seq: int) -> bytes:
    return encode_policy_delete(seq, p.src, p.dst, p.dir)


def _upd(p: XfrmPolicy, seq: int) -> bytes:
    return encode_policy_update(seq, p)


class Xfrm:
    """The xfrm policies of the namespace `nl` is bound to. Its socket is opened, used and closed on `nl`'s worker
    thread, through Netlink.on_worker like every other request of the package."""

    def __init__(self, nl: Netlink) -> None:
        self.nl = nl
        self._sock: RawRoute | None = None

    def _sock_w(self) -> RawRoute:
        if self._sock is None:
            try:
                self._sock = RawRoute(self.nl.netns, NETLINK_XFRM)
            except OSError as e:
                why = f"cannot open NETLINK_XFRM in netns {self.nl.netns}: {e} (a kernel without CONFIG_XFRM_USER?)"
                raise NetlinkError(e.errno or errno.EIO, why) from e
        return self._sock

    def _apply_w(self, update: Sequence[XfrmPolicy], delete: Sequence[XfrmPolicy]) -> list[NetlinkError]:
        sock = self._sock_w()
        errors: list[NetlinkError] = []
        for p in delete:
            try:
                sock.request(functools.partial(_del, p), f"xfrm policy del {p}")
            except NetlinkError as e:
                if e.errno != errno.ENOENT:
                    errors.append(e)
        for p in update:
            try:
                sock.request(functools.partial(_upd, p), f"xfrm policy update {p}")
            except NetlinkError as e:
                errors.append(e)
        return errors

    async def apply(self, update: Sequence[XfrmPolicy] = (), delete: Sequence[XfrmPolicy] = ()) -> list[NetlinkError]:
        """Delete `delete` (an absent one is no error), then add or replace `update`; the errors, one per failed
        request (the others are done)."""
        if not update and not delete:
            return []
        return await self.nl.on_worker(self._apply_w, update, delete)

    def _dump_w(self) -> list[XfrmPolicy]:
        return self._sock_w().dump_decoded(encode_policy_dump, decode_policy, "xfrm policy dump")

    async def policies(self) -> list[XfrmPolicy]:
        """`ip xfrm policy`: every main-type policy of the namespace (socket policies are not listed by the kernel)."""
        return await self.nl.on_worker(self._dump_w)

    def _close_w(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def close(self) -> None:
        # RuntimeError: the Netlink is closed already (its pool shut down), and the socket with it.
        with contextlib.suppress(RuntimeError):
            await self.nl.on_worker(self._close_w)


__all__ = [
    "DIRS",
    "IPPROTO_ESP",
    "NETLINK_XFRM",
    "XFRM_MODE_TUNNEL",
    "XFRM_POLICY_FWD",
    "XFRM_POLICY_IN",
    "XFRM_POLICY_OUT",
    "Xfrm",
    "XfrmPolicy",
    "XfrmTmpl",
    "decode_policy",
    "encode_policy_delete",
    "encode_policy_dump",
    "encode_policy_update",
    "tunnel_policies",
]
