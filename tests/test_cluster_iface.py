"""flanneld's choice of external interface and public IP, on a node with two interfaces."""

from __future__ import annotations

import time

import pytest

from pyflannel.lab import netns
from pyflannel.lab.testbed import Node, Testbed

pytestmark = pytest.mark.integration


def two_homed(scope: netns.RunScope) -> tuple[Testbed, Node]:
    """A node with eth0 on the underlay (default route) and eth1 on 10.99.0.0/24 towards another namespace."""
    tb = Testbed(scope)
    tb.start_etcd()
    tb.put_config({"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}})
    node = tb.add_node("n1")
    other = scope.add_ns("side")
    netns.veth(node.ns, "eth1", other, "eth0")
    netns.run(["ip", "-n", node.ns, "addr", "add", "10.99.0.1/24", "dev", "eth1"])
    netns.run(["ip", "-n", node.ns, "link", "set", "eth1", "up"])
    netns.run(["ip", "-n", other, "addr", "add", "10.99.0.2/24", "dev", "eth0"])
    netns.run(["ip", "-n", other, "link", "set", "eth0", "up"])
    return tb, node


def run_once(tb: Testbed, node: Node, *args: str) -> tuple[str, str]:
    """Start the agent with `args`, wait until ready; return (lease PublicIP, vxlan device details)."""
    t0 = time.time()
    tb.start_agent(node, *args)
    env = tb.wait_ready(node, since=t0 - 1)
    assert env.subnet is not None
    lease = tb.leases()[f"{env.subnet.network_address}-{env.subnet.prefixlen}"]
    link = netns.run(["ip", "-n", node.ns, "-d", "link", "show", "flannel.1"])
    assert tb.stop_agent(node) == 0
    return str(lease["PublicIP"]), link


@pytest.mark.parametrize(
    "args,public,local_dev",
    [
        ((), "192.168.77.11", "dev eth0"),
        (("--iface=eth1",), "10.99.0.1", "dev eth1"),
        (("--iface=nosuch", "--iface=10.99.0.1"), "10.99.0.1", "dev eth1"),
        (("--iface-regex=^10\\.99\\.",), "10.99.0.1", "dev eth1"),
        (("--iface-can-reach=10.99.0.2",), "10.99.0.1", "dev eth1"),
        (("--iface=eth1", "--public-ip=203.0.113.7"), "203.0.113.7", "local 10.99.0.1 dev eth1"),
    ],
)
def test_interface_and_public_ip_selection(
    scope: netns.RunScope, args: tuple[str, ...], public: str, local_dev: str
) -> None:
    tb, node = two_homed(scope)
    got_public, link = run_once(tb, node, *args)
    assert got_public == public
    assert local_dev in link


def test_unknown_interface_is_a_clear_error(scope: netns.RunScope) -> None:
    tb, node = two_homed(scope)
    tb.start_agent(node, "--iface=nosuch")
    assert node.proc is not None
    assert node.proc.wait(timeout=30) == 1
    log = node.log_file.read_text()
    assert "--iface nosuch" in log and "Traceback" not in log
    node.proc = None


def test_several_etcd_endpoints_one_of_them_down(scope: netns.RunScope) -> None:
    tb, node = two_homed(scope)
    # Nothing listens on .250: the agent must use the endpoint that answers.
    endpoints = f"--etcd-endpoints=http://192.168.77.250:2379,{tb.endpoint}"
    t0 = time.time()
    tb.start_agent(node, endpoints)
    env = tb.wait_ready(node, since=t0 - 1)
    assert env.subnet is not None
    assert f"{env.subnet.network_address}-{env.subnet.prefixlen}" in tb.leases()
    assert tb.stop_agent(node) == 0
