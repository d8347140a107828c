"""`flannel-lab up --backend udp|alloc|extension`, with show and trace, through the real CLI (test_lab's harness)."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from test_lab import LabRun, lab_factory  # noqa: F401 (the fixture)

pytestmark = pytest.mark.integration


def test_udp_up_show_trace_down(lab_factory: Callable[[str], LabRun]) -> None:  # noqa: F811
    lab = lab_factory("udp")
    lab.ok("up", "--backend", "udp", "--nodes", "2", "--pods-per-node", "1")
    st = lab.status()
    n1, n2 = st["nodes"]
    assert st["backend"] == "udp"
    assert "10.244.0.0/16 dev flannel0" in lab.node_route(n1["netns"])
    assert "2/2 pairs ok" in lab.ok("check")
    show = lab.ok("show", "n1")
    assert "flannel0 (TUN" in show and "FLANNEL_MTU=1472" in show
    assert re.search(r"UNCONN .*192\.168\.77\.\d+:8285 .*flanneld|python", show), show
    out = lab.ok("trace", "n1-p1", "n2-p1")
    assert "flannel0 is a TUN device" in out and "flanneld on n1 (userspace)" in out
    assert "one UDP datagram to that node's PublicIP:8285" in out
    # The capture: UDP 8285 between the nodes, whose payload (hex) starts with an IPv4 header (45 00).
    assert re.search(rf"{re.escape(n1['ip'])}\.8285 > {re.escape(n2['ip'])}\.8285: .*UDP", out), out
    assert re.search(r"0x0010:\s+(\S+ ){6}4500", out), out
    lab.ok("down")
    lab.assert_gone()


def test_extension_example_makes_host_gw_routes(lab_factory: Callable[[str], LabRun]) -> None:  # noqa: F811
    lab = lab_factory("ext")
    lab.ok("up", "--backend", "extension", "--nodes", "2", "--pods-per-node", "1")
    st = lab.status()
    n1, n2 = st["nodes"]
    assert f"{n2['subnet']} via {n2['ip']} dev eth0" in lab.node_route(n1["netns"])
    assert "2/2 pairs ok" in lab.ok("check")
    lab.ok("down")
    lab.assert_gone()


def test_alloc_up_gives_subnets_and_no_routes(lab_factory: Callable[[str], LabRun]) -> None:  # noqa: F811
    lab = lab_factory("alc")
    out = lab.ok("up", "--backend", "alloc", "--nodes", "2", "--pods-per-node", "1")
    assert "alloc programs no data plane" in out
    st = lab.status()
    n1, n2 = st["nodes"]
    assert n1["subnet"] and n2["subnet"] and n1["subnet"] != n2["subnet"]
    assert n2["subnet"] not in lab.node_route(n1["netns"])
    assert "FLANNEL_MTU=1500" in lab.ok("show", "n1")
    lab.ok("down")
    lab.assert_gone()
