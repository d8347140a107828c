"""The backend interface. A backend owns the kernel objects that carry pod traffic between nodes.

A backend is one module of this package exposing `BACKEND`, its Backend subclass, and one line in
`registry.BACKENDS`. The daemon knows nothing else about it.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from ..iface import ExternalInterface
from ..lease import Lease
from ..netlink import NetlinkError

if TYPE_CHECKING:
    from ..config import NetConfig
    from ..netlink import KernelEvent, Netlink

log = logging.getLogger(__name__)


class BackendError(RuntimeError):
    """The backend could not program the kernel; the message says what and why."""


@dataclass(frozen=True)
class BackendAttrs:
    """What the backend contributes to our lease and to subnet.env."""

    backend_type: str
    backend_data: Any
    backend_v6_data: Any
    mtu: int


@dataclass(frozen=True)
class Figure:
    """One sample of a backend's own figures for /metrics (udp's packet counters, WireGuard's handshakes): the
    metric's name without the `flannel_` prefix, its help text and type, its labels and value. Backends describe
    figures and never import the metrics library."""

    name: str
    doc: str
    kind: Literal["counter", "gauge"]
    value: float
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Entries:
    """Kernel entries as `ip`-like lines: those the agent programmed and the kernel holds, and those it lacks."""

    present: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()


@dataclass(frozen=True)
class KernelView:
    """What the kernel holds beside what the agent believes (/status). `peers` by lease key; `own` the entries
    that serve no peer (a device's Network route, the blackhole route); `unexpected` what the kernel holds on our
    devices that no lease asks for (a reconcile pass would sweep it). `inspected` False: the backend cannot say."""

    peers: Mapping[str, Entries] = field(default_factory=dict)
    own: Entries = Entries()
    unexpected: tuple[str, ...] = ()
    inspected: bool = True


def kernel_view(
    want: Mapping[str, Sequence[str]], held: Iterable[str], own: Sequence[str] = (), held_own: Iterable[str] = ()
) -> KernelView:
    """Compare what each peer (and the node itself) should have with what the kernel holds, line by line."""
    have = set(held)
    wanted = {line for lines in want.values() for line in lines}
    have_own = set(held_own)
    return KernelView(
        peers={
            key: Entries(tuple(x for x in lines if x in have), tuple(x for x in lines if x not in have))
            for key, lines in want.items()
        },
        own=Entries(tuple(x for x in own if x in have_own), tuple(x for x in own if x not in have_own)),
        unexpected=tuple(sorted(have - wanted)),
    )


class RepairObserver(Protocol):
    def kernel_repair(self, kind: str, count: int = 1) -> None:
        """The backend found and restored kernel state on its own (not through a reconcile pass the agent ran)."""


class _Unobserved:
    def kernel_repair(self, kind: str, count: int = 1) -> None:
        pass


class Backend(ABC):
    """Lifecycle: restore_backend_data() with what the store kept of our last lease, prepare() before the lease
    (its attrs go into the lease), start(own lease), then run() beside peer updates. reconcile() is the bulk path
    and the periodic repair: it makes the kernel hold exactly the entries for `peers` on the backend's own
    devices, adding what is missing and sweeping what matches no lease. close() releases resources but leaves the
    data plane in place so pods keep talking, except what an agent that never got a lease built (see
    remove_half_built())."""

    def __init__(self, cfg: NetConfig, ext: ExternalInterface, nl: Netlink) -> None:
        """Reads and validates the backend's options (BackendError); touches no kernel state."""
        self.cfg = cfg
        self.ext = ext
        self.nl = nl
        # Told about repairs the backend makes by itself; the agent replaces it with its metrics.
        self.observer: RepairObserver = _Unobserved()
        # The devices this run created, by name, with the ifindex each got: remove_half_built()'s ledger.
        self._made: dict[str, int] = {}

    @classmethod  # noqa: B027
    def check_config(cls, cfg: NetConfig) -> None:
        """Refuse a network config this backend cannot serve (BackendError), before the agent looks for its
        interface or takes a lease."""

    def restore_backend_data(self, data: Any, v6_data: Any) -> None:  # noqa: B027
        """The BackendData / BackendV6Data this node advertised last with this backend type, when the store kept
        them (None otherwise). State that peers hold about us (a VTEP MAC, a public key) is taken from here when
        the backend has to recreate it, so a restart does not make every peer reprogram us. Untrusted input: a
        backend validates it and ignores what it cannot use."""

    @abstractmethod
    async def prepare(self) -> BackendAttrs: ...

    @abstractmethod
    async def start(self, own: Lease) -> None: ...

    async def run(self) -> None:  # noqa: B027
        """A long-running task for a userspace data path, run beside the watch and reconcile loops until the
        agent stops (cancelled then). An exception ends the agent. Kernel-only backends have none."""

    @abstractmethod
    async def add_peers(self, leases: Sequence[Lease]) -> None:
        """Program peers in one kernel batch, each replacing whatever was programmed for its subnet before
        (idempotent). A burst of new leases (a cluster scaling up) costs one round trip, not one per peer."""

    async def add_peer(self, lease: Lease) -> None:
        await self.add_peers([lease])

    @abstractmethod
    async def remove_peer(self, lease: Lease) -> None: ...

    @abstractmethod
    async def reconcile(self, peers: Sequence[Lease]) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    def made_device(self, name: str, index: int) -> None:
        """Record that this run created device `name`, which got ifindex `index` (a later recreation replaces the
        record). Devices found and reused are never recorded: they are what a previous run left."""
        self._made[name] = index

    def lease_taken(self) -> None:
        """The agent now holds a lease advertising this backend's attrs (called right after the acquire, before
        start()): from here its devices are the node's data plane, which close() leaves in place even if the agent
        is stopped before start() ran (peers may already hold our VtepMAC or key)."""
        self._made.clear()

    async def remove_half_built(self, own: Lease | None) -> list[str]:
        """The one rule for what close() leaves of a backend's devices. Once a lease was handed to start() (`own`,
        the backend's own lease, None while it has none) the data plane stays, as upstream: pods keep talking
        while the agent restarts and the next start reuses it, so nothing is removed. An agent that never got a
        lease (bad config found late, no free subnet, the IPv6 device refused after the IPv4 one, stopped while
        waiting) has no data plane yet: the devices this run made are deleted, so that nothing half-built is
        left. Devices a previous run left are kept (peers hold their MACs or keys), and so is a device that
        replaced ours meanwhile (its ifindex differs). Returns the names of this run's devices not replaced since
        (removed, already gone, or failing to be removed, which is logged), for whatever serves them (a userspace
        process) to be stopped too."""
        if own is not None:
            return []
        made, self._made = self._made, {}
        ours: list[str] = []
        for name, index in made.items():
            try:
                link = await self.nl.link_by_name(name)
                if link is not None and link.index != index:
                    continue
                ours.append(name)
                if link is not None:
                    await self.nl.delete_link(index)
                    log.info("removed %s: this run made it but never got a lease", name)
            except NetlinkError as e:
                if name not in ours:
                    ours.append(name)
                log.warning("cannot remove %s, which this run made but never got a lease for: %s", name, e)
        return ours

    def status(self) -> str:
        """One line for /readyz once the node is ready (e.g. which implementation carries the traffic); "" for
        none. Never a secret."""
        return ""

    async def inspect(self, peers: Sequence[Lease]) -> KernelView:
        """For /status: each peer's entries the kernel holds and lacks, and what it holds that no lease asks for
        (see KernelView), read from the kernel now. Backends that keep no per-peer kernel state say so."""
        return KernelView(peers={lease.key: Entries() for lease in peers}, inspected=False)

    async def figures(self) -> list[Figure]:
        """The backend's own figures for /metrics, read when scraped. Never a secret."""
        return []

    def kernel_event_needs_repair(self, ev: KernelEvent) -> bool:
        """Whether a kernel change calls for a reconcile pass: an entry we programmed was deleted or replaced,
        our device went away, or an entry a pass would sweep appeared. Our own writes are announced too and must
        give False, or every write would trigger a pass. Called for every event (15000 while 5000 peers are
        programmed), so it must be cheap and must not await. The default relies on the periodic pass alone."""
        return False


__all__ = [
    "Backend",
    "BackendAttrs",
    "BackendError",
    "Entries",
    "ExternalInterface",
    "Figure",
    "KernelView",
    "RepairObserver",
    "kernel_view",
]
