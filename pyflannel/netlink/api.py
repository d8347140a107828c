"""Netlink: the async API over the package's sockets, and the one owner of its worker thread.

Each public coroutine hands a plain blocking function (of raw.py) to Netlink.on_worker, which runs it
on the instance's single worker thread; the monitor's socket is opened there too and then read by the event
loop (monitor.py). The package docstring explains why, and is the place to change that model.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from .codec import (
    AF_BRIDGE,
    AF_INET,
    AF_INET6,
    RT_TABLE_MAIN,
    RTM_GETNEIGH,
    RTM_GETROUTE,
    RTN_UNICAST,
    Address,
    DefaultRouteInfo,
    DeviceState,
    Fdb,
    IPAddress,
    IPInterface,
    Link,
    Neigh,
    NetlinkError,
    Op,
    Route,
    encode_addr,
    encode_link_del,
    encode_link_new,
    encode_link_set,
    ipip_info_data,
    is_missing,
    vxlan_info_data,
)
from .monitor import MONITOR_RCVBUF, KernelMonitor, open_monitor_socket
from .raw import Batch, RawRoute, encode_chunks

if TYPE_CHECKING:
    from .wireguard import WgDevice, WgUpdate

T = TypeVar("T")
# Batches this large are written with the monitors paused (see apply).
BULK_OPS = 1024


class Netlink:
    """rtnetlink bound to the current network namespace, or to `netns` (an existing named namespace).

    Every method is a coroutine that runs on the instance's single worker thread. Call close() when done.
    """

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netlink")
        self._raw: RawRoute | None = None
        self._genl: RawRoute | None = None  # generic netlink (WireGuard), opened on first use
        self._wg_family = 0
        self._monitors: set[KernelMonitor] = set()

    async def __aenter__(self) -> Netlink:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def on_worker(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """The one way onto the worker thread: every socket call of a request goes through here (or through
        _submit, which it awaits), also those of the package's other protocol families (xfrm.py), whose sockets
        live on the same thread."""
        return await self._submit(fn, *args, **kw)

    def _submit(self, fn: Callable[..., T], *args: Any, **kw: Any) -> asyncio.Future[T]:
        """`fn` queued on the worker thread at once; its result, to be awaited."""
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._pool, functools.partial(fn, *args, **kw))

    # worker-thread helpers: the sockets are opened lazily, on the worker thread, by the first call needing them
    def _raw_w(self) -> RawRoute:
        if self._raw is None:
            try:
                self._raw = RawRoute(self.netns)
            except OSError as e:
                raise NetlinkError(e.errno or errno.EIO, f"cannot open netlink in netns {self.netns}: {e}") from e
        return self._raw

    def _close_w(self) -> None:
        if self._raw is not None:
            self._raw.close()
            self._raw = None
        if self._genl is not None:
            self._genl.close()
            self._genl = None

    async def close(self) -> None:
        for mon in list(self._monitors):
            mon.close()
        with contextlib.suppress(RuntimeError):
            await self.on_worker(self._close_w)
        self._pool.shutdown(wait=True)

    # ------------------------------------------------------------ kernel-change monitor

    async def monitor(self, *, rcvbuf: int = MONITOR_RCVBUF) -> KernelMonitor:
        """Subscribe to link, route (IPv4 and IPv6), neighbour and FDB changes in this instance's namespace.

        Iterate the result for KernelEvents; our own writes are announced too. A "resync" event means
        notifications were lost. The socket is open (subscribed) when this returns; close() or Netlink.close()
        ends the iteration."""
        sock = await self.on_worker(open_monitor_socket, self.netns, rcvbuf)
        mon = KernelMonitor(sock, asyncio.get_running_loop(), self._monitors.discard)
        self._monitors.add(mon)
        return mon

    # ------------------------------------------------------------ links

    def _links_w(self) -> list[Link]:
        return self._raw_w().links()

    async def links(self) -> list[Link]:
        return await self.on_worker(self._links_w)

    def _link_get_w(self, index: int = 0, name: str | None = None) -> Link | None:
        return self._raw_w().link(index=index, name=name)

    async def link_by_name(self, name: str) -> Link | None:
        return await self.on_worker(self._link_get_w, name=name)

    async def link_by_index(self, index: int) -> Link | None:
        return await self.on_worker(self._link_get_w, index=index)

    def _create_w(self, name: str, kind: str, mtu: int | None, mac: str | None, info_data: bytes) -> Link:
        what = f"create {kind} {name}"
        try:
            self._raw_w().request(lambda seq: encode_link_new(seq, name, kind, mtu, mac, info_data), what)
        except NetlinkError as e:
            # What the kernel answers for an unknown kind, even after trying to load its module.
            if e.errno == errno.EOPNOTSUPP:
                why = f"the kernel lacks the `{kind}` module (modprobe {kind}): {os.strerror(e.errno)}"
                raise NetlinkError(e.errno, f"{what}: {why}") from None
            raise
        link = self._link_get_w(name=name)
        if link is None:
            raise NetlinkError(errno.ENODEV, f"{kind} {name} vanished right after creation")
        return link

    async def create_vxlan(
        self,
        name: str,
        *,
        vni: int,
        local: IPAddress | None,
        dev_index: int | None,
        port: int = 0,
        learning: bool = False,
        gbp: bool = False,
        mtu: int | None = None,
        mac: str | None = None,
    ) -> Link:
        """`ip link add NAME type vxlan id VNI local LOCAL dev DEV [dstport PORT] [no]learning [gbp]`.

        port 0 leaves the destination port to the kernel (8472)."""
        data = vxlan_info_data(vni, local, dev_index, port, learning, gbp)
        return await self.on_worker(self._create_w, name, "vxlan", mtu, mac, data)

    async def create_ipip(
        self, name: str, *, local: IPv4Address | None, mtu: int | None = None, pmtudisc: bool = True
    ) -> Link:
        """`ip link add NAME type ipip local LOCAL [no]pmtudisc`: remote any, no `dev`, ttl inherit. The Link read
        back carries `.ipip`.

        A kernel without the ipip module raises NetlinkError EOPNOTSUPP saying so."""
        return await self.on_worker(self._create_w, name, "ipip", mtu, None, ipip_info_data(local, pmtudisc))

    async def create_wireguard(self, name: str, *, mtu: int | None = None) -> Link:
        """`ip link add NAME type wireguard` (keys and peers are set over generic netlink, not here).

        A kernel without the wireguard module raises NetlinkError EOPNOTSUPP saying so."""
        return await self.on_worker(self._create_w, name, "wireguard", mtu, None, b"")

    def _request_w(self, encode: Callable[[int], bytes], what: str) -> None:
        self._raw_w().request(encode, what)

    async def delete_link(self, index: int) -> None:
        await self.on_worker(self._request_w, lambda seq: encode_link_del(seq, index), f"link del index {index}")

    async def set_up(self, index: int) -> None:
        await self.on_worker(self._request_w, lambda seq: encode_link_set(seq, index, up=True), f"link set {index} up")

    async def set_mtu(self, index: int, mtu: int) -> None:
        what = f"link set {index} mtu {mtu}"
        await self.on_worker(self._request_w, lambda seq: encode_link_set(seq, index, mtu=mtu), what)

    # ------------------------------------------------------------ addresses

    def _addresses_w(self, index: int | None, family: int | None) -> list[Address]:
        return [a for a in self._raw_w().addresses(family) if index is None or a.index == index]

    async def addresses(self, index: int | None = None, family: int | None = None) -> list[Address]:
        return await self.on_worker(self._addresses_w, index, family)

    async def _addr(self, action: Literal["add", "replace", "del"], index: int, iface: IPInterface) -> None:
        what = f"addr {action} {iface} dev {index}"
        await self.on_worker(self._request_w, lambda seq: encode_addr(seq, action, index, iface), what)

    async def add_address(self, index: int, iface: IPInterface) -> None:
        await self._addr("add", index, iface)

    async def replace_address(self, index: int, iface: IPInterface) -> None:
        await self._addr("replace", index, iface)

    async def delete_address(self, index: int, iface: IPInterface) -> None:
        await self._addr("del", index, iface)

    async def links_with_addresses(self) -> list[tuple[Link, list[Address]]]:
        """Every link with its addresses, for choosing the external interface (--iface, --iface-regex)."""

        def work() -> list[tuple[Link, list[Address]]]:
            addrs = self._addresses_w(None, None)
            return [(ln, [a for a in addrs if a.index == ln.index]) for ln in self._links_w()]

        return await self.on_worker(work)

    # ------------------------------------------------------------ routes, neighbours, FDB

    def _routes_w(self, family: int, table: int | None, oif: int | None) -> list[Route]:
        out = []
        for r in self._raw_w().dump(RTM_GETROUTE, family):
            assert isinstance(r, Route)
            if (table is None or r.table == table) and (oif is None or r.oif == oif):
                out.append(r)
        return out

    async def routes(
        self, family: int = AF_INET, *, table: int | None = RT_TABLE_MAIN, oif: int | None = None
    ) -> list[Route]:
        """Unicast and other routes of `family` (table None: every table), optionally only those leaving by `oif`."""
        return await self.on_worker(self._routes_w, family, table, oif)

    def _neigh_w(self, ifindex: int | None, family: int) -> list[Neigh]:
        return [
            n
            for n in self._raw_w().dump(RTM_GETNEIGH, family)
            if isinstance(n, Neigh) and (ifindex is None or n.ifindex == ifindex)
        ]

    async def neighbours(self, ifindex: int | None = None, family: int = AF_INET) -> list[Neigh]:
        return await self.on_worker(self._neigh_w, ifindex, family)

    def _fdb_w(self, ifindex: int | None) -> list[Fdb]:
        return [
            f
            for f in self._raw_w().dump(RTM_GETNEIGH, AF_BRIDGE)
            if isinstance(f, Fdb) and (ifindex is None or f.ifindex == ifindex)
        ]

    async def fdb(self, ifindex: int | None = None) -> list[Fdb]:
        return await self.on_worker(self._fdb_w, ifindex)

    def _snapshot_w(self, family: int, neigh_ifindex: int | None, fdb_ifindex: int | None) -> DeviceState:
        routes = self._routes_w(family, RT_TABLE_MAIN, None)
        neigh = self._neigh_w(neigh_ifindex, family) if neigh_ifindex is not None else []
        fdb = self._fdb_w(fdb_ifindex) if fdb_ifindex is not None else []
        return DeviceState(routes=routes, neighbours=neigh, fdb=fdb)

    async def snapshot(
        self, family: int = AF_INET, *, neigh_ifindex: int | None = None, fdb_ifindex: int | None = None
    ) -> DeviceState:
        """The main routing table of `family`, plus the neighbours/FDB of the given devices, in one hop."""
        return await self.on_worker(self._snapshot_w, family, neigh_ifindex, fdb_ifindex)

    async def apply(self, ops: Sequence[Op]) -> list[NetlinkError | None]:
        """Send many route/neighbour/FDB requests in a few batched writes; one result per op (None = done).

        Requests are processed in order, so a delete followed by a replace of the same key is well defined."""
        if not ops:
            return []
        if len(ops) < BULK_OPS:
            return await self.on_worker(lambda: self._raw_w().apply(ops))
        # A bulk write (a sync of thousands of peers) is announced back entry by entry: decoding those on the loop
        # while the batch goes in made the two contend for the interpreter, and the kernel got its last entry
        # later. The monitors read them (all queued by the kernel meanwhile) once the batch is in.
        paused = list(self._monitors)
        for m in paused:
            m.pause()
        try:
            return await self._bulk(ops)
        finally:
            for m in paused:
                m.resume()

    async def _bulk(self, ops: Sequence[Op]) -> list[NetlinkError | None]:
        """A large batch, pipelined: the kernel processes a chunk inside the worker's send(), with the interpreter
        free, so the loop encodes the next chunk meanwhile (codec work, no socket: the concurrency model holds).
        One chunk is queued behind the one being sent, so the worker never waits for the loop."""
        raw = await self.on_worker(self._raw_w)
        batch = Batch(ops, await self.on_worker(raw.reserve, len(ops)))
        sending: list[asyncio.Future[None]] = []
        try:
            for data, i, j in encode_chunks(ops, batch.first_seq, raw.max_chunk):
                sending.append(self._submit(raw.send_chunk, batch, data, i, j))
                if len(sending) > 1:
                    # The previous chunk: waiting here lets the worker take the one just queued at once.
                    await sending[-2]
            await sending[-1]
        except BaseException:
            batch.failed = True  # what is still queued is not sent
            for f in sending:
                f.cancel()
            await asyncio.gather(*sending, return_exceptions=True)
            raise
        return batch.results

    async def _one(self, op: Op, missing_ok: bool = False) -> None:
        (err,) = await self.apply([op])
        if err is not None and not (missing_ok and is_missing(err)):
            raise err

    async def replace_route(self, route: Route) -> None:
        await self._one(Op.replace(route))

    async def delete_route(self, route: Route, *, missing_ok: bool = True) -> None:
        await self._one(Op.delete(route), missing_ok)

    async def replace_neigh(self, neigh: Neigh) -> None:
        await self._one(Op.replace(neigh))

    async def delete_neigh(self, neigh: Neigh, *, missing_ok: bool = True) -> None:
        await self._one(Op.delete(neigh), missing_ok)

    async def replace_fdb(self, entry: Fdb) -> None:
        await self._one(Op.replace(entry))

    async def append_fdb(self, entry: Fdb) -> None:
        await self._one(Op("append", entry))

    async def delete_fdb(self, entry: Fdb, *, missing_ok: bool = True) -> None:
        await self._one(Op.delete(entry), missing_ok)

    # ------------------------------------------------------------ WireGuard (generic netlink)

    # The WireGuard codec is imported by the calls that need it: only the wireguard backend makes them, and its
    # import (~10 ms, mostly dataclass creation) would otherwise be part of every agent's start.

    def _wg_w(self) -> tuple[RawRoute, int]:
        """The generic netlink socket and the id of the kernel's wireguard family (resolved once)."""
        from .wireguard import GENL_ID_CTRL, NETLINK_GENERIC, WG_GENL_NAME, decode_family_id, encode_get_family

        if self._genl is None:
            try:
                self._genl = RawRoute(self.netns, NETLINK_GENERIC)
            except OSError as e:
                why = f"cannot open generic netlink in netns {self.netns}: {e}"
                raise NetlinkError(e.errno or errno.EIO, why) from e
        if not self._wg_family:
            fid = self._genl.get(
                lambda seq: encode_get_family(seq, WG_GENL_NAME),
                GENL_ID_CTRL,
                decode_family_id,
                "resolve the generic netlink family wireguard",
                (errno.ENOENT,),
            )
            if fid is None:
                why = "the kernel has no `wireguard` generic netlink family (modprobe wireguard)"
                raise NetlinkError(errno.EOPNOTSUPP, why)
            self._wg_family = fid
        return self._genl, self._wg_family

    def _wg_get_w(self, name: str) -> WgDevice:
        from .wireguard import DeviceAccumulator, decode_device_message, encode_get_device

        sock, family = self._wg_w()
        acc = DeviceAccumulator()

        def request(seq: int) -> bytes:
            nonlocal acc
            acc = DeviceAccumulator()  # a dump the kernel reports interrupted is read again from the start
            return encode_get_device(seq, family, name)

        def fold(buf: bytes, a: int, b: int) -> None:
            decode_device_message(buf, a, b, acc)

        sock.dump_decoded(request, fold, f"wireguard get {name}")
        return acc.device(name)

    async def wireguard_device(self, name: str) -> WgDevice:
        """`wg show NAME`: key, port and peers of a kernel WireGuard device (NetlinkError ENODEV if there is no
        such device, EOPNOTSUPP if it is not a kernel WireGuard device or the kernel has none)."""
        return await self.on_worker(self._wg_get_w, name)

    def _wg_set_w(self, name: str, update: WgUpdate) -> None:
        from .wireguard import encode_set_device, renumber

        sock, family = self._wg_w()
        # What a failure names: never the keys (the update's repr redacts them, but say only what matters).
        what = f"wireguard set {name} ({len(update.peers)} peers, {len(update.remove)} removals)"
        for msg in encode_set_device(family, name, update):
            sock.request(functools.partial(renumber, msg), what)

    async def configure_wireguard(self, name: str, update: WgUpdate) -> None:
        """`wg set NAME ...`: apply `update` to a kernel WireGuard device (large ones in several requests)."""
        if update:
            await self.on_worker(self._wg_set_w, name, update)

    # ------------------------------------------------------------ interface selection

    async def default_route_index(self, version: int = 4) -> int | None:
        """The ifindex holding the IPv`version` default route, or None."""
        info = await self.default_route(AF_INET if version == 4 else AF_INET6)
        return info.link.index if info is not None else None

    async def route_get_index(self, target: IPAddress) -> int | None:
        """`ip route get TARGET`: the ifindex the kernel would send to `target` by (for --iface-can-reach)."""
        route = await self.on_worker(lambda: self._raw_w().route_get(target))
        return route.oif if route is not None and route.oif else None

    async def default_route(self, family: int = AF_INET) -> DefaultRouteInfo | None:
        """The interface holding the default route of `family` (lowest metric), with its addresses and MTU."""

        def work() -> DefaultRouteInfo | None:
            defaults = [
                r
                for r in self._routes_w(family, RT_TABLE_MAIN, None)
                if r.dst.prefixlen == 0 and r.oif is not None and r.type == RTN_UNICAST
            ]
            if not defaults:
                return None
            best = min(defaults, key=lambda r: r.priority)
            assert best.oif is not None
            link = self._link_get_w(index=best.oif)
            if link is None:
                return None
            return DefaultRouteInfo(link=link, gateway=best.gateway, addresses=self._addresses_w(best.oif, None))

        return await self.on_worker(work)
