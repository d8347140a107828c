"""wireguard backend: iperf3 pod to pod over agent-programmed WireGuard, divided by a hand-configured WireGuard
pair on the same underlay in the same run (same implementation, same pod topology: pod -> cni0 -> node ->
WireGuard device -> underlay), so the ratio shows what the agent's configuration costs (goal >= 0.95).

The implementation is the one the kernel allows: kernel WireGuard where it has the module (the stock-kernel VM),
wireguard-go where it has not (this host), or the one --implementation forces. The hand pair is made the way an
admin would: `ip link add wg0 type wireguard` (kernel) or wireguard-go in a private mount namespace (userspace),
then `wg set`, an address, a route.

usage: sudo .venv/bin/python bench/bench_wireguard.py [--seconds 3] [--rounds 3] [--implementation auto]
in the VM: .venv/bin/python -m pyflannel.lab.vm -- -s bench/bench_wireguard.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from ipaddress import IPv4Network
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pyflannel.lab import netns
from pyflannel.lab.testbed import Node, Pod, Testbed
from pyflannel.subnetenv import SubnetEnv

MTU = 1420  # 1500 - WireGuard's 80, as the agent sets it
PORT = 51820


def iperf_gbps(tb: Testbed, client: Pod, server: Pod, seconds: int) -> float:
    srv = tb.scope.spawn(server.ns, ["iperf3", "-s", "-1", "-B", server.ip])
    try:
        time.sleep(0.5)
        out = netns.ns_exec(client.ns, ["iperf3", "-c", server.ip, "-t", str(seconds), "-J"], timeout=seconds + 60)
        return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9
    finally:
        try:
            srv.wait(timeout=10)
        except subprocess.TimeoutExpired:
            srv.kill()


def agent_pair(tb: Testbed, implementation: str) -> tuple[list[Node], Pod, Pod, str]:
    tb.put_config({"Network": "10.244.0.0/16", "Backend": {"Type": "wireguard", "Implementation": implementation}})
    nodes = [tb.add_node("a1"), tb.add_node("a2")]
    for n in nodes:
        tb.start_agent(n)
    pods = [tb.add_pod(n, tb.wait_ready(n)) for n in nodes]
    if not tb.wait_ping(pods[0].ns, pods[1].ip, timeout=60):
        raise SystemExit("agent pair: pods cannot reach each other")
    kind = netns.run(["ip", "-n", nodes[0].ns, "-d", "link", "show", "flannel-wg"])
    return nodes, pods[0], pods[1], "kernel" if "wireguard" in kind else "userspace"


def _wg_prefix(node: Node, impl: str, pids: dict[str, int]) -> list[str]:
    if impl == "kernel":
        return ["ip", "netns", "exec", node.ns]
    return ["nsenter", "-t", str(pids[node.name]), "-m", "-n"]


def hand_pair(tb: Testbed, impl: str) -> tuple[Pod, Pod]:
    """Two nodes configured by hand: wg0, keys from `wg genkey`, one peer each, 10.250.N.0/24 behind cni0."""
    nodes = [tb.add_node("h1"), tb.add_node("h2")]
    subnets = [IPv4Network("10.250.1.0/24"), IPv4Network("10.250.2.0/24")]
    keys = [netns.run(["wg", "genkey"]).strip() for _ in nodes]
    pubs = [netns.run(["wg", "pubkey"], input=k).strip() for k in keys]
    pids: dict[str, int] = {}
    for n in nodes:
        if impl == "kernel":
            netns.run(["ip", "-n", n.ns, "link", "add", "wg0", "mtu", str(MTU), "type", "wireguard"])
        else:
            env = {**os.environ, "WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "error"}
            p = tb.scope.spawn(
                n.ns,
                ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                 "mount -t tmpfs none /run && exec wireguard-go -f wg0"],
                env=env,
            )  # fmt: skip
            pids[n.name] = p.pid
            sock = f"/proc/{p.pid}/root/run/wireguard/wg0.sock"
            if not netns.wait_for(lambda sock=sock: os.path.exists(sock), timeout=20):  # type: ignore[misc]
                raise SystemExit("hand pair: wireguard-go did not start")
            netns.run(["ip", "-n", n.ns, "link", "set", "wg0", "mtu", str(MTU)])
    for i, n in enumerate(nodes):
        j = 1 - i
        keyfile = tb.scope.tmpdir / f"{n.name}.key"
        keyfile.write_text(keys[i])
        peer = ["peer", pubs[j], "endpoint", f"{nodes[j].ip}:{PORT}", "allowed-ips", str(subnets[j])]
        dev = ["wg0", "private-key", str(keyfile), "listen-port", str(PORT)]
        netns.run([*_wg_prefix(n, impl, pids), "wg", "set", *dev, *peer])
        netns.run(["ip", "-n", n.ns, "addr", "add", f"{subnets[i].network_address}/32", "dev", "wg0"])
        netns.run(["ip", "-n", n.ns, "link", "set", "wg0", "up"])
        netns.run(["ip", "-n", n.ns, "route", "add", "10.250.0.0/16", "dev", "wg0"])
    pods = [tb.add_pod(n, SubnetEnv(subnet=subnets[i], mtu=MTU)) for i, n in enumerate(nodes)]
    if not tb.wait_ping(pods[0].ns, pods[1].ip, timeout=60):
        raise SystemExit("hand pair: pods cannot reach each other")
    return pods[0], pods[1]


def run(seconds: int, rounds: int, implementation: str) -> float:
    netns.sweep(netns.STEM_TEST)
    with netns.RunScope(tag="benchwg") as scope:
        tb = Testbed(scope)
        tb.start_etcd()
        nodes, ap1, ap2, impl = agent_pair(tb, implementation)
        hp1, hp2 = hand_pair(tb, impl)
        # One short unmeasured run each: the first transfer over a fresh path pays for caches, ARP and the handshake.
        iperf_gbps(tb, ap1, ap2, 1)
        iperf_gbps(tb, hp1, hp2, 1)
        agent, hand = [], []
        for r in range(rounds):
            # Swap the order every round so a trend on the machine does not favour one side.
            for which in ("agent", "hand") if r % 2 == 0 else ("hand", "agent"):
                if which == "agent":
                    agent.append(iperf_gbps(tb, ap1, ap2, seconds))
                else:
                    hand.append(iperf_gbps(tb, hp1, hp2, seconds))
            print(f"round {r + 1}: agent {agent[-1]:.3f} Gbit/s, hand-configured {hand[-1]:.3f} Gbit/s", flush=True)
        a, h = statistics.median(agent), statistics.median(hand)
        paired = statistics.median(x / y for x, y in zip(agent, hand, strict=True))
        print(f"implementation: {impl} WireGuard ({os.uname().release})")
        print(f"TCP median: agent {a:.3f} Gbit/s, hand-configured {h:.3f} Gbit/s, ratio {a / h:.3f} (goal >= 0.95)")
        print(f"median of the per-round ratios: {paired:.3f}")
        for n in nodes:
            tb.stop_agent(n)
        return a / h


@pytest.mark.kernel_vm
@pytest.mark.vm_only
def test_bench_in_the_vm() -> None:
    """The VM pass's entry: `python -m pyflannel.lab.vm -- -s bench/bench_wireguard.py` (kernel WireGuard)."""
    run(seconds=3, rounds=3, implementation="kernel")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--implementation", default="auto", choices=("auto", "kernel", "userspace"))
    args = ap.parse_args()
    run(args.seconds, args.rounds, args.implementation)


if __name__ == "__main__":
    main()
