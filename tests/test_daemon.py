"""The agent's lease bookkeeping, with an in-memory backend: what reaches the kernel layer for each update."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network
from typing import Any, cast

import pytest

from pyflannel.backend.base import Backend, BackendAttrs, BackendError
from pyflannel.daemon import Agent, AgentConfig
from pyflannel.iface import IfaceRequest
from pyflannel.lease import EventType, Lease, LeaseAttrs, LeaseEvent, LeaseSnapshot
from pyflannel.netlink import RESYNC, KernelEvent, Route
from pyflannel.store.base import LeaseRevokedError
from pyflannel.store.etcd import EtcdOptions


class RecordingBackend(Backend):
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail_next = False
        self.events: list[KernelEvent] = []

    async def prepare(self) -> BackendAttrs:
        return BackendAttrs("vxlan", None, None, 1450)

    async def start(self, own: Lease) -> None:
        pass

    async def add_peers(self, leases: Sequence[Lease]) -> None:
        if self.fail_next:
            self.fail_next = False
            raise BackendError("no such device")
        self.calls.append(("add", ",".join(lease.key for lease in leases)))

    async def remove_peer(self, lease: Lease) -> None:
        self.calls.append(("remove", lease.key))

    async def reconcile(self, peers: Sequence[Lease]) -> None:
        self.calls.append(("reconcile", ",".join(sorted(p.key for p in peers))))

    async def close(self) -> None:
        pass

    def kernel_event_needs_repair(self, ev: KernelEvent) -> bool:
        self.events.append(ev)
        return ev.action == "del"


def lease(n: int, ip: str = "192.168.77.20", mac: str = "0a:00:00:00:00:01", exp: float | None = 1.0) -> Lease:
    attrs = LeaseAttrs(IPv4Address(ip), None, "vxlan", {"VNI": 1, "VtepMAC": mac})
    return Lease(IPv4Network(f"10.244.{n}.0/24"), None, attrs, expiration=exp)


def agent() -> tuple[Agent, RecordingBackend]:
    cfg = AgentConfig(etcd=EtcdOptions(), subnet_file="/nonexistent", iface=IfaceRequest())
    a = Agent(cfg=cfg, store=cast(Any, None), netlink=cast(Any, None))
    b = RecordingBackend()
    a.backend = b
    a.own = lease(1, ip="192.168.77.11")
    return a, b


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_snapshot_reconciles_peers_without_our_own_lease() -> None:
    a, b = agent()
    run(a._apply(LeaseSnapshot((lease(1, ip="192.168.77.11"), lease(2), lease(3)))))
    assert b.calls == [("reconcile", "10.244.2.0-24,10.244.3.0-24")]
    assert a.synced


def test_snapshot_without_our_lease_means_revoked() -> None:
    a, _ = agent()
    with pytest.raises(LeaseRevokedError):
        run(a._apply(LeaseSnapshot((lease(2),))))


def test_renewal_touches_nothing_but_a_changed_peer_is_replaced_in_place() -> None:
    a, b = agent()
    run(a._apply(LeaseSnapshot((lease(1, ip="192.168.77.11"), lease(2)))))
    b.calls.clear()
    run(a._apply([LeaseEvent(EventType.ADDED, lease(2, exp=99.0))]))  # a renewal: only the TTL moved
    assert b.calls == []
    run(a._apply([LeaseEvent(EventType.ADDED, lease(2, mac="0a:00:00:00:00:02"))]))  # the peer restarted
    assert b.calls == [("add", "10.244.2.0-24")]  # replaced, never removed first
    run(a._apply([LeaseEvent(EventType.REMOVED, lease(2))]))
    assert b.calls[-1] == ("remove", "10.244.2.0-24")
    assert a.peers == {}


def test_deleting_our_own_lease_is_revocation() -> None:
    a, _ = agent()
    with pytest.raises(LeaseRevokedError):
        run(a._apply([LeaseEvent(EventType.REMOVED, lease(1, ip="192.168.77.11"))]))


def test_a_burst_of_events_is_one_batch_and_a_removal_keeps_the_order() -> None:
    a, b = agent()
    added = [LeaseEvent(EventType.ADDED, lease(n)) for n in (4, 5, 6)]
    run(a._apply([*added, LeaseEvent(EventType.REMOVED, lease(5)), LeaseEvent(EventType.ADDED, lease(7))]))
    assert b.calls == [
        ("add", "10.244.4.0-24,10.244.5.0-24,10.244.6.0-24"),
        ("remove", "10.244.5.0-24"),
        ("add", "10.244.7.0-24"),
    ]
    assert set(a.peers) == {"10.244.4.0-24", "10.244.6.0-24", "10.244.7.0-24"}


def test_a_kernel_failure_asks_for_repair_instead_of_stopping_the_agent() -> None:
    a, b = agent()
    b.fail_next = True
    run(a._apply([LeaseEvent(EventType.ADDED, lease(4)), LeaseEvent(EventType.ADDED, lease(5))]))
    assert a.repair.is_set()
    assert set(a.peers) == {"10.244.4.0-24", "10.244.5.0-24"}  # the repair pass programs both
    run(a._apply([LeaseEvent(EventType.ADDED, lease(6))]))
    assert b.calls == [("add", "10.244.6.0-24")]  # the agent goes on with the next events


class FakeMonitor:
    """KernelMonitor's interface over a fixed list of events."""

    def __init__(self, events: list[KernelEvent]) -> None:
        self.events = list(events)
        self.closed = False

    def __aiter__(self) -> FakeMonitor:
        return self

    async def __anext__(self) -> KernelEvent:
        if not self.events:
            raise StopAsyncIteration
        return self.events.pop(0)

    def close(self) -> None:
        self.closed = True


def route_event(action: str, n: int) -> KernelEvent:
    r = Route(dst=IPv4Network(f"10.244.{n}.0/24"), gateway=IPv4Address(f"10.244.{n}.0"), oif=3, onlink=True)
    return KernelEvent("route", cast(Any, action), r)


def test_kernel_events_ask_for_repair_only_when_the_backend_says_so() -> None:
    a, b = agent()
    ours = [route_event("new", 2), route_event("new", 3)]  # our own writes being announced
    mon = FakeMonitor(ours)
    run(a._kernel_monitor_loop(cast(Any, mon)))
    assert b.events == ours
    assert not a.repair.is_set()
    assert mon.closed

    mon = FakeMonitor([route_event("new", 2), route_event("del", 3), route_event("del", 4)])
    run(a._kernel_monitor_loop(cast(Any, mon)))
    assert a.repair.is_set()
    # Once a pass is due, further events are not even looked at.
    assert b.events[-1] == route_event("del", 3)

    a.repair.clear()
    b.events.clear()
    run(a._kernel_monitor_loop(cast(Any, FakeMonitor([RESYNC]))))
    assert a.repair.is_set()  # lost notifications: always a full pass
    assert b.events == []


def test_repair_runs_a_pass_only_once_synced() -> None:
    a, b = agent()
    a.cfg.reconcile_interval = 300  # only the repair event can wake the loop within this test

    async def main() -> None:
        loop = asyncio.create_task(a._reconcile_loop())
        a.repair.set()
        await asyncio.sleep(0.8)
        assert b.calls == []  # no snapshot yet: the peers are unknown
        a.peers = {"10.244.2.0-24": lease(2)}
        a.synced = True
        a.repair.set()
        for _ in range(50):
            await asyncio.sleep(0.05)
            if b.calls:
                break
        loop.cancel()
        assert b.calls == [("reconcile", "10.244.2.0-24")]

    run(main())
