"""The etcd v3 store, wire-compatible with upstream flannel's etcd subnet manager.

Keys: `<prefix>/config` (net-conf.json) and `<prefix>/subnets/<ip>-<len>[&<ip6>-<len6>]` (lease JSON), each
lease key bound to an etcd lease of TTL `lease_ttl`; a key without an etcd lease is a reservation and stays
one (upstream issue 1329 turns reservations into TTL leases on restart and so loses them; we never do).

etcd is reached through its JSON gateway (etcdclient.py, on the store's own HTTP/1.1 transport), one member at a
time. Every broken or cancelled watch is followed by a full re-list and a fresh LeaseSnapshot, so the consumer's
view converges whatever was missed. The first watch needs no list of its own: the acquire's list (at revision R),
with our own write applied, is the first snapshot and the watch starts at R + 1, so every change after that list
(our write included, which the consumer knows as its own) arrives as an event; with thousands of leases a second
list was a tenth of a cold start. And that list is asked for as soon as the config is read: etcd answers it while
the agent sets up its interface and backend, which need no store (a stale list costs at most a lost race, which
the acquire's compare-and-set writes detect, and a retry lists afresh).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import re
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from ..backoff import Backoff
from ..config import ConfigError, NetConfig, parse_net_config, read_config_file
from ..lease import (
    EventType,
    Lease,
    LeaseAttrs,
    LeaseError,
    LeaseEvent,
    LeaseSnapshot,
    WatchUpdate,
    parse_subnet_key,
)
from ..subnetenv import SubnetEnv
from .allocate import Taken, find_own_leases, pick_subnets
from .base import LeaseRevokedError, Store, StoreError
from .etcdclient import (
    OUT_OF_RANGE,
    PERMISSION_DENIED,
    UNAUTHENTICATED,
    EtcdApiError,
    EtcdClient,
    EtcdUnavailableError,
    Event,
    Range,
    compare_mod,
    compare_version,
    op_delete,
    op_put,
    prefix_range_end,
    tls_context,
)
from .options import EtcdOptions

__all__ = ["EtcdOptions", "EtcdStore", "EtcdUnavailableError"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Lost races (another node created the same key first) before acquire gives up; each retry re-lists.
MAX_ACQUIRE_RACES = 10
# Leases per page of a list (see EtcdStore._list), and how often a list whose revision was compacted between its
# pages starts again.
LIST_PAGE = 1000
LIST_RESTARTS = 3


class _Compacted(Exception):
    """A list's later page asked for a revision that etcd has compacted meanwhile."""


@dataclass(frozen=True)
class _Endpoint:
    host: str
    port: int
    tls: bool


_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?")
_ENDPOINT_EXAMPLE = "expected http://HOST:PORT or https://HOST:PORT (or HOST:PORT), e.g. http://10.0.0.2:2379"


def _parse_endpoint(url: str) -> _Endpoint:
    """One --etcd-endpoints entry. Anything that cannot name an etcd server is refused here, at start-up: a name
    that merely does not resolve yet is retried later, a string that is no endpoint at all would be retried
    forever."""
    text = url.strip()
    bare = "://" not in text
    if bare:
        text = "http://" + text  # etcd's client takes HOST:PORT too
    try:
        u = urlsplit(text)
        port = u.port
    except ValueError as e:
        raise StoreError(f"bad etcd endpoint {url!r}: {e}; {_ENDPOINT_EXAMPLE}") from None
    if u.scheme not in ("http", "https"):
        raise StoreError(f"bad etcd endpoint {url!r}: scheme must be http or https")
    if not u.hostname:
        raise StoreError(f"bad etcd endpoint {url!r}: no host; {_ENDPOINT_EXAMPLE}")
    if bare and port is None:
        raise StoreError(f"bad etcd endpoint {url!r}: {_ENDPOINT_EXAMPLE}")
    if port == 0:
        raise StoreError(f"bad etcd endpoint {url!r}: port 0")
    if u.username is not None or u.password is not None:
        # Named without its user information: the password must not reach the log.
        shown = u._replace(netloc=u.netloc.rpartition("@")[2]).geturl()
        raise StoreError(f"bad etcd endpoint {shown!r}: credentials go in --etcd-username and --etcd-password")
    if u.path not in ("", "/") or u.query or u.fragment:
        raise StoreError(f"bad etcd endpoint {url!r}: a path, query or fragment; {_ENDPOINT_EXAMPLE}")
    if _literal_ip(u.hostname) is None and not _HOSTNAME.fullmatch(u.hostname):
        raise StoreError(f"bad etcd endpoint {url!r}: {u.hostname!r} is not a host name or IP address")
    return _Endpoint(host=u.hostname, port=port or 2379, tls=u.scheme == "https")


def _literal_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _read(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        return read_config_file(path, f"etcd {what}")
    except ConfigError as e:
        raise StoreError(str(e)) from None


@dataclass(frozen=True)
class _Listing:
    """The leases as the acquire listed them at `revision`, with its own writes applied (the keys it deleted gone,
    our lease as written): the first watch's snapshot, from which the watch goes on at `revision` + 1."""

    leases: dict[str, Lease]
    revision: int


@dataclass
class _Entry:
    """One key under <prefix>/subnets/ as listed: what it holds and the handles needed to change it safely."""

    key: str
    mod_revision: int
    etcd_lease: int
    lease: Lease | None
    taken: Taken | None


def _translate(e: EtcdApiError) -> StoreError:
    """An error answer as the store reports it: EtcdUnavailableError when a retry (elsewhere) may help."""
    return EtcdUnavailableError(str(e)) if e.retryable else StoreError(str(e))


@dataclass
class _Member:
    """One --etcd-endpoints entry. The store talks to one member at a time over its own channel and moves to the
    next one when that member fails a call or its watch goes silent (see EtcdStore._failover)."""

    ep: _Endpoint
    conn: EtcdClient | None = None
    # Whether this member has answered a watch liveness probe (see EtcdStore._stream).
    answers_probes: bool = False

    @property
    def label(self) -> str:
        host = f"[{self.ep.host}]" if ":" in self.ep.host else self.ep.host
        return f"{host}:{self.ep.port}"


class EtcdStore(Store):
    name = "etcd"

    def __init__(self, opts: EtcdOptions) -> None:
        if not opts.endpoints:
            raise StoreError("no etcd endpoints given")
        self._eps = [_parse_endpoint(e) for e in opts.endpoints]
        if len({e.tls for e in self._eps}) > 1:
            raise StoreError("etcd endpoints mix http and https")
        if opts.lease_ttl <= 0:
            raise StoreError(f"lease TTL must be positive, got {opts.lease_ttl}")
        if not 0 < opts.renew_margin < opts.lease_ttl:
            raise StoreError(f"lease renew margin must be between 1 and {opts.lease_ttl - 1} s")
        if bool(opts.keyfile) != bool(opts.certfile):
            raise StoreError("--etcd-keyfile and --etcd-certfile must be given together")
        if opts.password and not opts.username:
            raise StoreError("an etcd password without a username")
        # Read now so that a wrong path or an unusable file is reported at start-up, not at the first call.
        ca = _read(opts.cafile, "CA file")
        key = _read(opts.keyfile, "key file")
        cert = _read(opts.certfile, "certificate file")
        self._ssl: ssl.SSLContext | None = None
        if self._eps[0].tls or opts.cafile or opts.certfile:
            self._ssl = tls_context(ca, cert, key)
        self._opts = opts
        self._prefix = opts.prefix.rstrip("/")
        self._config_key = f"{self._prefix}/config"
        self._subnets = f"{self._prefix}/subnets/"
        self._subnets_end = prefix_range_end(self._subnets.encode())
        self._members = [_Member(ep) for ep in self._eps]
        # Nodes start on different members, as a round-robin balancer would spread them.
        self._cur = random.randrange(len(self._members))
        self._closed = False
        self._token: str | None = None
        # The last successful acquire's list, kept for the first watch (see the module docstring).
        self._listing: _Listing | None = None
        # The list asked for once the config was read, for the acquire that follows (see the module docstring).
        self._prefetch: asyncio.Task[tuple[list[_Entry], int]] | None = None

    # --- connection -------------------------------------------------------------------------------------

    @property
    def prefix(self) -> str:
        return self._prefix

    def subnet_key(self, lease: Lease) -> str:
        """The full etcd key of a lease."""
        return self._subnets + lease.key

    def renew_at(self, lease: Lease) -> float | None:
        """Unix time at which `lease` should be renewed; None for a reservation (never expires)."""
        if lease.expiration is None:
            return None
        return lease.expiration - self._opts.renew_margin

    def _connect_now(self, member: _Member) -> EtcdClient:
        """`member`'s client (it connects at the first call)."""
        conn = EtcdClient(member.ep.host, member.ep.port, label=member.label, tls=self._ssl)
        conn.token = self._token
        member.conn = conn
        log.info("etcd: using member %s (%d of %d endpoints)", member.label, self._cur + 1, len(self._members))
        return conn

    async def _connect(self) -> tuple[_Member, EtcdClient]:
        """The member in use and its connection."""
        if self._closed:
            raise EtcdUnavailableError("etcd client is closed")
        member = self._members[self._cur]
        conn = member.conn or self._connect_now(member)
        return member, conn

    def _failover(self, member: _Member, why: str) -> None:
        """`member` failed a call or went silent: drop its connection (a half-open TCP connection to a cut-off
        member would hang the next call too) and move to the next endpoint. A no-op when an earlier failure
        already moved on."""
        if self._members[self._cur] is not member:
            return
        if len(self._members) > 1:
            self._cur = (self._cur + 1) % len(self._members)
            log.warning("etcd: member %s failed (%s); moving to %s", member.label, why, self._members[self._cur].label)
        self._drop(member)

    def _drop(self, member: _Member) -> None:
        conn, member.conn = member.conn, None
        if conn is not None:
            # Closing fails the calls still open on it at once (a watch stream there ends and re-lists elsewhere).
            conn.close()

    async def _authenticate(self, conn: EtcdClient) -> None:
        try:
            token = await conn.authenticate(
                self._opts.username or "",
                self._opts.password or "",
                what="etcd authentication",
                timeout=self._opts.call_timeout,
            )
        except EtcdApiError as e:
            # Wrong credentials come back as INVALID_ARGUMENT, auth switched off as FAILED_PRECONDITION.
            if e.retryable:
                raise _translate(e) from None
            raise StoreError(f"etcd authentication failed for user {self._opts.username!r}: {e.message}") from None
        self._token = token or None
        for m in self._members:
            if m.conn is not None:
                m.conn.token = self._token

    async def _rpc(self, what: str, call: Callable[[EtcdClient, str], Awaitable[T]]) -> T:
        """One etcd call (`call(client, what)`) with errors turned into StoreError/EtcdUnavailableError. A member
        that fails it (unreachable, no leader, deadline) is left for the next one, each member tried once."""
        for tried in range(1, len(self._members) + 1):
            member, conn = await self._connect()
            try:
                return await self._call_once(what, conn, call)
            except EtcdUnavailableError as e:
                self.observer.store_error()
                self._failover(member, str(e))
                if tried == len(self._members):
                    raise
            except StoreError:
                self.observer.store_error()
                raise
        raise AssertionError("unreachable")

    async def _call_once(self, what: str, conn: EtcdClient, call: Callable[[EtcdClient, str], Awaitable[T]]) -> T:
        """One call on one member; re-authenticates once when the token expired (etcd's simple tokens die
        after 5 idle minutes)."""
        if self._opts.username and self._token is None:
            await self._authenticate(conn)
        for attempt in (1, 2):
            try:
                return await call(conn, f"etcd {what}")
            except EtcdApiError as e:
                if e.code == UNAUTHENTICATED:
                    if not self._opts.username:
                        raise StoreError(f"{e} (etcd needs --etcd-username/--etcd-password)") from None
                    if attempt == 2:
                        raise StoreError(str(e)) from None
                    log.info("etcd: auth token rejected (%s), authenticating again", e.message)
                    await self._authenticate(conn)
                    continue
                if e.code == PERMISSION_DENIED:
                    raise StoreError(f"{e} (the etcd user lacks a role for this key)") from None
                raise _translate(e) from None
        raise AssertionError("unreachable")

    async def close(self) -> None:
        self._closed = True
        self._drop_prefetch()
        for m in self._members:
            self._drop(m)

    def _drop_prefetch(self) -> None:
        task, self._prefetch = self._prefetch, None
        if task is not None:
            task.cancel()
            # Retrieved, so that a failure nobody waits for is not reported as never retrieved.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    # --- config -------------------------------------------------------------------------------------

    async def get_network_config(self) -> NetConfig:
        backoff = Backoff(1.0, self._opts.max_backoff, jitter=0.1)
        absent = 0
        while True:
            try:
                resp = await self._rpc("read config", lambda c, w: c.range(self._config_key.encode(), **self._kw(w)))
            except EtcdUnavailableError as e:
                delay = backoff.next()
                log.warning("%s; retrying in %.1f s", e, delay)
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            if not resp.kvs:
                # Upstream retries every second; log the first miss and then every 30th to keep the log useful.
                if absent % 30 == 0:
                    log.warning("network config %s not found in etcd, waiting for it", self._config_key)
                absent += 1
                await asyncio.sleep(1.0)
                continue
            try:
                cfg = parse_net_config(resp.kvs[0].value)
            except ConfigError as e:
                raise ConfigError(f"{self._config_key}: {e}") from None
            self._drop_prefetch()
            self._prefetch = asyncio.create_task(self._list(), name="etcd-list-prefetch")
            return cfg

    # --- decoding -------------------------------------------------------------------------------------

    def _decode(self, key: str, value: bytes, etcd_lease: int, now: float, *, warn: bool = True) -> _Entry | None:
        name = key[len(self._subnets) :]
        try:
            sn, sn6 = parse_subnet_key(name)
        except LeaseError as e:
            if warn:
                log.warning("etcd: skipping %s: %s", key, e)
            return None
        taken = Taken(sn, sn6)
        try:
            attrs = LeaseAttrs.from_json(value)
        except LeaseError as e:
            if warn:
                log.warning("etcd: skipping %s (its subnet stays taken): %s", key, e)
            return _Entry(key, 0, etcd_lease, None, taken)
        # Peers' exact expiry would cost one TimeToLive call per lease; nobody needs more than "it has a TTL".
        exp = None if etcd_lease == 0 else now + self._opts.lease_ttl
        lease = Lease(sn, sn6, attrs, expiration=exp, store_lease_id=etcd_lease)
        return _Entry(key, 0, etcd_lease, lease, taken)

    async def _list(self) -> tuple[list[_Entry], int]:
        """Every lease, decoded, and the revision of the list.

        In pages of LIST_PAGE, all as of the first page's revision (one consistent view, as one range is): the
        gateway takes ~80 ms to render 5000 leases as JSON and we as long to decode them, so the next page is
        asked for before this one is decoded, and etcd renders while we decode."""
        for _ in range(LIST_RESTARTS):
            try:
                return await self._list_pages()
            except _Compacted:
                log.info("etcd: the lease list's revision was compacted between its pages; listing again")
        raise StoreError(f"etcd list leases: compacted during the list {LIST_RESTARTS} times in a row")

    async def _list_pages(self) -> tuple[list[_Entry], int]:
        end = self._subnets_end

        async def ranged(c: EtcdClient, what: str, start: bytes, revision: int) -> Range:
            try:
                return await c.range(start, end, limit=LIST_PAGE, revision=revision, **self._kw(what))
            except EtcdApiError as e:
                if revision and e.code == OUT_OF_RANGE:
                    raise _Compacted() from None
                raise

        def page(start: bytes, revision: int) -> Awaitable[Range]:
            return self._rpc("list leases", lambda c, w: ranged(c, w, start, revision))

        resp = await page(self._subnets.encode(), 0)
        revision = resp.revision
        # Bounded by what the first page says the list holds: an endpoint that keeps answering "more" (or with
        # keys past the range) must not make the list grow without end.
        counted = resp.count
        pages_left = counted // LIST_PAGE + 1
        now = time.time()
        out: list[_Entry] = []
        while True:
            following: asyncio.Task[Range] | None = None
            if resp.more and resp.kvs:
                start = resp.kvs[-1].key + b"\0"
                pages_left -= 1
                if pages_left < 0 or not start < end:
                    raise EtcdUnavailableError(
                        f"etcd list leases: more pages than {counted} leases make, or keys past the range"
                    )
                # Sent before the decoding below: the task runs up to its wait for the answer at the sleep.
                following = asyncio.ensure_future(page(start, revision))
                await asyncio.sleep(0)
            try:
                for kv in resp.kvs:
                    entry = self._decode(kv.key.decode("utf-8", "replace"), kv.value, kv.lease, now)
                    if entry is not None:
                        entry.mod_revision = kv.mod_revision
                        out.append(entry)
            except BaseException:
                if following is not None:
                    following.cancel()
                raise
            if following is None:
                return out, revision
            resp = await following

    # --- leases -------------------------------------------------------------------------------------

    async def acquire_lease(self, cfg: NetConfig, attrs: LeaseAttrs, prev: SubnetEnv | None) -> Lease:
        backoff = Backoff(1.0, self._opts.max_backoff, jitter=0.1)
        races = 0
        while True:
            try:
                got = await self._try_acquire(cfg, attrs, prev)
            except EtcdUnavailableError as e:
                delay = backoff.next()
                log.warning("acquiring a lease: %s; retrying in %.1f s", e, delay)
                await asyncio.sleep(delay)
                continue
            if got is not None:
                return got
            races += 1
            if races >= MAX_ACQUIRE_RACES:
                raise StoreError(f"could not acquire a lease: lost {races} races with other nodes in a row")
            log.info("another node changed the lease we were taking; trying again")
            await asyncio.sleep(random.uniform(0.05, 0.3))

    async def _prefetched(self) -> tuple[list[_Entry], int] | None:
        """The list asked for when the config was read, once (a retry lists afresh); None if there is none or
        it failed (the caller lists itself, with its own retries)."""
        task, self._prefetch = self._prefetch, None
        if task is None:
            return None
        try:
            return await task
        except StoreError as e:
            log.debug("etcd: the early list failed (%s); listing again", e)
            return None

    def _kw(self, what: str) -> dict[str, Any]:
        return {"what": what, "timeout": self._opts.call_timeout}

    async def _txn(self, what: str, compare: Sequence[dict[str, Any]], success: Sequence[dict[str, Any]]) -> bool:
        return await self._rpc(what, lambda c, w: c.txn(compare, success, **self._kw(w)))

    async def _try_acquire(self, cfg: NetConfig, attrs: LeaseAttrs, prev: SubnetEnv | None) -> Lease | None:
        """One pass of upstream's order; None when a concurrent change made it lose a race."""
        self._listing = None
        entries, revision = await self._prefetched() or await self._list()
        by_key = {e.key: e for e in entries}
        own, stale = find_own_leases(cfg, attrs, [e.lease for e in entries if e.lease is not None])
        if own is not None:
            entry = by_key[self.subnet_key(own)]
            log.info(
                "found %s %s for our public IP, reusing it",
                "reservation" if own.is_reservation else "lease",
                own.key,
            )
            got = await self._rewrite(entry, own, attrs)
            if got is not None:
                self._remember(entries, revision, set(), got)
            return got

        gone: set[str] = set()
        for s in stale:
            key = self.subnet_key(s)
            if s.is_reservation:
                log.warning("reservation %s carries our public IP but does not fit the config; leaving it", key)
                continue
            log.info("found lease %s for our public IP but it does not fit the config, deleting it", key)
            if await self._txn(
                "delete stale lease",
                [compare_mod(key, by_key[key].mod_revision)],
                [op_delete(key)],
            ):
                gone.add(key)

        taken = [e.taken for e in entries if e.taken is not None and e.key not in gone]
        sn, sn6 = pick_subnets(cfg, taken, prev)
        new = Lease(sn, sn6, attrs)
        key = self.subnet_key(new)
        lease_id, ttl = await self._grant()
        if not await self._txn(
            "create lease",
            [compare_version(key, 0)],
            [op_put(key, attrs.to_json(), lease=lease_id)],
        ):
            await self._revoke_quietly(lease_id)
            return None
        log.info("acquired lease %s (etcd lease %x, TTL %d s)", key, lease_id, ttl)
        got = Lease(sn, sn6, attrs, expiration=time.time() + ttl, store_lease_id=lease_id)
        self._remember(entries, revision, gone, got)
        return got

    def _remember(self, entries: Sequence[_Entry], revision: int, gone: set[str], own: Lease) -> None:
        """Keep the list at `revision` for the first watch, with what this acquire wrote since: the stale keys it
        deleted gone, our lease as written. The watch from `revision` + 1 delivers those writes again (harmless:
        a delete of a key not known, our own key), and every other node's change after the list."""
        leases = {e.key: e.lease for e in entries if e.lease is not None and e.key not in gone}
        leases[self.subnet_key(own)] = own
        self._listing = _Listing(leases, revision)

    async def _grant(self) -> tuple[int, int]:
        return await self._rpc("grant lease", lambda c, w: c.grant(self._opts.lease_ttl, **self._kw(w)))

    async def _revoke_quietly(self, lease_id: int) -> None:
        try:
            await self._rpc("revoke lease", lambda c, w: c.revoke(lease_id, **self._kw(w)))
        except StoreError as e:
            self.observer.lease_operation("revoke", "error")
            log.debug("could not revoke etcd lease %x (it will expire): %s", lease_id, e)
        else:
            self.observer.lease_operation("revoke", "ok")

    async def _release_old(self, old_id: int) -> None:
        """Revoke the etcd lease our key just moved away from, but only if nothing else is still bound to it:
        revoking deletes every key attached."""
        if old_id == 0:
            return
        try:
            ttl, keys = await self._rpc("lease time-to-live", lambda c, w: c.time_to_live(old_id, **self._kw(w)))
        except StoreError as e:
            log.debug("could not inspect etcd lease %x: %s", old_id, e)
            return
        if ttl > 0 and not keys:
            await self._revoke_quietly(old_id)

    async def _rewrite(self, entry: _Entry, cur: Lease, attrs: LeaseAttrs) -> Lease | None:
        """Write our attrs into an existing key, guarded by its mod revision. A reservation stays a reservation;
        a TTL lease moves to a fresh etcd lease of the full TTL."""
        key = entry.key
        if entry.etcd_lease == 0:
            if not await self._txn(
                "update reservation",
                [compare_mod(key, entry.mod_revision)],
                [op_put(key, attrs.to_json(), lease=0)],
            ):
                return None
            return Lease(cur.subnet, cur.ipv6_subnet, attrs, expiration=None, store_lease_id=0)
        lease_id, ttl = await self._grant()
        if not await self._txn(
            "update lease",
            [compare_mod(key, entry.mod_revision)],
            [op_put(key, attrs.to_json(), lease=lease_id)],
        ):
            await self._revoke_quietly(lease_id)
            return None
        await self._release_old(entry.etcd_lease)
        return Lease(cur.subnet, cur.ipv6_subnet, attrs, expiration=time.time() + ttl, store_lease_id=lease_id)

    async def renew_lease(self, lease: Lease) -> Lease:
        """Re-put our value bound to a fresh etcd lease of the full TTL (as upstream does).

        Raises LeaseRevokedError when the key is gone or now carries another node's IP, and
        EtcdUnavailableError when etcd cannot be reached (the caller retries before the lease runs out).
        """
        key = self.subnet_key(lease)
        for _ in range(MAX_ACQUIRE_RACES):
            resp = await self._rpc("read lease", lambda c, w: c.range(key.encode(), **self._kw(w)))
            if not resp.kvs:
                raise LeaseRevokedError(f"lease {key} has been revoked (deleted from etcd)")
            kv = resp.kvs[0]
            try:
                stored = LeaseAttrs.from_json(kv.value)
            except LeaseError:
                stored = None
            if stored is None or (
                stored.public_ip != lease.attrs.public_ip or stored.public_ipv6 != lease.attrs.public_ipv6
            ):
                raise LeaseRevokedError(f"lease {key} has been revoked (it now holds {kv.value!r})")
            entry = _Entry(key, kv.mod_revision, kv.lease, lease, None)
            got = await self._rewrite(entry, lease, lease.attrs)
            if got is not None:
                if got.is_reservation:
                    log.debug("lease %s is a reservation: nothing to renew", key)
                else:
                    log.info("renewed lease %s until %s", key, time.ctime(got.expiration))
                return got
        raise StoreError(f"could not renew {key}: it kept changing under us")

    # --- watch -------------------------------------------------------------------------------------

    async def watch_leases(self) -> AsyncIterator[WatchUpdate]:
        backoff = Backoff(0.5, self._opts.max_backoff, jitter=0.1)
        listing, self._listing = self._listing, None
        while True:
            if listing is not None:
                known, revision = listing.leases, listing.revision
                listing = None
            else:
                try:
                    entries, revision = await self._list()
                except EtcdUnavailableError as e:
                    delay = backoff.next()
                    log.warning("watch: %s; listing again in %.1f s", e, delay)
                    await asyncio.sleep(delay)
                    continue
                known = {e.key: e.lease for e in entries if e.lease is not None}
            yield LeaseSnapshot(tuple(known.values()))
            log.debug("watch: %d leases at revision %d, watching from %d", len(known), revision, revision + 1)
            stream = self._stream(revision + 1, known, backoff)
            async with contextlib.aclosing(stream):
                async for update in stream:
                    yield update

    async def _stream(
        self, start: int, known: dict[str, Lease], backoff: Backoff
    ) -> AsyncGenerator[list[LeaseEvent], None]:
        """Follow one watch stream until it breaks, is cancelled or its member goes silent; the caller then
        re-lists.

        Silence: a member cut off by the network leaves its TCP connection hanging, and nothing on an idle watch
        tells. No progress request can be sent on the gateway's watch (its request body is complete before it
        answers), so a probe goes to the same member every `watch_probe_interval` over another connection: a
        linearizable count of the config key, which a member cut off from its quorum cannot answer either (and,
        marked `hasleader`, refuses at once). No watch message and no probe answer for `watch_probes_lost` + 0.5
        intervals, or a probe refused as unavailable, and the store drops that member and re-lists on the next
        (at most 2.5 s after the cut with the defaults)."""
        member, conn = await self._connect()
        interval = self._opts.watch_probe_interval
        window = interval * (self._opts.watch_probes_lost + 0.5)
        loop = asyncio.get_running_loop()
        answered = loop.time()  # the member's last probe answer

        async def probe() -> str:
            """Probes until one fails; why it failed."""
            nonlocal answered
            while True:
                await asyncio.sleep(interval)
                try:
                    await conn.range(
                        self._config_key.encode(), count_only=True, what="etcd watch probe", timeout=window
                    )
                except EtcdApiError as e:
                    if e.retryable:
                        return str(e)
                    # Any other answer (an expired token, a missing role) still shows the member is there.
                except StoreError as e:  # unreachable, closed, no answer in time, not the gateway's answer
                    return str(e)
                answered = loop.time()
                member.answers_probes = True

        responses = conn.watch(
            self._subnets.encode(), self._subnets_end, start, what="etcd watch", timeout=self._opts.call_timeout
        )
        prober = asyncio.create_task(probe()) if interval > 0 else None
        delay = 0.0
        read: asyncio.Future[Any] | None = None
        try:
            while True:
                read = asyncio.ensure_future(anext(responses))
                # Counted only while waiting for a message: messages that queue up while our consumer is busy are
                # no silence, they are read at once when it comes back.
                waiting = loop.time()
                silent = ""
                while not read.done() and not silent:
                    if prober is None:
                        await asyncio.wait((read,))
                        break
                    left = max(answered, waiting) + window - loop.time()
                    if left <= 0:
                        silent = f"sent nothing for {window:.1f} s and answered no probe"
                        break
                    await asyncio.wait((read, prober), timeout=left, return_when=asyncio.FIRST_COMPLETED)
                    if prober.done() and not read.done():
                        silent = f"failed a probe: {prober.result()}"
                if silent:
                    log.warning("watch: etcd member %s %s", member.label, silent)
                    self._failover(member, "watch went silent")
                    self.observer.watch_restart("failover")
                    break
                try:
                    batch = read.result()
                except StopAsyncIteration:
                    delay = backoff.next()
                    log.warning("watch: etcd closed the stream; listing again in %.1f s", delay)
                    self.observer.watch_restart("reconnect")
                    break
                events: list[Event] = []
                end = False
                for resp in batch:
                    if resp.compact_revision > 0:
                        # Not an outage: re-list at once.
                        log.warning(
                            "watch: revision %d was compacted (oldest kept: %d); listing again",
                            start,
                            resp.compact_revision,
                        )
                        self.observer.watch_restart("compaction")
                        end = True
                        break
                    if resp.canceled:
                        delay = backoff.next()
                        log.warning(
                            "watch cancelled by etcd (%s); listing again in %.1f s",
                            resp.cancel_reason or "no reason",
                            delay,
                        )
                        self.observer.watch_restart("reconnect")
                        end = True
                        break
                    events.extend(resp.events)
                if events:
                    backoff.reset()
                    out = self._events(events, known)
                    if out:
                        yield out
                if end:
                    break
        except EtcdApiError as e:
            if e.code == UNAUTHENTICATED and self._opts.username:
                # The next list goes through _rpc, which authenticates again when there is no token.
                self._token = None
            moved = e.retryable and self._members[self._cur] is member and len(self._members) > 1
            if e.retryable and self._members[self._cur] is member:
                self._failover(member, str(e))
            # Moving to another member is worth an immediate re-list; the same one again gets the backoff.
            delay = backoff.next() if len(self._members) == 1 else 0.0
            log.warning("watch: %s; listing again in %.1f s", e, delay)
            self.observer.store_error()
            self.observer.watch_restart("failover" if moved else "reconnect")
        except EtcdUnavailableError as e:
            moved = self._members[self._cur] is member and len(self._members) > 1
            if self._members[self._cur] is member:
                self._failover(member, str(e))
            delay = backoff.next() if len(self._members) == 1 else 0.0
            log.warning("watch: %s; listing again in %.1f s", e, delay)
            self.observer.store_error()
            self.observer.watch_restart("failover" if moved else "reconnect")
        finally:
            if prober is not None:
                prober.cancel()
            if read is not None and not read.done():
                read.cancel()
                with contextlib.suppress(BaseException):
                    await read
            await responses.aclose()
        if delay:
            await asyncio.sleep(delay)

    def _events(self, events: Sequence[Event], known: dict[str, Lease]) -> list[LeaseEvent]:
        now = time.time()
        out: list[LeaseEvent] = []
        for ev in events:
            key = ev.kv.key.decode("utf-8", "replace")
            if not ev.delete:
                entry = self._decode(key, ev.kv.value, ev.kv.lease, now)
                if entry is not None and entry.lease is not None:
                    known[key] = entry.lease
                    out.append(LeaseEvent(EventType.ADDED, entry.lease))
                else:
                    old = known.pop(key, None)
                    if old is not None:
                        out.append(LeaseEvent(EventType.REMOVED, old))
            else:
                old = known.pop(key, None)
                if old is None:
                    try:
                        sn, sn6 = parse_subnet_key(key[len(self._subnets) :])
                    except LeaseError:
                        continue
                    old = Lease(sn, sn6, LeaseAttrs())
                out.append(LeaseEvent(EventType.REMOVED, old))
        return out


STORE = EtcdStore
