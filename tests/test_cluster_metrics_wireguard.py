"""The wireguard backend's figures on /metrics of real agents (wireguard-go on this host, the kernel's in the VM):
its peers, those with a recent handshake, their bytes, and a peer removed by hand counted as a repair."""

from __future__ import annotations

import pytest
from test_cluster import Cluster, all_pairs_ping
from test_cluster_metrics import scrape, value
from test_cluster_wireguard import DEV, _host_key_file_untouched, cluster, lease_key, wg_cmd  # noqa: F401 (fixtures)

from pyflannel.lab import netns
from pyflannel.lab.agentstatus import status
from pyflannel.lab.testbed import Node
from pyflannel.subnetenv import read_subnet_env

pytestmark = [pytest.mark.integration, pytest.mark.kernel_vm]


def test_wireguard_figures_and_a_restored_peer(cluster: Cluster) -> None:  # noqa: F811
    tb = cluster.tb
    n1, n2 = tb.nodes["n1"], tb.nodes["n2"]
    assert all_pairs_ping(cluster) == []
    m = scrape(n1)
    assert value(m, "flannel_wireguard_peers", device=DEV) == 2
    # Every pod pinged every other: each peer has had a handshake just now.
    assert value(m, "flannel_wireguard_peers_with_handshake", device=DEV) == 2
    assert value(m, "flannel_wireguard_received_bytes_total", device=DEV) > 0
    assert value(m, "flannel_wireguard_sent_bytes_total", device=DEV) > 0
    before = value(m, "flannel_kernel_repairs_total", kind="wireguard_peer")
    wg_cmd(n1, "set", DEV, "peer", lease_key(cluster, n2), "remove")

    def repaired() -> bool:
        return value(scrape(n1), "flannel_kernel_repairs_total", kind="wireguard_peer") > before

    assert netns.wait_for(repaired, timeout=30, step=0.5)
    assert value(scrape(n1), "flannel_kernel_repairs_total", kind="wireguard_peer") == before + 1
    assert value(scrape(n1), "flannel_wireguard_peers", device=DEV) == 2


def _subnet(node: Node) -> str:
    env = read_subnet_env(node.subnet_file)
    assert env is not None and env.subnet is not None
    return str(env.subnet)


def test_wireguard_status_compares_each_peer_with_the_device(cluster: Cluster) -> None:  # noqa: F811
    n1, n2, n3 = (cluster.tb.nodes[n] for n in ("n1", "n2", "n3"))
    doc = status(n1.ns)
    assert doc["kernel_inspected"] is True, doc
    peers = {p["subnet"]: p for p in doc["peers"]}
    assert len(peers) == 2 and all(p["missing"] == [] for p in peers.values()), doc
    for node in (n2, n3):
        (line,) = peers[_subnet(node)]["present"]
        # The peer as `wg show` has it: its key and endpoint, never a secret.
        assert line.startswith(f"wireguard {DEV} peer {lease_key(cluster, node)} endpoint {node.ip}:51820 "), line
    assert any(f"dev {DEV}" in x for x in doc["own"]["present"]) and doc["own"]["missing"] == []
    assert doc["unexpected"] == [] and doc["summary"]["missing"] == 0
    # A peer the device lacks shows as missing until the periodic check (every 5 s) puts it back.
    before = value(scrape(n1), "flannel_kernel_repairs_total", kind="wireguard_peer")
    wg_cmd(n1, "set", DEV, "peer", lease_key(cluster, n2), "remove")
    doc = status(n1.ns)
    p2 = next(p for p in doc["peers"] if p["subnet"] == _subnet(n2))
    if p2["missing"]:
        assert p2["present"] == [] and len(p2["missing"]) == 1 and doc["summary"]["missing"] == 1, doc
    else:  # the check ran between the removal and this request: then it has counted the repair
        assert value(scrape(n1), "flannel_kernel_repairs_total", kind="wireguard_peer") == before + 1
    assert netns.wait_for(lambda: status(n1.ns)["summary"]["missing"] == 0, timeout=30)
