"""What backends with a tunnel device of their own (vxlan, ipip, ...) do alike with it."""

from __future__ import annotations

import logging

from ..netlink import AF_INET, AF_INET6, IPInterface, KernelEvent, Link, Netlink, NetlinkError
from .base import BackendError

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
