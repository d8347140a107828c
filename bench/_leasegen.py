"""Writes N synthetic vxlan peer leases to etcd quickly (run inside the etcd namespace by the benchmarks).

usage: python _leasegen.py ENDPOINT PREFIX FIRST COUNT [TTL]
Prints the time the first write was sent, then the time the last one returned.
Lease i gets subnet 10.{i//256+1}.{i%256}.0/24, PublicIP 172.16.{i//256}.{i%256+1 capped}, a distinct VtepMAC.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from etcd3aio import Etcd3Client
from etcd3aio.kv import KVService


def lease_for(i: int) -> tuple[str, str]:
    key = f"10.{i // 256 + 1}.{i % 256}.0-24"
    pub = f"172.16.{i // 250}.{i % 250 + 1}"
    mac = f"0a:00:00:{(i >> 16) & 0xFF:02x}:{(i >> 8) & 0xFF:02x}:{i & 0xFF:02x}"
    value = {"PublicIP": pub, "PublicIPv6": None, "BackendType": "vxlan", "BackendData": {"VNI": 1, "VtepMAC": mac}}
    return key, json.dumps(value, separators=(",", ":"))


async def main() -> None:
    endpoint, prefix, first, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    ttl = int(sys.argv[5]) if len(sys.argv) > 5 else 3600
    async with Etcd3Client([endpoint.removeprefix("http://")]) as c:
        assert c.kv is not None and c.lease is not None
        grant = await c.lease.grant(ttl)
        ops = []
        for i in range(first, first + count):
            key, value = lease_for(i)
            ops.append(KVService.txn_op_put(f"{prefix}/subnets/{key}", value, lease=grant.ID))
        # The time the first write was sent, so a caller can time propagation without our start-up cost.
        print(f"{time.time():.6f}", flush=True)
        # etcd 3.4 allows 128 operations per transaction by default.
        for j in range(0, len(ops), 128):
            await c.kv.txn([], ops[j : j + 128])
        # And the time the last write returned: one-peer latency counts from there, as a user's write would.
        print(f"{time.time():.6f}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
