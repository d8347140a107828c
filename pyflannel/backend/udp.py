"""udp: flannel's original userspace backend, wire-compatible with upstream's `pkg/backend/udp`.

Device `flannel0`: a TUN device (bare IPv4 packets), MTU = external MTU - 28 (outer IPv4 + UDP headers),
address `<own subnet network address>/32`, up, and one route `<Network> dev flannel0`: every pod address the
node has no better route for enters the agent. The agent sends each packet as one UDP datagram to
`<peer PublicIP>:Port` (Port 8285 by default) of the peer whose subnet holds the destination, from a socket
bound to the external interface's address and that port, and writes each datagram it receives to flannel0.
The lease carries no BackendType and no BackendData (upstream's udp leases have none), and peers are the
leases without a BackendType. IPv4 only.

Unlike upstream's, flannel0 is persistent: it outlives the agent with its address and route, so while the
agent restarts, pod traffic to other nodes is dropped on flannel0 instead of following the default route out
of the node, and the restarted agent attaches to it again (see netlink/tun.py).

Packets moving is the job of udp_forward.Forwarder, a thread of its own; this module keeps its peer table
current and its device and route in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Sequence
from ipaddress import IPv4Interface, IPv4Network

from ..config import NetConfig
from ..iface import ExternalInterface
from ..lease import Lease
from ..netlink import AF_INET, RT_TABLE_MAIN, KernelEvent, Link, Netlink, NetlinkError, Route
from ..netlink.tun import TunError, open_tun
from .base import Backend, BackendAttrs, BackendError, Figure, KernelView, kernel_view
from .device import configure_device, device_event_needs_repair, inner_mtu, underlay_ipv4
from .entries import OwnedEntries, apply_ops, describe, device_names
from .options import opt_int
from .udp_forward import SOL_UDP, UDP_GRO, Counters, Forwarder, PeerTable

log = logging.getLogger(__name__)

DEVICE = "flannel0"
DEFAULT_PORT = 8285
OVERHEAD = 28  # outer IPv4 header (20) + UDP header (8)
# Room for bursts while the forwarding thread waits for the GIL; SO_*BUFFORCE (we are root) goes past
# net.core.[rw]mem_max without changing that sysctl.
SOCKET_BUFFER = 4 << 20
SO_RCVBUFFORCE, SO_SNDBUFFORCE = 33, 32  # asm-generic/socket.h; not in Python's socket module
# How often the data path's counters are logged (when they changed); also logged at shutdown.
STATS_INTERVAL = 60.0
# Lease types whose traffic this backend carries: upstream's udp leases have no BackendType.
PEER_TYPES = ("", "udp")


class UdpBackend(Backend):
    backend_type = "udp"

    @classmethod
    def check_config(cls, cfg: NetConfig) -> None:
        if cfg.enable_ipv6:
            raise BackendError("udp carries IPv4 only: EnableIPv6 needs another backend (vxlan, host-gw or wireguard)")
        opt_int(cfg, "Port", DEFAULT_PORT, 1, 65535)

    def __init__(self, cfg: NetConfig, ext: ExternalInterface, nl: Netlink) -> None:
        super().__init__(cfg, ext, nl)
        self.check_config(cfg)
        if nl.netns is not None:
            raise BackendError(
                "udp: the agent must run inside the node's network namespace (TUN devices are made there)"
            )
        self.port = opt_int(cfg, "Port", DEFAULT_PORT, 1, 65535)
        self.local = underlay_ipv4(ext, "udp")
        self._mtu = inner_mtu(ext, OVERHEAD, "udp")
        # Read by metrics and tests; the forwarding thread is its only writer.
        self.counters = Counters()
        self._own: Lease | None = None
        self._tun = -1
        self._index = 0
        self._sock: socket.socket | None = None
        self._fwd: Forwarder | None = None
        self._done: asyncio.Future[BaseException | None] | None = None
        self._peers: dict[IPv4Network, Lease] = {}
        self._owned: OwnedEntries[str] = OwnedEntries()
        self._lock = asyncio.Lock()
        log.info("UDP config: Port=%d MTU=%d", self.port, self._mtu)

    # ------------------------------------------------------------ device, route, socket

    def _open_socket(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
                try:
                    s.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
                except OSError:
                    s.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)
            with contextlib.suppress(OSError):  # GRO batches are an optimisation (Linux >= 5.0)
                s.setsockopt(SOL_UDP, UDP_GRO, 1)
            s.bind((str(self.local), self.port))
        except OSError as e:
            s.close()
            raise BackendError(f"udp: cannot listen on {self.local}:{self.port}: {e.strerror or e}") from e
        return s

    def _open_tun(self) -> int:
        try:
            fd, _name = open_tun(DEVICE, vnet_hdr=True)
        except TunError as e:
            raise BackendError(f"udp: {e.strerror}; free the name {DEVICE} (ip link delete {DEVICE})") from e
        return fd

    @staticmethod
    def _foreign(link: Link) -> str:
        if link.kind != "tun":
            return f"it is a {link.kind or 'plain'} device, not a TUN device"
        return ""

    async def ensure_device(self) -> None:
        """flannel0 as it must be: attached to our fd (recreated if it vanished), MTU, up, address and the
        Network route once the lease is known."""
        link = await self.nl.link_by_name(DEVICE)
        if link is not None:
            why = self._foreign(link)
            if why:
                raise BackendError(
                    f"{DEVICE} already exists and is not one flannel made: {why}; "
                    f"remove it (ip link delete {DEVICE}) or free the name, then restart flanneld"
                )
        if link is None or self._tun < 0:
            if self._tun >= 0:
                log.warning("TUN device %s is gone; recreating it", DEVICE)
            created = link is None  # else a previous run's flannel0, which we attach to
            fd = self._open_tun()
            if self._fwd is not None:
                self._fwd.replace_tun(fd)  # the thread closes the dead fd
            elif self._tun >= 0:
                os.close(self._tun)
            self._tun = fd
            link = await self.nl.link_by_name(DEVICE)
            if link is None:
                raise BackendError(f"udp: {DEVICE} was opened but the kernel does not list it")
            if created:
                self.made_device(DEVICE, link.index)
        try:
            if link.mtu != self._mtu:
                log.info("current MTU of %s is %d, setting it to %d", DEVICE, link.mtu, self._mtu)
                await self.nl.set_mtu(link.index, self._mtu)
        except NetlinkError as e:
            raise BackendError(f"failed to set MTU {self._mtu} on {DEVICE}: {e}") from e
        self._index = link.index
        own = self._own
        if own is None or own.subnet is None:
            return
        # The /32 gives the node a source address on the flannel network (for host-to-pod traffic) without
        # the broadcast routes a wider prefix would add; it is also the source of our ICMP errors.
        await configure_device(self.nl, link, IPv4Interface((own.subnet.network_address, 32)))
        network = self.cfg.network
        if network is not None:
            ops = self._owned.program("network", [Route(dst=network, oif=link.index)])
            await apply_ops(self.nl, f"udp route {network} dev {DEVICE}", ops)

    # ------------------------------------------------------------ the Backend API

    async def prepare(self) -> BackendAttrs:
        if self.ext.public_ip is None:
            raise BackendError("udp: the external interface has no IPv4 address")
        async with self._lock:
            if self._sock is None:
                self._sock = self._open_socket()
            await self.ensure_device()
        return BackendAttrs(backend_type="", backend_data=None, backend_v6_data=None, mtu=self._mtu)

    async def start(self, own: Lease) -> None:
        if own.subnet is None:
            raise BackendError("udp: the lease has no IPv4 subnet")
        async with self._lock:
            self._own = own
            await self.ensure_device()
            assert self._sock is not None
            if self._fwd is None:
                # Our ICMP errors come from the Network's own address: one of this node's addresses (upstream
                # uses flannel0's) would be dropped by the kernel as a martian when it comes back in by the TUN.
                assert self.cfg.network is not None
                fwd = Forwarder(self._tun, self._sock, self.cfg.network.network_address, self.counters)
                loop = asyncio.get_running_loop()
                done: asyncio.Future[BaseException | None] = loop.create_future()

                def finished(exc: BaseException | None) -> None:
                    def resolve() -> None:
                        if not done.done():
                            done.set_result(exc)

                    with contextlib.suppress(RuntimeError):  # the loop is already closed: nobody is waiting
                        loop.call_soon_threadsafe(resolve)

                # Started before the first lease snapshot: the peer table fills then, and until it does
                # packets get ICMP unreachable instead of leaving by the default route.
                fwd.start(finished)
                self._fwd, self._done = fwd, done

    async def run(self) -> None:
        if self._done is None:
            return
        last = ""
        while True:
            try:
                exc = await asyncio.wait_for(asyncio.shield(self._done), STATS_INTERVAL)
                break
            except TimeoutError:
                line = self.counters.summary()
                if line != last:
                    log.info("udp data path: %s", line)
                    last = line
        if exc is not None:
            raise BackendError(f"udp: the forwarding thread failed: {type(exc).__name__}: {exc}") from exc

    def _is_peer(self, lease: Lease) -> bool:
        return (
            lease.subnet is not None
            and lease.attrs.public_ip is not None
            and (self._own is None or lease.subnet != self._own.subnet)
        )

    def _publish(self) -> None:
        """A new peer table from self._peers, swapped in as one object."""
        table = PeerTable.build(
            (sn, lease.attrs.public_ip, self.port)
            for sn, lease in self._peers.items()
            if lease.attrs.public_ip is not None
        )
        if self._fwd is not None:
            self._fwd.set_peers(table)

    def _accept(self, lease: Lease, warn: bool = True) -> bool:
        if not self._is_peer(lease):
            return False
        if lease.attrs.backend_type.lower() not in PEER_TYPES:
            if warn:
                log.warning("ignoring non-udp subnet %s: type=%s", lease.key, lease.attrs.backend_type)
            return False
        return True

    async def add_peers(self, leases: Sequence[Lease]) -> None:
        changed = False
        for lease in leases:
            if self._accept(lease):
                assert isinstance(lease.subnet, IPv4Network)
                self._peers[lease.subnet] = lease
                log.info("udp: subnet %s via %s:%d", lease.subnet, lease.attrs.public_ip, self.port)
                changed = True
        if changed:
            self._publish()

    async def remove_peer(self, lease: Lease) -> None:
        if lease.subnet is not None and self._peers.pop(lease.subnet, None) is not None:
            log.info("udp: subnet %s removed", lease.subnet)
            self._publish()

    async def reconcile(self, peers: Sequence[Lease]) -> None:
        async with self._lock:
            await self.ensure_device()
        fresh: dict[IPv4Network, Lease] = {}
        for lease in peers:
            if self._accept(lease, warn=False):
                assert isinstance(lease.subnet, IPv4Network)
                fresh[lease.subnet] = lease
        if fresh != self._peers:
            log.info("udp reconcile: %d peers (was %d)", len(fresh), len(self._peers))
        self._peers = fresh
        self._publish()

    def kernel_event_needs_repair(self, ev: KernelEvent) -> bool:
        if ev.kind == "resync":
            return True
        obj = ev.obj
        if isinstance(obj, Link):
            return device_event_needs_repair(ev, DEVICE, self._index)
        if isinstance(obj, Route) and obj.table == RT_TABLE_MAIN:
            return self._owned.verdict(ev) is True
        return False

    async def close(self) -> None:
        # flannel0 stays (persistent) with its address and route: the next start attaches to it. Unless this run
        # never got a lease (Backend.remove_half_built): then no forwarding thread was started, and the flannel0
        # it made goes once our fd is closed.
        fwd, self._fwd = self._fwd, None
        if fwd is not None:
            await asyncio.get_running_loop().run_in_executor(None, fwd.stop)
            self._tun = fwd.tun
            log.info("udp data path: %s", self.counters.summary())
        if self._tun >= 0:
            os.close(self._tun)
            self._tun = -1
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        await self.remove_half_built(self._own)

    async def inspect(self, peers: Sequence[Lease]) -> KernelView:
        """A peer's entry is its line in the data path's peer table (the kernel holds no per-peer state); the
        node's own is the Network route via flannel0."""
        table = self.peer_table()

        def line(sn: IPv4Network, ip: str, port: int) -> str:
            return f"udp peer {sn} via {ip}:{port}"

        want: dict[str, list[str]] = {}
        held: list[str] = []
        for lease in peers:
            sn, ip = lease.subnet, lease.attrs.public_ip
            if not (self._accept(lease, warn=False) and isinstance(sn, IPv4Network) and ip is not None):
                want[lease.key] = []
                continue
            want[lease.key] = [line(sn, str(ip), self.port)]
            hop = table.lookup(int(sn.network_address))
            if hop is not None:
                held.append(line(sn, *hop))
        routes = self._owned.get("network") or []
        names = await device_names(self.nl)
        kernel = set((await self.nl.snapshot(AF_INET)).routes)
        return kernel_view(
            want,
            held,
            own=[describe(r, names) for r in routes],
            held_own=[describe(r, names) for r in routes if r in kernel],
        )

    async def figures(self) -> list[Figure]:
        c = self.counters
        figures = [
            Figure("udp_packets_total", "Packets the udp data path carried", "counter", v, (("direction", d),))
            for d, v in (("tx", c.tun_packets), ("rx", c.udp_packets))
        ]
        figures += [
            Figure("udp_bytes_total", "Bytes the udp data path carried", "counter", v, (("direction", d),))
            for d, v in (("tx", c.tun_bytes), ("rx", c.udp_bytes))
        ]
        figures += [
            Figure("udp_drops_total", "Packets the udp data path dropped, by reason", "counter", v, (("reason", r),))
            for r, v in c.drops().items()
        ]
        figures += [
            Figure("udp_errors_total", "Failed sends and TUN writes of the udp data path", "counter", v, (("op", o),))
            for o, v in (("send", c.send_errors), ("tun_write", c.tun_write_errors))
        ]
        figures.append(
            Figure("udp_icmp_sent_total", "ICMP unreachables sent by the udp data path", "counter", c.icmp_sent)
        )
        return figures

    def peer_table(self) -> PeerTable:
        return self._fwd.peers if self._fwd is not None else PeerTable()


BACKEND = UdpBackend
