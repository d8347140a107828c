"""flanneld --ip-masq on a real node: the rules it keeps, and what happens when iptables is missing."""

from __future__ import annotations

import os
import shutil
import time
import urllib.error

import pytest

from pyflannel.lab import netns
from pyflannel.lab.testbed import Testbed

pytestmark = pytest.mark.integration


def readyz(ns: str, port: int = 8471) -> str:
    return netns.ns_exec(ns, ["python3", "-c", (
        "import urllib.request,urllib.error\n"
        "try:\n"
        f"    r=urllib.request.urlopen('http://127.0.0.1:{port}/readyz',timeout=5);print(r.status, r.read().decode())\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code, e.read().decode())\n"
    )]).strip()  # fmt: skip


def nat_rules(ns: str) -> list[str]:
    out = netns.ns_exec(ns, ["iptables-save", "-t", "nat"])
    return [line for line in out.splitlines() if "flanneld masq" in line]


def test_ip_masq_rules_kept_and_left_on_sigterm(scope: netns.RunScope) -> None:
    tb = Testbed(scope)
    tb.start_etcd()
    tb.put_config({"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}})
    node = tb.add_node("n1")
    tb.start_agent(node, "--ip-masq", "--iptables-resync=1", "--healthz-port=8471", "--healthz-ip=127.0.0.1")
    env = tb.wait_ready(node)
    rules = nat_rules(node.ns)
    assert (
        f'-A FLANNEL-POSTRTG -s {env.subnet} -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j RETURN' in rules
    )
    assert sum(1 for r in rules if r.startswith("-A POSTROUTING")) == 1
    assert "FLANNEL_IPMASQ=true" in node.subnet_file.read_text()
    assert netns.wait_for(lambda: readyz(node.ns).startswith("200"), timeout=10)
    # A rule deleted by hand comes back within the resync period, once.
    netns.ns_exec(node.ns, ["iptables", "-t", "nat", "-D", "POSTROUTING", "-m", "comment", "--comment",
                            "flanneld masq", "-j", "FLANNEL-POSTRTG"])  # fmt: skip
    assert netns.wait_for(lambda: nat_rules(node.ns) == rules, timeout=10), nat_rules(node.ns)
    assert tb.stop_agent(node) == 0
    assert nat_rules(node.ns) == rules  # pods keep their egress while the agent restarts


def test_missing_iptables_is_not_ready_and_not_a_crash(scope: netns.RunScope) -> None:
    tb = Testbed(scope)
    tb.start_etcd()
    tb.put_config({"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}})
    node = tb.add_node("n1")
    # A PATH with everything the agent needs except iptables/nft.
    bindir = scope.tmpdir / "bin"
    bindir.mkdir()
    for tool in ("ip", "python3"):
        path = shutil.which(tool)
        assert path is not None
        os.symlink(path, bindir / tool)
    tb.start_agent(node, "--ip-masq", "--iptables-resync=1", "--healthz-port=8471", "--healthz-ip=127.0.0.1",
                   env={"PATH": str(bindir)})  # fmt: skip
    deadline = time.monotonic() + 20
    status = ""
    while time.monotonic() < deadline:
        try:
            status = readyz(node.ns)
        except (netns.NetnsError, urllib.error.URLError):
            status = ""
        if status.startswith("503") and "iptables" in status:
            break
        time.sleep(0.3)
    assert status.startswith("503") and "iptables" in status, status
    time.sleep(2)
    assert node.proc is not None and node.proc.poll() is None, tb.log_tail(node)
    log = node.log_file.read_text()
    assert "iptables" in log and "Traceback" not in log
    assert nat_rules(node.ns) == []  # nothing half-installed
