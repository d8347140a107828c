"""flannel-lab up --store kube, through the real CLI: the Node objects, the CNI files at the tutorials' paths,
captures at every point of `trace`, and traceroute through the nodes. One lab for the module (test_lab's harness).
"""

from __future__ import annotations

import json
import re
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from needs import require
from test_lab import LabRun, running_lab

from pyflannel.lab import kubemode, netns
from pyflannel.lab.state import LabOptions, LabState

pytestmark = pytest.mark.integration

P = "flannel.alpha.coreos.com/"
HOST_VAR_LIB_CNI = Path("/var/lib/cni")


@pytest.fixture(scope="module")
def kube() -> Iterator[LabRun]:
    require(None if shutil.which("openssl") else "needs openssl (run scripts/setup.sh)")
    host_had = HOST_VAR_LIB_CNI.exists()
    try:
        with running_lab("kube", "--store", "kube", "--nodes", "3", "--pods-per-node", "1") as lab:
            yield lab
    finally:
        # The node's /var/lib/cni lived in its own mount namespaces only.
        assert HOST_VAR_LIB_CNI.exists() == host_had


def test_configmap_net_conf_is_0600_even_over_a_looser_one(tmp_path: Path) -> None:
    """An ipsec net-conf carries the PSK: net-conf.json is 0600 also where an earlier run left one readable."""
    st = LabState(prefix="t", state_dir=str(tmp_path), options=LabOptions())
    d = kubemode.configmap_dir(st)
    d.mkdir(parents=True)
    (d / "net-conf.json").write_text("{}\n")
    (d / "net-conf.json").chmod(0o644)
    kubemode.write_configmap(st, {"Network": "10.244.0.0/16", "Backend": {"Type": "ipsec", "PSK": "x" * 96}})
    assert stat.S_IMODE((d / "net-conf.json").stat().st_mode) == 0o600
    assert json.loads((d / "net-conf.json").read_text())["Backend"]["PSK"] == "x" * 96


def _nodes(lab: LabRun) -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load(lab.ok("get", "nodes", "-o", "yaml"))
    assert doc["kind"] == "List" and doc["apiVersion"] == "v1"
    return {n["metadata"]["name"]: n for n in doc["items"]}


def _mac(ns: str, dev: str) -> str:
    return str(json.loads(netns.run(["ip", "-n", ns, "-j", "link", "show", dev]))[0]["address"])


def test_status_names_the_store_and_pod_cidrs_come_in_order(kube: LabRun) -> None:
    st = kube.status()
    assert st["store"] == "kube" and st["etcd"] is None
    assert st["kube"]["running"] and st["kube"]["server"] == "https://192.168.77.2:6443"
    assert "store kube (flanneld --kube-subnet-mgr" in kube.ok("status")
    # kube-controller-manager's range allocator: /24s of the cluster CIDR in order, from its first.
    assert [(n["name"], n["subnet"]) for n in st["nodes"]] == [
        ("n1", "10.244.0.0/24"),
        ("n2", "10.244.1.0/24"),
        ("n3", "10.244.2.0/24"),
    ]
    # flanneld runs as kube-flannel runs it.
    for n in st["nodes"]:
        cmd = Path(f"/proc/{n['pid']}/cmdline").read_bytes().decode().split("\0")
        assert "--kube-subnet-mgr" in cmd and "--ip-masq" in cmd
        assert any(a.startswith("--kubeconfig-file=") for a in cmd)
        assert not any(a.startswith("--etcd-endpoints") for a in cmd)


def test_node_annotations_are_upstreams(kube: LabRun) -> None:
    st = kube.status()
    nodes = _nodes(kube)
    for n in st["nodes"]:
        obj = nodes[n["name"]]
        assert obj["spec"] == {"podCIDR": n["subnet"], "podCIDRs": [n["subnet"]]}
        flannel = {k: v for k, v in obj["metadata"]["annotations"].items() if k.startswith(P)}
        mac = _mac(n["netns"], "flannel.1")
        assert flannel == {
            P + "backend-data": json.dumps({"VNI": 1, "VtepMAC": mac}, separators=(",", ":")),
            P + "backend-type": "vxlan",
            P + "kube-subnet-manager": "true",
            P + "public-ip": n["ip"],
        }
        conds = {c["type"]: c for c in obj["status"]["conditions"]}
        assert conds["NetworkUnavailable"]["status"] == "False"
        assert conds["NetworkUnavailable"]["reason"] == "FlannelIsUp"
    # One node alone, as `kubectl get node n1 -o yaml` and `-o json`: the same object.
    one = yaml.safe_load(kube.ok("get", "node", "n1", "-o", "yaml"))
    assert one["kind"] == "Node" and one == json.loads(kube.ok("get", "node", "n1", "-o", "json"))
    assert one["metadata"]["annotations"][P + "public-ip"] == st["nodes"][0]["ip"]
    # Go's YAML encoder quotes the strings that would read back as booleans.
    assert f'{P}kube-subnet-manager: "true"' in kube.ok("get", "node", "n1", "-o", "yaml")
    table = kube.ok("get", "nodes").splitlines()
    assert re.fullmatch(r"NAME\s+STATUS\s+ROLES\s+AGE\s+VERSION", table[0])
    assert [line.split()[:3] for line in table[1:]] == [[f"n{i}", "Ready", "<none>"] for i in (1, 2, 3)]
    wide = kube.ok("get", "nodes", "-o", "wide")
    assert "INTERNAL-IP" in wide and st["nodes"][2]["ip"] in wide
    p = kube.cli("get", "node", "nosuch")
    assert p.returncode == 1
    assert p.stderr.strip() == 'flannel-lab: Error from server (NotFound): nodes "nosuch" not found'


def test_every_pod_pings_every_other(kube: LabRun) -> None:
    assert json.loads(kube.ok("check", "--json")) == {"ok": True, "failed": [], "pairs": 6}


def test_cni_files_at_the_tutorials_paths(kube: LabRun) -> None:
    st = kube.status()
    state = json.loads((kube.state_dir / "state.json").read_text())
    cids = {p["name"]: p["container_id"] for p in state["pods"]}
    show = kube.ok("show", "n2")
    for pod in st["pods"]:
        node = next(n for n in st["nodes"] if n["name"] == pod["node"])
        cid = cids[pod["name"]]

        def cat(path: str, node: str = node["name"]) -> str:
            # Literally the tutorials' path, inside the node.
            return kube.ok("exec", node, "--", "cat", path)

        delegate = json.loads(cat(f"/var/lib/cni/flannel/{cid}"))
        subnet_env = Path(state["state_dir"]) / node["name"] / "subnet.env"
        env = dict(line.split("=", 1) for line in subnet_env.read_text().split())
        # What the flannel plugin handed the bridge plugin, built from subnet.env, as upstream writes it.
        assert delegate == {
            "cniVersion": "0.3.1",
            "hairpinMode": True,
            "ipMasq": env["FLANNEL_IPMASQ"] != "true",
            "ipam": {"ranges": [[{"subnet": node["subnet"]}]], "routes": [{"dst": "10.244.0.0/16"}],
                     "type": "host-local"},
            "isDefaultGateway": True,
            "isGateway": True,
            "mtu": int(env["FLANNEL_MTU"]),
            "name": "cbr0",
            "type": "bridge",
        }  # fmt: skip
        assert cat(f"/var/lib/cni/networks/cbr0/{pod['ip']}").splitlines() == [cid, "eth0"]
        cache = json.loads(cat(f"/var/lib/cni/results/cbr0-{cid}-eth0"))
        assert cache["containerId"] == cid and cache["networkName"] == "cbr0"
        assert [ip["address"] for ip in cache["result"]["ips"]] == [f"{pod['ip']}/24"]
        if node["name"] == "n2":
            assert f"/var/lib/cni/networks/cbr0/{pod['ip']}" in show and f"/var/lib/cni/flannel/{cid}" in show
    # Each node sees only its own pods' files.
    n1_pod = next(p for p in st["pods"] if p["node"] == "n1")
    assert kube.cli("exec", "n2", "--", "cat", f"/var/lib/cni/networks/cbr0/{n1_pod['ip']}").returncode != 0


def test_trace_captures_at_every_point(kube: LabRun) -> None:
    st = kube.status()
    pods = {p["name"]: p for p in st["pods"]}
    nodes = {n["name"]: n for n in st["nodes"]}
    src, dst = pods["n1-p1"], pods["n2-p1"]
    out = kube.ok(
        "trace", "n1-p1", "n2-p1", "--capture", "pod", "--capture", "cni0", "--capture", "flannel.1",
        "--capture", "underlay",
    )  # fmt: skip
    sections = dict(re.findall(r"^capture on (\S+) .*?\n(.*?)(?=^capture on |\Z)", out, re.M | re.S))
    assert set(sections) == {"pod", "cni0", "flannel.1", "underlay"}, out
    inner = rf"{re.escape(src['ip'])} > {re.escape(dst['ip'])}: ICMP echo request"
    assert list(sections) == ["cni0", "flannel.1", "underlay", "pod"]  # in the packet's order
    # On cni0: the pod's own packet, ttl 64, pod IPs on both sides.
    assert re.search(r"ttl 64,.*\n\s+" + inner, sections["cni0"]), sections["cni0"]
    # In the destination pod: routed by both nodes, ttl 62.
    assert re.search(r"ttl 62,.*\n\s+" + inner, sections["pod"]), sections["pod"]
    # On flannel.1: routed once by the node, ttl 63.
    assert re.search(r"ttl 63,.*\n\s+" + inner, sections["flannel.1"]), sections["flannel.1"]
    # On the underlay: UDP 8472 between the nodes, VXLAN decoded, the inner packet at ttl 63.
    ul = sections["underlay"]
    n1, n2 = re.escape(nodes["n1"]["ip"]), re.escape(nodes["n2"]["ip"])
    assert re.search(rf"{n1}\.\d+ > {n2}\.8472: VXLAN, flags \[I\] \(0x08\), vni 1", ul), ul
    assert re.search(r"ttl 63,.*\n\s+" + inner, ul), ul
    assert "64 -> 63 -> 62" in out
    p = kube.cli("trace", "n1-p1", "n2-p1", "--capture", "eth7")
    assert p.returncode == 2 and "invalid choice" in p.stderr


def test_traceroute_shows_the_node_hops(kube: LabRun) -> None:
    require(None if shutil.which("traceroute") else "needs traceroute (run scripts/setup.sh)")
    st = kube.status()
    pods = {p["name"]: p for p in st["pods"]}
    out = kube.ok("exec", "n1-p1", "--", "traceroute", "-n", "-q", "1", "-w", "2", pods["n3-p1"]["ip"], timeout=60)
    hops = re.findall(r"^\s*(\d+)\s+(\S+)", out, re.M)
    # Its own node's cni0, the peer node's flannel.1 (the .0 of its subnet), then the pod.
    assert [ip for _, ip in hops] == ["10.244.0.1", "10.244.2.0", pods["n3-p1"]["ip"]], out


def test_remove_node_deletes_its_node_object(kube: LabRun) -> None:
    st = kube.status()
    n1 = st["nodes"][0]
    n3 = st["nodes"][2]
    kube.ok("remove-node", "n3")
    assert "n3" not in _nodes(kube)
    assert netns.wait_for(lambda: n3["subnet"] not in kube.node_route(n1["netns"]))
    assert json.loads(kube.ok("check", "--json"))["ok"]
