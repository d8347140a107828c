"""A small Kubernetes API client: HTTP/1.1 over asyncio (and ssl), JSON in and out, nothing else imported.

The kube store needs four calls (get, list, watch, strategic-merge patch); a general client library costs it
tens of MB and most of a second at start (bench/bench_kube_client.py has the figures). Every read is bounded:
a response head, a body (`max_object` for an object, `max_list` for a list) and a watch line (`max_object`),
so a server that sends without end costs an error, never unbounded memory.

Credentials come from kubeconfig.Credentials before each request; a 401 makes them refresh once (a rotated
token file, an exec plugin run again) and the request is sent again. Nothing secret reaches a message: errors
name the method, the path and the server, never a header.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import quote, urlencode

from .base import StoreError
from .kubeconfig import ClientConfig, Creds

STRATEGIC = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"
MAX_HEAD_LINE = 64 << 10
MAX_HEADERS = 200
# An object is at most etcd's request limit (1.5 MiB by default, 10 MiB at most as advised): far above, yet bounded.
MAX_OBJECT = 16 << 20
MAX_LIST = 256 << 20
MAX_ERROR_BODY = 64 << 10
# Watch lines handed over in one batch, at most: events already received are applied together.
MAX_BATCH = 1024
_HIGH_WATER = 256 << 10


class KubeClientError(StoreError):
    """The API server could not be reached, or answered with something that is not HTTP and JSON."""


class KubeApiError(KubeClientError):
    """The API server answered with an HTTP error status; `message` is the Status object's message."""

    def __init__(self, status: int, reason: str, message: str, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.reason = reason
        self.message = message


class _Closed(Exception):
    """The connection ended (its reason, if any, in args)."""


def path_segment(name: str) -> str:
    """A name as one URL path segment."""
    return quote(name, safe="")


class _Wire(asyncio.Protocol):
    """One connection's receive side as a bounded buffer: reading pauses above _HIGH_WATER bytes unread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.buf = bytearray()
        self.eof = False
        self.error: BaseException | None = None
        self.transport: asyncio.Transport | None = None
        self.received = 0
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    # --- protocol callbacks ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.received += len(data)
        if len(self.buf) > _HIGH_WATER and not self._paused and self.transport is not None:
            self.transport.pause_reading()
            self._paused = True
        self._wake()

    def eof_received(self) -> bool | None:
        self.eof = True
        self._wake()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = exc
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # --- reading ---
    async def _more(self) -> None:
        if self.eof:
            raise _Closed(self.error) if self.error else _Closed()
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def readline(self, limit: int) -> bytes:
        start = 0
        while True:
            i = self.buf.find(b"\r\n", start)
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[: i + 2]
                return line
            if len(self.buf) > limit:
                raise KubeClientError(f"a line of the answer's head is longer than {limit} bytes")
            start = max(0, len(self.buf) - 1)
            await self._more()

    async def readexactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self._more()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def read_some(self, n: int) -> bytes:
        """Up to n bytes, at least one; _Closed at the end."""
        if not self.buf:
            await self._more()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.eof = True

    @property
    def usable(self) -> bool:
        return not self.eof and self.transport is not None and not self.transport.is_closing()


class _Body:
    """A response body read piece by piece: chunked, Content-Length, or up to the connection's end."""

    def __init__(self, wire: _Wire, headers: Mapping[str, str]) -> None:
        self.wire = wire
        self.chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length")
        self.length: int | None = None
        if not self.chunked and length is not None:
            if not length.strip().isdigit():
                raise KubeClientError(f"the answer has a bad Content-Length {length[:40]!r}")
            self.length = int(length)
        self.left = self.length if self.length is not None else 0  # in the current chunk, when chunked
        self.done = self.length == 0
        # A body delimited by the connection's end leaves nothing to reuse.
        self.reusable = self.chunked or self.length is not None

    async def piece(self, n: int = 65536) -> bytes:
        """Up to n bytes of the body; b"" once it is complete."""
        if self.done:
            return b""
        w = self.wire
        if self.chunked:
            if self.left == 0:
                size_line = await w.readline(MAX_HEAD_LINE)
                size = size_line.split(b";", 1)[0].strip()
                try:
                    self.left = int(size, 16)
                except ValueError:
                    raise KubeClientError(f"the answer has a bad chunk size {size[:20]!r}") from None
                if self.left == 0:
                    while await w.readline(MAX_HEAD_LINE):  # trailers, up to the empty line
                        pass
                    self.done = True
                    return b""
            data = await w.read_some(min(n, self.left))
            self.left -= len(data)
            if self.left == 0 and await w.readexactly(2) != b"\r\n":
                raise KubeClientError("the answer has a chunk without its CRLF")
            return data
        if self.length is not None:
            data = await w.read_some(min(n, self.left))
            self.left -= len(data)
            self.done = self.left == 0
            return data
        try:
            return await w.read_some(n)
        except _Closed:
            self.done = True
            return b""

    async def read(self, limit: int, what: str) -> bytes:
        if self.length is not None and self.length > limit:
            raise KubeClientError(f"{what}: the answer of {self.length} bytes is larger than {limit} bytes")
        out = bytearray()
        while piece := await self.piece():
            out += piece
            if len(out) > limit:
                raise KubeClientError(f"{what}: the answer is larger than {limit} bytes")
        return bytes(out)


class KubeClient:
    """The API calls the kube store makes, on one configuration. Paths are API paths (`/api/v1/nodes`)."""

    def __init__(
        self,
        config: ClientConfig,
        *,
        timeout: float = 30.0,
        max_object: int = MAX_OBJECT,
        max_list: int = MAX_LIST,
        user_agent: str = "pyflannel",
    ) -> None:
        self.config = config
        self.timeout = timeout
        self.max_object = max_object
        self.max_list = max_list
        self.user_agent = user_agent
        self._idle: builtins.list[_Wire] = []
        self._ssl_key: tuple[Any, ...] | None = None
        self._ssl: ssl.SSLContext | None = None

    # --- API ---
    async def get(self, path: str, query: Mapping[str, str] | None = None) -> dict[str, Any]:
        return await self._json("GET", path, query, limit=self.max_object)

    async def list(self, path: str, query: Mapping[str, str] | None = None) -> dict[str, Any]:
        return await self._json("GET", path, query, limit=self.max_list)

    async def patch(self, path: str, body: Any, content_type: str = STRATEGIC) -> dict[str, Any]:
        data = json.dumps(body, separators=(",", ":")).encode()
        return await self._json("PATCH", path, None, data, content_type, self.max_object)

    async def watch(
        self, path: str, query: Mapping[str, str], idle_timeout: float
    ) -> AsyncIterator[builtins.list[bytes]]:
        """The watch stream's lines, in batches of what has arrived; ends when the server ends the stream.

        KubeApiError for an HTTP error (410 when resourceVersion is too old), KubeClientError when the connection
        breaks, a line grows past max_object bytes, or nothing (not even a bookmark) came for idle_timeout."""
        what = f"watch {path}"
        target = self._target(path, query)
        creds = await self._creds(what)
        async with self._deadline(what, self.timeout):
            wire = await self._connect(creds, what)
        try:
            async with self._deadline(what, self.timeout):
                status, headers = await self._send(wire, "GET", target, creds, b"", "", what)
                if status == 401:
                    await self._creds(what, refresh=True)  # for the next watch; this one fails below
                if status != 200:
                    data = await _Body(wire, headers).read(MAX_ERROR_BODY, what)
                    raise self._api_error(status, data, what)
            body = _Body(wire, headers)
            buf = bytearray()
            lines: builtins.list[bytes] = []
            while True:
                async with self._deadline(what, idle_timeout, f"nothing received for {idle_timeout:g}s"):
                    piece = await body.piece()
                if not piece:
                    break
                start = len(buf)
                buf += piece
                if b"\n" in piece:
                    end = buf.rfind(b"\n", start)
                    lines.extend(line for line in bytes(buf[:end]).split(b"\n") if line.strip())
                    del buf[: end + 1]
                if len(buf) > self.max_object:
                    raise KubeClientError(f"{what}: an event is longer than {self.max_object} bytes")
                # Hand over what has arrived; keep reading first while more is already here.
                if lines and (not wire.buf or len(lines) >= MAX_BATCH):
                    yield lines
                    lines = []
            if lines:
                yield lines
            if buf.strip():
                raise KubeClientError(f"{what}: the stream ended in the middle of an event")
        except _Closed as e:
            raise KubeClientError(f"{what}: the connection was closed{_reason(e)}") from None
        except (OSError, ssl.SSLError) as e:
            raise KubeClientError(f"{what}: {_oserror(e)}") from None
        finally:
            wire.close()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for wire in idle:
            wire.close()

    # --- plumbing ---
    def _target(self, path: str, query: Mapping[str, str] | None) -> str:
        target = self.config.server.base_path + path
        return f"{target}?{urlencode(query)}" if query else target

    @contextlib.asynccontextmanager
    async def _deadline(self, what: str, seconds: float, why: str = "") -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(seconds):
                yield
        except TimeoutError:
            raise KubeClientError(
                f"{what}: {why or f'no answer from the Kubernetes API at {self.config.server.url} within {seconds:g}s'}"
            ) from None

    async def _creds(self, what: str, refresh: bool = False) -> Creds:
        try:
            return await self.config.credentials.get(refresh)
        except StoreError:
            raise
        except ValueError as e:  # ConfigError and KubeConfigError: the message is already clear
            raise KubeClientError(f"{what}: {e}") from None

    def _context(self, creds: Creds) -> ssl.SSLContext:
        key = (creds.cert, creds.key, self.config.tls.file_signature())
        if self._ssl is None or key != self._ssl_key:
            try:
                ctx = self.config.tls.context(creds.cert, creds.key)
            except ValueError as e:
                raise KubeClientError(str(e)) from None
            if self._ssl is not None:
                # New certificates: connections made with the old ones go.
                for wire in self._idle:
                    wire.close()
                self._idle.clear()
            self._ssl, self._ssl_key = ctx, key
        return self._ssl

    async def _connect(self, creds: Creds, what: str) -> _Wire:
        srv, tls = self.config.server, self.config.tls
        loop = asyncio.get_running_loop()
        ctx = self._context(creds) if srv.scheme == "https" else None
        try:
            _, wire = await loop.create_connection(
                lambda: _Wire(loop),
                srv.host,
                srv.port,
                ssl=ctx,
                server_hostname=(tls.server_name or srv.host) if ctx is not None else None,
            )
        except (OSError, ssl.SSLError, ssl.CertificateError) as e:
            raise KubeClientError(f"{what}: cannot reach the Kubernetes API at {srv.url}: {_oserror(e)}") from None
        return wire

    async def _send(
        self, wire: _Wire, method: str, target: str, creds: Creds, body: bytes, ctype: str, what: str
    ) -> tuple[int, dict[str, str]]:
        head = [
            f"{method} {target} HTTP/1.1",
            f"Host: {self.config.server.netloc}",
            f"User-Agent: {self.user_agent}",
            "Accept: application/json",
        ]
        if creds.authorization:
            head.append(f"Authorization: {creds.authorization}")
        if body or method in ("PATCH", "POST", "PUT"):
            head.append(f"Content-Type: {ctype}")
            head.append(f"Content-Length: {len(body)}")
        wire.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        while True:
            line = await wire.readline(MAX_HEAD_LINE)
            parts = line.split(None, 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
                raise KubeClientError(f"{what}: the answer is not HTTP/1.1: {line[:60]!r}")
            status = int(parts[1])
            headers: dict[str, str] = {}
            for _ in range(MAX_HEADERS + 1):
                h = await wire.readline(MAX_HEAD_LINE)
                if not h:
                    break
                name, _, value = h.partition(b":")
                headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
            else:
                raise KubeClientError(f"{what}: the answer has more than {MAX_HEADERS} header lines")
            if 100 <= status < 200:
                continue  # an interim answer; the real one follows
            if parts[0] == b"HTTP/1.0" or "close" in headers.get("connection", "").lower():
                headers["x-pyflannel-close"] = "1"
            return status, headers

    async def _exchange(
        self, method: str, target: str, creds: Creds, body: bytes, ctype: str, limit: int, what: str
    ) -> tuple[int, bytes]:
        """One request and its whole answer; a kept-alive connection the server closed meanwhile is replaced
        once (nothing of the answer had arrived, so the request was not taken)."""
        while True:
            wire = None
            while self._idle and wire is None:
                w = self._idle.pop()
                if w.usable:
                    wire = w
                else:
                    w.close()
            reused = wire is not None
            if wire is None:
                wire = await self._connect(creds, what)
            before = wire.received
            try:
                status, headers = await self._send(wire, method, target, creds, body, ctype, what)
                resp = _Body(wire, headers)
                data = await resp.read(limit if 200 <= status < 300 else MAX_ERROR_BODY, what)
            except (_Closed, OSError, ssl.SSLError) as e:
                wire.close()
                if reused and wire.received == before:
                    continue
                if isinstance(e, _Closed):
                    raise KubeClientError(f"{what}: the connection was closed{_reason(e)}") from None
                raise KubeClientError(f"{what}: {_oserror(e)}") from None
            except BaseException:
                wire.close()
                raise
            if resp.reusable and "x-pyflannel-close" not in headers and wire.usable and len(self._idle) < 2:
                self._idle.append(wire)
            else:
                wire.close()
            return status, data

    async def _json(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None,
        body: bytes = b"",
        ctype: str = "",
        limit: int = MAX_OBJECT,
    ) -> dict[str, Any]:
        what = f"{method} {path}"
        target = self._target(path, query)
        creds = await self._creds(what)
        async with self._deadline(what, self.timeout):
            status, data = await self._exchange(method, target, creds, body, ctype, limit, what)
            if status == 401:
                # A rotated token or an expired plugin credential: refresh once and ask again.
                creds = await self._creds(what, refresh=True)
                status, data = await self._exchange(method, target, creds, body, ctype, limit, what)
        if not 200 <= status < 300:
            raise self._api_error(status, data, what)
        try:
            obj = json.loads(data) if data else {}
        except (ValueError, RecursionError):  # not JSON, a number past int()'s limit, nested too deeply
            raise KubeClientError(f"{what}: the answer is not JSON: {data[:100]!r}") from None
        if not isinstance(obj, dict):
            raise KubeClientError(f"{what}: the answer is not a JSON object")
        return obj

    def _api_error(self, status: int, data: bytes, what: str) -> KubeApiError:
        reason = message = ""
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError):
            obj = None
        if isinstance(obj, dict):
            message, reason = str(obj.get("message", ""))[:300], str(obj.get("reason", ""))[:100]
        else:
            message = data[:200].decode("utf-8", "replace")
        if status == 401:
            message += f" (the API server refused {self.config.credentials.describe()})"
        return KubeApiError(status, reason, message, f"{what}: HTTP {status}: {message}")


def _reason(e: _Closed) -> str:
    return f" ({_oserror(e.args[0])})" if e.args and e.args[0] else ""


def _oserror(e: BaseException) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"TLS: {e.verify_message or e}"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__
