"""alloc: take and renew a lease and write subnet.env, and program nothing (upstream's `pkg/backend/alloc`).

For clusters where something else routes the subnets between nodes. The lease carries no BackendType and no
BackendData; FLANNEL_MTU is the external interface's MTU. Peers are followed (the daemon does that for every
backend) but nothing is done with them.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..lease import Lease
from .base import Backend, BackendAttrs, BackendError, Entries, KernelView


class AllocBackend(Backend):
    async def prepare(self) -> BackendAttrs:
        if self.cfg.enable_ipv4 and self.ext.public_ip is None:
            raise BackendError("alloc: IPv4 is enabled but the external interface has no IPv4 address")
        return BackendAttrs(backend_type="", backend_data=None, backend_v6_data=None, mtu=self.ext.mtu)

    async def start(self, own: Lease) -> None:
        pass

    async def add_peers(self, leases: Sequence[Lease]) -> None:
        pass

    async def remove_peer(self, lease: Lease) -> None:
        pass

    async def reconcile(self, peers: Sequence[Lease]) -> None:
        pass

    async def inspect(self, peers: Sequence[Lease]) -> KernelView:
        # Nothing is programmed for a peer, so nothing can be missing: /status is complete by construction.
        return KernelView(peers={lease.key: Entries() for lease in peers})

    async def close(self) -> None:
        pass


BACKEND = AllocBackend
