"""Faults of the agents (issue 11): an allocation race, SIGKILL while programming 5000 peers, churn with kernel
entries deleted by hand. Real etcd and real flanneld agents in namespaces; every agent runs under an address-space
limit. Figures are printed and appended to the report file (see test_faults_etcd)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_faults_etcd import converged, kernel_peers, report

from pyflannel.lab import netns
from pyflannel.lab.testbed import Node, Testbed

pytestmark = pytest.mark.integration

LEASEGEN = Path(__file__).resolve().parent.parent / "bench" / "_leasegen.py"
# Address-space cap of each agent (Python + gRPC reserve a few hundred MB of virtual memory; RSS is ~70 MB).
AGENT_AS = str(3 << 30)


def start_limited(tb: Testbed, node: Node, *extra: str) -> subprocess.Popen[bytes]:
    cmd = ["prlimit", f"--as={AGENT_AS}", "--", *tb.agent_cmd(node, *extra)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    node.proc = tb.scope.spawn(node.ns, cmd, log=node.log_file, env=env)
    return node.proc


def gen(tb: Testbed, first: int, count: int) -> None:
    netns.ns_exec(
        tb.etcd_ns, [sys.executable, str(LEASEGEN), tb.endpoint, tb.prefix, str(first), str(count)], timeout=120
    )


def test_allocation_race_20_agents_20_subnets(scope: netns.RunScope) -> None:
    tb = Testbed(scope)
    tb.start_etcd()
    nodes = [tb.add_node(f"r{i}") for i in range(1, 22)]
    # No config yet: all 20 start and wait for it, then it appears and they race for the 20 subnets.
    for n in nodes[:20]:
        start_limited(tb, n)
    waiting = netns.wait_for(lambda: all("waiting for it" in tb.log_tail(n) for n in nodes[:20]), timeout=90)
    assert waiting, [n.name for n in nodes[:20] if "waiting for it" not in tb.log_tail(n)]
    t0 = time.monotonic()
    tb.put_config(
        {
            "Network": "10.250.0.0/16",
            "SubnetLen": 24,
            "SubnetMin": "10.250.1.0",
            "SubnetMax": "10.250.20.0",
            "Backend": {"Type": "host-gw"},
        }
    )
    subnets = {n.name: str(tb.wait_ready(n, timeout=90).subnet) for n in nodes[:20]}
    all_ready_s = round(time.monotonic() - t0, 2)
    lost = sum(tb.log_tail(n, 10**6).count("another node changed the lease") for n in nodes[:20])
    assert len(set(subnets.values())) == 20, subnets
    assert len(tb.leases()) == 20
    # The 21st: the clear exhausted error, exit 1, no lease.
    last = nodes[20]
    p = start_limited(tb, last)
    rc = p.wait(timeout=60)
    log = tb.log_tail(last)
    report("allocation_race", agents=20, all_ready_s=all_ready_s, lost_races=lost, exit_21st=rc)
    assert rc == 1, log
    assert "no free subnets between SubnetMin and SubnetMax of Network 10.250.0.0/16" in log, log
    assert "Traceback" not in log, log
    assert len(tb.leases()) == 20


def test_sigkill_mid_sync_of_5000_peers_converges_exactly(scope: netns.RunScope) -> None:
    tb = Testbed(scope)
    tb.start_etcd()
    tb.put_config({"Network": "10.0.0.0/8", "SubnetLen": 24, "Backend": {"Type": "vxlan"}})
    gen(tb, 0, 5000)
    node = tb.add_node("n1")
    p = start_limited(tb, node)
    # SIGKILL as soon as programming has begun and before it is done.
    at_kill = -1
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and p.poll() is None:
        r = netns.run(["ip", "-n", node.ns, "route", "show", "dev", "flannel.1"], check=False).count("\n")
        if r > 0:
            p.kill()
            p.wait(timeout=10)
            at_kill = r
            break
        time.sleep(0.01)
    assert at_kill > 0, tb.log_tail(node)
    node.proc = None
    killed_state = [len(x) for x in kernel_peers(node.ns)]
    # While it is down: 256 leases go away (some of them probably programmed), 100 new ones come.
    tb.etcdctl("del", "--prefix", f"{tb.prefix}/subnets/10.1.")
    gen(tb, 5000, 100)
    t0 = time.monotonic()
    start_limited(tb, node)
    tb.wait_ready(node, timeout=60, since=0)
    ok = netns.wait_for(lambda: converged(tb, node), timeout=120, step=0.5)
    restart_s = round(time.monotonic() - t0, 2)
    routes, neigh, fdb = kernel_peers(node.ns)
    n_leases = len(tb.leases()) - 1  # without our own
    report(
        "sigkill_mid_sync",
        peers=5000,
        routes_at_kill=at_kill,
        kernel_after_kill=killed_state,
        leases_after=n_leases,
        kernel_after_restart=[len(routes), len(neigh), len(fdb)],
        restart_converged_s=restart_s,
    )
    assert ok, (len(routes), len(neigh), len(fdb), n_leases, tb.log_tail(node))
    # Exact: one entry of each kind per lease, no duplicates, nothing left from the removed leases.
    assert len(routes) == len(neigh) == len(fdb) == n_leases == 5000 - 256 + 100


def test_churn_with_kernel_entries_deleted_by_hand(scope: netns.RunScope) -> None:
    tb = Testbed(scope)
    tb.start_etcd()
    tb.put_config({"Network": "10.0.0.0/8", "SubnetLen": 24, "Backend": {"Type": "vxlan"}})
    node = tb.add_node("n1")
    start_limited(tb, node)
    tb.wait_ready(node)
    stop = threading.Event()
    deleted = [0]

    def vandal() -> None:
        rng = random.Random(11)
        while not stop.is_set():
            routes, neigh, fdb = kernel_peers(node.ns)
            cmds = [f"route del {r} dev flannel.1" for r in rng.sample(routes, min(10, len(routes)))]
            cmds += [f"neigh del {n} dev flannel.1" for n in rng.sample(neigh, min(10, len(neigh)))]
            if cmds:
                netns.run(["ip", "-n", node.ns, "-force", "-batch", "-"], check=False, input="\n".join(cmds) + "\n")
            fcmds = [f"fdb del {m} dev flannel.1 dst {d} self" for m, d in rng.sample(fdb, min(10, len(fdb)))]
            if fcmds:
                netns.run(
                    ["bridge", "-n", node.ns, "-force", "-batch", "-"], check=False, input="\n".join(fcmds) + "\n"
                )
            deleted[0] += len(cmds) + len(fcmds)
            time.sleep(0.05)

    th = threading.Thread(target=vandal, daemon=True)
    th.start()
    try:
        # 1000 leases come, all of them go again in two steps, 300 more come: 532 remain.
        gen(tb, 0, 1000)
        time.sleep(1.0)
        tb.etcdctl("del", f"{tb.prefix}/subnets/10.1.", f"{tb.prefix}/subnets/10.3.")
        gen(tb, 1000, 300)
        time.sleep(1.0)
        tb.etcdctl("del", f"{tb.prefix}/subnets/10.3.", f"{tb.prefix}/subnets/10.4.")
        time.sleep(2.0)
    finally:
        stop.set()
        th.join(timeout=30)
    t0 = time.monotonic()
    ok = netns.wait_for(lambda: converged(tb, node), timeout=60, step=0.2)
    settle_s = round(time.monotonic() - t0, 2)
    routes, neigh, fdb = kernel_peers(node.ns)
    n_leases = len(tb.leases()) - 1
    report(
        "churn",
        leases_added=1300,
        leases_removed=1300 - n_leases,
        entries_deleted_by_hand=deleted[0],
        settled_after_churn_s=settle_s,
        final=[len(routes), len(neigh), len(fdb)],
    )
    assert ok, (len(routes), len(neigh), len(fdb), n_leases, tb.log_tail(node))
    assert len(routes) == len(neigh) == len(fdb) == n_leases == 1300 - 768
    assert node.proc is not None and node.proc.poll() is None
