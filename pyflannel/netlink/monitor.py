"""The kernel-change monitor: link, route, neighbour and FDB notifications as an async iterator of KernelEvent.

Event loop only (see the package docstring): the socket is opened on the Netlink worker thread (entering a
namespace blocks), then read by the event loop alone through add_reader; it never sends a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections import deque
from collections.abc import Callable

from .codec import (
    HDR,
    RESYNC,
    RTM_DELLINK,
    RTM_DELNEIGH,
    RTM_DELROUTE,
    RTM_NEWLINK,
    RTM_NEWNEIGH,
    RTM_NEWROUTE,
    RTNLGRP_IPV4_ROUTE,
    RTNLGRP_IPV6_ROUTE,
    RTNLGRP_LINK,
    RTNLGRP_NEIGH,
    SO_RCVBUFFORCE,
    Fdb,
    KernelEvent,
    NetlinkError,
    decode_link,
    decode_neigh,
    decode_route,
)
from .raw import route_socket, set_buf

log = logging.getLogger(__name__)

MONITOR_GROUPS = (RTNLGRP_LINK, RTNLGRP_NEIGH, RTNLGRP_IPV4_ROUTE, RTNLGRP_IPV6_ROUTE)
# Programming 5000 peers makes 15000 notifications of ~1 KiB kernel memory each; the monitor's queue must hold
# a burst that the event loop is slow to read, or every bulk write would end in an overrun and a full resync.
MONITOR_RCVBUF = 32 * 1024 * 1024
# Decoded events waiting for the consumer; beyond this we drop them and ask for a resync instead.
_MONITOR_MAX_PENDING = 100_000


def decode_event(buf: bytes | memoryview, off: int, end: int, mtype: int) -> KernelEvent | None:
    """Decode one notification (header at off) into a KernelEvent; None for messages we do not follow."""
    body = off + 16
    if mtype in (RTM_NEWROUTE, RTM_DELROUTE):
        r = decode_route(buf, body, end)
        return None if r is None else KernelEvent("route", "new" if mtype == RTM_NEWROUTE else "del", r)
    if mtype in (RTM_NEWNEIGH, RTM_DELNEIGH):
        n = decode_neigh(buf, body, end)
        if n is None:
            return None
        return KernelEvent("fdb" if isinstance(n, Fdb) else "neigh", "new" if mtype == RTM_NEWNEIGH else "del", n)
    if mtype in (RTM_NEWLINK, RTM_DELLINK):
        return KernelEvent("link", "new" if mtype == RTM_NEWLINK else "del", decode_link(buf, body, end))
    return None


def open_monitor_socket(netns: str | None, rcvbuf: int) -> socket.socket:
    """A NETLINK_ROUTE socket in `netns` subscribed to MONITOR_GROUPS (blocking: call it on the worker thread)."""
    try:
        sock = route_socket(netns)
    except OSError as e:
        raise NetlinkError(e.errno or errno.EIO, f"cannot open netlink in netns {netns}: {e}") from e
    try:
        set_buf(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, rcvbuf)
        groups = 0
        for g in MONITOR_GROUPS:
            groups |= 1 << (g - 1)
        sock.bind((0, groups))
    except OSError as e:
        sock.close()
        raise NetlinkError(e.errno or errno.EIO, f"cannot subscribe to kernel notifications: {e}") from e
    return sock


class KernelMonitor:
    """Kernel notifications (links, IPv4/IPv6 routes, neighbours, FDB) of one namespace as an async iterator
    of KernelEvent. The socket is read by the event loop (add_reader), never by the netlink worker thread, so
    a long dump or batch there does not delay events, and events never delay requests. Iteration ends when
    close() is called (also by Netlink.close())."""

    def __init__(
        self, sock: socket.socket, loop: asyncio.AbstractEventLoop, on_close: Callable[[KernelMonitor], None]
    ) -> None:
        self._sock: socket.socket | None = sock
        self._loop = loop
        self._on_close = on_close
        self._pending: deque[KernelEvent] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.overruns = 0
        self._paused = False
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._readable)

    def fileno(self) -> int:
        return -1 if self._sock is None else self._sock.fileno()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _resync(self, why: str) -> None:
        self.overruns += 1
        log.warning("kernel monitor: %s; notifications were lost, a full resync is needed", why)
        self._pending.clear()
        self._pending.append(RESYNC)

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        pending = self._pending
        # Bounded per call so that a flood of notifications cannot starve the rest of the loop.
        for _ in range(512):
            try:
                buf = sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self._resync("socket overrun (ENOBUFS)")
                    continue
                log.error("kernel monitor: receive failed, stopping: %s", e)
                self.close()
                return
            off = 0
            size = len(buf)
            while off + 16 <= size:
                n, mtype, _flags, _seq, _pid = HDR.unpack_from(buf, off)
                if n < 16 or off + n > size:
                    break
                ev = decode_event(buf, off, off + n, mtype)
                if ev is not None:
                    pending.append(ev)
                off += (n + 3) & ~3
            if len(pending) > _MONITOR_MAX_PENDING:
                self._resync(f"more than {_MONITOR_MAX_PENDING} events unread")
        if pending:
            self._wake()

    def pause(self) -> None:
        """Stop reading the socket; the kernel queues what comes meanwhile (up to the receive buffer, beyond which
        the overrun asks for a resync as always)."""
        if self._sock is not None and not self._paused:
            self._paused = True
            self._loop.remove_reader(self._sock.fileno())

    def resume(self) -> None:
        if self._sock is not None and self._paused:
            self._paused = False
            self._loop.add_reader(self._sock.fileno(), self._readable)
            self._loop.call_soon(self._readable)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if not self._paused:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(sock.fileno())
        sock.close()
        self._on_close(self)
        self._wake()

    def __aiter__(self) -> KernelMonitor:
        return self

    async def __anext__(self) -> KernelEvent:
        while not self._pending:
            if self._sock is None:
                raise StopAsyncIteration
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._pending.popleft()
