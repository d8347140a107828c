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


def _net4(raw: dict[str, Any], key: str) -> IPv4Network | None:
    v = ci_get(raw, key)
    if v in (None, ""):
        return None
    if not isinstance(v, str):
        raise ConfigError(f"{key}: expected a CIDR string, got {json.dumps(v)}")
    try:
        # Go's net.ParseCIDR masks host bits, so "10.1.2.3/16" means 10.1.0.0/16 upstream too.
        return IPv4Network(v, strict=False)
    except ValueError:
        raise ConfigError(f"{key}: {v!r} is not an IPv4 CIDR") from None


def _net6(raw: dict[str, Any], key: str) -> IPv6Network | None:
    v = ci_get(raw, key)
    if v in (None, ""):
        return None
    if not isinstance(v, str):
        raise ConfigError(f"{key}: expected a CIDR string, got {json.dumps(v)}")
    try:
        return IPv6Network(v, strict=False)
    except ValueError:
        raise ConfigError(f"{key}: {v!r} is not an IPv6 CIDR") from None


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

    network = _net4(raw, "Network")
    subnet_len = _int(raw, "SubnetLen")
    smin = smax = None
    if enable4:
        if network is None:
            raise ConfigError("Network: please define a correct Network parameter in the flannel config")
        if subnet_len:
            if subnet_len > 30:
                raise ConfigError("SubnetLen must be less than /31")
            if subnet_len < network.prefixlen + 2:
                raise ConfigError("SubnetLen: Network must be able to accommodate at least four subnets")
        elif network.prefixlen > 28:
            raise ConfigError("Network is too small. Minimum useful network prefix is /28")
        elif network.prefixlen <= 22:
            subnet_len = 24
        else:
            subnet_len = network.prefixlen + 2
        smin, smax = _range(
            network,
            subnet_len,
            _addr(raw, "SubnetMin", 4),
            _addr(raw, "SubnetMax", 4),
            "SubnetMin",
            "SubnetMax",
        )

    net6 = _net6(raw, "IPv6Network")
    len6 = _int(raw, "IPv6SubnetLen")
    smin6 = smax6 = None
    if enable6:
        if net6 is None:
            raise ConfigError("IPv6Network: please define a correct IPv6Network parameter in the flannel config")
        if len6:
            if len6 > 126:
                raise ConfigError("IPv6SubnetLen must be less than /127")
            if len6 < net6.prefixlen + 2:
                raise ConfigError("IPv6SubnetLen: IPv6Network must be able to accommodate at least four subnets")
        elif net6.prefixlen > 124:
            raise ConfigError("IPv6Network is too small. Minimum useful network prefix is /124")
        elif net6.prefixlen <= 62:
            len6 = 64
        else:
            len6 = net6.prefixlen + 2
        smin6, smax6 = _range(
            net6,
            len6,
            _addr(raw, "IPv6SubnetMin", 6),
            _addr(raw, "IPv6SubnetMax", 6),
            "IPv6SubnetMin",
            "IPv6SubnetMax",
        )

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
        network=network if enable4 else None,
        subnet_len=subnet_len if enable4 else 0,
        subnet_min=smin,
        subnet_max=smax,
        ipv6_network=net6 if enable6 else None,
        ipv6_subnet_len=len6 if enable6 else 0,
        ipv6_subnet_min=smin6,
        ipv6_subnet_max=smax6,
        backend=backend,
        raw=raw,
    )
