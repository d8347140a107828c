"""/run/flannel/subnet.env, the hand-off from flanneld to the CNI plugin.

The subnet values carry the first usable address (`10.42.0.1/24`), as upstream writes them.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network
from pathlib import Path


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
            lines.append(f"FLANNEL_SUBNET={self.subnet.network_address + 1}/{self.subnet.prefixlen}")
        if self.ipv6_networks:
            lines.append("FLANNEL_IPV6_NETWORK=" + ",".join(str(n) for n in self.ipv6_networks))
        if self.ipv6_subnet is not None:
            lines.append(f"FLANNEL_IPV6_SUBNET={self.ipv6_subnet.network_address + 1}/{self.ipv6_subnet.prefixlen}")
        lines.append(f"FLANNEL_MTU={self.mtu}")
        lines.append(f"FLANNEL_IPMASQ={'true' if self.ipmasq else 'false'}")
        return "\n".join(lines) + "\n"


def parse_subnet_env(text: str) -> SubnetEnv:
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        k, sep, v = line.partition("=")
        if not sep:
            raise SubnetEnvError(f"subnet.env: malformed line {raw!r}")
        values[k.strip()] = v.strip()
    try:
        nets = tuple(IPv4Network(n, strict=False) for n in _split(values.get("FLANNEL_NETWORK")))
        sub = IPv4Interface(values["FLANNEL_SUBNET"]).network if values.get("FLANNEL_SUBNET") else None
        nets6 = tuple(IPv6Network(n, strict=False) for n in _split(values.get("FLANNEL_IPV6_NETWORK")))
        sub6 = IPv6Interface(values["FLANNEL_IPV6_SUBNET"]).network if values.get("FLANNEL_IPV6_SUBNET") else None
        mtu = int(values.get("FLANNEL_MTU") or 0)
    except ValueError as e:
        raise SubnetEnvError(f"subnet.env: {e}") from None
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
        return parse_subnet_env(Path(path).read_text())
    except (OSError, SubnetEnvError, UnicodeDecodeError):
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
