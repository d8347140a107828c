"""JSON and IP parsing for the plugin without importing `json`, `re` or `ipaddress`.

`import json` pulls in re, enum, functools and collections: about 11 ms of a bare interpreter's start,
which the runtime pays on every ADD and DEL. The C accelerator `_json` that `json` itself uses does the
work here; `json` is imported only on error paths (its exception type) and for rare number formats.
IPv6 addresses go through `_socket.inet_pton/inet_ntop`, whose text form matches Go's net.IP.String();
`_socket` (0.3 ms to load) is imported only for them: IPv4 is parsed here.
"""

import _json

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# Quoted annotations instead of `from __future__ import annotations`: see conf.py.
_WS = " \t\n\r"


def _reject_constant(name: str) -> "Any":
    raise ValueError(f"invalid JSON value {name}")


class _Ctx:
    """The attributes `_json.make_scanner` reads from a JSONDecoder."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = staticmethod(_reject_constant)
    memo: "dict[str, Any]"


_scan = _json.make_scanner(_Ctx())  # type: ignore[arg-type]  # it reads the attributes only


def loads(data: bytes | str) -> "Any":
    """json.loads for UTF-8 input; raises ValueError (json.JSONDecodeError) on malformed input."""
    s = data.decode("utf-8") if isinstance(data, bytes | bytearray) else data
    if s.startswith("\ufeff"):
        raise ValueError("Unexpected UTF-8 BOM")
    idx = len(s) - len(s.lstrip(_WS))
    try:
        obj, end = _scan(s, idx)
    except StopIteration as e:
        raise ValueError(f"Expecting value: char {e.value}") from None
    except SystemError:
        # _json raises json.decoder.JSONDecodeError only if json.decoder is already in sys.modules (it looks
        # there, it does not import); otherwise a SystemError. Rare path: import it and scan again.
        import json.decoder  # noqa: F401

        obj, end = _scan(s, idx)
    if s[end:].strip(_WS):
        raise ValueError(f"Extra data: char {end}")
    return obj


def _no_default(o: "Any") -> "Any":
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


_encode_compact = _json.make_encoder(None, _no_default, _json.encode_basestring, None, ":", ",", True, False, False)
_encode_plain = _json.make_encoder(None, _no_default, _json.encode_basestring, None, ":", ",", False, False, False)


def dumps_sorted(obj: "Any") -> str:
    """Compact, keys sorted, non-ASCII kept: the base of Go's json.Marshal form."""
    return "".join(_encode_compact(obj, 0))


def dumps(obj: "Any") -> str:
    """Compact, keys in their own order."""
    return "".join(_encode_plain(obj, 0))


# ---- addresses ----------------------------------------------------------------------------------------


# Family numbers as Linux has them: IPv4 is parsed here without loading _socket (0.3 ms), which only IPv6 needs.
AF_INET = 2
AF_INET6 = 10


def _parse_ipv4(s: str) -> bytes | None:
    """inet_pton(AF_INET): four decimal octets, no leading zeros (Go's ParseIP agrees)."""
    parts = s.split(".")
    if len(parts) != 4:
        return None
    octets = []
    for p in parts:
        if not p or len(p) > 3 or not p.isascii() or not p.isdigit() or (p[0] == "0" and len(p) > 1):
            return None
        v = int(p)
        if v > 255:
            return None
        octets.append(v)
    return bytes(octets)


def parse_ip(s: str) -> tuple[int, bytes]:
    """(family, packed) of an IPv4/IPv6 literal; ValueError otherwise."""
    if ":" not in s:
        packed = _parse_ipv4(s)
        if packed is None:
            raise ValueError(f"invalid IP address: {s}")
        return AF_INET, packed
    import _socket

    try:
        return AF_INET6, _socket.inet_pton(_socket.AF_INET6, s)
    except OSError:
        raise ValueError(f"invalid IP address: {s}") from None


def format_ip(fam: int, packed: bytes) -> str:
    if fam == AF_INET:
        return ".".join(map(str, packed))
    import _socket

    return str(_socket.inet_ntop(_socket.AF_INET6, packed))


def network_of(packed: bytes, plen: int) -> bytes:
    n = int.from_bytes(packed, "big")
    bits = len(packed) * 8
    mask = ((1 << plen) - 1) << (bits - plen) if plen else 0
    return (n & mask).to_bytes(len(packed), "big")


def parse_cidr(s: str) -> tuple[str, str]:
    """net.ParseCIDR: (address as given, canonical network), both in Go's String() form."""
    addr, sep, plen = s.partition("/")
    if not sep or not plen or not plen.isascii() or not plen.isdigit():
        raise ValueError(f"invalid CIDR address: {s}")
    try:
        fam, packed = parse_ip(addr)
    except ValueError:
        raise ValueError(f"invalid CIDR address: {s}") from None
    n = int(plen)
    if n > len(packed) * 8:
        raise ValueError(f"invalid CIDR address: {s}")
    return f"{format_ip(fam, packed)}/{n}", f"{format_ip(fam, network_of(packed, n))}/{n}"
