"""The vxlan backend against a real kernel: nodes are namespaces on a bridged underlay, pods are namespaces
behind a cni0 bridge in each node. Assertions read the kernel back with ip/bridge and send real packets."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

import pytest

from pyflannel.backend.base import Backend, BackendError, ExternalInterface
from pyflannel.backend.registry import create_backend
from pyflannel.backend.vxlan import VxlanBackend
from pyflannel.config import parse_net_config
from pyflannel.lab.netns import RunScope, ns_exec, run, veth
from pyflannel.lease import Lease, LeaseAttrs
from pyflannel.netlink import KernelEvent, KernelMonitor, Netlink, Route

pytestmark = pytest.mark.integration

NET = "10.5.0.0/16"


@dataclass
class Node:
    n: int
    ns: str
    ip: IPv4Address
    subnet: IPv4Network
    ip6: IPv6Address | None = None
    subnet6: IPv6Network | None = None
    pod: str = ""


def build(scope: RunScope, count: int, *, v6: bool = False, pods: bool = True) -> list[Node]:
    """`count` nodes on one bridged underlay 192.168.100.0/24 (fd00:100::/64), each with subnet 10.5.N.0/24
    (fd00:5:0:N::/64) on a cni0 bridge and a pod namespace at .2 behind it."""
    u = scope.add_ns("u")
    run(["ip", "-n", u, "link", "add", "br0", "type", "bridge"])
    run(["ip", "-n", u, "link", "set", "br0", "up"])
    nodes = []
    for n in range(1, count + 1):
        ns = scope.add_ns(f"n{n}")
        veth(ns, "eth0", u, f"v{n}")
        run(["ip", "-n", u, "link", "set", f"v{n}", "master", "br0", "up"])
        run(["ip", "-n", ns, "addr", "add", f"192.168.100.{n}/24", "dev", "eth0"])
        node = Node(n, ns, IPv4Address(f"192.168.100.{n}"), IPv4Network(f"10.5.{n}.0/24"))
        if v6:
            run(["ip", "-n", ns, "addr", "add", f"fd00:100::{n}/64", "dev", "eth0", "nodad"])
            node.ip6 = IPv6Address(f"fd00:100::{n}")
            node.subnet6 = IPv6Network(f"fd00:5:0:{n}::/64")
        run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        if pods:
            ns_exec(ns, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            run(["ip", "-n", ns, "link", "add", "cni0", "type", "bridge"])
            run(["ip", "-n", ns, "addr", "add", f"10.5.{n}.1/24", "dev", "cni0"])
            pod = scope.add_ns(f"p{n}")
            veth(ns, f"veth{n}", pod, "eth0")
            run(["ip", "-n", ns, "link", "set", f"veth{n}", "master", "cni0", "up"])
            run(["ip", "-n", ns, "link", "set", "cni0", "up"])
            run(["ip", "-n", pod, "addr", "add", f"10.5.{n}.2/24", "dev", "eth0"])
            run(["ip", "-n", pod, "link", "set", "eth0", "up"])
            run(["ip", "-n", pod, "route", "add", "default", "via", f"10.5.{n}.1"])
            if v6:
                ns_exec(ns, ["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
                run(["ip", "-n", ns, "addr", "add", f"fd00:5:0:{n}::1/64", "dev", "cni0", "nodad"])
                run(["ip", "-n", pod, "addr", "add", f"fd00:5:0:{n}::2/64", "dev", "eth0", "nodad"])
                run(["ip", "-n", pod, "-6", "route", "add", "default", "via", f"fd00:5:0:{n}::1"])
            node.pod = pod
        nodes.append(node)
    return nodes


def ping(src_ns: str, dst: str, *, attempts: int = 5) -> bool:
    for _ in range(attempts):
        p = run(["ip", "netns", "exec", src_ns, "ping", "-c", "1", "-W", "1", dst], check=False)
        if " 0% packet loss" in p:
            return True
        time.sleep(0.2)
    return False


async def ext_for(nl: Netlink, node: Node) -> ExternalInterface:
    link = await nl.link_by_name("eth0")
    assert link is not None
    return ExternalInterface(
        name="eth0",
        index=link.index,
        mtu=link.mtu,
        iface_addr=node.ip,
        iface_addr6=node.ip6,
        public_ip=node.ip,
        public_ipv6=node.ip6,
    )


def lease_of(node: Node, data: Any, data6: Any = None, btype: str = "vxlan") -> Lease:
    return Lease(
        subnet=node.subnet,
        ipv6_subnet=node.subnet6 if data6 is not None else None,
        attrs=LeaseAttrs(
            public_ip=node.ip,
            public_ipv6=node.ip6 if data6 is not None else None,
            backend_type=btype,
            backend_data=data,
            backend_v6_data=data6,
        ),
        expiration=time.time() + 3600,
    )


def conf(**backend: Any) -> str:
    return json.dumps({"Network": NET, "Backend": {"Type": "vxlan", **backend}})


def vxlan_state(ns: str, dev: str = "flannel.1") -> tuple[list[str], list[str], list[str]]:
    """(routes on dev, neighbours on dev, fdb entries of dev) as ip/bridge print them."""
    fam = "-6" if dev.startswith("flannel-v6") else "-4"
    routes = [ln.strip() for ln in run(["ip", "-n", ns, fam, "route", "show", "dev", dev]).splitlines() if ln.strip()]
    # The kernel's own link-local route on the device is not ours.
    routes = [r for r in routes if not r.startswith("fe80::/64")]
    neigh = [ln.strip() for ln in run(["ip", "-n", ns, "neigh", "show", "dev", dev]).splitlines() if ln.strip()]
    fdb = [ln.strip() for ln in run(["bridge", "-n", ns, "fdb", "show", "dev", dev]).splitlines() if ln.strip()]
    return routes, neigh, fdb


def expected(ns_peers: list[tuple[Node, str]]) -> tuple[list[str], list[str], list[str]]:
    routes = sorted(f"{p.subnet} via {p.subnet.network_address} onlink" for p, _ in ns_peers)
    neigh = sorted(f"{p.subnet.network_address} lladdr {mac} PERMANENT" for p, mac in ns_peers)
    fdb = sorted(f"{mac} dst {p.ip} self permanent" for p, mac in ns_peers)
    return routes, neigh, fdb


def assert_exact(ns: str, peers: list[tuple[Node, str]]) -> None:
    routes, neigh, fdb = vxlan_state(ns)
    want_r, want_n, want_f = expected(peers)
    assert sorted(routes) == want_r
    assert sorted(neigh) == want_n
    assert sorted(fdb) == want_f


Fn = Callable[[list[Netlink]], Awaitable[None]]


def with_netlinks(nodes: list[Node], fn: Fn) -> None:
    async def main() -> None:
        nls = [Netlink(netns=n.ns) for n in nodes]
        try:
            await fn(nls)
        finally:
            for nl in nls:
                await nl.close()

    asyncio.run(main())


async def start_all(nodes: list[Node], nls: list[Netlink], text: str) -> tuple[list[VxlanBackend], list[Lease]]:
    cfg = parse_net_config(text)
    backends: list[VxlanBackend] = []
    leases: list[Lease] = []
    for node, nl in zip(nodes, nls, strict=True):
        be = create_backend(cfg, await ext_for(nl, node), nl)
        assert isinstance(be, VxlanBackend)
        attrs = await be.prepare()
        assert attrs.backend_type == "vxlan"
        lease = lease_of(node, attrs.backend_data, attrs.backend_v6_data)
        await be.start(lease)
        backends.append(be)
        leases.append(lease)
    for be in backends:
        await be.reconcile(leases)
    return backends, leases


def count_ops(nl: Netlink) -> list[int]:
    """Record the size of every batch the backend sends, to prove a converged reconcile sends nothing."""
    calls: list[int] = []
    orig = nl.apply

    async def counting(ops: Any) -> Any:
        calls.append(len(ops))
        return await orig(ops)

    nl.apply = counting  # type: ignore[method-assign]
    return calls


def mac_of(lease: Lease) -> str:
    return str(lease.attrs.backend_data["VtepMAC"])


def test_vxlan_programs_upstream_entries_and_pods_talk(scope: RunScope) -> None:
    nodes = build(scope, 3)

    async def go(nls: list[Netlink]) -> None:
        backends, leases = await start_all(nodes, nls, conf())
        n1 = nodes[0]
        dev = run(["ip", "-n", n1.ns, "-d", "link", "show", "flannel.1"])
        assert re.search(r"mtu 1450 ", dev)
        assert f"link/ether {mac_of(leases[0])} " in dev
        assert re.search(r"vxlan id 1 local 192\.168\.100\.1 dev eth0 .*dstport 8472 nolearning", dev)
        assert "state UNKNOWN" in dev or ",UP" in dev
        addrs = run(["ip", "-n", n1.ns, "-4", "-o", "addr", "show", "dev", "flannel.1"])
        assert re.findall(r"inet (\S+)", addrs) == ["10.5.1.0/32"]
        assert leases[0].attrs.backend_data == {"VNI": 1, "VtepMAC": mac_of(leases[0])}
        for i, node in enumerate(nodes):
            assert_exact(node.ns, [(p, mac_of(lease)) for p, lease in zip(nodes, leases, strict=True) if p is not node])
            assert f"{nodes[(i + 1) % 3].subnet} via" in run(["ip", "-n", node.ns, "route"])
        # Pod to pod across the overlay, both directions and to the third node.
        assert ping(nodes[0].pod, "10.5.2.2")
        assert ping(nodes[1].pod, "10.5.3.2")
        assert ping(nodes[2].pod, "10.5.1.2")

        # A departed peer's three entries go; the others stay.
        await backends[0].remove_peer(leases[2])
        assert_exact(n1.ns, [(nodes[1], mac_of(leases[1]))])
        assert not ping(nodes[0].pod, "10.5.3.2", attempts=1)
        assert ping(nodes[0].pod, "10.5.2.2")
        # Removing twice is harmless; adding back restores it.
        await backends[0].remove_peer(leases[2])
        await backends[0].add_peer(leases[2])
        assert_exact(n1.ns, [(nodes[1], mac_of(leases[1])), (nodes[2], mac_of(leases[2]))])
        assert ping(nodes[0].pod, "10.5.3.2")

    with_netlinks(nodes, go)


def test_vxlan_add_peer_skips_bad_leases_and_follows_changes(scope: RunScope) -> None:
    nodes = build(scope, 3, pods=False)

    async def go(nls: list[Netlink]) -> None:
        cfg = parse_net_config(conf())
        be = create_backend(cfg, await ext_for(nls[0], nodes[0]), nls[0])
        attrs = await be.prepare()
        own = lease_of(nodes[0], attrs.backend_data)
        await be.start(own)
        await be.add_peer(own)  # our own lease: nothing
        await be.add_peer(lease_of(nodes[1], None, btype="host-gw"))
        await be.add_peer(lease_of(nodes[1], {"VNI": 1, "VtepMAC": "not-a-mac"}))
        await be.add_peer(lease_of(nodes[1], "garbage"))
        await be.add_peer(lease_of(nodes[2], {"VNI": 1}))
        assert vxlan_state(nodes[0].ns) == ([], [], [])

        await be.add_peer(lease_of(nodes[1], {"VNI": 1, "VtepMAC": "0A:58:0A:05:02:00"}))
        assert_exact(nodes[0].ns, [(nodes[1], "0a:58:0a:05:02:00")])
        await be.add_peer(lease_of(nodes[1], {"VNI": 1, "VtepMAC": "0a:58:0a:05:02:00"}))  # idempotent
        assert_exact(nodes[0].ns, [(nodes[1], "0a:58:0a:05:02:00")])
        # The peer restarts with a new VTEP MAC: the old FDB entry must not linger.
        await be.add_peer(lease_of(nodes[1], {"VNI": 1, "VtepMAC": "0a:58:0a:05:02:99"}))
        assert_exact(nodes[0].ns, [(nodes[1], "0a:58:0a:05:02:99")])
        # The peer's lease turns into garbage: upstream ignores the event and keeps entries for a VTEP the
        # lease no longer names; we drop them, as reconcile() would.
        await be.add_peer(lease_of(nodes[1], {"VNI": 1, "VtepMAC": 7}))
        assert vxlan_state(nodes[0].ns) == ([], [], [])

    with_netlinks(nodes, go)


def test_vxlan_reconcile_restores_and_sweeps(scope: RunScope) -> None:
    nodes = build(scope, 3)
    n1 = nodes[0].ns

    async def go(nls: list[Netlink]) -> None:
        backends, leases = await start_all(nodes, nls, conf())
        peers = [(nodes[1], mac_of(leases[1])), (nodes[2], mac_of(leases[2]))]
        assert_exact(n1, peers)
        # Break things by hand: one route, one neighbour, one FDB entry gone; stale entries of a dead peer;
        # a wrong lladdr.
        run(["ip", "-n", n1, "route", "del", "10.5.2.0/24"])
        run(["ip", "-n", n1, "neigh", "replace", "10.5.3.0", "lladdr", "0a:00:00:00:00:33", "nud", "permanent",
             "dev", "flannel.1"])  # fmt: skip
        run(["bridge", "-n", n1, "fdb", "del", mac_of(leases[2]), "dev", "flannel.1", "dst", "192.168.100.3"])
        run(["ip", "-n", n1, "neigh", "add", "10.5.9.0", "lladdr", "0a:00:00:00:00:09", "nud", "permanent",
             "dev", "flannel.1"])  # fmt: skip
        run(["bridge", "-n", n1, "fdb", "append", "0a:00:00:00:00:09", "dev", "flannel.1", "dst", "192.168.100.9",
             "self", "permanent"])  # fmt: skip
        run(["ip", "-n", n1, "route", "add", "10.5.9.0/24", "via", "10.5.9.0", "dev", "flannel.1", "onlink"])
        # Routes that are not ours must survive the sweep.
        run(["ip", "-n", n1, "route", "add", "172.31.0.0/24", "via", "192.168.100.3", "dev", "eth0"])
        run(["ip", "-n", n1, "route", "add", "10.5.77.0/24", "via", "192.168.100.3", "dev", "eth0"])
        assert not ping(nodes[0].pod, "10.5.2.2", attempts=1)

        await backends[0].reconcile(leases)
        assert_exact(n1, peers)
        calls = count_ops(nls[0])
        await backends[0].reconcile(leases)
        assert sum(calls) == 0
        table = run(["ip", "-n", n1, "route"])
        assert "172.31.0.0/24 via 192.168.100.3 dev eth0" in table
        assert "10.5.77.0/24 via 192.168.100.3 dev eth0" in table  # no DirectRouting: not ours to sweep
        assert "10.5.1.0/24 dev cni0" in table
        assert ping(nodes[0].pod, "10.5.2.2")
        assert ping(nodes[0].pod, "10.5.3.2")

        # A peer that left while we were not watching is swept by the next reconcile.
        await backends[0].reconcile([leases[0], leases[1]])
        assert_exact(n1, peers[:1])

    with_netlinks(nodes, go)


def test_vxlan_recreates_deleted_device_with_same_mac(scope: RunScope) -> None:
    nodes = build(scope, 2)
    n1 = nodes[0].ns

    async def go(nls: list[Netlink]) -> None:
        backends, leases = await start_all(nodes, nls, conf())
        assert ping(nodes[0].pod, "10.5.2.2")
        run(["ip", "-n", n1, "link", "del", "flannel.1"])
        assert not ping(nodes[0].pod, "10.5.2.2", attempts=1)
        await backends[0].reconcile(leases)
        dev = run(["ip", "-n", n1, "-d", "link", "show", "flannel.1"])
        assert f"link/ether {mac_of(leases[0])} " in dev
        assert "10.5.1.0/32" in run(["ip", "-n", n1, "addr", "show", "dev", "flannel.1"])
        assert_exact(n1, [(nodes[1], mac_of(leases[1]))])
        # Node 2 still holds entries for our old MAC, so traffic in both directions works again.
        assert ping(nodes[0].pod, "10.5.2.2")
        assert ping(nodes[1].pod, "10.5.1.2")

    with_netlinks(nodes, go)


def test_vxlan_restart_reuses_compatible_device_and_recreates_incompatible(scope: RunScope) -> None:
    nodes = build(scope, 2, pods=False)
    n1 = nodes[0]

    async def go(nls: list[Netlink]) -> None:
        cfg = parse_net_config(conf())
        ext = await ext_for(nls[0], n1)
        first = await create_backend(cfg, ext, nls[0]).prepare()
        ifindex = (await nls[0].link_by_name("flannel.1")).index  # type: ignore[union-attr]
        # A restart: a fresh backend object reuses the device and its MAC, so peers need no update.
        again = await create_backend(cfg, ext, nls[0]).prepare()
        assert again.backend_data == first.backend_data
        assert (await nls[0].link_by_name("flannel.1")).index == ifindex  # type: ignore[union-attr]

        # A restart with another subnet: the old address goes, the new one is the only one.
        be = create_backend(cfg, ext, nls[0])
        await be.prepare()
        await be.start(lease_of(n1, first.backend_data))
        n1.subnet = IPv4Network("10.5.11.0/24")
        await be.start(lease_of(n1, first.backend_data))
        addrs = run(["ip", "-n", n1.ns, "-4", "-o", "addr", "show", "dev", "flannel.1"])
        assert re.findall(r"inet (\S+)", addrs) == ["10.5.11.0/32"]
        assert "UP" in run(["ip", "-n", n1.ns, "link", "show", "flannel.1"])

        # Another port in the config: the device is recreated (new MAC), as upstream does.
        cfg2 = parse_net_config(conf(Port=4789))
        other = await create_backend(cfg2, ext, nls[0]).prepare()
        dev = run(["ip", "-n", n1.ns, "-d", "link", "show", "flannel.1"])
        assert "dstport 4789" in dev
        assert other.backend_data["VtepMAC"] != first.backend_data["VtepMAC"]

        # A foreign device with our name (a bridge) is replaced too.
        run(["ip", "-n", n1.ns, "link", "del", "flannel.1"])
        run(["ip", "-n", n1.ns, "link", "add", "flannel.1", "type", "bridge"])
        await create_backend(cfg, ext, nls[0]).prepare()
        assert "vxlan id 1 " in run(["ip", "-n", n1.ns, "-d", "link", "show", "flannel.1"])

        # VNI, GBP, Learning, MTU options reach the kernel.
        cfg3 = parse_net_config(conf(VNI=42, GBP=True, Learning=True, MTU=1400))
        a3 = await create_backend(cfg3, ext, nls[0]).prepare()
        dev = run(["ip", "-n", n1.ns, "-d", "link", "show", "flannel.42"])
        assert "vxlan id 42 " in dev and " gbp" in dev and "nolearning" not in dev and "mtu 1400 " in dev
        assert a3.mtu == 1400 and a3.backend_data["VNI"] == 42

    with_netlinks(nodes, go)


def test_vxlan_direct_routing(scope: RunScope) -> None:
    nodes = build(scope, 2)
    n1 = nodes[0].ns

    async def go(nls: list[Netlink]) -> None:
        backends, leases = await start_all(nodes, nls, conf(DirectRouting=True))
        assert "10.5.2.0/24 via 192.168.100.2 dev eth0" in run(["ip", "-n", n1, "route"])
        assert vxlan_state(n1) == ([], [], [])
        assert ping(nodes[0].pod, "10.5.2.2")
        # A peer off our segment still goes over VXLAN.
        far = Node(7, "", IPv4Address("172.20.0.7"), IPv4Network("10.5.7.0/24"))
        far_lease = lease_of(far, {"VNI": 1, "VtepMAC": "0a:00:00:00:00:07"})
        await backends[0].add_peer(far_lease)
        assert_exact(n1, [(far, "0a:00:00:00:00:07")])
        # Reconcile keeps both kinds and sweeps a stale direct route inside the network.
        run(["ip", "-n", n1, "route", "add", "10.5.8.0/24", "via", "192.168.100.8", "dev", "eth0"])
        await backends[0].reconcile([*leases, far_lease])
        table = run(["ip", "-n", n1, "route"])
        assert "10.5.8.0/24" not in table
        assert "10.5.2.0/24 via 192.168.100.2 dev eth0" in table
        assert_exact(n1, [(far, "0a:00:00:00:00:07")])
        await backends[0].remove_peer(leases[1])
        assert "10.5.2.0/24" not in run(["ip", "-n", n1, "route"])

    with_netlinks(nodes, go)


def test_vxlan_dual_stack(scope: RunScope) -> None:
    nodes = build(scope, 2, v6=True)
    text = json.dumps({"Network": NET, "EnableIPv6": True, "IPv6Network": "fd00:5::/48", "Backend": {"Type": "vxlan"}})

    async def go(nls: list[Netlink]) -> None:
        backends, leases = await start_all(nodes, nls, text)
        n1 = nodes[0].ns
        assert leases[0].attrs.backend_v6_data["VNI"] == 1
        dev6 = run(["ip", "-n", n1, "-d", "link", "show", "flannel-v6.1"])
        assert re.search(r"vxlan id 1 local fd00:100::1 dev eth0 .*dstport 8472 nolearning", dev6)
        assert "mtu 1430 " in dev6
        assert "fd00:5:0:1::/128" in run(["ip", "-n", n1, "-6", "addr", "show", "dev", "flannel-v6.1"])
        mac6 = str(leases[1].attrs.backend_v6_data["VtepMAC"])
        routes, neigh, fdb = vxlan_state(n1, "flannel-v6.1")
        assert any(r.startswith("fd00:5:0:2::/64 via fd00:5:0:2:: ") and "onlink" in r for r in routes)
        assert f"fd00:5:0:2:: lladdr {mac6} PERMANENT" in neigh
        assert f"{mac6} dst fd00:100::2 self permanent" in fdb
        assert_exact(n1, [(nodes[1], mac_of(leases[1]))])
        calls = count_ops(nls[0])
        await backends[0].reconcile(leases)
        assert sum(calls) == 0
        assert ping(nodes[0].pod, "fd00:5:0:2::2")
        assert ping(nodes[0].pod, "10.5.2.2")
        await backends[0].remove_peer(leases[1])
        assert vxlan_state(n1, "flannel-v6.1")[1:] == ([], [])
        assert not any(r.startswith("fd00:5:0:2::/64") for r in vxlan_state(n1, "flannel-v6.1")[0])

    with_netlinks(nodes, go)


@pytest.mark.parametrize(
    ("backend", "needle"),
    [
        ({"Type": "vxlan", "VNI": "1"}, "VNI"),
        ({"Type": "vxlan", "VNI": 16777216}, "VNI"),
        ({"Type": "vxlan", "port": 70000}, "Port"),
        ({"Type": "vxlan", "DirectRouting": "yes"}, "DirectRouting"),
        ({"Type": "vxlan", "GBP": 1}, "GBP"),
        ({"Type": "udpx"}, "'udpx' is not supported; supported: vxlan, host-gw"),
    ],
)
def test_backend_options_are_validated(backend: dict[str, Any], needle: str) -> None:
    cfg = parse_net_config(json.dumps({"Network": NET, "Backend": backend}))
    ext = ExternalInterface("eth0", 2, 1500, IPv4Address("192.168.100.1"), None, IPv4Address("192.168.100.1"), None)
    nl = Netlink(netns="never-opened")
    try:
        with pytest.raises(BackendError, match=re.escape(needle)):
            create_backend(cfg, ext, nl)
    finally:
        asyncio.run(nl.close())


def test_backend_options_case_insensitive() -> None:
    cfg = parse_net_config(json.dumps({"Network": NET, "backend": {"type": "VXLAN", "vni": 7, "PORT": 4789}}))
    ext = ExternalInterface("eth0", 2, 1500, IPv4Address("192.168.100.1"), None, IPv4Address("192.168.100.1"), None)
    nl = Netlink(netns="never-opened")
    try:
        be = create_backend(cfg, ext, nl)
        assert isinstance(be, VxlanBackend)
        assert (be.vni, be.port, be.devs[4].name, be.devs[4].mtu) == (7, 4789, "flannel.7", 1450)
    finally:
        asyncio.run(nl.close())


async def until_marker(mon: KernelMonitor, ns: str, n: int) -> list[KernelEvent]:
    """Every event up to a marker route added now in `ns` (the kernel announces changes in order)."""
    marker = IPv4Network(f"172.30.{n}.0/24")
    run(["ip", "-n", ns, "route", "add", str(marker), "dev", "eth0"])
    out: list[KernelEvent] = []
    async with asyncio.timeout(10):
        async for ev in mon:
            if isinstance(ev.obj, Route) and ev.obj.dst == marker:
                return out
            out.append(ev)
    raise AssertionError(f"monitor ended before the marker; got {out}")


class Verdicts:
    """Runs changes in a node's namespace and returns the kernel's events with the backend's verdict on each."""

    def __init__(self, be: Backend, mon: KernelMonitor, ns: str) -> None:
        self.be, self.mon, self.ns = be, mon, ns
        self.marks = itertools.count(1)

    async def after(self, *cmds: list[str]) -> list[tuple[KernelEvent, bool]]:
        for c in cmds:
            run(c)
        evs = await until_marker(self.mon, self.ns, next(self.marks))
        return [(e, self.be.kernel_event_needs_repair(e)) for e in evs]

    async def repair(self, *cmds: list[str]) -> None:
        got = await self.after(*cmds)
        assert any(r for _, r in got), f"{cmds} did not ask for a repair: {got}"

    async def ignore(self, *cmds: list[str]) -> None:
        got = await self.after(*cmds)
        assert [e for e, r in got if r] == [], f"{cmds} asked for a repair"


def test_vxlan_kernel_events_ask_for_repair_only_when_needed(scope: RunScope) -> None:
    nodes = build(scope, 3, pods=False)
    n1 = nodes[0].ns
    dev = ["dev", "flannel.1"]

    async def go(nls: list[Netlink]) -> None:
        backends, leases = await start_all(nodes, nls, conf())
        be = backends[0]
        v = Verdicts(be, await nls[0].monitor(), n1)
        mac2, mac3 = mac_of(leases[1]), mac_of(leases[2])
        # Our own writes are announced too, and must not ask for a pass (or every write would cause one).
        moved = lease_of(nodes[2], {"VNI": 1, "VtepMAC": "0a:00:00:00:03:99"})
        for step in (be.remove_peer(leases[2]), be.add_peer(leases[2]), be.add_peer(moved), be.add_peer(leases[2])):
            await step
            got = await v.after()
            assert got and [e for e, r in got if r] == []
        # Hand-made damage and stale entries: each asks for a pass, and the pass's own writes do not.
        for cmd in (
            ["ip", "-n", n1, "route", "del", "10.5.2.0/24"],
            ["ip", "-n", n1, "route", "replace", "10.5.2.0/24", "via", "192.168.100.3", "dev", "eth0"],
            ["ip", "-n", n1, "neigh", "del", "10.5.3.0", *dev],
            ["ip", "-n", n1, "neigh", "replace", "10.5.3.0", "lladdr", "0a:00:00:00:00:33", "nud", "permanent", *dev],
            ["bridge", "-n", n1, "fdb", "del", mac2, *dev, "dst", "192.168.100.2", "self"],
            ["bridge", "-n", n1, "fdb", "replace", mac3, *dev, "dst", "192.168.100.9", "self", "permanent"],
            ["ip", "-n", n1, "route", "add", "10.5.9.0/24", "via", "10.5.9.0", *dev, "onlink"],
            ["ip", "-n", n1, "neigh", "add", "10.5.9.0", "lladdr", "0a:00:00:00:00:09", "nud", "permanent", *dev],
            ["bridge", "-n", n1, "fdb", "append", "0a:00:00:00:00:09", *dev, "dst", "192.168.100.9", "self",
             "permanent"],
            ["ip", "-n", n1, "link", "set", "flannel.1", "down"],
        ):  # fmt: skip
            await v.repair(cmd)
            await be.reconcile(leases)
            await v.ignore()
            assert_exact(n1, [(nodes[1], mac2), (nodes[2], mac3)])
        # Not ours: outside the Network, via the external interface without DirectRouting, other devices.
        await v.ignore(
            ["ip", "-n", n1, "route", "add", "172.31.0.0/24", "via", "192.168.100.3", "dev", "eth0"],
            ["ip", "-n", n1, "route", "add", "10.5.77.0/24", "via", "192.168.100.3", "dev", "eth0"],
            ["ip", "-n", n1, "neigh", "add", "192.168.100.50", "lladdr", "0a:00:00:00:00:50", "dev", "eth0"],
            ["ip", "-n", n1, "link", "add", "br9", "type", "bridge"],
            ["ip", "-n", n1, "link", "del", "br9"],
        )
        # The device itself deleted.
        await v.repair(["ip", "-n", n1, "link", "del", "flannel.1"])
        await be.reconcile(leases)
        assert_exact(n1, [(nodes[1], mac2), (nodes[2], mac3)])

    with_netlinks(nodes, go)
