"""The store interface: network config, our own lease, and a stream of everyone's leases."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from ..config import NetConfig
from ..lease import Lease, LeaseAttrs, WatchUpdate
from ..subnetenv import SubnetEnv


class StoreError(RuntimeError):
    """A store failure worth a clear message (unreachable, permission denied, ...)."""


class SubnetExhaustedError(StoreError):
    """Every subnet between SubnetMin and SubnetMax is taken."""


class LeaseRevokedError(StoreError):
    """Our own lease vanished from the store (deleted by hand or expired)."""


class Store(ABC):
    @abstractmethod
    async def get_network_config(self) -> NetConfig:
        """The cluster's net-conf.json, waiting (bounded by the caller) while it is absent."""

    @abstractmethod
    async def acquire_lease(self, cfg: NetConfig, attrs: LeaseAttrs, prev: SubnetEnv | None) -> Lease:
        """Take a subnet for this node in upstream's order (own PublicIP, previous subnet.env, random free)."""

    @abstractmethod
    async def renew_lease(self, lease: Lease) -> Lease:
        """Extend our lease; raises LeaseRevokedError if it is gone."""

    @abstractmethod
    def watch_leases(self) -> AsyncIterator[WatchUpdate]:
        """A LeaseSnapshot first and after every re-list, then batches of LeaseEvents. Never ends by itself;
        survives compaction and lost connections (re-lists and sends a fresh snapshot)."""

    async def public_ip_overrides(self) -> tuple[IPv4Address | None, IPv6Address | None]:
        """Addresses the store says this node must advertise, winning over --public-ip(v6) (kube: the
        `<p>/node-public-ip(v6)` annotations). None: no override."""
        return None, None

    async def previous_backend_data(self, backend_type: str) -> tuple[Any, Any]:
        """The BackendData and BackendV6Data this node advertised last, when the store keeps them and they were
        written by `backend_type` (kube: our own Node's backend-data annotations); (None, None) otherwise. The
        backend restores what peers know about us from them (Backend.restore_backend_data)."""
        return None, None

    @abstractmethod
    async def close(self) -> None: ...
