"""Choosing the external interface and the public IP, in upstream's order.

--iface (name or IP, first that resolves wins), else --iface-regex (matched against addresses first, then
names), else --iface-can-reach (the route to that address), else the default route's interface. The public IP
is --public-ip when given, else the chosen interface's address.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface
from typing import TYPE_CHECKING

from .config import parse_ip

if TYPE_CHECKING:
    from .netlink import Address, Link


class IfaceError(RuntimeError):
    pass


@dataclass(frozen=True)
class ExternalInterface:
    """The underlay interface packets leave by, and the addresses peers reach us on."""

    name: str
    index: int
    mtu: int
    iface_addr: IPv4Address | None  # the interface's own IPv4 address (tunnel `local`, unless public_ip differs)
    iface_addr6: IPv6Address | None
    public_ip: IPv4Address | None  # what we advertise in the lease (--public-ip, else iface_addr)
    public_ipv6: IPv6Address | None


@dataclass(frozen=True)
class LinkAddrs:
    name: str
    index: int
    mtu: int
    addrs: tuple[IPv4Interface | IPv6Interface, ...] = field(default_factory=tuple)

    def v4(self) -> list[IPv4Interface]:
        return [a for a in self.addrs if isinstance(a, IPv4Interface)]

    def v6(self) -> list[IPv6Interface]:
        # Link-local addresses cannot carry tunnel traffic between nodes.
        return [a for a in self.addrs if isinstance(a, IPv6Interface) and not a.ip.is_link_local]


def link_addrs(pairs: Iterable[tuple[Link, Sequence[Address]]]) -> list[LinkAddrs]:
    """Netlink's (link, addresses) pairs in the shape the selection works on."""
    return [
        LinkAddrs(name=ln.name, index=ln.index, mtu=ln.mtu, addrs=tuple(a.address for a in addrs))
        for ln, addrs in pairs
    ]


@dataclass(frozen=True)
class IfaceRequest:
    ifaces: Sequence[str] = ()
    iface_regexes: Sequence[str] = ()
    can_reach: str = ""
    public_ip: str = ""
    public_ipv6: str = ""
    need_ipv4: bool = True
    need_ipv6: bool = False


def _find_by_ip(links: Sequence[LinkAddrs], ip: IPv4Address | IPv6Address) -> LinkAddrs | None:
    for link in links:
        if any(a.ip == ip for a in link.addrs):
            return link
    return None


def _usable(link: LinkAddrs, req: IfaceRequest) -> bool:
    return _lacks(link, req) is None


def _lacks(link: LinkAddrs, req: IfaceRequest) -> str | None:
    """What the link is missing for the config ("an IPv6 address, which EnableIPv6 needs"), None when nothing."""
    if req.need_ipv4 and not link.v4():
        return "no IPv4 address, which EnableIPv4 needs"
    if req.need_ipv6 and not link.v6():
        return "no global IPv6 address, which EnableIPv6 needs"
    return None


def select_link(
    req: IfaceRequest,
    links: Sequence[LinkAddrs],
    default_index: int | None,
    reach_index: int | None = None,
) -> tuple[LinkAddrs, IPv4Address | IPv6Address | None]:
    """Pick the link; also return the address that selected it (when chosen by IP) so it is preferred."""
    if req.ifaces:
        for spec in req.ifaces:
            try:
                ip = parse_ip(spec)
            except ValueError:
                link = next((lk for lk in links if lk.name == spec), None)
                if link is not None and _usable(link, req):
                    return link, None
            else:
                link = _find_by_ip(links, ip)
                if link is not None:
                    return link, ip
        raise IfaceError(f"none of --iface {', '.join(req.ifaces)} names an interface with a usable address")
    if req.iface_regexes:
        for rx in req.iface_regexes:
            try:
                pattern = re.compile(rx)
            except re.error as e:
                raise IfaceError(f"--iface-regex {rx!r}: {e}") from None
            for link in links:
                for a in link.addrs:
                    if pattern.search(str(a.ip)) and _usable(link, req):
                        return link, a.ip
            for link in links:
                if pattern.search(link.name) and _usable(link, req):
                    return link, None
        raise IfaceError(f"no interface matches --iface-regex {', '.join(req.iface_regexes)}")
    if req.can_reach:
        if reach_index is None:
            raise IfaceError(f"no route to --iface-can-reach {req.can_reach}")
        link = next((lk for lk in links if lk.index == reach_index), None)
        if link is None:
            raise IfaceError(f"the route to {req.can_reach} uses an interface that has vanished")
        return link, None
    # Upstream's choice: the IPv4 default route's interface, the IPv6 one's in an IPv6-only network.
    family = "IPv6 " if req.need_ipv6 and not req.need_ipv4 else "IPv4 "
    if default_index is None:
        raise IfaceError(
            f"no {family}default route: use --iface, --iface-regex or --iface-can-reach to choose an interface"
        )
    link = next((lk for lk in links if lk.index == default_index), None)
    if link is None:
        raise IfaceError(f"the {family}default route's interface has vanished; use --iface")
    lacks = _lacks(link, req)
    if lacks is not None:
        raise IfaceError(f"interface {link.name} (of the {family}default route) has {lacks}; add one or use --iface")
    return link, None


def external_interface(
    req: IfaceRequest,
    links: Sequence[LinkAddrs],
    default_index: int | None,
    reach_index: int | None = None,
) -> ExternalInterface:
    link, by_ip = select_link(req, links, default_index, reach_index)
    v4 = link.v4()
    v6 = link.v6()
    addr4 = by_ip if isinstance(by_ip, IPv4Address) else (v4[0].ip if v4 else None)
    addr6 = by_ip if isinstance(by_ip, IPv6Address) else (v6[0].ip if v6 else None)
    if req.need_ipv4 and addr4 is None:
        raise IfaceError(f"failed to find an IPv4 address for interface {link.name} (EnableIPv4 needs one)")
    if req.need_ipv6 and addr6 is None:
        raise IfaceError(f"failed to find an IPv6 address for interface {link.name} (EnableIPv6 needs one)")
    try:
        pub4 = IPv4Address(parse_ip(req.public_ip)) if req.public_ip else addr4
        pub6 = IPv6Address(parse_ip(req.public_ipv6)) if req.public_ipv6 else addr6
    except ValueError as e:
        raise IfaceError(f"--public-ip/--public-ipv6: {e}") from None
    return ExternalInterface(
        name=link.name,
        index=link.index,
        mtu=link.mtu,
        iface_addr=addr4 if req.need_ipv4 else None,
        iface_addr6=addr6 if req.need_ipv6 else None,
        public_ip=pub4 if req.need_ipv4 else None,
        public_ipv6=pub6 if req.need_ipv6 else None,
    )
