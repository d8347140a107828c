"""net-conf.json: parsing, upstream's defaults and validation.

Upstream decodes the file with Go's encoding/json, which matches keys case-insensitively and ignores
unknown keys; we do the same so that any file an upstream node accepts is accepted here.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

# The largest file read as configuration (net-conf.json, subnet.env, TLS files, tokens): far above any real one,
# small enough that a wrong path (/dev/zero, a log file) cannot exhaust memory.
MAX_CONFIG_BYTES = 1 << 20
# JSON nested deeper than this is refused. Go's decoder allows 10000 levels, Python's recursion limit about
# 1000; flannel's own data is 3 levels deep, and this bound keeps every later recursive step (==, dumps, repr) safe.
MAX_JSON_DEPTH = 100


class ConfigError(ValueError):
    """A net-conf.json that cannot be used; the message names the offending key."""


def read_config_file(path: str, what: str, limit: int = MAX_CONFIG_BYTES) -> bytes:
    """Read a small configuration file: a regular file of at most `limit` bytes, else ConfigError naming it.

    Opened without blocking (a FIFO would otherwise block open() until a writer appears, and with it the event
    loop and the SIGTERM handler) and checked with fstat before anything is read, so a device (/dev/zero), FIFO,
    socket or directory is refused with a clear message instead of being read without bound.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise ConfigError(f"cannot read {what} {path}: {_strerror(e)}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise ConfigError(f"cannot read {what} {path}: it is {kind}")
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise ConfigError(f"cannot read {what} {path}: larger than {limit} bytes")
        return b"".join(chunks)
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {_strerror(e)}") from None
    finally:
        os.close(fd)


def _strerror(e: BaseException) -> str:
    return (e.strerror if isinstance(e, OSError) else None) or str(e)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"number {text[:40]} is out of range")
    return v


def _bounded_int(text: str) -> int:
    # Go decodes a JSON number into a float64, which refuses what lies beyond about 1.8e308; Python's int() would
    # take up to 4300 digits and then fail with an unrelated message.
    if len(text) > 308:
        try:
            if len(text.lstrip("-")) > 309:
                raise OverflowError
            float(int(text))
        except OverflowError:
            raise ValueError(f"number {text[:20]}... is out of range") from None
    return int(text)


# One decoder for every call: json.loads with hooks builds a new JSONDecoder (and scanner) each time, which was
# a tenth of decoding a lease. Stateless between calls, like a compiled pattern.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float, parse_int=_bounded_int)
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def loads_json(text: str | bytes) -> Any:
    """Decode JSON the way Go's encoding/json does where Python's json module differs; raises ValueError.

    - NaN, Infinity and -Infinity are refused (they are not JSON), and so are numbers beyond a float64's range;
    - nesting deeper than MAX_JSON_DEPTH is refused (instead of a RecursionError);
    - bytes are UTF-8 with invalid sequences read as U+FFFD, and lone surrogates escaped in a string (\\udc80)
      become U+FFFD, as Go does (Python would keep a string that cannot be encoded).
    """
    if isinstance(text, bytes | bytearray):
        text = bytes(text).decode("utf-8", "replace")
    try:
        if text.startswith("\ufeff"):
            # What json.loads refuses before decoding (and Go too: a BOM is not JSON).
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        obj = _DECODER.decode(text)
    except RecursionError:
        raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    fix = _SURROGATE_ESCAPE.search(text) is not None
    if fix or text.count("[") + text.count("{") > MAX_JSON_DEPTH:
        obj = _check_tree(obj, fix)
    return obj


def _fix_str(v: Any, fix: bool) -> Any:
    return _LONE_SURROGATE.sub("\ufffd", v) if fix and isinstance(v, str) else v


def _check_tree(root: Any, fix: bool) -> Any:
    """Refuse nesting deeper than MAX_JSON_DEPTH and (with `fix`) replace lone surrogates; iterative, so that the
    check itself cannot overflow the stack."""
    root = _fix_str(root, fix)
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(node, list):
            for i, v in enumerate(node):
                node[i] = v = _fix_str(v, fix)
                if isinstance(v, list | dict):
                    stack.append((v, depth + 1))
        elif isinstance(node, dict):
            if fix:
                items = [(_fix_str(k, fix), _fix_str(v, fix)) for k, v in node.items()]
                node.clear()
                node.update(items)
            for v in node.values():
                if isinstance(v, list | dict):
                    stack.append((v, depth + 1))
    return root


_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_DOTTED_QUAD = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}", re.ASCII)


def parse_ip(text: str) -> IPv4Address | IPv6Address:
    """An IP address as Go's net.ParseIP reads it; raises ValueError. Unlike Python's ipaddress, no IPv6 zone
    (`fe80::1%eth0`): Go has no place for one in an IP, and a zone in a lease or a route means nothing to a peer."""
    if not isinstance(text, str):
        raise ValueError(f"expected an address string, got {_show(text)}")
    m = _DOTTED_QUAD.fullmatch(text)
    if m is not None:
        # The common case, several thousand times per list of leases: ipaddress's own parser is 4x slower. The
        # pattern takes exactly the canonical forms ipaddress takes (no leading zeros, octets up to 255).
        a, b, c, d = m.groups()
        return IPv4Address((int(a) << 24) | (int(b) << 16) | (int(c) << 8) | int(d))
    if "%" in text:
        raise ValueError(f"{cut(text)} is not an IP address (a zone is not allowed)")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{cut(text)} is not an IP address") from None


def parse_cidr(text: str) -> IPv4Network | IPv6Network:
    """A network as Go's net.ParseCIDR reads it (host bits masked); raises ValueError.

    Only `<address>/<decimal length>`: Python's netmask forms (`10.0.0.0/255.255.0.0`), a bare address and IPv6
    zones are refused, as Go refuses them.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a CIDR string, got {_show(text)}")
    addr, sep, bits = text.partition("/")
    if not sep or not bits.isascii() or not bits.isdigit() or len(bits.lstrip("0")) > 3:
        raise ValueError(f"{cut(text)} is not a CIDR (address/length)")
    ip = parse_ip(addr)
    n = int(bits)
    if n > ip.max_prefixlen:
        raise ValueError(f"{cut(text)}: prefix length {n} is out of range")
    return ipaddress.ip_network((ip, n), strict=False)


def cut(v: Any, limit: int = 60) -> str:
    """repr() for an error message, cut short: a message must stay one readable line whatever the input."""
    try:
        text = repr(v)
    except RecursionError:
        text = f"<{type(v).__name__} nested too deeply>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show(v: Any, limit: int = 60) -> str:
    """A value for an error message: JSON, cut short (a message must stay one readable line)."""
    try:
        text = json.dumps(v)
    except (TypeError, ValueError, RecursionError):
        text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def ci_get(obj: dict[str, Any], key: str, default: Any = None) -> Any:
    """Look a key up the way Go's encoding/json does: case-insensitively.

    Go assigns every matching key in document order, so when a file holds both `network` and `Network` the
    last one wins; we return the same value.
    """
    low = key.lower()
    found = default
    for k, v in obj.items():
        if k.lower() == low:
            found = v
    return found


def ci_fold(obj: dict[str, Any]) -> dict[str, Any]:
    """The object keyed by lower-cased names, for reading several keys as ci_get reads each (the last of keys
    that differ only in case wins): one pass over the object instead of one per key."""
    return {k.lower(): v for k, v in obj.items()}


@dataclass(frozen=True)
class BackendConfig:
    """The `Backend` object: its type (lower-cased) and the raw keys, read case-insensitively by each backend."""

    type: str
    options: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        return ci_get(self.options, key, default)


@dataclass(frozen=True)
class NetConfig:
    enable_ipv4: bool
    enable_ipv6: bool
    enable_nftables: bool
    network: IPv4Network | None
    subnet_len: int
    subnet_min: IPv4Address | None
    subnet_max: IPv4Address | None
    ipv6_network: IPv6Network | None
    ipv6_subnet_len: int
    ipv6_subnet_min: IPv6Address | None
    ipv6_subnet_max: IPv6Address | None
    backend: BackendConfig
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    def subnet_fits(self, sn: IPv4Network | None) -> bool:
        """True when `sn` is a subnet this config could have handed out (used to reuse old leases)."""
        if not self.enable_ipv4:
            return sn is None
        if sn is None or self.network is None or self.subnet_min is None or self.subnet_max is None:
            return False
        return (
            sn.prefixlen == self.subnet_len
            and sn.subnet_of(self.network)
            and self.subnet_min <= sn.network_address <= self.subnet_max
        )

    def ipv6_subnet_fits(self, sn: IPv6Network | None) -> bool:
        if not self.enable_ipv6:
            return sn is None
        if sn is None or self.ipv6_network is None or self.ipv6_subnet_min is None or self.ipv6_subnet_max is None:
            return False
        return (
            sn.prefixlen == self.ipv6_subnet_len
            and sn.subnet_of(self.ipv6_network)
            and self.ipv6_subnet_min <= sn.network_address <= self.ipv6_subnet_max
        )


def _bool(raw: dict[str, Any], key: str, default: bool) -> bool:
    v = ci_get(raw, key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ConfigError(f"{key}: expected true or false, got {_show(v)}")
    return v


def _int(raw: dict[str, Any], key: str) -> int:
    v = ci_get(raw, key, 0)
    if v is None:
        return 0
    # Upstream decodes these into a Go uint, which rejects negative numbers.
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConfigError(f"{key}: expected a non-negative integer, got {_show(v)}")
    return v


def _net(raw: dict[str, Any], key: str, version: int) -> Any:
    v = ci_get(raw, key)
    if v in (None, ""):
        return None
    if not isinstance(v, str):
        raise ConfigError(f"{key}: expected a CIDR string, got {_show(v)}")
    try:
        # Go's net.ParseCIDR masks host bits, so "10.1.2.3/16" means 10.1.0.0/16 upstream too.
        net = parse_cidr(v)
    except ValueError:
        net = None
    if net is None or net.version != version:
        raise ConfigError(f"{key}: {cut(v)} is not an IPv{version} CIDR")
    return net


def _addr(raw: dict[str, Any], key: str, version: int) -> Any:
    v = ci_get(raw, key)
    if v in (None, ""):
        return None
    if not isinstance(v, str):
        raise ConfigError(f"{key}: expected an address string, got {_show(v)}")
    try:
        a = parse_ip(v)
    except ValueError:
        raise ConfigError(f"{key}: {cut(v)} is not an IP address") from None
    if a.version != version:
        raise ConfigError(f"{key}: {cut(v)} is not an IPv{version} address")
    if int(a) == 0:
        return None  # upstream treats 0.0.0.0 as "unset"
    return a


def _range(
    network: IPv4Network | IPv6Network,
    subnet_len: int,
    smin: Any,
    smax: Any,
    min_key: str,
    max_key: str,
) -> tuple[Any, Any]:
    bits = network.max_prefixlen
    size = 1 << (bits - subnet_len)
    base = int(network.network_address)
    cls = type(network.network_address)
    if smin is None:
        # The first subnet is skipped: its network address would clash with the Network's own.
        smin = cls(base + size)
    elif smin not in network:
        raise ConfigError(f"{min_key} is not in the range of the Network")
    if smax is None:
        smax = cls(base + network.num_addresses - size)
    elif smax not in network:
        raise ConfigError(f"{max_key} is not in the range of the Network")
    if int(smin) % size:
        raise ConfigError(f"{min_key} is not on a SubnetLen boundary: {smin}")
    if int(smax) % size:
        raise ConfigError(f"{max_key} is not on a SubnetLen boundary: {smax}")
    if smin > smax:
        raise ConfigError(f"{min_key} ({smin}) is greater than {max_key} ({smax})")
    return smin, smax


def _family_layout(raw: dict[str, Any], version: int) -> tuple[Any, int, Any, Any]:
    """Network, SubnetLen, SubnetMin and SubnetMax of one family (keys prefixed `IPv6` for version 6),
    with upstream's defaults: a /24 (/64) per node when the network is large enough, else four subnets."""
    p = "" if version == 4 else "IPv6"
    net_key, len_key = f"{p}Network", f"{p}SubnetLen"
    max_len, default_len = (30, 24) if version == 4 else (126, 64)
    network = _net(raw, net_key, version)
    if network is None:
        raise ConfigError(f"{net_key}: please define a correct {net_key} parameter in the flannel config")
    subnet_len = _int(raw, len_key)
    if subnet_len:
        if subnet_len > max_len:
            raise ConfigError(f"{len_key} must be less than /{max_len + 1}")
        if subnet_len < network.prefixlen + 2:
            raise ConfigError(f"{len_key}: {net_key} must be able to accommodate at least four subnets")
    elif network.prefixlen > max_len - 2:
        raise ConfigError(f"{net_key} is too small. Minimum useful network prefix is /{max_len - 2}")
    elif network.prefixlen <= default_len - 2:
        subnet_len = default_len
    else:
        subnet_len = network.prefixlen + 2
    smin, smax = _range(
        network,
        subnet_len,
        _addr(raw, f"{p}SubnetMin", version),
        _addr(raw, f"{p}SubnetMax", version),
        f"{p}SubnetMin",
        f"{p}SubnetMax",
    )
    return network, subnet_len, smin, smax


def parse_net_config(text: str | bytes) -> NetConfig:
    """Parse and validate net-conf.json; raises ConfigError naming the key at fault."""
    try:
        raw = loads_json(text)
    except ValueError as e:
        raise ConfigError(f"net-conf.json is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError("net-conf.json must be a JSON object")

    enable4 = _bool(raw, "EnableIPv4", True)
    enable6 = _bool(raw, "EnableIPv6", False)
    nft = _bool(raw, "EnableNFTables", False)
    if not enable4 and not enable6:
        raise ConfigError("EnableIPv4 and EnableIPv6 are both false: nothing to do")

    network, subnet_len, smin, smax = _family_layout(raw, 4) if enable4 else (None, 0, None, None)
    net6, len6, smin6, smax6 = _family_layout(raw, 6) if enable6 else (None, 0, None, None)

    backend_raw = ci_get(raw, "Backend")
    if backend_raw is None:
        # Upstream's code falls back to udp here although its docs say vxlan; we follow the code so that a
        # cluster keeps one backend whichever implementation reads the config.
        backend = BackendConfig(type="udp", options={})
    else:
        if not isinstance(backend_raw, dict):
            raise ConfigError("Backend: expected an object")
        btype = ci_get(backend_raw, "Type", "udp")
        if not isinstance(btype, str) or not btype:
            raise ConfigError("Backend.Type: expected a non-empty string")
        backend = BackendConfig(type=btype.lower(), options=dict(backend_raw))

    return NetConfig(
        enable_ipv4=enable4,
        enable_ipv6=enable6,
        enable_nftables=nft,
        network=network,
        subnet_len=subnet_len,
        subnet_min=smin,
        subnet_max=smax,
        ipv6_network=net6,
        ipv6_subnet_len=len6,
        ipv6_subnet_min=smin6,
        ipv6_subnet_max=smax6,
        backend=backend,
        raw=raw,
    )
