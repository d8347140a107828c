"""The Kubernetes client's HTTP layer against a raw server that misbehaves: every read is bounded, a dropped
kept-alive connection is replaced, and the kube store loads nothing but the standard library."""

from __future__ import annotations

import ast
import asyncio
import json
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import yaml
from test_store_kube import run_in_netns

from pyflannel.lab import netns
from pyflannel.store.kubeclient import KubeClient, KubeClientError
from pyflannel.store.kubeconfig import ClientConfig, NoCredentials, Server, TLSConfig

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
def kns(scope: netns.RunScope) -> str:
    ns = scope.add_ns("kcli")
    netns.run(["ip", "-n", ns, "link", "set", "lo", "up"])
    return ns


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0]


def against(kns: str, handler: Handler, body: Callable[[KubeClient], Awaitable[None]], **kw: Any) -> None:
    """Serve `handler` on the namespace's loopback and run body(client) against it."""

    async def main() -> None:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        cfg = ClientConfig(Server("http", "127.0.0.1", port), TLSConfig(), NoCredentials(), "test")
        client = KubeClient(cfg, **kw)
        try:
            await asyncio.wait_for(body(client), 30)
        finally:
            await client.close()
            server.close()

    run_in_netns(kns, lambda: asyncio.run(main()))


async def endless(writer: asyncio.StreamWriter, head: bytes, piece: bytes, limit: int = 256 << 20) -> None:
    """Send head, then `piece` over and over (up to `limit` bytes) until the client hangs up."""
    writer.write(head)
    sent = 0
    try:
        while sent < limit:
            writer.write(piece)
            sent += len(piece)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


CHUNKED = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def test_an_endless_watch_line_is_an_error_at_the_bound(kns: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await endless(writer, CHUNKED + chunk(b'{"type":"ADDED","object":{"x":"'), chunk(b"a" * 65536))

    async def body(client: KubeClient) -> None:
        with pytest.raises(KubeClientError, match=r"watch /api/v1/nodes: an event is longer than 1048576 bytes"):
            async for _ in client.watch("/api/v1/nodes", {"watch": "true"}, idle_timeout=10):
                pass

    against(kns, handler, body, max_object=1 << 20)


def test_endless_or_oversized_bodies_and_heads_are_errors_at_their_bounds(kns: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        path = (await read_request(reader)).split()[1]
        if path == b"/big":  # announced too big: refused before reading
            await endless(writer, b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n", b"{" * 65536)
        elif path == b"/chunks":
            await endless(writer, CHUNKED, chunk(b" " * 65536))
        elif path == b"/eof":  # neither length nor chunks: the body ends with the connection
            await endless(writer, b"HTTP/1.1 200 OK\r\n\r\n", b" " * 65536)
        else:
            await endless(writer, b"HTTP/1.1 200 OK\r\nX-Long: ", b"y" * 65536)

    async def body(client: KubeClient) -> None:
        with pytest.raises(KubeClientError, match=r"GET /big: the answer of 99999999999 bytes is larger than 1048576"):
            await client.get("/big")
        for path in ("/chunks", "/eof"):
            with pytest.raises(KubeClientError, match=f"GET {path}: the answer is larger than 1048576 bytes"):
                await client.get(path)
        with pytest.raises(KubeClientError, match="a line of the answer's head is longer than 65536 bytes"):
            await client.get("/head")

    against(kns, handler, body, max_object=1 << 20)


def test_watch_batches_lines_and_a_stream_cut_mid_event_is_an_error(kns: str) -> None:
    events = [json.dumps({"type": "ADDED", "object": {"n": i}}).encode() + b"\n" for i in range(5)]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        # Two events split across chunks, three in one chunk, then half an event and the end of the stream.
        writer.write(CHUNKED + chunk(events[0][:7]) + chunk(events[0][7:] + events[1]))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(chunk(b"".join(events[2:])) + chunk(b'{"type":"MOD') + b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def body(client: KubeClient) -> None:
        got: list[list[bytes]] = []
        with pytest.raises(KubeClientError, match="the stream ended in the middle of an event"):
            async for lines in client.watch("/api/v1/nodes", {"watch": "true"}, idle_timeout=10):
                got.append(lines)
        assert [json.loads(x)["object"]["n"] for b in got for x in b] == [0, 1, 2, 3, 4]
        assert len(got) == 2

    against(kns, handler, body)


def test_a_silent_watch_times_out_and_an_idle_connection_closed_by_the_server_is_replaced(kns: str) -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        line = await read_request(reader)
        if b"watch" in line:
            writer.write(CHUNKED)
            await writer.drain()
            await asyncio.sleep(30)
            return
        data = b'{"kind":"Node"}'
        # Kept alive as announced, then closed while idle, as an API server or a load balancer does.
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
        await writer.drain()
        writer.close()

    async def body(client: KubeClient) -> None:
        assert await client.get("/api/v1/nodes/a") == {"kind": "Node"}
        await asyncio.sleep(0.1)  # the server's close arrives
        assert await client.get("/api/v1/nodes/a") == {"kind": "Node"}
        assert connections == 2
        with pytest.raises(KubeClientError, match=r"watch /api/v1/nodes: nothing received for 0\.3s"):
            async for _ in client.watch("/api/v1/nodes", {"watch": "true"}, idle_timeout=0.3):
                pass

    against(kns, handler, body)


def _modules_after(code: str) -> set[str]:
    code += "\nimport sys; print(sorted({m.partition('.')[0] for m in sys.modules}))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60).stdout
    return set(ast.literal_eval(out.splitlines()[-1]))


def test_kube_mode_loads_no_http_library_and_yaml_only_for_a_yaml_kubeconfig(tmp_path: Any) -> None:
    heavy = {"aiohttp", "kubernetes_asyncio", "httpx", "urllib3", "requests", "yaml", "grpc", "etcd3aio"}
    (tmp_path / "token").write_text("t")
    json_cfg = tmp_path / "kubeconfig.json"
    json_cfg.write_text(json.dumps({
        "clusters": [{"name": "c", "cluster": {"server": "https://10.0.0.1"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}], "current-context": "x",
    }))  # fmt: skip
    yaml_cfg = tmp_path / "kubeconfig.yaml"
    yaml_cfg.write_text("# kubectl's layout\n" + yaml.safe_dump(json.loads(json_cfg.read_text())))
    base = "from pyflannel.store.registry import create_store; from pyflannel.store.options import KubeOptions\n"
    run = "import asyncio; s = create_store(KubeOptions({})); c = asyncio.run(s._client_config())"
    in_cluster = f"serviceaccount_dir={str(tmp_path)!r}, service_host='10.96.0.1', service_port='443'"
    assert not _modules_after(base + run.format(in_cluster)) & heavy
    assert not _modules_after(base + run.format(f"kubeconfig_file={str(json_cfg)!r}")) & heavy
    assert "yaml" in _modules_after(base + run.format(f"kubeconfig_file={str(yaml_cfg)!r}"))


def test_a_server_that_never_answers_is_a_timeout_naming_the_server(kns: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(30)

    async def body(client: KubeClient) -> None:
        with pytest.raises(KubeClientError, match=r"GET /api/v1/nodes/a: no answer from the Kubernetes API at "
                                                  r"http://127\.0\.0\.1:\d+ within 0\.3s"):  # fmt: skip
            await client.get("/api/v1/nodes/a")

    against(kns, handler, body, timeout=0.3)
