"""Data plane: iperf3 pod to pod across two nodes through agent-programmed vxlan, divided by the same
topology with vxlan configured by hand (the kernel's own ceiling), measured in the same run.

Goal (issue 2): ratio >= 0.95. Rounds alternate between the two so drift on the machine hits both.

usage: sudo .venv/bin/python bench/bench_dataplane.py [--seconds 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pyflannel.lab import netns
from pyflannel.lab.testbed import Node, Pod, Testbed
from pyflannel.subnetenv import SubnetEnv


def hand_vxlan(tb: Testbed, a: Node, b: Node, sa: str, sb: str) -> tuple[Pod, Pod]:
    """Two nodes wired like flannel does it, by hand: vxlan, neighbour, FDB, onlink route, forward rules, cni0
    and a pod."""
    macs = {a.name: "0a:11:00:00:00:01", b.name: "0a:11:00:00:00:02"}
    subnets = {a.name: sa, b.name: sb}
    pods = []
    for me, peer in ((a, b), (b, a)):
        run = ["ip", "-n", me.ns]
        netns.run([*run, "link", "add", "flannel.1", "address", macs[me.name], "mtu", "1450", "type", "vxlan",
                   "id", "1", "local", me.ip, "dev", "eth0", "dstport", "8472", "nolearning"])  # fmt: skip
        netns.run([*run, "addr", "add", f"{subnets[me.name]}.0/32", "dev", "flannel.1"])
        netns.run([*run, "link", "set", "flannel.1", "up"])
        netns.run([*run, "neigh", "replace", f"{subnets[peer.name]}.0", "lladdr", macs[peer.name], "dev",
                   "flannel.1", "nud", "permanent"])  # fmt: skip
        netns.run(["bridge", "-n", me.ns, "fdb", "append", macs[peer.name], "dev", "flannel.1", "dst", peer.ip,
                   "self", "permanent"])  # fmt: skip
        netns.run([*run, "route", "add", f"{subnets[peer.name]}.0/24", "via", f"{subnets[peer.name]}.0", "dev",
                   "flannel.1", "onlink"])  # fmt: skip
        # The forward rules every flannel node carries (--iptables-forward-rules defaults to true): with them
        # both sides pay the same netfilter cost, and the ratio measures what the agent programs.
        for rule in (["-s", "10.99.0.0/16"], ["-d", "10.99.0.0/16"]):
            netns.ns_exec(me.ns, ["iptables", "-A", "FORWARD", *rule, "-m", "comment", "--comment",
                                  "flanneld forward", "-j", "ACCEPT"])  # fmt: skip
        env = SubnetEnv(subnet=ipaddress.IPv4Network(f"{subnets[me.name]}.0/24"), mtu=1450)
        pods.append(tb.add_pod(me, env))
    return pods[0], pods[1]


def iperf(tb: Testbed, client: Pod, server: Pod, seconds: int) -> float:
    srv = tb.scope.spawn(server.ns, ["iperf3", "-s", "-1", "-B", server.ip])
    try:
        time.sleep(0.5)
        out = netns.ns_exec(client.ns, ["iperf3", "-c", server.ip, "-t", str(seconds), "-J"], timeout=seconds + 30)
        return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9
    finally:
        try:
            srv.wait(timeout=5)
        except subprocess.TimeoutExpired:
            srv.kill()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    netns.sweep(netns.STEM_TEST)
    with netns.RunScope(tag="benchdp") as scope:
        tb = Testbed(scope)
        tb.start_etcd()
        tb.put_config({"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}})
        n1, n2 = tb.add_node("n1"), tb.add_node("n2")
        for n in (n1, n2):
            tb.start_agent(n)
        p1 = tb.add_pod(n1, tb.wait_ready(n1))
        p2 = tb.add_pod(n2, tb.wait_ready(n2))
        if not tb.wait_ping(p1.ns, p2.ip):
            raise SystemExit("agent-programmed pods cannot reach each other")
        b1, b2 = tb.add_node("b1"), tb.add_node("b2")
        q1, q2 = hand_vxlan(tb, b1, b2, "10.99.1", "10.99.2")
        if not tb.wait_ping(q1.ns, q2.ip):
            raise SystemExit("hand-configured pods cannot reach each other")
        agent, base = [], []
        for r in range(args.rounds):
            # Swap the order every round so a trend on the machine does not favour one side.
            if r % 2:
                base.append(iperf(tb, q1, q2, args.seconds))
                agent.append(iperf(tb, p1, p2, args.seconds))
            else:
                agent.append(iperf(tb, p1, p2, args.seconds))
                base.append(iperf(tb, q1, q2, args.seconds))
            print(f"round {r + 1}: agent {agent[-1]:.2f} Gbit/s, hand-configured {base[-1]:.2f} Gbit/s", flush=True)
        a, b = statistics.median(agent), statistics.median(base)
        print(f"median: agent {a:.2f} Gbit/s, baseline {b:.2f} Gbit/s, ratio {a / b:.3f} (goal >= 0.95)")
        for n in (n1, n2):
            tb.stop_agent(n)


if __name__ == "__main__":
    main()
