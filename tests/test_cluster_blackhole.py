"""flanneld --ip-blackhole-route on a real node: the route it keeps, restored from kernel events, never swept."""

from __future__ import annotations

import ipaddress

import pytest

from pyflannel.lab import netns
from pyflannel.lab.testbed import Testbed

pytestmark = pytest.mark.integration


def blackholes(ns: str) -> list[str]:
    out = netns.run(["ip", "-n", ns, "route", "show", "type", "blackhole"])
    return sorted(line.strip() for line in out.splitlines() if line.strip())


@pytest.mark.parametrize("backend", ["vxlan", "host-gw"])
def test_blackhole_route_kept_from_events_never_swept_left_on_sigterm(scope: netns.RunScope, backend: str) -> None:
    tb = Testbed(scope)
    tb.start_etcd()
    tb.put_config({"Network": "10.244.0.0/16", "Backend": {"Type": backend}})
    node = tb.add_node("n1")
    # The periodic pass is pushed out of the test's reach: only the kernel-event path can restore the route.
    # No forward rules: the blackhole route does not depend on the traffic-rule manager.
    tb.start_agent(node, "--ip-blackhole-route", "--reconcile-interval=300", "--iptables-forward-rules=false")
    env = tb.wait_ready(node)
    assert env.subnet is not None
    own = f"blackhole {env.subnet} metric 4096"
    assert blackholes(node.ns) == [own]
    # The node's own pods stay reachable: cni0's connected route wins over the blackhole while cni0 is up.
    tb.ensure_bridge(node, env)
    pod_ip = str(env.subnet.network_address + 5)
    assert "dev cni0" in netns.run(["ip", "-n", node.ns, "route", "get", pod_ip])
    assert netns.wait_for(lambda: "synced" in node.log_file.read_text(), timeout=20), tb.log_tail(node)

    # A blackhole for a subnet of the Network that no lease holds looks like a peer's route to a sweep by its
    # prefix; the backend's pass must leave it alone. A unicast route there is one the pass does sweep: once it
    # is gone, a full pass has run after the stray blackhole appeared.
    net = ipaddress.IPv4Network("10.244.0.0/16")
    stray, sweepable = [str(s) for s in net.subnets(new_prefix=24) if s != env.subnet][250:252]
    netns.run(["ip", "-n", node.ns, "route", "add", "blackhole", stray])
    if backend == "vxlan":
        netns.run(["ip", "-n", node.ns, "route", "add", sweepable, "dev", "flannel.1"])
    else:
        netns.run(["ip", "-n", node.ns, "route", "add", sweepable, "via", tb.gateway, "dev", "eth0"])

    def swept() -> bool:
        return sweepable not in netns.run(["ip", "-n", node.ns, "route"])

    assert netns.wait_for(swept, timeout=15), tb.log_tail(node)
    assert blackholes(node.ns) == sorted([own, f"blackhole {stray}"])

    # Deleted by hand, it comes back once, from the route-delete notification.
    netns.run(["ip", "-n", node.ns, "route", "del", "blackhole", str(env.subnet), "metric", "4096"])
    assert netns.wait_for(lambda: blackholes(node.ns) == sorted([own, f"blackhole {stray}"]), timeout=10), (
        blackholes(node.ns),
        tb.log_tail(node),
    )
    assert "kernel change needs a repair: del route" in node.log_file.read_text()

    # Replaced by another route of its key (same prefix and metric): the blackhole is put back.
    netns.run(["ip", "-n", node.ns, "route", "replace", str(env.subnet), "via", tb.gateway, "dev", "eth0",
               "metric", "4096"])  # fmt: skip
    assert netns.wait_for(lambda: own in blackholes(node.ns), timeout=10), tb.log_tail(node)
    assert f"{env.subnet} via" not in netns.run(["ip", "-n", node.ns, "route"])

    assert tb.stop_agent(node) == 0
    # Left in place on SIGTERM, like every other entry of the data plane.
    assert blackholes(node.ns) == sorted([own, f"blackhole {stray}"])
    log = node.log_file.read_text()
    assert "Traceback" not in log and "cannot program the blackhole route" not in log
