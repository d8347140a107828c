"""Where the agent's memory goes: resident memory by import, and bytes per peer by data structure.

Two tables, each from fresh interpreters of this run (no daemon, no kernel needed):
  by import   the RSS of a python that imports what one agent mode loads, step by step (each step in its own
              process, so every figure is that mode's whole footprint up to the step)
  by data     tracemalloc bytes per peer for N synthetic vxlan leases: decoded by the etcd store's decoder,
              held as the agent holds them (the store's and the agent's key -> Lease tables), and their kernel
              entries in the vxlan backend's OwnedEntries index
Not a test: nothing here asserts.

usage: .venv/bin/python bench/bench_memory.py [--peers 5000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What the agent does with netlink at start: link and address dumps, a link get (in this namespace; read only).
NETLINK = """import asyncio
from pyflannel.netlink import Netlink
async def _nl():
    nl = Netlink()
    await nl.links()
    await nl.addresses()
    await nl.link_by_name("lo")
    await nl.close()
asyncio.run(_nl())"""
STEPS: dict[str, list[str]] = {
    "python": [],
    "asyncio+ssl": ["import asyncio, ssl"],
    # The metrics library alone (pyflannel.daemon imports it for /metrics): the package loads its exposition side.
    "+ prometheus_client": ["import asyncio, ssl", "import prometheus_client"],
    "pyflannel.daemon": ["import pyflannel.daemon"],
    "+ netlink in use": ["import pyflannel.daemon", NETLINK],
    "+ vxlan backend": [
        "import pyflannel.daemon",
        NETLINK,
        "from pyflannel.backend.registry import backend_class; backend_class('vxlan')",
    ],
    "etcd mode (+ etcd store)": [
        "import pyflannel.daemon",
        NETLINK,
        "from pyflannel.backend.registry import backend_class; backend_class('vxlan')",
        "from pyflannel.store.registry import create_store; from pyflannel.store.options import EtcdOptions",
        "create_store(EtcdOptions())",
    ],
    "kube mode (+ kube store)": [
        "import pyflannel.daemon",
        NETLINK,
        "from pyflannel.backend.registry import backend_class; backend_class('vxlan')",
        "from pyflannel.store.registry import create_store; from pyflannel.store.options import KubeOptions",
        "create_store(KubeOptions())",
    ],
}

RSS = (
    "import resource, sys; "
    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
    "len(sys.modules), ','.join(sorted({m.partition('.')[0] for m in sys.modules})))"
)


def by_import() -> list[tuple[str, float, int]]:
    rows = []
    for name, lines in STEPS.items():
        code = "\n".join([f"import sys; sys.path.insert(0, {str(ROOT)!r})", *lines, RSS])
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
        kb, mods, _ = out.split(maxsplit=2)
        rows.append((name, int(kb) / 1024, int(mods)))
    return rows


DATA = """
import sys, time, tracemalloc
sys.path.insert(0, {root!r})
sys.path.insert(0, {bench!r})
from _leasegen import lease_for
from pyflannel.store.etcd import EtcdStore
from pyflannel.store.options import EtcdOptions
from pyflannel.backend.entries import OwnedEntries
from pyflannel.netlink import Fdb, Neigh, Route

n = {n}
store = EtcdStore(EtcdOptions())
prefix = store._subnets
raw = [(f"{{prefix}}{{k}}".encode(), v.encode()) for k, v in map(lease_for, range(n))]
now = time.time()
tracemalloc.start()
base = tracemalloc.get_traced_memory()[0]
known = {{}}
for key, value in raw:
    e = store._decode(key.decode(), value, 7, now)
    known[e.key] = e.lease
leases_b = tracemalloc.get_traced_memory()[0] - base
peers = {{lease.key: lease for lease in known.values()}}
tables_b = tracemalloc.get_traced_memory()[0] - base - leases_b
owned = OwnedEntries()
for lease in peers.values():
    sn, gw, mac = lease.subnet, lease.subnet.network_address, lease.attrs.backend_data["VtepMAC"]
    owned.program(sn, [Neigh(ifindex=5, dst=gw, lladdr=mac), Fdb(ifindex=5, lladdr=mac, dst=lease.attrs.public_ip),
                       Route(dst=sn, gateway=gw, oif=5, onlink=True)])
entries_b = tracemalloc.get_traced_memory()[0] - base - leases_b - tables_b
print(leases_b / n, tables_b / n, entries_b / n)
"""


def by_data(n: int) -> dict[str, float]:
    code = DATA.format(root=str(ROOT), bench=str(ROOT / "bench"), n=n)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    leases, tables, entries = (float(x) for x in out.split())
    return {"decoded leases": leases, "key -> lease tables": tables, "kernel entries index": entries}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers", type=int, default=5000)
    ap.add_argument("--json")
    args = ap.parse_args()
    imports = by_import()
    data = by_data(args.peers)
    print("RSS by import (each row a fresh python loading everything above it in its mode)")
    for name, mb, mods in imports:
        print(f"  {name:28s} {mb:6.1f} MB  {mods:4d} modules")
    total = sum(data.values())
    print(f"bytes per peer ({args.peers} vxlan peers, tracemalloc)")
    for name, b in data.items():
        print(f"  {name:28s} {b:7.0f} B   {b * args.peers / 2**20:6.1f} MB for {args.peers}")
    print(f"  {'total':28s} {total:7.0f} B   {total * args.peers / 2**20:6.1f} MB for {args.peers}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"imports": [{"step": s, "rss_mb": m, "modules": k} for s, m, k in imports], "per_peer": data})
        )


if __name__ == "__main__":
    main()
