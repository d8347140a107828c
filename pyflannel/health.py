"""The agent's HTTP endpoints on --healthz-ip:--healthz-port: /healthz and /readyz as upstream serves them, and
the pages the agent adds (/metrics, /status).

A small HTTP/1.1 responder on asyncio streams (one request per connection): a few fixed paths do not justify a
web framework in the agent. Requests are read within bounds (line length, header count, time) and anything
malformed gets a 400; no request, however broken, can stop the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping

log = logging.getLogger(__name__)

# A page: (content type, body), produced when requested.
Page = Callable[[], Awaitable[tuple[str, bytes]]]

MAX_LINE = 8192  # request line or one header line
MAX_HEADERS = 100
HEAD_TIMEOUT = 10.0  # to read the request line and headers
WRITE_TIMEOUT = 30.0  # to hand the answer to a client that reads slowly
MAX_CLIENTS = 512  # connections served at once; more get a 503 at once
BACKLOG = 1024  # bursts of connections (a scrape storm) wait in the kernel rather than being refused


class _BadRequest(Exception):
    pass


class HealthServer:
    def __init__(
        self,
        host: str,
        port: int,
        ready: Callable[[], tuple[bool, str]],
        pages: Mapping[str, Page] | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._ready = ready
        self._pages = dict(pages or {})
        self._server: asyncio.Server | None = None
        self._clients = 0

    async def start(self) -> None:
        """Listen; raises OSError for any address or port that cannot be served (the caller reports it)."""
        try:
            self._server = await asyncio.start_server(
                self._handle, self._host, self._port, limit=MAX_LINE, backlog=BACKLOG
            )
        except (ValueError, OverflowError, UnicodeError) as e:  # a port above 65535, an unencodable host
            raise OSError(f"{e}") from None
        paths = ", ".join(["/healthz", "/readyz", *self._pages])
        log.info("serving %s on %s:%d", paths, self._host, self._port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients += 1
        try:
            if self._clients > MAX_CLIENTS:
                await self._respond(writer, "503 Service Unavailable", "text/plain", b"too many clients\n")
                return
            try:
                async with asyncio.timeout(HEAD_TIMEOUT):
                    method, path = await _read_head(reader)
            except _BadRequest as e:
                await self._respond(writer, "400 Bad Request", "text/plain", f"bad request: {e}\n".encode())
                return
            try:
                status, ctype, body = await self._answer(method, path)
            except Exception as e:  # a bug in a page must cost one answer, never the server
                log.warning("health server: %s failed: %s: %s", path, type(e).__name__, e)
                status, ctype, body = "500 Internal Server Error", "text/plain", b"internal error\n"
            await self._respond(writer, status, ctype, b"" if method == "HEAD" else body, len(body))
        except (TimeoutError, ConnectionError):
            pass
        except Exception as e:  # the same for what the stream itself raises
            log.warning("health server: request failed: %s: %s", type(e).__name__, e)
        finally:
            self._clients -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"only GET and HEAD\n"
        if path == "/healthz":
            return "200 OK", "text/plain", b"ok\n"
        if path == "/readyz":
            ok, why = self._ready()
            # Ready: "ok", then the backend's status line if it has one (which WireGuard implementation).
            if ok:
                return "200 OK", "text/plain", ("ok\n" + (f"{why}\n" if why else "")).encode()
            return "503 Service Unavailable", "text/plain", f"{why}\n".encode()
        page = self._pages.get(path)
        if page is None:
            return "404 Not Found", "text/plain", b"not found\n"
        ctype, body = await page()
        return "200 OK", ctype, body

    async def _respond(
        self, writer: asyncio.StreamWriter, status: str, ctype: str, body: bytes, length: int | None = None
    ) -> None:
        allow = "Allow: GET, HEAD\r\n" if status.startswith("405") else ""
        size = len(body) if length is None else length
        head = f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {size}\r\n{allow}"
        head += "Connection: close\r\n\r\n"
        writer.write(head.encode() + body)
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, str]:
    """The request's method and path (query dropped); the headers are read and discarded."""
    line = await _line(reader)
    if not line:
        raise ConnectionError("closed before a request")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[2].startswith("HTTP/1."):
        raise _BadRequest("not an HTTP/1.x request line")
    method, target, _ = parts
    if not target.startswith("/"):
        raise _BadRequest("the target must be a path")
    for _ in range(MAX_HEADERS + 1):
        h = await _line(reader)
        if not h:
            return method, target.split("?", 1)[0]
        if ":" not in h or h[0] in " \t":
            raise _BadRequest("malformed header line")
    raise _BadRequest(f"more than {MAX_HEADERS} header lines")


async def _line(reader: asyncio.StreamReader) -> str:
    """One line without its CRLF ("" at the blank line or at EOF); _BadRequest if too long or not text."""
    try:
        raw = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as e:
        raw = e.partial
    except asyncio.LimitOverrunError:
        raise _BadRequest(f"a line longer than {MAX_LINE} bytes") from None
    text = raw.rstrip(b"\r\n")
    if not text.isascii() or any(c < 0x20 and c != 0x09 for c in text) or 0x7F in text:
        raise _BadRequest("control or non-ASCII bytes")
    return text.decode("ascii")
