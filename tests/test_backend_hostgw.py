"""The host-gw backend against a real kernel (same namespace topology as the vxlan tests)."""

from __future__ import annotations

import json
import time
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
from test_backend_vxlan import Node, Verdicts, build, count_ops, ext_for, ping, with_netlinks

from pyflannel.backend.hostgw import HostGwBackend
from pyflannel.backend.registry import create_backend
from pyflannel.config import parse_net_config
from pyflannel.lab.netns import RunScope, run
from pyflannel.lease import Lease, LeaseAttrs
from pyflannel.netlink import Netlink

pytestmark = pytest.mark.integration

NET = "10.5.0.0/16"


def hg_lease(node: Node, btype: str = "host-gw", six: bool = False) -> Lease:
    return Lease(
        subnet=node.subnet,
        ipv6_subnet=node.subnet6 if six else None,
        attrs=LeaseAttrs(public_ip=node.ip, public_ipv6=node.ip6 if six else None, backend_type=btype),
        expiration=time.time() + 3600,
    )


def flannel_routes(ns: str, six: bool = False) -> list[str]:
    """The routes via eth0 with a gateway, as `ip route` prints them."""
    out = run(["ip", "-n", ns, "-6" if six else "-4", "route", "show", "dev", "eth0"])
    return sorted(ln.strip() for ln in out.splitlines() if " via " in ln)


async def start_all(
    nodes: list[Node], nls: list[Netlink], text: str, six: bool = False
) -> tuple[list[Any], list[Lease]]:
    cfg = parse_net_config(text)
    backends = []
    leases = [hg_lease(n, six=six) for n in nodes]
    for node, nl, lease in zip(nodes, nls, leases, strict=True):
        be = create_backend(cfg, await ext_for(nl, node), nl)
        assert isinstance(be, HostGwBackend)
        attrs = await be.prepare()
        assert (attrs.backend_type, attrs.backend_data, attrs.mtu) == ("host-gw", None, 1500)
        await be.start(lease)
        backends.append(be)
    for be in backends:
        await be.reconcile(leases)
    return backends, leases


def test_hostgw_routes_and_pods_talk(scope: RunScope) -> None:
    nodes = build(scope, 3)
    text = json.dumps({"Network": NET, "Backend": {"Type": "host-gw"}})

    async def go(nls: list[Netlink]) -> None:
        backends, leases = await start_all(nodes, nls, text)
        for node in nodes:
            want = sorted(f"{p.subnet} via {p.ip}" for p in nodes if p is not node)
            assert flannel_routes(node.ns) == want
        assert ping(nodes[0].pod, "10.5.2.2")
        assert ping(nodes[1].pod, "10.5.3.2")
        assert ping(nodes[2].pod, "10.5.1.2")

        # A converged reconcile sends nothing.
        calls = count_ops(nls[0])
        await backends[0].reconcile(leases)
        assert sum(calls) == 0

        await backends[0].remove_peer(leases[1])
        assert flannel_routes(nodes[0].ns) == ["10.5.3.0/24 via 192.168.100.3"]
        await backends[0].remove_peer(leases[1])
        await backends[0].add_peer(leases[1])
        assert flannel_routes(nodes[0].ns) == ["10.5.2.0/24 via 192.168.100.2", "10.5.3.0/24 via 192.168.100.3"]

    with_netlinks(nodes, go)


def test_hostgw_skips_and_sweeps(scope: RunScope) -> None:
    nodes = build(scope, 3, pods=False)
    n1 = nodes[0].ns
    text = json.dumps({"Network": NET, "Backend": {"Type": "host-gw"}})

    async def go(nls: list[Netlink]) -> None:
        backends, leases = await start_all(nodes, nls, text)
        be = backends[0]
        far = Node(9, "", IPv4Address("172.20.0.9"), IPv4Network("10.5.9.0/24"))
        await be.add_peer(hg_lease(far))  # not on our segment: warned and skipped
        await be.add_peer(hg_lease(Node(8, "", IPv4Address("192.168.100.8"), IPv4Network("10.5.8.0/24")), "vxlan"))
        assert flannel_routes(n1) == ["10.5.2.0/24 via 192.168.100.2", "10.5.3.0/24 via 192.168.100.3"]

        run(["ip", "-n", n1, "route", "del", "10.5.2.0/24"])
        run(["ip", "-n", n1, "route", "replace", "10.5.3.0/24", "via", "192.168.100.7", "dev", "eth0"])
        run(["ip", "-n", n1, "route", "add", "10.5.44.0/24", "via", "192.168.100.44", "dev", "eth0"])  # stale
        # Not ours: outside the Network, the Network itself, and a route without a gateway.
        run(["ip", "-n", n1, "route", "add", "172.31.0.0/24", "via", "192.168.100.3", "dev", "eth0"])
        run(["ip", "-n", n1, "route", "add", "10.5.0.0/16", "via", "192.168.100.3", "dev", "eth0"])
        run(["ip", "-n", n1, "route", "add", "10.5.55.0/24", "dev", "eth0"])
        await be.reconcile(leases)
        assert flannel_routes(n1) == [
            "10.5.0.0/16 via 192.168.100.3",
            "10.5.2.0/24 via 192.168.100.2",
            "10.5.3.0/24 via 192.168.100.3",
            "172.31.0.0/24 via 192.168.100.3",
        ]
        assert "10.5.55.0/24 dev eth0" in run(["ip", "-n", n1, "route"])
        # Our own subnet is never routed to the underlay.
        assert "10.5.1.0/24" not in run(["ip", "-n", n1, "route"])

    with_netlinks(nodes, go)


def test_hostgw_ipv6(scope: RunScope) -> None:
    nodes = build(scope, 2, v6=True)
    text = json.dumps(
        {"Network": NET, "EnableIPv6": True, "IPv6Network": "fd00:5::/48", "Backend": {"Type": "host-gw"}}
    )

    async def go(nls: list[Netlink]) -> None:
        backends, leases = await start_all(nodes, nls, text, six=True)
        assert flannel_routes(nodes[0].ns, six=True)[0].startswith("fd00:5:0:2::/64 via fd00:100::2")
        assert flannel_routes(nodes[0].ns) == ["10.5.2.0/24 via 192.168.100.2"]
        assert ping(nodes[0].pod, "fd00:5:0:2::2")
        calls = count_ops(nls[0])
        await backends[0].reconcile(leases)
        assert sum(calls) == 0
        await backends[0].remove_peer(leases[1])
        assert flannel_routes(nodes[0].ns, six=True) == []

    with_netlinks(nodes, go)


def test_hostgw_kernel_events_ask_for_repair_only_when_needed(scope: RunScope) -> None:
    nodes = build(scope, 3, pods=False)
    n1 = nodes[0].ns
    text = json.dumps({"Network": NET, "Backend": {"Type": "host-gw"}})
    ours = ["10.5.2.0/24 via 192.168.100.2", "10.5.3.0/24 via 192.168.100.3"]

    async def go(nls: list[Netlink]) -> None:
        backends, leases = await start_all(nodes, nls, text)
        be = backends[0]
        v = Verdicts(be, await nls[0].monitor(), n1)
        for step in (be.remove_peer(leases[2]), be.add_peer(leases[2])):
            await step
            got = await v.after()
            assert got and [e for e, r in got if r] == []
        for cmds in (
            [["ip", "-n", n1, "route", "del", "10.5.2.0/24"]],
            [["ip", "-n", n1, "route", "replace", "10.5.3.0/24", "via", "192.168.100.7", "dev", "eth0"]],
            [["ip", "-n", n1, "route", "add", "10.5.44.0/24", "via", "192.168.100.44", "dev", "eth0"]],
            # Down flushes our routes without route notifications: the link event is what tells.
            [["ip", "-n", n1, "link", "set", "eth0", "down"], ["ip", "-n", n1, "link", "set", "eth0", "up"]],
        ):
            await v.repair(*cmds)
            await be.reconcile(leases)
            await v.ignore()
            assert flannel_routes(n1) == ours
        await v.ignore(
            ["ip", "-n", n1, "route", "add", "172.31.0.0/24", "via", "192.168.100.3", "dev", "eth0"],
            ["ip", "-n", n1, "route", "add", "10.5.0.0/16", "via", "192.168.100.3", "dev", "eth0"],
            ["ip", "-n", n1, "route", "add", "10.5.55.0/24", "dev", "eth0"],
            ["ip", "-n", n1, "route", "add", "10.5.1.0/24", "via", "192.168.100.3", "dev", "eth0"],  # our own subnet
        )

    with_netlinks(nodes, go)
