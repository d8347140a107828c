"""flannel-lab up --ip-family dual|ipv6, through the real CLI: the IPv6 underlay and subnets, `check` over each IP
version (and a failure over one of them reported as that family's), `show` of the IPv6 VTEP's routes, neighbours
and FDB, `trace -6` with the capture of VXLAN over IPv6, IPv6-only, kube mode with two podCIDRs, bad input.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from test_lab import LabRun, lab_factory, running_lab

from pyflannel.lab import capture, netns

pytestmark = pytest.mark.integration
__all__ = ["lab_factory"]  # the fixture, imported for the tests below

NET6 = ipaddress.IPv6Network("fd42:244::/56")  # the lab's default IPv6Network
UNDERLAY6 = ipaddress.IPv6Network("fd77:77::/64")


@pytest.fixture(scope="module")
def dual() -> Iterator[LabRun]:
    with running_lab("dual", "--ip-family", "dual", "--nodes", "2", "--pods-per-node", "2") as lab:
        yield lab


def test_addresses_visible_reads_the_hex_dump_only() -> None:
    """A pod address counts as seen in a tcpdump -X capture as text or as its bytes in the hex dump; only the
    dump's own lines (offset, colon) are read as bytes, never header text such as IPv6's "flowlabel 0x0..."."""
    a6, b6 = "fd42:244::1", "fd42:244:0:1::2"
    header = (
        "00:00:00.000000 04:04:04:04:04:04 > 02:02:02:02:02:02, ethertype IPv6 (0x86dd), length 150: "
        "(flowlabel 0x0abcd, hlim 64, next-header ESP (50) payload length: 96)  fd42 0244 0000 0000 0000 "
        "0000 0000 0001 ESP(spi=0x00000101,seq=0x1), length 96"
    )  # hex-looking header text after a double space: no address in it as text, and no part of the dump
    encrypted = "\n".join(
        [header, "\t0x0000:  6000 abcd 0060 3240 fd77 0077 0000 0000  `....`2@.w.w....", "\t0x0010:  9a3c 11e0  .<.."]
    )
    assert capture.addresses_visible(encrypted, [a6, b6]) == []
    # The bytes of an address split over two dump lines, past offset 0xfff; the other as text.
    clear = "\n".join(
        [
            f"IP6 {b6} > fd42:244::9: ICMP6, echo request",
            "\t0x0ff0:  0000 0000 0000 0000 0000 0000 fd42 0244  ...............B.D",
            "\t0x1000:  0000 0000 0000 0000 0000 0001 0000 0000  ................",
        ]
    )
    assert capture.addresses_visible(clear, [a6, b6, "10.244.1.2"]) == [a6, b6]


def _by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {x["name"]: x for x in items}


def _etcd_get(lab: LabRun, key: str) -> str:
    st = lab.status()
    return netns.run(
        ["ip", "netns", "exec", st["etcd"]["netns"], "env", "ETCDCTL_API=3", "etcdctl", "--endpoints",
         st["etcd"]["endpoint"], "get", "--print-value-only", key]
    ).strip()  # fmt: skip


def test_dual_status_addresses_and_net_conf(dual: LabRun) -> None:
    st = dual.status()
    assert st["ip_family"] == "dual" and st["network"] == "10.244.0.0/16" and st["ipv6_network"] == str(NET6)
    assert st["underlay"]["cidr6"] == str(UNDERLAY6)
    conf = json.loads(_etcd_get(dual, "/coreos.com/network/config"))
    assert conf["EnableIPv6"] is True and conf["IPv6Network"] == str(NET6) and conf["Network"] == "10.244.0.0/16"
    assert "EnableIPv4" not in conf  # upstream's default: on
    for n in st["nodes"]:
        # The IPv6 twin of the node's underlay address, on its eth0.
        assert n["ip6"] == f"fd77:77::{n['ip'].rsplit('.', 1)[1]}"
        assert f"inet6 {n['ip6']}/64" in netns.run(["ip", "-n", n["netns"], "-6", "addr", "show", "eth0"])
        sn6 = ipaddress.IPv6Network(n["subnet6"])
        assert sn6.prefixlen == 64 and sn6.subnet_of(NET6)
        assert re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", n["vtep_mac6"]) and n["vtep_mac6"] != n["vtep_mac"]
        # The dual-stack lease key, and both public addresses in its value.
        key = f"{n['subnet'].replace('/', '-')}&{sn6.network_address}-64"
        lease = json.loads(_etcd_get(dual, f"/coreos.com/network/subnets/{key}"))
        assert lease["PublicIP"] == n["ip"] and lease["PublicIPv6"] == n["ip6"]
    nodes = _by_name(st["nodes"])
    for p in st["pods"]:
        # Both addresses from host-local, each inside its node's subnet of that family.
        node = nodes[p["node"]]
        assert ipaddress.ip_address(p["ip"]) in ipaddress.IPv4Network(node["subnet"])
        assert ipaddress.ip_address(p["ip6"]) in ipaddress.IPv6Network(node["subnet6"])
        assert f"inet6 {p['ip6']}/64" in netns.run(["ip", "-n", p["netns"], "-6", "addr", "show", "eth0"])
    text = dual.ok("status")
    assert "(dual)" in text and all(n["subnet6"] in text for n in st["nodes"])
    picture = dual.ok("diagram")
    assert all(n["subnet6"] in picture and n["ip6"] in picture for n in st["nodes"])
    assert all(f"{p['ip']} {p['ip6']}" in picture for p in st["pods"])


def test_dual_check_pings_over_both_families(dual: LabRun) -> None:
    out = dual.ok("check")
    assert "12/12 pairs ok over IPv4" in out and "12/12 pairs ok over IPv6" in out and "FAIL" not in out
    doc = json.loads(dual.ok("check", "--json"))
    assert doc["ok"] is True and doc["pairs"] == 24
    assert doc["families"]["ipv4"]["ok"] and doc["families"]["ipv6"]["ok"]
    # IPv6 alone broken for one pod (its echo requests dropped inside it): check says so, for IPv6 only.
    pod = _by_name(dual.status()["pods"])["n2-p1"]
    rule = ["INPUT", "-p", "ipv6-icmp", "--icmpv6-type", "echo-request", "-j", "DROP"]
    netns.run(["ip", "netns", "exec", pod["netns"], "ip6tables", "-w", "-I", *rule])
    try:
        p = dual.cli("check", "--json")
        assert p.returncode == 1
        doc = json.loads(p.stdout)
        assert doc["families"]["ipv4"]["ok"] is True
        assert sorted(doc["families"]["ipv6"]["failed"]) == ["n1-p1->n2-p1", "n1-p2->n2-p1", "n2-p2->n2-p1"]
        assert "n1-p1->n2-p1 (IPv6)" in doc["failed"] and len(doc["failed"]) == 3
        assert "9/12 pairs ok over IPv6" in dual.cli("check").stdout
    finally:
        netns.run(["ip", "netns", "exec", pod["netns"], "ip6tables", "-w", "-D", *rule])


def test_dual_show_lists_the_ipv6_vtep(dual: LabRun) -> None:
    st = dual.status()
    n1, n2 = st["nodes"]
    out = dual.ok("show", "n1")
    net2 = n2["subnet6"].split("/")[0]
    assert "-- IPv6 routes   [ip -6 route]" in out
    assert re.search(rf"{re.escape(n2['subnet6'])} via {re.escape(net2)} dev flannel-v6\.1 .*onlink", out)
    assert f"vxlan id 1 local {n1['ip6']} dev eth0" in out  # flannel-v6.1 sends from the node's IPv6 address
    assert "[ip -6 neigh show dev flannel-v6.1]" in out
    assert f"{net2} lladdr {n2['vtep_mac6']} PERMANENT" in out
    assert f"{n2['vtep_mac6']} dst {n2['ip6']} self permanent" in out
    # The IPv4 VTEP is still there, as in an IPv4 lab.
    assert f"{n2['vtep_mac']} dst {n2['ip']} self permanent" in out
    assert f"subnets/{n1['subnet'].replace('/', '-')}&" in out and f'"PublicIPv6":"{n1["ip6"]}"' in out


def test_dual_trace_ipv6_captures_vxlan_over_ipv6(dual: LabRun) -> None:
    st = dual.status()
    n1, n2 = st["nodes"]
    pods = _by_name(st["pods"])
    src, dst = pods["n1-p1"]["ip6"], pods["n2-p1"]["ip6"]
    out = dual.ok("trace", "n1-p1", "n2-p1", "-6", "--capture", "underlay", "--capture", "pod")
    assert out.startswith(f"trace n1-p1 ({src} on n1) -> n2-p1 ({dst} on n2), backend vxlan, over IPv6")
    assert f"{n2['vtep_mac6']} dst {n2['ip6']} self permanent" in out  # the FDB hop
    assert f"UDP {n1['ip6']} -> {n2['ip6']}:8472" in out
    # On the wire: UDP 8472 between the nodes' fd77:77:: addresses, VXLAN decoded, the pods' ICMPv6 inside.
    outer = rf"{re.escape(n1['ip6'])}\.\d+ > {re.escape(n2['ip6'])}\.8472: VXLAN, flags \[I\] \(0x08\), vni 1"
    assert re.search(outer, out), out
    assert re.search(rf"{re.escape(src)} > {re.escape(dst)}: .*ICMP6, echo request", out), out
    assert "hlim 62" in out  # the destination pod's copy: two routers on the way
    # Without -6 the same pair is traced over IPv4, with IPv4 outside.
    out4 = dual.ok("trace", "n1-p1", "n2-p1")
    assert re.search(rf"{re.escape(n1['ip'])}\.\d+ > {re.escape(n2['ip'])}\.8472: VXLAN", out4), out4
    assert "fd77:77::" not in out4.split("capture on underlay")[1]


def test_dual_add_and_remove_node(dual: LabRun) -> None:
    dual.ok("add-node", "--pods", "1")
    n3 = _by_name(dual.status()["nodes"])["n3"]
    assert n3["ip6"] == "fd77:77::13" and n3["subnet6"]
    out = dual.ok("check")  # add-node returned once the peers reach the new node, over both families
    assert "20/20 pairs ok over IPv4" in out and "20/20 pairs ok over IPv6" in out
    key = f"{n3['subnet'].replace('/', '-')}&{n3['subnet6'].replace('/', '-')}"
    assert _etcd_get(dual, f"/coreos.com/network/subnets/{key}")
    dual.ok("remove-node", "n3")
    assert _etcd_get(dual, f"/coreos.com/network/subnets/{key}") == ""  # the dual-stack lease key, dropped
    n1 = _by_name(dual.status()["nodes"])["n1"]
    assert netns.wait_for(lambda: n3["subnet6"] not in netns.run(["ip", "-n", n1["netns"], "-6", "route"]))
    assert "12/12 pairs ok over IPv6" in dual.ok("check")


def test_ipv6_only_lab(lab_factory: Callable[[str], LabRun]) -> None:
    lab = lab_factory("v6")
    lab.ok("up", "--ip-family", "ipv6", "--nodes", "2", "--pods-per-node", "1")
    st = lab.status()
    assert st["ip_family"] == "ipv6" and st["network"] is None
    conf = json.loads(_etcd_get(lab, "/coreos.com/network/config"))
    assert conf["EnableIPv4"] is False and conf["IPv6Network"] == str(NET6) and "Network" not in conf
    n1, n2 = st["nodes"]
    for n in st["nodes"]:
        assert ipaddress.ip_address(n["ip"]) in UNDERLAY6 and n["subnet"] is None and n["subnet6"]
        assert "inet " not in netns.run(["ip", "-n", n["netns"], "addr", "show", "eth0"])  # no IPv4 underlay
    for p in st["pods"]:
        assert ":" in p["ip"] and p["ip6"] == p["ip"]
    out = lab.ok("check")
    assert "2/2 pairs ok over IPv6" in out and "IPv4" not in out
    show = lab.ok("show", "n1")
    assert "flannel.1 (the VTEP)" not in show and "[ip route]" not in show
    assert f"{n2['vtep_mac6']} dst {n2['ip']} self permanent" in show
    assert "subnets/0.0.0.0-0&" in show  # upstream's key of an IPv6-only lease
    out = lab.ok("trace", "n1-p1", "n2-p1")  # IPv6 without -6: the only family
    assert re.search(rf"{re.escape(n1['ip'])}\.\d+ > {re.escape(n2['ip'])}\.8472: VXLAN", out), out
    p = lab.cli("trace", "n1-p1", "n2-p1", "-6", "--no-capture")
    assert p.returncode == 0
    p = lab.cli("service", "add", "web", "--port", "80", "--to", "n2-p1")
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "Services in the lab are IPv4" in p.stderr
    lab.ok("down")
    lab.assert_gone()


def test_dual_wireguard_encrypts_both_families(lab_factory: Callable[[str], LabRun]) -> None:
    """wireguard's default "separate" mode: flannel-wg (UDP 51820) for IPv4, flannel-wg-v6 (UDP 51821) for IPv6."""
    lab = lab_factory("wgdual")
    lab.ok("up", "--backend", "wireguard", "--ip-family", "dual", "--nodes", "2", "--pods-per-node", "1")
    st = lab.status()
    n1, n2 = st["nodes"]
    src, dst = st["pods"][0]["ip6"], st["pods"][1]["ip6"]
    out = lab.ok("check")
    assert "2/2 pairs ok over IPv4" in out and "2/2 pairs ok over IPv6" in out
    show = lab.ok("show", "n1")
    assert "WireGuard peers of flannel-wg-v6 (private key hidden)" in show and "private key: (hidden)" in show
    assert f"endpoint: [{n2['ip6']}]:51821" in show and f"allowed ips: {n2['subnet6']}" in show
    out = lab.ok("trace", "n1-p1", "n2-p1", "-6")
    assert f"sends it as UDP [{n1['ip6']}]:51821 -> [{n2['ip6']}]:51821" in out
    capture = out.split("capture on underlay")[1]
    assert f"{n1['ip6']}.51821 > {n2['ip6']}.51821" in capture, capture
    assert src not in capture.split("encrypted:")[0] and dst not in capture.split("encrypted:")[0]
    assert "encrypted: the underlay carries only UDP 51821" in capture
    lab.ok("down")
    lab.assert_gone()


def test_kube_dual_stack_nodes_get_two_pod_cidrs(lab_factory: Callable[[str], LabRun]) -> None:
    lab = lab_factory("kdual")
    lab.ok("up", "--store", "kube", "--ip-family", "dual", "--nodes", "2", "--pods-per-node", "1")
    st = lab.status()
    nodes = {n["metadata"]["name"]: n for n in json.loads(lab.ok("get", "nodes", "-o", "json"))["items"]}
    for i, n in enumerate(st["nodes"]):
        spec = nodes[n["name"]]["spec"]
        # kube-controller-manager's dual-stack range allocator: a /24 and a /64, IPv4 first.
        v6 = ipaddress.IPv6Network((NET6.network_address + (i << 64), 64))
        assert spec["podCIDRs"] == [f"10.244.{i}.0/24", str(v6)]
        assert n["subnet"] == spec["podCIDRs"][0] and n["subnet6"] == spec["podCIDRs"][1]
        ann = nodes[n["name"]]["metadata"]["annotations"]
        assert ann["flannel.alpha.coreos.com/public-ipv6"] == n["ip6"]
        assert json.loads(ann["flannel.alpha.coreos.com/backend-v6-data"])["VtepMAC"] == n["vtep_mac6"]
        internal = [a["address"] for a in nodes[n["name"]]["status"]["addresses"] if a["type"] == "InternalIP"]
        assert internal == [n["ip"], n["ip6"]]
    out = lab.ok("check")
    assert "2/2 pairs ok over IPv4" in out and "2/2 pairs ok over IPv6" in out
    lab.ok("down")
    lab.assert_gone()


def test_bad_ip_family_is_one_clear_line(lab_factory: Callable[[str], LabRun]) -> None:
    lab = lab_factory("badfam")
    for args, msg in (
        (("--ip-family", "ipv5"), "--ip-family must be ipv4, dual or ipv6, not 'ipv5'"),
        (("--ip-family", "dual", "--ipv6-network", "fd00::/64"), "--ipv6-network must be /62 or larger"),
        (("--ip-family", "dual", "--ipv6-network", "10.0.0.0/8"), "--ipv6-network:"),
        (("--ip-family", "dual", "--backend", "udp"), "the udp backend carries IPv4 only"),
    ):
        p = lab.cli("up", *args)
        assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
        assert p.stderr.startswith("flannel-lab: ") and msg in p.stderr and "Traceback" not in p.stderr
        lab.assert_gone()
