"""host-gw: every peer subnet is routed via the peer's public IP on the external interface.

This only works when all nodes share one L2 segment; a peer whose public IP is not on a directly connected
subnet of the external interface is skipped with a warning (the kernel would refuse the route).
"""

from __future__ import annotations

import logging

from ..netlink import IPAddress, IPNetwork, Route
from .route_network import RouteNetwork

log = logging.getLogger(__name__)


class HostGwBackend(RouteNetwork):
    backend_type = "host-gw"

    def route_to(self, dst: IPNetwork, gw: IPAddress, warn: bool) -> Route | None:
        r = self._l2.direct_route(dst, gw)
        if r is None and warn:
            log.warning(
                "host-gw: peer %s (public IP %s) is not on the L2 segment of %s; skipping "
                "(host-gw needs all nodes on one segment)",
                dst,
                gw,
                self.ext.name,
            )
        return r

    def route_oifs(self) -> set[int]:
        return {self.ext.index}


BACKEND = HostGwBackend
