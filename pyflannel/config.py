"""net-conf.json: parsing, upstream's defaults and validation.

Upstream decodes the file with Go's encoding/json, which matches keys case-insensitively and ignores
unknown keys; we do the same so that any file an upstream node accepts is accepted here.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any


class ConfigError(ValueError):
    """A net-conf.json that cannot be used; the message names the offending key."""


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
        raise ConfigError(f"{key}: expected true or false, got {json.dumps(v)}")
    return v


def _int(raw: dict[str, Any], key: str) -> int:
    v = ci_get(raw, key, 0)
    if v is None:
        return 0
    # Upstream decodes these into a Go uint, which rejects negative numbers.
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConfigError(f"{key}: expected a non-negative integer, got {json.dumps(v)}")
    return v


def _net(raw: dict[str, Any], key: str, version: int) -> Any:
    v = ci_get(raw, key)
    if v in (None, ""):
        return None
    if not isinstance(v, str):
        raise ConfigError(f"{key}: expected a CIDR string, got {json.dumps(v)}")
    try:
        # Go's net.ParseCIDR masks host bits, so "10.1.2.3/16" means 10.1.0.0/16 upstream too.
        return IPv4Network(v, strict=False) if version == 4 else IPv6Network(v, strict=False)
    except ValueError:
        raise ConfigError(f"{key}: {v!r} is not an IPv{version} CIDR") from None


def _addr(raw: dict[str, Any], key: str, version: int) -> Any:
    v = ci_get(raw, key)
    if v in (None, ""):
        return None
    if not isinstance(v, str):
        raise ConfigError(f"{key}: expected an address string, got {json.dumps(v)}")
    try:
        a = ipaddress.ip_address(v)
    except ValueError:
        raise ConfigError(f"{key}: {v!r} is not an IP address") from None
    if a.version != version:
        raise ConfigError(f"{key}: {v!r} is not an IPv{version} address")
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
        raw = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
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
