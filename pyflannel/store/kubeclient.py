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

import builtins
import json
import ssl
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import quote, urlencode

from .base import StoreError
from .http import MAX_ERROR_BODY, Http
from .kubeconfig import ClientConfig, Creds

STRATEGIC = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"
# An object is at most etcd's request limit (1.5 MiB by default, 10 MiB at most as advised): far above, yet bounded.
MAX_OBJECT = 16 << 20
MAX_LIST = 256 << 20


class KubeClientError(StoreError):
    """The API server could not be reached, or answered with something that is not HTTP and JSON."""


class KubeApiError(KubeClientError):
    """The API server answered with an HTTP error status; `message` is the Status object's message."""

    def __init__(self, status: int, reason: str, message: str, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.reason = reason
        self.message = message


def path_segment(name: str) -> str:
    """A name as one URL path segment."""
    return quote(name, safe="")


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
        srv = config.server
        self._http = Http(
            srv.host,
            srv.port,
            netloc=srv.netloc,
            peer=f"the Kubernetes API at {srv.url}",
            error=KubeClientError,
            server_name=config.tls.server_name,
            user_agent=user_agent,
        )
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
        creds = await self._creds(what)
        self._use(creds)
        stream = await self._http.stream(
            "GET", self._target(path, query), headers=_auth(creds), what=what, timeout=self.timeout
        )
        try:
            if stream.status == 401:
                await self._creds(what, refresh=True)  # for the next watch; this one fails below
            if stream.status != 200:
                async with self._http.deadline(what, self.timeout):
                    data = await stream.read(MAX_ERROR_BODY)
                raise self._api_error(stream.status, data, what)
            async for lines in stream.lines(self.max_object, idle_timeout):
                yield lines
        finally:
            stream.close()

    async def close(self) -> None:
        self._http.close()

    # --- plumbing ---
    def _target(self, path: str, query: Mapping[str, str] | None) -> str:
        target = self.config.server.base_path + path
        return f"{target}?{urlencode(query)}" if query else target

    async def _creds(self, what: str, refresh: bool = False) -> Creds:
        try:
            return await self.config.credentials.get(refresh)
        except StoreError:
            raise
        except ValueError as e:  # ConfigError and KubeConfigError: the message is already clear
            raise KubeClientError(f"{what}: {e}") from None

    def _use(self, creds: Creds) -> None:
        """Connect with the TLS context of these credentials (rebuilt when a file or the plugin's pair changed)."""
        if self.config.server.scheme != "https":
            return
        key = (creds.cert, creds.key, self.config.tls.file_signature())
        if self._ssl is None or key != self._ssl_key:
            try:
                ctx = self.config.tls.context(creds.cert, creds.key)
            except ValueError as e:
                raise KubeClientError(str(e)) from None
            self._ssl, self._ssl_key = ctx, key
        self._http.use_tls(self._ssl)

    async def _exchange(
        self, method: str, target: str, creds: Creds, body: bytes, ctype: str, limit: int, what: str
    ) -> tuple[int, bytes]:
        self._use(creds)
        return await self._http.exchange(
            method, target, headers=_auth(creds), body=body, ctype=ctype, limit=limit, what=what, timeout=self.timeout
        )

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


def _auth(creds: Creds) -> list[str]:
    return [f"Authorization: {creds.authorization}"] if creds.authorization else []
