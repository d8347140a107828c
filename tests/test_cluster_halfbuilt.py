"""Nothing half-built: an agent that made its backend's device and then got no lease removes that device, while a
device a previous successful run left is kept (peers hold its MAC or key, and pods keep talking over it).

Every device backend is driven the same way, with real agents on real etcd: the net-conf has room for two subnets,
a first node joins and stops, its lease is dropped and two reservations take both subnets. Then that node and a
fresh one each start, make (or find) the device, fail to get a lease with one clear line, and exit. The kernel of
each node says what was left: the old node's device (same ifindex, same MAC) and nothing on the new node. The
same holds for an agent stopped by SIGTERM while its lease cannot be got. vxlan, udp (flannel0, a TUN) and
wireguard (wireguard-go on this host's kernel) run on the host; ipip needs the stock kernel
(`python -m pyflannel.lab.vm -- tests/test_cluster_halfbuilt.py -k ipip`).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

import pytest
from needs import need
from test_cluster_wireguard import wg_go_pid

from pyflannel.backend.base import ExternalInterface
from pyflannel.backend.vxlan import VxlanBackend
from pyflannel.config import parse_net_config
from pyflannel.lab import netns
from pyflannel.lab.testbed import Node, Testbed
from pyflannel.lease import Lease, LeaseAttrs
from pyflannel.netlink import Netlink

pytestmark = pytest.mark.integration

# Room for two /24s: a reservation on each leaves none free.
CONF = {"Network": "10.244.0.0/16", "SubnetLen": 24, "SubnetMin": "10.244.1.0", "SubnetMax": "10.244.2.0"}
SUBNETS = ("10.244.1.0-24", "10.244.2.0-24")
EXHAUSTED = "failed to acquire a lease: no free subnets between SubnetMin and SubnetMax"


@dataclass(frozen=True)
class Case:
    backend: str
    device: str
    tools: tuple[str, ...] = ()
    module: str = ""  # a kernel module the VM must load


CASES = [
    pytest.param(Case("vxlan", "flannel.1"), id="vxlan"),
    pytest.param(Case("udp", "flannel0"), id="udp"),
    # No WireGuard in this host's kernel: the agent falls back to wireguard-go, a process serving a TUN.
    pytest.param(Case("wireguard", "flannel-wg", tools=("wireguard-go",)), id="wireguard"),
    pytest.param(Case("ipip", "flannel.ipip", module="ipip"), id="ipip", marks=pytest.mark.vm_only),
]


def link_id(ns: str, dev: str) -> tuple[int, str] | None:
    """(ifindex, MAC) of `dev` in `ns`, None when there is no such device."""
    links = json.loads(netns.run(["ip", "-n", ns, "-j", "link", "show"]) or "[]")
    for link in links:
        if link.get("ifname") == dev:
            return int(link["ifindex"]), str(link.get("address", ""))
    return None


def exit_code(tb: Testbed, node: Node, timeout: float = 90) -> int:
    """The exit status of `node`'s agent, which must end by itself within `timeout` seconds."""
    assert node.proc is not None
    try:
        return node.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"flanneld on {node.name} still runs after {timeout}s:\n{tb.log_tail(node)}", pytrace=False)


def fail_without_lease(tb: Testbed, node: Node) -> str:
    """Start the agent on `node`, which finds no free subnet: it exits 1 with exactly one error line and no
    traceback. The log of that run."""
    node.subnet_file.unlink(missing_ok=True)
    start = node.log_file.stat().st_size if node.log_file.exists() else 0
    tb.start_agent(node)
    assert exit_code(tb, node) == 1, tb.log_tail(node)
    tb.stop_agent(node)
    with node.log_file.open("rb") as f:
        f.seek(start)
        log = f.read().decode(errors="replace")
    errors = [ln for ln in log.splitlines() if ln.startswith(("E", "F"))]
    assert len(errors) == 1 and EXHAUSTED in errors[0], log
    assert "Traceback" not in log, log
    assert not node.subnet_file.exists()
    return log


@pytest.mark.parametrize("case", CASES)
def test_no_lease_removes_only_what_this_run_made(
    scope: netns.RunScope, case: Case, require_kernel_module: Callable[..., None]
) -> None:
    need(tools=("ip", "etcd", "etcdctl", *case.tools))
    if case.module:
        require_kernel_module(case.module)
    tb = Testbed(scope)
    tb.start_etcd()
    tb.put_config({**CONF, "Backend": {"Type": case.backend}})
    old, new = tb.add_node("n1"), tb.add_node("n2")
    tb.start_agent(old)
    env = tb.wait_ready(old)
    assert tb.stop_agent(old) == 0
    kept = link_id(old.ns, case.device)
    assert kept is not None, f"the first run of {old.name} left no {case.device}"
    server = wg_go_pid(old) if case.backend == "wireguard" else None
    if case.backend == "wireguard":
        assert server is not None, "the first run left no wireguard-go serving its device"

    assert env.subnet is not None
    tb.etcdctl("del", f"{tb.prefix}/subnets/{str(env.subnet).replace('/', '-')}")
    for i, key in enumerate(SUBNETS, 1):  # reservations: no TTL, other nodes' addresses
        tb.etcdctl("put", f"{tb.prefix}/subnets/{key}", json.dumps({"PublicIP": f"192.168.77.20{i}"}))

    removed = f"removed {case.device}: this run made it but never got a lease"
    old_log = fail_without_lease(tb, old)
    assert removed not in old_log
    assert link_id(old.ns, case.device) == kept, "the device a previous run left was not kept as it was"
    new_log = fail_without_lease(tb, new)
    links = netns.run(["ip", "-n", new.ns, "-o", "link", "show"])
    assert "flannel" not in links, f"{new.name} never got a lease but keeps:\n{links}"
    if case.backend == "wireguard":
        assert wg_go_pid(old) == server, "the wireguard-go a previous run left was stopped"
        assert netns.wait_for(lambda: wg_go_pid(new) is None, timeout=10), "this run's wireguard-go is still running"
    # The device was made (so its absence is a removal, not a run that stopped before making it).
    assert removed in new_log, new_log


@pytest.mark.parametrize("case", CASES)
def test_stopped_while_waiting_for_a_lease_removes_what_this_run_made(
    scope: netns.RunScope, case: Case, require_kernel_module: Callable[..., None]
) -> None:
    """SIGTERM while the lease cannot be got (the agent's etcd user may read the config but write nothing, so
    every acquire is refused and retried): a clean exit 0 that leaves nothing of the device it made."""
    need(tools=("ip", "etcd", "etcdctl", *case.tools))
    if case.module:
        require_kernel_module(case.module)
    tb = Testbed(scope)
    tb.start_etcd()
    tb.put_config({**CONF, "Backend": {"Type": case.backend}})
    node = tb.add_node("n1")
    tb.etcdctl("user", "add", "root:rootpw")
    tb.etcdctl("role", "add", "reader")
    tb.etcdctl("role", "grant-permission", "reader", "--prefix=true", "read", f"{tb.prefix}/")
    tb.etcdctl("user", "add", "flannel:flannelpw")
    tb.etcdctl("user", "grant-role", "flannel", "reader")
    tb.etcdctl("auth", "enable")
    tb.start_agent(node, "--etcd-username=flannel", "--etcd-password=flannelpw")
    waiting = "failed to acquire a lease, retrying"
    assert netns.wait_for(lambda: waiting in tb.log_tail(node, 100_000), timeout=60), tb.log_tail(node)
    assert link_id(node.ns, case.device) is not None, "prepare() made no device: nothing to test"
    assert tb.stop_agent(node) == 0, tb.log_tail(node)
    log = node.log_file.read_text(errors="replace")
    assert "Traceback" not in log, log
    links = netns.run(["ip", "-n", node.ns, "-o", "link", "show"])
    assert "flannel" not in links, f"{node.name} never got a lease but keeps:\n{links}"
    if case.backend == "wireguard":
        assert netns.wait_for(lambda: wg_go_pid(node) is None, timeout=10), "this run's wireguard-go still runs"
    assert f"removed {case.device}: this run made it but never got a lease" in log, log


def test_dual_stack_wireguard_go_leaves_neither_device(scope: netns.RunScope) -> None:
    """Mode separate, both families: two devices, each served by a wireguard-go of its own, are made before the
    lease; no IPv6 subnet is free, and both devices and both processes go."""
    need(tools=("ip", "etcd", "etcdctl", "wireguard-go"))
    tb = Testbed(scope, ip_family="dual")
    tb.start_etcd()
    conf = {**CONF, "EnableIPv6": True, "IPv6Network": "fd00::/62", "Backend": {"Type": "wireguard"}}
    tb.put_config(conf)
    for i in (1, 2, 3):  # reservations on all three IPv6 subnets of fd00::/62
        value = json.dumps({"PublicIP": f"192.168.77.20{i}", "PublicIPv6": f"fd77:77::20{i}"})
        tb.etcdctl("put", f"{tb.prefix}/subnets/10.244.{i}0.0-24&fd00:0:0:{i}::-64", value)
    node = tb.add_node("n1")
    tb.start_agent(node)
    assert exit_code(tb, node) == 1, tb.log_tail(node)
    tb.stop_agent(node)
    log = node.log_file.read_text(errors="replace")
    errors = [ln for ln in log.splitlines() if ln.startswith(("E", "F"))]
    assert len(errors) == 1 and "no free subnets between IPv6SubnetMin and IPv6SubnetMax" in errors[0], log
    assert "Traceback" not in log, log
    links = netns.run(["ip", "-n", node.ns, "-o", "link", "show"])
    assert "flannel" not in links, f"{node.name} never got a lease but keeps:\n{links}"
    assert netns.wait_for(lambda: wg_go_pid(node) is None, timeout=10), "a wireguard-go of this run still runs"
    for dev in ("flannel-wg", "flannel-wg-v6"):
        assert f"removed {dev}: this run made it but never got a lease" in log, log


def test_the_rule_on_one_backend_object(scope: netns.RunScope) -> None:
    """Backend.remove_half_built, driven directly: a device this run made goes at close() without a lease, one
    that replaced it meanwhile (another ifindex) stays, and nothing goes once start() was handed a lease or the agent
    said it holds one (Backend.lease_taken, right after the acquire)."""
    need(tools=("ip",))
    ns = scope.add_ns("n1")
    netns.run(["ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"])
    netns.run(["ip", "-n", ns, "addr", "add", "192.168.100.1/24", "dev", "eth0"])
    netns.run(["ip", "-n", ns, "link", "set", "eth0", "up"])
    cfg = parse_net_config(json.dumps({**CONF, "Backend": {"Type": "vxlan"}}))
    dev = "flannel.1"

    async def go(nl: Netlink) -> None:
        eth0 = await nl.link_by_name("eth0")
        assert eth0 is not None
        ip4 = IPv4Address("192.168.100.1")
        ext = ExternalInterface(
            name="eth0",
            index=eth0.index,
            mtu=eth0.mtu,
            iface_addr=ip4,
            iface_addr6=None,
            public_ip=ip4,
            public_ipv6=None,
        )

        be = VxlanBackend(cfg, ext, nl)
        await be.prepare()
        assert link_id(ns, dev) is not None
        await be.close()
        assert link_id(ns, dev) is None, "a device made before any lease survived close()"

        be = VxlanBackend(cfg, ext, nl)
        await be.prepare()
        netns.run(["ip", "-n", ns, "link", "del", dev])
        netns.run(["ip", "-n", ns, "link", "add", dev, "type", "bridge"])
        someone_elses = link_id(ns, dev)
        await be.close()
        assert link_id(ns, dev) == someone_elses, "a device that replaced ours was removed"
        netns.run(["ip", "-n", ns, "link", "del", dev])

        be = VxlanBackend(cfg, ext, nl)
        attrs = await be.prepare()
        made = link_id(ns, dev)
        attrs4 = LeaseAttrs(
            public_ip=ip4,
            public_ipv6=None,
            backend_type=attrs.backend_type,
            backend_data=attrs.backend_data,
            backend_v6_data=None,
        )
        lease = Lease(subnet=IPv4Network("10.244.1.0/24"), ipv6_subnet=None, attrs=attrs4, expiration=None)
        await be.start(lease)
        await be.close()
        assert link_id(ns, dev) == made, "close() after a lease removed the data plane"

        # Stopped between the acquire and start(): the lease (with our VtepMAC) is in the store, so it stays.
        be = VxlanBackend(cfg, ext, nl)
        netns.run(["ip", "-n", ns, "link", "del", dev])
        await be.prepare()
        made = link_id(ns, dev)
        be.lease_taken()
        await be.close()
        assert link_id(ns, dev) == made, "close() right after the acquire removed the data plane"

    async def main() -> None:
        nl = Netlink(netns=ns)
        try:
            await go(nl)
        finally:
            await nl.close()

    asyncio.run(main())
