"""udp backend: iperf3 pod to pod through flanneld's userspace data path, divided by the same over the vxlan
backend, on the same lab topology in the same run (two node pairs on one underlay, each on its own etcd prefix).

Goal (issue 13): ratio >= 0.07 (upstream v0.20.2's C proxy gave 0.42 Gbit/s against vxlan's 11.7 here, 0.036).
Also reported: packets per second at 64-byte UDP payloads (udp and vxlan), the agents' CPU time per Gbit
carried, and the restart gap (pod-to-pod traffic lost while one agent restarts).

usage: sudo .venv/bin/python bench/bench_udp.py [--seconds 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pyflannel.lab import netns
from pyflannel.lab.probe import restart_gap
from pyflannel.lab.testbed import Node, Pod, Testbed

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def iperf(tb: Testbed, client: Pod, server: Pod, seconds: int, *extra: str) -> dict[str, object]:
    srv = tb.scope.spawn(server.ns, ["iperf3", "-s", "-1", "-B", server.ip])
    try:
        time.sleep(0.5)
        out = netns.ns_exec(
            client.ns, ["iperf3", "-c", server.ip, "-t", str(seconds), "-J", *extra], timeout=seconds + 30
        )
        res: dict[str, object] = json.loads(out)["end"]
        return res
    finally:
        try:
            srv.wait(timeout=5)
        except subprocess.TimeoutExpired:
            srv.kill()


def tcp_gbps(tb: Testbed, a: Pod, b: Pod, seconds: int) -> float:
    end = iperf(tb, a, b, seconds)
    return float(end["sum_received"]["bits_per_second"]) / 1e9  # type: ignore[index]


def small_pps(tb: Testbed, a: Pod, b: Pod, seconds: int) -> float:
    """Packets per second that arrive, 64-byte UDP payloads sent as fast as iperf3 can."""
    end = iperf(tb, a, b, seconds, "-u", "-b", "0", "-l", "64")
    s = end["sum"]
    lost, total, secs = s["lost_packets"], s["packets"], s["seconds"]  # type: ignore[index]
    return float(total - lost) / float(secs)


def pair(tb: Testbed, prefix: str, network: str, backend: str, names: tuple[str, str]) -> tuple[Node, Node, Pod, Pod]:
    tb.prefix = prefix
    tb.put_config({"Network": network, "Backend": {"Type": backend}})
    n1, n2 = tb.add_node(names[0]), tb.add_node(names[1])
    for n in (n1, n2):
        tb.start_agent(n)
    p1 = tb.add_pod(n1, tb.wait_ready(n1))
    p2 = tb.add_pod(n2, tb.wait_ready(n2))
    if not tb.wait_ping(p1.ns, p2.ip):
        raise SystemExit(f"{backend}: pods cannot reach each other")
    return n1, n2, p1, p2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    netns.sweep(netns.STEM_TEST)
    with netns.RunScope(tag="benchudp") as scope:
        tb = Testbed(scope)
        tb.start_etcd()
        u1, u2, up1, up2 = pair(tb, "/bench-udp", "10.244.0.0/16", "udp", ("u1", "u2"))
        v1, v2, vp1, vp2 = pair(tb, "/bench-vxlan", "10.245.0.0/16", "vxlan", ("v1", "v2"))
        agents = [n.proc.pid for n in (u1, u2) if n.proc is not None]
        udp, vx, cpu = [], [], []
        for r in range(args.rounds):
            # Swap the order every round so a trend on the machine does not favour one side.
            order = ("udp", "vxlan") if r % 2 == 0 else ("vxlan", "udp")
            for which in order:
                if which == "vxlan":
                    vx.append(tcp_gbps(tb, vp1, vp2, args.seconds))
                    continue
                before = sum(cpu_seconds(p) for p in agents)
                udp.append(tcp_gbps(tb, up1, up2, args.seconds))
                used = sum(cpu_seconds(p) for p in agents) - before
                cpu.append(used / (udp[-1] * args.seconds))
            print(f"round {r + 1}: udp {udp[-1]:.3f} Gbit/s, vxlan {vx[-1]:.2f} Gbit/s", flush=True)
        a, b = statistics.median(udp), statistics.median(vx)
        paired = statistics.median(u / v for u, v in zip(udp, vx, strict=True))
        print(f"TCP median: udp {a:.3f} Gbit/s, vxlan {b:.2f} Gbit/s, ratio {a / b:.3f} (goal >= 0.07)")
        print(f"median of the per-round ratios: {paired:.3f}")
        print(f"agents' CPU (both ends): {statistics.median(cpu):.2f} CPU-seconds per Gbit carried")
        pu = small_pps(tb, up1, up2, args.seconds)
        pv = small_pps(tb, vp1, vp2, args.seconds)
        print(f"64-byte UDP: udp {pu / 1e3:.1f} kpps, vxlan {pv / 1e3:.1f} kpps, ratio {pu / pv:.3f}")
        tb.prefix = "/bench-udp"
        gap, lost = restart_gap(tb, u1, up1, up2)
        print(f"restart gap of the sending node's agent: {gap:.2f} s without traffic ({lost} probes lost)")
        for n in (u1, u2, v1, v2):
            tb.stop_agent(n)


if __name__ == "__main__":
    main()
