"""The extension backend with real agents on real etcd: the commands' stdin and environment, a peer's hostile
BackendData reaching them only as data, and a hung command killed at its bound while the agent goes on.

The command (tests/ext_recorder.py) records what it got and programs host-gw style routes, so pods reach each
other only if the commands ran as documented.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clusters import build_cluster
from ext_recorder import HOSTILE
from test_cluster import NETWORK, Cluster, all_pairs_ping, ip

from pyflannel.lab import netns
from pyflannel.lab.testbed import Node

pytestmark = [pytest.mark.integration]

REC = f"{shlex.quote(sys.executable)} {shlex.quote(str(Path(__file__).with_name('ext_recorder.py')))}"
FAKE = "10.244.200.0/24"
FAKE_IP = "192.168.77.99"
TIMEOUT = 2


def _record_dir(node: Node) -> Path:
    d = node.dir / "records"
    (d / "markers").mkdir(parents=True, exist_ok=True)
    return d


def _records(node: Node, kind: str) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(_record_dir(node).glob(f"{kind}-*.json"))]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    backend = {
        "Type": "extension",
        "PreStartupCommand": f"{REC} pre",
        "PostStartupCommand": f"{REC} post",
        "SubnetAddCommand": f"{REC} add 'two words'",
        "SubnetRemoveCommand": f"{REC} remove --hang",
        "CommandTimeout": TIMEOUT,
    }
    yield from build_cluster(
        "ext", backend, nodes=("n1", "n2"), agent_env=lambda n: {"EXT_RECORD_DIR": str(_record_dir(n))}
    )


def _fake_key(subnet: str) -> str:
    return subnet.replace("/", "-")


def test_pods_reach_each_other_through_routes_the_commands_made(cluster: Cluster) -> None:
    assert all_pairs_ping(cluster) == []
    n1, n2 = cluster.tb.nodes["n1"], cluster.tb.nodes["n2"]
    assert f"{cluster.subnet(n2)} via {n2.ip} dev eth0" in ip(n1.ns, "route", "show", cluster.subnet(n2))


def test_startup_commands_and_lease(cluster: Cluster) -> None:
    for node in cluster.tb.nodes.values():
        markers = str(_record_dir(node) / "markers")
        lease = cluster.lease_of(node)
        assert lease["BackendType"] == "extension"
        # PreStartupCommand's output, trimmed, as a JSON string.
        assert lease["BackendData"] == HOSTILE.format(m=markers)
        (post,) = _records(node, "post")
        assert post["env"] == {"SUBNET": cluster.subnet(node), "PUBLIC_IP": node.ip, "NETWORK": NETWORK}
        assert "FLANNEL_MTU=1500\n" in node.subnet_file.read_text()


def test_peer_commands_get_the_peers_backend_data_on_stdin_and_its_subnet_in_env(cluster: Cluster) -> None:
    tb = cluster.tb
    n1, n2 = tb.nodes["n1"], tb.nodes["n2"]
    adds = [r for r in _records(n1, "add") if r["env"]["SUBNET"] == cluster.subnet(n2)]
    assert adds, _records(n1, "add")
    rec = adds[0]
    assert rec["argv"] == ["add", "two words"]
    assert rec["env"]["PUBLIC_IP"] == n2.ip
    # n2's BackendData (its hostile PreStartupCommand output) arrived as bytes on stdin, nothing more.
    assert rec["stdin"] == HOSTILE.format(m=_record_dir(n2) / "markers") + "\n"
    for node in tb.nodes.values():
        assert list((_record_dir(node) / "markers").iterdir()) == []


def test_hostile_backend_data_of_a_written_lease_is_only_data(cluster: Cluster, tmp_path: Path) -> None:
    tb = cluster.tb
    hostile = f"x'; touch {tmp_path}/semi; $(touch {tmp_path}/dollar) `touch {tmp_path}/tick` \" \\"
    value = {"PublicIP": FAKE_IP, "PublicIPv6": None, "BackendType": "extension", "BackendData": hostile}
    tb.etcdctl("put", f"{tb.prefix}/subnets/{_fake_key(FAKE)}", "--", json.dumps(value))
    for node in tb.nodes.values():

        def added(n: Node = node) -> bool:
            return any(r["env"]["SUBNET"] == FAKE for r in _records(n, "add"))

        assert netns.wait_for(added, timeout=20)
        rec = next(r for r in _records(node, "add") if r["env"]["SUBNET"] == FAKE)
        assert rec["stdin"] == hostile + "\n"
        assert rec["env"]["PUBLIC_IP"] == FAKE_IP
    assert list(tmp_path.iterdir()) == []


def test_a_hung_command_is_killed_at_its_bound_and_the_agent_goes_on(cluster: Cluster) -> None:
    tb = cluster.tb
    n1 = tb.nodes["n1"]
    tb.etcdctl("del", f"{tb.prefix}/subnets/{_fake_key(FAKE)}")
    assert netns.wait_for(lambda: any(r["env"]["SUBNET"] == FAKE for r in _records(n1, "remove")), timeout=20)
    hung = next(r for r in _records(n1, "remove") if r["env"]["SUBNET"] == FAKE)
    assert netns.wait_for(lambda: "killed after its time limit" in n1.log_file.read_text(), timeout=TIMEOUT + 20)
    assert not netns.pid_alive(int(hung["pid"]))
    # Still following leases: the next peer gets its command.
    nxt = "10.244.201.0/24"
    value = {"PublicIP": FAKE_IP, "PublicIPv6": None, "BackendType": "extension", "BackendData": "ok"}
    tb.etcdctl("put", f"{tb.prefix}/subnets/{_fake_key(nxt)}", "--", json.dumps(value))
    assert netns.wait_for(lambda: any(r["env"]["SUBNET"] == nxt for r in _records(n1, "add")), timeout=20)
    assert n1.proc is not None and n1.proc.poll() is None
