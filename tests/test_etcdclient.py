"""The etcd client's own edges, against a raw server that misbehaves (every read bounded, error answers as the
gateway writes them, a cut stream), and against a real member that has lost its leader (`hasleader`)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from test_store_kube import run_in_netns

from pyflannel.lab import netns
from pyflannel.lab.testbed import Testbed
from pyflannel.store.base import StoreError
from pyflannel.store.etcdclient import EtcdApiError, EtcdClient, EtcdUnavailableError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
TOKEN = "sEcReTtOkEn.42"
CHUNKED = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.fixture
def ens(scope: netns.RunScope) -> str:
    return scope.add_ns("ecli")


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """(request line, headers by lower-case name, body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    line, *rest = head[:-4].split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(b":") for h in rest)}
    body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return line, headers, body


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def gateway_error(status: str, body: dict[str, Any]) -> bytes:
    """An error answer as etcd 3.4's gateway writes it: chunked, with a trailer."""
    data = json.dumps(body).encode()
    return (
        (
            f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nTrailer: Grpc-Trailer-Content-Type\r\n"
            "Transfer-Encoding: chunked\r\n\r\n"
        ).encode()
        + chunk(data)
        + b"0\r\nGrpc-Trailer-Content-Type: application/grpc\r\n\r\n"
    )


def against(ns: str, handler: Handler, body: Callable[[EtcdClient], Awaitable[None]], **kw: Any) -> None:
    async def main() -> None:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = EtcdClient("127.0.0.1", port, label=f"127.0.0.1:{port}", **kw)
        client.token = TOKEN
        try:
            await asyncio.wait_for(body(client), 30)
        finally:
            client.close()
            server.close()

    run_in_netns(ns, lambda: asyncio.run(main()))


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def test_calls_carry_hasleader_and_the_token_and_errors_keep_the_grpc_code(ens: str) -> None:
    seen: list[tuple[bytes, dict[bytes, bytes], bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                req = await read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            seen.append(req)
            path = req[0].split()[1]
            if path == b"/v3/kv/range":
                body = json.loads(req[2])
                if body["key"] == b64("ok"):
                    data = json.dumps({
                        "header": {"revision": "7"}, "count": "1",
                        "kvs": [{"key": b64("ok"), "value": b64("v"), "mod_revision": "5", "lease": "99"}],
                    }).encode()  # fmt: skip
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
                elif body["key"] == b64("noleader"):
                    writer.write(gateway_error("503 Service Unavailable", {
                        "error": "etcdserver: no leader", "message": "etcdserver: no leader", "code": 14,
                    }))  # fmt: skip
                elif body["key"] == b64("proxy"):
                    page = b"<html>bad gateway</html>"
                    writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: %d\r\n\r\n%s" % (len(page), page))
                else:
                    writer.write(gateway_error("401 Unauthorized", {
                        "error": "etcdserver: invalid auth token", "message": "etcdserver: invalid auth token",
                        "code": 16,
                    }))  # fmt: skip
            else:
                writer.write(
                    gateway_error("400 Bad Request", {"message": "etcdserver: authentication failed", "code": 3})
                )
            await writer.drain()

    async def body(client: EtcdClient) -> None:
        r = await client.range(b"ok", what="etcd read", timeout=5)
        assert r.revision == 7 and r.count == 1
        assert [(kv.key, kv.value, kv.mod_revision, kv.lease) for kv in r.kvs] == [(b"ok", b"v", 5, 99)]
        with pytest.raises(EtcdApiError, match="etcd read: UNAVAILABLE: etcdserver: no leader") as e:
            await client.range(b"noleader", what="etcd read", timeout=5)
        assert e.value.code == 14 and e.value.retryable
        with pytest.raises(EtcdApiError) as e:
            await client.range(b"expired", what="etcd read", timeout=5)
        assert e.value.code == 16 and not e.value.retryable
        # Not the gateway's answer: the status stands for the code.
        with pytest.raises(EtcdApiError, match=r"UNKNOWN: HTTP 502: .*bad gateway") as e:
            await client.range(b"proxy", what="etcd read", timeout=5)
        with pytest.raises(EtcdApiError, match="INVALID_ARGUMENT: etcdserver: authentication failed") as e:
            await client.authenticate("root", "pw", what="etcd authentication", timeout=5)
        # Answers were read to their end (the trailer included): one kept-alive connection served them all.
        assert len(seen) == 5
        for line, headers, _ in seen:
            assert headers[b"grpc-metadata-hasleader"] == b"true", line
        assert [h.get(b"authorization") for _, h, _ in seen] == [TOKEN.encode()] * 4 + [None]
        assert TOKEN not in str(e.value)

    against(ens, handler, body)


def test_an_endless_watch_line_and_an_endless_body_are_errors_at_their_bounds(ens: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line, _, _ = await read_request(reader)
        if b"/v3/watch" in line:
            writer.write(CHUNKED + chunk(b'{"result":{"events":[{"kv":{"key":"'))
            piece = chunk(b"A" * 65536)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n")
            piece = b" " * 65536
        try:
            for _ in range(4096):  # 256 MiB at most
                writer.write(piece)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def body(client: EtcdClient) -> None:
        with pytest.raises(EtcdUnavailableError, match=r"etcd watch: an event is longer than 1048576 bytes"):
            async for _ in client.watch(b"/a", b"/b", 1, what="etcd watch", timeout=5):
                pass
        with pytest.raises(EtcdUnavailableError, match=r"the answer of 99999999 bytes is larger than 2097152"):
            await client.range(b"/a", b"/b", what="etcd list", timeout=5)

    against(ens, handler, body, max_line=1 << 20, max_body=2 << 20)


@pytest.mark.parametrize("hostile", ["more forever", "keys past the range"])
def test_a_lease_list_that_never_ends_is_an_error_at_its_bound(ens: str, hostile: str) -> None:
    """An endpoint whose range answers always say "more" (or go on past the subnets' range) cannot make the
    store's paged list grow without end: it stops at the pages the first answer's count allows."""
    ranges: list[dict[str, Any]] = []
    prefix = "/coreos.com/network/subnets/"
    # "more forever" says 2 leases: the page bound stops it; "past the range" says 5000 (6 pages), so only the
    # range check can stop it at the second page.
    count = "2" if hostile == "more forever" else "5000"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                _, _, raw = await read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            ranges.append(json.loads(raw))
            n = len(ranges)
            key = f"{prefix}10.5.{n}.0-24" if hostile == "more forever" or n == 1 else "/coreos.com/network/z"
            data = json.dumps({
                "header": {"revision": "7"}, "count": count, "more": True,
                "kvs": [{"key": b64(key), "value": b64('{"PublicIP":"192.0.2.9"}'), "mod_revision": "5"}],
            }).encode()  # fmt: skip
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
            await writer.drain()

    async def main() -> None:
        from pyflannel.store.etcd import EtcdOptions, EtcdStore

        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        store = EtcdStore(EtcdOptions(endpoints=[f"http://127.0.0.1:{port}"], call_timeout=5))
        try:
            with pytest.raises(EtcdUnavailableError, match=rf"more pages than {count} leases make, or keys past"):
                await asyncio.wait_for(store._list(), 30)
        finally:
            await store.close()
            server.close()

    run_in_netns(ens, lambda: asyncio.run(main()))
    # The first page, then one more at the first page's revision; the next would start past the second page's
    # key: the page count is spent (two leases make at most two pages), or that key is past the range.
    assert [r.get("revision") for r in ranges] == [None, "7"], ranges


def test_watch_answers_a_stream_error_line_and_a_stream_cut_mid_event(ens: str) -> None:
    created = json.dumps({"result": {"header": {"revision": "2"}, "created": True}}).encode()
    put = json.dumps({"result": {"events": [{"kv": {"key": b64("/a/1"), "value": b64("x"), "mod_revision": "3"}}]}})
    delete = json.dumps({"result": {"events": [{"type": "DELETE", "kv": {"key": b64("/a/1"), "mod_revision": "4"}}]}})
    compacted = json.dumps({"result": {"canceled": True, "compact_revision": "9"}})
    error = json.dumps({"error": {"grpc_code": 14, "http_code": 503, "message": "etcdserver: no leader"}})
    calls = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        _, _, req = await read_request(reader)
        calls += 1
        assert json.loads(req)["create_request"] == {"key": b64("/a/"), "range_end": b64("/a0"), "start_revision": "3"}
        if calls == 1:  # events split across chunks, then the cluster loses its leader
            lines = b"\n".join(x if isinstance(x, bytes) else x.encode() for x in (created, put, delete, compacted))
            writer.write(CHUNKED + chunk(lines[:20]) + chunk(lines[20:] + b"\n"))
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(chunk(error.encode() + b"\n"))
        else:  # half an answer, and the connection ends
            writer.write(CHUNKED + chunk(created + b"\n" + put.encode()[:30]))
        await writer.drain()
        writer.close()

    async def body(client: EtcdClient) -> None:
        got = []
        with pytest.raises(EtcdApiError, match="etcd watch: UNAVAILABLE: etcdserver: no leader") as e:
            async for batch in client.watch(b"/a/", b"/a0", 3, what="etcd watch", timeout=5):
                got.extend(batch)
        assert e.value.code == 14
        assert [r.created for r in got] == [True, False, False, False]
        assert [(ev.delete, ev.kv.key, ev.kv.value, ev.kv.mod_revision) for r in got for ev in r.events] == [
            (False, b"/a/1", b"x", 3),
            (True, b"/a/1", b"", 4),
        ]
        assert got[3].canceled and got[3].compact_revision == 9
        with pytest.raises(EtcdUnavailableError, match=r"etcd watch: (the stream ended in the middle of an event|"
                                                        r"the connection to etcd member .* was closed)"):  # fmt: skip
            async for _ in client.watch(b"/a/", b"/a0", 3, what="etcd watch", timeout=5):
                pass

    against(ens, handler, body)


def test_closing_the_client_fails_a_call_in_flight_at_once(ens: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(30)  # a member cut off: the connection hangs

    async def body(client: EtcdClient) -> None:
        call = asyncio.create_task(client.range(b"/a", what="etcd read", timeout=25))
        await asyncio.sleep(0.2)
        client.close()
        # The store drops a failed member's client: what was waiting on it must not wait for its own deadline.
        with pytest.raises(EtcdUnavailableError, match=r"etcd read: the connection to etcd member .* was closed"):
            await asyncio.wait_for(call, 10)

    against(ens, handler, body)


def test_a_member_without_a_leader_refuses_at_once(scope: netns.RunScope) -> None:
    """Two of three members gone: the third has no leader and, asked with `hasleader` through the gateway,
    says so instead of waiting (a linearizable read without it would time out as "request timed out")."""
    tb = Testbed(scope)
    tb.start_etcd(members=3)
    tb.stop_member(1)
    tb.stop_member(2)
    m = tb.etcd_members[0]
    assert netns.wait_for(lambda: tb._status(m).get("leader", 0) == 0, timeout=30), "member 0 kept a leader"

    async def main() -> None:
        client = EtcdClient(m.ip, 2379, label=f"{m.ip}:2379")
        try:
            with pytest.raises(EtcdApiError, match="no leader") as e:
                await client.range(b"/coreos.com/network/config", what="etcd read", timeout=30)
            assert e.value.code == 14 and e.value.retryable
        finally:
            client.close()

    run_in_netns(m.ns, lambda: asyncio.run(main()))


def test_bad_tls_files_are_clear_errors(tmp_path: Any) -> None:
    from pyflannel.store.etcdclient import tls_context

    with pytest.raises(StoreError, match="the etcd CA file holds no usable PEM certificate"):
        tls_context(b"not a certificate", None, None)
    with pytest.raises(StoreError, match="the etcd client certificate or key cannot be used") as e:
        tls_context(None, b"-----BEGIN CERTIFICATE-----\nxx\n", b"secret-key-bytes")
    assert "secret-key-bytes" not in str(e.value)
