"""The raw NETLINK_ROUTE socket: batched route/neighbour/FDB requests, link and address requests, and
hand-decoded dumps and gets.

Worker thread only (see the package docstring): RawRoute is not thread safe and blocks in send/recv.

Requests are packed by codec.encode_op; many of them go out in one send() without per-request acks (the
kernel processes a multi-message buffer in order and replies only on error; the last request of a chunk asks
for an ack, so we know the chunk is done), and dumps are decoded by the codec. A batch is cut into chunks by
encode_chunks (pure, so api.py may run it off the worker thread: see Netlink.apply) and each chunk is sent by
RawRoute.send_chunk. pyroute2 spends ~0.3 ms per
request in Python, which is 5 s for 5000 peers; this path does the same in a few tens of milliseconds.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from .codec import (
    HDR,
    NDMSG,
    NETLINK_CAP_ACK,
    NETLINK_EXT_ACK,
    NETLINK_ROUTE,
    NLM_F_DUMP,
    NLM_F_DUMP_INTR,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    RTM_GETROUTE,
    RTM_NEWLINK,
    RTM_NEWROUTE,
    RTMSG,
    SO_RCVBUFFORCE,
    SO_SNDBUFFORCE,
    SOL_NETLINK,
    Address,
    Fdb,
    IPAddress,
    Link,
    Neigh,
    NetlinkError,
    Op,
    Route,
    decode_addr,
    decode_error,
    decode_link,
    decode_neigh,
    decode_route,
    encode_addr_dump,
    encode_link_dump,
    encode_link_get,
    encode_op,
    encode_route_get,
    pack_msg,
)

# A send() may carry at most about sk_sndbuf bytes; stay well below the default.
_CHUNK_BYTES = 64 * 1024
_SOCK_BUF = 8 * 1024 * 1024
_TIMEOUT = 30.0

T = TypeVar("T")


class Batch:
    """One apply(): a result per op (None = done), filled in chunk by chunk. Once a chunk raised, the chunks
    after it are not sent (the batch has failed as a whole, and the caller re-reads the kernel)."""

    __slots__ = ("failed", "first_seq", "ops", "results")

    def __init__(self, ops: Sequence[Op], first_seq: int) -> None:
        self.ops = ops
        self.first_seq = first_seq
        self.results: list[NetlinkError | None] = [None] * len(ops)
        self.failed = False


def encode_chunks(ops: Sequence[Op], first_seq: int, max_chunk: int = _CHUNK_BYTES) -> Iterator[tuple[bytes, int, int]]:
    """(data, i, j): ops[i:j] packed for one send(), op k numbered first_seq + k; only the last request of a
    chunk asks for an ack, which marks the chunk's end."""
    i = 0
    n = len(ops)
    while i < n:
        parts: list[bytes] = []
        size = 0
        j = i
        while j < n:
            last = j + 1 == n or size >= max_chunk - 512
            m = encode_op(ops[j], first_seq + j, ack=last)
            parts.append(m)
            size += len(m)
            j += 1
            if last:
                break
        yield b"".join(parts), i, j
        i = j


def route_socket(netns: str | None, proto: int = NETLINK_ROUTE) -> socket.socket:
    if netns is None:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, proto)
    from pyroute2 import netns as pr_netns

    # flags=0: fail on a missing namespace instead of silently creating an empty one.
    sock: socket.socket = pr_netns.create_socket(
        netns=netns, family=socket.AF_NETLINK, socket_type=socket.SOCK_RAW, proto=proto, flags=0
    )
    return sock


def set_buf(sock: socket.socket, force: int, plain: int, size: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, plain, size)


class RawRoute:
    """A NETLINK_ROUTE socket with batched requests and hand-decoded dumps. Not thread safe. With `proto`
    NETLINK_GENERIC it carries generic netlink (WireGuard's family) through the same request/get/dump paths."""

    def __init__(self, netns: str | None, proto: int = NETLINK_ROUTE) -> None:
        sock = route_socket(netns, proto)
        self.sock = sock
        for force, plain in ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
            set_buf(sock, force, plain, _SOCK_BUF)
        # Error replies without an echo of the request keep the receive queue small; ext-ack gives the
        # kernel's reason text.
        with contextlib.suppress(OSError):
            sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        with contextlib.suppress(OSError):
            sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        sock.bind((0, 0))
        sock.settimeout(_TIMEOUT)
        self.seq = 1
        self.max_chunk = _CHUNK_BYTES

    def close(self) -> None:
        self.sock.close()

    def _next_seq(self) -> int:
        self.seq = (self.seq + 1) & 0x7FFFFFFF or 1
        return self.seq

    def reserve(self, n: int) -> int:
        """The first of `n` consecutive sequence numbers, taken for a batch (restarting at 1 rather than wrapping
        inside it, so that replies are matched by one range)."""
        if self.seq + n >= 0x7FFFFFFF:
            self.seq = 0
        first = self.seq + 1
        self.seq += n
        return first

    def _recv(self) -> bytes:
        try:
            return self.sock.recv(1 << 20)
        except TimeoutError:
            raise NetlinkError(errno.ETIMEDOUT, "netlink: no reply from the kernel") from None
        except OSError as e:
            # ENOBUFS: replies were dropped, so which requests succeeded is unknown; the caller must re-read.
            raise NetlinkError(e.errno or errno.EIO, f"netlink receive: {e}") from e

    def _send(self, data: bytes) -> None:
        try:
            self.sock.send(data)
        except OSError as e:
            raise NetlinkError(e.errno or errno.EIO, f"netlink send: {e}") from e

    def _answers(self, first: int, last: int) -> Iterator[tuple[bytes, int, int, int, int, int]]:
        """(buffer, type, flags, seq, body start, body end) of each reply to the requests numbered first..last, read
        until the caller stops iterating. Replies to anything else (a request that timed out earlier) are
        skipped."""
        while True:
            buf = self._recv()
            off = 0
            while off + 16 <= len(buf):
                n, mtype, flags, seq, _pid = HDR.unpack_from(buf, off)
                if n < 16:
                    break
                if first <= seq <= last:
                    yield buf, mtype, flags, seq, off + 16, off + n
                off += (n + 3) & ~3

    def _error(self, buf: bytes, flags: int, a: int, b: int, what: str) -> NetlinkError | None:
        code, text = decode_error(buf, a, b, flags)
        return NetlinkError(code, f"{what}: {text or errno.errorcode.get(code, code)}") if code else None

    def apply(self, ops: Sequence[Op]) -> list[NetlinkError | None]:
        """The whole batch on this thread: encoded and sent chunk by chunk."""
        batch = Batch(ops, self.reserve(len(ops)))
        for data, i, j in encode_chunks(ops, batch.first_seq, self.max_chunk):
            self.send_chunk(batch, data, i, j)
        return batch.results

    def send_chunk(self, batch: Batch, data: bytes, i: int, j: int) -> None:
        """Send one chunk of encode_chunks (ops i..j-1 of `batch`) and record the kernel's answer to each op;
        nothing when an earlier chunk of the batch failed."""
        if batch.failed:
            return
        try:
            ops, results = batch.ops, batch.results
            seq0 = batch.first_seq + i
            last_seq = batch.first_seq + j - 1
            self._send(data)
            for buf, mtype, flags, seq, a, b in self._answers(seq0, last_seq):
                if mtype != NLMSG_ERROR:
                    continue
                k = i + (seq - seq0)
                results[k] = self._error(buf, flags, a, b, f"{ops[k].action} {ops[k].obj}")
                if seq == last_seq:
                    break
        except BaseException:
            batch.failed = True
            raise

    def request(self, encode: Callable[[int], bytes], what: str) -> None:
        """One request that asks for an ack (link and address changes); raises NetlinkError on refusal."""
        seq = self._next_seq()
        self._send(encode(seq))
        for buf, mtype, flags, _seq, a, b in self._answers(seq, seq):
            if mtype == NLMSG_ERROR:
                err = self._error(buf, flags, a, b, what)
                if err is not None:
                    raise err
                return

    def get(
        self,
        encode: Callable[[int], bytes],
        reply_type: int,
        decode: Callable[[bytes, int, int], T | None],
        what: str,
        absent: tuple[int, ...],
    ) -> T | None:
        """One object asked for by a get request; None when the kernel answers one of the `absent` errnos."""
        seq = self._next_seq()
        self._send(encode(seq))
        for buf, mtype, flags, _seq, a, b in self._answers(seq, seq):
            if mtype == reply_type:
                return decode(buf, a, b)
            if mtype == NLMSG_ERROR:
                err = self._error(buf, flags, a, b, what)
                if err is None or err.errno in absent:
                    return None
                raise err
        raise AssertionError("unreachable")

    def dump(self, kind: int, family: int) -> list[Route | Neigh | Fdb]:
        """Every route (kind RTM_GETROUTE) or neighbour/FDB entry (RTM_GETNEIGH; AF_BRIDGE: FDB) of `family`."""
        decode: Callable[[bytes, int, int], Route | Neigh | Fdb | None]
        if kind == RTM_GETROUTE:
            body, decode = RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0), decode_route
        else:
            body, decode = NDMSG.pack(family, 0, 0, 0, 0), decode_neigh
        return self._dump(lambda seq: pack_msg(kind, NLM_F_REQUEST | NLM_F_DUMP, seq, body), decode, f"dump {kind}")

    def links(self) -> list[Link]:
        return self._dump(encode_link_dump, decode_link, "dump links")

    def addresses(self, family: int | None) -> list[Address]:
        return self._dump(lambda seq: encode_addr_dump(seq, family), decode_addr, "dump addresses")

    def link(self, *, index: int = 0, name: str | None = None) -> Link | None:
        """One link, by index or (index 0) by name; None when there is no such link."""
        what = f"link get name {name}" if index == 0 else f"link get index {index}"
        return self.get(
            lambda seq: encode_link_get(seq, index=index, name=name),
            RTM_NEWLINK,
            decode_link,
            what,
            (errno.ENODEV, errno.ENOENT),
        )

    def route_get(self, target: IPAddress) -> Route | None:
        """`ip route get TARGET`; None when the kernel has no route there."""
        return self.get(
            lambda seq: encode_route_get(seq, target),
            RTM_NEWROUTE,
            decode_route,
            f"route get {target}",
            (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ESRCH),
        )

    def dump_decoded(
        self, request: Callable[[int], bytes], decode: Callable[[bytes, int, int], T | None], what: str
    ) -> list[T]:
        """A dump of any kind: `request(seq)` is sent (again, if the kernel reports the dump interrupted) and
        `decode` is called on each reply's body."""
        return self._dump(request, decode, what)

    def _dump(
        self, request: Callable[[int], bytes], decode: Callable[[bytes, int, int], T | None], what: str
    ) -> list[T]:
        for _attempt in range(5):
            out, interrupted = self._dump_once(request, decode, what)
            if not interrupted:
                return out
        raise NetlinkError(errno.EINTR, "netlink dump kept being interrupted by concurrent changes")

    def _dump_once(
        self, request: Callable[[int], bytes], decode: Callable[[bytes, int, int], T | None], what: str
    ) -> tuple[list[T], bool]:
        seq = self._next_seq()
        self._send(request(seq))
        out: list[T] = []
        interrupted = False
        for buf, mtype, flags, _seq, a, b in self._answers(seq, seq):
            if flags & NLM_F_DUMP_INTR:
                interrupted = True
            if mtype == NLMSG_DONE:
                break
            if mtype == NLMSG_ERROR:
                err = self._error(buf, flags, a, b, what)
                if err is not None:
                    raise err
                break
            obj = decode(buf, a, b)
            if obj is not None:
                out.append(obj)
        return out, interrupted
