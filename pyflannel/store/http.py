"""HTTP/1.1 over asyncio (and ssl) for the stores' own API clients: the Kubernetes API and etcd's JSON gateway.

One `Http` is one server: a few kept-alive connections for request/answer exchanges, and a connection of its own
for each stream (a watch). Every read is bounded: a response head (line and header count), a body (the caller's
limit) and a stream line, so a server that sends without end costs an error, never unbounded memory. Errors are
of the class the caller names (a kube or an etcd error), with messages that name the request and the server,
never a header (headers carry tokens).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import ssl
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence

from .base import StoreError

MAX_HEAD_LINE = 64 << 10
MAX_HEADERS = 200
MAX_ERROR_BODY = 64 << 10
# Stream lines handed over in one batch, at most: lines already received are applied together.
MAX_BATCH = 1024
# Kept-alive connections kept per server: the stores make one call at a time, two at most (a probe alongside).
MAX_IDLE = 2
_HIGH_WATER = 256 << 10
_CLOSE = "x-pyflannel-close"


class Closed(Exception):
    """The connection ended (its reason, if any, in args)."""


class Wire(asyncio.Protocol):
    """One connection's receive side as a bounded buffer: reading pauses above _HIGH_WATER bytes unread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, error: type[StoreError]) -> None:
        self._loop = loop
        self._error = error
        self.buf = bytearray()
        self.eof = False
        self.exc: BaseException | None = None
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
        self.exc = exc
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # --- reading ---
    async def _more(self) -> None:
        if self.eof:
            raise Closed(self.exc) if self.exc else Closed()
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
                raise self._error(f"a line of the answer's head is longer than {limit} bytes")
            start = max(0, len(self.buf) - 1)
            await self._more()

    async def readexactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self._more()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def read_some(self, n: int) -> bytes:
        """Up to n bytes, at least one; Closed at the end."""
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
        self._wake()

    @property
    def usable(self) -> bool:
        return not self.eof and self.transport is not None and not self.transport.is_closing()


class Body:
    """A response body read piece by piece: chunked, Content-Length, or up to the connection's end."""

    def __init__(self, wire: Wire, headers: Mapping[str, str], error: type[StoreError]) -> None:
        self.wire = wire
        self._error = error
        self.chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length")
        self.length: int | None = None
        if not self.chunked and length is not None:
            if not length.strip().isdigit():
                raise error(f"the answer has a bad Content-Length {length[:40]!r}")
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
                    raise self._error(f"the answer has a bad chunk size {size[:20]!r}") from None
                if self.left == 0:
                    for _ in range(MAX_HEADERS + 1):  # trailers (etcd's gateway sends one), up to the empty line
                        if not await w.readline(MAX_HEAD_LINE):
                            break
                    else:
                        raise self._error(f"the answer has more than {MAX_HEADERS} trailer lines")
                    self.done = True
                    return b""
            data = await w.read_some(min(n, self.left))
            self.left -= len(data)
            if self.left == 0 and await w.readexactly(2) != b"\r\n":
                raise self._error("the answer has a chunk without its CRLF")
            return data
        if self.length is not None:
            data = await w.read_some(min(n, self.left))
            self.left -= len(data)
            self.done = self.left == 0
            return data
        try:
            return await w.read_some(n)
        except Closed:
            self.done = True
            return b""

    async def read(self, limit: int, what: str) -> bytes:
        if self.length is not None and self.length > limit:
            raise self._error(f"{what}: the answer of {self.length} bytes is larger than {limit} bytes")
        out = bytearray()
        while piece := await self.piece():
            out += piece
            if len(out) > limit:
                raise self._error(f"{what}: the answer is larger than {limit} bytes")
        return bytes(out)


class Stream:
    """An answer whose body is read as it comes (a watch): its status and headers, then its lines."""

    def __init__(self, http: Http, wire: Wire, status: int, headers: dict[str, str], what: str) -> None:
        self._http = http
        self.wire = wire
        self.status = status
        self.headers = headers
        self.what = what
        self.body = Body(wire, headers, http.error)

    async def read(self, limit: int) -> bytes:
        """The whole body (an error answer's), at most `limit` bytes."""
        with self._http.translated(self.what):
            return await self.body.read(limit, self.what)

    async def lines(self, max_line: int, idle_timeout: float | None) -> AsyncIterator[list[bytes]]:
        """The body's non-empty lines, in batches of what has arrived; ends with the body. An error when a line
        grows past `max_line` bytes, the body ends inside a line, or nothing came for `idle_timeout` seconds."""
        what = self.what
        idle = f"nothing received for {idle_timeout:g}s" if idle_timeout is not None else ""
        buf = bytearray()
        lines: list[bytes] = []
        with self._http.translated(what):
            while True:
                async with self._http.deadline(what, idle_timeout, idle):
                    piece = await self.body.piece()
                if not piece:
                    break
                start = len(buf)
                buf += piece
                if b"\n" in piece:
                    end = buf.rfind(b"\n", start)
                    lines.extend(line for line in bytes(buf[:end]).split(b"\n") if line.strip())
                    del buf[: end + 1]
                if len(buf) > max_line:
                    raise self._http.error(f"{what}: an event is longer than {max_line} bytes")
                # Hand over what has arrived; keep reading first while more is already here.
                if lines and (not self.wire.buf or len(lines) >= MAX_BATCH):
                    yield lines
                    lines = []
            if lines:
                yield lines
            if buf.strip():
                raise self._http.error(f"{what}: the stream ended in the middle of an event")

    def close(self) -> None:
        self._http.release(self.wire, keep=False)


class Http:
    """Requests to one server (`host`:`port`, TLS when `tls` is set); `peer` names it in errors ("the
    Kubernetes API at https://10.0.0.1:6443", "etcd member 10.0.0.2:2379"), `error` is the class raised."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        netloc: str,
        peer: str,
        error: type[StoreError],
        tls: ssl.SSLContext | None = None,
        server_name: str = "",
        user_agent: str = "pyflannel",
    ) -> None:
        self.host = host
        self.port = port
        self.netloc = netloc
        self.peer = peer
        self.error = error
        self.tls = tls
        self.server_name = server_name or host
        self.user_agent = user_agent
        self._idle: list[Wire] = []
        self._busy: set[Wire] = set()
        self._closed = False

    def use_tls(self, ctx: ssl.SSLContext | None) -> None:
        """Connect with `ctx` from now on; kept-alive connections made with another one (old certificates) go."""
        if ctx is not self.tls:
            self.tls = ctx
            idle, self._idle = self._idle, []
            for wire in idle:
                wire.close()

    # --- errors ---
    @contextlib.asynccontextmanager
    async def deadline(self, what: str, seconds: float | None, why: str = "") -> AsyncIterator[None]:
        if seconds is None:
            yield
            return
        try:
            async with asyncio.timeout(seconds):
                yield
        except TimeoutError:
            raise self.error(f"{what}: {why or f'no answer from {self.peer} within {seconds:g}s'}") from None

    @contextlib.contextmanager
    def translated(self, what: str) -> Iterator[None]:
        """A broken connection as `error`, naming the request."""
        try:
            yield
        except Closed as e:
            raise self.error(f"{what}: the connection to {self.peer} was closed{_reason(e)}") from None
        except (OSError, ssl.SSLError) as e:
            raise self.error(f"{what}: {self.peer}: {oserror(e)}") from None

    # --- connections ---
    async def _connect(self, what: str) -> Wire:
        if self._closed:
            raise self.error(f"{what}: the client of {self.peer} is closed")
        loop = asyncio.get_running_loop()
        ctx = self.tls
        try:
            _, wire = await loop.create_connection(
                lambda: Wire(loop, self.error),
                self.host,
                self.port,
                ssl=ctx,
                server_hostname=self.server_name if ctx is not None else None,
            )
        except (OSError, ssl.SSLError, ssl.CertificateError) as e:
            raise self.error(f"{what}: cannot reach {self.peer}: {oserror(e)}") from None
        if self._closed:  # closed while connecting
            wire.close()
            raise self.error(f"{what}: the client of {self.peer} is closed")
        self._busy.add(wire)
        return wire

    def _idle_wire(self) -> Wire | None:
        while self._idle:
            w = self._idle.pop()
            if w.usable:
                self._busy.add(w)
                return w
            w.close()
        return None

    def release(self, wire: Wire, keep: bool) -> None:
        self._busy.discard(wire)
        if keep and not self._closed and wire.usable and len(self._idle) < MAX_IDLE:
            self._idle.append(wire)
        else:
            wire.close()

    def close(self) -> None:
        """Close every connection, the busy ones too: a call still waiting on one fails at once."""
        self._closed = True
        wires = [*self._idle, *self._busy]
        self._idle, self._busy = [], set()
        for wire in wires:
            wire.close()

    # --- requests ---
    async def _send(
        self, wire: Wire, method: str, target: str, headers: Sequence[str], body: bytes, ctype: str, what: str
    ) -> tuple[int, dict[str, str]]:
        head = [
            f"{method} {target} HTTP/1.1",
            f"Host: {self.netloc}",
            f"User-Agent: {self.user_agent}",
            "Accept: application/json",
            *headers,
        ]
        if body or method in ("PATCH", "POST", "PUT"):
            head.append(f"Content-Type: {ctype}")
            head.append(f"Content-Length: {len(body)}")
        wire.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        while True:
            line = await wire.readline(MAX_HEAD_LINE)
            parts = line.split(None, 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
                raise self.error(f"{what}: the answer is not HTTP/1.1: {line[:60]!r}")
            status = int(parts[1])
            answer: dict[str, str] = {}
            for _ in range(MAX_HEADERS + 1):
                h = await wire.readline(MAX_HEAD_LINE)
                if not h:
                    break
                name, _, value = h.partition(b":")
                answer[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
            else:
                raise self.error(f"{what}: the answer has more than {MAX_HEADERS} header lines")
            if 100 <= status < 200:
                continue  # an interim answer; the real one follows
            if parts[0] == b"HTTP/1.0" or "close" in answer.get("connection", "").lower():
                answer[_CLOSE] = "1"
            return status, answer

    async def exchange(
        self,
        method: str,
        target: str,
        *,
        headers: Sequence[str] = (),
        body: bytes = b"",
        ctype: str = "application/json",
        limit: int,
        what: str,
        timeout: float,
    ) -> tuple[int, bytes]:
        """One request and its whole answer (at most `limit` bytes when 2xx, MAX_ERROR_BODY otherwise), within
        `timeout`. A kept-alive connection the server closed meanwhile is replaced once (nothing of the answer
        had arrived, so the request was not taken)."""
        async with self.deadline(what, timeout):
            while True:
                wire = self._idle_wire()
                reused = wire is not None
                if wire is None:
                    wire = await self._connect(what)
                before = wire.received
                try:
                    status, answer = await self._send(wire, method, target, headers, body, ctype, what)
                    resp = Body(wire, answer, self.error)
                    data = await resp.read(limit if 200 <= status < 300 else MAX_ERROR_BODY, what)
                except (Closed, OSError, ssl.SSLError):
                    self.release(wire, keep=False)
                    if reused and wire.received == before and not self._closed:
                        continue
                    with self.translated(what):
                        raise
                except BaseException:
                    self.release(wire, keep=False)
                    raise
                self.release(wire, keep=resp.reusable and _CLOSE not in answer)
                return status, data
        raise AssertionError("unreachable")

    async def stream(
        self,
        method: str,
        target: str,
        *,
        headers: Sequence[str] = (),
        body: bytes = b"",
        ctype: str = "application/json",
        what: str,
        timeout: float,
    ) -> Stream:
        """A request on a connection of its own, up to its answer's head (within `timeout`); the caller reads
        the body from the Stream and closes it."""
        async with self.deadline(what, timeout):
            wire = await self._connect(what)
            try:
                with self.translated(what):
                    status, answer = await self._send(wire, method, target, headers, body, ctype, what)
                return Stream(self, wire, status, answer, what)
            except BaseException:
                self.release(wire, keep=False)
                raise


class TLSSetupError(ValueError):
    """A CA, certificate or key that cannot be used; `part` names which ("CA" or "client certificate")."""

    def __init__(self, part: str, reason: str) -> None:
        super().__init__(reason)
        self.part = part


def client_context(ca: bytes, cert: bytes, key: bytes, *, insecure: bool = False) -> ssl.SSLContext:
    """The client context of both stores: TLS 1.2 or later, the chain and the name verified against `ca` alone
    when given (as client-go and etcd's client do; the system's roots otherwise: loading them costs ~20 ms and a
    few MB), and the client pair when given. TLSSetupError names the part that is unusable, never its content."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        try:
            if ca:
                ctx.load_verify_locations(cadata=ca.decode("ascii", "replace"))
            else:
                ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        except (ssl.SSLError, ValueError) as e:
            raise TLSSetupError("CA", str(e)) from None
    if cert and key:
        try:
            load_cert_chain(ctx, cert, key)
        except (ssl.SSLError, OSError) as e:
            # Never the key itself: the reason from OpenSSL names no content.
            raise TLSSetupError("client certificate", str(e.strerror or e)) from None
    return ctx


def load_cert_chain(ctx: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    """ssl only loads a certificate and key from files: hand them over as memfds, which no other user can open,
    and which vanish with their descriptors (a 0600 file in a private directory, removed at once, without).
    ssl.SSLError or OSError when they cannot be used."""
    with contextlib.ExitStack() as stack:
        paths = [_secret_path(stack, name, data) for name, data in (("client-cert", cert), ("client-key", key))]
        ctx.load_cert_chain(paths[0], paths[1])


def _secret_path(stack: contextlib.ExitStack, name: str, data: bytes) -> str:
    try:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        import tempfile

        tmp = tempfile.mkdtemp(prefix="pyflannel-tls-")  # 0700
        path = os.path.join(tmp, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        stack.callback(shutil.rmtree, tmp, True)
        stack.callback(os.close, fd)
        _write_all(fd, data)
        return path
    stack.callback(os.close, fd)
    _write_all(fd, data)
    return f"/proc/self/fd/{fd}"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _reason(e: Closed) -> str:
    return f" ({oserror(e.args[0])})" if e.args and e.args[0] else ""


def oserror(e: BaseException) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"TLS: {e.verify_message or e}"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__
