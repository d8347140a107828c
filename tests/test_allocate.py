"""Pure allocation logic: upstream's acquire order and the free-subnet walk, no etcd."""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from pyflannel.config import parse_net_config
from pyflannel.lease import Lease, LeaseAttrs
from pyflannel.store.allocate import Taken, find_own_leases, free_subnets4, free_subnets6, pick_subnets
from pyflannel.store.base import SubnetExhaustedError
from pyflannel.subnetenv import SubnetEnv

CFG = parse_net_config('{"Network":"10.5.0.0/16"}')
DUAL = parse_net_config('{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:5::/56"}')
SMALL = parse_net_config('{"Network":"10.9.0.0/28"}')
ME = LeaseAttrs(public_ip=IPv4Address("192.0.2.1"))
OTHER = LeaseAttrs(public_ip=IPv4Address("192.0.2.2"))


def n4(s: str) -> IPv4Network:
    return IPv4Network(s)


def test_free_walk_skips_taken_and_first_subnet() -> None:
    free = free_subnets4(CFG, [n4("10.5.1.0/24"), n4("10.5.3.0/24")], limit=3)
    assert free == [n4("10.5.2.0/24"), n4("10.5.4.0/24"), n4("10.5.5.0/24")]


def test_free_walk_limit_is_100() -> None:
    assert len(free_subnets4(CFG, [])) == 100


def test_free_walk_respects_overlap_of_other_lengths() -> None:
    # A /20 taken by someone with another SubnetLen covers 10.5.0.0-10.5.15.255.
    free = free_subnets4(CFG, [n4("10.5.0.0/20")], limit=1)
    assert free == [n4("10.5.16.0/24")]
    # A /26 inside a /24 candidate blocks that whole /24.
    assert free_subnets4(CFG, [n4("10.5.1.64/26")], limit=1) == [n4("10.5.2.0/24")]


def test_free_walk_ipv6_huge_range_is_bounded() -> None:
    big = parse_net_config('{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/16"}')
    # fd00::/16 with /64 subnets holds 2**48 candidates; a /20 taken must be jumped over, not walked.
    free = free_subnets6(big, [IPv6Network("fd00::/20")], limit=2)
    assert free == [IPv6Network("fd00:1000::/64"), IPv6Network("fd00:1000:0:1::/64")]


def test_exhaustion_small_network() -> None:
    assert SMALL.subnet_len == 30
    taken = [Taken(n4("10.9.0.4/30"), None), Taken(n4("10.9.0.8/30"), None)]
    sn, _ = pick_subnets(SMALL, taken, None)
    assert sn == n4("10.9.0.12/30")
    taken.append(Taken(n4("10.9.0.12/30"), None))
    with pytest.raises(SubnetExhaustedError, match="no free subnets between SubnetMin and SubnetMax of Network"):
        pick_subnets(SMALL, taken, None)


def test_prev_subnet_used_when_free_and_fitting() -> None:
    prev = SubnetEnv(subnet=n4("10.5.77.0/24"))
    assert pick_subnets(CFG, [], prev) == (n4("10.5.77.0/24"), None)
    # Taken by someone else: a random free one instead.
    sn, _ = pick_subnets(CFG, [Taken(n4("10.5.77.0/24"), None)], prev)
    assert sn != n4("10.5.77.0/24")
    # From another Network: ignored.
    sn, _ = pick_subnets(CFG, [], SubnetEnv(subnet=n4("10.6.1.0/24")))
    assert sn is not None and sn.subnet_of(n4("10.5.0.0/16"))
    # The Network's first subnet is below SubnetMin: ignored.
    sn, _ = pick_subnets(CFG, [], SubnetEnv(subnet=n4("10.5.0.0/24")))
    assert sn != n4("10.5.0.0/24")


def test_random_pick_among_first_100() -> None:
    seen = {pick_subnets(CFG, [], None, random.Random(i))[0] for i in range(300)}
    allowed = set(free_subnets4(CFG, []))
    assert seen <= allowed
    assert len(seen) > 50  # really random, not always the first


def test_dual_stack_pairs_v4_and_v6() -> None:
    taken = [Taken(n4("10.5.1.0/24"), IPv6Network("fd00:5:0:1::/64"))]
    sn, sn6 = pick_subnets(DUAL, taken, None)
    assert sn is not None and sn6 is not None
    assert DUAL.subnet_fits(sn) and DUAL.ipv6_subnet_fits(sn6)
    assert sn != n4("10.5.1.0/24") and sn6 != IPv6Network("fd00:5:0:1::/64")
    prev = SubnetEnv(subnet=n4("10.5.9.0/24"), ipv6_subnet=IPv6Network("fd00:5:0:9::/64"))
    assert pick_subnets(DUAL, taken, prev) == (n4("10.5.9.0/24"), IPv6Network("fd00:5:0:9::/64"))
    v6full = parse_net_config('{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:5::/62"}')
    taken6 = [Taken(None, IPv6Network(f"fd00:5:0:{i}::/64")) for i in range(1, 4)]
    with pytest.raises(SubnetExhaustedError, match="IPv6SubnetMin"):
        pick_subnets(v6full, taken6, None)


def test_find_own_prefers_fitting_and_reservation() -> None:
    mine_old = Lease(n4("10.4.3.0/24"), None, ME, expiration=1.0)  # another Network: stale
    mine = Lease(n4("10.5.3.0/24"), None, ME, expiration=1.0)
    mine_res = Lease(n4("10.5.8.0/24"), None, ME, expiration=None)
    other = Lease(n4("10.5.4.0/24"), None, OTHER, expiration=1.0)
    own, stale = find_own_leases(CFG, ME, [mine_old, other, mine, mine_res])
    assert own == mine_res
    assert stale == [mine_old]
    own, _ = find_own_leases(CFG, ME, [other, mine])
    assert own == mine
    assert find_own_leases(CFG, ME, [other]) == (None, [])


def test_find_own_dual_stack_needs_both_ips() -> None:
    me6 = LeaseAttrs(public_ip=IPv4Address("192.0.2.1"), public_ipv6=IPv6Address("2001:db8::1"))
    l6 = Lease(n4("10.5.3.0/24"), IPv6Network("fd00:5:0:3::/64"), me6, expiration=1.0)
    wrong6 = LeaseAttrs(public_ip=IPv4Address("192.0.2.1"), public_ipv6=IPv6Address("2001:db8::2"))
    assert find_own_leases(DUAL, me6, [l6])[0] == l6
    assert find_own_leases(DUAL, wrong6, [l6])[0] is None
    # A v4-only lease does not fit a dual-stack config.
    l4 = Lease(n4("10.5.3.0/24"), None, me6, expiration=1.0)
    assert find_own_leases(DUAL, me6, [l4]) == (None, [l4])


def test_find_own_ipv6_only_goes_by_public_ipv6_not_the_shared_0000() -> None:
    """Every IPv6-only lease says PublicIP 0.0.0.0 (upstream v0.20.2 matched on it, so a node took a peer's lease
    as its own): ours is the one with our PublicIPv6, whatever the IPv4 half says."""
    v6only = parse_net_config('{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:5::/56"}')
    a, b = (
        LeaseAttrs.from_json(f'{{"PublicIP":"0.0.0.0","PublicIPv6":"fd77:77::{n}","BackendType":"vxlan"}}')
        for n in (11, 12)
    )
    la = Lease(None, IPv6Network("fd00:5:0:3::/64"), a, expiration=1.0)
    lb = Lease(None, IPv6Network("fd00:5:0:4::/64"), b, expiration=1.0)
    assert la.key == "0.0.0.0-0&fd00:5:0:3::-64"
    me = LeaseAttrs(public_ipv6=IPv6Address("fd77:77::12"))
    assert find_own_leases(v6only, me, [la, lb]) == (lb, [])
    assert find_own_leases(v6only, LeaseAttrs(public_ipv6=IPv6Address("fd77:77::13")), [la, lb]) == (None, [])
    # Nor does an IPv4 address we happen to have make any IPv6-only lease ours.
    assert find_own_leases(v6only, LeaseAttrs(public_ip=IPv4Address("0.0.0.0")), [la, lb]) == (None, [])
