"""The Kubernetes store against the fake API server (pyflannel/lab/fakekube.py) over real HTTP.

The fake and the store's client both run in a thread that joined a network namespace of this run, so the
traffic stays on that namespace's loopback. Assertions read the Node objects the fake holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any, TypeVar

import pytest

from pyflannel.cli import parse_args
from pyflannel.config import ConfigError, parse_net_config
from pyflannel.daemon import kube_options_from_cli
from pyflannel.lab import netns
from pyflannel.lab.fakekube import FakeKube, KubeAdmin
from pyflannel.lease import EventType, LeaseAttrs, LeaseEvent, LeaseSnapshot, WatchUpdate
from pyflannel.store.base import LeaseRevokedError, StoreError
from pyflannel.store.kube import (
    Annotations,
    KubeNodeError,
    KubeStore,
    node_to_lease,
)
from pyflannel.store.options import KubeOptions

P = "flannel.alpha.coreos.com/"
MAC = "12:c6:65:89:b4:e3"
VXLAN = {"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}
T = TypeVar("T")


def run_in_netns(ns: str, fn: Callable[[], T], timeout: float = 60) -> T:
    """Run fn in a thread that joined `ns`; threads it starts (the fake's) inherit the namespace."""
    out: dict[str, Any] = {}

    def target() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(fd)
        try:
            out["v"] = fn()
        except BaseException as e:
            out["e"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"test body did not finish in {timeout}s")
    if "e" in out:
        raise out["e"]
    return out["v"]  # type: ignore[no-any-return]


@pytest.fixture
def kns(scope: netns.RunScope) -> str:
    ns = scope.add_ns("kube")
    netns.run(["ip", "-n", ns, "link", "set", "lo", "up"])
    return ns


@pytest.fixture
def run(kns: str, tmp_path: Path) -> Callable[[Callable[[FakeKube, KubeAdmin, Path], Awaitable[None]]], None]:
    def runner(body: Callable[[FakeKube, KubeAdmin, Path], Awaitable[None]]) -> None:
        def go() -> None:
            with FakeKube(bookmark_interval=0.2) as fk:
                asyncio.run(asyncio.wait_for(body(fk, KubeAdmin(fk.url), tmp_path), 40))

        run_in_netns(kns, go)

    return runner


def store_for(fk: FakeKube, tmp: Path, node: str = "n1", conf: dict[str, Any] | None = None, **kw: Any) -> KubeStore:
    path = tmp / "net-conf.json"
    path.write_text(json.dumps(conf or VXLAN))
    opts: dict[str, Any] = {"api_url": fk.url, "node_name": node, "net_config_path": str(path), "retry_delay": 0.05}
    opts.update(kw)
    return KubeStore(KubeOptions(**opts))


def vx_attrs(ip: str = "192.168.77.11", mac: str = MAC) -> LeaseAttrs:
    return LeaseAttrs(public_ip=IPv4Address(ip), backend_type="vxlan", backend_data={"VNI": 1, "VtepMAC": mac})


def peer_annotations(ip: str, mac: str = "aa:bb:cc:dd:ee:01") -> dict[str, str]:
    return {
        P + "kube-subnet-manager": "true",
        P + "backend-type": "vxlan",
        P + "backend-data": json.dumps({"VNI": 1, "VtepMAC": mac}, separators=(",", ":")),
        P + "public-ip": ip,
    }


# --- pure functions ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("given", "want"),
    [
        ("flannel.alpha.coreos.com", "flannel.alpha.coreos.com/"),
        ("x.com/foo", "x.com/foo-"),
        ("x.com/", "x.com/"),
        ("x.com/foo-", "x.com/foo-"),
    ],
)
def test_annotation_prefix_normalised_like_upstream(given: str, want: str) -> None:
    a = Annotations.for_prefix(given)
    assert a.prefix == want
    assert a.backend_data == want + "backend-data"


def test_annotation_prefix_with_two_slashes_is_refused() -> None:
    with pytest.raises(ConfigError, match="at most one slash"):
        Annotations.for_prefix("a/b/c")


def test_node_to_lease_reads_upstream_annotations_and_skips_others() -> None:
    ann = Annotations.for_prefix("flannel.alpha.coreos.com")
    net = parse_net_config(json.dumps(VXLAN))
    node: dict[str, Any] = {
        "metadata": {"name": "a", "annotations": peer_annotations("192.168.77.12", MAC)},
        "spec": {"podCIDR": "10.244.3.0/24", "podCIDRs": ["10.244.3.0/24"]},
    }
    lease = node_to_lease(node, ann, net)
    assert lease is not None
    assert lease.subnet == IPv4Network("10.244.3.0/24")
    assert lease.attrs == vx_attrs("192.168.77.12")
    assert lease.expiration is None
    node["metadata"]["annotations"] = {}
    assert node_to_lease(node, ann, net) is None
    # host-gw writes the string "null" as backend data.
    hg = {
        "metadata": {"annotations": {**peer_annotations("1.2.3.4"), P + "backend-data": "null"}},
        "spec": node["spec"],
    }
    hl = node_to_lease(hg, ann, net)
    assert hl is not None and hl.attrs.backend_data is None


def test_kube_options_from_cli() -> None:
    opts = parse_args(
        ["--kube-subnet-mgr", "--kube-api-url=http://10.0.0.1:6443", "--set-node-network-unavailable=false",
         "--kube-annotation-prefix=x.com/foo", "--net-config-path=/tmp/n.json"],
        {},
    )  # fmt: skip
    env = {"NODE_NAME": "n9", "KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    ko = kube_options_from_cli(opts, env)
    assert ko.api_url == "http://10.0.0.1:6443"
    assert ko.node_name == "n9"
    assert ko.set_node_network_unavailable is False
    assert ko.net_config_path == "/tmp/n.json"
    assert ko.service_host == "10.96.0.1"
    assert KubeStore(ko).ann.prefix == "x.com/foo-"


def test_in_cluster_config_uses_the_service_account(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("tok-123\n")
    (tmp_path / "ca.crt").write_text("not really a cert")
    st = KubeStore(
        KubeOptions(
            node_name="n1",
            service_host="fd00::1",
            service_port="443",
            serviceaccount_dir=str(tmp_path),
        )
    )

    async def go() -> Any:
        cfg = await st._client_config()
        return cfg, await cfg.credentials.get()

    cfg, creds = asyncio.run(go())
    assert cfg.server.url == "https://[fd00::1]"
    assert cfg.tls.ca_file == str(tmp_path / "ca.crt")
    assert creds.authorization == "Bearer tok-123"


def test_no_cluster_config_is_a_clear_error(tmp_path: Path) -> None:
    st = KubeStore(KubeOptions(node_name="n1", serviceaccount_dir=str(tmp_path)))
    with pytest.raises(StoreError, match="--kube-api-url"):
        asyncio.run(st._client_config())


def test_missing_net_conf_is_a_clear_error(tmp_path: Path) -> None:
    st = KubeStore(KubeOptions(node_name="n1", net_config_path=str(tmp_path / "none.json")))
    with pytest.raises(ConfigError, match=r"failed to read net conf .*none\.json"):
        asyncio.run(st.get_network_config())


def test_net_conf_that_is_no_regular_file_or_too_big_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (2 << 20) + b"{}")
    for path, why in (("/dev/zero", "not a regular file"), (str(fifo), "not a regular file"),
                      (str(tmp_path), "a directory"), (str(big), "larger than 1048576 bytes")):  # fmt: skip
        st = KubeStore(KubeOptions(node_name="n1", net_config_path=path))
        with pytest.raises(ConfigError, match=f"failed to read net conf {path}: .*{why}"):
            asyncio.run(asyncio.wait_for(st.get_network_config(), 5))


@pytest.mark.parametrize(
    "text",
    ['{"Network":' + "[" * 995 + "]" * 995 + "}", '{"Network":"10.244.0.0/16","x":' + "9" * 5000 + "}",
     '{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":NaN}}', '{"Network":"fd00::%eth0/48"}'],
)  # fmt: skip
def test_bad_net_conf_is_the_config_error_naming_the_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "net-conf.json"
    path.write_text(text)
    st = KubeStore(KubeOptions(node_name="n1", net_config_path=str(path)))
    with pytest.raises(ConfigError, match=f"^{path}: ") as e:
        asyncio.run(st.get_network_config())
    assert len(str(e.value)) < 300


def _flannel_node(**ann: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "bad", "annotations": {**peer_annotations("192.168.77.12"), **ann}},
        "spec": {"podCIDRs": ["10.244.3.0/24"]},
    }


@pytest.mark.parametrize(
    "node",
    [
        _flannel_node(**{P + "backend-data": "[" * 995 + "]" * 995}),
        _flannel_node(**{P + "backend-data": "[" * 100_000}),
        _flannel_node(**{P + "backend-data": "9" * 5000}),
        _flannel_node(**{P + "backend-data": '{"VNI":NaN}'}),
        _flannel_node(**{P + "backend-data": '{"VNI":1e400}'}),
        _flannel_node(**{P + "backend-data": 7}),
        _flannel_node(**{P + "public-ip": "192.168.77.012"}),
        _flannel_node(**{P + "public-ip": 3232255244}),
        _flannel_node(**{P + "public-ip": "fd00::1"}),
        _flannel_node(**{P + "backend-type": ["vxlan"]}),
        {"metadata": {"name": "bad", "annotations": peer_annotations("192.168.77.12")},
         "spec": {"podCIDRs": ["10.244.3.0/255.255.255.0"]}},
        {"metadata": {"name": "bad", "annotations": peer_annotations("192.168.77.12")},
         "spec": {"podCIDRs": ["10.244.3.0/24", 5]}},
        {"metadata": {"name": "bad", "annotations": peer_annotations("192.168.77.12")}, "spec": []},
        {"metadata": {"name": "bad", "annotations": ["x"]}, "spec": {}},
        {"metadata": "bad"},
        ["not", "a", "node"],
    ],
)  # fmt: skip
def test_garbage_flannel_node_raises_value_error_and_the_store_skips_it(
    node: Any, caplog: pytest.LogCaptureFixture
) -> None:
    ann = Annotations.for_prefix("flannel.alpha.coreos.com")
    net = parse_net_config(json.dumps(VXLAN))
    with pytest.raises(ValueError) as e:
        node_to_lease(node, ann, net)
    assert len(str(e.value)) < 300
    st = KubeStore(KubeOptions(node_name="n1"))
    good = {"metadata": {"name": "good", "annotations": peer_annotations("192.168.77.13")},
            "spec": {"podCIDRs": ["10.244.4.0/24"]}}  # fmt: skip
    with caplog.at_level("WARNING"):
        assert list(st._leases([node, good], net, {})) == ["good"]
    assert "skipping node" in caplog.text


def test_ipv6_zones_are_refused_in_annotations_and_pod_cidrs() -> None:
    ann = Annotations.for_prefix("flannel.alpha.coreos.com")
    net = parse_net_config(json.dumps({"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd00::/48"}))
    base = {P + "kube-subnet-manager": "true", P + "backend-type": "host-gw", P + "backend-v6-data": "null"}
    good = {**base, P + "public-ipv6": "fd00::1"}
    ok = {"metadata": {"annotations": good}, "spec": {"podCIDRs": ["fd00:0:0:1::/64"]}}
    assert node_to_lease(ok, ann, net) is not None
    for a, cidr in (({**base, P + "public-ipv6": "fe80::1%eth0"}, "fd00:0:0:1::/64"), (good, "fd00:0:0:1::%eth0/64")):
        with pytest.raises(ValueError, match=r"zone is not allowed"):
            node_to_lease({"metadata": {"annotations": a}, "spec": {"podCIDRs": [cidr]}}, ann, net)


@pytest.mark.parametrize(
    "line",
    [b"[" * 100_000, b"9" * 5000, b'{"type":"ADDED","object":"x"}', b'{"type":"ADDED","object":[1]}',
     b'["ADDED"]', b'{"type":"ERROR","object":' + b"[" * 2000 + b"]" * 2000 + b"}"],
)  # fmt: skip
def test_undecodable_watch_lines_are_store_errors(line: bytes) -> None:
    st = KubeStore(KubeOptions(node_name="n1"))
    net = parse_net_config(json.dumps(VXLAN))
    with pytest.raises(StoreError, match="watch nodes"):
        st._apply_watch_line(line, "1", {}, net, [])


def test_watch_event_of_a_garbage_node_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    st = KubeStore(KubeOptions(node_name="n1"))
    net = parse_net_config(json.dumps(VXLAN))
    node = _flannel_node(**{P + "backend-data": "[" * 995 + "]" * 995})
    batch: list[LeaseEvent] = []
    with caplog.at_level("WARNING"):
        st._apply_watch_line(json.dumps({"type": "ADDED", "object": node}).encode(), "1", {}, net, batch)
    assert batch == []
    assert "skipping node bad" in caplog.text


# --- against the fake --------------------------------------------------------------------------------
def test_acquire_writes_upstream_annotations_on_status_and_the_condition(run: Any) -> None:
    async def body(fk: FakeKube, kube: KubeAdmin, tmp: Path) -> None:
        kube.create_node("n1", ["10.244.1.0/24"], annotations={"other.io/keep": "yes"})
        # A condition already there must survive the strategic merge (merged by "type").
        kube.patch_node(
            "n1",
            {"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"},
                                       {"type": "NetworkUnavailable", "status": "True", "reason": "NoRouteCreated"}]}},
            status=True,
        )  # fmt: skip
        st = store_for(fk, tmp)
        try:
            net = await st.get_network_config()
            lease = await st.acquire_lease(net, vx_attrs(), None)
        finally:
            await st.close()
        assert lease.subnet == IPv4Network("10.244.1.0/24") and lease.ipv6_subnet is None
        assert lease.expiration is None
        node = kube.node("n1")
        ann = node["metadata"]["annotations"]
        assert ann == {
            "other.io/keep": "yes",
            P + "kube-subnet-manager": "true",
            P + "backend-type": "vxlan",
            P + "backend-data": '{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}',
            P + "public-ip": "192.168.77.11",
        }
        conds = {c["type"]: c for c in node["status"]["conditions"]}
        assert conds["Ready"]["status"] == "True"
        nu = conds["NetworkUnavailable"]
        assert (nu["status"], nu["reason"], nu["message"]) == (
            "False",
            "FlannelIsUp",
            "Flannel is running on this node",
        )
        assert nu["lastTransitionTime"]
        stats = kube.stats()
        # The setup's patch and our two writes went to the status subresource, none to the node itself.
        assert stats.get("PATCH /api/v1/nodes/n1/status") == 3
        assert "PATCH /api/v1/nodes/n1" not in stats

    run(body)


def test_acquire_dual_stack_host_gw_and_no_condition(run: Any) -> None:
    conf = {
        "Network": "10.244.0.0/16",
        "EnableIPv6": True,
        "IPv6Network": "fd00:10::/56",
        "Backend": {"Type": "host-gw"},
    }

    async def body(fk: FakeKube, kube: KubeAdmin, tmp: Path) -> None:
        kube.create_node("n1", ["10.244.7.0/24", "fd00:10:0:7::/64"])
        st = store_for(fk, tmp, conf=conf, set_node_network_unavailable=False)
        attrs = LeaseAttrs(
            public_ip=IPv4Address("192.168.77.11"), public_ipv6=IPv6Address("fd77::11"), backend_type="host-gw"
        )
        try:
            lease = await st.acquire_lease(await st.get_network_config(), attrs, None)
        finally:
            await st.close()
        assert lease.subnet == IPv4Network("10.244.7.0/24")
        assert lease.ipv6_subnet == IPv6Network("fd00:10:0:7::/64")
        node = kube.node("n1")
        ann = node["metadata"]["annotations"]
        assert ann[P + "backend-data"] == "null"
        assert ann[P + "backend-v6-data"] == "null"
        assert ann[P + "public-ipv6"] == "fd77::11"
        assert ann[P + "backend-type"] == "host-gw"
        assert "conditions" not in node["status"]
        assert kube.stats().get("PATCH /api/v1/nodes/n1/status") == 1

    run(body)


DUAL_VXLAN = {
    "Network": "10.244.0.0/16",
    "EnableIPv6": True,
    "IPv6Network": "fd00:10::/56",
    "Backend": {"Type": "vxlan"},
}
V6_VXLAN = {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd00:10::/56", "Backend": {"Type": "vxlan"}}


def test_acquire_dual_stack_and_ipv6_only_vxlan_write_upstreams_annotations(run: Any) -> None:
    """Byte for byte what upstream's kube subnet manager writes: both families' keys with both on, only the
    IPv6 ones (and the two shared ones) on an IPv6-only cluster; podCIDRs in either order."""
    mac6 = "6e:11:22:33:44:55"

    async def body(fk: FakeKube, kube: KubeAdmin, tmp: Path) -> None:
        kube.create_node("ds", ["fd00:10:0:7::/64", "10.244.7.0/24"])  # an IPv6-primary cluster lists v6 first
        kube.create_node("v6", ["fd00:10:0:8::/64"])
        attrs = LeaseAttrs(
            public_ip=IPv4Address("192.168.77.11"),
            public_ipv6=IPv6Address("fd77:77::11"),
            backend_type="vxlan",
            backend_data={"VNI": 1, "VtepMAC": MAC},
            backend_v6_data={"VNI": 1, "VtepMAC": mac6},
        )
        st = store_for(fk, tmp, node="ds", conf=DUAL_VXLAN)
        try:
            lease = await st.acquire_lease(await st.get_network_config(), attrs, None)
        finally:
            await st.close()
        assert (lease.subnet, lease.ipv6_subnet) == (IPv4Network("10.244.7.0/24"), IPv6Network("fd00:10:0:7::/64"))
        assert lease.key == "10.244.7.0-24&fd00:10:0:7::-64"
        assert kube.node("ds")["metadata"]["annotations"] == {
            P + "kube-subnet-manager": "true",
            P + "backend-type": "vxlan",
            P + "backend-data": '{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}',
            P + "public-ip": "192.168.77.11",
            P + "backend-v6-data": '{"VNI":1,"VtepMAC":"6e:11:22:33:44:55"}',
            P + "public-ipv6": "fd77:77::11",
        }
        v6_attrs = LeaseAttrs(
            public_ipv6=IPv6Address("fd77:77::12"), backend_type="vxlan", backend_v6_data={"VNI": 1, "VtepMAC": mac6}
        )
        st = store_for(fk, tmp, node="v6", conf=V6_VXLAN)
        try:
            lease = await st.acquire_lease(await st.get_network_config(), v6_attrs, None)
        finally:
            await st.close()
        assert (lease.subnet, lease.ipv6_subnet) == (None, IPv6Network("fd00:10:0:8::/64"))
        assert kube.node("v6")["metadata"]["annotations"] == {
            P + "kube-subnet-manager": "true",
            P + "backend-type": "vxlan",
            P + "backend-v6-data": '{"VNI":1,"VtepMAC":"6e:11:22:33:44:55"}',
            P + "public-ipv6": "fd77:77::12",
        }

    run(body)


@pytest.mark.parametrize(
    ("conf", "cidrs", "want"),
    [
        (DUAL_VXLAN, ["10.244.7.0/24"], r"node n1 has no IPv6 podCIDR \(it has 10\.244\.7\.0/24\) but .* enables IPv6"),
        (DUAL_VXLAN, ["fd00:10:0:7::/64"], r"node n1 has no IPv4 podCIDR \(it has fd00:10:0:7::/64\) .* enables IPv4"),
        (V6_VXLAN, ["10.244.7.0/24"], r"node n1 has no IPv6 podCIDR \(it has 10\.244\.7\.0/24\)"),
        (VXLAN, ["fd00:10:0:7::/64"], r"node n1 has no IPv4 podCIDR"),
    ],
)
def test_pod_cidr_of_one_family_short_is_refused_before_anything_is_written(
    run: Any, conf: dict[str, Any], cidrs: list[str], want: str
) -> None:
    """Upstream v0.20.2 writes its annotations, then panics (a nil IPv6 subnet in its node informer); we refuse
    at once, and the Node is left as it was: no annotation, no condition, not a peer for anyone."""

    async def body(fk: FakeKube, kube: KubeAdmin, tmp: Path) -> None:
        kube.create_node("n1", cidrs)
        before = kube.node("n1")
        st = store_for(fk, tmp, conf=conf, podcidr_wait=20)
        try:
            net = await st.get_network_config()
            # The check a caller may make before creating anything (the daemon, before the backend's devices).
            with pytest.raises(KubeNodeError, match=want):
                await st.preflight(net)
            with pytest.raises(KubeNodeError, match=want):
                await st.acquire_lease(net, vx_attrs(), None)
        finally:
            await st.close()
        assert kube.node("n1") == before
        assert not any(k.startswith("PATCH") for k in kube.stats())

    run(body)


def test_peer_of_one_family_short_is_skipped_by_the_watch(caplog: pytest.LogCaptureFixture) -> None:
    """A peer that took a lease of one family only (another config, or upstream) is no peer here; a warning
    names it, and the other peers carry on (upstream's informer panics on it)."""
    st = KubeStore(KubeOptions(node_name="n1"))
    net = parse_net_config(json.dumps(DUAL_VXLAN))
    node = {"metadata": {"name": "half", "annotations": peer_annotations("192.168.77.12")},
            "spec": {"podCIDR": "10.244.4.0/24", "podCIDRs": ["10.244.4.0/24"]}}  # fmt: skip
    batch: list[LeaseEvent] = []
    with caplog.at_level("WARNING"):
        st._apply_watch_line(json.dumps({"type": "ADDED", "object": node}).encode(), "1", {}, net, batch)
    assert batch == []
    assert "skipping node half" in caplog.text and "no IPv6 podCIDR" in caplog.text


def test_pod_cidr_outside_network_is_a_clear_error(run: Any) -> None:
    async def body(fk: FakeKube, kube: KubeAdmin, tmp: Path) -> None:
        kube.create_node("n1", ["10.99.1.0/24"])
        st = store_for(fk, tmp)
        try:
            with pytest.raises(KubeNodeError, match=r"podCIDR 10\.99\.1\.0/24 is not inside Network 10\.244\.0\.0/16"):
                await st.acquire_lease(await st.get_network_config(), vx_attrs(), None)
        finally:
            await st.close()
        assert P + "kube-subnet-manager" not in kube.node("n1")["metadata"]["annotations"]

    run(body)


def test_pod_cidr_absent_waits_then_errors_or_succeeds(run: Any) -> None:
    async def body(fk: FakeKube, kube: KubeAdmin, tmp: Path) -> None:
        kube.create_node("n1")
        kube.create_node("n2")
        st = store_for(fk, tmp, podcidr_wait=0.5)
        try:
            with pytest.raises(KubeNodeError, match="pod cidr not assigned"):
                await st.acquire_lease(await st.get_network_config(), vx_attrs(), None)
        finally:
            await st.close()
        st2 = store_for(fk, tmp, node="n2", podcidr_wait=20)
        try:
            net = await st2.get_network_config()
            task = asyncio.create_task(st2.acquire_lease(net, vx_attrs(), None))
            await asyncio.sleep(0.3)
            assert not task.done()
            kube.set_pod_cidrs("n2", ["10.244.2.0/24"])
            lease = await task
        finally:
            await st2.close()
        assert lease.subnet == IPv4Network("10.244.2.0/24")

    run(body)


def test_node_name_from_pod_and_public_ip_annotations(run: Any) -> None:
    async def body(fk: FakeKube, kube: KubeAdmin, tmp: Path) -> None:
        kube.create_node(
            "n1",
            ["10.244.1.0/24"],
            annotations={
                P + "node-public-ip": "203.0.113.5",
                P + "public-ip-overwrite": "198.51.100.7",
            },
        )
        kube.create_pod("kube-flannel", "kube-flannel-ds-abcde", "n1")
        st = store_for(fk, tmp, node="", pod_name="kube-flannel-ds-abcde", pod_namespace="kube-flannel")
        try:
            assert await st.public_ip_overrides() == (IPv4Address("203.0.113.5"), None)
            assert st.node_name == "n1"
            await st.acquire_lease(await st.get_network_config(), vx_attrs("203.0.113.5"), None)
        finally:
            await st.close()
        assert kube.node("n1")["metadata"]["annotations"][P + "public-ip"] == "198.51.100.7"

    run(body)


def test_backend_data_of_a_previous_run_is_offered_for_the_same_backend(run: Any) -> None:
    async def body(fk: FakeKube, kube: KubeAdmin, tmp: Path) -> None:
        kube.create_node("n1", ["10.244.1.0/24"], annotations=peer_annotations("192.168.77.11", MAC))
        st = store_for(fk, tmp)
        try:
            assert await st.previous_backend_data("host-gw") == (None, None)
            assert await st.previous_backend_data("vxlan") == ({"VNI": 1, "VtepMAC": MAC}, None)
            # Same attributes as written before: nothing to patch but the condition.
            await st.acquire_lease(await st.get_network_config(), vx_attrs(mac=MAC), None)
        finally:
            await st.close()
        assert kube.stats().get("PATCH /api/v1/nodes/n1/status") == 1

    run(body)


def test_status_patch_is_retried_on_server_errors(run: Any) -> None:
    async def body(fk: FakeKube, kube: KubeAdmin, tmp: Path) -> None:
        kube.create_node("n1", ["10.244.1.0/24"])
        kube.fail("PATCH", "/api/v1/nodes/n1/status", 500, count=2)
        st = store_for(fk, tmp, set_node_network_unavailable=False)
        try:
            await st.acquire_lease(await st.get_network_config(), vx_attrs(), None)
        finally:
            await st.close()
        assert kube.stats().get("PATCH /api/v1/nodes/n1/status") == 3
        assert kube.node("n1")["metadata"]["annotations"][P + "kube-subnet-manager"] == "true"

    run(body)


# --- watch -------------------------------------------------------------------------------------------
class Follower:
    """Consumes watch_leases() in the background and keeps the peer set the way the daemon does."""

    def __init__(self, st: KubeStore) -> None:
        self.st = st
        self.updates: list[WatchUpdate] = []
        self.peers: dict[str, LeaseAttrs] = {}
        self.snapshots = 0
        self.task = asyncio.create_task(self._run())
        self.changed = asyncio.Event()

    async def _run(self) -> None:
        it: AsyncIterator[WatchUpdate] = self.st.watch_leases()
        async for up in it:
            self.updates.append(up)
            if isinstance(up, LeaseSnapshot):
                keys = [lease.key for lease in up.leases]
                assert len(keys) == len(set(keys)), f"duplicate peers in a snapshot: {keys}"
                self.peers = {lease.key: lease.attrs for lease in up.leases}
                self.snapshots += 1
            else:
                for ev in up:
                    if ev.type is EventType.ADDED:
                        self.peers[ev.lease.key] = ev.lease.attrs
                    else:
                        assert ev.lease.key in self.peers, f"removal of an unknown peer {ev.lease.key}"
                        del self.peers[ev.lease.key]
            self.changed.set()

    async def until(self, pred: Callable[[], bool], timeout: float = 10) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not pred():
            if self.task.done():
                self.task.result()
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(f"condition not reached; peers {sorted(self.peers)}, updates {self.updates!r}")
            self.changed.clear()
            # Predicates may look at the fake's counters too, which no update announces.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, 0.1))

    def events(self) -> list[LeaseEvent]:
        return [ev for up in self.updates if isinstance(up, list) for ev in up]

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def test_watch_snapshot_then_add_change_delete(run: Any) -> None:
    conf = {"Network": "10.244.0.0/16", "EnableIPv6": True, "IPv6Network": "fd00:10::/56", "Backend": {"Type": "vxlan"}}

    def ds_ann(ip: str, ip6: str, mac: str) -> dict[str, str]:
        return {
            **peer_annotations(ip, mac),
            P + "backend-v6-data": json.dumps({"VNI": 1, "VtepMAC": mac}, separators=(",", ":")),
            P + "public-ipv6": ip6,
        }

    async def body(fk: FakeKube, kube: KubeAdmin, tmp: Path) -> None:
        kube.create_node(
            "a", ["10.244.1.0/24", "fd00:10:0:1::/64"], ds_ann("192.168.77.11", "fd77::11", "aa:00:00:00:00:01")
        )
        kube.create_node("plain", ["10.244.9.0/24", "fd00:10:0:9::/64"])  # no flannel annotations
        bad = {**ds_ann("not-an-ip", "fd77::13", "aa:00:00:00:00:03")}
        kube.create_node("bad", ["10.244.3.0/24", "fd00:10:0:3::/64"], bad)
        st = store_for(fk, tmp, conf=conf)
        f = Follower(st)
        try:
            await f.until(lambda: f.snapshots == 1)
            assert set(f.peers) == {"10.244.1.0-24&fd00:10:0:1::-64"}
            kube.create_node(
                "b", ["10.244.2.0/24", "fd00:10:0:2::/64"], ds_ann("192.168.77.12", "fd77::12", "aa:00:00:00:00:02")
            )
            key_b = "10.244.2.0-24&fd00:10:0:2::-64"
            await f.until(lambda: key_b in f.peers)
            # Beyond upstream: an IPv4-only change on a dual-stack node is applied.
            kube.patch_node("b", {"metadata": {"annotations": {P + "public-ip": "192.168.77.99"}}})
            await f.until(lambda: f.peers[key_b].public_ip == IPv4Address("192.168.77.99"))
            assert f.peers[key_b].public_ipv6 == IPv6Address("fd77::12")
            # A heartbeat-like status change is no lease change.
            n_events = len(f.events())
            kube.patch_node("b", {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}, status=True)
            kube.patch_node("plain", {"metadata": {"annotations": {"x": "y"}}})
            # The "bad" node becomes valid: it is added.
            kube.patch_node("bad", {"metadata": {"annotations": {P + "public-ip": "192.168.77.13"}}})
            await f.until(lambda: "10.244.3.0-24&fd00:10:0:3::-64" in f.peers)
            assert len(f.events()) == n_events + 1
            kube.delete_node("a")
            await f.until(lambda: "10.244.1.0-24&fd00:10:0:1::-64" not in f.peers)
            removed = [ev for ev in f.events() if ev.type is EventType.REMOVED]
            assert [ev.lease.key for ev in removed] == ["10.244.1.0-24&fd00:10:0:1::-64"]
            # Losing the kube-subnet-manager annotation keeps the peer while its Node keeps its podCIDR, as upstream
            # keeps it (a pyflannel peer annotates itself again); the Node's deletion removes it, also when it is
            # registered again at once with a new podCIDR (the only way a Node's podCIDRs change).
            key_bad = "10.244.3.0-24&fd00:10:0:3::-64"
            kube.patch_node("bad", {"metadata": {"annotations": {P + "kube-subnet-manager": None}}})
            kube.create_node("c", ["10.244.4.0/24", "fd00:10:0:4::/64"], ds_ann("192.168.77.14", "fd77::14", "aa::4"))
            await f.until(lambda: "10.244.4.0-24&fd00:10:0:4::-64" in f.peers)
            assert key_bad in f.peers
            kube.delete_node("bad")
            kube.create_node("bad", ["10.244.5.0/24", "fd00:10:0:5::/64"])
            await f.until(lambda: key_bad not in f.peers)
            kube.delete_node("c")
            await f.until(lambda: set(f.peers) == {key_b})
            assert f.snapshots == 1
        finally:
            await f.stop()
            await st.close()

    run(body)


def test_watch_relists_after_410_and_after_a_dropped_connection(run: Any) -> None:
    async def body(fk: FakeKube, kube: KubeAdmin, tmp: Path) -> None:
        kube.create_node("a", ["10.244.1.0/24"], peer_annotations("192.168.77.11"))
        kube.create_node("b", ["10.244.2.0/24"], peer_annotations("192.168.77.12"))
        st = store_for(fk, tmp)
        f = Follower(st)
        try:
            await f.until(lambda: f.snapshots == 1)
            assert set(f.peers) == {"10.244.1.0-24", "10.244.2.0-24"}
            await f.until(lambda: kube.stats().get("watch", 0) == 1)
            # 410 mid-stream: the history is gone while the watch runs, and a change happens.
            kube.expire()
            kube.create_node("c", ["10.244.3.0/24"], peer_annotations("192.168.77.13"))
            await f.until(lambda: f.snapshots == 2)
            assert set(f.peers) == {"10.244.1.0-24", "10.244.2.0-24", "10.244.3.0-24"}
            # A lost connection while the next list fails for a while: changes made meanwhile are seen.
            await f.until(lambda: kube.stats().get("watch", 0) == 2)
            kube.fail("GET", "/api/v1/nodes", 503, count=2)
            kube.drop_watches()
            kube.delete_node("b")
            kube.patch_node("a", {"metadata": {"annotations": {P + "public-ip": "192.168.77.21"}}})
            await f.until(lambda: f.snapshots >= 3 and "10.244.2.0-24" not in f.peers)
            await f.until(lambda: f.peers.get("10.244.1.0-24") == vx_attrs("192.168.77.21", "aa:bb:cc:dd:ee:01"))
            assert set(f.peers) == {"10.244.1.0-24", "10.244.3.0-24"}
            # And the watch is alive again after the re-list.
            kube.create_node("d", ["10.244.4.0/24"], peer_annotations("192.168.77.14"))
            await f.until(lambda: "10.244.4.0-24" in f.peers)
        finally:
            await f.stop()
            await st.close()
        stats = kube.stats()
        assert stats.get("GET /api/v1/nodes", 0) >= 3  # list, re-list after 410, failed + successful re-lists

    run(body)


def test_watch_resumes_after_server_timeout_without_relist(run: Any) -> None:
    async def body(fk: FakeKube, kube: KubeAdmin, tmp: Path) -> None:
        kube.create_node("a", ["10.244.1.0/24"], peer_annotations("192.168.77.11"))
        st = store_for(fk, tmp, watch_timeout=1)
        f = Follower(st)
        try:
            await f.until(lambda: f.snapshots == 1)
            await f.until(lambda: kube.stats().get("watch", 0) >= 2, timeout=15)
            kube.create_node("b", ["10.244.2.0/24"], peer_annotations("192.168.77.12"))
            await f.until(lambda: "10.244.2.0-24" in f.peers)
            assert f.snapshots == 1
        finally:
            await f.stop()
            await st.close()

    run(body)


def test_unannotated_peer_is_kept_across_a_relist(run: Any) -> None:
    async def body(fk: FakeKube, kube: KubeAdmin, tmp: Path) -> None:
        kube.create_node("a", ["10.244.1.0/24"], peer_annotations("192.168.77.11"))
        st = store_for(fk, tmp)
        f = Follower(st)
        try:
            await f.until(lambda: f.snapshots == 1)
            await f.until(lambda: kube.stats().get("watch", 0) == 1)
            kube.expire()  # the next watch gets 410: a re-list, which sees "a" without its annotation
            kube.patch_node("a", {"metadata": {"annotations": {P + "kube-subnet-manager": None}}})
            await f.until(lambda: f.snapshots == 2)
            assert set(f.peers) == {"10.244.1.0-24"}
        finally:
            await f.stop()
            await st.close()

    run(body)


def test_own_node_deleted_or_unannotated_keeps_the_lease_and_is_annotated_again(run: Any) -> None:
    """Better than both upstream (runs on, never annotates again) and our old exit: the agent keeps its lease and
    data plane, and writes its annotations again once its Node is back with the same podCIDR."""

    async def body(fk: FakeKube, kube: KubeAdmin, tmp: Path) -> None:
        kube.create_node("n1", ["10.244.1.0/24"])
        kube.create_node("a", ["10.244.2.0/24"], peer_annotations("192.168.77.12"))
        st = store_for(fk, tmp)
        own = await st.acquire_lease(await st.get_network_config(), vx_attrs(), None)
        f = Follower(st)
        try:
            await f.until(lambda: f.snapshots == 1)
            assert set(f.peers) == {own.key, "10.244.2.0-24"}
            # The annotation removed by hand: written again.
            kube.patch_node("n1", {"metadata": {"annotations": {P + "kube-subnet-manager": None}}})
            await f.until(lambda: kube.node("n1")["metadata"]["annotations"].get(P + "kube-subnet-manager") == "true")
            # Deleted (a node re-registering), then back without a podCIDR, then with ours.
            kube.delete_node("n1")
            kube.create_node("b", ["10.244.3.0/24"], peer_annotations("192.168.77.13"))
            await f.until(lambda: "10.244.3.0-24" in f.peers)
            kube.create_node("n1")
            kube.create_node("c", ["10.244.4.0/24"], peer_annotations("192.168.77.14"))
            await f.until(lambda: "10.244.4.0-24" in f.peers)
            assert P + "kube-subnet-manager" not in kube.node("n1")["metadata"]["annotations"]
            kube.set_pod_cidrs("n1", ["10.244.1.0/24"])
            await f.until(lambda: kube.node("n1")["metadata"]["annotations"].get(P + "kube-subnet-manager") == "true")
            node = kube.node("n1")
            assert node["metadata"]["annotations"][P + "public-ip"] == "192.168.77.11"
            assert json.loads(node["metadata"]["annotations"][P + "backend-data"])["VtepMAC"] == MAC
            cond = [c for c in node["status"]["conditions"] if c["type"] == "NetworkUnavailable"]
            assert cond and cond[0]["status"] == "False"
            # Our lease was never removed, and the watch never re-listed for it.
            assert own.key in f.peers
            assert not [ev for ev in f.events() if ev.lease.key == own.key]
            assert f.snapshots == 1
            # A re-list while our Node is gone still holds our lease.
            kube.delete_node("n1")
            kube.expire()
            kube.create_node("d", ["10.244.5.0/24"], peer_annotations("192.168.77.15"))
            await f.until(lambda: f.snapshots == 2 and "10.244.5.0-24" in f.peers)
            assert own.key in f.peers
            # Back with another podCIDR: our subnet is gone, the lease is revoked (the agent restarts on it).
            kube.create_node("n1", ["10.244.9.0/24"])
            await f.until(lambda: f.task.done())
            with pytest.raises(LeaseRevokedError, match=r"now has podCIDR 10\.244\.9\.0/24, our lease is 10\.244\.1"):
                f.task.result()
        finally:
            with contextlib.suppress(LeaseRevokedError):
                await f.stop()
            await st.close()

    run(body)


def test_tls_files_a_kubeconfig_names_go_through_the_capped_reader(tmp_path: Path) -> None:
    """A kubeconfig whose CA is a huge file would be read whole when the client connects: refused at configuration
    (the library itself already refuses what is no regular file)."""
    fifo = tmp_path / "ca.pem"
    with fifo.open("wb") as f:
        f.truncate(2 << 30)  # sparse: no disk used
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "c", "cluster": {"server": "https://127.0.0.1:6443", "certificate-authority": str(fifo)}}
                ],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    st = KubeStore(KubeOptions(kubeconfig_file=str(kubeconfig)))

    async def body() -> None:
        with pytest.raises(StoreError, match="Kubernetes CA file"):
            await asyncio.wait_for(st._client_config(), 30)

    asyncio.run(body())
