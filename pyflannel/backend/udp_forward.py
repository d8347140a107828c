"""The udp backend's data path: one thread moving packets between the TUN device and the UDP socket.

Wire format (upstream's, so nodes interoperate): each IPv4 packet read from the TUN is sent, unchanged, as the
payload of one UDP datagram to the node whose subnet holds its destination; a datagram received is written to
the TUN unchanged. The TTL is not touched: the kernel already decrements it when it forwards the packet into
flannel0 and again out of it on the far side, so a loop still ends.

The peer table is an immutable PeerTable that the agent replaces as a whole when leases change; the thread
reads the reference once per burst, so the hot loop takes no lock and a reader never sees half an update.
Counters are plain integers added up per burst by the thread and read by anyone (a metrics endpoint later).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from ..netlink.tun import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VNET_HDR,
    VNET_HDR_LEN,
)

log = logging.getLogger(__name__)

# Packets handled on one side before the other gets its turn: bounds how long one direction can starve the other.
BURST = 64
# A TUN packet is at most the device MTU; the datagram buffer takes any UDP payload.
MAX_PACKET = 65535
DROP_LOG_INTERVAL = 10.0
ICMP_TTL = 64
_ICMP_ERRORS = frozenset({3, 4, 5, 11, 12})  # unreachable, source quench, redirect, time exceeded, parameter

_U32 = struct.Struct("!I")
_U16 = struct.Struct("!H")
_U16N = struct.Struct("=H")  # socket options are in host order
_INTN = struct.Struct("=i")

# linux/udp.h: send a batch of equal-sized datagrams in one call / receive such batches whole.
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
GSO_MAX_SEGS = 64  # UDP_MAX_SEGMENTS of older kernels (newer ones take 128)
GSO_MAX_BYTES = 65507 - 8  # the IPv4 datagram payload limit, less a margin for the UDP header
_ANC_SPACE = socket.CMSG_SPACE(4)
# Header bytes the segments of a mergeable run share (see Forwarder._deliver_runs), TCP options last.
_RUN_BYTES = (0, 1, 2, 3, 6, 7, 8, 9, *range(12, 24), *range(28, 33), 34, 35, *range(40, 80))
_RUN_FIXED = len(_RUN_BYTES) - 40
_TAIL_BYTES = tuple(j for j in _RUN_BYTES if j not in (2, 3))  # a shorter last segment has its own length
_TAIL_FIXED = len(_TAIL_BYTES) - 40
_PLAIN_HDR = VNET_HDR.pack(0, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 0, 0)  # a whole packet, checksums complete


@dataclass(frozen=True)
class PeerTable:
    """Where each peer subnet is reached, and which addresses may send us packets.

    `routes` holds one (netmask, {masked network address: (ip, port)}) per prefix length, longest first: a
    lookup is one dict probe per distinct prefix length (one in a normal cluster)."""

    routes: tuple[tuple[int, dict[int, tuple[str, int]]], ...] = ()
    sources: frozenset[str] = frozenset()

    @classmethod
    def build(cls, peers: Iterable[tuple[IPv4Network, IPv4Address, int]]) -> PeerTable:
        by_len: dict[int, dict[int, tuple[str, int]]] = {}
        sources = set()
        for subnet, ip, port in peers:
            by_len.setdefault(subnet.prefixlen, {})[int(subnet.network_address)] = (str(ip), port)
            sources.add(str(ip))
        routes = tuple(
            (int(IPv4Network(f"0.0.0.0/{plen}").netmask), by_len[plen]) for plen in sorted(by_len, reverse=True)
        )
        return cls(routes=routes, sources=frozenset(sources))

    def lookup(self, dst: int) -> tuple[str, int] | None:
        for mask, nets in self.routes:
            hop = nets.get(dst & mask)
            if hop is not None:
                return hop
        return None

    def __len__(self) -> int:
        return sum(len(nets) for _, nets in self.routes)


@dataclass
class Counters:
    """What the data path did since the agent started. Written by the forwarding thread only."""

    tun_packets: int = 0  # read from the TUN and sent to a peer
    tun_bytes: int = 0
    udp_packets: int = 0  # received from a peer and written to the TUN
    udp_bytes: int = 0
    drop_no_peer: int = 0  # TUN packet for an address no lease covers (ICMP unreachable sent back)
    drop_unknown_source: int = 0  # datagram from an address that holds no lease
    drop_malformed_udp: int = 0  # datagram shorter than its IPv4 header says, or not IPv4
    drop_malformed_tun: int = 0  # TUN packet that is not IPv4 (e.g. IPv6 the kernel sends on flannel0)
    send_errors: int = 0
    tun_write_errors: int = 0
    icmp_sent: int = 0
    gso_sends: int = 0  # batches sent with UDP segmentation offload
    gro_batches: int = 0  # datagram batches received whole (UDP GRO)
    tso_writes: int = 0  # TCP runs written to the TUN as one offload packet

    def summary(self) -> str:
        """One line with every counter, `name=value` separated by spaces (what the agent logs)."""
        return " ".join(f"{k}={v}" for k, v in vars(self).items())

    def drops(self) -> dict[str, int]:
        return {
            "no_peer": self.drop_no_peer,
            "unknown_source": self.drop_unknown_source,
            "malformed_udp": self.drop_malformed_udp,
            "malformed_tun": self.drop_malformed_tun,
        }


def inet_checksum(data: bytes | bytearray) -> int:
    """RFC 1071 checksum. The ones'-complement sum of 16-bit words is the number the bytes spell, modulo
    0xFFFF (2**16 is 1 modulo 0xFFFF), which int.from_bytes computes in C."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    v = int.from_bytes(data, "big")
    s = v % 0xFFFF
    if s == 0 and v:
        s = 0xFFFF
    return ~s & 0xFFFF


def icmp_unreachable(pkt: bytes, src: bytes) -> bytes | None:
    """ICMP destination unreachable (network unreachable) from `src` to the sender of `pkt`, quoting its header
    and first 8 payload bytes; None when RFC 1122 forbids a reply (about an ICMP error, a later fragment, a
    broadcast/multicast or unspecified source) or the packet is too short to quote."""
    ihl = (pkt[0] & 0x0F) * 4
    if ihl < 20 or len(pkt) < ihl + 8:
        return None
    if _U16.unpack_from(pkt, 6)[0] & 0x1FFF:
        return None
    # Never an error about an ICMP error (RFC 1122 3.2.2); queries such as echo requests do get one, so a
    # ping to a node that left says so (upstream's proxy answers no ICMP at all).
    if pkt[9] == socket.IPPROTO_ICMP and pkt[ihl] in _ICMP_ERRORS:
        return None
    saddr = pkt[12:16]
    first = saddr[0]
    if first == 0 or first >= 224 or saddr == b"\xff\xff\xff\xff":
        return None
    quote = pkt[: ihl + 8]
    icmp = bytearray(b"\x03\x00\x00\x00\x00\x00\x00\x00" + quote)
    icmp[2:4] = _U16.pack(inet_checksum(icmp))
    total = 20 + len(icmp)
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, ICMP_TTL, socket.IPPROTO_ICMP, 0, src, saddr))
    hdr[10:12] = _U16.pack(inet_checksum(hdr))
    return bytes(hdr + icmp)


@dataclass
class DropLog:
    """At most one line per reason every DROP_LOG_INTERVAL seconds, with the count since the last line."""

    interval: float = DROP_LOG_INTERVAL
    clock: Callable[[], float] = time.monotonic
    _last: dict[str, float] = field(default_factory=dict)
    _quiet: dict[str, int] = field(default_factory=dict)

    def note(self, reason: str, detail: str) -> None:
        now = self.clock()
        last = self._last.get(reason)
        if last is not None and now - last < self.interval:
            self._quiet[reason] = self._quiet.get(reason, 0) + 1
            return
        more = self._quiet.pop(reason, 0)
        self._last[reason] = now
        suffix = f" (and {more} more since the last report)" if more else ""
        log.warning("udp: dropped %s: %s%s", reason, detail, suffix)


class Forwarder:
    """The forwarding thread. start() once; set_peers() at any time from any thread; stop() ends it.

    The thread owns neither fd's lifetime except through replace_tun(): the backend opens them and closes them
    after stop(); replace_tun() hands over a new TUN fd (the device was recreated) and closes the old one."""

    def __init__(self, tun: int, sock: socket.socket, icmp_source: IPv4Address, counters: Counters) -> None:
        self.counters = counters
        self.peers = PeerTable()
        self._tun = tun
        self._new_tun: int | None = None
        self._sock = sock
        self._icmp_source = icmp_source.packed
        self._stop = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread: threading.Thread | None = None
        self._done: Callable[[BaseException | None], None] = lambda exc: None
        self._droplog = DropLog()
        self._gso = True
        self._buf = bytearray(MAX_PACKET)
        self._mv = memoryview(self._buf)

    @property
    def tun(self) -> int:
        return self._tun

    def set_peers(self, table: PeerTable) -> None:
        self.peers = table  # one reference store: atomic for the reading thread

    def start(self, done: Callable[[BaseException | None], None]) -> None:
        """Start the thread; `done(exc)` is called from it when it ends (exc None after stop())."""
        self._done = done
        self._thread = threading.Thread(target=self._main, name="udp-forward", daemon=True)
        self._thread.start()

    def replace_tun(self, fd: int) -> None:
        self._new_tun = fd
        self._wake()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop = True
        self._wake()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def _wake(self) -> None:
        # A full pipe is already a pending wake-up; a closed one means the thread is gone.
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _main(self) -> None:
        exc: BaseException | None = None
        try:
            self._loop()
        except BaseException as e:  # reported to the agent, which stops on it
            exc = e
        self._done(exc)

    def _loop(self) -> None:
        ep = select.epoll()
        try:
            ep.register(self._wake_r, select.EPOLLIN)
            ep.register(self._sock.fileno(), select.EPOLLIN)
            tun = self._tun
            if tun >= 0:
                ep.register(tun, select.EPOLLIN)
            while not self._stop:
                ep.poll()
                self._drain_wake()
                if self._new_tun is not None:
                    if tun >= 0:
                        ep.unregister(tun)
                        os.close(tun)
                    tun, self._new_tun = self._new_tun, None
                    self._tun = tun
                    ep.register(tun, select.EPOLLIN)
                if not self._pump(tun):
                    # The TUN went away under us (device deleted): forward nothing from it until the agent
                    # recreates the device and hands the new fd over. Closed here: the swap above closes only
                    # a live one.
                    ep.unregister(tun)
                    os.close(tun)
                    self._tun = tun = -1
        finally:
            ep.close()

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _pump(self, tun: int) -> bool:
        """Move packets both ways until neither side has any; False if the TUN fd is dead."""
        busy = True
        while busy and not self._stop and self._new_tun is None:
            table = self.peers  # read once per burst: a swap takes effect at the next burst
            busy, alive = self._from_tun(tun, table) if tun >= 0 else (False, True)
            if not alive:
                return False
            busy = self._from_udp(tun, table) or busy
        return True

    def _from_tun(self, tun: int, table: PeerTable) -> tuple[bool, bool]:
        """Up to BURST packets from the TUN to their peers; (whether there were any, whether the TUN lives).

        Consecutive packets to one peer are sent as one UDP GSO batch (one sendmsg, one pass through the
        stack): the kernel cuts it into one datagram per packet, on the wire exactly what per-packet sends
        give, unless the receiving socket asked for GRO (see _from_udp), which then gets the batch whole."""
        read, c, u32 = os.read, self.counters, _U32.unpack_from
        routes = table.routes
        single = routes[0] if len(routes) == 1 else None
        batch: list[memoryview] = []
        bhop: tuple[str, int] | None = None
        bsize = btotal = 0
        sent = sent_bytes = 0
        busy, alive = False, True
        for _ in range(BURST):
            try:
                raw = read(tun, MAX_PACKET)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno not in (errno.EBADFD, errno.EBADF, errno.EIO):
                    raise
                log.warning("udp: the TUN device is gone (%s); waiting for it to be recreated", e)
                alive = False
                break
            busy = True
            n = len(raw) - VNET_HDR_LEN
            # Without TUNSETOFFLOAD the kernel hands over whole, checksummed packets (gso_type NONE).
            if n < 20 or raw[VNET_HDR_LEN] >> 4 != 4 or raw[1]:
                c.drop_malformed_tun += 1
                continue
            dst = u32(raw, VNET_HDR_LEN + 16)[0]
            hop = single[1].get(dst & single[0]) if single is not None else table.lookup(dst)
            if hop is None:
                self._no_peer(tun, raw[VNET_HDR_LEN:])
                continue
            pkt = memoryview(raw)[VNET_HDR_LEN:]
            if batch and (hop is not bhop or n > bsize or btotal + n > GSO_MAX_BYTES or len(batch) >= GSO_MAX_SEGS):
                sent += self._send(batch, bsize, bhop)  # type: ignore[arg-type]
                sent_bytes += btotal
                batch = []
            if not batch:
                bhop, bsize, btotal = hop, n, 0
            batch.append(pkt)
            btotal += n
            if n < bsize:  # only the last segment of a GSO batch may be shorter
                sent += self._send(batch, bsize, hop)
                sent_bytes += btotal
                batch = []
        if batch:
            sent += self._send(batch, bsize, bhop)  # type: ignore[arg-type]
            sent_bytes += btotal
        c.tun_packets += sent
        c.tun_bytes += sent_bytes
        return busy, alive

    def _send(self, batch: list[memoryview], size: int, hop: tuple[str, int]) -> int:
        """Send `batch` to `hop`; how many packets left (all or none)."""
        try:
            if len(batch) == 1 or not self._gso:
                if len(batch) == 1:
                    self._sock.sendto(batch[0], hop)
                    return 1
                for pkt in batch:
                    self._sock.sendto(pkt, hop)
                return len(batch)
            self._sock.sendmsg(batch, [(SOL_UDP, UDP_SEGMENT, _U16N.pack(size))], 0, hop)
            self.counters.gso_sends += 1
            return len(batch)
        except OSError as e:
            if self._gso and len(batch) > 1 and e.errno in (errno.EIO, errno.EINVAL, errno.EOPNOTSUPP):
                # No segmentation offload on this path (checksum offload missing, old kernel): per packet.
                log.warning("udp: UDP segmentation offload refused (%s); sending one datagram per packet", e)
                self._gso = False
                return self._send(batch, size, hop)
            self.counters.send_errors += len(batch)
            self._droplog.note("send error", f"to {hop[0]}:{hop[1]}: {e.strerror}")
            return 0

    def _from_udp(self, tun: int, table: PeerTable) -> bool:
        """Up to BURST datagrams (or GRO batches of them) from peers to the TUN; whether there were any."""
        c, writev = self.counters, os.writev
        recvmsg_into = self._sock.recvmsg_into
        buf, mv = self._buf, self._mv
        bufs = [buf]
        sources = table.sources
        got = got_bytes = 0
        busy = False
        for _ in range(BURST):
            try:
                n, anc, _flags, addr = recvmsg_into(bufs, _ANC_SPACE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError as e:
                # An ICMP error for an earlier send (peer port closed) is reported on the next call.
                if e.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    busy = True
                    continue
                raise
            busy = True
            if addr[0] not in sources:
                c.drop_unknown_source += 1
                self._droplog.note("datagram from an address without a lease", f"{addr[0]}:{addr[1]}")
                continue
            seg = n
            for level, kind, data in anc:
                if level == SOL_UDP and kind == UDP_GRO:
                    seg = _INTN.unpack_from(data)[0]
            if tun < 0:
                continue
            if seg < n:
                c.gro_batches += 1
                p, b = self._deliver_batch(tun, self._deliver_runs(tun, n, seg), n, seg, addr)
                got += p
                got_bytes += b
                continue
            tot = (buf[2] << 8) | buf[3] if n >= 4 else 0
            if n < 20 or buf[0] >> 4 != 4 or (buf[0] & 0x0F) < 5 or tot > n or tot < 20:
                self._malformed(n, addr)
                continue
            try:
                writev(tun, [_PLAIN_HDR, mv[:tot]])
                got += 1
                got_bytes += tot
            except OSError as e:
                c.tun_write_errors += 1
                self._droplog.note("TUN write error", e.strerror or str(e))
        c.udp_packets += got
        c.udp_bytes += got_bytes
        return busy

    def _malformed(self, n: int, addr: tuple[str, int]) -> None:
        self.counters.drop_malformed_udp += 1
        self._droplog.note("malformed datagram", f"{n} bytes from {addr[0]}:{addr[1]}, not a whole IPv4 packet")

    def _deliver_runs(self, tun: int, n: int, seg: int) -> int:
        """The common case of a GRO batch: runs of full-sized segments that are consecutive data of one TCP
        stream, found with one strided slice per header byte instead of a loop over segments, each written as
        one offload packet. Returns where the rest of the batch starts (left to _deliver_batch)."""
        buf, mv = self._buf, self._mv
        u32 = _U32.unpack_from
        off = 0
        while True:
            k = (n - off) // seg
            if k < 2 or buf[off] != 0x45 or buf[off + 9] != 6 or buf[off + 6] & 0x3F or buf[off + 7]:
                return off
            if (buf[off + 2] << 8) | buf[off + 3] != seg:
                return off
            hlen = 20 + (buf[off + 32] >> 4) * 4
            mss = seg - hlen
            if hlen < 40 or mss <= 0:
                return off
            # How many segments from `off` share every byte they must: version/IHL, TOS, length, flags and
            # fragment offset, TTL, protocol, addresses, ports, ack, data offset, window and options.
            m = k
            end = off + k * seg
            for j in _RUN_BYTES[: _RUN_FIXED + hlen - 40]:
                col = buf[off + j : end : seg]
                m = min(m, k - len(col.lstrip(col[:1])))
                if m < 2:
                    return off
            col = buf[off + 33 : off + m * seg : seg]
            p = m - len(col.lstrip(b"\x10"))  # ACK only; PSH may end a run
            if p < m and col[p] == 0x18:
                p += 1
            m = p
            if m < 2:
                return off
            seq0 = u32(buf, off + 24)[0]
            seqs = [u32(buf, o)[0] for o in range(off + 24, off + m * seg, seg)]
            for i, q in enumerate(seqs):
                if q != (seq0 + i * mss) & 0xFFFFFFFF:
                    m = i
                    break
            if m < 2:
                return off
            run = [mv[o : o + mss] for o in range(off + hlen, off + m * seg, seg)]
            psh = buf[off + (m - 1) * seg + 33] & 0x08
            nbytes = m * seg
            t = off + m * seg
            # The batch's shorter last datagram joins when it continues the run (a TSO burst's tail).
            if (
                m == k
                and not psh
                and hlen < n - t < seg
                and (buf[t + 2] << 8) | buf[t + 3] == n - t
                and all(buf[t + j] == buf[off + j] for j in _TAIL_BYTES[: _TAIL_FIXED + hlen - 40])
                and buf[t + 33] & 0xF7 == 0x10
                and u32(buf, t + 24)[0] == (seq0 + m * mss) & 0xFFFFFFFF
            ):
                run.append(mv[t + hlen : n])
                psh = buf[t + 33] & 0x08
                nbytes += n - t
                m += 1
            self._write_run(tun, off, hlen, mss, run, psh)
            self.counters.udp_packets += m
            self.counters.udp_bytes += nbytes
            off += nbytes

    def _deliver_batch(self, tun: int, off: int, n: int, seg: int, addr: tuple[str, int]) -> tuple[int, int]:
        """Write a GRO batch of datagrams (each `seg` bytes, the last maybe shorter) to the TUN; (packets,
        bytes) written. Runs of consecutive segments of one TCP stream, as a TSO sender produced them, are
        written as one TCP segmentation-offload packet: the kernel then forwards, bridges and delivers the
        run once instead of once per segment, as its own GRO would have."""
        buf, mv = self._buf, self._mv
        u32 = _U32.unpack_from
        packets = nbytes = 0
        run: list[memoryview] = []  # payloads of the run being merged
        r = 0  # offset of the run's first segment
        r_hlen = r_mss = r_len = r_next = 0
        r_key = r_rest = bytearray()
        r_psh = 0
        while True:
            start_new = off >= n  # past the end: flush what is pending
            if not start_new:
                end = min(off + seg, n)
                length = end - off
                tot = (buf[off + 2] << 8) | buf[off + 3] if length >= 4 else 0
                if length < 20 or buf[off] >> 4 != 4 or (buf[off] & 0x0F) < 5 or tot > length or tot < 20:
                    self._malformed(length, addr)
                    off = end
                    continue
                # A TCP segment a run can take: no IP options or fragmentation, only ACK (PSH ends a run).
                mergeable = False
                if buf[off] == 0x45 and buf[off + 9] == 6 and not (buf[off + 6] & 0x3F or buf[off + 7]):
                    hlen = 20 + (buf[off + 32] >> 4) * 4
                    flags = buf[off + 33]
                    plen = tot - hlen
                    mergeable = plen > 0 and hlen >= 40 and flags & 0xF7 == 0x10
            if run:
                joins = (
                    not start_new
                    and mergeable
                    and not r_psh
                    and plen <= r_mss
                    and hlen == r_hlen
                    and r_len + plen <= 65535 - hlen
                    and u32(buf, off + 24)[0] == r_next
                    and buf[off + 1] == buf[r + 1]
                    and buf[off + 8] == buf[r + 8]
                    and buf[off + 12 : off + 24] == r_key
                    and buf[off + 28 : off + 33] + buf[off + 34 : off + 36] + buf[off + 40 : off + hlen] == r_rest
                )
                if joins:
                    run.append(mv[off + hlen : off + tot])
                    r_len += plen
                    r_next = (r_next + plen) & 0xFFFFFFFF
                    r_psh = flags & 0x08
                    if plen < r_mss:
                        r_psh = 1  # only the last segment of a run may be short
                    off = end
                    continue
                packets += len(run)
                nbytes += r_len + r_hlen * len(run)
                self._write_run(tun, r, r_hlen, r_mss, run, r_psh)
                run = []
            if start_new:
                break
            if mergeable:
                r, r_hlen, r_mss, r_len, r_psh = off, hlen, plen, plen, flags & 0x08
                r_next = (u32(buf, off + 24)[0] + plen) & 0xFFFFFFFF
                r_key = buf[off + 12 : off + 24]
                r_rest = buf[off + 28 : off + 33] + buf[off + 34 : off + 36] + buf[off + 40 : off + hlen]
                run = [mv[off + hlen : off + tot]]
            else:
                try:
                    os.writev(tun, [_PLAIN_HDR, mv[off : off + tot]])
                    packets += 1
                    nbytes += tot
                except OSError as e:
                    self.counters.tun_write_errors += 1
                    self._droplog.note("TUN write error", e.strerror or str(e))
            off = end
        return packets, nbytes

    def _write_run(self, tun: int, r: int, hlen: int, mss: int, run: list[memoryview], psh: int) -> None:
        buf = self._buf
        try:
            if len(run) == 1:
                os.writev(tun, [_PLAIN_HDR, self._mv[r : r + hlen + len(run[0])]])
                return
            tcp_len = hlen - 20 + sum(len(p) for p in run)
            ip = bytearray(buf[r : r + 20])
            ip[2:4] = _U16.pack(20 + tcp_len)
            ip[10:12] = b"\0\0"
            ip[10:12] = _U16.pack(inet_checksum(ip))
            tcp = bytearray(buf[r + 20 : r + hlen])
            if psh & 0x08:
                tcp[13] |= 0x08
            # CHECKSUM_PARTIAL: the field holds the folded pseudo-header sum; the kernel completes it if the
            # packet is ever cut into segments again (the wire checksums were covered by the UDP checksum).
            tcp[16:18] = _U16.pack(~inet_checksum(bytes(ip[12:20]) + _U16.pack(6) + _U16.pack(tcp_len)) & 0xFFFF)
            hdr = VNET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, hlen, mss, 20, 16)
            os.writev(tun, [hdr, ip, tcp, *run])
            self.counters.tso_writes += 1
        except OSError as e:
            self.counters.tun_write_errors += 1
            self._droplog.note("TUN write error", e.strerror or str(e))

    def _no_peer(self, tun: int, pkt: bytes) -> None:
        c = self.counters
        c.drop_no_peer += 1
        dst = IPv4Address(pkt[16:20])
        self._droplog.note("packet for an address no lease covers", f"{IPv4Address(pkt[12:16])} -> {dst}")
        reply = icmp_unreachable(pkt, self._icmp_source)
        if reply is None:
            return
        try:
            os.writev(tun, [_PLAIN_HDR, reply])
            c.icmp_sent += 1
        except OSError:
            c.tun_write_errors += 1


__all__ = ["Counters", "DropLog", "Forwarder", "PeerTable", "icmp_unreachable", "inet_checksum"]
