"""The alloc backend with real agents on real etcd: a lease and subnet.env, and nothing in the kernel."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from clusters import build_cluster
from test_cluster import NETWORK, Cluster, ip

from pyflannel.lab import netns
from pyflannel.lab.agentstatus import status
from pyflannel.lab.testbed import Node

pytestmark = [pytest.mark.integration]

BEFORE: dict[str, tuple[str, str, str]] = {}


def _kernel(ns: str) -> tuple[str, str, str]:
    return ip(ns, "-o", "link"), ip(ns, "route", "show", "table", "all"), ip(ns, "-o", "addr")


def _remember(node: Node) -> None:
    BEFORE[node.name] = _kernel(node.ns)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # No --iptables-forward-rules either: then the agent has nothing of its own to put in the kernel.
    extra = (
        "--reconcile-interval=300",
        "--iptables-forward-rules=false",
        "--healthz-port=8471",
        "--healthz-ip=127.0.0.1",
    )
    yield from build_cluster("alloc", {"Type": "alloc"}, nodes=("n1", "n2"), extra_args=extra,
                             pods=False, before_start=_remember)  # fmt: skip


def test_lease_and_subnet_env_are_upstreams(cluster: Cluster) -> None:
    tb = cluster.tb
    subnets = set()
    for node in tb.nodes.values():
        env = cluster.env[node.name]
        assert env.subnet is not None and env.subnet.prefixlen == 24
        subnets.add(env.subnet)
        text = node.subnet_file.read_text()
        assert f"FLANNEL_NETWORK={NETWORK}\n" in text
        assert f"FLANNEL_SUBNET={env.subnet.network_address + 1}/24\n" in text
        assert "FLANNEL_MTU=1500\n" in text
        key = cluster.subnet(node).replace("/", "-")
        raw = tb.etcdctl("get", f"{tb.prefix}/subnets/{key}", "--print-value-only").strip()
        assert raw == json.dumps({"PublicIP": node.ip, "PublicIPv6": None}, separators=(",", ":")), raw
    assert len(subnets) == 2


def test_no_link_route_or_address_is_added(cluster: Cluster) -> None:
    nodes = list(cluster.tb.nodes.values())
    for node, peer in zip(nodes, nodes[::-1], strict=True):
        # The agent has seen its peer's lease and still programmed nothing.
        def seen(n: Node = node, p: Node = peer) -> bool:
            text = n.log_file.read_text()
            return f"added peer {cluster.subnet(p)}" in text or "synced 1 peer leases" in text

        assert netns.wait_for(seen, timeout=20)
        assert node.proc is not None and node.proc.poll() is None
        assert _kernel(node.ns) == BEFORE[node.name]


def test_status_is_complete_with_nothing_programmed(cluster: Cluster) -> None:
    n1, n2 = cluster.tb.nodes["n1"], cluster.tb.nodes["n2"]
    assert netns.wait_for(lambda: status(n1.ns)["peers"] != [], timeout=30)
    doc = status(n1.ns)
    assert doc["kernel_inspected"] is True and doc["backend"] == "alloc", doc
    assert [(p["subnet"], p["present"], p["missing"]) for p in doc["peers"]] == [(cluster.subnet(n2), [], [])]
    assert doc["unexpected"] == [] and doc["summary"]["complete"] == 1
