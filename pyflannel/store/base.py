"""The store interface: network config, our own lease, and a stream of everyone's leases."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from ipaddress import IPv4Address, IPv6Address
from typing import Any, ClassVar, Protocol

from ..config import NetConfig
from ..lease import Lease, LeaseAttrs, WatchUpdate
from ..subnetenv import SubnetEnv


class StoreError(RuntimeError):
    """A store failure worth a clear message (unreachable, permission denied, ...)."""


class SubnetExhaustedError(StoreError):
    """Every subnet between SubnetMin and SubnetMax is taken."""


class LeaseRevokedError(StoreError):
    """Our own lease vanished from the store (deleted by hand or expired)."""


class StoreObserver(Protocol):
    """What a store reports for the agent's metrics (pyflannel.metrics.Metrics implements it)."""

    def watch_restart(self, cause: str) -> None:
        """The lease watch starts again with a full re-list: "compaction" (etcd compacted the revision it
        watched from), "gone" (Kubernetes' 410), "reconnect" (the stream ended or broke), "failover" (the
        member went silent or failed and another one is used)."""

    def store_error(self) -> None:
        """A request to the store failed (it may be retried)."""

    def lease_operation(self, operation: str, outcome: str) -> None:
        """A lease call the store makes on its own (etcd: revoking a lease it replaced)."""


class Unobserved:
    """The StoreObserver of a store built without one (tests, tools): drops everything."""

    def watch_restart(self, cause: str) -> None:
        pass

    def store_error(self) -> None:
        pass

    def lease_operation(self, operation: str, outcome: str) -> None:
        pass


class Store(ABC):
    # "etcd" or "kube": named in build info and /status.
    name: ClassVar[str] = ""
    observer: StoreObserver = Unobserved()

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

    async def preflight(self, cfg: NetConfig) -> None:
        """Raise (a StoreError) when no lease of `cfg` can be acquired, before the backend creates anything: a
        node that cannot join must leave no device behind. Stores that can only tell by trying keep this no-op."""
        return None

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
