"""The calls that go through pyroute2's IPRoute: link create/set/delete, addresses, `ip route get`.

Worker thread only (see the package docstring): pyroute2's sync IPRoute runs an event loop of its own, so it
cannot be used on the daemon's loop thread. Every function takes the IPRoute handle that Netlink owns and
turns pyroute2's exceptions into NetlinkError. pyroute2 is imported only when a handle is opened: importing it
costs about 130 ms.
"""

from __future__ import annotations

import errno
import ipaddress
import os
from typing import Any

from .codec import Address, IPAddress, IPInterface, NetlinkError


def open_iproute(netns: str | None) -> Any:
    from pyroute2 import IPRoute

    try:
        # groups=0: no multicast subscriptions, whose unread notifications would pile up in the socket.
        return IPRoute(netns=netns, flags=0, groups=0) if netns else IPRoute(groups=0)
    except OSError as e:
        raise NetlinkError(e.errno or errno.EIO, f"cannot open netlink in netns {netns}: {e}") from e


def as_netlink_error(e: Exception, what: str) -> NetlinkError:
    code = getattr(e, "code", None) or getattr(e, "errno", None) or errno.EIO
    return NetlinkError(code, f"{what}: {e}")


def addr_from_msg(m: Any) -> Address | None:
    a = m.get("address")
    if a is None:
        return None
    # IFA_LOCAL is the interface's own address on point-to-point links; IFA_ADDRESS is the peer there.
    local = m.get("local") or a
    return Address(index=int(m["index"]), address=ipaddress.ip_interface(f"{local}/{m['prefixlen']}"), scope=m["scope"])


# ---------------------------------------------------------------- links


def vxlan_attrs(
    vni: int, local: IPAddress | None, dev_index: int | None, port: int, learning: bool, gbp: bool
) -> dict[str, Any]:
    """pyroute2's keywords for `type vxlan id VNI local LOCAL dev DEV [dstport PORT] [no]learning [gbp]`."""
    kw: dict[str, Any] = {"vxlan_id": vni, "vxlan_learning": int(learning)}
    if local is not None:
        kw["vxlan_local" if local.version == 4 else "vxlan_local6"] = str(local)
    if dev_index:
        kw["vxlan_link"] = dev_index
    if port:
        kw["vxlan_port"] = port
    if gbp:
        kw["vxlan_gbp"] = True
    return kw


def create_link(ipr: Any, name: str, kind: str, mtu: int | None, mac: str | None, attrs: dict[str, Any]) -> None:
    """`ip link add NAME [mtu MTU] [address MAC] type KIND ...` (attrs: pyroute2's keywords of that kind).

    A kind the kernel does not know (its module is missing: this is what the kernel answers even after trying
    to load it) is EOPNOTSUPP, reported as such."""
    kw: dict[str, Any] = {"ifname": name, "kind": kind, **attrs}
    if mtu:
        kw["mtu"] = mtu
    if mac:
        kw["address"] = mac
    try:
        ipr.link("add", **kw)
    except Exception as e:
        err = as_netlink_error(e, f"create {kind} {name}")
        if err.errno == errno.EOPNOTSUPP:
            why = f"the kernel lacks the `{kind}` module (modprobe {kind}): {os.strerror(err.errno)}"
            raise NetlinkError(err.errno, f"create {kind} {name}: {why}") from e
        raise err from e


def link_op(ipr: Any, what: str, **kw: Any) -> None:
    try:
        ipr.link(what, **kw)
    except Exception as e:
        raise as_netlink_error(e, f"link {what} {kw}") from e


# ---------------------------------------------------------------- addresses, route get


def addresses(ipr: Any, index: int | None, family: int | None) -> list[Address]:
    kw: dict[str, Any] = {}
    if family is not None:
        kw["family"] = family
    out = []
    for m in ipr.addr("dump", **kw):
        if index is not None and m["index"] != index:
            continue
        a = addr_from_msg(m)
        if a is not None:
            out.append(a)
    return out


def addr_op(ipr: Any, what: str, index: int, iface: IPInterface) -> None:
    try:
        ipr.addr(what, index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
    except Exception as e:
        raise as_netlink_error(e, f"addr {what} {iface} dev {index}") from e


def route_get_index(ipr: Any, target: IPAddress) -> int | None:
    """`ip route get TARGET`: the ifindex the kernel would send to `target` by; None when unreachable."""
    try:
        msgs = ipr.route("get", dst=str(target))
    except Exception as e:
        if getattr(e, "code", None) in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ESRCH):
            return None
        raise as_netlink_error(e, f"route get {target}") from e
    for m in msgs:
        oif = m.get("oif")
        if oif:
            return int(oif)
    return None
