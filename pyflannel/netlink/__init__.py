"""rtnetlink for pyflannel: the only package that talks to the kernel over netlink.

Layout:
    codec.py     constants, the value types (Link, Route, Neigh, Fdb, Op, KernelEvent, ...) and the hand-written
                 codec (encode_op, decode_route/neigh/link, ...): pure, no sockets, no threads
    raw.py       RawRoute, the raw NETLINK_ROUTE socket: batched route/neighbour/FDB requests, link and address
                 requests, dumps and gets (no pyroute2 in the agent: it costs ~10 MB of resident memory)
    monitor.py   KernelMonitor: kernel-change notifications decoded into KernelEvent
    api.py       Netlink, the async API over all of the above

Concurrency model (the only one; do not add a third way):
1. Requests run on one worker thread per Netlink instance. The socket that sends requests (the RawRoute of
   raw.py) is opened, used and closed on that thread alone, and every public coroutine of Netlink gets there
   through Netlink.on_worker (loop.run_in_executor on a one-thread pool). One thread serialises the requests, which
   keeps the socket's sequence numbers and reply stream trivially consistent, and a slow kernel never blocks
   the event loop. raw.py therefore holds plain blocking functions, never coroutines; a new request kind is a
   codec encoder plus a coroutine in api.py that sends it through Netlink.on_worker.
2. Notifications are read on the event loop. The monitor's socket (monitor.py) is opened on the worker thread
   (entering a namespace blocks), then read only by the event loop through add_reader; it never sends a
   request. So a long dump or batch on the worker does not delay events, and a burst of events does not
   delay requests.
Nothing else: no other threads, no asyncio netlink transports, no netlink calls from the loop thread.

`Netlink(netns="name")` opens its sockets inside that (existing) namespace without moving the process.
"""

from . import codec
from .api import Netlink
from .codec import *  # noqa: F403 (the constants, value types and codec functions: codec.__all__)
from .monitor import MONITOR_GROUPS, MONITOR_RCVBUF, KernelMonitor, decode_event

__all__ = ["MONITOR_GROUPS", "MONITOR_RCVBUF", "KernelMonitor", "Netlink", "decode_event"]
__all__ += codec.__all__
