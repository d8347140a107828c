"""wireguard: an encrypted pod network, as upstream flannel's `pkg/backend/wireguard`, plus a userspace fallback.

Devices (upstream's names and Mode semantics):
  Mode "separate" (the default): `flannel-wg` carries IPv4 (ListenPort, 51820) and `flannel-wg-v6` IPv6
  (ListenPortV6, 51821), each with its own peers; "auto", "ipv4", "ipv6": one `flannel-wg` (ListenPort) carries
  both families, its peers reached at PublicIP:ListenPort ("ipv4"), [PublicIPv6]:ListenPort ("ipv6"), or the
  address most likely to work ("auto": IPv4 unless only IPv6 is public on both ends).
Each device: MTU = Backend.MTU (default: the external interface's) - 80, which subnet.env carries too; the
private key of the key file; address `<own subnet network address>/32` (/128); one route `<Network> dev <device>`.
Per peer lease: public key PublicKey of its BackendData (BackendV6Data for IPv6), endpoint PublicIP:Port (the
lease's Port, else our own ListenPort as upstream, whose leases carry none), PersistentKeepaliveInterval, the
PSK, and AllowedIPs = the lease's subnet(s), replaced on every update. A lease with a malformed key is skipped
with a warning; one that goes removes its peer.
Our lease: BackendType "wireguard", BackendData {"PublicKey": <base64>, "Port": <ListenPort>} (BackendV6Data
likewise, with the IPv6 device's port).

Keys: the private key lives in $WIREGUARD_KEY_FILE or /run/flannel/wgkey (base64, mode 0400, written atomically
and never replaced: a restart keeps it, so peers never churn; a file that cannot be read or holds no key is an
error that names the file, never its content). Neither it nor the PSK is ever logged: both are SecretKeys.

Implementation (beyond upstream, Backend.Implementation "auto" | "kernel" | "userspace"): the kernel's WireGuard
through generic netlink; where the kernel has none ("auto" falls back, "userspace" forces it), Debian's
wireguard-go, supervised by run() (restarted when it dies) and left running at shutdown like a kernel device.
The log and /readyz say which one is in use.

Repairs: a deleted device, address or route comes back at the kernel's notification; WireGuard's own
configuration changes announce nothing, so run() also compares each device with what the leases want every
CHECK_INTERVAL seconds (a peer removed by hand with `wg set ... remove` is restored then).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface
from typing import Any

from ..backoff import Backoff
from ..config import ConfigError, NetConfig, ci_get, read_config_file
from ..lease import Lease
from ..netlink import (
    AF_INET,
    AF_INET6,
    RT_TABLE_MAIN,
    Fdb,
    IPAddress,
    IPNetwork,
    KernelEvent,
    Link,
    Neigh,
    Netlink,
    NetlinkError,
    Route,
)
from ..netlink.wireguard import PublicKey, SecretKey, WgDevice, WgPeer, WgUpdate, format_endpoint
from .base import Backend, BackendAttrs, BackendError, ExternalInterface, Figure, KernelView, kernel_view
from .device import configure_device, delete_device, device_event_needs_repair
from .entries import OwnedEntries, apply_ops, describe, device_names
from .options import opt_int, opt_str
from .wireguard_go import UapiError, WireguardGo

log = logging.getLogger(__name__)

BACKEND_TYPE = "wireguard"
DEVICE = "flannel-wg"
DEVICE_V6 = "flannel-wg-v6"
# Outer IPv4 (20) or IPv6 (40) header, UDP (8), WireGuard's type, key index and nonce (16), tag (16): upstream's.
OVERHEAD = 80
DEFAULT_PORT = 51820
DEFAULT_PORT_V6 = 51821
KEY_FILE = "/run/flannel/wgkey"
KEY_FILE_ENV = "WIREGUARD_KEY_FILE"
MODES = ("separate", "auto", "ipv4", "ipv6")
IMPLEMENTATIONS = ("auto", "kernel", "userspace")
MAX_KEY_FILE = 4096
# How often run() compares the devices with the leases (WireGuard announces no configuration change).
CHECK_INTERVAL = 5.0
# Pause before restarting a wireguard-go that exited, doubled while it keeps exiting within CHECK_INTERVAL.
RESTART_PAUSE_MIN = 0.2
RESTART_PAUSE_MAX = 30.0
MIN_MTU_V4 = 68
MIN_MTU_V6 = 1280


@dataclass(frozen=True)
class WgOptions:
    listen_port: int
    listen_port_v6: int
    psk: SecretKey | None
    keepalive: int
    mode: str
    mtu: int  # 0: the external interface's
    implementation: str


def parse_options(cfg: NetConfig) -> WgOptions:
    """net-conf.json's Backend options, checked; BackendError naming the key (never a PSK's value)."""
    mode = opt_str(cfg, "Mode", "separate")
    if mode not in MODES:
        raise BackendError(f"Backend.Mode: {json.dumps(mode)[:40]} is not one of {', '.join(MODES)}")
    impl = opt_str(cfg, "Implementation", "auto")
    if impl not in IMPLEMENTATIONS:
        raise BackendError(
            f"Backend.Implementation: {json.dumps(impl)[:40]} is not one of {', '.join(IMPLEMENTATIONS)}"
        )
    psk: SecretKey | None = None
    raw = cfg.backend.get("PSK")
    if raw is not None and raw != "":
        if not isinstance(raw, str):
            raise BackendError("Backend.PSK: expected a string (a key as `wg genpsk` prints it)")
        try:
            psk = SecretKey.from_base64(raw)
        except ValueError as e:
            raise BackendError(f"Backend.PSK: {e} (make one with `wg genpsk`)") from None
    mtu = opt_int(cfg, "MTU", 0, 0, 65535)
    return WgOptions(
        listen_port=opt_int(cfg, "ListenPort", DEFAULT_PORT, 1, 65535),
        listen_port_v6=opt_int(cfg, "ListenPortV6", DEFAULT_PORT_V6, 1, 65535),
        psk=psk,
        keepalive=opt_int(cfg, "PersistentKeepaliveInterval", 0, 0, 65535),
        mode=mode,
        mtu=mtu,
        implementation=impl,
    )


# ---------------------------------------------------------------- the key file


def key_file_path(environ: Mapping[str, str]) -> str:
    return environ.get(KEY_FILE_ENV) or KEY_FILE


def load_or_create_key(path: str) -> tuple[SecretKey, bool]:
    """The private key of `path`, made (0400, atomically) if the file does not exist; (key, created).

    Anything else that is wrong with the file is a BackendError: replacing a key silently would make every peer
    drop this node until it learns the new one, and could hide a mistake (a wrong file, a wrong mount)."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return _create_key(path), True
    except OSError as e:
        raise BackendError(f"wireguard: cannot read the key file {path}: {e.strerror}") from None
    try:
        data = read_config_file(path, "the WireGuard key file", MAX_KEY_FILE)
    except ConfigError as e:
        raise BackendError(f"wireguard: {e}") from None
    try:
        return SecretKey.from_base64(data.decode("ascii", errors="replace")), False
    except ValueError as e:
        raise BackendError(
            f"wireguard: the key file {path} does not hold a private key ({e}); fix it, or remove it to have a new "
            "one made (peers then reprogram this node)"
        ) from None


def _create_key(path: str) -> SecretKey:
    key = SecretKey.generate()
    parent = os.path.dirname(path) or "."
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(parent, 0o755, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o400)
        try:
            os.write(fd, key.reveal_base64().encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            # link, not rename: never replaces a key file another agent made meanwhile.
            os.link(tmp, path)
        except FileExistsError:
            os.unlink(tmp)
            return load_or_create_key(path)[0]
        os.unlink(tmp)
        dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise BackendError(f"wireguard: cannot write the key file {path}: {e.strerror}") from None
    log.info("wireguard: wrote a new private key to %s (public key %s)", path, key.public_key())
    return key


# ---------------------------------------------------------------- devices


@dataclass
class _Dev:
    """One WireGuard device and what we want it to hold."""

    name: str
    port: int
    versions: tuple[int, ...]  # the IP versions whose subnets it carries
    impl: str = ""  # "kernel" | "userspace", once it exists
    index: int = 0
    wg: WireguardGo | None = None
    # lease key -> that lease's peer on this device; public key -> the leases naming it (usually one).
    specs: dict[str, WgPeer] = field(default_factory=dict)
    by_key: dict[PublicKey, set[str]] = field(default_factory=dict)

    def set_spec(self, lease_key: str, peer: WgPeer | None) -> set[PublicKey]:
        """Record `peer` (None: none) as `lease_key`'s; the public keys whose merged peer may have changed."""
        touched: set[PublicKey] = set()
        old = self.specs.pop(lease_key, None)
        if old is not None:
            touched.add(old.public_key)
            leases = self.by_key.get(old.public_key)
            if leases is not None:
                leases.discard(lease_key)
                if not leases:
                    del self.by_key[old.public_key]
        if peer is not None:
            self.specs[lease_key] = peer
            self.by_key.setdefault(peer.public_key, set()).add(lease_key)
            touched.add(peer.public_key)
        return touched

    def merged(self, key: PublicKey) -> WgPeer | None:
        """The peer for `key`: one lease's, with the allowed IPs of every lease that names the key (a node whose
        old lease has not expired yet keeps both subnets)."""
        leases = sorted(self.by_key.get(key, ()))
        if not leases:
            return None
        peer = self.specs[leases[-1]]
        if len(leases) == 1:
            return peer
        ips = WgPeer.sort_ips(ip for k in leases for ip in self.specs[k].allowed_ips)
        return WgPeer(peer.public_key, peer.endpoint, peer.keepalive, ips, peer.psk)

    def desired(self) -> dict[PublicKey, WgPeer]:
        return {k: p for k in self.by_key if (p := self.merged(k)) is not None}


def _lease_key_of(data: Any) -> PublicKey | None:
    if not isinstance(data, dict):
        return None
    text = ci_get(data, "PublicKey")
    if not isinstance(text, str):
        return None
    try:
        return PublicKey.from_base64(text)
    except ValueError:
        return None


def _lease_port(data: Any, default: int) -> int:
    port = ci_get(data, "Port") if isinstance(data, dict) else None
    if isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535:
        return port
    return default


def _is_private(ip: IPAddress) -> bool:
    return ip.is_private


class WireguardBackend(Backend):
    backend_type = BACKEND_TYPE

    @classmethod
    def check_config(cls, cfg: NetConfig) -> None:
        parse_options(cfg)

    def __init__(self, cfg: NetConfig, ext: ExternalInterface, nl: Netlink) -> None:
        super().__init__(cfg, ext, nl)
        self.opts = parse_options(cfg)
        o = self.opts
        if o.implementation == "userspace" and WireguardGo.available() is None:
            raise BackendError(
                "wireguard: Backend.Implementation is userspace but wireguard-go is not installed "
                "(apt-get install wireguard-go)"
            )
        self.key_file = key_file_path(os.environ)
        self._key: SecretKey | None = None
        self._public: PublicKey | None = None
        self._restored: tuple[Any, Any] = (None, None)
        base = o.mtu or ext.mtu
        self._mtu = base - OVERHEAD
        floor = MIN_MTU_V6 if cfg.enable_ipv6 else MIN_MTU_V4
        if self._mtu < floor:
            raise BackendError(
                f"wireguard: MTU {base} leaves {self._mtu} after WireGuard's {OVERHEAD} bytes, below the minimum "
                f"of {floor}"
            )
        self.devs: list[_Dev] = []
        if o.mode == "separate":
            if cfg.enable_ipv4:
                self.devs.append(_Dev(DEVICE, o.listen_port, (4,)))
            if cfg.enable_ipv6:
                self.devs.append(_Dev(DEVICE_V6, o.listen_port_v6, (6,)))
        else:
            versions = tuple(v for v, on in ((4, cfg.enable_ipv4), (6, cfg.enable_ipv6)) if on)
            self.devs.append(_Dev(DEVICE, o.listen_port, versions))
        self._own: Lease | None = None
        self._leases: dict[str, Lease] = {}
        self._synced = False
        self._kernel_missing = False
        self._owned: OwnedEntries[str] = OwnedEntries()
        self._lock = asyncio.Lock()
        log.info(
            "WireGuard config: Mode=%s ListenPort=%d ListenPortV6=%d PSK=%s PersistentKeepaliveInterval=%d MTU=%d "
            "Implementation=%s",
            o.mode, o.listen_port, o.listen_port_v6, "set" if o.psk else "none", o.keepalive, self._mtu,
            o.implementation,
        )  # fmt: skip

    # ------------------------------------------------------------ keys and identity

    def restore_backend_data(self, data: Any, v6_data: Any) -> None:
        self._restored = (data, v6_data)

    def _load_key(self) -> None:
        if self._key is not None:
            return
        key, created = load_or_create_key(self.key_file)
        self._key, self._public = key, key.public_key()
        before = [k for k in (_lease_key_of(d) for d in self._restored) if k is not None]
        if before and self._public not in before:
            log.warning(
                "wireguard: the key in %s (public key %s) is not the one our last lease advertised (%s): peers "
                "will reprogram this node",
                self.key_file, self._public, before[0],
            )  # fmt: skip
        elif not created:
            log.info("wireguard: using the private key in %s (public key %s)", self.key_file, self._public)

    def implementation(self) -> str:
        impls = sorted({d.impl for d in self.devs if d.impl})
        names = {"kernel": "kernel", "userspace": "userspace (wireguard-go)"}
        return ", ".join(names[i] for i in impls) or "none yet"

    def status(self) -> str:
        return f"wireguard implementation: {self.implementation()}"

    # ------------------------------------------------------------ device control

    async def _get(self, dev: _Dev) -> WgDevice:
        try:
            if dev.impl == "userspace":
                assert dev.wg is not None
                return await dev.wg.get()
            return await self.nl.wireguard_device(dev.name)
        except (NetlinkError, UapiError) as e:
            raise BackendError(f"wireguard: cannot read {dev.name}: {e}") from e

    async def _set(self, dev: _Dev, update: WgUpdate) -> None:
        if not update:
            return
        try:
            if dev.impl == "userspace":
                assert dev.wg is not None
                await dev.wg.set(update)
            else:
                await self.nl.configure_wireguard(dev.name, update)
        except (NetlinkError, UapiError) as e:
            raise BackendError(f"wireguard: cannot configure {dev.name}: {e}") from e

    async def _create(self, dev: _Dev) -> Link:
        want = self.opts.implementation
        if want != "userspace" and not self._kernel_missing:
            try:
                link = await self.nl.create_wireguard(dev.name, mtu=self._mtu)
                dev.impl = "kernel"
                log.info("wireguard: created %s on the kernel's WireGuard", dev.name)
                return link
            except NetlinkError as e:
                if e.errno != errno.EOPNOTSUPP:
                    raise BackendError(f"wireguard: failed to create {dev.name}: {e}") from e
                if want == "kernel":
                    raise BackendError(
                        f"wireguard: {e}; Backend.Implementation is kernel (use auto or userspace for wireguard-go)"
                    ) from e
                self._kernel_missing = True
                log.warning("wireguard: the kernel has no WireGuard; falling back to wireguard-go (userspace)")
        if self.nl.netns is not None:
            raise BackendError("wireguard: wireguard-go must be started inside the node's network namespace")
        if WireguardGo.available() is None:
            raise BackendError(
                "wireguard: the kernel has no WireGuard and wireguard-go is not installed (apt-get install "
                "wireguard-go, or load the wireguard module)"
            )
        dev.wg = dev.wg or WireguardGo(dev.name)
        try:
            await dev.wg.start()
        except UapiError as e:
            raise BackendError(f"wireguard: {e}") from e
        tun = await self.nl.link_by_name(dev.name)
        if tun is None:
            await dev.wg.stop()
            raise BackendError(f"wireguard: wireguard-go started but {dev.name} does not exist")
        dev.impl = "userspace"
        log.info("wireguard: created %s on wireguard-go (userspace), pid %d", dev.name, dev.wg.pid)
        return tun

    def _adopt(self, dev: _Dev, link: Link) -> bool:
        """Whether `link` (already there) is a WireGuard device we can use as it is, noting its implementation."""
        want = self.opts.implementation
        if link.kind == "wireguard" and want != "userspace":
            dev.impl = "kernel"
            return True
        if link.kind == "tun" and want != "kernel":
            dev.wg = dev.wg or WireguardGo(dev.name)
            if dev.wg.alive() or dev.wg.adopt():
                if dev.impl != "userspace":
                    log.info("wireguard: reusing %s served by wireguard-go pid %d", dev.name, dev.wg.pid)
                dev.impl = "userspace"
                return True
        return False

    async def _ensure_device(self, dev: _Dev) -> bool:
        """The device exists with our MTU, key and port, addressed and routed once the lease is known; True when
        it was (re)created (it then holds no peers)."""
        assert self._key is not None and self._public is not None
        link = await self.nl.link_by_name(dev.name)
        created = False
        if link is not None and not self._adopt(dev, link):
            log.warning("%r already exists and is not a WireGuard device we can use (%s); recreating it",
                        dev.name, link.kind or "plain")  # fmt: skip
            await delete_device(self.nl, link)
            link = None
        if link is None:
            if dev.index:
                log.warning("wireguard: %s is gone; recreating it with all peers", dev.name)
            link = await self._create(dev)
            self.made_device(dev.name, link.index)
            created = True
        dev.index = link.index
        if link.mtu != self._mtu:
            try:
                await self.nl.set_mtu(link.index, self._mtu)
            except NetlinkError as e:
                raise BackendError(f"wireguard: failed to set MTU {self._mtu} on {dev.name}: {e}") from e
        state = await self._get(dev)
        if created or state.public_key != self._public or state.listen_port != dev.port:
            await self._set(dev, WgUpdate(private_key=self._key, listen_port=dev.port))
        own = self._own
        if own is None:
            return created
        ops = []
        for version in dev.versions:
            sn = own.subnet if version == 4 else own.ipv6_subnet
            network = self.cfg.network if version == 4 else self.cfg.ipv6_network
            if sn is None or network is None:
                continue
            addr = IPv4Interface((sn.network_address, 32)) if version == 4 else IPv6Interface((sn.network_address, 128))
            await configure_device(self.nl, link, addr)
            ops += self._owned.program(f"{dev.name}/{version}", [Route(dst=network, oif=link.index)])
        await apply_ops(self.nl, f"wireguard route via {dev.name}", ops)
        return created

    # ------------------------------------------------------------ peers

    def _endpoint(self, lease: Lease, dev: _Dev, port: int) -> tuple[IPAddress, int] | None:
        ip4, ip6 = lease.attrs.public_ip, lease.attrs.public_ipv6
        mode = self.opts.mode
        if mode == "separate":
            ip: IPv4Address | IPv6Address | None = ip4 if dev.versions == (4,) else ip6
        elif mode == "ipv4":
            ip = ip4
        elif mode == "ipv6":
            ip = ip6
        elif ip4 is not None and ip6 is None:
            ip = ip4
        elif ip4 is None:
            ip = ip6
        # auto, both known (upstream's choice): IPv4 when public; IPv6 when both ends have a public one.
        elif not _is_private(ip4) and self.ext.public_ip is not None:
            ip = ip4
        elif (
            ip6 is not None and not _is_private(ip6) and self.ext.public_ipv6 and not _is_private(self.ext.public_ipv6)
        ):
            ip = ip6
        else:
            ip = ip4
        return (ip, port) if ip is not None else None

    def _peer_for(self, lease: Lease, dev: _Dev, warn: bool) -> WgPeer | None:
        """`lease`'s peer on `dev`, or None (not a wireguard lease, or nothing usable: logged if warn)."""
        own = self._own
        if own is not None and lease.key == own.key:
            return None
        if lease.attrs.backend_type != BACKEND_TYPE:
            if warn:
                log.warning(
                    "ignoring non-wireguard subnet %s: type=%s", lease.key, lease.attrs.backend_type or "(none)"
                )
            return None
        subnets: list[IPNetwork] = []
        for v in dev.versions:
            sn = lease.subnet if v == 4 else lease.ipv6_subnet
            if sn is not None:
                subnets.append(sn)
        if not subnets:
            return None
        # Upstream takes the IPv6 data's key when IPv6 is on; both carry the same key.
        data = lease.attrs.backend_v6_data if 6 in dev.versions and self.cfg.enable_ipv6 else lease.attrs.backend_data
        if dev.versions == (4,):
            data = lease.attrs.backend_data
        key = _lease_key_of(data)
        if key is None:
            if warn:
                log.warning("wireguard: lease %s has no valid PublicKey in its backend data; skipping it", lease.key)
            return None
        if key == self._public:
            # WireGuard cannot have itself as a peer: two nodes were given one key file.
            if warn:
                log.warning("wireguard: lease %s advertises this node's own public key (do two nodes share a key "
                            "file?); skipping it", lease.key)  # fmt: skip
            return None
        endpoint = self._endpoint(lease, dev, _lease_port(data, dev.port))
        if endpoint is None:
            if warn:
                log.warning("wireguard: lease %s has no public IP for %s; skipping it", lease.key, dev.name)
            return None
        return WgPeer(key, endpoint, self.opts.keepalive, WgPeer.sort_ips(subnets), self.opts.psk)

    def _update_for(self, dev: _Dev, touched: Iterable[PublicKey]) -> WgUpdate:
        peers, remove = [], []
        for key in touched:
            p = dev.merged(key)
            if p is None:
                remove.append(key)
            else:
                peers.append(p)
        return WgUpdate(peers=tuple(peers), remove=tuple(remove))

    # ------------------------------------------------------------ the Backend API

    async def prepare(self) -> BackendAttrs:
        o = self.opts
        if self.cfg.enable_ipv4 and self.ext.public_ip is None:
            raise BackendError("wireguard: IPv4 is enabled but the external interface has no IPv4 address")
        if (self.cfg.enable_ipv6 or o.mode == "ipv6") and self.ext.public_ipv6 is None:
            raise BackendError(
                "wireguard: IPv6 is needed (EnableIPv6 or Mode ipv6) but the external interface has none"
            )
        self._load_key()
        async with self._lock:
            for dev in self.devs:
                await self._ensure_device(dev)
        assert self._public is not None
        pub = str(self._public)
        v4_port = o.listen_port
        v6_port = o.listen_port_v6 if o.mode == "separate" else o.listen_port
        log.info("wireguard: implementation %s; public key %s", self.implementation(), pub)
        return BackendAttrs(
            backend_type=BACKEND_TYPE,
            backend_data={"PublicKey": pub, "Port": v4_port} if self.cfg.enable_ipv4 else None,
            backend_v6_data={"PublicKey": pub, "Port": v6_port} if self.cfg.enable_ipv6 else None,
            mtu=self._mtu,
        )

    async def start(self, own: Lease) -> None:
        async with self._lock:
            self._own = own
            for dev in self.devs:
                await self._ensure_device(dev)

    async def add_peers(self, leases: Sequence[Lease]) -> None:
        async with self._lock:
            touched: dict[str, set[PublicKey]] = {d.name: set() for d in self.devs}
            for lease in leases:
                self._leases[lease.key] = lease
                for dev in self.devs:
                    peer = self._peer_for(lease, dev, warn=True)
                    touched[dev.name] |= dev.set_spec(lease.key, peer)
                    if peer is not None and peer.endpoint is not None:
                        subnets = " ".join(map(str, peer.allowed_ips))
                        via = format_endpoint(peer.endpoint)
                        log.info("wireguard: subnet(s) %s via %s on %s", subnets, via, dev.name)
            for dev in self.devs:
                await self._set(dev, self._update_for(dev, touched[dev.name]))

    async def remove_peer(self, lease: Lease) -> None:
        async with self._lock:
            self._leases.pop(lease.key, None)
            for dev in self.devs:
                touched = dev.set_spec(lease.key, None)
                if not touched:
                    # Not programmed by this process (before a restart): remove exactly the lease's own peer.
                    peer = self._peer_for(lease, dev, warn=False)
                    if peer is not None and peer.public_key not in dev.by_key:
                        touched = {peer.public_key}
                await self._set(dev, self._update_for(dev, touched))

    async def _sync(self, dev: _Dev) -> int:
        """Make `dev` hold exactly the peers the leases want; the number of peers changed."""
        assert self._public is not None and self._key is not None
        state = await self._get(dev)
        want = dev.desired()
        have = {p.public_key: p for p in state.peers}
        upsert = tuple(p for k, p in want.items() if have.get(k) != p)
        remove = tuple(k for k in have if k not in want)
        ident = state.public_key != self._public or state.listen_port != dev.port
        update = WgUpdate(
            private_key=self._key if ident else None,
            listen_port=dev.port if ident else None,
            peers=upsert,
            remove=remove,
        )
        await self._set(dev, update)
        return len(upsert) + len(remove)

    async def reconcile(self, peers: Sequence[Lease]) -> None:
        async with self._lock:
            self._leases = {lease.key: lease for lease in peers}
            for dev in self.devs:
                await self._ensure_device(dev)
                dev.specs.clear()
                dev.by_key.clear()
                for lease in peers:
                    dev.set_spec(lease.key, self._peer_for(lease, dev, warn=False))
                n = await self._sync(dev)
                if n:
                    log.info("wireguard reconcile: %d peer changes on %s", n, dev.name)
            self._synced = True

    async def run(self) -> None:
        """Supervise wireguard-go (restart it with every peer when it dies) and restore WireGuard settings changed
        by hand, which the kernel does not announce."""
        restarts = Backoff(RESTART_PAUSE_MIN, RESTART_PAUSE_MAX)
        while True:
            waits = [
                asyncio.ensure_future(d.wg.wait_exit()) for d in self.devs if d.impl == "userspace" and d.wg is not None
            ]
            exited = False
            try:
                if waits:
                    done, _ = await asyncio.wait(waits, timeout=CHECK_INTERVAL, return_when=asyncio.FIRST_COMPLETED)
                    exited = bool(done)
                else:
                    await asyncio.sleep(CHECK_INTERVAL)
            finally:
                for w in waits:
                    w.cancel()
            if exited:
                # A wireguard-go that dies again right after each restart (a cause that persists) is restarted
                # with growing pauses, never in a tight loop.
                await asyncio.sleep(restarts.next())
            else:
                restarts.reset()
            await self._check()

    async def _check(self) -> None:
        async with self._lock:
            for dev in self.devs:
                try:
                    if dev.impl == "userspace" and dev.wg is not None and not dev.wg.alive():
                        log.warning("wireguard: wireguard-go for %s (pid %d) has exited; restarting it",
                                    dev.name, dev.wg.pid)  # fmt: skip
                    await self._ensure_device(dev)
                    if self._synced:
                        n = await self._sync(dev)
                        if n:
                            log.warning("wireguard: %s had lost or changed %d peers; restored", dev.name, n)
                            self.observer.kernel_repair("wireguard_peer", n)
                except BackendError as e:
                    log.warning("wireguard: repair of %s failed, will retry: %s", dev.name, e)

    def kernel_event_needs_repair(self, ev: KernelEvent) -> bool:
        if ev.kind == "resync":
            return True
        obj = ev.obj
        if isinstance(obj, Link):
            return any(device_event_needs_repair(ev, d.name, d.index) for d in self.devs)
        if isinstance(obj, Route) and obj.table == RT_TABLE_MAIN:
            return self._owned.verdict(ev) is True
        return False

    async def close(self) -> None:
        # The data plane stays, wireguard-go included: pods keep talking while the agent restarts, and the next
        # agent adopts the devices (and the processes) as they are. Unless this run never got a lease
        # (Backend.remove_half_built): the devices it made go, and so do the wireguard-go processes it started
        # for them (deleting its TUN makes wireguard-go exit; stop() reaps it, or kills it if it lingers).
        half_built = await self.remove_half_built(self._own)
        for dev in self.devs:
            if dev.wg is None:
                continue
            if dev.name in half_built:
                await dev.wg.stop()
            else:
                dev.wg.close()

    async def figures(self) -> list[Figure]:
        """Per device: its peers, those with a handshake in the last 180 s (WireGuard's REJECT_AFTER_TIME: a
        session older than that is dead), and the bytes they carried. A device that cannot be read is left out."""
        out: list[Figure] = []
        now = time.time()
        for d in self.devs:
            try:
                wg = await self._get(d) if d.impl else None
            except BackendError:
                continue
            if wg is None:
                continue
            dev = (("device", d.name),)
            recent = sum(1 for p in wg.peers if p.last_handshake and now - p.last_handshake < 180)
            out += [
                Figure("wireguard_peers", "Peers a WireGuard device holds", "gauge", len(wg.peers), dev),
                Figure("wireguard_peers_with_handshake", "Peers with a handshake in the last 180 s", "gauge",
                       recent, dev),
                Figure("wireguard_received_bytes_total", "Bytes received from the device's peers", "counter",
                       sum(p.rx_bytes for p in wg.peers), dev),
                Figure("wireguard_sent_bytes_total", "Bytes sent to the device's peers", "counter",
                       sum(p.tx_bytes for p in wg.peers), dev),
            ]  # fmt: skip
        return out

    async def inspect(self, peers: Sequence[Lease]) -> KernelView:
        """A peer's entry is its WireGuard peer on each device (key, endpoint, allowed IPs, keepalive, whether a
        PSK is set: never the PSK), compared with what the device holds now; the node's own are the devices'
        Network routes. A device that cannot be read holds nothing."""

        def line(dev: str, p: WgPeer) -> str:
            ep = format_endpoint(p.endpoint) if p.endpoint else "(none)"
            ips = ",".join(str(ip) for ip in p.allowed_ips)
            psk = " psk" if p.psk is not None else ""
            return f"wireguard {dev} peer {p.public_key} endpoint {ep} allowed-ips {ips} keepalive {p.keepalive}{psk}"

        want: dict[str, list[str]] = {lease.key: [] for lease in peers}
        held: list[str] = []
        async with self._lock:
            for d in self.devs:
                for lease in peers:
                    spec = d.specs.get(lease.key)
                    merged = d.merged(spec.public_key) if spec is not None else None
                    if merged is not None:
                        want[lease.key].append(line(d.name, merged))
                try:
                    state = await self._get(d) if d.impl else None
                except BackendError:
                    state = None
                held += [line(d.name, p) for p in state.peers] if state is not None else []
            routes = [r for _, rs in self._owned.items() for r in rs]
        names = await device_names(self.nl)
        kernel = {r for fam in {_family_of(r) for r in routes} for r in (await self.nl.snapshot(fam)).routes}
        return kernel_view(
            want,
            held,
            own=[describe(r, names) for r in routes],
            held_own=[describe(r, names) for r in routes if r in kernel],
        )

    async def peers(self) -> dict[str, WgDevice]:
        """What each device holds now (for the lab's `show`)."""
        return {d.name: await self._get(d) for d in self.devs if d.impl}


def _family_of(r: Route | Neigh | Fdb) -> int:
    assert isinstance(r, Route)
    return AF_INET if r.dst.version == 4 else AF_INET6


BACKEND = WireguardBackend
