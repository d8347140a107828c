"""The backend interface. A backend owns the kernel objects that carry pod traffic between nodes."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING, Any

from ..lease import Lease

if TYPE_CHECKING:
    from ..netlink import KernelEvent


class BackendError(RuntimeError):
    """The backend could not program the kernel; the message says what and why."""


@dataclass(frozen=True)
class ExternalInterface:
    """The underlay interface packets leave by, and the addresses peers reach us on."""

    name: str
    index: int
    mtu: int
    iface_addr: IPv4Address | None  # the interface's own IPv4 address (vxlan `local`, unless public_ip differs)
    iface_addr6: IPv6Address | None
    public_ip: IPv4Address | None  # what we advertise in the lease (--public-ip, else iface_addr)
    public_ipv6: IPv6Address | None


@dataclass(frozen=True)
class BackendAttrs:
    """What the backend contributes to our lease and to subnet.env."""

    backend_type: str
    backend_data: Any
    backend_v6_data: Any
    mtu: int


class Backend(ABC):
    """Lifecycle: prepare() before the lease (its attrs go into the lease), start(own lease), then peer
    updates. reconcile() is the bulk path and the periodic repair: it makes the kernel hold exactly the
    entries for `peers` on the backend's own devices, adding what is missing and sweeping what matches no
    lease. close() releases resources but leaves the data plane in place so pods keep talking."""

    @abstractmethod
    async def prepare(self) -> BackendAttrs: ...

    @abstractmethod
    async def start(self, own: Lease) -> None: ...

    @abstractmethod
    async def add_peers(self, leases: Sequence[Lease]) -> None:
        """Program peers in one kernel batch, each replacing whatever was programmed for its subnet before
        (idempotent). A burst of new leases (a cluster scaling up) costs one round trip, not one per peer."""

    async def add_peer(self, lease: Lease) -> None:
        await self.add_peers([lease])

    def prefer_macs(self, mac4: str | None, mac6: str | None) -> None:  # noqa: B027
        """MACs to use if the backend has to create its devices (only backends with a VTEP MAC care)."""

    @abstractmethod
    async def remove_peer(self, lease: Lease) -> None: ...

    @abstractmethod
    async def reconcile(self, peers: Sequence[Lease]) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    def kernel_event_needs_repair(self, ev: KernelEvent) -> bool:
        """Whether a kernel change calls for a reconcile pass: an entry we programmed was deleted or replaced,
        our device went away, or an entry a pass would sweep appeared. Our own writes are announced too and must
        give False, or every write would trigger a pass. Called for every event (15000 while 5000 peers are
        programmed), so it must be cheap and must not await. The default relies on the periodic pass alone."""
        return False
