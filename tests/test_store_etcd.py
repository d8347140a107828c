"""EtcdStore against a real etcd (Debian's 3.4) running in a namespace of this run.

How the test talks to etcd without touching the root namespace: each test body is an async function run in a
forked child that first joins the etcd namespace with setns(2) while it is still single-threaded, so every
socket gRPC later opens (from any of its threads) is made inside that namespace. The parent (pytest) never
opens a gRPC channel, which keeps the fork clean. A child that needs the parent to act on etcd itself (kill,
restart) sends a named request over a pipe and waits for the answer. Results come back as "ok" or a
traceback, which fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address
from multiprocessing.connection import Connection, Pipe
from typing import Any

import pytest

from pyflannel.lab import netns
from pyflannel.lease import EventType, Lease, LeaseAttrs, LeaseEvent, LeaseSnapshot, WatchUpdate
from pyflannel.subnetenv import SubnetEnv

PREFIX = "/coreos.com/network"
CLONE_NEWNET = 0x40000000
ME = LeaseAttrs(
    public_ip=IPv4Address("192.0.2.1"),
    backend_type="vxlan",
    backend_data={"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"},
)


# --- harness ---------------------------------------------------------------------------------------------


class Ctl:
    """The child's handle: the etcd endpoint, etcdctl, and requests to the parent."""

    def __init__(self, conn: Connection, endpoint: str) -> None:
        self.conn = conn
        self.endpoint = endpoint
        self.user = ""  # "name:password" once the test enabled etcd auth

    async def ask(self, what: str) -> None:
        self.conn.send(("call", what))
        reply = await asyncio.to_thread(self.conn.recv)
        assert reply == "done", reply

    async def etcdctl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        p = await asyncio.create_subprocess_exec(
            "etcdctl",
            "--endpoints",
            self.endpoint,
            *args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "ETCDCTL_API": "3", **({"ETCDCTL_USER": self.user} if self.user else {})},
        )
        out, err = await asyncio.wait_for(p.communicate(input.encode() if input else None), 30)
        if check and p.returncode != 0:
            raise AssertionError(f"etcdctl {' '.join(args)}: {err.decode()}")
        return out.decode()

    async def put(self, key: str, value: str, *extra: str) -> None:
        # `--` so that values starting with "-" are not taken as flags.
        await self.etcdctl("put", *extra, "--", key, value)

    async def get_json(self, key: str) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(await self.etcdctl("get", key, "-w", "json"))
        return out

    async def key_lease(self, key: str) -> int | None:
        """The etcd lease id bound to `key` (0 for none), None when the key is absent."""
        kvs = (await self.get_json(key)).get("kvs") or []
        return int(kvs[0].get("lease", 0)) if kvs else None

    async def value(self, key: str) -> str | None:
        import base64

        kvs = (await self.get_json(key)).get("kvs") or []
        return base64.b64decode(kvs[0]["value"]).decode() if kvs else None

    async def timetolive(self, lease_id: int) -> tuple[int, int]:
        """(remaining TTL, granted TTL) as etcdctl reports them; remaining is -1 once revoked/expired."""
        out = json.loads(await self.etcdctl("lease", "timetolive", f"{lease_id:x}", "-w", "json"))
        return int(out.get("ttl", -1)), int(out.get("granted-ttl", 0))

    async def revision(self) -> int:
        return int((await self.get_json("/"))["header"]["revision"])


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


def run_in_ns(
    ns: str,
    endpoint: str,
    body: Callable[[Ctl], Awaitable[None]],
    *,
    handlers: dict[str, Callable[[], None]] | None = None,
    timeout: float = 120,
) -> None:
    parent, child = Pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        try:
            parent.close()
            _setns(str(netns.NETNS_DIR / ns))
            asyncio.run(body(Ctl(child, endpoint)))
            child.send(("ok", ""))
        except BaseException:
            code = 1
            with contextlib.suppress(Exception):
                child.send(("err", traceback.format_exc()))
        finally:
            os._exit(code)
    child.close()
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                pytest.fail(f"test body timed out after {timeout}s")
            if parent.poll(0.2):
                try:
                    kind, arg = parent.recv()
                except EOFError:
                    pytest.fail("test child died without a result")
                if kind == "call":
                    (handlers or {})[arg]()
                    parent.send("done")
                elif kind == "ok":
                    return
                else:
                    pytest.fail(f"test body failed in the child:\n{arg}")
            else:
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done and not parent.poll(0):
                    pid = 0
                    pytest.fail("test child exited without a result")
    finally:
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        parent.close()


@dataclass
class Etcd:
    scope: netns.RunScope
    ns: str
    endpoint: str

    def proc(self) -> subprocess.Popen[bytes]:
        return [p for p in self.scope.procs if p.poll() is None][-1]

    def kill(self) -> None:
        p = self.proc()
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)

    def start(self) -> None:
        # Same name, hence the same data dir: the restarted member keeps keys, leases and revisions.
        netns.start_etcd(self.scope, self.ns, "127.0.0.1")

    def run(self, body: Callable[[Ctl], Awaitable[None]], timeout: float = 120, **handlers: Callable[[], None]) -> None:
        run_in_ns(self.ns, self.endpoint, body, handlers=handlers, timeout=timeout)


@pytest.fixture
def etcd(scope: netns.RunScope) -> Etcd:
    ns = scope.add_ns("etcd")
    return Etcd(scope, ns, netns.start_etcd(scope, ns, "127.0.0.1"))


def _store(endpoint: str, **kw: Any) -> Any:
    # Imported here, in the child that talks to etcd.
    from pyflannel.store.etcd import EtcdOptions, EtcdStore

    return EtcdStore(EtcdOptions(endpoints=[endpoint], **kw))


async def _config(c: Ctl, text: str = '{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}') -> None:
    await c.put(f"{PREFIX}/config", text)


async def _next(it: Any, timeout: float = 30) -> WatchUpdate:
    update: WatchUpdate = await asyncio.wait_for(anext(it), timeout)
    return update


# --- construction ----------------------------------------------------------------------------------------


def test_bad_options_are_clear_errors(tmp_path: Any) -> None:
    from pyflannel.store.base import StoreError
    from pyflannel.store.etcd import EtcdOptions, EtcdStore

    for eps, match in (
        (["ftp://10.0.0.1:2379"], "scheme"),
        (["http://"], "no host"),
        (["http://10.0.0.1:notaport"], "bad etcd endpoint"),
        (["http://10.0.0.1:2379", "https://10.0.0.2:2379"], "mix"),
        ([], "no etcd endpoints"),
        # Refused at once instead of being retried forever (issue 11).
        (["not-a-url"], "'not-a-url': expected http://HOST:PORT"),
        (["10.0.0.1"], "expected http://HOST:PORT"),
        (["http://10.0.0.1:99999"], "Port out of range"),
        (["http://10.0.0.1:0"], "port 0"),
        (["http://a b:2379"], "not a host name"),
        (["http://-x:2379"], "not a host name"),
        (["http://u:p@10.0.0.1:2379"], "--etcd-username"),
        (["http://10.0.0.1:2379/v3"], "path"),
        (["http://10.0.0.1:2379?x=1"], "query"),
        (["http://[fd00::1:2379"], "Invalid IPv6 URL"),
    ):
        with pytest.raises(StoreError, match=match):
            EtcdStore(EtcdOptions(endpoints=eps))
    with pytest.raises(StoreError, match="CA file"):
        EtcdStore(EtcdOptions(endpoints=["https://10.0.0.1:2379"], cafile=str(tmp_path / "missing.pem")))
    # TLS files go through the size-capped reader: no device, FIFO or directory is read.
    for bad in ("/dev/zero", str(tmp_path)):
        with pytest.raises(StoreError, match=r"CA file .*: it is"):
            EtcdStore(EtcdOptions(endpoints=["https://10.0.0.1:2379"], cafile=bad))
    for ok in ("10.0.0.1:2379", "etcd-0.etcd:2379", "http://etcd_1", "https://[fd00::1]:2379", " http://a.b/ "):
        EtcdStore(EtcdOptions(endpoints=[ok]))
    with pytest.raises(StoreError, match="together"):
        EtcdStore(EtcdOptions(endpoints=["https://10.0.0.1:2379"], keyfile="/x"))
    with pytest.raises(StoreError, match="renew margin"):
        EtcdStore(EtcdOptions(lease_ttl=60, renew_margin=60))


@pytest.mark.parametrize(
    ("name", "value", "taken"),
    [
        ("10.5.4.0-24", b'{"PublicIP":"192.0.2.4","BackendData":' + b"[" * 995 + b"]" * 995 + b"}", True),
        ("10.5.4.0-24", b'{"PublicIP":"192.0.2.4","BackendData":' + b"[" * 100_000 + b"}", True),
        ("10.5.4.0-24", b'{"PublicIP":"192.0.2.4","BackendData":' + b"9" * 5000 + b"}", True),
        ("10.5.4.0-24", b'{"PublicIP":"192.0.2.4","BackendData":{"VNI":NaN}}', True),
        ("10.5.4.0-24", b'{"PublicIP":"192.0.2.4","BackendData":{"VNI":1e400}}', True),
        ("10.5.4.0-24", b'{"PublicIP":"192.0.2.4","PublicIPv6":"fe80::1%eth0"}', True),
        ("10.5.4.0-024", b'{"PublicIP":"192.0.2.4"}', False),
        ("10.5.4.0-24&FD00::-64", b'{"PublicIP":"192.0.2.4"}', False),
    ],
)
def test_garbage_lease_of_another_node_is_skipped_with_a_warning(
    name: str, value: bytes, taken: bool, caplog: pytest.LogCaptureFixture
) -> None:
    from pyflannel.store.etcd import EtcdOptions, EtcdStore

    st = EtcdStore(EtcdOptions(endpoints=["http://127.0.0.1:2379"], prefix=PREFIX))
    with caplog.at_level("WARNING"):
        entry = st._decode(f"{PREFIX}/subnets/{name}", value, 0, 0.0)
    assert "etcd: skipping" in caplog.text
    assert len(caplog.records[-1].getMessage()) < 500
    if taken:  # a readable key with a garbage value: its subnet stays taken, there is no lease to program
        assert entry is not None and entry.lease is None and entry.taken is not None
    else:
        assert entry is None


# --- config ----------------------------------------------------------------------------------------------


def test_config_waits_while_absent_and_survives_etcd_down(etcd: Etcd) -> None:
    async def body(c: Ctl) -> None:
        store = _store(c.endpoint, max_backoff=1.0)
        try:
            task = asyncio.create_task(store.get_network_config())
            await asyncio.sleep(2.5)
            assert not task.done(), "returned without a config"
            await c.ask("kill")
            await asyncio.sleep(2.0)
            assert not task.done(), task.exception() if task.done() else ""
            await c.ask("start")
            await _config(c)
            cfg = await asyncio.wait_for(task, 30)
            assert cfg.network == IPv4Network("10.5.0.0/16")
            assert cfg.backend.type == "vxlan"
        finally:
            await store.close()

    etcd.run(body, kill=etcd.kill, start=etcd.start)


def test_malformed_config_names_the_key(etcd: Etcd) -> None:
    async def body(c: Ctl) -> None:
        from pyflannel.config import ConfigError

        store = _store(c.endpoint)
        try:
            await _config(c, '{"Network":"10.5.0.0/30"}')
            with pytest.raises(ConfigError, match=f"{PREFIX}/config.*too small"):
                await asyncio.wait_for(store.get_network_config(), 10)
            await _config(c, "{not json")
            with pytest.raises(ConfigError, match=f"{PREFIX}/config"):
                await asyncio.wait_for(store.get_network_config(), 10)
        finally:
            await store.close()

    etcd.run(body)


# --- acquire ---------------------------------------------------------------------------------------------


def test_acquire_on_empty_store_default_ttl(etcd: Etcd) -> None:
    async def body(c: Ctl) -> None:
        store = _store(c.endpoint)
        try:
            await _config(c)
            cfg = await store.get_network_config()
            before = time.time()
            lease = await store.acquire_lease(cfg, ME, None)
            assert lease.subnet is not None and cfg.subnet_fits(lease.subnet)
            assert lease.ipv6_subnet is None
            key = f"{PREFIX}/subnets/{lease.subnet.network_address}-24"
            assert await c.value(key) == (
                '{"PublicIP":"192.0.2.1","PublicIPv6":null,"BackendType":"vxlan",'
                '"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}'
            )
            lid = await c.key_lease(key)
            assert lid == lease.store_lease_id and lid
            remaining, granted = await c.timetolive(lid)
            assert granted == 24 * 3600
            assert remaining > 24 * 3600 - 600
            assert lease.expiration is not None and lease.expiration >= before + 24 * 3600 - 5
            keys = (await c.etcdctl("get", "--prefix", "--keys-only", f"{PREFIX}/subnets/")).split()
            assert keys == [key]
        finally:
            await store.close()

    etcd.run(body)


def test_acquire_dual_stack(etcd: Etcd) -> None:
    async def body(c: Ctl) -> None:
        store = _store(c.endpoint)
        try:
            await _config(c, '{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:5::/56"}')
            cfg = await store.get_network_config()
            me = LeaseAttrs(public_ip=IPv4Address("192.0.2.1"), public_ipv6=IPv6Address("2001:db8::1"))
            lease = await store.acquire_lease(cfg, me, None)
            assert lease.subnet is not None and lease.ipv6_subnet is not None
            assert cfg.subnet_fits(lease.subnet) and cfg.ipv6_subnet_fits(lease.ipv6_subnet)
            key = f"{PREFIX}/subnets/{lease.subnet.network_address}-24&{lease.ipv6_subnet.network_address}-64"
            assert await c.value(key) == '{"PublicIP":"192.0.2.1","PublicIPv6":"2001:db8::1"}'
            # A restart finds it again by both public IPs.
            store2 = _store(c.endpoint)
            try:
                again = await store2.acquire_lease(cfg, me, None)
                assert (again.subnet, again.ipv6_subnet) == (lease.subnet, lease.ipv6_subnet)
            finally:
                await store2.close()
        finally:
            await store.close()

    etcd.run(body)


def test_reuse_own_lease_after_restart(etcd: Etcd) -> None:
    async def body(c: Ctl) -> None:
        await _config(c)
        # Another node's lease, written in upstream's exact form, must be left alone.
        await c.put(f"{PREFIX}/subnets/10.5.200.0-24", '{"PublicIP":"192.0.2.99","PublicIPv6":null}')
        s1 = _store(c.endpoint)
        cfg = await s1.get_network_config()
        first = await s1.acquire_lease(cfg, ME, None)
        await s1.close()
        s2 = _store(c.endpoint)
        try:
            # A new backend MAC after the restart: same subnet, new value, fresh full-TTL etcd lease.
            attrs = LeaseAttrs(
                public_ip=ME.public_ip, backend_type="vxlan", backend_data={"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:ff"}
            )
            second = await s2.acquire_lease(cfg, attrs, SubnetEnv(subnet=IPv4Network("10.5.77.0/24")))
            assert second.subnet == first.subnet
            key = s2.subnet_key(second)
            assert "aa:bb:cc:dd:ee:ff" in (await c.value(key) or "")
            assert await c.key_lease(key) == second.store_lease_id != 0
            assert (await c.timetolive(second.store_lease_id))[1] == 24 * 3600
            keys = (await c.etcdctl("get", "--prefix", "--keys-only", f"{PREFIX}/subnets/")).split()
            assert sorted(keys) == sorted([key, f"{PREFIX}/subnets/10.5.200.0-24"])
            assert await c.value(f"{PREFIX}/subnets/10.5.200.0-24") == '{"PublicIP":"192.0.2.99","PublicIPv6":null}'
        finally:
            await s2.close()

    etcd.run(body)


def test_reuse_previous_subnet_env(etcd: Etcd) -> None:
    async def body(c: Ctl) -> None:
        await _config(c)
        store = _store(c.endpoint)
        try:
            cfg = await store.get_network_config()
            got = await store.acquire_lease(cfg, ME, SubnetEnv(subnet=IPv4Network("10.5.77.0/24")))
            assert got.subnet == IPv4Network("10.5.77.0/24")
            assert await c.key_lease(f"{PREFIX}/subnets/10.5.77.0-24")
            # Another node whose previous subnet is now taken gets a different one.
            other = LeaseAttrs(public_ip=IPv4Address("192.0.2.2"))
            got2 = await store.acquire_lease(cfg, other, SubnetEnv(subnet=IPv4Network("10.5.77.0/24")))
            assert got2.subnet != IPv4Network("10.5.77.0/24")
        finally:
            await store.close()

    etcd.run(body)


def test_exhaustion_and_garbage_keeps_subnet_taken(etcd: Etcd) -> None:
    async def body(c: Ctl) -> None:
        from pyflannel.store.base import SubnetExhaustedError

        await _config(c, '{"Network":"10.9.0.0/28"}')
        # Garbage value on one of the three subnets: skipped, but its subnet is not handed out.
        await c.put(f"{PREFIX}/subnets/10.9.0.8-30", "garbage")
        await c.put(f"{PREFIX}/subnets/not-a-key", '{"PublicIP":"192.0.2.50"}')
        store = _store(c.endpoint)
        try:
            cfg = await store.get_network_config()
            assert cfg.subnet_len == 30
            # Two nodes at once: both subnets left, found through create-if-absent races if they collide.
            a, b = await asyncio.gather(
                store.acquire_lease(cfg, LeaseAttrs(public_ip=IPv4Address("192.0.2.11")), None),
                store.acquire_lease(cfg, LeaseAttrs(public_ip=IPv4Address("192.0.2.12")), None),
            )
            assert {a.subnet, b.subnet} == {IPv4Network("10.9.0.4/30"), IPv4Network("10.9.0.12/30")}
            with pytest.raises(SubnetExhaustedError, match="no free subnets between SubnetMin and SubnetMax"):
                await store.acquire_lease(cfg, LeaseAttrs(public_ip=IPv4Address("192.0.2.13")), None)
            assert await c.value(f"{PREFIX}/subnets/10.9.0.8-30") == "garbage"
        finally:
            await store.close()

    etcd.run(body)


def test_reservation_stays_a_reservation(etcd: Etcd) -> None:
    async def body(c: Ctl) -> None:
        await _config(c)
        key = f"{PREFIX}/subnets/10.5.9.0-24"
        await c.put(key, '{"PublicIP":"192.0.2.1","PublicIPv6":null}')
        for round_ in range(2):
            store = _store(c.endpoint)
            try:
                cfg = await store.get_network_config()
                got = await store.acquire_lease(cfg, ME, SubnetEnv(subnet=IPv4Network("10.5.77.0/24")))
                assert got.subnet == IPv4Network("10.5.9.0/24"), round_
                assert got.is_reservation and got.expiration is None and got.store_lease_id == 0
                assert await c.key_lease(key) == 0, f"round {round_}: reservation got a TTL"
                assert '"BackendType":"vxlan"' in (await c.value(key) or "")
                renewed = await store.renew_lease(got)
                assert renewed.is_reservation
                assert await c.key_lease(key) == 0
            finally:
                await store.close()
        keys = (await c.etcdctl("get", "--prefix", "--keys-only", f"{PREFIX}/subnets/")).split()
        assert keys == [key]

    etcd.run(body)


# --- renew -----------------------------------------------------------------------------------------------


def test_renew_moves_ttl_and_detects_revocation(etcd: Etcd) -> None:
    async def body(c: Ctl) -> None:
        from pyflannel.store.base import LeaseRevokedError

        await _config(c)
        store = _store(c.endpoint, lease_ttl=120, renew_margin=30)
        try:
            cfg = await store.get_network_config()
            lease = await store.acquire_lease(cfg, ME, None)
            key = store.subnet_key(lease)
            assert (await c.timetolive(lease.store_lease_id))[1] == 120
            renew_at = store.renew_at(lease)
            assert renew_at is not None and lease.expiration is not None
            assert renew_at == lease.expiration - 30
            await asyncio.sleep(3)
            old_remaining, _ = await c.timetolive(lease.store_lease_id)
            renewed = await store.renew_lease(lease)
            assert renewed.subnet == lease.subnet and renewed.store_lease_id != lease.store_lease_id
            assert renewed.expiration is not None and renewed.expiration > lease.expiration
            assert await c.key_lease(key) == renewed.store_lease_id
            new_remaining, granted = await c.timetolive(renewed.store_lease_id)
            assert granted == 120 and new_remaining > old_remaining
            # The etcd lease the key moved away from is revoked, not left to linger.
            assert (await c.timetolive(lease.store_lease_id))[0] == -1
            await c.etcdctl("del", key)
            with pytest.raises(LeaseRevokedError):
                await store.renew_lease(renewed)
        finally:
            await store.close()

    etcd.run(body)


# --- watch -----------------------------------------------------------------------------------------------


UPSTREAM_VXLAN = (
    '{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",'
    '"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}'
)


def _by_subnet(leases: Any) -> dict[str, Lease]:
    return {str(le.subnet): le for le in leases}


def test_watch_snapshot_events_and_garbage(etcd: Etcd) -> None:
    async def body(c: Ctl) -> None:
        lease_id = int((await c.etcdctl("lease", "grant", "600")).split()[1], 16)
        await c.put(f"{PREFIX}/subnets/10.5.3.0-24", UPSTREAM_VXLAN, "--lease", f"{lease_id:x}")
        await c.put(f"{PREFIX}/subnets/10.5.4.0-24", "{{garbage")
        await c.put(f"{PREFIX}/subnets/garbage-key", '{"PublicIP":"192.0.2.4"}')
        await c.put(f"{PREFIX}/subnets/10.5.5.0-24", '{"PublicIP":"192.0.2.5","PublicIPv6":null}')
        store = _store(c.endpoint)
        it = store.watch_leases()
        try:
            snap = await _next(it)
            assert isinstance(snap, LeaseSnapshot)
            leases = _by_subnet(snap.leases)
            assert set(leases) == {"10.5.3.0/24", "10.5.5.0/24"}
            up = leases["10.5.3.0/24"]
            assert up.attrs.public_ip == IPv4Address("192.168.64.3")
            assert up.attrs.backend_type == "vxlan"
            assert up.attrs.backend_data == {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"}
            assert up.attrs.to_json() == UPSTREAM_VXLAN
            assert not up.is_reservation and up.store_lease_id == lease_id
            assert leases["10.5.5.0/24"].is_reservation

            events: list[LeaseEvent] = []

            async def collect(n: int) -> None:
                while len(events) < n:
                    u = await _next(it)
                    assert isinstance(u, list), u
                    events.extend(u)

            await c.put(f"{PREFIX}/subnets/10.5.6.0-24", '{"PublicIP":"192.0.2.6","PublicIPv6":null}')
            await collect(1)
            assert events[0].type is EventType.ADDED
            assert events[0].lease.subnet == IPv4Network("10.5.6.0/24")
            assert events[0].lease.attrs.public_ip == IPv4Address("192.0.2.6")
            # Garbage over a valid lease: that lease is gone for consumers.
            await c.put(f"{PREFIX}/subnets/10.5.5.0-24", "nope")
            # Garbage over garbage and a garbage key: nothing to report.
            await c.put(f"{PREFIX}/subnets/10.5.4.0-24", "still garbage")
            await c.put(f"{PREFIX}/subnets/garbage-key", "x")
            await c.etcdctl("del", f"{PREFIX}/subnets/10.5.3.0-24")
            await collect(3)
            assert [(e.type, str(e.lease.subnet)) for e in events[1:]] == [
                (EventType.REMOVED, "10.5.5.0/24"),
                (EventType.REMOVED, "10.5.3.0/24"),
            ]
            # The removed lease carries what was known about it.
            assert events[2].lease.attrs.public_ip == IPv4Address("192.168.64.3")
            # A lease expiring deletes the key: REMOVED too.
            await c.put(f"{PREFIX}/subnets/10.5.8.0-24", '{"PublicIP":"192.0.2.8"}', "--lease", f"{lease_id:x}")
            await collect(4)
            await c.etcdctl("lease", "revoke", f"{lease_id:x}")
            await collect(5)
            assert (events[3].type, events[4].type) == (EventType.ADDED, EventType.REMOVED)
            assert events[4].lease.subnet == IPv4Network("10.5.8.0/24")
        finally:
            await it.aclose()
            await store.close()

    etcd.run(body)


def test_watch_relists_after_compaction(etcd: Etcd) -> None:
    async def body(c: Ctl) -> None:
        await c.put(f"{PREFIX}/subnets/10.5.1.0-24", '{"PublicIP":"192.0.2.1"}')
        store = _store(c.endpoint)
        it = store.watch_leases()
        try:
            snap = await _next(it)
            assert isinstance(snap, LeaseSnapshot) and len(snap.leases) == 1
            # The watcher is behind (it has not asked for more): changes, then their history is compacted.
            await c.etcdctl("del", f"{PREFIX}/subnets/10.5.1.0-24")
            await c.put(f"{PREFIX}/subnets/10.5.2.0-24", '{"PublicIP":"192.0.2.2"}')
            await c.put("/unrelated", "x")
            await c.etcdctl("compact", str(await c.revision()))
            u = await _next(it)
            assert isinstance(u, LeaseSnapshot), u
            assert set(_by_subnet(u.leases)) == {"10.5.2.0/24"}
            # And the watch goes on from the new revision.
            await c.put(f"{PREFIX}/subnets/10.5.3.0-24", '{"PublicIP":"192.0.2.3"}')
            u = await _next(it)
            assert isinstance(u, list) and [str(e.lease.subnet) for e in u] == ["10.5.3.0/24"]
        finally:
            await it.aclose()
            await store.close()

    etcd.run(body)


def _paged_store(c: Ctl, between_pages: Callable[[int], Awaitable[None]]) -> tuple[Any, list[str]]:
    """A store listing in pages of 2 that runs `between_pages(n)` before the list's n-th page is asked for;
    the list of calls it made ("list leases" or others) is returned beside it."""
    import pyflannel.store.etcd as etcd_store

    etcd_store.LIST_PAGE = 2  # this forked child's copy only
    store = _store(c.endpoint)
    real, calls = store._rpc, []

    async def rpc(what: str, call: Any) -> Any:
        calls.append(what)
        if what == "list leases":
            await between_pages(calls.count(what))
        return await real(what, call)

    store._rpc = rpc
    return store, calls


def test_a_list_in_pages_is_one_view(etcd: Etcd) -> None:
    """Changes between the pages of a list are not in it: every page is read at the first one's revision."""

    async def body(c: Ctl) -> None:
        for i in range(1, 6):
            await c.put(f"{PREFIX}/subnets/10.5.{i}.0-24", f'{{"PublicIP":"192.0.2.{i}"}}')
        first_rev = await c.revision()

        async def meanwhile(n: int) -> None:
            if n == 2:
                await c.etcdctl("del", f"{PREFIX}/subnets/10.5.5.0-24")
                await c.put(f"{PREFIX}/subnets/10.5.6.0-24", '{"PublicIP":"192.0.2.6"}')

        store, calls = _paged_store(c, meanwhile)
        try:
            entries, revision = await store._list()
            assert [e.key.rsplit("/", 1)[1] for e in entries] == [f"10.5.{i}.0-24" for i in range(1, 6)]
            assert revision == first_rev
            assert calls == ["list leases"] * 3
        finally:
            await store.close()

    etcd.run(body)


def test_a_list_compacted_between_its_pages_starts_again(etcd: Etcd) -> None:
    async def body(c: Ctl) -> None:
        for i in range(1, 6):
            await c.put(f"{PREFIX}/subnets/10.5.{i}.0-24", f'{{"PublicIP":"192.0.2.{i}"}}')

        async def meanwhile(n: int) -> None:
            if n == 2:  # once: the first list's second page
                await c.put(f"{PREFIX}/subnets/10.5.6.0-24", '{"PublicIP":"192.0.2.6"}')
                await c.etcdctl("compact", str(await c.revision()))

        store, calls = _paged_store(c, meanwhile)
        try:
            entries, revision = await store._list()
            # The second list: 3 pages of the 6 leases, at the revision after the compaction.
            assert [e.key.rsplit("/", 1)[1] for e in entries] == [f"10.5.{i}.0-24" for i in range(1, 7)]
            assert revision == await c.revision()
            assert calls == ["list leases"] * 5
        finally:
            await store.close()

    etcd.run(body)


def test_first_watch_goes_on_from_the_acquires_list_and_loses_nothing(etcd: Etcd) -> None:
    """The first watch takes the acquire's list (with our write) as its snapshot and watches from the revision
    after it: every change made meanwhile, before our write or after it, arrives as an event."""

    def peer(i: int) -> tuple[str, str]:
        return f"{PREFIX}/subnets/10.5.{i}.0-24", f'{{"PublicIP":"192.0.2.{10 + i}","PublicIPv6":null}}'

    async def body(c: Ctl) -> None:
        await _config(c)
        for i in (1, 2):
            await c.put(*peer(i))
        # Ours by its public IP (a TTL lease, not a reservation), outside the network: the acquire deletes it.
        stale = f"{PREFIX}/subnets/10.9.1.0-24"
        lease_id = int((await c.etcdctl("lease", "grant", "600")).split()[1], 16)
        await c.put(stale, '{"PublicIP":"192.0.2.1","PublicIPv6":null}', "--lease", f"{lease_id:x}")
        store = _store(c.endpoint)
        lists = 0
        list_leases, grant = store._list, store._grant

        async def counted_list() -> Any:
            nonlocal lists
            lists += 1
            return await list_leases()

        async def racing_grant() -> Any:
            # Another node writes between the acquire's list and our write.
            await c.put(*peer(3))
            return await grant()

        store._list, store._grant = counted_list, racing_grant
        it = store.watch_leases()
        try:
            cfg = await store.get_network_config()
            own = await store.acquire_lease(cfg, ME, SubnetEnv(subnet=IPv4Network("10.5.77.0/24")))
            assert own.subnet == IPv4Network("10.5.77.0/24")
            # And after our write, before the watch starts.
            await c.put(*peer(4))
            await c.etcdctl("del", peer(1)[0])
            snap = await _next(it)
            assert isinstance(snap, LeaseSnapshot)
            # The acquire's view: no second list, the stale key gone, our lease as written.
            assert lists == 1
            known = _by_subnet(snap.leases)
            assert set(known) == {"10.5.1.0/24", "10.5.2.0/24", "10.5.77.0/24"}
            assert known["10.5.77.0/24"] == own
            while set(known) != {"10.5.2.0/24", "10.5.3.0/24", "10.5.4.0/24", "10.5.77.0/24"}:
                u = await _next(it, timeout=10)
                assert isinstance(u, list), u
                for ev in u:
                    if ev.type is EventType.ADDED:
                        known[str(ev.lease.subnet)] = ev.lease
                    else:
                        known.pop(str(ev.lease.subnet), None)
            assert known["10.5.3.0/24"].attrs.public_ip == IPv4Address("192.0.2.13")
            assert known["10.5.77.0/24"].attrs == ME
            assert await c.value(stale) is None
            assert lists == 1
        finally:
            await it.aclose()
            await store.close()

    etcd.run(body)


def test_acquire_after_the_early_list_went_stale(etcd: Etcd) -> None:
    """The leases are listed as soon as the config is read; a subnet taken after that list costs the acquire a
    lost race (its create-if-absent fails) and a fresh list, never another node's lease."""

    async def body(c: Ctl) -> None:
        await _config(c)
        store = _store(c.endpoint)
        lists = 0
        list_leases = store._list

        async def counted_list() -> Any:
            nonlocal lists
            lists += 1
            return await list_leases()

        store._list = counted_list
        it = store.watch_leases()
        try:
            cfg = await store.get_network_config()
            # The early list is in (awaiting the task leaves its result for the acquire to take).
            early = store._prefetch
            assert early is not None
            await early
            assert lists == 1
            theirs = '{"PublicIP":"192.0.2.50","PublicIPv6":null}'
            await c.put(f"{PREFIX}/subnets/10.5.77.0-24", theirs)
            got = await store.acquire_lease(cfg, ME, SubnetEnv(subnet=IPv4Network("10.5.77.0/24")))
            assert got.subnet != IPv4Network("10.5.77.0/24")
            # The acquire took the stale early list, lost the race for 10.5.77.0/24 and listed afresh.
            assert lists == 2
            assert await c.value(f"{PREFIX}/subnets/10.5.77.0-24") == theirs
            snap = await _next(it)
            assert isinstance(snap, LeaseSnapshot)
            assert set(_by_subnet(snap.leases)) == {"10.5.77.0/24", str(got.subnet)}
        finally:
            await it.aclose()
            await store.close()

    etcd.run(body)


def test_watch_survives_etcd_restart(etcd: Etcd) -> None:
    async def body(c: Ctl) -> None:
        await c.put(f"{PREFIX}/subnets/10.5.1.0-24", '{"PublicIP":"192.0.2.1"}')
        store = _store(c.endpoint, max_backoff=2.0)
        it = store.watch_leases()
        try:
            snap = await _next(it)
            assert isinstance(snap, LeaseSnapshot)
            pending = asyncio.create_task(_next(it, timeout=90))
            await asyncio.sleep(0.5)
            await c.ask("kill")
            await asyncio.sleep(3)
            assert not pending.done() or not pending.exception(), pending.exception()
            await c.ask("start")
            await c.etcdctl("del", f"{PREFIX}/subnets/10.5.1.0-24")
            await c.put(f"{PREFIX}/subnets/10.5.2.0-24", '{"PublicIP":"192.0.2.2"}')
            # Whatever mix of snapshot and events arrives, the view must converge on the new state.
            view = _by_subnet(snap.leases)
            saw_snapshot = False
            update: WatchUpdate = await pending
            for _ in range(10):
                if isinstance(update, LeaseSnapshot):
                    saw_snapshot = True
                    view = _by_subnet(update.leases)
                else:
                    for e in update:
                        if e.type is EventType.ADDED:
                            view[str(e.lease.subnet)] = e.lease
                        else:
                            view.pop(str(e.lease.subnet), None)
                if set(view) == {"10.5.2.0/24"}:
                    break
                update = await _next(it)
            assert set(view) == {"10.5.2.0/24"}
            assert saw_snapshot, "no re-list after the connection was lost"
            # Still following.
            await c.put(f"{PREFIX}/subnets/10.5.3.0-24", '{"PublicIP":"192.0.2.3"}')
            u = await _next(it)
            assert isinstance(u, list) and [str(e.lease.subnet) for e in u] == ["10.5.3.0/24"]
        finally:
            await it.aclose()
            await store.close()

    etcd.run(body, kill=etcd.kill, start=etcd.start)


def test_silent_watch_is_detected_and_relisted(etcd: Etcd) -> None:
    """A member that stops answering without closing the connection (SIGSTOP here, a dropped network in the
    cluster tests) is noticed by the progress requests within a few seconds: the store drops the connection and
    re-lists, instead of waiting for gRPC keepalive (15 s)."""

    def stop() -> None:
        etcd.proc().send_signal(signal.SIGSTOP)

    def cont() -> None:
        etcd.proc().send_signal(signal.SIGCONT)

    async def body(c: Ctl) -> None:
        await c.put(f"{PREFIX}/subnets/10.5.1.0-24", '{"PublicIP":"192.0.2.1"}')
        store = _store(c.endpoint, call_timeout=3.0, max_backoff=1.0)
        it = store.watch_leases()
        try:
            assert isinstance(await _next(it), LeaseSnapshot)
            pending = asyncio.create_task(_next(it, timeout=60))
            await asyncio.sleep(2.5)  # a few probes answered: the member is known to answer them
            assert store._members[0].answers_probes, "etcd never answered a progress request"
            await c.ask("stop")
            try:
                await asyncio.sleep(4.0)
            finally:
                await c.ask("cont")
            await c.put(f"{PREFIX}/subnets/10.5.2.0-24", '{"PublicIP":"192.0.2.2"}')
            u = await pending
            for _ in range(5):
                if isinstance(u, LeaseSnapshot):
                    break
                u = await _next(it)
            assert isinstance(u, LeaseSnapshot), "the silent stream was not dropped"
        finally:
            await it.aclose()
            await store.close()

    etcd.run(body, stop=stop, cont=cont)


# --- auth ------------------------------------------------------------------------------------------------


def _start_etcd_custom(
    scope: netns.RunScope, ns: str, extra: list[str], scheme: str = "http", ctl_args: tuple[str, ...] = ()
) -> str:
    """etcd as netns.start_etcd starts it, plus `extra` flags (short auth tokens, TLS)."""
    url = f"{scheme}://127.0.0.1:2379"
    scope.spawn(
        ns,
        ["etcd", "--name", "etcd", "--data-dir", str(scope.tmpdir / "etcd-custom-data"),
         "--listen-client-urls", url, "--advertise-client-urls", url,
         "--listen-peer-urls", "http://127.0.0.1:2380",
         "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
         "--initial-cluster", "etcd=http://127.0.0.1:2380",
         "--log-level", "warn", *extra],
        log=scope.tmpdir / "etcd-custom.log",
    )  # fmt: skip
    for _ in range(100):
        p = subprocess.run(
            ["ip", "netns", "exec", ns, "etcdctl", "--endpoints", url, "--dial-timeout", "1s", *ctl_args,
             "endpoint", "health"],
            capture_output=True, env={**os.environ, "ETCDCTL_API": "3"}, timeout=10,
        )  # fmt: skip
        if p.returncode == 0:
            return url
        time.sleep(0.2)
    raise AssertionError("custom etcd did not become healthy:\n" + (scope.tmpdir / "etcd-custom.log").read_text())


def test_auth_and_reauth_after_token_expiry(scope: netns.RunScope) -> None:
    ns = scope.add_ns("etcd")
    endpoint = _start_etcd_custom(scope, ns, ["--auth-token-ttl", "3"])

    async def body(c: Ctl) -> None:
        from pyflannel.store.base import StoreError

        await _config(c)
        await c.etcdctl("user", "add", "root:rootpw")
        await c.etcdctl("auth", "enable")
        c.user = "root:rootpw"
        bad = _store(c.endpoint, username="root", password="wrong")
        try:
            with pytest.raises(StoreError, match="authentication failed"):
                await bad.get_network_config()
        finally:
            await bad.close()
        unauth = _store(c.endpoint)
        try:
            with pytest.raises(StoreError, match="user name is empty"):
                await unauth.get_network_config()
        finally:
            await unauth.close()
        store = _store(c.endpoint, username="root", password="rootpw", max_backoff=2.0)
        it = store.watch_leases()
        try:
            cfg = await store.get_network_config()
            snap = await _next(it)
            assert isinstance(snap, LeaseSnapshot) and snap.leases == ()
            # Idle longer than --auth-token-ttl: the token is dead and the store must log in again.
            await asyncio.sleep(5)
            lease = await asyncio.wait_for(store.acquire_lease(cfg, ME, None), 60)
            assert await c.key_lease(store.subnet_key(lease)) == lease.store_lease_id
            await asyncio.sleep(5)
            renewed = await asyncio.wait_for(store.renew_lease(lease), 60)
            assert await c.key_lease(store.subnet_key(lease)) == renewed.store_lease_id
            for _ in range(10):
                u = await _next(it, timeout=60)
                subnets = (
                    [str(le.subnet) for le in u.leases]
                    if isinstance(u, LeaseSnapshot)
                    else [str(e.lease.subnet) for e in u if e.type is EventType.ADDED]
                )
                if str(lease.subnet) in subnets:
                    break
            else:
                raise AssertionError("own lease never reported by the watch")
        finally:
            await it.aclose()
            await store.close()

    run_in_ns(ns, endpoint, body)


# --- TLS -------------------------------------------------------------------------------------------------


def _pki(d: Any) -> dict[str, str]:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate."""

    def ossl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d, timeout=60)

    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
         "-days", "1", "-subj", "/CN=pyflannel-test-ca")  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
    for name in ("server", "client"):
        ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}")  # fmt: skip
        ossl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "1", "-extfile", "san.ext")  # fmt: skip
    return {k: str(d / v) for k, v in {
        "ca": "ca.pem", "cert": "server.pem", "key": "server.key", "ccert": "client.pem", "ckey": "client.key",
    }.items()}  # fmt: skip


def test_tls_with_client_certificates(scope: netns.RunScope) -> None:
    pki = _pki(scope.tmpdir)
    ns = scope.add_ns("etcd")
    tls = ["--cert-file", pki["cert"], "--key-file", pki["key"], "--trusted-ca-file", pki["ca"], "--client-cert-auth"]
    creds = ("--cacert", pki["ca"], "--cert", pki["ccert"], "--key", pki["ckey"])
    endpoint = _start_etcd_custom(scope, ns, tls, scheme="https", ctl_args=creds)

    async def body(c: Ctl) -> None:
        from pyflannel.store.etcd import EtcdOptions, EtcdStore

        await c.etcdctl(*creds, "put", f"{PREFIX}/config", '{"Network":"10.5.0.0/16"}')
        store = EtcdStore(
            EtcdOptions(endpoints=[endpoint], cafile=pki["ca"], certfile=pki["ccert"], keyfile=pki["ckey"])
        )
        try:
            cfg = await asyncio.wait_for(store.get_network_config(), 30)
            lease = await store.acquire_lease(cfg, ME, None)
            out = await c.etcdctl(*creds, "get", "--print-value-only", store.subnet_key(lease))
            assert out.strip() == ME.to_json()
        finally:
            await store.close()

    run_in_ns(ns, endpoint, body)


def test_endpoint_members() -> None:
    from pyflannel.store.etcd import EtcdOptions, EtcdStore

    def members(*eps: str) -> list[tuple[str, int, str]]:
        return [(m.ep.host, m.ep.port, m.label) for m in EtcdStore(EtcdOptions(endpoints=list(eps)))._members]

    # One member, one client per endpoint: the store moves between them itself.
    assert members("http://127.0.0.1:4001", "http://127.0.0.1:2379") == [
        ("127.0.0.1", 4001, "127.0.0.1:4001"),
        ("127.0.0.1", 2379, "127.0.0.1:2379"),
    ]
    assert members("https://etcd.example") == [("etcd.example", 2379, "etcd.example:2379")]
    assert members("http://[fd00::1]:2379", "http://[fd00::2]") == [
        ("fd00::1", 2379, "[fd00::1]:2379"),
        ("fd00::2", 2379, "[fd00::2]:2379"),
    ]
    assert members("10.0.0.1:2379", "localhost:2380") == [
        ("10.0.0.1", 2379, "10.0.0.1:2379"),
        ("localhost", 2380, "localhost:2380"),
    ]


def test_etcd_credentials_never_shown() -> None:
    from pyflannel.store.base import StoreError
    from pyflannel.store.etcd import _parse_endpoint
    from pyflannel.store.options import EtcdOptions

    with pytest.raises(StoreError) as ei:
        _parse_endpoint("http://bob:s3cret@10.0.0.1:2379")
    assert "s3cret" not in str(ei.value) and "bob" not in str(ei.value) and "10.0.0.1:2379" in str(ei.value)
    assert "s3cret" not in repr(EtcdOptions(username="bob", password="s3cret"))
