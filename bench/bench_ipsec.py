"""ipsec backend: iperf3 pod to pod over agent-programmed IPsec (ESP, charon's SAs, the agent's policies), divided
by the same over vxlan in the same run (same underlay, same pod topology), and the CPU each costs per Gbit carried
(busy CPU seconds of the whole machine, from /proc/stat, during the transfer, per Gbit received).

ESP needs the kernel's esp4, which this host lacks: run it in the stock-kernel VM.

usage: sudo .venv/bin/python bench/bench_ipsec.py [--seconds 3] [--rounds 3] [--udp-encap]
in the VM: .venv/bin/python -m pyflannel.lab.vm -- -s bench/bench_ipsec.py
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_wireguard import iperf_gbps

from pyflannel.lab import netns
from pyflannel.lab.testbed import Pod, Testbed

NETWORK = "10.244.0.0/16"


def _busy_seconds() -> float:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def measured(tb: Testbed, a: Pod, b: Pod, seconds: int) -> tuple[float, float]:
    """(Gbit/s, busy CPU seconds per Gbit) of one iperf3 run."""
    before = _busy_seconds()
    gbps = iperf_gbps(tb, a, b, seconds)
    cpu = _busy_seconds() - before
    return gbps, cpu / max(gbps * seconds, 1e-9)


def pair(tb: Testbed, backend: dict[str, object], names: tuple[str, str]) -> tuple[Pod, Pod]:
    # Each agent reads the config once, at start: the second pair runs another backend on the same etcd (each
    # ignores the other's leases, as upstream does).
    tb.put_config({"Network": NETWORK, "Backend": backend})
    nodes = [tb.add_node(n) for n in names]
    for n in nodes:
        tb.start_agent(n)
    pods = [tb.add_pod(n, tb.wait_ready(n)) for n in nodes]
    if not tb.wait_ping(pods[0].ns, pods[1].ip, timeout=120):
        raise SystemExit(f"{backend['Type']} pair: pods cannot reach each other")
    return pods[0], pods[1]


def run(seconds: int, rounds: int, udp_encap: bool) -> float:
    netns.sweep(netns.STEM_TEST)
    with netns.RunScope(tag="benchips") as scope:
        tb = Testbed(scope)
        tb.start_etcd()
        ip1, ip2 = pair(tb, {"Type": "ipsec", "PSK": secrets.token_hex(50), "UDPEncap": udp_encap}, ("i1", "i2"))
        vx1, vx2 = pair(tb, {"Type": "vxlan"}, ("v1", "v2"))
        iperf_gbps(tb, ip1, ip2, 1)  # unmeasured: caches, ARP, the first SA use
        iperf_gbps(tb, vx1, vx2, 1)
        res: dict[str, list[tuple[float, float]]] = {"ipsec": [], "vxlan": []}
        for r in range(rounds):
            for which in ("ipsec", "vxlan") if r % 2 == 0 else ("vxlan", "ipsec"):
                a, b = (ip1, ip2) if which == "ipsec" else (vx1, vx2)
                res[which].append(measured(tb, a, b, seconds))
            (ig, ic), (vg, vc) = res["ipsec"][-1], res["vxlan"][-1]
            print(f"round {r + 1}: ipsec {ig:.3f} Gbit/s ({ic:.2f} CPU s/Gbit), vxlan {vg:.3f} Gbit/s "
                  f"({vc:.2f} CPU s/Gbit)", flush=True)  # fmt: skip
        ig = statistics.median(g for g, _ in res["ipsec"])
        vg = statistics.median(g for g, _ in res["vxlan"])
        ic = statistics.median(c for _, c in res["ipsec"])
        vc = statistics.median(c for _, c in res["vxlan"])
        mode = "ESP in UDP 4500" if udp_encap else "ESP"
        print(f"kernel {os.uname().release}, {os.cpu_count()} CPUs, ipsec over {mode}")
        print(f"TCP median: ipsec {ig:.3f} Gbit/s, vxlan {vg:.3f} Gbit/s, ratio {ig / vg:.3f}")
        print(f"CPU per Gbit (busy CPU seconds): ipsec {ic:.2f}, vxlan {vc:.2f}, ratio {ic / vc:.2f}")
        return ig / vg


@pytest.mark.kernel_vm
@pytest.mark.vm_only
def test_bench_in_the_vm() -> None:
    """The VM pass's entry: `python -m pyflannel.lab.vm -- -s bench/bench_ipsec.py`."""
    run(seconds=3, rounds=3, udp_encap=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--udp-encap", action="store_true")
    args = ap.parse_args()
    run(args.seconds, args.rounds, args.udp_encap)


if __name__ == "__main__":
    main()
