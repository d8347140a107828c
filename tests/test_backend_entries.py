"""The one index of owned kernel entries: how it answers kernel events and what ops it gives (no root needed)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from pyflannel.backend.entries import OwnedEntries, kernel_key
from pyflannel.netlink import NUD_PERMANENT, RTN_BLACKHOLE, Fdb, KernelEvent, Neigh, Op, Route

SN = IPv4Network("10.244.2.0/24")
GW = IPv4Address("10.244.2.0")
PUB = IPv4Address("192.168.77.12")
MAC = "0a:00:00:00:00:02"
ROUTE = Route(dst=SN, gateway=GW, oif=5, onlink=True)
NEIGH = Neigh(ifindex=5, dst=GW, lladdr=MAC)
FDB = Fdb(ifindex=5, lladdr=MAC, dst=PUB)


def ev(action: str, obj: Route | Neigh | Fdb) -> KernelEvent:
    kind = "route" if isinstance(obj, Route) else "neigh" if isinstance(obj, Neigh) else "fdb"
    return KernelEvent(action=action, kind=kind, obj=obj)  # type: ignore[arg-type]


def owned() -> OwnedEntries[IPv4Network]:
    o: OwnedEntries[IPv4Network] = OwnedEntries()
    o.set(SN, [NEIGH, FDB, ROUTE])
    return o


def test_our_own_writes_need_no_repair_and_losses_do() -> None:
    o = owned()
    for e in (ROUTE, NEIGH, FDB):
        assert o.verdict(ev("new", e)) is False
        assert o.verdict(ev("del", e)) is True


def test_changed_entries_need_a_repair() -> None:
    o = owned()
    assert o.verdict(ev("new", Route(dst=SN, gateway=PUB, oif=2))) is True  # same key, other next hop
    assert o.verdict(ev("new", Neigh(ifindex=5, dst=GW, lladdr="0a:00:00:00:00:09"))) is True
    assert o.verdict(ev("new", Neigh(ifindex=5, dst=GW, lladdr=MAC, state=0x02))) is True  # no longer permanent
    # Another destination for our MAC may have replaced ours; deleting another one leaves ours alone.
    other = Fdb(ifindex=5, lladdr=MAC, dst=IPv4Address("192.168.77.99"))
    assert o.verdict(ev("new", other)) is True
    assert o.verdict(ev("del", other)) is False


def test_entries_of_other_keys_are_not_ours() -> None:
    o = owned()
    assert o.verdict(ev("new", Route(dst=SN, gateway=GW, oif=5, onlink=True, priority=7))) is None
    assert o.verdict(ev("del", Neigh(ifindex=6, dst=GW, lladdr=MAC))) is None
    assert o.verdict(KernelEvent(action="new", kind="resync", obj=None)) is None


def test_a_blackhole_replaced_by_a_unicast_route_of_its_key() -> None:
    bh = Route(dst=SN, type=RTN_BLACKHOLE, priority=4096)
    o: OwnedEntries[str] = OwnedEntries()
    o.reset({"blackhole": [bh]})
    assert o.verdict(ev("new", bh)) is False
    assert o.verdict(ev("new", Route(dst=SN, gateway=PUB, oif=2, priority=4096))) is True
    assert o.verdict(ev("new", Route(dst=SN, oif=3))) is None  # cni0's connected route: another key


def test_program_replaces_in_place_and_deletes_only_vanished_keys() -> None:
    o = owned()
    direct = Route(dst=SN, gateway=PUB, oif=2)  # DirectRouting: same route key, no VXLAN entries
    ops = o.program(SN, [direct])
    assert ops == [Op.delete(NEIGH), Op.delete(FDB), Op.replace(direct)]
    assert o.get(SN) == [direct]
    assert o.lookup(ROUTE) == direct
    assert o.lookup(NEIGH) is None
    assert o.program(SN, []) == [Op.delete(direct)]
    assert SN not in o
    assert len(o) == 0


def test_kernel_keys() -> None:
    assert kernel_key(ROUTE) == kernel_key(Route(dst=SN, gateway=PUB, oif=9))
    assert kernel_key(ROUTE) != kernel_key(Route(dst=SN, priority=1))
    assert kernel_key(FDB) == kernel_key(Fdb(ifindex=5, lladdr=MAC, dst=None, state=NUD_PERMANENT))
