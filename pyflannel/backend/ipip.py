"""ipip: IPv4 in IPv4 (IP protocol 4), a route per peer and no other state, as upstream flannel's ipip backend.

Device `flannel.ipip`: type ipip, `local <external interface address>`, remote any, MTU = external MTU - 20 (the
outer IPv4 header), address `<own subnet network address>/32`, up. Per peer lease:
  route  <peer subnet> via <peer PublicIP> dev flannel.ipip onlink
With `DirectRouting`, a peer whose PublicIP is on a directly connected subnet of the external interface gets
host-gw's `<peer subnet> via <PublicIP> dev <external>` instead. The lease carries BackendType "ipip" and no
BackendData. IPv4 only.

Loading the ipip module creates `tunl0` (local any, remote any) in every namespace: the kernel hands it the
protocol-4 packets that no tunnel matches more precisely. flannel.ipip's `local` makes it the better match for
traffic to this node, so tunl0 is left alone (a user may run something on it).
"""

from __future__ import annotations

import logging
from ipaddress import IPv4Interface

from ..config import NetConfig
from ..iface import ExternalInterface
from ..netlink import IPAddress, IPNetwork, KernelEvent, Link, Netlink, NetlinkError, Route
from .base import BackendError
from .device import configure_device, delete_device, device_event_needs_repair, inner_mtu, underlay_ipv4
from .options import opt_bool
from .route_network import RouteNetwork

log = logging.getLogger(__name__)

DEVICE = "flannel.ipip"
OVERHEAD = 20  # the outer IPv4 header


class IpipBackend(RouteNetwork):
    backend_type = "ipip"

    @classmethod
    def check_config(cls, cfg: NetConfig) -> None:
        if cfg.enable_ipv6:
            raise BackendError("ipip carries IPv4 only: EnableIPv6 needs another backend (vxlan, host-gw or wireguard)")
        opt_bool(cfg, "DirectRouting")

    def __init__(self, cfg: NetConfig, ext: ExternalInterface, nl: Netlink) -> None:
        super().__init__(cfg, ext, nl)
        self.check_config(cfg)
        self.direct_routing = opt_bool(cfg, "DirectRouting")
        self.local = underlay_ipv4(ext, "ipip")
        self._mtu = inner_mtu(ext, OVERHEAD, "ipip")
        self._index = 0
        log.info("IPIP config: DirectRouting=%s", self.direct_routing)

    def mtu(self) -> int:
        return self._mtu

    @staticmethod
    def _foreign(link: Link) -> str:
        """Why an existing flannel.ipip cannot be flannel's own (then it is a user's, and never deleted)."""
        if link.kind != "ipip" or link.ipip is None:
            return f"it is a {link.kind or 'plain'} device, not ipip"
        if link.ipip.remote is not None:
            return f"it is a point-to-point tunnel to {link.ipip.remote}, where flannel's has remote any"
        return ""

    async def ensure_device(self) -> None:
        link = await self.nl.link_by_name(DEVICE)
        if link is not None:
            why = self._foreign(link)
            if why:
                raise BackendError(
                    f"{DEVICE} already exists and is not one flannel made: {why}; "
                    f"remove it (ip link delete {DEVICE}) or free the name, then restart flanneld"
                )
            assert link.ipip is not None
            if link.ipip.local != self.local:
                # Ours from before the node's address changed: peers now reach us on the new one.
                log.warning("%s has local %s, not %s; recreating it", DEVICE, link.ipip.local, self.local)
                await delete_device(self.nl, link)
                link = None
        if link is None:
            if self._index:
                log.warning("IPIP device %s is gone; recreating it", DEVICE)
            try:
                # pmtudisc off, as upstream's device (its netlink library always sends 0): outer headers without DF.
                link = await self.nl.create_ipip(DEVICE, local=self.local, mtu=self._mtu, pmtudisc=False)
            except NetlinkError as e:
                raise BackendError(f"failed to create the ipip device {DEVICE}: {e}") from e
            self.made_device(DEVICE, link.index)
        elif link.mtu != self._mtu:
            log.info("current MTU of %s is %d, setting it to %d", DEVICE, link.mtu, self._mtu)
            try:
                await self.nl.set_mtu(link.index, self._mtu)
            except NetlinkError as e:
                raise BackendError(f"failed to set MTU {self._mtu} on {DEVICE}: {e}") from e
        self._index = link.index
        own = self._own
        if own is not None and own.subnet is not None:
            # The /32 gives the node a source address on the flannel network (for host-to-pod traffic) without
            # the broadcast routes a wider prefix would add.
            await configure_device(self.nl, link, IPv4Interface((own.subnet.network_address, 32)))

    async def close(self) -> None:
        await super().close()
        # The data plane stays for the next start, unless this run never got a lease (Backend.remove_half_built).
        await self.remove_half_built(self._own)

    def device_event_needs_repair(self, ev: KernelEvent) -> bool:
        return device_event_needs_repair(ev, DEVICE, self._index)

    def route_to(self, dst: IPNetwork, gw: IPAddress, warn: bool) -> Route | None:
        if self.direct_routing:
            direct = self._l2.direct_route(dst, gw)
            if direct is not None:
                return direct
        return Route(dst=dst, gateway=gw, oif=self._index, onlink=True)

    def route_oifs(self) -> set[int]:
        # Direct routes via the external interface are ours only when DirectRouting could have made them.
        return {self._index, self.ext.index} if self.direct_routing else {self._index}


BACKEND = IpipBackend
