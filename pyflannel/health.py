"""The /healthz and /readyz endpoints, as upstream serves them on --healthz-ip:--healthz-port.

A tiny HTTP/1.0 responder on asyncio streams: two fixed paths do not justify a web framework in the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


class HealthServer:
    def __init__(self, host: str, port: int, ready: Callable[[], tuple[bool, str]]) -> None:
        self._host = host
        self._port = port
        self._ready = ready
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen; raises OSError for any address or port that cannot be served (the caller reports it)."""
        try:
            self._server = await asyncio.start_server(self._handle, self._host, self._port)
        except (ValueError, OverflowError, UnicodeError) as e:  # a port above 65535, an unencodable host
            raise OSError(f"{e}") from None
        log.info("serving /healthz and /readyz on %s:%d", self._host, self._port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            # Drain the headers so clients that wait for us to read them do not see a reset.
            while True:
                h = await asyncio.wait_for(reader.readline(), 5)
                if h in (b"\r\n", b"\n", b""):
                    break
            parts = line.decode("latin-1").split()
            path = parts[1] if len(parts) >= 2 else ""
            if path == "/healthz":
                status, body = "200 OK", "ok\n"
            elif path == "/readyz":
                ok, why = self._ready()
                # Ready: "ok", then the backend's status line if it has one (which WireGuard implementation).
                ready = "ok\n" + (f"{why}\n" if why else "")
                status, body = ("200 OK", ready) if ok else ("503 Service Unavailable", f"{why}\n")
            else:
                status, body = "404 Not Found", "not found\n"
            data = body.encode()
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(data)}\r\n"
                f"Connection: close\r\n\r\n".encode()
                + data
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
