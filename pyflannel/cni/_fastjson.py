"""JSON and IP parsing for the plugin without importing `json`, `re` or `ipaddress`.

`import json` pulls in re, enum, functools and collections: about 11 ms of a bare interpreter's start,
which the runtime pays on every ADD and DEL. The C accelerator `_json` that `json` itself uses does the
work here; `json` is imported only for rare number formats, and the error texts (Go's, from _goerr) only on
error paths. IPv6 addresses are parsed by `_socket.inet_pton` (0.3 ms to load, so only for them: IPv4 is parsed
here) and printed here in Go's net.IP.String() form.
"""

import _json
import _thread

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# Quoted annotations instead of `from __future__ import annotations`: see conf.py.
_WS = " \t\n\r"


# Nesting deeper than this is refused, with encoding/json's message for its own limit (10000 levels): the C
# scanner and the encoders recurse, and a few hundred levels are far beyond any CNI config.
MAX_DEPTH = 512


class JSONError(ValueError):
    """Malformed JSON; the text is encoding/json's (see _goerr.syntax_error)."""


# `big`: the _goerr.BigNumbers the last loads() of this thread made. Per thread: flanneld's CNI server runs
# the plugin in several threads at once.
_last = _thread._local()


def overflowed() -> bool:
    """Did this thread's last loads() meet a number beyond float64?"""
    return bool(getattr(_last, "big", None))


def _reject_constant(name: str) -> "Any":
    raise ValueError(f"invalid JSON value {name}")


def _parse_int(s: str) -> "Any":
    # An integer literal of 300 digits or fewer is below float64's maximum (1.8e308); int() would also refuse
    # more than 4300 digits (a ValueError from inside the scanner).
    if len(s) <= 300:
        return int(s)
    try:
        if len(s) <= 400:
            n = int(s)
            float(n)
            return n
    except OverflowError:
        pass
    from pyflannel.cni._goerr import BigNumber

    b = BigNumber(s)
    _last.big.append(b)
    return b


def _parse_float(s: str) -> "Any":
    f = float(s)
    if f - f != 0:  # inf: the literal overflows float64 (float() does not raise)
        from pyflannel.cni._goerr import BigNumber

        b = BigNumber(s)
        _last.big.append(b)
        return b
    return f


class _Ctx:
    """The attributes `_json.make_scanner` reads from a JSONDecoder."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = staticmethod(_parse_float)
    parse_int = staticmethod(_parse_int)
    parse_constant = staticmethod(_reject_constant)
    memo: "dict[str, Any]"


_scan = _json.make_scanner(_Ctx())  # type: ignore[arg-type]  # it reads the attributes only


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        from pyflannel.cni import _goerr

        return _goerr.decode_utf8(data)


def _fail(data: "bytes | str") -> JSONError:
    from pyflannel.cni import _goerr

    return JSONError(_goerr.json_error(data, MAX_DEPTH))


def loads(data: bytes | str) -> "Any":
    """json.Unmarshal into interface{}; JSONError (a ValueError) with Go's message for what is not JSON.

    As Go's decoder: invalid UTF-8 and lone surrogate escapes in strings read as U+FFFD; numbers beyond float64
    come back as _goerr.BigNumber (see overflowed()); nesting deeper than MAX_DEPTH is refused. The rare
    paths live in _goerr.
    """
    _last.big = []
    s = _decode(data) if isinstance(data, bytes | bytearray) else data
    if s.count("[") + s.count("{") > MAX_DEPTH:  # only then can it nest that deep
        from pyflannel.cni import _goerr

        if _goerr.too_deep(s, MAX_DEPTH):
            raise _fail(data)
    idx = len(s) - len(s.lstrip(_WS))
    try:
        obj, end = _scan(s, idx)
    except (StopIteration, ValueError, RecursionError, SystemError):
        # SystemError: _json raises json.decoder.JSONDecodeError only if json.decoder is already imported
        # (it looks in sys.modules, it does not import); Go's scanner gives the message anyway.
        raise _fail(data) from None
    if s[end:].strip(_WS):
        raise _fail(data)
    if "\\ud" in s or "\\uD" in s:  # an escaped surrogate: maybe a lone one
        from pyflannel.cni import _goerr

        obj = _goerr.fix_surrogates(obj)
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


def dumps_indent(obj: "Any", number: "Any") -> str:
    """json.MarshalIndent(v, "", "    ")'s layout, keys in their own order (a decoded Go struct's field order):
    `{` / `[` then one member per line, `"key": value`, empty containers as `{}` / `[]`, no trailing newline.
    `number` formats a float (conf._go_float); strings as dumps() writes them (the caller escapes <>&)."""
    parts: list[str] = []
    _indent(obj, "\n", parts, number)
    return "".join(parts)


def _indent(obj: "Any", nl: str, out: list[str], number: "Any") -> None:
    if isinstance(obj, dict):
        if not obj:
            out.append("{}")
            return
        inner = nl + "    "
        sep = "{"
        for k, v in obj.items():
            out.append(sep + inner)
            out.append(_json.encode_basestring(k) + ": ")
            _indent(v, inner, out, number)
            sep = ","
        out.append(nl + "}")
    elif isinstance(obj, list):
        if not obj:
            out.append("[]")
            return
        inner = nl + "    "
        sep = "["
        for v in obj:
            out.append(sep + inner)
            _indent(v, inner, out, number)
            sep = ","
        out.append(nl + "]")
    elif isinstance(obj, float) and not isinstance(obj, bool):
        out.append(number(obj))
    else:
        out.append("".join(_encode_plain(obj, 0)))


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
    except (OSError, ValueError):  # ValueError: a NUL or an unencodable character
        raise ValueError(f"invalid IP address: {s}") from None


_V4_IN_V6 = bytes(10) + b"\xff\xff"


def format_ip(fam: int, packed: bytes) -> str:
    """Go's net.IP.String(): an IPv4-mapped address prints as IPv4; IPv6 in hex groups with the first longest
    run of two or more zero groups as `::`, and never the dotted tail inet_ntop gives `::0.1.0.0` (`::1:0`)."""
    if fam == AF_INET:
        return ".".join(map(str, packed))
    if packed[:12] == _V4_IN_V6:
        return ".".join(map(str, packed[12:]))
    groups = [(packed[i] << 8) | packed[i + 1] for i in range(0, 16, 2)]
    start, length, i = -1, 1, 0
    while i < 8:
        if groups[i]:
            i += 1
            continue
        j = i
        while j < 8 and not groups[j]:
            j += 1
        if j - i > length:
            start, length = i, j - i
        i = j
    if start < 0:
        return ":".join(f"{g:x}" for g in groups)
    head = ":".join(f"{g:x}" for g in groups[:start])
    tail = ":".join(f"{g:x}" for g in groups[start + length :])
    return f"{head}::{tail}"


def _ipnet(fam: int, packed: bytes, plen: int) -> str:
    """IPNet.String(): an IPv4-mapped IPv6 prefix prints as IPv4 with the last 32 bits of its mask."""
    if fam == AF_INET6 and packed[:12] == _V4_IN_V6:
        return f"{format_ip(AF_INET, packed[12:])}/{max(plen - 96, 0)}"
    return f"{format_ip(fam, packed)}/{plen}"


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
    n = int(plen) if len(plen.lstrip("0")) < 8 else 1 << 24  # Go's dtoi gives up at 0xFFFFFF
    if n > len(packed) * 8:
        raise ValueError(f"invalid CIDR address: {s}")
    return _ipnet(fam, packed, n), _ipnet(fam, network_of(packed, n), n)
