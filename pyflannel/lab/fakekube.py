"""A fake Kubernetes API server over real HTTP, with the semantics flannel relies on.

Served: Nodes (create, get, list, watch, patch, patch of the `status` subresource, replace, delete) and Pods
(create, get, list). Semantics kept from the real server:
- one resourceVersion counter for the whole store, bumped on every change and stamped into the object;
- list returns the collection's resourceVersion; watch from a resourceVersion streams every later change as
  JSON lines over a chunked response, with BOOKMARK events when `allowWatchBookmarks=true`;
- a bounded event history: a watch from a resourceVersion older than the history gets an ERROR event with a
  410 Expired Status (as the watch cache does), also mid-stream when the history is expired under it;
- strategic-merge patch (maps merged, `null` deletes, `status.conditions`/`status.addresses` merged by
  `type`), JSON merge patch, and the status subresource keeping `spec`;
- 404 for missing objects, 409 for an existing name or a stale `metadata.resourceVersion`, 400 for
  annotations that are not strings, 422 for podCIDRs that are no CIDRs or no dual-stack pair (the real
  validation), 422 for an update that changes podCIDRs once set (they are immutable); `spec.podCIDR` is
  always `spec.podCIDRs[0]` (the v1 conversion).

Test side channel under `/_admin/`: `POST expire` (drop the event history; running watches get 410),
`POST drop` (cut every watch stream mid-stream, without the terminating chunk), `POST fail`
(`{"method","path","status","count"}`: answer the next `count` matching requests with that status),
`GET stats` (request counters), `GET state`.

Optionally as the real server's authentication front: HTTPS (`tls_cert`/`tls_key`), client certificates
verified against `client_ca`, bearer tokens (`tokens`, a set the test may change: rotation) and basic auth
(`basic`, (user, password) pairs). With any of them set, a TCP request without valid credentials gets 401;
the unix socket (the tests' own channel) is never authenticated. `GET /_admin/stats` counts `auth <how>`.

Run in process (`FakeKube().start()`, returns the URL) or as a process, for example inside a network namespace:
`python -m pyflannel.lab.fakekube --listen 192.168.77.3:6443 --state /tmp/x/state.json --unix /tmp/x/kube.sock`.
The unix socket serves the same API and lets a test in another network namespace reach the fake.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import http.client
import ipaddress
import json
import os
import re
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time
from base64 import b64decode
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

# Lists whose items a strategic-merge patch merges by a key (from the Node type's patchMergeKey tags).
MERGE_KEYS: dict[tuple[str, ...], str] = {
    ("status", "conditions"): "type",
    ("status", "addresses"): "type",
    ("spec", "taints"): "key",
}


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message

    def status(self) -> dict[str, Any]:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }


def strategic_merge(orig: Any, patch: Any, path: tuple[str, ...] = (), merge_keys: bool = True) -> Any:
    """Apply a strategic-merge patch (merge_keys=True) or an RFC 7386 merge patch (False)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if not isinstance(orig, dict):
        orig = {}
    if merge_keys and patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    out = copy.deepcopy(orig)
    for k, v in patch.items():
        if merge_keys and k.startswith("$"):
            continue  # $setElementOrder/..., $retainKeys: ordering hints we do not need
        if v is None:
            out.pop(k, None)
            continue
        p = (*path, k)
        mk = MERGE_KEYS.get(p) if merge_keys else None
        if mk is not None and isinstance(v, list):
            out[k] = _merge_list(out.get(k) or [], v, mk, p)
        elif isinstance(v, dict):
            out[k] = strategic_merge(out.get(k), v, p, merge_keys)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _merge_list(orig: list[Any], patch: list[Any], key: str, path: tuple[str, ...]) -> list[Any]:
    out = [copy.deepcopy(x) for x in orig]
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            raise ApiError(400, "BadRequest", f"{'.'.join(path)}: every item needs the merge key {key!r}")
        idx = next((i for i, x in enumerate(out) if isinstance(x, dict) and x.get(key) == item[key]), None)
        if item.get("$patch") == "delete":
            if idx is not None:
                del out[idx]
        elif idx is None:
            out.append(strategic_merge({}, item, path))
        else:
            out[idx] = strategic_merge(out[idx], item, path)
    return out


@dataclass
class Event:
    rv: int
    resource: str
    type: str
    obj: dict[str, Any]


@dataclass
class Failure:
    method: str
    path: str
    status: int
    count: int


@dataclass
class State:
    """Everything the server holds, guarded by `cond`."""

    history_size: int = 1000
    bookmark_interval: float = 1.0
    state_file: str | None = None
    rv: int = 1
    floor: int = 1  # a watch from a resourceVersion below this one gets 410
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)  # "<namespace>/<name>"
    history: collections.deque[Event] = field(default_factory=collections.deque)
    drop_gen: int = 0
    expire_gen: int = 0
    closing: bool = False
    failures: list[Failure] = field(default_factory=list)
    stats: collections.Counter[str] = field(default_factory=collections.Counter)
    cond: threading.Condition = field(default_factory=threading.Condition)
    # Authentication of TCP requests; all empty: none required.
    tokens: set[str] = field(default_factory=set)
    basic: set[tuple[str, str]] = field(default_factory=set)
    client_certs: bool = False  # a client certificate the TLS layer verified authenticates too

    # --- persistence -------------------------------------------------------------------------------
    def load(self) -> None:
        if not self.state_file or not os.path.exists(self.state_file):
            return
        with open(self.state_file) as f:
            data = json.load(f)
        self.rv = self.floor = int(data["rv"])
        self.nodes = data.get("nodes", {})
        self.pods = data.get("pods", {})

    def _save(self) -> None:
        if not self.state_file:
            return
        tmp = f"{self.state_file}.tmp"
        with open(tmp, "w") as f:
            json.dump({"rv": self.rv, "nodes": self.nodes, "pods": self.pods}, f)
        os.replace(tmp, self.state_file)

    # --- changes (called with cond held) -----------------------------------------------------------
    def _record(self, resource: str, etype: str, obj: dict[str, Any]) -> dict[str, Any]:
        self.rv += 1
        obj.setdefault("metadata", {})["resourceVersion"] = str(self.rv)
        self.history.append(Event(self.rv, resource, etype, copy.deepcopy(obj)))
        while len(self.history) > self.history_size:
            self.floor = self.history.popleft().rv
        self._save()
        self.cond.notify_all()
        return copy.deepcopy(obj)

    def table(self, resource: str) -> dict[str, dict[str, Any]]:
        return self.nodes if resource == "nodes" else self.pods

    def create(self, resource: str, key: str, obj: dict[str, Any]) -> dict[str, Any]:
        tab = self.table(resource)
        if key in tab:
            raise ApiError(409, "AlreadyExists", f'{resource} "{key}" already exists')
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("annotations", {})
        meta["uid"] = f"uid-{self.rv + 1}"
        meta["creationTimestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        obj.setdefault("apiVersion", "v1")
        obj.setdefault("kind", "Node" if resource == "nodes" else "Pod")
        _validate(obj)
        tab[key] = obj
        return self._record(resource, "ADDED", obj)

    def update(self, resource: str, key: str, new: dict[str, Any], expect_rv: str | None) -> dict[str, Any]:
        tab = self.table(resource)
        old = self.get(resource, key)
        if expect_rv and expect_rv != old["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {resource} "{key}": the object has been modified; '
                "please apply your changes to the latest version and try again",
            )
        new["metadata"]["name"] = old["metadata"]["name"]
        new["metadata"]["uid"] = old["metadata"]["uid"]
        _validate(new)
        old_cidrs = (old.get("spec") or {}).get("podCIDRs") or []
        if resource == "nodes" and old_cidrs and old_cidrs != (new.get("spec") or {}).get("podCIDRs"):
            # ValidateNodeUpdate: only the controller manager's first assignment; a new podCIDR means a new Node.
            raise _invalid(
                "Node", key, 'spec.podCIDRs: Forbidden: node updates may not change podCIDR except from "" to valid'
            )
        if new == old:
            return copy.deepcopy(old)  # a no-op write does not bump the resourceVersion
        tab[key] = new
        return self._record(resource, "MODIFIED", new)

    def delete(self, resource: str, key: str) -> dict[str, Any]:
        tab = self.table(resource)
        obj = self.get(resource, key)
        del tab[key]
        return self._record(resource, "DELETED", obj)

    def get(self, resource: str, key: str) -> dict[str, Any]:
        obj = self.table(resource).get(key)
        if obj is None:
            kind = resource[:-1] if resource.endswith("s") else resource
            raise ApiError(404, "NotFound", f'{kind}s "{key.rsplit("/", 1)[-1]}" not found')
        return copy.deepcopy(obj)

    def expire(self) -> None:
        """Forget the history; watches running now end with 410 as if they had fallen behind."""
        self.history.clear()
        self.floor = self.rv
        self.expire_gen += 1
        self.cond.notify_all()

    def take_failure(self, method: str, path: str) -> int | None:
        for f in self.failures:
            if f.count > 0 and f.method == method and re.fullmatch(f.path, path):
                f.count -= 1
                return f.status
        return None


def _validate(obj: dict[str, Any]) -> None:
    meta = obj.get("metadata", {})
    for field_name in ("annotations", "labels"):
        for k, v in (meta.get(field_name) or {}).items():
            if not isinstance(v, str):
                raise ApiError(400, "BadRequest", f"metadata.{field_name}[{k}]: expected a string, got {json.dumps(v)}")
    spec = obj.get("spec", {})
    if "podCIDRs" in spec and not (
        isinstance(spec["podCIDRs"], list) and all(isinstance(c, str) for c in spec["podCIDRs"])
    ):
        raise ApiError(400, "BadRequest", "spec.podCIDRs: expected a list of strings")
    if "podCIDR" in spec and not isinstance(spec["podCIDR"], str):
        raise ApiError(400, "BadRequest", "spec.podCIDR: expected a string")
    _normalise_pod_cidrs(spec)
    _validate_pod_cidrs(obj.get("kind", "Node"), meta.get("name", ""), spec.get("podCIDRs") or [])


def _normalise_pod_cidrs(spec: dict[str, Any]) -> None:
    """What the v1 conversion of a NodeSpec does: podCIDRs is the authoritative list, podCIDR always its first
    entry; a client that sends only podCIDR (an old one) gets podCIDRs [podCIDR]."""
    cidrs = spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    spec.pop("podCIDR", None)
    spec.pop("podCIDRs", None)
    if cidrs:
        spec["podCIDR"] = cidrs[0]
        spec["podCIDRs"] = list(cidrs)


_CIDR_RE = re.compile(r"[0-9A-Fa-f.:]+/[0-9]{1,3}")


def _validate_pod_cidrs(kind: str, name: str, cidrs: list[str]) -> None:
    """ValidateNode's podCIDRs rules: each a CIDR (Go's ParseCIDR: host bits allowed, no netmask form, no
    zone), and two at most, one of each family (a dual-stack pair). 422 Invalid, as the real server answers."""
    families: list[int] = []
    for i, c in enumerate(cidrs):
        try:
            if not _CIDR_RE.fullmatch(c):
                raise ValueError(c)
            families.append(ipaddress.ip_network(c, strict=False).version)
        except ValueError:
            raise _invalid(
                kind, name, f"spec.podCIDRs[{i}]: Invalid value: {json.dumps(c)}: must be a valid CIDR value, "
                "(e.g. 10.9.8.0/24 or 2001:db8::/64)",
            ) from None  # fmt: skip
    if len(cidrs) > 2 or (len(cidrs) == 2 and families[0] == families[1]):
        raise _invalid(
            kind, name, f"spec.podCIDRs: Invalid value: {json.dumps(cidrs)}: "
            "may specify no more than one CIDR for each IP family",
        )  # fmt: skip


def _invalid(kind: str, name: str, detail: str) -> ApiError:
    return ApiError(422, "Invalid", f'{kind} "{name}" is invalid: {detail}')


def _go_bool(v: str | None) -> bool:
    # The API server parses query booleans with Go's strconv.ParseBool; kubernetes_asyncio sends "True".
    return v in ("1", "t", "T", "TRUE", "true", "True")


_NODE_RE = re.compile(r"/api/v1/nodes(?:/([^/]+)(/status)?)?")
_POD_RE = re.compile(r"/api/v1/(?:namespaces/([^/]+)/)?pods(?:/([^/]+))?")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any  # ThreadingHTTPServer or the unix variant, both carrying `.state`
    _raw = b""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    @property
    def state(self) -> State:
        st: State = self.server.state
        return st

    # --- plumbing ----------------------------------------------------------------------------------
    def _body(self) -> Any:
        raw = self._raw
        if not raw:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise ApiError(400, "BadRequest", f"body is not JSON: {e}") from None

    def _send(self, code: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authenticated(self) -> str:
        """How this request authenticated ("" when it did not); the unix socket needs nothing."""
        st = self.state
        if isinstance(self.server, _UnixServer) or not (st.tokens or st.basic or st.client_certs):
            return "none"
        kind, _, cred = (self.headers.get("Authorization") or "").partition(" ")
        with st.cond:
            if kind == "Bearer" and cred in st.tokens:
                return "token"
            if kind == "Basic":
                with contextlib.suppress(ValueError):
                    user, _, password = b64decode(cred, validate=True).decode().partition(":")
                    if (user, password) in st.basic:
                        return "basic"
        conn = self.connection
        if st.client_certs and isinstance(conn, ssl.SSLSocket) and conn.getpeercert():
            return "cert"
        return ""

    def _dispatch(self, method: str) -> None:
        # Read the body first: an early error answer must not leave it in the keep-alive connection.
        n = int(self.headers.get("Content-Length") or 0)
        self._raw = self.rfile.read(n) if n else b""
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        st = self.state
        try:
            how = self._authenticated()
            if not isinstance(self.server, _UnixServer):
                with st.cond:
                    st.stats[f"auth {how or 'refused'}"] += 1
            if not how:
                raise ApiError(401, "Unauthorized", "Unauthorized")
            with st.cond:
                st.stats[f"{method} {url.path}"] += 1
                injected = st.take_failure(method, url.path)
            if injected is not None:
                raise ApiError(injected, "InternalError" if injected >= 500 else "Injected", "injected failure")
            if url.path.startswith("/_admin/"):
                self._admin(method, url.path[len("/_admin/") :])
                return
            m = _NODE_RE.fullmatch(url.path)
            if m:
                self._nodes(method, m.group(1), bool(m.group(2)), query)
                return
            m = _POD_RE.fullmatch(url.path)
            if m:
                self._pods(method, m.group(1), m.group(2), query)
                return
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({url.path})")
        except ApiError as e:
            self._send(e.code, e.status())

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # --- resources ---------------------------------------------------------------------------------
    def _list(self, resource: str, namespace: str | None = None) -> dict[str, Any]:
        st = self.state
        with st.cond:
            items = [copy.deepcopy(o) for k, o in sorted(st.table(resource).items())]
            if namespace:
                items = [o for o in items if o["metadata"].get("namespace") == namespace]
            kind = "NodeList" if resource == "nodes" else "PodList"
            return {"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": str(st.rv)}, "items": items}

    def _nodes(self, method: str, name: str | None, status: bool, query: dict[str, str]) -> None:
        st = self.state
        body = self._body() if method in ("POST", "PUT", "PATCH") else None
        if name is None:
            if method == "GET" and _go_bool(query.get("watch")):
                self._watch("nodes", query)
            elif method == "GET":
                self._send(200, self._list("nodes"))
            elif method == "POST":
                if not isinstance(body, dict) or not body.get("metadata", {}).get("name"):
                    raise ApiError(400, "BadRequest", "a node needs metadata.name")
                with st.cond:
                    self._send(201, st.create("nodes", body["metadata"]["name"], body))
            else:
                raise ApiError(405, "MethodNotAllowed", f"{method} is not allowed on the node collection")
            return
        with st.cond:
            if method == "GET":
                self._send(200, st.get("nodes", name))
            elif method == "DELETE":
                st.delete("nodes", name)
                self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
            elif method == "PUT":
                if not isinstance(body, dict):
                    raise ApiError(400, "BadRequest", "body must be a Node")
                old = st.get("nodes", name)
                new = copy.deepcopy(body)
                if status:
                    new["spec"] = old.get("spec", {})
                self._send(200, st.update("nodes", name, new, body.get("metadata", {}).get("resourceVersion")))
            elif method == "PATCH":
                self._send(200, self._patch(name, body, status))
            else:
                raise ApiError(405, "MethodNotAllowed", f"{method} is not allowed on a node")

    def _patch(self, name: str, body: Any, status: bool) -> dict[str, Any]:
        st = self.state
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        if ctype not in ("application/strategic-merge-patch+json", "application/merge-patch+json"):
            raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format: {ctype}")
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "a patch must be a JSON object")
        old = st.get("nodes", name)
        new = strategic_merge(old, body, merge_keys=ctype.startswith("application/strategic"))
        if status:
            new["spec"] = old.get("spec", {})  # the status subresource ignores spec, as the node strategy does
        new.setdefault("metadata", {})["resourceVersion"] = old["metadata"]["resourceVersion"]
        expect = body.get("metadata", {}).get("resourceVersion") if isinstance(body.get("metadata"), dict) else None
        with st.cond:
            st.stats["patch"] += 1
        return st.update("nodes", name, new, expect)

    def _pods(self, method: str, namespace: str | None, name: str | None, query: dict[str, str]) -> None:
        st = self.state
        if name is None:
            if method == "GET":
                self._send(200, self._list("pods", namespace))
            elif method == "POST" and namespace:
                body = self._body()
                if not isinstance(body, dict) or not body.get("metadata", {}).get("name"):
                    raise ApiError(400, "BadRequest", "a pod needs metadata.name")
                body["metadata"]["namespace"] = namespace
                with st.cond:
                    self._send(201, st.create("pods", f"{namespace}/{body['metadata']['name']}", body))
            else:
                raise ApiError(405, "MethodNotAllowed", f"{method} is not allowed here")
            return
        if namespace is None:
            raise ApiError(404, "NotFound", "pods are namespaced")
        with st.cond:
            if method == "GET":
                self._send(200, st.get("pods", f"{namespace}/{name}"))
            elif method == "DELETE":
                st.delete("pods", f"{namespace}/{name}")
                self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
            else:
                raise ApiError(405, "MethodNotAllowed", f"{method} is not allowed on a pod")

    # --- watch -------------------------------------------------------------------------------------
    def _chunk(self, obj: dict[str, Any]) -> None:
        data = json.dumps(obj).encode() + b"\n"
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _watch(self, resource: str, query: dict[str, str]) -> None:
        st = self.state
        bookmarks = _go_bool(query.get("allowWatchBookmarks"))
        timeout = float(query.get("timeoutSeconds") or 1800)
        rv_param = query.get("resourceVersion", "")
        with st.cond:
            st.stats["watch"] += 1
            gen = st.drop_gen
            egen = st.expire_gen
            initial: list[dict[str, Any]] = []
            if rv_param in ("", "0"):
                # No starting point: the real server sends every object as ADDED first.
                initial = [{"type": "ADDED", "object": copy.deepcopy(o)} for _, o in sorted(st.table(resource).items())]
                last = st.rv
            else:
                try:
                    last = int(rv_param)
                except ValueError:
                    raise ApiError(400, "BadRequest", f"invalid resourceVersion {rv_param!r}") from None
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        deadline = time.monotonic() + timeout
        next_bookmark = time.monotonic() + st.bookmark_interval
        try:
            for ev in initial:
                self._chunk(ev)
            while True:
                out: list[dict[str, Any]] = []
                with st.cond:
                    while True:
                        now = time.monotonic()
                        if st.closing or st.drop_gen != gen:
                            self._abort()
                            return
                        if last < st.floor or egen != st.expire_gen:
                            gone = ApiError(410, "Expired", f"too old resource version: {last} ({st.floor})")
                            out.append({"type": "ERROR", "object": gone.status()})
                            break
                        evs = [e for e in st.history if e.rv > last]
                        if evs or now >= deadline or (bookmarks and now >= next_bookmark):
                            for e in evs:
                                if e.resource == resource:
                                    out.append({"type": e.type, "object": copy.deepcopy(e.obj)})
                            last = st.rv
                            break
                        st.cond.wait(max(0.01, min(deadline, next_bookmark) - now))
                for ev in out:
                    self._chunk(ev)
                if out and out[-1]["type"] == "ERROR":
                    break
                now = time.monotonic()
                if bookmarks and now >= next_bookmark:
                    kind = "Node" if resource == "nodes" else "Pod"
                    self._chunk(
                        {
                            "type": "BOOKMARK",
                            "object": {"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": str(last)}},
                        }
                    )
                    next_bookmark = now + st.bookmark_interval
                if now >= deadline:
                    break
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True
        finally:
            with st.cond:
                st.stats["watch_closed"] += 1

    def _abort(self) -> None:
        """Cut the stream the way a dying server or a middlebox does: no terminating chunk, a reset."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    # --- admin -------------------------------------------------------------------------------------
    def _admin(self, method: str, what: str) -> None:
        st = self.state
        body = self._body() if method in ("POST", "PUT", "PATCH") else None
        with st.cond:
            if method == "POST" and what == "expire":
                st.expire()
                self._send(200, {"floor": st.floor})
            elif method == "POST" and what == "drop":
                st.drop_gen += 1
                st.cond.notify_all()
                self._send(200, {"drop_gen": st.drop_gen})
            elif method == "POST" and what == "fail":
                if not isinstance(body, dict):
                    raise ApiError(400, "BadRequest", "fail needs {method, path, status, count}")
                st.failures.append(
                    Failure(str(body["method"]), str(body["path"]), int(body["status"]), int(body.get("count", 1)))
                )
                self._send(200, {})
            elif method == "GET" and what == "stats":
                self._send(200, dict(st.stats))
            elif method == "GET" and what == "state":
                self._send(200, {"rv": st.rv, "floor": st.floor, "nodes": st.nodes, "pods": st.pods})
            else:
                raise ApiError(404, "NotFound", f"no admin endpoint {method} {what}")


class _TCPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    state: State
    tls: ssl.SSLContext | None = None

    def get_request(self) -> tuple[Any, Any]:
        conn, addr = super().get_request()
        # As Go's net/http does: without it, a kept-alive answer written as head and body waits ~40 ms for the
        # client's delayed ACK (Nagle), which no real API server makes its clients pay.
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            # The handshake happens at the handler's first read, in its own thread, not in the accept loop.
            conn = self.tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        return conn, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A refused handshake (a client that does not trust our CA, or has no certificate) is part of the tests.
        if not isinstance(sys.exc_info()[1], (ssl.SSLError, ConnectionError)):
            super().handle_error(request, client_address)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup of the address; a namespace has no resolver.
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    state: State

    def get_request(self) -> tuple[Any, Any]:
        conn, _ = super().get_request()
        return conn, ("unix", 0)  # BaseHTTPRequestHandler wants a (host, port) pair


class FakeKube:
    """The server; `start()` serves in background threads and returns the base URL."""

    def __init__(
        self,
        host: str | None = "127.0.0.1",  # None: only the unix socket
        port: int = 0,
        *,
        unix_path: str | None = None,
        state_file: str | None = None,
        history_size: int = 1000,
        bookmark_interval: float = 1.0,
        tls_cert: str = "",
        tls_key: str = "",
        client_ca: str = "",
        tokens: set[str] | None = None,
        basic: set[tuple[str, str]] | None = None,
    ) -> None:
        self.state = State(history_size=history_size, bookmark_interval=bookmark_interval, state_file=state_file)
        self.state.load()
        self.state.tokens = set(tokens or ())
        self.state.basic = set(basic or ())
        self.state.client_certs = bool(client_ca)
        self.tls: ssl.SSLContext | None = None
        if tls_cert:
            self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.tls.load_cert_chain(tls_cert, tls_key or None)
            if client_ca:
                self.tls.load_verify_locations(client_ca)
                self.tls.verify_mode = ssl.CERT_OPTIONAL  # a client without a certificate may use a token
        self.host = host
        self.port = port
        self.unix_path = unix_path
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []
        self.url = ""

    def start(self) -> str:
        if self.host is not None:
            tcp = _TCPServer((self.host, self.port), Handler, bind_and_activate=False)
            if ":" in self.host:
                tcp.socket.close()
                tcp.address_family = socket.AF_INET6
                tcp.socket = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            tcp.server_bind()
            tcp.server_activate()
            tcp.state = self.state
            tcp.tls = self.tls
            self._servers.append(tcp)
            self.port = tcp.server_address[1]
            host = f"[{self.host}]" if ":" in self.host else self.host
            self.url = f"{'https' if self.tls else 'http'}://{host}:{self.port}"
        if self.unix_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.unix_path)
            unix = _UnixServer(self.unix_path, Handler)
            unix.state = self.state
            self._servers.append(unix)
        for srv in self._servers:
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
            t.start()
            self._threads.append(t)
        return self.url

    def stop(self) -> None:
        with self.state.cond:
            self.state.closing = True
            self.state.cond.notify_all()
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        for t in self._threads:
            t.join(timeout=5)
        if self.unix_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.unix_path)

    def __enter__(self) -> FakeKube:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


class KubeAdmin:
    """A small blocking client for tests: the same API a kubectl user has, plus the admin channel.

    Reaches the fake by TCP (`url`) or by its unix socket (`unix_path`, from any network namespace)."""

    def __init__(self, url: str = "", unix_path: str = "", timeout: float = 10) -> None:
        self.url = urlsplit(url) if url else None
        self.unix_path = unix_path
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        if self.unix_path:
            conn: http.client.HTTPConnection = _UnixHTTPConnection(self.unix_path, self.timeout)
        else:
            assert self.url is not None and self.url.hostname is not None
            conn = http.client.HTTPConnection(self.url.hostname, self.url.port, timeout=self.timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": content_type} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            out = json.loads(resp.read() or b"null")
            if resp.status >= 300:
                raise ApiError(resp.status, str(out.get("reason", "")), str(out.get("message", "")))
            return out
        finally:
            conn.close()

    # --- nodes ---
    def create_node(
        self,
        name: str,
        pod_cidrs: list[str] | None = None,
        annotations: dict[str, str] | None = None,
        internal_ip: str = "",
    ) -> dict[str, Any]:
        spec: dict[str, Any] = {}
        if pod_cidrs:
            spec = {"podCIDR": pod_cidrs[0], "podCIDRs": list(pod_cidrs)}
        status: dict[str, Any] = {}
        if internal_ip:
            status["addresses"] = [{"type": "InternalIP", "address": internal_ip}]
        body = {"metadata": {"name": name, "annotations": annotations or {}}, "spec": spec, "status": status}
        out: dict[str, Any] = self.request("POST", "/api/v1/nodes", body)
        return out

    def node(self, name: str) -> dict[str, Any]:
        out: dict[str, Any] = self.request("GET", f"/api/v1/nodes/{name}")
        return out

    def patch_node(self, name: str, patch: dict[str, Any], status: bool = False) -> dict[str, Any]:
        path = f"/api/v1/nodes/{name}" + ("/status" if status else "")
        out: dict[str, Any] = self.request("PATCH", path, patch, "application/merge-patch+json")
        return out

    def set_pod_cidrs(self, name: str, pod_cidrs: list[str]) -> dict[str, Any]:
        return self.patch_node(name, {"spec": {"podCIDR": pod_cidrs[0] if pod_cidrs else None, "podCIDRs": pod_cidrs}})

    def delete_node(self, name: str) -> None:
        self.request("DELETE", f"/api/v1/nodes/{name}")

    def create_pod(self, namespace: str, name: str, node_name: str) -> dict[str, Any]:
        body = {"metadata": {"name": name}, "spec": {"nodeName": node_name, "containers": []}}
        out: dict[str, Any] = self.request("POST", f"/api/v1/namespaces/{namespace}/pods", body)
        return out

    # --- side channel ---
    def expire(self) -> None:
        self.request("POST", "/_admin/expire", {})

    def drop_watches(self) -> None:
        self.request("POST", "/_admin/drop", {})

    def fail(self, method: str, path: str, status: int, count: int = 1) -> None:
        self.request("POST", "/_admin/fail", {"method": method, "path": path, "status": status, "count": count})

    def stats(self) -> dict[str, int]:
        out: dict[str, int] = self.request("GET", "/_admin/stats")
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", default="127.0.0.1:0", help="host:port to serve HTTP on")
    ap.add_argument("--unix", default=None, help="also serve on this unix socket")
    ap.add_argument("--state", default=None, help="JSON file that keeps the objects across restarts")
    ap.add_argument("--history", type=int, default=1000, help="events kept for watches (older: 410 Gone)")
    ap.add_argument("--bookmark-interval", type=float, default=1.0)
    ap.add_argument("--tls-cert", default="", help="serve HTTPS with this certificate (PEM)")
    ap.add_argument("--tls-key", default="", help="and this key")
    ap.add_argument("--client-ca", default="", help="accept client certificates this CA signed")
    ap.add_argument("--token", action="append", default=[], help="accept this bearer token (repeatable)")
    # A file keeps the token off the command line (and a token starting with "-" from reading as an option).
    ap.add_argument("--token-file", action="append", default=[], help="accept the token in this file (repeatable)")
    args = ap.parse_args(argv)
    tokens = set(args.token)
    for path in args.token_file:
        with open(path, encoding="utf-8") as f:
            token = f.read(4096).strip()
        if not token:
            ap.error(f"--token-file {path}: the file holds no token")
        tokens.add(token)
    host, _, port = args.listen.rpartition(":")
    fk = FakeKube(
        host.strip("[]"),
        int(port),
        unix_path=args.unix,
        state_file=args.state,
        history_size=args.history,
        bookmark_interval=args.bookmark_interval,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        client_ca=args.client_ca,
        tokens=tokens,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    url = fk.start()
    print(f"fakekube listening on {url}", flush=True)
    stop.wait()
    fk.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
