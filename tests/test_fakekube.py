"""The fake API server keeps the semantics the kube store depends on (over its unix socket: no network)."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyflannel.lab import netns
from pyflannel.lab.fakekube import ApiError, FakeKube, KubeAdmin, _UnixHTTPConnection, strategic_merge

FAKE = [sys.executable, "-m", "pyflannel.lab.fakekube"]


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[tuple[FakeKube, KubeAdmin]]:
    sock = str(tmp_path / "kube.sock")
    with FakeKube(host=None, unix_path=sock, history_size=5, bookmark_interval=0.1) as fk:
        yield fk, KubeAdmin(unix_path=sock)


def watch(fk: FakeKube, query: str, max_events: int = 100, timeout: float = 5) -> tuple[dict[str, str], list[Any]]:
    """Read a whole watch response (the server ends it at timeoutSeconds) and return headers and events."""
    assert fk.unix_path is not None
    conn = _UnixHTTPConnection(fk.unix_path, timeout)
    try:
        conn.request("GET", f"/api/v1/nodes?watch=true&{query}")
        resp = conn.getresponse()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        events: list[Any] = []
        while len(events) < max_events:
            line = resp.readline()
            if not line:
                break
            events.append(json.loads(line))
        return headers, events
    finally:
        conn.close()


def test_strategic_merge_of_annotations_and_conditions() -> None:
    node: dict[str, Any] = {
        "metadata": {"annotations": {"a": "1", "b": "2"}},
        "status": {
            "conditions": [{"type": "Ready", "status": "True"}, {"type": "NetworkUnavailable", "status": "True"}]
        },
    }
    patch: dict[str, Any] = {
        "metadata": {"annotations": {"b": None, "c": "3"}},
        "status": {"conditions": [{"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp"}]},
    }
    out = strategic_merge(node, patch)
    assert out["metadata"]["annotations"] == {"a": "1", "c": "3"}
    assert out["status"]["conditions"] == [
        {"type": "Ready", "status": "True"},
        {"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp"},
    ]
    # A JSON merge patch replaces lists instead.
    plain = strategic_merge(node, patch, merge_keys=False)
    assert plain["status"]["conditions"] == patch["status"]["conditions"]
    deleted = strategic_merge(node, {"status": {"conditions": [{"type": "Ready", "$patch": "delete"}]}})
    assert [c["type"] for c in deleted["status"]["conditions"]] == ["NetworkUnavailable"]


def test_resource_version_grows_and_errors(fake: tuple[FakeKube, KubeAdmin]) -> None:
    _, kube = fake
    a = kube.create_node("a", ["10.0.1.0/24"])
    b = kube.create_node("b")
    assert int(b["metadata"]["resourceVersion"]) > int(a["metadata"]["resourceVersion"])
    listing = kube.request("GET", "/api/v1/nodes")
    assert listing["metadata"]["resourceVersion"] == b["metadata"]["resourceVersion"]
    assert [n["metadata"]["name"] for n in listing["items"]] == ["a", "b"]
    with pytest.raises(ApiError) as e404:
        kube.node("zz")
    assert e404.value.code == 404
    with pytest.raises(ApiError) as e409:
        kube.create_node("a")
    assert e409.value.code == 409
    stale = {"metadata": {"resourceVersion": a["metadata"]["resourceVersion"], "annotations": {"x": "y"}}}
    with pytest.raises(ApiError) as conflict:
        kube.request("PATCH", "/api/v1/nodes/b/status", stale, "application/strategic-merge-patch+json")
    assert conflict.value.code == 409
    with pytest.raises(ApiError) as bad:
        kube.patch_node("a", {"metadata": {"annotations": {"x": {"not": "a string"}}}})
    assert bad.value.code == 400
    with pytest.raises(ApiError) as e415:
        kube.request("PATCH", "/api/v1/nodes/a", [{"op": "add"}], "application/json-patch+json")
    assert e415.value.code == 415


def test_status_subresource_keeps_spec(fake: tuple[FakeKube, KubeAdmin]) -> None:
    _, kube = fake
    kube.create_node("a", ["10.0.1.0/24"])
    patch = {"metadata": {"annotations": {"k": "v"}}, "spec": {"podCIDR": "10.9.9.0/24"}}
    out = kube.request("PATCH", "/api/v1/nodes/a/status", patch, "application/strategic-merge-patch+json")
    assert out["metadata"]["annotations"] == {"k": "v"}
    assert out["spec"]["podCIDR"] == "10.0.1.0/24"
    before = out["metadata"]["resourceVersion"]
    # A patch that changes nothing does not bump the resourceVersion (and sends no watch event).
    again = kube.request("PATCH", "/api/v1/nodes/a/status", patch, "application/strategic-merge-patch+json")
    assert again["metadata"]["resourceVersion"] == before


def test_pod_cidrs_are_validated_and_pod_cidr_is_the_first(fake: tuple[FakeKube, KubeAdmin]) -> None:
    _, kube = fake
    # Dual-stack in either order; podCIDR is the first entry whatever the client sent.
    ds = kube.request(
        "POST",
        "/api/v1/nodes",
        {"metadata": {"name": "ds"}, "spec": {"podCIDR": "x", "podCIDRs": ["fd00::/64", "10.0.1.0/24"]}},
    )
    assert ds["spec"] == {"podCIDR": "fd00::/64", "podCIDRs": ["fd00::/64", "10.0.1.0/24"]}
    # An old client's podCIDR alone becomes the list.
    old = kube.request("POST", "/api/v1/nodes", {"metadata": {"name": "old"}, "spec": {"podCIDR": "10.0.2.0/24"}})
    assert old["spec"] == {"podCIDR": "10.0.2.0/24", "podCIDRs": ["10.0.2.0/24"]}
    v6 = kube.create_node("v6", ["fd00:0:0:3::/64"])
    assert v6["spec"] == {"podCIDR": "fd00:0:0:3::/64", "podCIDRs": ["fd00:0:0:3::/64"]}
    for bad, why in (
        (["10.0.4.0/24", "10.0.5.0/24"], "no more than one CIDR for each IP family"),
        (["fd00:0:0:4::/64", "fd00:0:0:5::/64"], "no more than one CIDR for each IP family"),
        (["10.0.4.0/24", "fd00:0:0:4::/64", "10.0.5.0/24"], "no more than one CIDR for each IP family"),
        (["10.0.4.0/255.255.255.0"], "must be a valid CIDR value"),
        (["fd00::%eth0/64"], "must be a valid CIDR value"),
        (["10.0.4.0"], "must be a valid CIDR value"),
    ):
        with pytest.raises(ApiError) as e:
            kube.create_node("bad", bad)
        assert (e.value.code, e.value.reason) == (422, "Invalid"), bad
        assert why in e.value.message and 'Node "bad" is invalid' in e.value.message
        with pytest.raises(ApiError) as e:
            kube.set_pod_cidrs("old", bad)
        assert e.value.code == 422
    assert "bad" not in {n["metadata"]["name"] for n in kube.request("GET", "/api/v1/nodes")["items"]}
    assert kube.node("old")["spec"]["podCIDRs"] == ["10.0.2.0/24"]
    # Once set, podCIDRs never change (not even to add the other family, nor by a PUT); from none they may.
    for cidrs in (["10.0.2.0/24", "fd00:0:0:2::/64"], ["10.0.7.0/24"], []):
        with pytest.raises(ApiError) as e:
            kube.set_pod_cidrs("old", cidrs)
        assert (e.value.code, e.value.reason) == (422, "Invalid"), cidrs
        assert (
            'spec.podCIDRs: Forbidden: node updates may not change podCIDR except from "" to valid' in e.value.message
        )
    whole = kube.node("old")
    whole["spec"]["podCIDRs"] = ["10.0.8.0/24"]
    with pytest.raises(ApiError) as e:
        kube.request("PUT", "/api/v1/nodes/old", whole)
    assert e.value.code == 422
    kube.create_node("late")
    assert kube.set_pod_cidrs("late", ["10.0.9.0/24", "fd00:0:0:9::/64"])["spec"]["podCIDR"] == "10.0.9.0/24"
    assert kube.set_pod_cidrs("late", ["10.0.9.0/24", "fd00:0:0:9::/64"])["spec"]["podCIDRs"][1] == "fd00:0:0:9::/64"


def test_watch_streams_chunked_events_and_bookmarks(fake: tuple[FakeKube, KubeAdmin]) -> None:
    fk, kube = fake
    a = kube.create_node("a")
    rv = a["metadata"]["resourceVersion"]
    kube.create_node("b")
    kube.delete_node("a")
    headers, events = watch(fk, f"resourceVersion={rv}&allowWatchBookmarks=True&timeoutSeconds=1")
    assert headers["transfer-encoding"] == "chunked"
    changes = [(e["type"], e["object"]["metadata"].get("name")) for e in events if e["type"] != "BOOKMARK"]
    assert changes == [("ADDED", "b"), ("DELETED", "a")]
    bookmarks = [e for e in events if e["type"] == "BOOKMARK"]
    assert bookmarks, "bookmarks were requested"
    assert int(bookmarks[-1]["object"]["metadata"]["resourceVersion"]) >= int(rv) + 2
    # Without resourceVersion: the current objects first, as ADDED.
    _, events = watch(fk, "timeoutSeconds=1")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "b")]


def test_watch_from_an_expired_version_is_410(fake: tuple[FakeKube, KubeAdmin]) -> None:
    fk, kube = fake
    first = kube.create_node("n0")["metadata"]["resourceVersion"]
    for i in range(1, 8):  # more changes than the history of 5 keeps
        kube.create_node(f"n{i}")
    _, events = watch(fk, f"resourceVersion={first}&timeoutSeconds=1")
    assert [e["type"] for e in events] == ["ERROR"]
    assert events[0]["object"]["code"] == 410
    # Forced expiry: even a current version is refused for watches started before it.
    kube.expire()
    last = kube.request("GET", "/api/v1/nodes")["metadata"]["resourceVersion"]
    _, events = watch(fk, f"resourceVersion={int(last) - 1}&timeoutSeconds=1")
    assert events[0]["object"]["code"] == 410


def test_dropped_watch_ends_without_terminating_chunk(fake: tuple[FakeKube, KubeAdmin]) -> None:
    fk, kube = fake
    assert fk.unix_path is not None
    conn = _UnixHTTPConnection(fk.unix_path, 5)
    try:
        conn.request("GET", "/api/v1/nodes?watch=true&resourceVersion=1&timeoutSeconds=30")
        resp = conn.getresponse()
        deadline = time.monotonic() + 5
        while kube.stats().get("watch", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        kube.drop_watches()
        with pytest.raises((http.client.IncompleteRead, ConnectionError)):
            resp.read()
    finally:
        conn.close()


def test_injected_failures_and_pods(fake: tuple[FakeKube, KubeAdmin]) -> None:
    _, kube = fake
    kube.create_node("a")
    kube.fail("GET", "/api/v1/nodes/a", 503, count=1)
    with pytest.raises(ApiError) as e:
        kube.node("a")
    assert e.value.code == 503
    assert kube.node("a")["metadata"]["name"] == "a"
    kube.create_pod("kube-flannel", "p1", "a")
    pod = kube.request("GET", "/api/v1/namespaces/kube-flannel/pods/p1")
    assert pod["spec"]["nodeName"] == "a"


def test_subprocess_in_a_namespace_keeps_state_across_restarts(scope: netns.RunScope) -> None:
    ns = scope.add_ns("fk")
    netns.run(["ip", "-n", ns, "addr", "add", "192.168.77.3/32", "dev", "lo"])
    sock = str(scope.tmpdir / "kube.sock")
    state = str(scope.tmpdir / "state.json")
    cmd = [*FAKE, "--listen", "192.168.77.3:6443", "--unix", sock, "--state", state]

    def start() -> subprocess.Popen[bytes]:
        p = scope.spawn(ns, cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 10
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.05)
        return p

    p = start()
    kube = KubeAdmin(unix_path=sock)
    kube.create_node("a", ["10.0.1.0/24"])
    # Reachable over TCP inside the namespace at the address given.
    get = "import urllib.request as u; print(u.urlopen('http://192.168.77.3:6443/api/v1/nodes/a').read().decode())"
    out = netns.ns_exec(ns, [sys.executable, "-c", get])
    assert json.loads(out)["spec"]["podCIDR"] == "10.0.1.0/24"
    rv = kube.node("a")["metadata"]["resourceVersion"]
    p.terminate()
    p.wait(timeout=10)
    p = start()
    node = KubeAdmin(unix_path=sock).node("a")
    assert node["metadata"]["resourceVersion"] == rv
    assert int(KubeAdmin(unix_path=sock).create_node("b")["metadata"]["resourceVersion"]) > int(rv)


def test_a_token_file_holding_a_token_that_starts_with_a_dash(scope: netns.RunScope) -> None:
    """The lab's random token (token_urlsafe) starts with "-" one time in 64: from a file it is still a token,
    where on the command line it read as an option and the lab failed to start."""
    ns = scope.add_ns("fkt")
    netns.run(["ip", "-n", ns, "addr", "add", "192.168.77.3/32", "dev", "lo"])
    sock = str(scope.tmpdir / "kube.sock")
    token = scope.tmpdir / "token"
    token.write_text("-Zk3tQ\n")
    cmd = [*FAKE, "--listen", "192.168.77.3:6443", "--unix", sock, "--token-file", str(token)]
    p = scope.spawn(ns, cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert netns.wait_for(lambda: os.path.exists(sock) or p.poll() is not None, 10) and p.poll() is None
    get = (
        "import sys, urllib.request as u, urllib.error as e\n"
        "r = u.Request('http://192.168.77.3:6443/api/v1/nodes', headers={'Authorization': sys.argv[1]})\n"
        "try: print(u.urlopen(r).status)\n"
        "except e.HTTPError as x: print(x.code)\n"
    )
    assert netns.ns_exec(ns, [sys.executable, "-c", get, "Bearer -Zk3tQ"]).strip() == "200"
    assert netns.ns_exec(ns, [sys.executable, "-c", get, "Bearer other"]).strip() == "401"
