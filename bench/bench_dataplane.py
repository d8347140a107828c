"""Data plane: iperf3 pod to pod across two nodes through agent-programmed vxlan, divided by the same
topology with vxlan configured by hand (the kernel's own ceiling), measured in the same run; one round for
IPv4 (`flannel.1`) and one for IPv6 (`flannel-v6.1`, pods of an IPv6-only config on the dual-stack underlay).

Goal (issue 2, issue 14 for IPv6): ratio >= 0.95 for each. Rounds alternate between the two so drift on the
machine hits both.

usage: sudo .venv/bin/python bench/bench_dataplane.py [--seconds 5] [--rounds 3] [--family ipv4|ipv6|both]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pyflannel.lab import netns
from pyflannel.lab.testbed import Node, Pod, Testbed
from pyflannel.subnetenv import SubnetEnv


@dataclass(frozen=True)
class Family:
    """What differs between the IPv4 and the IPv6 data path; everything else is one code path."""

    version: int
    dev: str  # the device flanneld names for this family
    overhead: int  # outer IP + UDP + VXLAN + inner Ethernet, as the agent subtracts from the underlay MTU
    iptables: str
    hand_net: str  # the hand pair's cluster network and its two node subnets
    hand_subnets: tuple[str, str]
    agent_conf: dict[str, object]
    etcd_prefix: str


IPV4 = Family(
    4, "flannel.1", 50, "iptables", "10.99.0.0/16", ("10.99.1.0/24", "10.99.2.0/24"),
    {"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}, "/coreos.com/network",
)  # fmt: skip
IPV6 = Family(
    6, "flannel-v6.1", 70, "ip6tables", "fd00:99::/48", ("fd00:99:0:1::/64", "fd00:99:0:2::/64"),
    {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd00:244::/48", "Backend": {"Type": "vxlan"}},
    "/benchdp/v6",
)  # fmt: skip


def underlay_ip(node: Node, fam: Family) -> str:
    ip = node.ip if fam.version == 4 else node.ip6
    assert ip is not None, f"{node.name} has no IPv{fam.version} underlay address"
    return ip


def pod_ip(pod: Pod, fam: Family) -> str:
    ip = pod.ip if fam.version == 4 else pod.ip6
    assert ip is not None, f"{pod.name} has no IPv{fam.version} address"
    return ip


def hand_vxlan(tb: Testbed, a: Node, b: Node, fam: Family) -> tuple[Pod, Pod]:
    """Two nodes wired like flannel does it, by hand: vxlan, neighbour, FDB, onlink route, forward rules, cni0
    and a pod."""
    macs = {a.name: "0a:11:00:00:00:01", b.name: "0a:11:00:00:00:02"}
    subnets = {a.name: ipaddress.ip_network(fam.hand_subnets[0]), b.name: ipaddress.ip_network(fam.hand_subnets[1])}
    mtu = 1500 - fam.overhead
    host = "/32" if fam.version == 4 else "/128"
    nodad = ["nodad"] if fam.version == 6 else []  # unique by construction; DAD would hold it tentative ~1 s
    pods = []
    for me, peer in ((a, b), (b, a)):
        run = ["ip", "-n", me.ns]
        gw = str(subnets[peer.name].network_address)
        local = underlay_ip(me, fam)
        netns.run([*run, "link", "add", fam.dev, "address", macs[me.name], "mtu", str(mtu), "type", "vxlan",
                   "id", "1", "local", local, "dev", "eth0", "dstport", "8472", "nolearning"])  # fmt: skip
        netns.run([*run, "addr", "add", f"{subnets[me.name].network_address}{host}", "dev", fam.dev, *nodad])
        netns.run([*run, "link", "set", fam.dev, "up"])
        netns.run([*run, "neigh", "replace", gw, "lladdr", macs[peer.name], "dev", fam.dev, "nud", "permanent"])
        netns.run(["bridge", "-n", me.ns, "fdb", "append", macs[peer.name], "dev", fam.dev,
                   "dst", underlay_ip(peer, fam), "self", "permanent"])  # fmt: skip
        netns.run([*run, "route", "add", str(subnets[peer.name]), "via", gw, "dev", fam.dev, "onlink"])
        # The forward rules every flannel node carries (--iptables-forward-rules defaults to true): with them
        # both sides pay the same netfilter cost, and the ratio measures what the agent programs.
        for rule in (["-s", fam.hand_net], ["-d", fam.hand_net]):
            netns.ns_exec(me.ns, [fam.iptables, "-A", "FORWARD", *rule, "-m", "comment", "--comment",
                                  "flanneld forward", "-j", "ACCEPT"])  # fmt: skip
        sn = subnets[me.name]
        if isinstance(sn, ipaddress.IPv4Network):
            env = SubnetEnv(subnet=sn, mtu=mtu)
        else:
            env = SubnetEnv(ipv6_subnet=sn, mtu=mtu)
        pods.append(tb.add_pod(me, env))
    return pods[0], pods[1]


def agent_pair(tb: Testbed, fam: Family) -> tuple[Pod, Pod]:
    """Two nodes running the real agent with this family's config (its own etcd prefix), a pod on each."""
    tb.etcdctl("put", f"{fam.etcd_prefix}/config", "--", json.dumps(fam.agent_conf))
    nodes = [tb.add_node(f"a{fam.version}{i}") for i in (1, 2)]
    for n in nodes:
        tb.start_agent(n, f"--etcd-prefix={fam.etcd_prefix}")  # the last --etcd-prefix wins, as with flags
    pods = [tb.add_pod(n, tb.wait_ready(n)) for n in nodes]
    for n in nodes:
        if "vxlan id 1" not in netns.run(["ip", "-n", n.ns, "-d", "link", "show", "dev", fam.dev], check=False):
            raise SystemExit(f"{n.name}: the agent made no vxlan device {fam.dev}")
    return pods[0], pods[1]


def iperf(tb: Testbed, client: Pod, server: Pod, fam: Family, seconds: int) -> float:
    dst = pod_ip(server, fam)
    srv = tb.scope.spawn(server.ns, ["iperf3", "-s", "-1", "-B", dst])
    try:
        time.sleep(0.5)
        out = netns.ns_exec(client.ns, ["iperf3", "-c", dst, "-t", str(seconds), "-J"], timeout=seconds + 30)
        return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9
    finally:
        try:
            srv.wait(timeout=5)
        except subprocess.TimeoutExpired:
            srv.kill()


def measure(tb: Testbed, fam: Family, rounds: int, seconds: int) -> tuple[float, float]:
    """Median Gbit/s of the agent's pair and of the hand-configured pair of one family, rounds interleaved."""
    p1, p2 = agent_pair(tb, fam)
    if not tb.wait_ping(p1.ns, pod_ip(p2, fam)):
        raise SystemExit(f"IPv{fam.version}: agent-programmed pods cannot reach each other")
    q1, q2 = hand_vxlan(tb, tb.add_node(f"h{fam.version}1"), tb.add_node(f"h{fam.version}2"), fam)
    if not tb.wait_ping(q1.ns, pod_ip(q2, fam)):
        raise SystemExit(f"IPv{fam.version}: hand-configured pods cannot reach each other")
    agent, base = [], []
    for r in range(rounds):
        # Swap the order every round so a trend on the machine does not favour one side.
        if r % 2:
            base.append(iperf(tb, q1, q2, fam, seconds))
            agent.append(iperf(tb, p1, p2, fam, seconds))
        else:
            agent.append(iperf(tb, p1, p2, fam, seconds))
            base.append(iperf(tb, q1, q2, fam, seconds))
        print(
            f"IPv{fam.version} round {r + 1}: agent {agent[-1]:.2f} Gbit/s, hand-configured {base[-1]:.2f} Gbit/s",
            flush=True,
        )
    a, b = statistics.median(agent), statistics.median(base)
    print(f"IPv{fam.version} median: agent {a:.2f} Gbit/s, baseline {b:.2f} Gbit/s, ratio {a / b:.3f} (goal >= 0.95)")
    return a, b


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--family", choices=("ipv4", "ipv6", "both"), default="both")
    args = ap.parse_args()
    netns.sweep(netns.STEM_TEST)
    families = {"ipv4": [IPV4], "ipv6": [IPV6], "both": [IPV4, IPV6]}[args.family]
    with netns.RunScope(tag="benchdp") as scope:
        # Dual-stack underlay for both rounds: the IPv4 pair never uses its IPv6 addresses, and the IPv6 pair's
        # agents run an IPv6-only config, so each round's pods have the MTU of its own family's device.
        tb = Testbed(scope, ip_family="dual")
        tb.start_etcd()
        try:
            for fam in families:
                measure(tb, fam, args.rounds, args.seconds)
        finally:
            for n in tb.nodes.values():
                tb.stop_agent(n)


if __name__ == "__main__":
    main()
