"""How fast the vxlan and host-gw backends program many peers, in a throwaway namespace.

    sudo .venv/bin/python bench/bench_backend_apply.py [--peers 5000]

Goal: 5000 peers (5000 routes + 5000 neighbours + 5000 FDB entries) within 5 s of the lease snapshot,
one new peer within 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pyflannel.backend.base import ExternalInterface
from pyflannel.backend.registry import create_backend
from pyflannel.config import parse_net_config
from pyflannel.lab.netns import RunScope, run, veth
from pyflannel.lease import Lease, LeaseAttrs
from pyflannel.netlink import Netlink


def peer(i: int, btype: str, public: str) -> Lease:
    data = {"VNI": 1, "VtepMAC": f"0a:00:00:00:{i >> 8:02x}:{i & 255:02x}"} if btype == "vxlan" else None
    return Lease(
        subnet=IPv4Network(f"10.{64 + (i >> 8)}.{i & 255}.0/24"),
        ipv6_subnet=None,
        attrs=LeaseAttrs(public_ip=IPv4Address(public), backend_type=btype, backend_data=data),
        expiration=time.time() + 3600,
    )


async def bench(ns: str, btype: str, count: int) -> dict[str, float]:
    async with Netlink(netns=ns) as nl:
        eth = await nl.link_by_name("eth0")
        assert eth is not None
        me = IPv4Address("192.168.0.1")
        ext = ExternalInterface("eth0", eth.index, eth.mtu, me, None, me, None)
        cfg = parse_net_config(json.dumps({"Network": "10.0.0.0/8", "Backend": {"Type": btype}}))
        be = create_backend(cfg, ext, nl)
        attrs = await be.prepare()
        own = Lease(IPv4Network("10.1.1.0/24"), None, LeaseAttrs(me, None, btype, attrs.backend_data))
        await be.start(own)
        # host-gw needs next hops on the segment 192.168.0.0/16; vxlan peers can be anywhere.
        leases = [peer(i, btype, f"192.168.{1 + (i >> 8)}.{i & 255}") for i in range(count)]
        out: dict[str, float] = {}

        t0 = time.perf_counter()
        await be.reconcile([own, *leases])
        out["reconcile_all_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        await be.reconcile([own, *leases])
        out["reconcile_converged_s"] = time.perf_counter() - t0

        extra = [peer(count + i, btype, f"192.168.250.{i + 1}") for i in range(50)]
        lat = []
        for lease in extra:
            t0 = time.perf_counter()
            await be.add_peer(lease)
            lat.append(time.perf_counter() - t0)
        out["add_peer_median_ms"] = statistics.median(lat) * 1000
        out["add_peer_max_ms"] = max(lat) * 1000

        lat = []
        for lease in extra:
            t0 = time.perf_counter()
            await be.remove_peer(lease)
            lat.append(time.perf_counter() - t0)
        out["remove_peer_median_ms"] = statistics.median(lat) * 1000

        # Sweep: half of the peers vanish.
        t0 = time.perf_counter()
        await be.reconcile([own, *leases[: count // 2]])
        out["reconcile_sweep_half_s"] = time.perf_counter() - t0

        if btype == "vxlan":
            run(["ip", "-n", ns, "link", "del", "flannel.1"])
            t0 = time.perf_counter()
            await be.reconcile([own, *leases])
            out["reconcile_recreate_device_s"] = time.perf_counter() - t0
            dev = "flannel.1"
            n_routes = run(["ip", "-n", ns, "route", "show", "dev", dev]).count("onlink")
            n_neigh = run(["ip", "-n", ns, "neigh", "show", "dev", dev]).count("PERMANENT")
            n_fdb = run(["bridge", "-n", ns, "fdb", "show", "dev", dev]).count("self permanent")
            assert (n_routes, n_neigh, n_fdb) == (count, count, count), (n_routes, n_neigh, n_fdb)
        else:
            n_routes = run(["ip", "-n", ns, "route", "show", "dev", "eth0"]).count(" via ")
            assert n_routes == count // 2, n_routes
        return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers", type=int, default=5000)
    args = ap.parse_args()
    for btype in ("vxlan", "host-gw"):
        with RunScope(tag="bench") as scope:
            a = scope.add_ns("a")
            b = scope.add_ns("b")
            veth(a, "eth0", b, "eth0")
            run(["ip", "-n", a, "addr", "add", "192.168.0.1/16", "dev", "eth0"])
            run(["ip", "-n", a, "link", "set", "eth0", "up"])
            run(["ip", "-n", b, "link", "set", "eth0", "up"])
            res = asyncio.run(bench(a, btype, args.peers))
        print(json.dumps({"backend": btype, "peers": args.peers, **{k: round(v, 4) for k, v in res.items()}}))


if __name__ == "__main__":
    main()
