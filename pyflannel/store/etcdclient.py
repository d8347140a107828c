"""A small etcd v3 client: the gRPC gateway's JSON API (`POST /v3/kv/range`...) over the shared HTTP/1.1 transport.

etcd (3.4 and later) serves the gateway on its client URL by default. The store needs a handful of calls (range,
txn, lease grant/revoke/time-to-live, authenticate, watch); grpc and a generated client cost it ~14 MB of memory.
In JSON, bytes fields are base64 and int64 fields strings; an error answer is an HTTP status with
`{"error":..,"code":<gRPC code>,"message":..}`, raised here as EtcdApiError carrying that code.

Every call is marked as etcd's own client marks it with WithRequireLeader (`hasleader` metadata, as the
gateway's `Grpc-Metadata-Hasleader` header): a member that has lost its leader answers UNAVAILABLE "no leader" at
once instead of hanging until the deadline or serving a stale view. The auth token goes as `Authorization`; it
never reaches a message.
"""

from __future__ import annotations

import base64
import binascii
import json
import ssl
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from .base import StoreError
from .http import MAX_ERROR_BODY, Http, TLSSetupError, client_context

# A list of every lease: 5000 leases are ~2 MB; far above, yet bounded.
MAX_BODY = 256 << 20
# One watch answer: etcd batches at most 1000 revisions' events into one.
MAX_LINE = 64 << 20
_HASLEADER = "Grpc-Metadata-Hasleader: true"

# gRPC status codes by number, as the gateway reports them.
CODE_NAMES = {
    0: "OK",
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    6: "ALREADY_EXISTS",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION",
    10: "ABORTED",
    11: "OUT_OF_RANGE",
    12: "UNIMPLEMENTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    15: "DATA_LOSS",
    16: "UNAUTHENTICATED",
}
UNAVAILABLE = 14
OUT_OF_RANGE = 11  # also "required revision has been compacted"
PERMISSION_DENIED = 7
UNAUTHENTICATED = 16
# Codes that mean "try again later (perhaps elsewhere)" rather than "this request is wrong".
RETRY_CODES = frozenset({1, 2, 4, 8, 10, 13, 14})
# An answer without the gateway's JSON (a proxy's page): the code its status stands for.
_STATUS_CODES = {400: 3, 401: 16, 403: 7, 404: 5, 409: 10, 412: 9, 429: 8, 499: 1, 500: 13, 501: 12, 503: 14, 504: 4}


class EtcdUnavailableError(StoreError):
    """etcd could not be reached or did not answer in time; transient, worth retrying."""


class EtcdApiError(StoreError):
    """etcd answered with an error: `code` is its gRPC status code, `message` etcd's text."""

    def __init__(self, code: int, message: str, what: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{what}: {self.name}: {message}")

    @property
    def name(self) -> str:
        return CODE_NAMES.get(self.code, f"code {self.code}")

    @property
    def retryable(self) -> bool:
        return self.code in RETRY_CODES


class KeyValue:
    __slots__ = ("key", "lease", "mod_revision", "value")

    def __init__(self, key: bytes, value: bytes, mod_revision: int, lease: int) -> None:
        self.key = key
        self.value = value
        self.mod_revision = mod_revision
        self.lease = lease


class Range:
    __slots__ = ("count", "kvs", "more", "revision")

    def __init__(self, kvs: list[KeyValue], count: int, revision: int, more: bool = False) -> None:
        self.kvs = kvs
        self.count = count
        self.revision = revision
        self.more = more  # a `limit` left keys out


class Event:
    __slots__ = ("delete", "kv")

    def __init__(self, delete: bool, kv: KeyValue) -> None:
        self.delete = delete
        self.kv = kv


class WatchResponse:
    __slots__ = ("cancel_reason", "canceled", "compact_revision", "created", "events")

    def __init__(
        self, events: list[Event], created: bool, canceled: bool, cancel_reason: str, compact_revision: int
    ) -> None:
        self.events = events
        self.created = created
        self.canceled = canceled
        self.cancel_reason = cancel_reason
        self.compact_revision = compact_revision


# --- txn pieces ------------------------------------------------------------------------------------------


def compare_version(key: str, version: int) -> dict[str, Any]:
    """True while `key` has this version (0: the key does not exist)."""
    return {"key": _b64(key.encode()), "target": "VERSION", "result": "EQUAL", "version": str(version)}


def compare_mod(key: str, mod_revision: int) -> dict[str, Any]:
    """True while `key` was last written at this revision."""
    return {"key": _b64(key.encode()), "target": "MOD", "result": "EQUAL", "mod_revision": str(mod_revision)}


def op_put(key: str, value: str, lease: int = 0) -> dict[str, Any]:
    put: dict[str, Any] = {"key": _b64(key.encode()), "value": _b64(value.encode())}
    if lease:
        put["lease"] = str(lease)
    return {"request_put": put}


def op_delete(key: str) -> dict[str, Any]:
    return {"request_delete_range": {"key": _b64(key.encode())}}


def prefix_range_end(prefix: bytes) -> bytes:
    """The range end that makes a range cover every key starting with `prefix`."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # every key


def tls_context(ca: bytes | None, cert: bytes | None, key: bytes | None) -> ssl.SSLContext:
    """The client context (store/http.py's); StoreError naming the part that is unusable."""
    try:
        return client_context(ca or b"", cert or b"", key or b"")
    except TLSSetupError as e:
        if e.part == "CA":
            raise StoreError(f"the etcd CA file holds no usable PEM certificate: {e}") from None
        raise StoreError(f"the etcd client certificate or key cannot be used: {e}") from None


# --- the client ------------------------------------------------------------------------------------------


class EtcdClient:
    """One etcd member. `token` (set by the caller after authenticate) goes with every call."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        label: str,
        tls: ssl.SSLContext | None = None,
        max_body: int = MAX_BODY,
        max_line: int = MAX_LINE,
    ) -> None:
        self.token: str | None = None
        self.max_body = max_body
        self.max_line = max_line
        self._http = Http(host, port, netloc=label, peer=f"etcd member {label}", error=EtcdUnavailableError, tls=tls)

    def close(self) -> None:
        """Closes every connection: calls and watches still open on them fail at once."""
        self._http.close()

    def _headers(self, token: bool = True) -> list[str]:
        if token and self.token:
            return [_HASLEADER, f"Authorization: {self.token}"]
        return [_HASLEADER]

    async def _call(
        self, path: str, request: dict[str, Any], *, what: str, timeout: float, token: bool = True
    ) -> dict[str, Any]:
        body = json.dumps(request, separators=(",", ":")).encode()
        status, data = await self._http.exchange(
            "POST", path, headers=self._headers(token), body=body, limit=self.max_body, what=what, timeout=timeout
        )
        if status != 200:
            raise _api_error(status, data, what)
        obj = _json(data, what)
        if not isinstance(obj, dict):
            raise EtcdUnavailableError(f"{what}: the answer is not a JSON object")
        return obj

    # --- kv ---
    async def range(
        self,
        key: bytes,
        range_end: bytes = b"",
        *,
        count_only: bool = False,
        limit: int = 0,
        revision: int = 0,
        what: str,
        timeout: float,
    ) -> Range:
        """Keys in [key, range_end), in key order; at most `limit` of them (0: all), as of `revision` (0: now)."""
        req: dict[str, Any] = {"key": _b64(key)}
        if range_end:
            req["range_end"] = _b64(range_end)
        if count_only:
            req["count_only"] = True
        if limit:
            req["limit"] = str(limit)
        if revision:
            req["revision"] = str(revision)
        resp = await self._call("/v3/kv/range", req, what=what, timeout=timeout)
        try:
            kvs = [_kv(kv) for kv in resp.get("kvs") or ()]
            return Range(kvs, int(resp.get("count", 0)), _revision(resp), resp.get("more") is True)
        except (AttributeError, KeyError, TypeError, ValueError, binascii.Error) as e:
            raise EtcdUnavailableError(f"{what}: a malformed answer ({type(e).__name__}: {str(e)[:80]})") from None

    async def txn(
        self, compare: Sequence[dict[str, Any]], success: Sequence[dict[str, Any]], *, what: str, timeout: float
    ) -> bool:
        """Whether every comparison held (and `success` was applied)."""
        resp = await self._call(
            "/v3/kv/txn", {"compare": list(compare), "success": list(success)}, what=what, timeout=timeout
        )
        return resp.get("succeeded") is True

    # --- leases ---
    async def grant(self, ttl: int, *, what: str, timeout: float) -> tuple[int, int]:
        """(lease ID, granted TTL)."""
        resp = await self._call("/v3/lease/grant", {"TTL": str(ttl)}, what=what, timeout=timeout)
        if resp.get("error"):
            raise StoreError(f"{what}: {str(resp['error'])[:200]}")
        try:
            return int(resp["ID"]), int(resp.get("TTL", 0))
        except (KeyError, TypeError, ValueError):
            raise EtcdUnavailableError(f"{what}: a malformed answer (no lease ID)") from None

    async def revoke(self, lease: int, *, what: str, timeout: float) -> None:
        await self._call("/v3/lease/revoke", {"ID": str(lease)}, what=what, timeout=timeout)

    async def time_to_live(self, lease: int, *, what: str, timeout: float) -> tuple[int, int]:
        """(remaining TTL, -1 once expired or revoked; how many keys are attached)."""
        resp = await self._call("/v3/lease/timetolive", {"ID": str(lease), "keys": True}, what=what, timeout=timeout)
        try:
            return int(resp.get("TTL", -1)), len(resp.get("keys") or ())
        except (TypeError, ValueError):
            raise EtcdUnavailableError(f"{what}: a malformed answer") from None

    # --- auth ---
    async def authenticate(self, name: str, password: str, *, what: str, timeout: float) -> str:
        """A token for `name`. Sent without the current token: etcd checks one sent along, so a stale one would
        make logging in fail."""
        resp = await self._call(
            "/v3/auth/authenticate", {"name": name, "password": password}, what=what, timeout=timeout, token=False
        )
        token = resp.get("token")
        return token if isinstance(token, str) else ""

    # --- watch ---
    async def watch(
        self, key: bytes, range_end: bytes, start_revision: int, *, what: str, timeout: float
    ) -> AsyncGenerator[list[WatchResponse], None]:
        """The watch's answers from `start_revision`, in batches of what has arrived; ends when etcd ends the
        stream. The request body is complete: the gateway (Go's HTTP/1 server) answers only once it has read it,
        so nothing more (no progress request) can be sent on this stream. `timeout` bounds the opening only."""
        req = {
            "create_request": {"key": _b64(key), "range_end": _b64(range_end), "start_revision": str(start_revision)}
        }
        body = json.dumps(req, separators=(",", ":")).encode()
        stream = await self._http.stream(
            "POST", "/v3/watch", headers=self._headers(), body=body, what=what, timeout=timeout
        )
        try:
            if stream.status != 200:
                async with self._http.deadline(what, timeout):
                    data = await stream.read(MAX_ERROR_BODY)
                raise _api_error(stream.status, data, what)
            async for lines in stream.lines(self.max_line, None):
                yield [_watch_response(line, what) for line in lines]
        finally:
            stream.close()


# --- decoding --------------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise TypeError("a bytes field is not a string")
    # Strict (only the alphabet, padding only at the end) in C: b64decode's validate=True checks with a regex
    # first, a third of the time of listing 5000 leases' keys and values.
    return binascii.a2b_base64(text, strict_mode=True)


def _kv(obj: Any) -> KeyValue:
    return KeyValue(
        _unb64(obj["key"]), _unb64(obj.get("value", "")), int(obj.get("mod_revision", 0)), int(obj.get("lease", 0))
    )


def _revision(resp: dict[str, Any]) -> int:
    header = resp.get("header")
    return int(header.get("revision", 0)) if isinstance(header, dict) else 0


def _json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):  # not JSON, a number past int()'s limit, nested too deeply
        # Not echoed: this answers /v3/auth/authenticate too, whose body carries the token.
        raise EtcdUnavailableError(f"{what}: the answer is not JSON ({len(data)} bytes)") from None


def _api_error(status: int, data: bytes, what: str) -> StoreError:
    """The gateway's error answer: its gRPC code and message; a page that is not the gateway's (a proxy's) is
    named by its status."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        obj = None
    code = _STATUS_CODES.get(status, 2)
    if isinstance(obj, dict) and ("code" in obj or "message" in obj or "error" in obj):
        if isinstance(obj.get("code"), int) and not isinstance(obj["code"], bool):
            code = obj["code"]
        message = str(obj.get("message") or obj.get("error") or "")
    else:
        message = f"HTTP {status}: {data[:200].decode('utf-8', 'replace')!r}"
    return EtcdApiError(code, message[:300], what)


def _watch_response(line: bytes, what: str) -> WatchResponse:
    obj = _json(line, what)
    if not isinstance(obj, dict):
        raise EtcdUnavailableError(f"{what}: a watch answer is not a JSON object")
    err = obj.get("error")
    if err is not None:
        # grpc-gateway's stream error: {"error":{"grpc_code":14,"http_code":503,"message":..}}
        if not isinstance(err, dict):
            raise EtcdApiError(2, str(err)[:300], what)
        code = err.get("grpc_code", err.get("code", 2))
        return_code = code if isinstance(code, int) and not isinstance(code, bool) else 2
        raise EtcdApiError(return_code, str(err.get("message", ""))[:300], what)
    res = obj.get("result")
    if not isinstance(res, dict):
        raise EtcdUnavailableError(f"{what}: a watch answer without a result: {line[:100]!r}")
    try:
        events = [Event(ev.get("type") == "DELETE", _kv(ev["kv"])) for ev in res.get("events") or ()]
        return WatchResponse(
            events,
            res.get("created") is True,
            res.get("canceled") is True,
            str(res.get("cancel_reason", ""))[:300],
            int(res.get("compact_revision", 0)),
        )
    except (AttributeError, KeyError, TypeError, ValueError, binascii.Error) as e:
        raise EtcdUnavailableError(f"{what}: a malformed watch answer ({type(e).__name__}: {str(e)[:80]})") from None
