"""Convergence at scale: one real flanneld (vxlan) on real etcd, N synthetic peer leases.

Figures printed for N in (1000, 5000) by default:
  watch_sync_s   leases written while the agent runs -> every route, neighbour and FDB entry in the kernel
  cold_sync_s    agent started with N leases and no vxlan device -> every entry in the kernel
  one_peer_ms    one more lease written once synced: from the etcd write returning to the kernel announcing its
                 route (median and p95 of 21; the announcement is read from `ip monitor route`)
  rss_mb         the agent's resident memory once synced
Goals (issue 2): 5000 peers <= 5 s, one peer <= 100 ms, RSS <= 80 MB. Not a test: nothing here asserts.

With --base TREE (a checkout of another commit, e.g. `git worktree add /tmp/pfbase HEAD`) and --cold-repeats K,
the cold path is then timed K times more per tree on one etcd holding the N leases, the trees alternating start
by start, so that the ratio is taken in the same run under the same load; each tree's median is printed beside
the ratio (this tree over the base), and so is the agent's CPU time (user + system) once synced, which a busy
machine moves far less than the wall clock. Every tree is compiled to bytecode first, as an installed agent is.

usage: sudo .venv/bin/python bench/bench_convergence.py [--base TREE] [--cold-repeats K] [--cold-only] [N ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pyflannel.lab import netns
from pyflannel.lab.testbed import Node, Testbed

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def counts(ns: str) -> tuple[int, int, int]:
    r = netns.run(["ip", "-n", ns, "route", "show", "dev", "flannel.1"], check=False).count("\n")
    n = netns.run(["ip", "-n", ns, "neigh", "show", "dev", "flannel.1"], check=False).count("PERMANENT")
    f = netns.run(["bridge", "-n", ns, "fdb", "show", "dev", "flannel.1"], check=False).count(" dst ")
    return r, n, f


def wait_counts(ns: str, want: int, timeout: float) -> float:
    """Seconds until the device holds `want` routes, neighbours and FDB entries. Only the route table is polled
    (one dump): the agent sends each peer's neighbour and FDB entry before its route in the same ordered batch, so
    the last route in means the rest is in too; all three counts are then checked once, outside the timing."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        out = netns.run(["ip", "-n", ns, "route", "show", "dev", "flannel.1"], check=False)
        if out.count("\n") >= want:
            took = time.monotonic() - t0
            if min(counts(ns)) < want:
                raise RuntimeError(f"routes in but not every neighbour/FDB entry: {counts(ns)} of {want}")
            return took
        time.sleep(0.01)
    raise RuntimeError(f"not converged after {timeout}s: {counts(ns)} of {want}")


def gen(tb: Testbed, first: int, count: int) -> float:
    """Write leases; return the wall-clock time the first write was sent (after the writer's start-up)."""
    out = netns.ns_exec(
        tb.etcd_ns,
        [sys.executable, str(HERE / "_leasegen.py"), tb.endpoint, tb.prefix, str(first), str(count)],
        timeout=120,
    )
    return float(out.split()[0])


def rss_mb(node: Node) -> float:
    assert node.proc is not None
    for line in Path(f"/proc/{node.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


ONE_PEER_SAMPLES = 21


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def one_peer(tb: Testbed, node: Node, idx: int) -> float:
    """Write lease `idx`; milliseconds from its write returning to its route being announced in the node."""
    key = f"10.{idx // 256 + 1}.{idx % 256}.0/24"
    mon = subprocess.Popen(["ip", "-n", node.ns, "monitor", "route"], stdout=subprocess.PIPE, text=True, bufsize=1)
    seen: list[float] = []

    def read() -> None:
        # Stamped as each line arrives, on a thread of its own, so the writer's exit does not delay the stamp.
        assert mon.stdout is not None
        for line in mon.stdout:
            if line.startswith(key + " ") and not seen:
                seen.append(time.time())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        time.sleep(0.05)  # subscribed before the write
        out = netns.ns_exec(
            tb.etcd_ns, [sys.executable, str(HERE / "_leasegen.py"), tb.endpoint, tb.prefix, str(idx), "1"], timeout=30
        )
        written = float(out.split()[1])
        deadline = time.monotonic() + 30
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        if not seen:
            raise RuntimeError(f"route {key} never announced")
        return (seen[0] - written) * 1000
    finally:
        mon.kill()
        mon.wait()
        reader.join(timeout=5)


def compile_tree(tree: Path) -> None:
    """Bytecode for the tree, as an installed agent has it (pip compiles at install): where
    PYTHONDONTWRITEBYTECODE is set, each start would compile every module from source (~85 ms)."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j0", str(tree / "pyflannel")], check=True)


def start_agent(tb: Testbed, node: Node, tree: Path) -> None:
    """The agent of `tree`: -P keeps the working directory out of sys.path, so PYTHONPATH alone says which."""
    cmd = tb.agent_cmd(node)
    at = cmd.index(sys.executable)
    cmd[at + 1 : at + 1] = ["-P"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(tree)}
    node.proc = tb.scope.spawn(node.ns, cmd, log=node.log_file, env=env)


def cpu_s(node: Node) -> float:
    """The agent's CPU time so far (user + system, the kernel's work on its requests included): on a shared
    machine it moves far less with the load than the wall-clock figures."""
    assert node.proc is not None
    fields = Path(f"/proc/{node.proc.pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cold_start(tb: Testbed, node: Node, tree: Path, want: int) -> tuple[float, float, float]:
    """(seconds from the agent's start to every entry in, its CPU seconds and RSS then) with no vxlan device to
    begin with."""
    tb.stop_agent(node)
    netns.run(["ip", "-n", node.ns, "link", "del", "flannel.1"], check=False)
    start_agent(tb, node, tree)
    took = wait_counts(node.ns, want, 120)
    return took, cpu_s(node), rss_mb(node)


def cold_interleaved(n: int, trees: list[Path], repeats: int) -> dict[Path, list[tuple[float, float, float]]]:
    """The cold path `repeats` times per tree, alternating trees (and their order each round) on one etcd."""
    out: dict[Path, list[tuple[float, float, float]]] = {t: [] for t in trees}
    with netns.RunScope(tag=f"benchc{n}") as scope:
        tb = Testbed(scope)
        tb.start_etcd()
        tb.put_config({"Network": "10.0.0.0/8", "SubnetLen": 24, "Backend": {"Type": "vxlan"}})
        gen(tb, 0, n)
        node = tb.add_node("n1")
        for tree in trees:  # unmeasured: the first start takes a new lease, every later one reuses it
            cold_start(tb, node, tree, n)
        for k in range(repeats):
            for tree in trees if k % 2 == 0 else trees[::-1]:
                out[tree].append(cold_start(tb, node, tree, n))
        tb.stop_agent(node)
    return out


def run_one(n: int) -> dict[str, float]:
    with netns.RunScope(tag=f"bench{n}") as scope:
        tb = Testbed(scope)
        tb.start_etcd()
        tb.put_config({"Network": "10.0.0.0/8", "SubnetLen": 24, "Backend": {"Type": "vxlan"}})
        node = tb.add_node("n1")  # default --reconcile-interval (30 s backstop; repairs are event-driven)
        tb.start_agent(node)
        tb.wait_ready(node)
        time.sleep(1)
        # Watch path: the agent is synced with no peers, then N leases arrive.
        sent = gen(tb, 0, n)
        write_s = time.time() - sent
        watch_s = wait_counts(node.ns, n, 120) + write_s
        rss = rss_mb(node)
        # One more peer once synced, timed from the write's return to the route's announcement by the kernel
        # (read from `ip monitor`, which prints each notification at once): polling `ip route show` would add
        # its own few milliseconds per look.
        singles = [one_peer(tb, node, n + k) for k in range(ONE_PEER_SAMPLES)]
        # Cold path: restart the agent with every lease already in etcd and no device in the kernel.
        tb.stop_agent(node)
        netns.run(["ip", "-n", node.ns, "link", "del", "flannel.1"])
        tb.start_agent(node)
        cold_s = wait_counts(node.ns, n + ONE_PEER_SAMPLES, 120)
        rss_cold = rss_mb(node)
        tb.stop_agent(node)
        return {
            "peers": n,
            "watch_sync_s": round(watch_s, 2),
            "lease_write_s": round(write_s, 2),
            "cold_sync_s": round(cold_s, 2),
            "one_peer_ms": round(statistics.median(singles), 2),
            "one_peer_ms_p95": round(pct(singles, 95), 2),
            "rss_mb": round(max(rss, rss_cold), 1),
        }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", action="append", default=[], help="a checkout to compare with (repeatable)")
    ap.add_argument("--cold-repeats", type=int, default=0, help="interleaved cold starts per tree (0: none)")
    ap.add_argument("--cold-only", action="store_true", help="only the interleaved cold starts")
    ap.add_argument("sizes", nargs="*", type=int, default=[1000, 5000])
    args = ap.parse_args()
    trees = [REPO, *(Path(b).resolve() for b in args.base)]
    netns.sweep(netns.STEM_TEST)
    for tree in trees:
        compile_tree(tree)
    for n in args.sizes:
        if not args.cold_only:
            res = run_one(n)
            print(" ".join(f"{k}={v}" for k, v in res.items()), flush=True)
        if args.cold_repeats:
            runs = cold_interleaved(n, trees, args.cold_repeats)
            ours = statistics.median(t for t, _, _ in runs[REPO])
            ours_cpu = statistics.median(c for _, c, _ in runs[REPO])
            for tree, samples in runs.items():
                med = statistics.median(t for t, _, _ in samples)
                cpu = statistics.median(c for _, c, _ in samples)
                name = "this tree" if tree == REPO else f"base {tree}"
                ratio = "" if tree == REPO else f" this_tree/base={ours / med:.3f} cpu_ratio={ours_cpu / cpu:.3f}"
                print(
                    f"{name:24} peers={n} cold_sync_s_median={med:.3f} cpu_s_median={cpu:.3f} "
                    f"runs={','.join(f'{t:.3f}' for t, _, _ in samples)} "
                    f"rss_mb_max={max(r for _, _, r in samples):.1f}" + ratio,
                    flush=True,
                )


if __name__ == "__main__":
    main()
