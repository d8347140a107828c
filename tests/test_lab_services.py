"""flannel-lab service add|list|del through the real CLI: kube-proxy's iptables layout on every node, ClusterIP
and NodePort answering through the pod network, masquerade via the 0x4000 mark, and bad input that changes
nothing. One lab for the module (test_lab's harness); the ipvs mode runs in the stock-kernel VM.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import os
import re
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from needs import require
from test_lab import LabRun, lab_factory, running_lab  # noqa: F401 (the fixture)

from pyflannel.lab import netns

pytestmark = pytest.mark.integration


def _curl(lab: LabRun, target: str, url: str) -> str:
    return lab.ok("exec", target, "--", "curl", "-s", "--max-time", "5", url).strip()


def kube_proxy_hash(*parts: str) -> str:
    """kube-proxy's chain-name hash, computed here independently of the lab's code."""
    return base64.b32encode(hashlib.sha256("".join(parts).encode()).digest()).decode()[:16]


def _saves(lab: LabRun) -> dict[str, str]:
    """Each node's rules (iptables-save without its dated comment lines)."""
    return {
        n["name"]: "\n".join(x for x in netns.ns_exec(n["netns"], ["iptables-save"]).splitlines() if x[:1] != "#")
        for n in lab.status()["nodes"]
    }


def _kube_lines(save: str) -> list[str]:
    return [x for x in save.splitlines() if "KUBE-" in x]


@pytest.fixture(scope="module")
def svc() -> Iterator[LabRun]:
    require(None if shutil.which("curl") else "needs curl (run scripts/setup.sh)")
    with running_lab("svc", "--nodes", "3", "--pods-per-node", "2") as lab:
        yield lab


@pytest.fixture(scope="module")
def web(svc: LabRun) -> dict[str, Any]:
    out = svc.ok(
        "service", "add", "web", "--port", "80", "--to", "n2-p1:8080,n3-p1:8080,n1-p2:8080", "--nodeport", "30080"
    )
    m = re.search(r"ClusterIP (\S+):80 and NodePort 30080", out)
    assert m, out
    pods = {p["name"]: p for p in svc.status()["pods"]}
    return {"ip": m.group(1), "eps": [f"{pods[p]['ip']}:8080" for p in ("n2-p1", "n3-p1", "n1-p2")]}


def test_cluster_ip_from_the_service_cidr_and_listed(svc: LabRun, web: dict[str, Any]) -> None:
    assert re.fullmatch(r"10\.(9[6-9]|10[0-9]|11[01])\.\d+\.\d+", web["ip"])  # 10.96.0.0/12
    out = svc.ok("service", "list")
    assert re.search(rf"^web\s+NodePort\s+{re.escape(web['ip'])}\s+80:30080/TCP\s+iptables\s", out, re.M), out


def test_kube_proxy_layout_on_every_node(svc: LabRun, web: dict[str, Any]) -> None:
    spn, ip = "default/web:http", web["ip"]
    svc_chain = "KUBE-SVC-" + kube_proxy_hash(spn, "tcp")
    ext = "KUBE-EXT-" + kube_proxy_hash(spn, "tcp")
    seps = ["KUBE-SEP-" + kube_proxy_hash(spn, "tcp", ep) for ep in web["eps"]]
    for name, save in _saves(svc).items():
        lines = save.splitlines()
        for hook in ("PREROUTING", "OUTPUT"):
            assert lines.count(f'-A {hook} -m comment --comment "kubernetes service portals" -j KUBE-SERVICES') == 1
        cluster_ip = f'-d {ip}/32 -p tcp -m comment --comment "{spn} cluster IP" -m tcp --dport 80'
        assert f"-A KUBE-SERVICES {cluster_ip} -j {svc_chain}" in lines
        assert f"-A {svc_chain} ! -s 10.244.0.0/16 {cluster_ip} -j KUBE-MARK-MASQ" in lines
        kube_services = [x for x in lines if x.startswith("-A KUBE-SERVICES")]
        assert "--dst-type LOCAL -j KUBE-NODEPORTS" in kube_services[-1], name  # the last rule, as upstream
        assert f'-A KUBE-NODEPORTS -p tcp -m comment --comment "{spn}" -m tcp --dport 30080 -j {ext}' in lines
        assert f"-A {ext} -j {svc_chain}" in lines
        balance = [x for x in lines if x.startswith(f"-A {svc_chain} ") and "-j KUBE-SEP-" in x]
        assert [x.split("-j ")[-1] for x in balance] == seps
        probs = [re.search(r"--probability (\S+)", x) for x in balance]
        assert [round(float(m.group(1)), 4) if m else None for m in probs] == [0.3333, 0.5, None]
        for sep, ep in zip(seps, web["eps"], strict=True):
            assert f'-A {sep} -s {ep.split(":")[0]}/32 -m comment --comment "{spn}" -j KUBE-MARK-MASQ' in lines
            assert f'-A {sep} -p tcp -m comment --comment "{spn}" -m tcp -j DNAT --to-destination {ep}' in lines
        assert "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000" in lines
        assert "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN" in lines
        # flanneld's own chain lets kube-proxy's marked traffic through untouched.
        assert '-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN' in lines
    shown = svc.ok("show", "n1", "--services")
    assert svc_chain in shown and all(s in shown for s in seps) and "MASQUERADE --random-fully" in shown


def test_cluster_ip_answers_from_every_pod_and_balances(svc: LabRun, web: dict[str, Any]) -> None:
    url = f"http://{web['ip']}/"
    backends = {"n2-p1", "n3-p1", "n1-p2"}
    for pod in svc.status()["pods"]:  # every node, backends too (a pod reaching itself is the hairpin)
        assert _curl(svc, pod["name"], url).split()[0] in backends, pod["name"]
    loop = f"for i in $(seq 50); do curl -s --max-time 5 {url}; done"
    answers = svc.ok("exec", "n1-p1", "--", "sh", "-c", loop, timeout=300).splitlines()
    assert len(answers) == 50, answers
    seen = collections.Counter(a.split()[0] for a in answers)
    assert set(seen) <= backends and len(seen) > 1, seen


def test_node_port_from_the_underlay_is_masqueraded(svc: LabRun, web: dict[str, Any]) -> None:
    st = svc.status()
    node_addrs = set()
    for n in st["nodes"]:
        base = n["subnet"].rsplit(".", 1)[0]
        node_addrs |= {f"{base}.0", f"{base}.1"}  # its flannel.1 and cni0 addresses
    seen = set()
    for n in st["nodes"]:
        for _ in range(3):
            body = _curl(svc, "underlay", f"http://{n['ip']}:30080/")
            m = re.fullmatch(r"(\S+) \(client (\S+)\)", body)
            assert m, body
            seen.add(m.group(1))
            # The underlay's own 192.168.77.1 never reaches the backend: kube-proxy's mark made it masqueraded.
            assert m.group(2) in node_addrs, body
    assert seen <= {"n2-p1", "n3-p1", "n1-p2"}


def test_trace_to_a_service_shows_the_dnat_and_the_backend(svc: LabRun, web: dict[str, Any]) -> None:
    out = svc.ok("trace", "n1-p1", "web:80")
    assert "KUBE-SERVICES matches the ClusterIP" in out and "DNAT --to-destination" in out
    m = re.search(r"answer: (\S+) \(client (\S+)\)", out)
    assert m, out
    who = m.group(1)
    # The backend that answered is the one whose capture saw the SYN, addressed to its own IP.
    ep = dict(zip(("n2-p1", "n3-p1", "n1-p2"), web["eps"], strict=True))[who]
    section = out.split(f"capture on eth0 of backend {who}")[1].split("capture on")[0]
    assert re.search(rf"> {re.escape(ep.replace(':', '.'))}: Flags \[S\]", section), out
    assert re.search(rf"> {re.escape(web['ip'])}\.80: Flags \[S\]", out), out
    assert f"{who} answered" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["Web_1", "--port", "80", "--to", "n1-p1"], "a DNS-1035 label must consist of lower case"),
        (["bad", "--port", "70000", "--to", "n1-p1"], "spec.ports[0].port: Invalid value: 70000"),
        (["bad", "--port", "80", "--to", "n1-p1", "--nodeport", "29999"], "not in the valid range"),
        (["bad", "--port", "80", "--to", "n1-p1", "--nodeport", "30080"], "provided port is already allocated"),
        (["bad", "--port", "80", "--to", "n1-p1,nosuch"], "no pod 'nosuch'"),
        (["web", "--port", "80", "--to", "n1-p1"], 'services "web" already exists'),
    ],
)
def test_bad_input_is_one_line_and_changes_nothing(
    svc: LabRun, web: dict[str, Any], args: list[str], message: str
) -> None:
    before, listed = _saves(svc), svc.ok("service", "list")
    p = svc.cli("service", "add", *args)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and message in p.stderr, p.stderr
    assert _saves(svc) == before and svc.ok("service", "list") == listed


@pytest.fixture
def require_ipvs_absent() -> None:
    if os.path.exists("/proc/net/ip_vs"):
        pytest.skip("this kernel has ip_vs: test_ipvs_mode covers the mode")


def test_del_leaves_no_kube_rule(svc: LabRun, web: dict[str, Any]) -> None:
    svc.ok("service", "add", "api", "--port", "8443", "--to", "n3-p2")
    api_chain = "KUBE-SVC-" + kube_proxy_hash("default/api:http", "tcp")
    assert all(api_chain in s for s in _saves(svc).values())
    svc.ok("service", "del", "api")
    for save in _saves(svc).values():
        assert api_chain not in save and "KUBE-SEP-" + kube_proxy_hash("default/api:http", "tcp") not in save
        assert "KUBE-SVC-" + kube_proxy_hash("default/web:http", "tcp") in save  # the other one stays
    svc.ok("service", "del", "web")
    for name, save in _saves(svc).items():
        assert _kube_lines(save) == [], name
    assert svc.ok("service", "list").startswith("No resources found")
    p = svc.cli("exec", "n1-p1", "--", "curl", "-s", "--max-time", "2", f"http://{web['ip']}/")
    assert p.returncode != 0
    # The backends' HTTP servers went with their last Service.
    pods = {p["name"]: p for p in svc.status()["pods"]}
    for name in ("n2-p1", "n3-p1", "n1-p2", "n3-p2"):
        ns: str = pods[name]["netns"]
        assert netns.wait_for(lambda ns=ns: netns.ns_pids(ns) == [], timeout=10), name  # type: ignore[misc]
    p = svc.cli("service", "del", "web")
    assert p.returncode == 1 and "no service 'web'" in p.stderr


def test_ipvs_refused_without_ip_vs(svc: LabRun, require_ipvs_absent: None) -> None:
    p = svc.cli("service", "add", "v", "--port", "80", "--to", "n1-p1", "--mode", "ipvs")
    assert p.returncode == 1 and p.stderr.count("\n") == 1
    assert "--mode ipvs needs the kernel's ip_vs module" in p.stderr
    assert all(_kube_lines(s) == [] for s in _saves(svc).values())


@pytest.mark.kernel_vm
@pytest.mark.vm_only
def test_ipvs_mode(lab_factory: Callable[[str], LabRun], require_kernel_module: Callable[..., None]) -> None:  # noqa: F811
    """kube-proxy's ipvs mode where the kernel has ip_vs: virtual servers for the ClusterIP and the NodePort,
    the ClusterIP on lo, masquerade marking in iptables; del takes all of it away."""
    require_kernel_module("ip_vs")
    lab = lab_factory("ipvs")
    lab.ok("up", "--nodes", "2", "--pods-per-node", "2", timeout=400)
    out = lab.ok("service", "add", "web", "--port", "80", "--to", "n2-p1:8080,n2-p2:8080", "--nodeport", "30081",
                 "--mode", "ipvs", timeout=120)  # fmt: skip
    ip = re.search(r"ClusterIP (\S+):80", out).group(1)  # type: ignore[union-attr]
    st = lab.status()
    n1, n2 = st["nodes"]
    assert f"{ip}/32" in netns.run(["ip", "-n", n1["netns"], "-4", "addr", "show", "dev", "lo"])
    ipvs = netns.ns_exec(n1["netns"], ["ipvsadm", "-Ln"])
    assert f"TCP  {ip}:80 rr" in ipvs and f"TCP  {n1['ip']}:30081 rr" in ipvs and "Masq" in ipvs, ipvs
    seen = collections.Counter(_curl(lab, "n1-p1", f"http://{ip}/").split()[0] for _ in range(8))
    assert set(seen) == {"n2-p1", "n2-p2"}, seen  # round robin
    body = _curl(lab, "underlay", f"http://{n1['ip']}:30081/")
    assert re.fullmatch(r"n2-p[12] \(client 10\.244\.\d+\.0\)", body), body  # masqueraded by n1
    lab.ok("service", "del", "web", timeout=120)
    for n in (n1, n2):
        assert "KUBE-" not in netns.ns_exec(n["netns"], ["iptables-save"])
        assert f"{ip}:80" not in netns.ns_exec(n["netns"], ["ipvsadm", "-Ln"])
        assert ip not in netns.run(["ip", "-n", n["netns"], "-4", "addr", "show", "dev", "lo"])
    lab.ok("down")
    lab.assert_gone()
