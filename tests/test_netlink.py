"""The netlink adapter against a real kernel in a namespace; every check reads state back with ip/bridge."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network, ip_network
from pathlib import Path
from typing import Any, Literal

import pytest

from pyflannel.lab.netns import RunScope, list_ns, run, veth
from pyflannel.netlink import (
    AF_INET6,
    RTN_BLACKHOLE,
    Fdb,
    IpipInfo,
    KernelEvent,
    KernelMonitor,
    Link,
    Neigh,
    Netlink,
    NetlinkError,
    Op,
    Route,
    decode_route,
    encode_op,
    is_missing,
    parse_mac,
)
from pyflannel.netlink.raw import Batch, encode_chunks

pytestmark = pytest.mark.integration


def two_ns(scope: RunScope) -> tuple[str, str]:
    a = scope.add_ns("a")
    b = scope.add_ns("b")
    veth(a, "eth0", b, "eth0")
    run(["ip", "-n", a, "addr", "add", "192.168.0.1/16", "dev", "eth0"])
    run(["ip", "-n", a, "addr", "add", "fd00:1::1/64", "dev", "eth0", "nodad"])
    run(["ip", "-n", a, "link", "set", "eth0", "up"])
    run(["ip", "-n", b, "link", "set", "eth0", "up"])
    return a, b


def in_ns(ns: str, fn: Callable[[Netlink], Awaitable[None]]) -> None:
    async def main() -> None:
        async with Netlink(netns=ns) as nl:
            await fn(nl)

    asyncio.run(main())


def test_missing_netns_is_an_error_and_not_created() -> None:
    name = "pflt-does-not-exist"

    async def main() -> None:
        async with Netlink(netns=name) as nl:
            with pytest.raises(NetlinkError):
                await nl.links()

    asyncio.run(main())
    assert name not in list_ns()


def test_links_addresses_vxlan(scope: RunScope) -> None:
    a, _ = two_ns(scope)

    async def go(nl: Netlink) -> None:
        eth = await nl.link_by_name("eth0")
        assert eth is not None and eth.kind == "veth" and eth.mtu == 1500 and eth.up
        assert await nl.link_by_name("nope0") is None
        assert await nl.link_by_index(99999) is None
        vx = await nl.create_vxlan(
            "flannel.9",
            vni=9,
            local=IPv4Address("192.168.0.1"),
            dev_index=eth.index,
            port=4789,
            gbp=True,
            mtu=1400,
            mac="0a:00:00:00:00:09",
        )
        assert vx.kind == "vxlan" and vx.mac == "0a:00:00:00:00:09" and vx.mtu == 1400 and not vx.up
        assert vx.vxlan is not None
        assert (vx.vxlan.vni, vx.vxlan.local, vx.vxlan.port, vx.vxlan.gbp, vx.vxlan.learning, vx.vxlan.link) == (
            9,
            IPv4Address("192.168.0.1"),
            4789,
            True,
            False,
            eth.index,
        )
        with pytest.raises(NetlinkError) as ei:
            await nl.create_vxlan("flannel.9", vni=9, local=None, dev_index=None)
        assert ei.value.errno == errno.EEXIST
        await nl.set_up(vx.index)
        await nl.set_mtu(vx.index, 1300)
        await nl.add_address(vx.index, IPv4Interface("10.9.1.0/32"))
        await nl.replace_address(vx.index, IPv4Interface("10.9.1.0/32"))
        addrs = await nl.addresses(vx.index)
        assert [x.address for x in addrs if x.address.version == 4] == [IPv4Interface("10.9.1.0/32")]
        await nl.delete_address(vx.index, IPv4Interface("10.9.1.0/32"))
        lwa = {ln.name: ads for ln, ads in await nl.links_with_addresses()}
        assert IPv4Interface("192.168.0.1/16") in [x.address for x in lwa["eth0"]]
        assert IPv6Interface("fd00:1::1/64") in [x.address for x in lwa["eth0"]]
        assert set(lwa) >= {"lo", "eth0", "flannel.9"}

        assert await nl.default_route() is None
        assert await nl.default_route_index(4) is None
        assert await nl.route_get_index(IPv4Address("192.168.3.3")) == eth.index
        assert await nl.route_get_index(IPv4Address("8.8.8.8")) is None
        await nl.replace_route(Route(dst=ip_network("0.0.0.0/0"), gateway=IPv4Address("192.168.0.254"), oif=eth.index))
        dr = await nl.default_route()
        assert dr is not None and dr.link.name == "eth0" and dr.gateway == IPv4Address("192.168.0.254")
        assert IPv4Interface("192.168.0.1/16") in [x.address for x in dr.addresses]
        assert await nl.default_route_index(4) == eth.index
        assert await nl.route_get_index(IPv4Address("8.8.8.8")) == eth.index
        await nl.delete_link(vx.index)
        assert await nl.link_by_name("flannel.9") is None

    in_ns(a, go)
    dev = run(["ip", "-n", a, "link"])
    assert "flannel.9" not in dev
    assert "default via 192.168.0.254 dev eth0" in run(["ip", "-n", a, "route"])


def test_routes_neigh_fdb(scope: RunScope) -> None:
    a, _ = two_ns(scope)
    run(["ip", "-n", a, "link", "add", "vx0", "type", "vxlan", "id", "1", "local", "192.168.0.1", "dev", "eth0",
         "dstport", "8472", "nolearning"])  # fmt: skip
    run(["ip", "-n", a, "link", "set", "vx0", "up"])

    async def go(nl: Netlink) -> None:
        vx = await nl.link_by_name("vx0")
        eth = await nl.link_by_name("eth0")
        assert vx is not None and eth is not None
        sn = IPv4Network("10.7.2.0/24")
        r = Route(dst=sn, gateway=sn.network_address, oif=vx.index, onlink=True)
        n = Neigh(ifindex=vx.index, dst=sn.network_address, lladdr="0a:00:00:00:02:00")
        f = Fdb(ifindex=vx.index, lladdr="0a:00:00:00:02:00", dst=IPv4Address("192.168.0.2"))
        await nl.replace_neigh(n)
        await nl.replace_fdb(f)
        await nl.replace_route(r)
        await nl.replace_route(r)  # idempotent
        assert r in await nl.routes(oif=vx.index)
        assert n in await nl.neighbours(vx.index)
        assert f in await nl.fdb(vx.index)
        # append adds remotes to the all-zeros (flooding) entry; the kernel only appends for that one
        z = "00:00:00:00:00:00"
        await nl.append_fdb(Fdb(ifindex=vx.index, lladdr=z, dst=IPv4Address("192.168.0.3")))
        await nl.append_fdb(Fdb(ifindex=vx.index, lladdr=z, dst=IPv4Address("192.168.0.4")))
        zs = {x.dst for x in await nl.fdb(vx.index) if x.lladdr == z}
        assert zs == {IPv4Address("192.168.0.3"), IPv4Address("192.168.0.4")}
        # replace moves a unicast entry to another remote
        await nl.replace_fdb(Fdb(ifindex=vx.index, lladdr="0a:00:00:00:02:00", dst=IPv4Address("192.168.0.5")))
        await nl.replace_fdb(f)
        st = await nl.snapshot(neigh_ifindex=vx.index, fdb_ifindex=vx.index)
        assert r in st.routes and st.neighbours == [n] and len(st.fdb) == 3 and f in st.fdb
        out = run(["bridge", "-n", a, "fdb", "show", "dev", "vx0"])
        assert "0a:00:00:00:02:00 dst 192.168.0.2 self permanent" in out
        assert "00:00:00:00:00:00 dst 192.168.0.4 self permanent" in out
        assert "10.7.2.0/24 via 10.7.2.0 dev vx0 onlink" in run(["ip", "-n", a, "route"])
        assert "10.7.2.0 lladdr 0a:00:00:00:02:00 PERMANENT" in run(["ip", "-n", a, "neigh", "show", "dev", "vx0"])

        # IPv6 route through the codec, with the kernel's default metric read back as 0.
        r6 = Route(dst=IPv6Network("fd00:7:2::/64"), gateway=IPv6Address("fd00:1::2"), oif=eth.index)
        await nl.replace_route(r6)
        assert r6 in await nl.routes(AF_INET6)
        n6 = Neigh(ifindex=vx.index, dst=IPv6Address("fd00:7:2::"), lladdr="0a:00:00:00:02:06")
        await nl.replace_neigh(n6)
        assert n6 in await nl.neighbours(vx.index, AF_INET6)

        # Errors carry the kernel's errno and say which request failed.
        errs = await nl.apply(
            [
                Op.replace(Route(dst=IPv4Network("10.7.3.0/24"), gateway=IPv4Address("10.99.0.1"), oif=eth.index)),
                Op.replace(Route(dst=IPv4Network("10.7.4.0/24"), gateway=IPv4Address("192.168.0.4"), oif=eth.index)),
                Op.delete(Route(dst=IPv4Network("10.7.5.0/24"))),
            ]
        )
        assert errs[0] is not None and errs[0].errno == errno.ENETUNREACH and "10.7.3.0/24" in str(errs[0])
        assert errs[1] is None
        assert is_missing(errs[2])

        await nl.delete_route(r)
        await nl.delete_neigh(n)
        # deleting one remote leaves the other; deleting without dst drops the whole entry
        await nl.delete_fdb(Fdb(ifindex=vx.index, lladdr=z, dst=IPv4Address("192.168.0.3")))
        assert [x.dst for x in await nl.fdb(vx.index) if x.lladdr == z] == [IPv4Address("192.168.0.4")]
        await nl.delete_fdb(Fdb(ifindex=vx.index, lladdr=z, dst=IPv4Address("192.168.0.4")))
        await nl.delete_fdb(Fdb(ifindex=vx.index, lladdr="0a:00:00:00:02:00", dst=None))
        await nl.delete_route(r)  # absent: fine by default
        with pytest.raises(NetlinkError):
            await nl.delete_route(r, missing_ok=False)
        assert r not in await nl.routes(oif=vx.index)
        assert n not in await nl.neighbours(vx.index)
        assert await nl.fdb(vx.index) == []

    in_ns(a, go)
    assert "10.7.2.0/24" not in run(["ip", "-n", a, "route"])
    assert run(["bridge", "-n", a, "fdb", "show", "dev", "vx0"]).strip() == ""


def test_blackhole_route(scope: RunScope) -> None:
    a, _ = two_ns(scope)
    sn = IPv4Network("10.244.1.0/24")
    sn6 = IPv6Network("fd00:10:244:1::/64")
    bh = Route(dst=sn, type=RTN_BLACKHOLE)
    bh6 = Route(dst=sn6, type=RTN_BLACKHOLE)
    # The codec: no next hop on the wire, and a blackhole is not the unicast route of the same prefix.
    buf = encode_op(Op.replace(bh), 5, ack=True)
    assert decode_route(buf, 16, len(buf)) == bh
    assert bh != Route(dst=sn)

    def shown() -> str:
        return run(["ip", "-n", a, "route", "show", "type", "blackhole"]) + run(
            ["ip", "-n", a, "-6", "route", "show", "type", "blackhole"]
        )

    async def go(nl: Netlink) -> None:
        eth = await nl.link_by_name("eth0")
        assert eth is not None
        mon = await nl.monitor()
        assert await nl.apply([Op.replace(bh), Op.replace(bh6)]) == [None, None]
        assert await nl.apply([Op.replace(bh), Op.replace(bh6)]) == [None, None]  # idempotent
        out = shown()
        assert out.count("blackhole 10.244.1.0/24") == 1 and out.count("blackhole fd00:10:244:1::/64") == 1, out
        # Read back equal to what was asked for (IPv6's `dev lo` and default metric are not ours).
        got = [r for r in await nl.routes() if r.dst == sn]
        assert got == [bh] and (got[0].protocol, got[0].scope) == (3, 0)  # proto boot, scope universe
        assert bh6 in await nl.routes(AF_INET6)
        assert bh in (await nl.snapshot()).routes
        evs = await until_marker(mon, a, 1)
        assert KernelEvent("route", "new", bh) in evs and KernelEvent("route", "new", bh6) in evs
        assert not any(e.action == "del" for e in evs)  # a replace of the same blackhole is not a delete

        # A unicast route of the same prefix is a different route: deleting the blackhole leaves it.
        uni = Route(dst=sn, gateway=IPv4Address("192.168.0.2"), oif=eth.index, priority=10)
        await nl.replace_route(uni)
        await nl.delete_route(bh, missing_ok=False)
        routes = await nl.routes()
        assert bh not in routes and uni in routes
        assert "blackhole" not in run(["ip", "-n", a, "route", "show", "type", "blackhole"])
        await nl.delete_route(bh6, missing_ok=False)
        assert "fd00:10:244:1::/64" not in run(["ip", "-n", a, "-6", "route"])

        # Deleted by hand: announced as a blackhole delete.
        await nl.replace_route(bh)
        run(["ip", "-n", a, "route", "del", "blackhole", str(sn)])
        evs = await until_marker(mon, a, 2)
        assert KernelEvent("route", "del", bh) in evs

    in_ns(a, go)
    assert shown().strip() == ""


def test_bulk_apply_5000_peers(scope: RunScope) -> None:
    a, _ = two_ns(scope)
    run(["ip", "-n", a, "link", "add", "vx0", "type", "vxlan", "id", "1", "local", "192.168.0.1", "dev", "eth0",
         "dstport", "8472", "nolearning"])  # fmt: skip
    run(["ip", "-n", a, "link", "set", "vx0", "up"])
    count = 5000

    async def go(nl: Netlink) -> None:
        vx = await nl.link_by_name("vx0")
        assert vx is not None
        ops: list[Op] = []
        for i in range(count):
            sn = IPv4Network(f"10.{64 + (i >> 8)}.{i & 255}.0/24")
            mac = f"0a:00:00:00:{i >> 8:02x}:{i & 255:02x}"
            ops += [
                Op.replace(Neigh(vx.index, sn.network_address, mac)),
                Op.replace(Fdb(vx.index, mac, IPv4Address(f"192.168.{1 + (i >> 8)}.{i & 255}"))),
                Op.replace(Route(sn, sn.network_address, vx.index, onlink=True)),
            ]
        t0 = time.monotonic()
        errs = await nl.apply(ops)
        elapsed = time.monotonic() - t0
        assert errs == [None] * len(ops)
        st = await nl.snapshot(neigh_ifindex=vx.index, fdb_ifindex=vx.index)
        assert len([r for r in st.routes if r.oif == vx.index]) == count
        assert len(st.neighbours) == count and len(st.fdb) == count
        print(f"bulk apply of {len(ops)} requests: {elapsed:.3f}s")

    in_ns(a, go)
    assert run(["ip", "-n", a, "route", "show", "dev", "vx0"]).count("onlink") == count
    assert run(["bridge", "-n", a, "fdb", "show", "dev", "vx0"]).count("self permanent") == count
    assert run(["ip", "-n", a, "neigh", "show", "dev", "vx0"]).count("PERMANENT") == count


def test_bulk_apply_in_chunks_reports_each_ops_error(scope: RunScope) -> None:
    # A bulk batch is encoded on the loop while the worker sends the previous chunk (Netlink._bulk): with small
    # chunks, failures scattered over many of them come back at their own op, and every other op is in.
    a, _ = two_ns(scope)

    async def go(nl: Netlink) -> None:
        eth = await nl.link_by_name("eth0")
        assert eth is not None
        raw = await nl.on_worker(nl._raw_w)
        raw.max_chunk = 2048  # ~35 routes a chunk: dozens of chunks
        ops: list[Op] = []
        bad: dict[int, int] = {}
        for i in range(1500):
            sn = IPv4Network(f"10.{64 + (i >> 8)}.{i & 255}.0/24")
            if i % 97 == 5:  # a gateway not on any link
                bad[len(ops)] = errno.ENETUNREACH
                ops.append(Op.replace(Route(sn, IPv4Address("10.99.0.1"), eth.index)))
            elif i % 89 == 7:  # a delete of an absent route
                bad[len(ops)] = errno.ESRCH
                ops.append(Op.delete(Route(sn)))
            else:
                ops.append(Op.replace(Route(sn, IPv4Address("192.168.0.2"), eth.index)))
        # One more on a middle chunk's last op, the one that asks for the ack: the kernel's error answers it
        # instead, and the chunk still counts as done (the same encoded size, so the chunks stay as they were).
        chunks = [(i, j) for _, i, j in encode_chunks(ops, 1, raw.max_chunk)]
        assert len(chunks) > 10
        last = next(j - 1 for _, j in chunks[len(chunks) // 2 :] if j - 1 not in bad)
        bad[last] = errno.ENETUNREACH
        ops[last] = Op.replace(Route(ops[last].obj.dst, IPv4Address("10.99.0.1"), eth.index))
        assert [(i, j) for _, i, j in encode_chunks(ops, 1, raw.max_chunk)] == chunks
        errs = await nl.apply(ops)
        assert {k: e.errno for k, e in enumerate(errs) if e is not None} == bad
        assert errs[last + 1] is None  # the next chunk's first op went in
        assert str(ops[5].obj.dst) in str(errs[5])
        routes = {r.dst for r in await nl.routes(oif=eth.index)}
        assert routes >= {op.obj.dst for k, op in enumerate(ops) if k not in bad}
        assert not routes & {op.obj.dst for k, op in enumerate(ops) if k in bad}
        # The socket goes on with the next request's numbers.
        assert await nl.apply([Op.delete(ops[0].obj)]) == [None]

    in_ns(a, go)


def test_bulk_apply_stops_at_a_chunk_that_raised(scope: RunScope) -> None:
    # A chunk whose send raises (the socket refused it, no reply): the chunks after it are not sent, even the one
    # already queued on the worker behind it, and apply raises that error; the chunks before it are in.
    a, _ = two_ns(scope)

    async def go(nl: Netlink) -> None:
        eth = await nl.link_by_name("eth0")
        assert eth is not None
        raw = await nl.on_worker(nl._raw_w)
        raw.max_chunk = 2048
        dsts = [IPv4Network(f"10.{64 + (i >> 8)}.{i & 255}.0/24") for i in range(1500)]
        ops = [Op.replace(Route(sn, IPv4Address("192.168.0.2"), eth.index)) for sn in dsts]
        chunks = [(i, j) for _, i, j in encode_chunks(ops, 1, raw.max_chunk)]
        k = len(chunks) // 2
        assert k >= 5
        send_chunk, send, submit = raw.send_chunk, raw._send, nl._submit
        sent: list[int] = []  # the first op of each chunk whose bytes reached the socket
        current = -1
        queued = threading.Event()  # chunk k + 1 is on the worker's queue, behind chunk k

        def sending(data: bytes) -> None:
            sent.append(current)
            send(data)

        def failing_chunk(batch: Batch, data: bytes, i: int, j: int) -> None:
            nonlocal current
            current = i
            if i == chunks[k][0]:
                # Once the next chunk waits behind this one (the worker takes it as soon as this one ends), fail
                # as a failure inside send_chunk does: the batch marked failed on the worker, then the raise.
                queued.wait(10)
                batch.failed = True
                raise NetlinkError(errno.ENOBUFS, "forced: chunk refused")
            send_chunk(batch, data, i, j)

        def submitting(fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
            f = submit(fn, *args)
            if fn is failing_chunk and args[2] == chunks[k + 1][0]:
                queued.set()
            return f

        raw.send_chunk, raw._send, nl._submit = failing_chunk, sending, submitting
        try:
            with pytest.raises(NetlinkError, match="forced: chunk refused"):
                await nl.apply(ops)
        finally:
            raw.send_chunk, raw._send, nl._submit = send_chunk, send, submit
        assert queued.is_set()
        assert sent == [i for i, _ in chunks[:k]]
        routes = {r.dst for r in await nl.routes(oif=eth.index)}
        assert routes & set(dsts) == set(dsts[: chunks[k][0]])
        # The socket goes on: the next batch is sent whole.
        assert await nl.apply(ops) == [None] * len(ops)
        assert {r.dst for r in await nl.routes(oif=eth.index)} >= set(dsts)

    in_ns(a, go)


async def until_marker(mon: KernelMonitor, ns: str, n: int, dev: str = "eth0") -> list[KernelEvent]:
    """Every event up to a marker route added now in `ns`: the kernel announces changes in order, so all
    events of earlier changes in that namespace have been read once the marker's arrives."""
    marker = IPv4Network(f"172.30.{n}.0/24")
    run(["ip", "-n", ns, "route", "add", str(marker), "dev", dev])
    out: list[KernelEvent] = []
    async with asyncio.timeout(10):
        async for ev in mon:
            if ev.kind == "route" and isinstance(ev.obj, Route) and ev.obj.dst == marker:
                return out
            out.append(ev)
    raise AssertionError(f"monitor ended before the marker; got {out}")


def test_monitor_paused_during_a_bulk_write_misses_nothing(scope: RunScope) -> None:
    # A bulk apply pauses the monitor's reading (see Netlink.apply): every announcement of the batch, and a change
    # made by hand while the batch was going in, still arrive afterwards, in order.
    a, _ = two_ns(scope)
    run(["ip", "-n", a, "link", "add", "vx0", "type", "vxlan", "id", "1", "local", "192.168.0.1", "dev", "eth0",
         "dstport", "8472", "nolearning"])  # fmt: skip
    run(["ip", "-n", a, "link", "set", "vx0", "up"])

    async def go(nl: Netlink) -> None:
        vx = await nl.link_by_name("vx0")
        assert vx is not None
        mon = await nl.monitor()
        routes = [Route(IPv4Network(f"10.{64 + (i >> 8)}.{i & 255}.0/24"), None, vx.index) for i in range(2000)]
        bulk = asyncio.ensure_future(nl.apply([Op.replace(r) for r in routes]))
        await asyncio.sleep(0)  # the batch is on the worker thread, the monitor paused
        run(["ip", "-n", a, "route", "add", "172.29.0.0/24", "dev", "eth0"])
        assert await bulk == [None] * len(routes)
        evs = await until_marker(mon, a, 9)
        added = {e.obj.dst for e in evs if e.kind == "route" and e.action == "new" and isinstance(e.obj, Route)}
        assert {r.dst for r in routes} <= added
        assert IPv4Network("172.29.0.0/24") in added
        assert mon.overruns == 0

    in_ns(a, go)


def test_monitor_decodes_changes_made_by_hand(scope: RunScope) -> None:
    a, b = two_ns(scope)

    async def go(nl: Netlink) -> None:
        mon = await nl.monitor()
        run(["ip", "-n", a, "link", "add", "vx0", "type", "vxlan", "id", "5", "local", "192.168.0.1", "dev", "eth0",
             "dstport", "4789", "nolearning"])  # fmt: skip
        run(["ip", "-n", a, "link", "set", "vx0", "up"])
        evs = await until_marker(mon, a, 1)
        vx = await nl.link_by_name("vx0")
        assert vx is not None and vx.up
        # Decoded like the pyroute2-based query: equal, vxlan parameters included.
        assert KernelEvent("link", "new", vx) in evs
        assert any(e.kind == "link" and e.action == "new" and e.obj == dataclasses.replace(vx, up=False) for e in evs)

        sn = IPv4Network("10.7.2.0/24")
        r = Route(dst=sn, gateway=sn.network_address, oif=vx.index, onlink=True)
        n = Neigh(ifindex=vx.index, dst=sn.network_address, lladdr="0a:00:00:00:02:00")
        f = Fdb(ifindex=vx.index, lladdr="0a:00:00:00:02:00", dst=IPv4Address("192.168.0.2"))
        r6 = Route(dst=IPv6Network("fd00:7:2::/64"), gateway=IPv6Address("fd00:1::2"), oif=vx.index - 1)
        await nl.apply([Op.replace(n), Op.replace(f), Op.replace(r), Op.replace(r6)])
        evs = await until_marker(mon, a, 2)
        assert [e for e in evs if e.obj in (n, f, r, r6)] == [
            KernelEvent("neigh", "new", n),
            KernelEvent("fdb", "new", f),
            KernelEvent("route", "new", r),
            KernelEvent("route", "new", r6),
        ]
        fdb_ev = next(e.obj for e in evs if e.kind == "fdb")
        assert isinstance(fdb_ev, Fdb) and fdb_ev.flags & 0x02  # NTF_SELF, as a dump reports it

        # Deleted by hand with the usual tools.
        run(["ip", "-n", a, "route", "del", str(sn)])
        run(["ip", "-n", a, "neigh", "del", str(sn.network_address), "dev", "vx0"])
        run(["bridge", "-n", a, "fdb", "del", "0a:00:00:00:02:00", "dev", "vx0", "dst", "192.168.0.2", "self"])
        run(["ip", "-n", a, "-6", "route", "del", "fd00:7:2::/64"])
        evs = await until_marker(mon, a, 3)
        assert [e for e in evs if e.obj in (f, r, r6)] == [
            KernelEvent("route", "del", r),
            KernelEvent("fdb", "del", f),
            KernelEvent("route", "del", r6),
        ]
        # A deleted neighbour is first announced as FAILED, then deleted; neither carries the lladdr any more.
        gone = Neigh(ifindex=vx.index, dst=sn.network_address, lladdr=None, state=0x20)
        assert [(e.action, e.obj) for e in evs if e.kind == "neigh" and e.obj == gone] == [("new", gone), ("del", gone)]

        # The socket lives in the instance's namespace: a change in another one is not seen.
        run(["ip", "-n", b, "route", "add", "10.8.0.0/24", "dev", "eth0"])
        run(["ip", "-n", a, "link", "del", "vx0"])
        evs = await until_marker(mon, a, 4)
        assert not any(isinstance(e.obj, Route) and e.obj.dst == IPv4Network("10.8.0.0/24") for e in evs)
        assert KernelEvent("link", "del", dataclasses.replace(vx, up=False)) in [
            dataclasses.replace(e, obj=dataclasses.replace(e.obj, up=False)) for e in evs if isinstance(e.obj, Link)
        ]

        # Netlink.close() ends the iteration.
        await nl.close()
        async with asyncio.timeout(5):
            async for _ in mon:
                pass
        assert mon.fileno() == -1

    in_ns(a, go)


def test_monitor_overrun_asks_for_a_resync(scope: RunScope, tmp_path: Path) -> None:
    a, _ = two_ns(scope)
    count = 3000
    batch = tmp_path / "routes"
    batch.write_text("".join(f"route add 10.{64 + (i >> 8)}.{i & 255}.0/24 dev eth0\n" for i in range(count)))

    async def go(nl: Netlink) -> None:
        # A tiny receive buffer, and an event loop that reads nothing while the changes happen.
        mon = await nl.monitor(rcvbuf=4096)
        run(["ip", "-n", a, "-batch", str(batch)])
        async with asyncio.timeout(10):
            first = await anext(mon)
        assert first.kind == "resync" and mon.overruns >= 1
        await asyncio.sleep(0.2)  # the reader empties the full socket, so the marker below is not dropped too
        evs = await until_marker(mon, a, 1)
        seen = [e for e in evs if e.kind == "route"]
        assert len(seen) < count  # most were dropped by the kernel...
        # ...and the socket keeps working after the overrun.
        run(["ip", "-n", a, "route", "del", "10.64.0.0/24"])
        evs = await until_marker(mon, a, 2)
        assert [e.action for e in evs if isinstance(e.obj, Route) and e.obj.dst == IPv4Network("10.64.0.0/24")] == [
            "del"
        ]

    in_ns(a, go)


def test_tun_and_tap_links_read_back(scope: RunScope) -> None:
    a = scope.add_ns("a")

    async def go(nl: Netlink) -> None:
        mon = await nl.monitor()
        run(["ip", "-n", a, "tuntap", "add", "dev", "tun7", "mode", "tun"])
        run(["ip", "-n", a, "tuntap", "add", "dev", "tap7", "mode", "tap"])
        evs = await until_marker(mon, a, 1, dev="lo")
        tun = await nl.link_by_name("tun7")
        assert tun is not None
        assert (tun.kind, tun.mtu, tun.mac, tun.up, tun.vxlan, tun.ipip) == ("tun", 1500, None, False, None, None)
        tap = await nl.link_by_name("tap7")
        assert tap is not None and tap.kind == "tun" and tap.mac is not None and len(parse_mac(tap.mac)) == 6
        assert tap.mac in run(["ip", "-n", a, "link", "show", "tap7"])
        assert await nl.link_by_index(tun.index) == tun
        assert {tun, tap} <= set(await nl.links())
        # The monitor decodes the same way as the queries.
        assert KernelEvent("link", "new", tun) in evs and KernelEvent("link", "new", tap) in evs

        await nl.set_up(tun.index)
        await nl.set_mtu(tun.index, 1400)
        tun2 = await nl.link_by_index(tun.index)
        assert tun2 == dataclasses.replace(tun, up=True, mtu=1400)
        await nl.delete_link(tap.index)
        evs = await until_marker(mon, a, 2, dev="lo")
        assert KernelEvent("link", "del", tap) in [
            dataclasses.replace(e, obj=dataclasses.replace(e.obj, up=False)) for e in evs if isinstance(e.obj, Link)
        ]
        assert await nl.link_by_name("tap7") is None

    run(["ip", "-n", a, "link", "set", "lo", "up"])
    in_ns(a, go)
    assert "tun7" in run(["ip", "-n", a, "link"])


def kernel_module(name: str) -> Literal["loaded", "loadable", "absent"]:
    """Whether this kernel has module `name`: loaded (or built in), loadable by modprobe, or absent."""
    if Path("/sys/module", name).is_dir():
        return "loaded"
    try:
        p = subprocess.run(["modprobe", "-n", "-q", name], capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "absent"
    return "loadable" if p.returncode == 0 else "absent"


def expect_kernel_kind(kind: str) -> bool:
    """True where `ip link add ... type KIND` must work, False where it must fail for want of the module.

    A module this host could load but has not is refused outright: the kernel would load it on demand, which
    changes the host (ipip adds its fallback device tunl0 to every namespace, the root one included). The
    stock-kernel VM (PYFLANNEL_IN_VM=1) is the place for that."""
    state = kernel_module(kind)
    if state == "loadable" and os.environ.get("PYFLANNEL_IN_VM") != "1":
        pytest.fail(
            f"kernel {os.uname().release} can load `{kind}` on demand, which would change the host: run this "
            f"test in the stock-kernel VM (python -m pyflannel.lab.vm), or `modprobe {kind}` first",
            pytrace=False,
        )
    return state != "absent"


@pytest.mark.kernel_vm
def test_create_ipip(scope: RunScope) -> None:
    """On this machine's kernel (no ipip module) a clear error; in the stock-kernel VM the device, read back."""
    a, _ = two_ns(scope)
    local = IPv4Address("192.168.0.1")
    have_ipip = expect_kernel_kind("ipip")

    async def go(nl: Netlink) -> None:
        if not have_ipip:
            with pytest.raises(NetlinkError) as ei:
                await nl.create_ipip("flannel.ipip", local=local, mtu=1480)
            assert ei.value.errno == errno.EOPNOTSUPP
            assert "create ipip flannel.ipip: the kernel lacks the `ipip` module (modprobe ipip)" in str(ei.value)
            assert await nl.link_by_name("flannel.ipip") is None
            return
        mon = await nl.monitor()
        tun = await nl.create_ipip("flannel.ipip", local=local, mtu=1480)
        assert (tun.name, tun.kind, tun.mtu, tun.mac, tun.up, tun.vxlan) == (
            "flannel.ipip",
            "ipip",
            1480,
            None,
            False,
            None,
        )
        assert tun.ipip == IpipInfo(local=local, remote=None, link=None, ttl=0, pmtudisc=True)
        assert await nl.link_by_index(tun.index) == tun and tun in await nl.links()
        out = run(["ip", "-n", a, "-d", "link", "show", "flannel.ipip"])
        assert "ipip remote any local 192.168.0.1" in out, out
        # The module's fallback device: any to any.
        tunl0 = await nl.link_by_name("tunl0")
        assert tunl0 is not None and tunl0.ipip is not None and (tunl0.ipip.local, tunl0.ipip.remote) == (None, None)
        evs = await until_marker(mon, a, 1)
        assert any(e.obj == dataclasses.replace(tun, up=e.obj.up) for e in evs if isinstance(e.obj, Link))
        with pytest.raises(NetlinkError) as ei:
            await nl.create_ipip("flannel.ipip", local=local)
        assert ei.value.errno == errno.EEXIST
        await nl.delete_link(tun.index)
        assert await nl.link_by_name("flannel.ipip") is None

    in_ns(a, go)


@pytest.mark.kernel_vm
def test_create_wireguard(scope: RunScope) -> None:
    a = scope.add_ns("a")
    have_wireguard = expect_kernel_kind("wireguard")

    async def go(nl: Netlink) -> None:
        if not have_wireguard:
            with pytest.raises(NetlinkError) as ei:
                await nl.create_wireguard("flannel-wg", mtu=1420)
            assert ei.value.errno == errno.EOPNOTSUPP
            assert "the kernel lacks the `wireguard` module (modprobe wireguard)" in str(ei.value)
            assert await nl.link_by_name("flannel-wg") is None
            return
        wg = await nl.create_wireguard("flannel-wg", mtu=1420)
        assert (wg.name, wg.kind, wg.mtu, wg.mac, wg.up, wg.ipip, wg.vxlan) == (
            "flannel-wg",
            "wireguard",
            1420,
            None,
            False,
            None,
            None,
        )
        with pytest.raises(NetlinkError) as ei:
            await nl.create_wireguard("flannel-wg")
        assert ei.value.errno == errno.EEXIST
        await nl.delete_link(wg.index)

    in_ns(a, go)


AGENT_WAY = """
import asyncio, sys
from ipaddress import IPv4Address, IPv4Interface
from pyflannel.netlink import Netlink

async def main():
    async with Netlink() as nl:  # the namespace the process is in, as the agent opens it
        eth = await nl.link_by_name("eth0")
        vx = await nl.create_vxlan("flannel.7", vni=7, local=IPv4Address("192.168.0.1"), dev_index=eth.index)
        await nl.set_up(vx.index)
        await nl.add_address(vx.index, IPv4Interface("10.7.0.0/32"))
        await nl.links_with_addresses()
        await nl.route_get_index(IPv4Address("192.168.3.3"))
        await nl.default_route()
asyncio.run(main())
print(sorted(m for m in sys.modules if m.startswith("pyroute2")))
"""


def test_agent_netlink_needs_no_pyroute2(scope: RunScope) -> None:
    # Every kind of request the agent makes, from inside the namespace, with pyroute2 never imported (~10 MB).
    a, _ = two_ns(scope)
    out = run(["ip", "netns", "exec", a, sys.executable, "-c", AGENT_WAY])
    assert out.strip() == "[]"
    assert "10.7.0.0/32" in run(["ip", "-n", a, "addr", "show", "flannel.7"])
