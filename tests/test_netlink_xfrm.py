"""The xfrm policy codec (pure), and policies added, read back and deleted through it in a namespace of this run
(this host's kernel has xfrm, so policies work here though it has no esp4 for SAs); `ip xfrm policy` (iproute2, not
our code) is the judge."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv4Network, ip_address, ip_network

import pytest
from clusters import py_in
from needs import need

from pyflannel.lab.netns import RunScope, ns_exec
from pyflannel.netlink.codec import HDR, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST
from pyflannel.netlink.xfrm import (
    POLICY_ID,
    POLICY_INFO,
    TMPL,
    XFRM_MSG_DELPOLICY,
    XFRM_MSG_GETPOLICY,
    XFRM_MSG_UPDPOLICY,
    XFRM_POLICY_FWD,
    XFRM_POLICY_IN,
    XFRM_POLICY_OUT,
    XfrmPolicy,
    XfrmTmpl,
    decode_policy,
    encode_policy_delete,
    encode_policy_dump,
    encode_policy_update,
    tunnel_policies,
)

OWN, PEER = IPv4Network("10.244.1.0/24"), IPv4Network("10.244.2.0/24")
A, B = IPv4Address("192.168.77.11"), IPv4Address("192.168.77.12")


def test_struct_sizes_are_the_kernels() -> None:
    # linux/xfrm.h on x86_64: xfrm_userpolicy_info 168, xfrm_userpolicy_id 64, xfrm_user_tmpl 64.
    assert (POLICY_INFO.size, POLICY_ID.size, TMPL.size) == (168, 64, 64)


def test_tunnel_policies_are_upstreams() -> None:
    out, inn, fwd = tunnel_policies(OWN, PEER, A, B, 11)
    assert (out.src, out.dst, out.dir, out.tmpls) == (OWN, PEER, XFRM_POLICY_OUT, (XfrmTmpl(A, B, 11),))
    assert (inn.src, inn.dst, inn.dir, inn.tmpls) == (PEER, OWN, XFRM_POLICY_IN, (XfrmTmpl(B, A, 11),))
    assert (fwd.src, fwd.dst, fwd.dir, fwd.tmpls) == (PEER, OWN, XFRM_POLICY_FWD, (XfrmTmpl(B, A, 11),))
    assert str(out) == (
        "src 10.244.1.0/24 dst 10.244.2.0/24 dir out priority 0 "
        "tmpl src 192.168.77.11 dst 192.168.77.12 proto esp reqid 11 mode tunnel"
    )


@pytest.mark.parametrize("p", tunnel_policies(OWN, PEER, A, B, 11))
def test_update_round_trips_through_the_decoder(p: XfrmPolicy) -> None:
    msg = encode_policy_update(7, p)
    n, kind, flags, seq, _ = HDR.unpack_from(msg)
    assert (n, kind, flags, seq) == (len(msg), XFRM_MSG_UPDPOLICY, NLM_F_REQUEST | NLM_F_ACK, 7)
    # A NEWPOLICY reply has the request's layout: the decoder reads back what was sent.
    assert decode_policy(msg, 16, len(msg)) == p


def test_selector_layout() -> None:
    msg = encode_policy_update(1, tunnel_policies(OWN, PEER, A, B, 11)[0])
    sel = msg[16 : 16 + 56]
    assert sel[0:4] == PEER.network_address.packed and sel[16:20] == OWN.network_address.packed
    family, plen_d, plen_s = struct.unpack_from("=HBB", sel, 40)
    assert (family, plen_d, plen_s) == (2, 24, 24)


def test_delete_and_dump_requests() -> None:
    msg = encode_policy_delete(3, OWN, PEER, XFRM_POLICY_OUT)
    n, kind, flags, _seq, _ = HDR.unpack_from(msg)
    assert (n, kind, flags) == (16 + POLICY_ID.size, XFRM_MSG_DELPOLICY, NLM_F_REQUEST | NLM_F_ACK)
    assert msg[16 + 56 + 4] == XFRM_POLICY_OUT
    d = encode_policy_dump(4)
    assert HDR.unpack_from(d)[1:3] == (XFRM_MSG_GETPOLICY, NLM_F_REQUEST | NLM_F_DUMP)


def test_garbage_is_not_a_policy() -> None:
    assert decode_policy(b"\0" * 10, 0, 10) is None
    assert decode_policy(b"\0" * 200, 0, 200) is None  # family 0


def test_mixed_versions_are_refused() -> None:
    with pytest.raises(ValueError):
        encode_policy_update(1, XfrmPolicy(OWN, ip_network("fd00::/64"), XFRM_POLICY_OUT))


_SCRIPT = """
import asyncio, ipaddress as I, json, sys
from pyflannel.netlink import Netlink
from pyflannel.netlink.xfrm import Xfrm, tunnel_policies
async def main():
    nl = Netlink(); x = Xfrm(nl)
    ps = tunnel_policies(I.ip_network("10.244.1.0/24"), I.ip_network("10.244.2.0/24"),
                         I.ip_address("192.168.77.11"), I.ip_address("192.168.77.12"), 11)
    step = sys.argv[1]
    if step == "add":
        print(json.dumps([str(e) for e in await x.apply(ps)] + [str(e) for e in await x.apply(ps)]))
    elif step == "dump":
        print(json.dumps(sorted(str(p) for p in await x.policies())))
    else:
        print(json.dumps([str(e) for e in await x.apply(delete=ps + ps)]))
    await x.close(); await nl.close()
asyncio.run(main())
"""


def test_policies_added_read_back_and_deleted_in_a_namespace(scope: RunScope) -> None:
    import json

    need(tools=("ip",))
    ns = scope.add_ns("xfrm")
    assert json.loads(py_in(ns, _SCRIPT, "add")) == []  # an update twice is no error: idempotent
    text = ns_exec(ns, ["ip", "xfrm", "policy"])
    for want in (
        "src 10.244.1.0/24 dst 10.244.2.0/24 \n\tdir out priority 0 ptype main \n\ttmpl src 192.168.77.11 dst "
        "192.168.77.12\n\t\tproto esp reqid 11 mode tunnel",
        "src 10.244.2.0/24 dst 10.244.1.0/24 \n\tdir in priority 0 ptype main \n\ttmpl src 192.168.77.12 dst "
        "192.168.77.11\n\t\tproto esp reqid 11 mode tunnel",
        "src 10.244.2.0/24 dst 10.244.1.0/24 \n\tdir fwd priority 0 ptype main \n\ttmpl src 192.168.77.12 dst "
        "192.168.77.11\n\t\tproto esp reqid 11 mode tunnel",
    ):
        assert want in text, text
    assert text.count("src 10.244.") == 3
    dumped = json.loads(py_in(ns, _SCRIPT, "dump"))
    assert dumped == sorted(str(p) for p in tunnel_policies(OWN, PEER, A, B, 11))
    # A policy deleted by `ip` is gone from the dump too.
    ns_exec(ns, ["ip", "xfrm", "policy", "delete", "src", "10.244.1.0/24", "dst", "10.244.2.0/24", "dir", "out"])
    assert len(json.loads(py_in(ns, _SCRIPT, "dump"))) == 2
    # Deleting (twice, so some are absent) is no error; nothing is left.
    assert json.loads(py_in(ns, _SCRIPT, "del")) == []
    assert ns_exec(ns, ["ip", "xfrm", "policy"]).strip() == ""
    assert ip_address("192.168.77.11") == A
