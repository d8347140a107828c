"""Subnet allocation, free of any store: which lease to reuse and which subnet to take.

Mirrors upstream flannel's order (subnet/etcd/local_manager.go tryAcquireLease/allocateSubnet): reuse the
lease carrying our public IP if it still fits the config, else the previous subnet.env subnet if free, else a
random pick among the first 100 free subnets of SubnetMin..SubnetMax.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from ..config import NetConfig
from ..lease import Lease, LeaseAttrs
from ..subnetenv import SubnetEnv
from .base import SubnetExhaustedError

# Upstream draws from the first 100 free subnets only: enough spread to make two racing nodes unlikely to
# collide, without walking a huge IPv6 range.
BAG_SIZE = 100


@dataclass(frozen=True)
class Taken:
    """Subnets held by a key in the store, including keys whose value is garbage (still not ours to take)."""

    subnet: IPv4Network | None
    ipv6_subnet: IPv6Network | None


def _overlaps(sn: IPv4Network | IPv6Network, taken: Sequence[IPv4Network | IPv6Network]) -> bool:
    return any(sn.overlaps(t) for t in taken)


def _walk(first: int, last: int, bits: int, plen: int, taken: Iterable[tuple[int, int]], limit: int) -> list[int]:
    """Network addresses of the first `limit` free subnets of length `plen` in [first, last].

    `taken` holds (network address, prefix length) pairs of any length. Same-length ones are looked up in a
    set; a taken subnet of another length makes the walk jump past it, so the cost is bounded by
    limit + number of taken subnets however large the range is (IPv6 ranges can hold 2**64 subnets).
    """
    step = 1 << (bits - plen)
    exact: set[int] = set()
    other: list[tuple[int, int]] = []
    for addr, tlen in taken:
        if tlen == plen:
            exact.add(addr)
        else:
            size = 1 << (bits - tlen)
            other.append((addr - addr % size, addr - addr % size + size - 1))
    other.sort()
    out: list[int] = []
    cur = first
    while cur <= last and len(out) < limit:
        end = cur + step - 1
        blocker = next((hi for lo, hi in other if lo <= end and cur <= hi), None)
        if blocker is not None:
            # Jump to the first aligned subnet after the overlapping one.
            cur = (blocker // step + 1) * step
            continue
        if cur not in exact:
            out.append(cur)
        cur += step
    return out


def free_subnets4(cfg: NetConfig, taken: Iterable[IPv4Network], limit: int = BAG_SIZE) -> list[IPv4Network]:
    """The first `limit` subnets between SubnetMin and SubnetMax that overlap no taken subnet."""
    if not cfg.enable_ipv4 or cfg.subnet_min is None or cfg.subnet_max is None:
        return []
    found = _walk(
        int(cfg.subnet_min),
        int(cfg.subnet_max),
        32,
        cfg.subnet_len,
        ((int(n.network_address), n.prefixlen) for n in taken),
        limit,
    )
    return [IPv4Network((IPv4Address(a), cfg.subnet_len)) for a in found]


def free_subnets6(cfg: NetConfig, taken: Iterable[IPv6Network], limit: int = BAG_SIZE) -> list[IPv6Network]:
    if not cfg.enable_ipv6 or cfg.ipv6_subnet_min is None or cfg.ipv6_subnet_max is None:
        return []
    found = _walk(
        int(cfg.ipv6_subnet_min),
        int(cfg.ipv6_subnet_max),
        128,
        cfg.ipv6_subnet_len,
        ((int(n.network_address), n.prefixlen) for n in taken),
        limit,
    )
    return [IPv6Network((IPv6Address(a), cfg.ipv6_subnet_len)) for a in found]


def _matches_ours(cfg: NetConfig, mine: LeaseAttrs, theirs: LeaseAttrs) -> bool:
    checked = False
    if cfg.enable_ipv4 and mine.public_ip is not None:
        if theirs.public_ip != mine.public_ip:
            return False
        checked = True
    if cfg.enable_ipv6 and mine.public_ipv6 is not None:
        if theirs.public_ipv6 != mine.public_ipv6:
            return False
        checked = True
    return checked


def lease_fits(cfg: NetConfig, lease: Lease) -> bool:
    return cfg.subnet_fits(lease.subnet) and cfg.ipv6_subnet_fits(lease.ipv6_subnet)


def find_own_leases(cfg: NetConfig, attrs: LeaseAttrs, leases: Iterable[Lease]) -> tuple[Lease | None, list[Lease]]:
    """Our reusable lease (a reservation wins over a TTL lease) and our leases that no longer fit the config.

    Several leases can carry our IP after a config change or a hand-made reservation; the others are returned
    so that the caller can delete them as upstream does (reservations excepted: those belong to the admin).
    """
    fitting: list[Lease] = []
    stale: list[Lease] = []
    for lease in leases:
        if not _matches_ours(cfg, attrs, lease.attrs):
            continue
        (fitting if lease_fits(cfg, lease) else stale).append(lease)
    fitting.sort(key=lambda le: (not le.is_reservation, le.key))
    return (fitting[0] if fitting else None), stale


def pick_subnets(
    cfg: NetConfig,
    taken: Iterable[Taken],
    prev: SubnetEnv | None,
    rng: random.Random | None = None,
) -> tuple[IPv4Network | None, IPv6Network | None]:
    """A (v4, v6) pair for a new lease: the previous subnet.env halves when free and fitting, else random picks.

    Raises SubnetExhaustedError when either enabled family has no free subnet left.
    """
    rng = rng or random.Random()
    held = list(taken)
    taken4 = [t.subnet for t in held if t.subnet is not None]
    taken6 = [t.ipv6_subnet for t in held if t.ipv6_subnet is not None]

    sn: IPv4Network | None = None
    sn6: IPv6Network | None = None
    if prev is not None:
        p4, p6 = prev.subnet, prev.ipv6_subnet
        if cfg.enable_ipv4 and p4 is not None and cfg.subnet_fits(p4) and not _overlaps(p4, taken4):
            sn = p4
        if cfg.enable_ipv6 and p6 is not None and cfg.ipv6_subnet_fits(p6) and not _overlaps(p6, taken6):
            sn6 = p6

    if cfg.enable_ipv4 and sn is None:
        bag = free_subnets4(cfg, taken4)
        if not bag:
            raise SubnetExhaustedError(
                f"no free subnets between SubnetMin and SubnetMax of Network {cfg.network} "
                f"({cfg.subnet_min} .. {cfg.subnet_max}, SubnetLen {cfg.subnet_len})"
            )
        sn = rng.choice(bag)
    if cfg.enable_ipv6 and sn6 is None:
        bag6 = free_subnets6(cfg, taken6)
        if not bag6:
            raise SubnetExhaustedError(
                f"no free subnets between IPv6SubnetMin and IPv6SubnetMax of IPv6Network {cfg.ipv6_network} "
                f"({cfg.ipv6_subnet_min} .. {cfg.ipv6_subnet_max}, IPv6SubnetLen {cfg.ipv6_subnet_len})"
            )
        sn6 = rng.choice(bag6)
    return sn, sn6
