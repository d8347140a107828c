"""Convergence in kube mode: one real flanneld (vxlan) on the fake API server, N-1 peer Nodes already there.

Figures printed for N in (100, 1000) by default, for each tree given (the working tree, and with --base a
checkout of another commit, run interleaved in the same run so that the ratio means something):
  sync_s       agent start -> every route, neighbour and FDB entry of the N-1 peers in the kernel
  one_peer_ms  a new annotated Node created (the API call returned) -> its route in the kernel, timed with a
               netlink monitor (`ip monitor route`), not by polling; median and p95 of --singles
  rss_mb       the agent's resident memory once synced (and after the single peers)
Not a test: nothing here asserts.

usage: sudo .venv/bin/python bench/bench_convergence_kube.py [--base /tmp/pfbase-kube ...] [--singles 9] [N ...]
  (git worktree add /tmp/pfbase-kube 1f5a541: the tree before the kubernetes_asyncio client was replaced)
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pyflannel.lab import netns
from pyflannel.lab.fakekube import KubeAdmin
from pyflannel.lab.testbed import Node, Testbed

REPO = Path(__file__).resolve().parent.parent
P = "flannel.alpha.coreos.com/"
NET_CONF = {"Network": "10.0.0.0/8", "Backend": {"Type": "vxlan"}}


def cidr(idx: int) -> str:
    return f"10.{idx // 256 + 1}.{idx % 256}.0/24"


def peer(idx: int) -> tuple[dict[str, str], str]:
    """A flannel Node's annotations as a running peer leaves them, and its InternalIP."""
    ip = f"172.16.{idx // 250}.{idx % 250 + 1}"
    mac = f"aa:bb:cc:{idx >> 16 & 255:02x}:{idx >> 8 & 255:02x}:{idx & 255:02x}"
    ann = {
        P + "kube-subnet-manager": "true", P + "backend-type": "vxlan", P + "public-ip": ip,
        P + "backend-data": json.dumps({"VNI": 1, "VtepMAC": mac}, separators=(",", ":")),
        "node.alpha.kubernetes.io/ttl": "0", "volumes.kubernetes.io/controller-managed-attach-detach": "true",
    }  # fmt: skip
    return ann, ip


def counts(ns: str) -> tuple[int, int, int]:
    r = netns.run(["ip", "-n", ns, "route", "show", "dev", "flannel.1"], check=False).count("\n")
    n = netns.run(["ip", "-n", ns, "neigh", "show", "dev", "flannel.1"], check=False).count("PERMANENT")
    f = netns.run(["bridge", "-n", ns, "fdb", "show", "dev", "flannel.1"], check=False).count(" dst ")
    return r, n, f


def rss_mb(node: Node) -> float:
    assert node.proc is not None
    for line in Path(f"/proc/{node.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class RouteMonitor:
    """`ip -n NS monitor route`, each line stamped with the time it was read."""

    def __init__(self, ns: str) -> None:
        self.proc = subprocess.Popen(["ip", "-n", ns, "monitor", "route"], stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put((time.time(), line))

    def wait_for(self, text: str, timeout: float = 30) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                when, line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line.startswith(text) and not line.startswith("Deleted"):
                return when
        raise RuntimeError(f"no route {text} within {timeout}s")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def run_one(tree: Path, n: int, singles: int) -> dict[str, float]:
    with netns.RunScope(tag=f"kbench{n}") as scope:
        tb = Testbed(scope)
        api = tb.add_node("kapi")  # a host on the underlay for the API server, not a flannel node
        del tb.nodes["kapi"]
        sock = str(scope.tmpdir / "kube.sock")
        fake = [sys.executable, "-m", "pyflannel.lab.fakekube", "--listen", f"{api.ip}:6443", "--unix", sock,
                "--history", str(n + singles + 100)]  # fmt: skip
        scope.spawn(api.ns, fake, log=scope.tmpdir / "fakekube.log", env={**os.environ, "PYTHONPATH": str(REPO)})
        if not netns.wait_for(lambda: os.path.exists(sock), 10):
            raise RuntimeError("fake API server did not start")
        kube = KubeAdmin(unix_path=sock)
        node = tb.add_node("n1")
        kube.create_node("n1", [cidr(0)], internal_ip=node.ip)
        for i in range(1, n):
            ann, ip = peer(i)
            kube.create_node(f"p{i}", [cidr(i)], ann, ip)
        net_conf = scope.tmpdir / "net-conf.json"
        net_conf.write_text(json.dumps(NET_CONF))
        # -P: no cwd in sys.path, so that PYTHONPATH alone says which tree runs.
        cmd = [sys.executable, "-P", "-m", "pyflannel.cli", "--kube-subnet-mgr", f"--kube-api-url=http://{api.ip}:6443",
               f"--net-config-path={net_conf}", f"--subnet-file={node.subnet_file}", f"--iface={node.ip}"]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "NODE_NAME": "n1", "PYTHONPATH": str(tree)}
        t0 = time.monotonic()
        node.proc = scope.spawn(node.ns, cmd, log=node.log_file, env=env)
        while min(counts(node.ns)) < n - 1:
            if node.proc.poll() is not None:
                raise RuntimeError(f"agent exited: {node.log_file.read_text()[-2000:]}")
            if time.monotonic() - t0 > 180:
                raise RuntimeError(f"not converged: {counts(node.ns)} of {n - 1}")
            time.sleep(0.02)
        sync_s = time.monotonic() - t0
        time.sleep(1)  # settle: the figure is the steady state, not the tail of the sync
        rss = rss_mb(node)
        mon = RouteMonitor(node.ns)
        try:
            time.sleep(0.3)
            lat = []
            for k in range(singles):
                idx = n + k
                ann, ip = peer(idx)
                kube.create_node(f"p{idx}", [cidr(idx)], ann, ip)
                sent = time.time()
                lat.append((mon.wait_for(cidr(idx)) - sent) * 1000)
                time.sleep(0.1)
        finally:
            mon.stop()
        rss_after = rss_mb(node)
        tb.stop_agent(node)
        lat.sort()
        return {
            "nodes": n,
            "sync_s": round(sync_s, 2),
            "one_peer_ms_median": round(statistics.median(lat), 1),
            "one_peer_ms_p95": round(lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))], 1),
            "rss_mb": round(rss, 1),
            "rss_mb_after_singles": round(rss_after, 1),
        }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--base",
        action="append",
        default=[],
        help="a checkout to compare with (repeatable; run interleaved with this tree)",
    )
    ap.add_argument("--singles", type=int, default=9)
    ap.add_argument("sizes", nargs="*", type=int, default=[100, 1000])
    args = ap.parse_args()
    trees = [("this tree", REPO)] + [("base " + b, Path(b)) for b in args.base]
    netns.sweep(netns.STEM_TEST)
    for n in args.sizes:
        for name, tree in trees:
            res = run_one(tree, n, args.singles)
            print(f"{name:28} " + " ".join(f"{k}={v}" for k, v in res.items()), flush=True)


if __name__ == "__main__":
    main()
