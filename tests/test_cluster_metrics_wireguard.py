"""The wireguard backend's figures on /metrics of real agents (wireguard-go on this host, the kernel's in the VM):
its peers, those with a recent handshake, their bytes, and a peer removed by hand counted as a repair."""

from __future__ import annotations

import pytest
from test_cluster import Cluster, all_pairs_ping
from test_cluster_metrics import scrape, value
from test_cluster_wireguard import DEV, _host_key_file_untouched, cluster, lease_key, wg_cmd  # noqa: F401 (fixtures)

from pyflannel.lab import netns

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
