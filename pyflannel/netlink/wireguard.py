"""WireGuard's configuration values and the kernel's generic netlink codec for them; pure, like codec.py.

Keys: PublicKey (printable) and SecretKey (a private key or a preshared key: its repr and str never show it, and
the bytes come out only through the explicit `reveal_*` methods, so a log line, an exception or a dataclass repr
that includes one prints `SecretKey(redacted)`). X25519 (RFC 7748) derives a public key from a private one.

Devices and peers: WgDevice / WgPeer describe what a device holds, WgUpdate what to change. The kernel path speaks
them over generic netlink (family "wireguard", resolved by name through the `nlctrl` family); the wireguard-go
path speaks the same values over its UAPI socket (backend/wireguard_go.py). The socket side is raw.py's RawRoute
opened on NETLINK_GENERIC and driven from api.py on the Netlink worker thread.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .codec import (
    AF_INET,
    AF_INET6,
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    IPAddress,
    IPNetwork,
    iter_nla,
    pack_msg,
    pack_nla,
)

NETLINK_GENERIC = 16
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
NLA_F_NESTED = 0x8000

# linux/wireguard.h
WG_GENL_NAME = "wireguard"
WG_GENL_VERSION = 1
WG_KEY_LEN = 32
WG_CMD_GET_DEVICE = 0
WG_CMD_SET_DEVICE = 1
WGDEVICE_F_REPLACE_PEERS = 1
WGDEVICE_A_IFINDEX = 1
WGDEVICE_A_IFNAME = 2
WGDEVICE_A_PRIVATE_KEY = 3
WGDEVICE_A_PUBLIC_KEY = 4
WGDEVICE_A_FLAGS = 5
WGDEVICE_A_LISTEN_PORT = 6
WGDEVICE_A_FWMARK = 7
WGDEVICE_A_PEERS = 8
WGPEER_F_REMOVE_ME = 1
WGPEER_F_REPLACE_ALLOWEDIPS = 2
WGPEER_A_PUBLIC_KEY = 1
WGPEER_A_PRESHARED_KEY = 2
WGPEER_A_FLAGS = 3
WGPEER_A_ENDPOINT = 4
WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL = 5
WGPEER_A_LAST_HANDSHAKE_TIME = 6
WGPEER_A_RX_BYTES = 7
WGPEER_A_TX_BYTES = 8
WGPEER_A_ALLOWEDIPS = 9
WGALLOWEDIP_A_FAMILY = 1
WGALLOWEDIP_A_IPADDR = 2
WGALLOWEDIP_A_CIDR_MASK = 3

GENLMSG = struct.Struct("=BBH")
_U16 = struct.Struct("=H")
_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")
_TIMESPEC = struct.Struct("=qq")
_SOCKADDR_IN = struct.Struct("=H2s4s8x")
_SOCKADDR_IN6 = struct.Struct("=H2sI16sI")
_BE16 = struct.Struct("!H")

# A request the kernel takes in one piece: far below the socket's send buffer; a large peer set is split.
MAX_SET_MESSAGE = 32 * 1024
_ZERO_KEY = bytes(WG_KEY_LEN)


# ---------------------------------------------------------------- keys


def _decode_key(text: str) -> bytes:
    """32 bytes from the standard base64 form (44 characters, as `wg genkey` prints); ValueError otherwise. The
    message never repeats the input: it may be a secret."""
    text = text.strip()
    if len(text) != 44 or not text.endswith("="):
        raise ValueError("not a WireGuard key: expected 44 base64 characters encoding 32 bytes")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not a WireGuard key: not valid base64") from None
    if len(raw) != WG_KEY_LEN:
        raise ValueError("not a WireGuard key: expected 32 bytes")
    return raw


class PublicKey:
    """A WireGuard public key; prints as its base64 form."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        if len(raw) != WG_KEY_LEN:
            raise ValueError("a WireGuard key is 32 bytes")
        self.raw = bytes(raw)

    @classmethod
    def from_base64(cls, text: str) -> PublicKey:
        return cls(_decode_key(text))

    def __str__(self) -> str:
        return base64.b64encode(self.raw).decode()

    def __repr__(self) -> str:
        return f"PublicKey({self})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and self.raw == other.raw

    def __hash__(self) -> int:
        return hash(self.raw)


class SecretKey:
    """A private key or preshared key. Never printed: repr/str are `SecretKey(redacted)`, and there is no base64
    form; reveal_raw/reveal_hex hand the bytes to the one caller that must send them to WireGuard."""

    __slots__ = ("_raw",)

    def __init__(self, raw: bytes) -> None:
        if len(raw) != WG_KEY_LEN:
            raise ValueError("a WireGuard key is 32 bytes")
        self._raw = bytes(raw)

    @classmethod
    def from_base64(cls, text: str) -> SecretKey:
        return cls(_decode_key(text))

    @classmethod
    def generate(cls) -> SecretKey:
        """A new private key, clamped as `wg genkey` clamps it."""
        k = bytearray(os.urandom(WG_KEY_LEN))
        k[0] &= 248
        k[31] = (k[31] & 127) | 64
        return cls(bytes(k))

    def reveal_raw(self) -> bytes:
        return self._raw

    def reveal_hex(self) -> str:
        return self._raw.hex()

    def reveal_base64(self) -> str:
        """Only for writing the key file."""
        return base64.b64encode(self._raw).decode()

    def public_key(self) -> PublicKey:
        return PublicKey(x25519_base(self._raw))

    def __repr__(self) -> str:
        return "SecretKey(redacted)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretKey) and hmac.compare_digest(self._raw, other._raw)

    def __hash__(self) -> int:
        return hash(self._raw)

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a SecretKey is not serialisable")


# RFC 7748 X25519. Not constant time: it runs once per start on the node's own key, where no one can time it.
_P = 2**255 - 19
_A24 = 121665


def x25519(scalar: bytes, u: bytes) -> bytes:
    k = bytearray(scalar)
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    n = int.from_bytes(k, "little")
    x1 = int.from_bytes(u, "little") & ((1 << 255) - 1)
    x2, z2, x3, z3, swap = 1, 0, x1, 1, 0
    for t in range(254, -1, -1):
        bit = (n >> t) & 1
        if swap ^ bit:
            x2, x3, z2, z3 = x3, x2, z3, z2
        swap = bit
        a, b = x2 + z2, x2 - z2
        aa, bb = a * a % _P, b * b % _P
        e = aa - bb
        c, d = x3 + z3, x3 - z3
        da, cb = d * a % _P, c * b % _P
        x3 = (da + cb) ** 2 % _P
        z3 = x1 * (da - cb) ** 2 % _P
        x2 = aa * bb % _P
        z2 = e * (aa + _A24 * e) % _P
    if swap:
        x2, z2 = x3, z3
    return (x2 * pow(z2, _P - 2, _P) % _P).to_bytes(32, "little")


def x25519_base(scalar: bytes) -> bytes:
    return x25519(scalar, (9).to_bytes(32, "little"))


# ---------------------------------------------------------------- values

Endpoint = tuple[IPAddress, int]


def format_endpoint(ep: Endpoint) -> str:
    ip, port = ep
    return f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}"


def parse_endpoint(text: str) -> Endpoint:
    """`1.2.3.4:51820` or `[fd00::1]:51821` (ValueError otherwise)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"not an endpoint: {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1].split("%", 1)[0]
    return ipaddress.ip_address(host), int(port)


@dataclass(frozen=True, slots=True)
class WgPeer:
    """A peer as programmed (what equality covers) plus the counters a device reports (compare=False).

    allowed_ips is kept sorted, so a peer read back compares equal to the one we asked for."""

    public_key: PublicKey
    endpoint: Endpoint | None = None
    keepalive: int = 0
    allowed_ips: tuple[IPNetwork, ...] = ()
    psk: SecretKey | None = None
    last_handshake: float = field(default=0.0, compare=False)
    rx_bytes: int = field(default=0, compare=False)
    tx_bytes: int = field(default=0, compare=False)

    @staticmethod
    def sort_ips(ips: Iterable[IPNetwork]) -> tuple[IPNetwork, ...]:
        return tuple(sorted(set(ips), key=lambda n: (n.version, n.network_address.packed, n.prefixlen)))


@dataclass(frozen=True, slots=True)
class WgDevice:
    name: str
    ifindex: int = 0
    public_key: PublicKey | None = None  # None: no private key set yet
    listen_port: int = 0
    fwmark: int = 0
    peers: tuple[WgPeer, ...] = ()


@dataclass(frozen=True, slots=True)
class WgUpdate:
    """One change to a device: its key and port (when not None), every peer of `peers` created or replaced in
    full (allowed IPs replaced, not added to; a missing PSK cleared), the peers of `remove` deleted. With
    replace_peers every other peer goes too."""

    private_key: SecretKey | None = None
    listen_port: int | None = None
    replace_peers: bool = False
    peers: tuple[WgPeer, ...] = ()
    remove: tuple[PublicKey, ...] = ()

    def __bool__(self) -> bool:
        return bool(
            self.private_key is not None or self.listen_port is not None or self.replace_peers
            or self.peers or self.remove
        )  # fmt: skip


# ---------------------------------------------------------------- generic netlink codec


def _genl(family: int, flags: int, seq: int, cmd: int, version: int, attrs: bytes) -> bytes:
    return pack_msg(family, flags, seq, GENLMSG.pack(cmd, version, 0) + attrs)


def _nest(kind: int, payload: bytes) -> bytes:
    return pack_nla(kind | NLA_F_NESTED, payload)


def encode_get_family(seq: int, name: str) -> bytes:
    """CTRL_CMD_GETFAMILY: the reply (message type GENL_ID_CTRL) carries the family's id."""
    return _genl(GENL_ID_CTRL, NLM_F_REQUEST, seq, CTRL_CMD_GETFAMILY, 1,
                 pack_nla(CTRL_ATTR_FAMILY_NAME, name.encode() + b"\0"))  # fmt: skip


def decode_family_id(buf: bytes | memoryview, off: int, end: int) -> int | None:
    for kind, a, b in iter_nla(buf, off + GENLMSG.size, end):
        if kind == CTRL_ATTR_FAMILY_ID and b - a >= 2:
            return int(_U16.unpack_from(buf, a)[0])
    return None


def encode_get_device(seq: int, family: int, name: str) -> bytes:
    """WG_CMD_GET_DEVICE: a dump (the kernel has no single-message get) of one device by name."""
    attrs = pack_nla(WGDEVICE_A_IFNAME, name.encode() + b"\0")
    return _genl(family, NLM_F_REQUEST | NLM_F_DUMP, seq, WG_CMD_GET_DEVICE, WG_GENL_VERSION, attrs)


def _sockaddr(ep: Endpoint) -> bytes:
    ip, port = ep
    if ip.version == 4:
        return _SOCKADDR_IN.pack(AF_INET, _BE16.pack(port), ip.packed)
    return _SOCKADDR_IN6.pack(AF_INET6, _BE16.pack(port), 0, ip.packed, 0)


def _parse_sockaddr(raw: bytes) -> Endpoint | None:
    if len(raw) >= _SOCKADDR_IN.size and _U16.unpack_from(raw)[0] == AF_INET:
        _fam, port, addr = _SOCKADDR_IN.unpack_from(raw)
        return ipaddress.IPv4Address(addr), _BE16.unpack(port)[0]
    if len(raw) >= _SOCKADDR_IN6.size and _U16.unpack_from(raw)[0] == AF_INET6:
        _fam, port, _flow, addr, _scope = _SOCKADDR_IN6.unpack_from(raw)
        return ipaddress.IPv6Address(addr), _BE16.unpack(port)[0]
    return None


def _encode_peer(peer: WgPeer) -> bytes:
    out = pack_nla(WGPEER_A_PUBLIC_KEY, peer.public_key.raw)
    out += pack_nla(WGPEER_A_FLAGS, _U32.pack(WGPEER_F_REPLACE_ALLOWEDIPS))
    out += pack_nla(WGPEER_A_PRESHARED_KEY, peer.psk.reveal_raw() if peer.psk else _ZERO_KEY)
    if peer.endpoint is not None:
        out += pack_nla(WGPEER_A_ENDPOINT, _sockaddr(peer.endpoint))
    out += pack_nla(WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL, _U16.pack(peer.keepalive))
    ips = b""
    for net in peer.allowed_ips:
        fam = AF_INET if net.version == 4 else AF_INET6
        ips += _nest(0, pack_nla(WGALLOWEDIP_A_FAMILY, _U16.pack(fam))
                     + pack_nla(WGALLOWEDIP_A_IPADDR, net.network_address.packed)
                     + pack_nla(WGALLOWEDIP_A_CIDR_MASK, bytes([net.prefixlen])))  # fmt: skip
    return out + _nest(WGPEER_A_ALLOWEDIPS, ips)


def encode_set_device(family: int, name: str, update: WgUpdate) -> list[bytes]:
    """WG_CMD_SET_DEVICE requests (each with seq 0: the caller numbers them, see renumber()) that make the
    change: device settings and the first peers in the first, more peers in the next ones. Each asks for an ack.
    A peer is never split across requests."""
    head = pack_nla(WGDEVICE_A_IFNAME, name.encode() + b"\0")
    first = head
    if update.private_key is not None:
        first += pack_nla(WGDEVICE_A_PRIVATE_KEY, update.private_key.reveal_raw())
    if update.listen_port is not None:
        first += pack_nla(WGDEVICE_A_LISTEN_PORT, _U16.pack(update.listen_port))
    if update.replace_peers:
        first += pack_nla(WGDEVICE_A_FLAGS, _U32.pack(WGDEVICE_F_REPLACE_PEERS))
    entries = [_nest(0, _encode_peer(p)) for p in update.peers]
    entries += [
        _nest(0, pack_nla(WGPEER_A_PUBLIC_KEY, k.raw) + pack_nla(WGPEER_A_FLAGS, _U32.pack(WGPEER_F_REMOVE_ME)))
        for k in update.remove
    ]
    bodies: list[bytes] = []
    attrs, chunk = first, b""
    for e in entries:
        if chunk and len(attrs) + len(chunk) + len(e) > MAX_SET_MESSAGE:
            bodies.append(attrs + _nest(WGDEVICE_A_PEERS, chunk))
            attrs, chunk = head, b""
        chunk += e
    bodies.append(attrs + (_nest(WGDEVICE_A_PEERS, chunk) if chunk else b""))
    flags = NLM_F_REQUEST | NLM_F_ACK
    return [_genl(family, flags, 0, WG_CMD_SET_DEVICE, WG_GENL_VERSION, body) for body in bodies]


def renumber(msg: bytes, seq: int) -> bytes:
    """`msg` with its nlmsghdr sequence number set to `seq`."""
    return msg[:8] + _U32.pack(seq) + msg[12:]


@dataclass
class _PeerAcc:
    endpoint: Endpoint | None = None
    keepalive: int = 0
    allowed_ips: list[IPNetwork] = field(default_factory=list)
    psk: SecretKey | None = None
    last_handshake: float = 0.0
    rx_bytes: int = 0
    tx_bytes: int = 0


@dataclass
class DeviceAccumulator:
    """A device assembled from the messages of one dump: a peer with many allowed IPs may continue in the next
    message, under the same public key."""

    name: str = ""
    ifindex: int = 0
    public_key: PublicKey | None = None
    listen_port: int = 0
    fwmark: int = 0
    peers: dict[PublicKey, _PeerAcc] = field(default_factory=dict)

    def device(self, name: str) -> WgDevice:
        peers = tuple(
            WgPeer(
                public_key=key,
                endpoint=p.endpoint,
                keepalive=p.keepalive,
                allowed_ips=WgPeer.sort_ips(p.allowed_ips),
                psk=p.psk,
                last_handshake=p.last_handshake,
                rx_bytes=p.rx_bytes,
                tx_bytes=p.tx_bytes,
            )
            for key, p in self.peers.items()
        )
        return WgDevice(
            name=self.name or name,
            ifindex=self.ifindex,
            public_key=self.public_key,
            listen_port=self.listen_port,
            fwmark=self.fwmark,
            peers=peers,
        )


def _decode_allowed(buf: bytes | memoryview, a: int, b: int) -> Iterator[IPNetwork]:
    for _k, a2, b2 in iter_nla(buf, a, b):
        fam, raw, mask = 0, b"", -1
        for kind, a3, b3 in iter_nla(buf, a2, b2):
            if kind == WGALLOWEDIP_A_FAMILY and b3 - a3 >= 2:
                fam = _U16.unpack_from(buf, a3)[0]
            elif kind == WGALLOWEDIP_A_IPADDR:
                raw = bytes(buf[a3:b3])
            elif kind == WGALLOWEDIP_A_CIDR_MASK and b3 > a3:
                mask = buf[a3]
        if fam == AF_INET and len(raw) == 4 and 0 <= mask <= 32:
            yield ipaddress.IPv4Network((raw, mask), strict=False)
        elif fam == AF_INET6 and len(raw) == 16 and 0 <= mask <= 128:
            yield ipaddress.IPv6Network((raw, mask), strict=False)


def _decode_peer(buf: bytes | memoryview, a: int, b: int, acc: DeviceAccumulator) -> None:
    key: PublicKey | None = None
    for kind, a2, b2 in iter_nla(buf, a, b):
        if kind == WGPEER_A_PUBLIC_KEY and b2 - a2 == WG_KEY_LEN:
            key = PublicKey(bytes(buf[a2:b2]))
            break
    if key is None:
        return
    p = acc.peers.setdefault(key, _PeerAcc())
    for kind, a2, b2 in iter_nla(buf, a, b):
        raw = bytes(buf[a2:b2])
        if kind == WGPEER_A_PRESHARED_KEY and len(raw) == WG_KEY_LEN:
            p.psk = SecretKey(raw) if raw != _ZERO_KEY else None
        elif kind == WGPEER_A_ENDPOINT:
            p.endpoint = _parse_sockaddr(raw)
        elif kind == WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL and len(raw) >= 2:
            p.keepalive = _U16.unpack_from(raw)[0]
        elif kind == WGPEER_A_LAST_HANDSHAKE_TIME and len(raw) >= _TIMESPEC.size:
            sec, nsec = _TIMESPEC.unpack_from(raw)
            p.last_handshake = sec + nsec / 1e9
        elif kind == WGPEER_A_RX_BYTES and len(raw) >= 8:
            p.rx_bytes = _U64.unpack_from(raw)[0]
        elif kind == WGPEER_A_TX_BYTES and len(raw) >= 8:
            p.tx_bytes = _U64.unpack_from(raw)[0]
        elif kind == WGPEER_A_ALLOWEDIPS:
            p.allowed_ips.extend(_decode_allowed(buf, a2, b2))


def decode_device_message(buf: bytes | memoryview, off: int, end: int, acc: DeviceAccumulator) -> None:
    """Fold one WG_CMD_GET_DEVICE reply into `acc`. The private key is not kept: the public key identifies it."""
    for kind, a, b in iter_nla(buf, off + GENLMSG.size, end):
        if kind == WGDEVICE_A_IFINDEX and b - a >= 4:
            acc.ifindex = _U32.unpack_from(buf, a)[0]
        elif kind == WGDEVICE_A_IFNAME:
            acc.name = bytes(buf[a:b]).rstrip(b"\0").decode(errors="replace")
        elif kind == WGDEVICE_A_PUBLIC_KEY and b - a == WG_KEY_LEN:
            raw = bytes(buf[a:b])
            acc.public_key = PublicKey(raw) if raw != _ZERO_KEY else None
        elif kind == WGDEVICE_A_LISTEN_PORT and b - a >= 2:
            acc.listen_port = _U16.unpack_from(buf, a)[0]
        elif kind == WGDEVICE_A_FWMARK and b - a >= 4:
            acc.fwmark = _U32.unpack_from(buf, a)[0]
        elif kind == WGDEVICE_A_PEERS:
            for _k, a2, b2 in iter_nla(buf, a, b):
                _decode_peer(buf, a2, b2, acc)


__all__ = [
    "GENL_ID_CTRL",
    "NETLINK_GENERIC",
    "WG_GENL_NAME",
    "DeviceAccumulator",
    "Endpoint",
    "PublicKey",
    "SecretKey",
    "WgDevice",
    "WgPeer",
    "WgUpdate",
    "decode_device_message",
    "decode_family_id",
    "encode_get_device",
    "encode_get_family",
    "encode_set_device",
    "format_endpoint",
    "parse_endpoint",
    "renumber",
    "x25519",
    "x25519_base",
]
