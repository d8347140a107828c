"""What backends with a tunnel device of their own (vxlan, ipip, ...) do alike with it."""

from __future__ import annotations

import logging
from ipaddress import IPv4Address

from ..netlink import AF_INET, AF_INET6, IPInterface, KernelEvent, Link, Netlink, NetlinkError
from .base import BackendError, ExternalInterface

log = logging.getLogger(__name__)


async def configure_device(nl: Netlink, link: Link, addr: IPInterface) -> None:
    """Exactly `addr` on the device (stale ones from an earlier subnet removed, IPv6 link-local kept), and the
    link up."""
    try:
        have = False
        for a in await nl.addresses(link.index, AF_INET if addr.version == 4 else AF_INET6):
            if a.address == addr:
                have = True
            elif addr.version == 4 or not a.address.ip.is_link_local:
                log.info("removing stale address %s from %s", a.address, link.name)
                await nl.delete_address(link.index, a.address)
        if not have:
            await nl.add_address(link.index, addr)
        if not link.up:
            await nl.set_up(link.index)
    except NetlinkError as e:
        raise BackendError(f"failed to configure interface {link.name}: {e}") from e


async def delete_device(nl: Netlink, link: Link) -> None:
    try:
        await nl.delete_link(link.index)
    except NetlinkError as e:
        raise BackendError(f"failed to delete interface {link.name}: {e}") from e


def device_event_needs_repair(ev: KernelEvent, name: str, index: int) -> bool:
    """A link event that loses our device `name` (ifindex `index`, 0 before it exists): deleted, taken down
    (which flushes its routes without route notifications), renamed, or its name now taken by another device."""
    obj = ev.obj
    if not isinstance(obj, Link) or not index:
        return False
    if obj.index == index:
        return ev.action == "del" or not obj.up or obj.name != name
    return obj.name == name


# RFC 791: every IPv4 host must take 68-byte datagrams; a tunnel device below that cannot carry IPv4.
IPV4_MIN_MTU = 68


def underlay_ipv4(ext: ExternalInterface, backend: str) -> IPv4Address:
    """The address an IPv4 tunnel (ipip, udp) sends from: the interface's own, else the public IP."""
    local = ext.iface_addr or ext.public_ip
    if local is None:
        raise BackendError(f"{backend}: the external interface {ext.name} has no IPv4 address")
    return local


def inner_mtu(ext: ExternalInterface, overhead: int, backend: str) -> int:
    """The MTU left inside the tunnel by `overhead` bytes of encapsulation; BackendError when below IPv4's minimum."""
    mtu = ext.mtu - overhead
    if mtu < IPV4_MIN_MTU:
        raise BackendError(
            f"{backend}: MTU {ext.mtu} of {ext.name} is too small: encapsulation takes {overhead} bytes of it and "
            f"leaves {mtu}, below IPv4's minimum of {IPV4_MIN_MTU}"
        )
    return mtu
