"""ipsec: pod traffic in ESP tunnels between the nodes' public IPs, as upstream flannel's `pkg/backend/ipsec`.

Options (upstream's): PSK (required, at least 96 characters), UDPEncap (false: ESP in UDP 4500 when true),
ESPProposal (aes128gcm16-sha256-prfsha256-ecp256, checked against strongSwan's keywords), CharonViciUri (an
existing charon's VICI socket, `unix:///path`: the agent then starts none) and CharonExecutablePath.
Our lease: BackendType "ipsec", no BackendData (upstream's). MTU = the external interface's - 77 (- 8 more with
UDPEncap), upstream's overhead; subnet.env carries it. No device and no route: a pod's packet to another node's
subnet follows the node's default route, and the out policy tunnels it.

Per peer (an ipsec lease other than ours): three xfrm policies that the agent installs itself (reqid 11, upstream's):
out  <our subnet> -> <peer subnet> tmpl src <our PublicIP> dst <peer PublicIP> proto esp mode tunnel,
in and fwd <peer subnet> -> <our subnet> tmpl src <peer PublicIP> dst <our PublicIP>; and in charon the PSK for
the two PublicIPs and one connection `<our IP>-<our subnet>-<peer subnet>-<peer IP>` (child `<our subnet>-<peer
subnet>`), tunnel mode, with `policies = no`. The policies go in before charon is told, and stay while an SA is
missing: the kernel then drops (and asks charon for an SA) rather than sending in clear. So charon must not own
them: its policies would come and go with its SAs and with charon itself.

Both ends would initiate (upstream's), giving each pair two IKE_SAs and two CHILD_SAs; here only the end with the
lower PublicIP initiates (start_action start, close_action start, dpd_action restart, retrying forever) and the other
responds only. When the responder's charon restarts, its peer still holds the old IKE_SA and would learn of the loss
only by DPD; so the periodic check has the responder initiate a connection that has had no established SA for
RESPONDER_PATIENCE checks in a row (the initiator's `unique = replace` drops the stale one). Meanwhile the kernel
keeps the SAs the old charon installed, so traffic goes on.

charon: started as a child in the node's network namespace with a private /run (backend/charon.py), supervised by
run(): restarted when it exits (growing pauses while it keeps dying), then given every key and connection again.
It outlives the agent, as a kernel device would, so an agent restart costs no SA.

Repairs: every CHECK_INTERVAL seconds run() compares the policies (the kernel announces none of their changes on
the route monitor) and charon's keys and connections with the leases: what is missing comes back, what no lease
asks for (of ours: reqid 11 ESP templates inside the Network) is swept.

Secrets: the PSK is a _Secret: its repr and str are `(redacted)`; it leaves the agent only inside load-shared.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..backoff import Backoff
from ..config import NetConfig
from ..lease import Lease
from ..netlink import IPNetwork, Netlink, NetlinkError
from ..netlink.xfrm import IPPROTO_ESP, XFRM_MODE_TUNNEL, Xfrm, XfrmPolicy, tunnel_policies
from .base import Backend, BackendAttrs, BackendError, Entries, ExternalInterface, KernelView
from .charon import Charon, CharonError, ConnSpec, Vici, ViciError, check_proposal, find_charon
from .options import opt_bool, opt_str

log = logging.getLogger(__name__)

BACKEND_TYPE = "ipsec"
DEFAULT_ESP_PROPOSAL = "aes128gcm16-sha256-prfsha256-ecp256"
MIN_PSK = 96
REQID = 11
# New IP header 20, ESP header 8, IV 16, padding up to 15, trailer 2, ICV 16: upstream's 77; UDP 8 more.
OVERHEAD = 77
UDP_ENCAP_OVERHEAD = 8
CHECK_INTERVAL = 5.0
RESTART_PAUSE_MIN = 0.5
RESTART_PAUSE_MAX = 30.0
# Checks in a row without an established SA after which the responder end initiates itself.
RESPONDER_PATIENCE = 3


class _Secret:
    """The PSK: never printed (repr and str are redacted), revealed only to build the load-shared request."""

    __slots__ = ("_v",)

    def __init__(self, v: str) -> None:
        self._v = v

    def reveal(self) -> str:
        return self._v

    def __repr__(self) -> str:
        return "_Secret(redacted)"

    __str__ = __repr__

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("the PSK is not serialisable")


@dataclass(frozen=True)
class IpsecOptions:
    psk: _Secret
    udp_encap: bool
    esp_proposal: str
    vici_uri: str
    charon_path: str


def parse_options(cfg: NetConfig) -> IpsecOptions:
    """net-conf.json's Backend options, checked; BackendError naming the key, never the PSK's value."""
    raw = cfg.backend.get("PSK")
    if raw is None or raw == "":
        raise BackendError(f"ipsec: Backend.PSK is required (a shared key of at least {MIN_PSK} characters)")
    if not isinstance(raw, str):
        raise BackendError("ipsec: Backend.PSK: expected a string")
    if len(raw) < MIN_PSK:
        raise BackendError(f"ipsec: Backend.PSK is too short: {len(raw)} characters, at least {MIN_PSK} needed")
    esp = opt_str(cfg, "ESPProposal", DEFAULT_ESP_PROPOSAL)
    why = check_proposal(esp)
    if why is not None:
        raise BackendError(f"ipsec: Backend.ESPProposal is not a strongSwan ESP proposal: {why}")
    uri = opt_str(cfg, "CharonViciUri", "")
    if uri and not uri.startswith("unix://"):
        raise BackendError("ipsec: Backend.CharonViciUri: only unix:///path sockets are supported")
    return IpsecOptions(
        psk=_Secret(raw),
        udp_encap=opt_bool(cfg, "UDPEncap", False),
        esp_proposal=esp,
        vici_uri=uri,
        charon_path=opt_str(cfg, "CharonExecutablePath", ""),
    )


@dataclass
class _Peer:
    """What one lease asks for: its three policies, its key and its connection."""

    lease_key: str
    policies: tuple[XfrmPolicy, ...]
    key_id: str
    owners: tuple[str, str]
    conn: ConnSpec
    missed: int = 0  # checks in a row without an established SA (the responder's patience)


@dataclass
class _State:
    peers: dict[str, _Peer] = field(default_factory=dict)  # by lease key


def _ours(p: XfrmPolicy, network: IPNetwork | None) -> bool:
    """A policy this backend makes: one tunnel-mode ESP template of reqid 11, selectors inside the Network."""
    if network is None or len(p.tmpls) != 1:
        return False
    t = p.tmpls[0]
    if t.reqid != REQID or t.proto != IPPROTO_ESP or t.mode != XFRM_MODE_TUNNEL:
        return False
    return p.src.version == network.version and p.src.subnet_of(network) and p.dst.subnet_of(network)  # type: ignore[arg-type]


class IpsecBackend(Backend):
    backend_type = BACKEND_TYPE

    @classmethod
    def check_config(cls, cfg: NetConfig) -> None:
        parse_options(cfg)
        if cfg.enable_ipv6:
            raise BackendError("ipsec: IPv6 is not supported (upstream's ipsec backend is IPv4 only)")

    def __init__(self, cfg: NetConfig, ext: ExternalInterface, nl: Netlink) -> None:
        super().__init__(cfg, ext, nl)
        self.opts = o = parse_options(cfg)
        self._binary = ""
        if not o.vici_uri:
            found = find_charon(o.charon_path)
            if found is None:
                where = o.charon_path or "PATH and upstream's well-known paths"
                raise BackendError(
                    f"ipsec: charon (strongSwan's IKE daemon) not found in {where}: apt-get install strongswan-charon "
                    "strongswan-swanctl libstrongswan-standard-plugins"
                )
            self._binary = found
        try:
            import vici  # noqa: F401
        except ImportError:
            raise BackendError(
                "ipsec: the Python package `vici` (strongSwan's VICI binding) is not installed"
            ) from None
        self._mtu = ext.mtu - OVERHEAD - (UDP_ENCAP_OVERHEAD if o.udp_encap else 0)
        self._charon: Charon | None = None if o.vici_uri else Charon(self._binary)
        self._xfrm = Xfrm(nl)
        self._own: Lease | None = None
        self._state = _State()
        self._synced = False
        self._lock = asyncio.Lock()
        log.info("IPSec config: UDPEncap=%s ESPProposal=%s charon=%s", o.udp_encap, o.esp_proposal,
                 o.vici_uri or self._binary)  # fmt: skip

    # ------------------------------------------------------------ charon

    def _vici(self) -> Vici:
        if self._charon is None:
            return Vici(self.opts.vici_uri[len("unix://") :])
        return self._charon.vici()

    async def _ensure_charon(self) -> bool:
        """Start (or adopt) our charon if it is not running; True if it is new to this process (so it needs every
        key and connection)."""
        c = self._charon
        if c is None:
            return False
        if c.alive():
            return False
        if c.adopt():
            log.info("ipsec: adopted the running charon (pid %d)", c.pid)
            return True
        try:
            await c.start()
        except CharonError as e:
            raise BackendError(f"ipsec: {e}") from None
        log.info("ipsec: started charon (pid %d)", c.pid)
        return True

    def status(self) -> str:
        if self._charon is None:
            return f"ipsec: charon at {self.opts.vici_uri}"
        return f"ipsec: charon pid {self._charon.pid}" if self._charon.pid else "ipsec: charon not running"

    # ------------------------------------------------------------ peers

    def _peer_for(self, lease: Lease, warn: bool) -> _Peer | None:
        own = self._own
        if own is None or lease.key == own.key:
            return None
        if lease.attrs.backend_type != BACKEND_TYPE:
            if warn:
                log.warning("ignoring non-ipsec subnet %s: type=%s", lease.key, lease.attrs.backend_type or "(none)")
            return None
        mine, theirs = own.attrs.public_ip, lease.attrs.public_ip
        if mine is None or theirs is None or lease.subnet is None or own.subnet is None:
            if warn:
                log.warning("ipsec: lease %s has no public IPv4 address or subnet; skipping it", lease.key)
            return None
        if theirs == mine:
            if warn:
                log.warning("ipsec: lease %s has this node's own PublicIP %s; skipping it", lease.key, mine)
            return None
        policies = tunnel_policies(own.subnet, lease.subnet, mine, theirs, REQID)
        conn = ConnSpec(
            name=f"{mine}-{own.subnet}-{lease.subnet}-{theirs}",
            child=f"{own.subnet}-{lease.subnet}",
            local_ip=str(mine),
            remote_ip=str(theirs),
            local_ts=(str(own.subnet),),
            remote_ts=(str(lease.subnet),),
            esp_proposal=self.opts.esp_proposal,
            reqid=REQID,
            encap=self.opts.udp_encap,
            initiator=int(mine) < int(theirs),
        )
        return _Peer(lease.key, policies, f"flannel-{theirs}", (str(mine), str(theirs)), conn)

    def _conn_prefix(self) -> str:
        own = self._own
        assert own is not None
        return f"{own.attrs.public_ip}-{own.subnet}-"

    async def _program(self, peer: _Peer) -> None:
        errors = await self._xfrm.apply(update=peer.policies)
        if errors:
            raise BackendError(f"ipsec: policies for {peer.lease_key}: {errors[0]}")
        v = self._vici()
        try:
            await v.load_shared(peer.key_id, self.opts.psk.reveal(), peer.owners)
            await v.load_conn(peer.conn)
        except ViciError as e:
            raise BackendError(f"ipsec: {e}") from None
        log.info("ipsec: tunnel %s -> %s via %s (%s)", peer.conn.local_ts[0], peer.conn.remote_ts[0],
                 peer.conn.remote_ip, "initiator" if peer.conn.initiator else "responder")  # fmt: skip

    async def _unprogram(self, peer: _Peer) -> None:
        v = self._vici()
        problems: list[str] = []
        for what, call in (("connection", v.unload_conn(peer.conn.name)), ("key", v.unload_shared(peer.key_id))):
            try:
                await call
            except ViciError as e:
                problems.append(f"{what}: {e}")
        errors = await self._xfrm.apply(delete=peer.policies)
        problems += [str(e) for e in errors]
        log.info("ipsec: removed the tunnel to %s (%s)", peer.conn.remote_ts[0], peer.conn.remote_ip)
        if problems:
            raise BackendError(f"ipsec: removal of {peer.lease_key}: {'; '.join(problems)}")

    # ------------------------------------------------------------ the Backend API

    async def prepare(self) -> BackendAttrs:
        if self.ext.public_ip is None:
            raise BackendError("ipsec: the external interface has no IPv4 address")
        if self._mtu < 68:
            raise BackendError(f"ipsec: MTU {self.ext.mtu} leaves {self._mtu} after IPsec's overhead")
        async with self._lock:
            await self._ensure_charon()
            try:
                log.info("ipsec: charon %s", await self._vici().version())
            except ViciError as e:
                raise BackendError(f"ipsec: {e}") from None
        return BackendAttrs(backend_type=BACKEND_TYPE, backend_data=None, backend_v6_data=None, mtu=self._mtu)

    async def start(self, own: Lease) -> None:
        self._own = own

    async def add_peers(self, leases: Sequence[Lease]) -> None:
        async with self._lock:
            for lease in leases:
                peer = self._peer_for(lease, warn=True)
                old = self._state.peers.pop(lease.key, None)
                if old is not None and (peer is None or old.conn != peer.conn):
                    await self._unprogram(old)
                if peer is not None:
                    self._state.peers[lease.key] = peer
                    await self._program(peer)

    async def remove_peer(self, lease: Lease) -> None:
        async with self._lock:
            peer = self._state.peers.pop(lease.key, None) or self._peer_for(lease, warn=False)
            if peer is not None:
                await self._unprogram(peer)

    async def reconcile(self, peers: Sequence[Lease]) -> None:
        async with self._lock:
            new = await self._ensure_charon()
            old = self._state.peers
            self._state.peers = {}
            for lease in peers:
                p = self._peer_for(lease, warn=False)
                if p is not None:
                    prev = old.get(lease.key)
                    p.missed = prev.missed if prev is not None else 0
                    self._state.peers[lease.key] = p
            n = await self._sync(reload=new)
            if n:
                log.info("ipsec reconcile: %d changes", n)
            self._synced = True

    async def _sync(self, reload: bool) -> int:
        """Make the kernel's policies and charon's keys and connections exactly what the leases want; the number
        of changes. `reload`: charon is new, give it everything."""
        want = {p.key: p for peer in self._state.peers.values() for p in peer.policies}
        have = await self._xfrm.policies()
        ours = [p for p in have if _ours(p, self.cfg.network)]
        held = {p.key: p for p in have}
        delete = [p for p in ours if p.key not in want]
        update = [p for k, p in want.items() if held.get(k) != p]
        errors = await self._xfrm.apply(update=update, delete=delete)
        if errors:
            raise BackendError(f"ipsec: policy sync: {errors[0]}")
        changes = len(delete) + len(update)
        v = self._vici()
        try:
            conns = await v.conns()
            keys = await v.shared_ids()
            prefix = self._conn_prefix()
            names = {peer.conn.name for peer in self._state.peers.values()}
            ids = {peer.key_id for peer in self._state.peers.values()}
            for name in sorted(c for c in conns if c.startswith(prefix) and c not in names):
                await v.unload_conn(name)
                changes += 1
            for kid in sorted(k for k in keys if k.startswith("flannel-") and k not in ids):
                await v.unload_shared(kid)
                changes += 1
            for peer in self._state.peers.values():
                if reload or peer.key_id not in keys:
                    await v.load_shared(peer.key_id, self.opts.psk.reveal(), peer.owners)
                    changes += 0 if reload else 1
                if reload or peer.conn.name not in conns:
                    await v.load_conn(peer.conn)
                    changes += 0 if reload else 1
        except ViciError as e:
            raise BackendError(f"ipsec: {e}") from None
        return changes

    async def run(self) -> None:
        """Supervise charon (restart it, and give it every key and connection, when it exits) and restore the
        policies and charon's configuration, which announce no change."""
        restarts = Backoff(RESTART_PAUSE_MIN, RESTART_PAUSE_MAX)
        while True:
            c = self._charon
            exited = False
            if c is not None and c.pid:
                wait = asyncio.ensure_future(c.wait_exit())
                try:
                    done, _ = await asyncio.wait([wait], timeout=CHECK_INTERVAL)
                    exited = bool(done)
                finally:
                    wait.cancel()
            else:
                await asyncio.sleep(CHECK_INTERVAL)
            if exited:
                # A charon that dies again right after each restart is restarted with growing pauses.
                log.warning("ipsec: charon (pid %d) has exited; restarting it", c.pid if c else 0)
                await asyncio.sleep(restarts.next())
            else:
                restarts.reset()
            await self._check()

    async def _check(self) -> None:
        async with self._lock:
            try:
                new = await self._ensure_charon()
                if not self._synced:
                    return
                n = await self._sync(reload=new)
                if n:
                    log.warning("ipsec: %d policies, keys or connections were missing or stale; restored", n)
                    self.observer.kernel_repair("ipsec", n)
                await self._kick_responders()
            except BackendError as e:
                log.warning("ipsec: check failed, will retry: %s", e)

    async def _kick_responders(self) -> None:
        v = self._vici()
        try:
            sas = await v.sas(any_state=True)
        except ViciError as e:
            raise BackendError(f"ipsec: {e}") from None
        for peer in self._state.peers.values():
            # Any IKE_SA for the connection, even one still being negotiated, counts: initiating beside it would
            # make a second one.
            up = peer.conn.name in sas
            peer.missed = 0 if up else peer.missed + 1
            if not up and not peer.conn.initiator and peer.missed >= RESPONDER_PATIENCE:
                log.info("ipsec: no SA with %s for %d checks; initiating from this end", peer.conn.remote_ip,
                         peer.missed)  # fmt: skip
                peer.missed = 0
                try:
                    await v.initiate(peer.conn.name, peer.conn.child)
                except ViciError as e:
                    log.warning("ipsec: %s", e)

    async def close(self) -> None:
        # charon and the policies stay: the SAs keep carrying the pods' traffic while the agent restarts, and the
        # next agent adopts charon as it is.
        if self._charon is not None:
            self._charon.close()
        await self._xfrm.close()

    async def inspect(self, peers: Sequence[Lease]) -> KernelView:
        """A peer's entries are its three policies (as `ip xfrm policy` lines) and its IKE_SA, compared with the
        kernel and charon now; unexpected: our kind of policy that no lease asks for."""
        async with self._lock:
            want: dict[str, list[str]] = {}
            for lease in peers:
                p = self._state.peers.get(lease.key) or self._peer_for(lease, warn=False)
                want[lease.key] = (
                    [str(x) for x in p.policies] + [f"ike {p.conn.name} child {p.conn.child}"] if p else []
                )
            try:
                have = await self._xfrm.policies()
            except NetlinkError:
                have = []
            try:
                sas = await self._vici().sas()
            except ViciError:
                sas = {}
        held = [str(p) for p in have if _ours(p, self.cfg.network)]
        held += [f"ike {name} child {child}" for name, kids in sas.items() for child in kids]
        have_set = set(held)
        wanted = {x for lines in want.values() for x in lines}
        return KernelView(
            peers={k: Entries(tuple(x for x in v if x in have_set), tuple(x for x in v if x not in have_set))
                   for k, v in want.items()},
            unexpected=tuple(sorted(x for x in have_set if x not in wanted and not x.startswith("ike "))),
        )  # fmt: skip


BACKEND = IpsecBackend
