"""/run/flannel/subnet.env, the hand-off from flanneld to the CNI plugin.

The subnet values carry the first usable address (`10.42.0.1/24`), as upstream writes them. A single-address
subnet (/32, /128) has no address after its own: it is written as itself (`10.0.0.5/32`), so that it reads back
as the same subnet. Upstream writes the next address there (`10.0.0.6/32`, and `0.0.0.0/32` for
255.255.255.255/32), a subnet the node does not own; no config upstream accepts hands out such a subnet
(SubnetLen is at most 30, IPv6SubnetLen 126), so only a kube podCIDR of that size could meet the difference.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any

from .config import ConfigError, cut, parse_cidr, read_config_file


class SubnetEnvError(ValueError):
    pass


@dataclass(frozen=True)
class SubnetEnv:
    networks: tuple[IPv4Network, ...] = ()
    subnet: IPv4Network | None = None
    ipv6_networks: tuple[IPv6Network, ...] = ()
    ipv6_subnet: IPv6Network | None = None
    mtu: int = 0
    ipmasq: bool = False

    def render(self) -> str:
        lines: list[str] = []
        if self.networks:
            lines.append("FLANNEL_NETWORK=" + ",".join(str(n) for n in self.networks))
        if self.subnet is not None:
            lines.append(f"FLANNEL_SUBNET={_first_usable(self.subnet)}")
        if self.ipv6_networks:
            lines.append("FLANNEL_IPV6_NETWORK=" + ",".join(str(n) for n in self.ipv6_networks))
        if self.ipv6_subnet is not None:
            lines.append(f"FLANNEL_IPV6_SUBNET={_first_usable(self.ipv6_subnet)}")
        lines.append(f"FLANNEL_MTU={self.mtu}")
        lines.append(f"FLANNEL_IPMASQ={'true' if self.ipmasq else 'false'}")
        return "\n".join(lines) + "\n"


def _first_usable(sn: IPv4Network | IPv6Network) -> str:
    """`<network address + 1>/<len>`, or the address itself when the subnet holds no other (see the module doc)."""
    if sn.num_addresses == 1:
        return str(sn)
    return f"{sn.network_address + 1}/{sn.prefixlen}"


def _network(text: str, version: int) -> Any:
    """A FLANNEL_*NETWORK or FLANNEL_*SUBNET value as Go's net.ParseCIDR reads it (the network, host bits masked)."""
    net = parse_cidr(text)
    if net.version != version:
        raise ValueError(f"{cut(text)} is not an IPv{version} CIDR")
    return net


def _mtu(text: str) -> int:
    # The CNI plugin reads it with strconv.ParseUint(s, 10, 32): ASCII digits only, below 2**32.
    if not text:
        return 0
    if not text.isascii() or not text.isdigit() or len(text.lstrip("0")) > 10 or int(text) >= 2**32:
        raise ValueError(f"FLANNEL_MTU {text[:20]!r} is not a number below 2**32")
    return int(text)


def parse_subnet_env(text: str) -> SubnetEnv:
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        k, sep, v = line.partition("=")
        if not sep:
            raise SubnetEnvError(f"subnet.env: malformed line {cut(raw)}")
        values[k.strip()] = v.strip()
    try:
        nets = tuple(_network(n, 4) for n in _split(values.get("FLANNEL_NETWORK")))
        sub = _network(values["FLANNEL_SUBNET"], 4) if values.get("FLANNEL_SUBNET") else None
        nets6 = tuple(_network(n, 6) for n in _split(values.get("FLANNEL_IPV6_NETWORK")))
        sub6 = _network(values["FLANNEL_IPV6_SUBNET"], 6) if values.get("FLANNEL_IPV6_SUBNET") else None
        mtu = _mtu(values.get("FLANNEL_MTU", ""))
    except ValueError as e:
        raise SubnetEnvError(f"subnet.env: {str(e)[:200]}") from None
    return SubnetEnv(
        networks=nets,
        subnet=sub,
        ipv6_networks=nets6,
        ipv6_subnet=sub6,
        mtu=mtu,
        ipmasq=values.get("FLANNEL_IPMASQ", "false").lower() == "true",
    )


def _split(v: str | None) -> list[str]:
    return [p.strip() for p in (v or "").split(",") if p.strip()]


def read_subnet_env(path: str | Path) -> SubnetEnv | None:
    """The previous subnet.env, or None when it is absent or unreadable (a fresh node)."""
    try:
        return parse_subnet_env(read_config_file(str(path), "subnet file").decode())
    except (ConfigError, SubnetEnvError, UnicodeDecodeError):
        return None


def write_subnet_env(path: str | Path, env: SubnetEnv) -> None:
    """Write atomically: the CNI plugin may read it at any moment and must never see half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    # Upstream keeps the mode of an existing file, so an administrator's chmod survives a restart.
    mode = 0o644
    with contextlib.suppress(OSError):
        mode = stat.S_IMODE(p.stat().st_mode)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(env.render())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
