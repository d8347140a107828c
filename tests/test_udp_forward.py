"""The udp data path's pure parts: checksum, ICMP errors, the peer table, and the merging of a GRO batch into
TCP offload packets (written to a SOCK_SEQPACKET pair standing in for the TUN, which keeps write boundaries)."""

from __future__ import annotations

import os
import socket
import struct
from ipaddress import IPv4Address, IPv4Network

import pytest

from pyflannel.backend.udp_forward import Counters, Forwarder, PeerTable, icmp_unreachable, inet_checksum
from pyflannel.netlink.tun import VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, VNET_HDR, VNET_HDR_LEN


def naive_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


@pytest.mark.parametrize("data", [b"", b"\0\0", b"\xff\xff", b"\xff\xff\xff\xff", b"\x01", os.urandom(1401)])
def test_checksum_matches_rfc1071(data: bytes) -> None:
    assert inet_checksum(data) == naive_checksum(data)


def ipv4(src: str, dst: str, proto: int, payload: bytes, frag: int = 0x4000) -> bytes:
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 7, frag, 64, proto, 0,
                                IPv4Address(src).packed, IPv4Address(dst).packed))  # fmt: skip
    hdr[10:12] = struct.pack("!H", inet_checksum(hdr))
    return bytes(hdr) + payload


def test_icmp_unreachable_quotes_the_offender_and_checks_out() -> None:
    pkt = ipv4("10.1.1.5", "10.1.9.9", 17, struct.pack("!HHHH", 1000, 2000, 12, 0) + b"data")
    reply = icmp_unreachable(pkt, IPv4Address("10.1.0.0").packed)
    assert reply is not None
    assert inet_checksum(reply[:20]) == 0 and inet_checksum(reply[20:]) == 0
    assert reply[9] == 1 and reply[12:16] == IPv4Address("10.1.0.0").packed and reply[16:20] == pkt[12:16]
    assert reply[20:22] == b"\x03\x00"  # destination unreachable, network unreachable
    assert reply[28:] == pkt[:28]
    echo = ipv4("10.1.1.5", "10.1.9.9", 1, b"\x08\x00" + bytes(6))
    assert icmp_unreachable(echo, b"\0" * 4) is not None  # a ping gets told
    error = ipv4("10.1.1.5", "10.1.9.9", 1, b"\x03\x01" + bytes(6))
    assert icmp_unreachable(error, b"\0" * 4) is None  # never an error about an error
    assert icmp_unreachable(ipv4("10.1.1.5", "10.1.9.9", 17, bytes(8), frag=0x0001), b"\0" * 4) is None
    assert icmp_unreachable(ipv4("224.0.0.1", "10.1.9.9", 17, bytes(8)), b"\0" * 4) is None


def test_peer_table_longest_prefix_and_sources() -> None:
    t = PeerTable.build(
        [
            (IPv4Network("10.1.2.0/24"), IPv4Address("192.0.2.2"), 8285),
            (IPv4Network("10.1.2.128/25"), IPv4Address("192.0.2.3"), 8285),
        ]
    )
    assert t.lookup(int(IPv4Address("10.1.2.7"))) == ("192.0.2.2", 8285)
    assert t.lookup(int(IPv4Address("10.1.2.200"))) == ("192.0.2.3", 8285)
    assert t.lookup(int(IPv4Address("10.1.3.1"))) is None
    assert t.sources == {"192.0.2.2", "192.0.2.3"} and len(t) == 2


def tcp_segment(seq: int, payload: bytes, flags: int = 0x10, ts: int = 1) -> bytes:
    opts = b"\x01\x01\x08\x0a" + struct.pack("!II", ts, 99)
    tcp = struct.pack("!HHIIBBHHH", 5201, 40000, seq, 555, (20 + len(opts)) // 4 << 4, flags, 512, 0, 0) + opts
    return ipv4("10.1.1.5", "10.1.2.7", 6, tcp + payload)


def _deliver(segments: list[bytes]) -> list[bytes]:
    """Feed one GRO batch of these segments to a Forwarder; what it wrote, one entry per write."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        fwd = Forwarder(a.fileno(), udp, IPv4Address("10.1.0.0"), Counters())
        data = b"".join(segments)
        fwd._buf[: len(data)] = data
        seg = len(segments[0])
        start = fwd._deliver_runs(a.fileno(), len(data), seg)
        fwd._deliver_batch(a.fileno(), start, len(data), seg, ("192.0.2.2", 8285))
        b.setblocking(False)
        out = []
        while True:
            try:
                out.append(b.recv(1 << 17))
            except BlockingIOError:
                return out
    finally:
        for s in (a, b, udp):
            s.close()


def test_a_batch_of_one_stream_becomes_one_offload_packet_with_the_same_bytes() -> None:
    mss = 1000
    payloads = [os.urandom(mss) for _ in range(5)] + [os.urandom(300)]
    # The last datagram of a GRO batch may be shorter; it ends the run here, with PSH.
    segs = [tcp_segment(1000 + i * mss, p, flags=0x18 if i == 5 else 0x10) for i, p in enumerate(payloads)]
    (written,) = _deliver(segs)
    flags, gso_type, hlen, gso_size, cstart, coff = VNET_HDR.unpack_from(written)
    assert (flags, gso_type, hlen, gso_size, cstart, coff) == (
        VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 52, mss, 20, 16
    )  # fmt: skip
    pkt = written[VNET_HDR_LEN:]
    assert struct.unpack_from("!H", pkt, 2)[0] == len(pkt) == 52 + 5 * mss + 300
    assert inet_checksum(pkt[:20]) == 0
    assert struct.unpack_from("!I", pkt, 24)[0] == 1000 and pkt[33] == 0x18  # first seq, PSH of the last
    assert pkt[52:] == b"".join(payloads)
    # The TCP checksum field holds the pseudo-header sum: completing it over the segment gives a valid one.
    pseudo = pkt[12:20] + struct.pack("!HH", 6, len(pkt) - 20)
    partial = struct.unpack_from("!H", pkt, 36)[0]
    assert partial == ~inet_checksum(pseudo) & 0xFFFF


def test_a_gap_or_another_stream_splits_the_batch() -> None:
    mss = 500
    segs = [tcp_segment(0, bytes(mss)), tcp_segment(mss, bytes(mss)), tcp_segment(5 * mss, bytes(mss)),
            tcp_segment(6 * mss, bytes(mss), ts=2), tcp_segment(7 * mss, bytes(mss), ts=2)]  # fmt: skip
    out = _deliver(segs)
    # [0, mss) merged; the sequence gap starts a new run, whose TCP options then change: three writes in all.
    sizes = [len(w) - VNET_HDR_LEN for w in out]
    assert sizes == [52 + 2 * mss, 52 + mss, 52 + 2 * mss], sizes
    assert VNET_HDR.unpack_from(out[1])[1] == 0  # a lone segment goes as it is
