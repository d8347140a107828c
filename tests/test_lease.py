"""Lease keys and values against upstream flannel (pkg/subnet/subnet.go, subnet_test.go, etcd/registry_test.go)."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from pyflannel.lease import (
    EventType,
    Lease,
    LeaseAttrs,
    LeaseError,
    LeaseEvent,
    LeaseSnapshot,
    make_subnet_key,
    parse_subnet_key,
)

# --- values ---------------------------------------------------------------------------------------------------

# Exactly as upstream writes them (encoding/json of LeaseAttrs, field order of the Go struct).
UPSTREAM_VALUES = [
    '{"PublicIP":"1.2.3.4","PublicIPv6":null}',
    '{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}',
    '{"PublicIP":"10.0.0.2","PublicIPv6":null,"BackendType":"host-gw"}',
    '{"PublicIP":"10.0.0.2","PublicIPv6":null,"BackendType":"wireguard",'
    '"BackendData":{"PublicKey":"WsoK0GbVCFjyS2a0MZRiHuzcOgBfXRmPMKYnvVj5ijA=","Port":51820}}',
    '{"PublicIP":"10.0.0.2","PublicIPv6":"fd00::2","BackendType":"vxlan",'
    '"BackendData":{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"},"BackendV6Data":{"VNI":1,"VtepMAC":"86:e5:1d:1a:5f:c1"}}',
    '{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::1","BackendType":"ipip"}',
    '{"PublicIP":"0.0.0.0","PublicIPv6":null}',
]


@pytest.mark.parametrize("text", UPSTREAM_VALUES)
def test_upstream_values_round_trip_byte_identically(text: str) -> None:
    attrs = LeaseAttrs.from_json(text)
    assert attrs.to_json() == text
    assert LeaseAttrs.from_json(text.encode()).to_json() == text


def test_registry_test_value() -> None:
    assert LeaseAttrs(public_ip=IPv4Address("1.2.3.4")).to_json() == '{"PublicIP":"1.2.3.4","PublicIPv6":null}'


def test_vxlan_value_fields() -> None:
    attrs = LeaseAttrs.from_json(UPSTREAM_VALUES[1])
    assert attrs.public_ip == IPv4Address("192.168.64.3")
    assert attrs.public_ipv6 is None
    assert attrs.backend_type == "vxlan"
    assert attrs.backend_data == {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"}
    assert attrs.backend_v6_data is None


def test_dual_stack_value_fields() -> None:
    attrs = LeaseAttrs.from_json(UPSTREAM_VALUES[4])
    assert attrs.public_ip == IPv4Address("10.0.0.2")
    assert attrs.public_ipv6 == IPv6Address("fd00::2")
    assert attrs.backend_v6_data == {"VNI": 1, "VtepMAC": "86:e5:1d:1a:5f:c1"}


def test_to_json_defaults() -> None:
    # Go's zero IP4 marshals as "0.0.0.0" and a nil *IP6 as null.
    assert LeaseAttrs().to_json() == '{"PublicIP":"0.0.0.0","PublicIPv6":null}'


def test_to_json_omits_empty_fields() -> None:
    attrs = LeaseAttrs(public_ip=IPv4Address("10.1.1.1"), backend_data={"VNI": 2})
    assert attrs.to_json() == '{"PublicIP":"10.1.1.1","PublicIPv6":null,"BackendData":{"VNI":2}}'


def test_to_json_field_order_fixed() -> None:
    attrs = LeaseAttrs(
        public_ipv6=IPv6Address("2001:db8:0:0:0:0:0:7"),
        public_ip=IPv4Address("10.1.1.1"),
        backend_v6_data={"b": 1, "a": 2},
        backend_data=[1, 2],
        backend_type="extension",
    )
    assert attrs.to_json() == (
        '{"PublicIP":"10.1.1.1","PublicIPv6":"2001:db8::7","BackendType":"extension",'
        '"BackendData":[1,2],"BackendV6Data":{"b":1,"a":2}}'
    )


def test_unset_public_ip_reads_as_none() -> None:
    assert LeaseAttrs.from_json('{"PublicIP":"0.0.0.0","PublicIPv6":null}').public_ip is None
    assert LeaseAttrs.from_json("{}").public_ip is None
    assert LeaseAttrs.from_json("{}").to_json() == '{"PublicIP":"0.0.0.0","PublicIPv6":null}'


def test_backend_data_kept_verbatim_including_unknown_fields() -> None:
    text = (
        '{"PublicIP":"10.0.0.9","PublicIPv6":null,"BackendType":"extension",'
        '"BackendData":{"z":[1,{"y":"x"}],"a":null,"n":-3,"t":true,"s":"\\"q\\""}}'
    )
    attrs = LeaseAttrs.from_json(text)
    assert attrs.backend_data == {"z": [1, {"y": "x"}], "a": None, "n": -3, "t": True, "s": '"q"'}
    assert attrs.to_json() == text


@pytest.mark.parametrize(
    "text",
    [
        '{"publicip":"10.0.0.3","publicipv6":"fd00::3","backendtype":"vxlan","backenddata":{"VNI":1}}',
        '{"PUBLICIP":"10.0.0.3","PUBLICIPV6":"fd00::3","BACKENDTYPE":"vxlan","BACKENDDATA":{"VNI":1}}',
        '{"BackendData":{"VNI":1},"backendType":"vxlan","publicIPv6":"fd00::3","publicIP":"10.0.0.3"}',
    ],
)
def test_reads_other_key_casing_and_order(text: str) -> None:
    attrs = LeaseAttrs.from_json(text)
    assert attrs == LeaseAttrs(
        public_ip=IPv4Address("10.0.0.3"),
        public_ipv6=IPv6Address("fd00::3"),
        backend_type="vxlan",
        backend_data={"VNI": 1},
    )
    # Rewritten in upstream's canonical form.
    assert attrs.to_json() == (
        '{"PublicIP":"10.0.0.3","PublicIPv6":"fd00::3","BackendType":"vxlan","BackendData":{"VNI":1}}'
    )


def test_unknown_value_keys_ignored() -> None:
    attrs = LeaseAttrs.from_json('{"PublicIP":"10.0.0.3","PublicIPv6":null,"Future":{"x":1}}')
    assert attrs == LeaseAttrs(public_ip=IPv4Address("10.0.0.3"))


def test_null_backend_type_is_empty() -> None:
    # Go leaves a string field untouched on null.
    attrs = LeaseAttrs.from_json('{"PublicIP":"10.0.0.3","PublicIPv6":null,"BackendType":null}')
    assert attrs.backend_type == ""
    assert attrs.to_json() == '{"PublicIP":"10.0.0.3","PublicIPv6":null}'


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage",
        '{"PublicIP":"1.2.3.4"',
        b"\xff\xfe",
        "[]",
        "null",
        '"1.2.3.4"',
        "7",
        '{"PublicIP":"1.2.3"}',
        '{"PublicIP":"1.2.3.4.5"}',
        '{"PublicIP":"fd00::1"}',
        '{"PublicIP":"host.example"}',
        '{"PublicIP":16909060}',
        '{"PublicIP":["1.2.3.4"]}',
        '{"PublicIP":"1.2.3.4","PublicIPv6":"1.2.3.4.5"}',
        '{"PublicIP":"1.2.3.4","PublicIPv6":"fd00::1::2"}',
        '{"PublicIP":"1.2.3.4","PublicIPv6":42}',
        '{"PublicIP":"1.2.3.4","BackendType":7}',
        '{"PublicIP":"1.2.3.4","BackendType":{"t":"vxlan"}}',
    ],
)
def test_garbage_values_raise_lease_error(text: str | bytes) -> None:
    with pytest.raises(LeaseError):
        LeaseAttrs.from_json(text)


def test_lease_error_is_value_error() -> None:
    assert issubclass(LeaseError, ValueError)


# --- keys: upstream subnet_test.go ----------------------------------------------------------------------------


def test_upstream_subnet_node_v4() -> None:
    key = "10.12.13.0-24"
    sn, sn6 = parse_subnet_key(key)
    assert sn == IPv4Network("10.12.13.0/24")
    assert sn6 is None
    assert make_subnet_key(sn, None) == key


def test_upstream_subnet_node_v6() -> None:
    key = "10.12.13.0-24&fd00:12:13::-56"
    sn, sn6 = parse_subnet_key(key)
    assert sn == IPv4Network("10.12.13.0/24")
    assert sn6 == IPv6Network("fd00:12:13::/56")
    assert str(sn6) == "fd00:12:13::/56"
    assert make_subnet_key(sn, sn6) == key


@pytest.mark.parametrize(
    "key",
    [
        # upstream TestSubnetNodeInvalid
        "10",
        "10.12.13.0",
        "10.12.13-24",
        "10.12.13.300-24",
        "10.12.13.0-24hi",
        "&2001::-56",
        "10.12.13.0-24&:12:13:-56",
        "10.12.13.0-24&20011::-56",
        "10.12.13.0-24&2001-56",
        "10.12.13.0-24&2001::",
        "10.12.13.0-24&2001::-56hi",
        # more garbage another writer might leave under <prefix>/subnets/
        "",
        "config",
        "10.12.13.0/24",
        "10.12.13.0-33",
        "10.12.13.0-",
        "10.12.13.5-24",  # host bits set
        "10.12.13.0-24&fd00:12:13::1-56",
        "10.12.13.0-24&fd00::-129",
        "10.12.13.0-24&",
        "0.0.0.0-0",  # no subnet at all
        "0.0.0.0-0&",
        " 10.12.13.0-24",
        "10.12.13.0-24\n",
    ],
)
def test_invalid_keys_raise_lease_error(key: str) -> None:
    with pytest.raises(LeaseError):
        parse_subnet_key(key)


def test_ipv6_only_key() -> None:
    # Upstream's MakeSubnetKey renders the empty IPv4 half of an IPv6-only lease as 0.0.0.0-0.
    sn6 = IPv6Network("fd00:0:0:5::/64")
    key = make_subnet_key(None, sn6)
    assert key == "0.0.0.0-0&fd00:0:0:5::-64"
    assert parse_subnet_key(key) == (None, sn6)


@pytest.mark.parametrize(
    ("sn", "sn6", "key"),
    [
        ("10.1.5.0/24", None, "10.1.5.0-24"),
        ("10.244.0.0/24", None, "10.244.0.0-24"),
        ("192.168.0.20/30", None, "192.168.0.20-30"),
        ("10.42.3.0/24", "2001:cafe:42:3::/64", "10.42.3.0-24&2001:cafe:42:3::-64"),
        ("10.0.0.0/8", "fd00::/16", "10.0.0.0-8&fd00::-16"),
        ("10.0.1.0/24", "fd00:0:0:1::/124", "10.0.1.0-24&fd00:0:0:1::-124"),
    ],
)
def test_key_both_ways(sn: str, sn6: str | None, key: str) -> None:
    n4 = IPv4Network(sn)
    n6 = IPv6Network(sn6) if sn6 else None
    assert make_subnet_key(n4, n6) == key
    assert parse_subnet_key(key) == (n4, n6)


@pytest.mark.parametrize(
    "key",
    [
        "10.1.2.0-024",  # upstream's ParseUint reads 24, but the key is not the one its MakeSubnetKey writes
        "10.1.2.0-24&fd00:0:0:1::-064",
        "10.12.13.0-24&FD00:12:13::-56",  # upstream's regexp takes only lower-case hex
        "10.12.13.0-24&fd00:12:13:0::-56",  # not the shortest form
        "10.12.13.0-24&fd00:0012:13::-56",
        "10.12.13.0-24&fd00::1.2.3.4-120",
        "1\u0660.1.2.0-24",  # an Arabic-Indic zero: \\d is ASCII only
        "10.1.2.0-2\u0664",
        "10.1.2.0-" + "9" * 5000,
    ],
)
def test_non_canonical_keys_are_refused(key: str) -> None:
    # Two spellings of one subnet would collapse into one peer, and our own lease under such a key would be
    # renewed and compared under a key it is not stored at.
    with pytest.raises(LeaseError) as e:
        parse_subnet_key(key)
    assert len(str(e.value)) < 300


@pytest.mark.parametrize(
    "value",
    [
        '{"PublicIP":"1.2.3.4","BackendData":{"VNI":NaN}}',
        '{"PublicIP":"1.2.3.4","BackendData":{"VNI":Infinity}}',
        '{"PublicIP":"1.2.3.4","BackendData":{"VNI":-Infinity}}',
        '{"PublicIP":"1.2.3.4","BackendData":{"VNI":1e400}}',
        '{"PublicIP":"1.2.3.4","BackendData":{"VNI":-1e400}}',
        '{"PublicIP":"1.2.3.4","BackendData":' + "1" * 5000 + "}",
        '{"PublicIP":"1.2.3.4","BackendData":' + "1" * 400 + "}",
        '{"PublicIP":"1.2.3.4","BackendData":' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"PublicIP":"1.2.3.4","BackendData":' + "[" * 995 + "]" * 995 + "}",
        '{"PublicIP":"1.2.3.4","BackendData":' + "[" * 101 + "]" * 101 + "}",
        '{"PublicIP":"1.2.3.4","PublicIPv6":"fe80::1%eth0"}',
        '{"PublicIP":"1.2.3.4","PublicIPv6":"fd00::1%1"}',
        '{"PublicIP":"1.2.3.4","PublicIPv6":"1.2.3.4"}',
        '{"PublicIP":"::ffff:1.2.3.4"}',
        '{"PublicIP":"01.2.3.4"}',
        '{"PublicIP":" 1.2.3.4"}',
        '{"PublicIP":"1.2.3.\u0664"}',
    ],
)
def test_values_go_refuses_raise_lease_error(value: str) -> None:
    with pytest.raises(LeaseError) as e:
        LeaseAttrs.from_json(value)
    assert len(str(e.value)) < 300


def test_deep_but_bounded_backend_data_round_trips() -> None:
    value = '{"PublicIP":"1.2.3.4","PublicIPv6":null,"BackendData":' + "[" * 99 + "]" * 99 + "}"
    assert LeaseAttrs.from_json(value).to_json() == value


def test_large_finite_numbers_round_trip() -> None:
    value = '{"PublicIP":"1.2.3.4","PublicIPv6":null,"BackendData":{"a":1.5e+300,"b":-0.5,"c":' + "9" * 300 + "}}"
    assert LeaseAttrs.from_json(value).to_json() == value


def test_lone_surrogates_read_as_replacement_characters_like_go() -> None:
    value = '{"PublicIP":"1.2.3.4","BackendType":"x\\udc80","BackendData":["\\ud800",{"\\udfff":1}]}'
    attrs = LeaseAttrs.from_json(value)
    assert attrs.backend_type == "x\ufffd"
    assert attrs.backend_data == ["\ufffd", {"\ufffd": 1}]
    attrs.to_json().encode()  # encodable, unlike a lone surrogate


def test_invalid_utf8_reads_as_replacement_characters_like_go() -> None:
    attrs = LeaseAttrs.from_json(b'{"PublicIP":"1.2.3.4","BackendType":"x\xff"}')
    assert attrs.backend_type == "x\ufffd"


# --- Lease and events -----------------------------------------------------------------------------------------


def test_lease_key_and_reservation() -> None:
    attrs = LeaseAttrs(public_ip=IPv4Address("10.0.0.2"))
    reservation = Lease(IPv4Network("10.12.13.0/24"), IPv6Network("fd00:12:13::/56"), attrs)
    assert reservation.key == "10.12.13.0-24&fd00:12:13::-56"
    assert reservation.is_reservation
    leased = Lease(IPv4Network("10.12.13.0/24"), None, attrs, expiration=1e9, store_lease_id=7)
    assert leased.key == "10.12.13.0-24"
    assert not leased.is_reservation


def test_lease_equality_ignores_store_handle() -> None:
    attrs = LeaseAttrs(public_ip=IPv4Address("10.0.0.2"))
    a = Lease(IPv4Network("10.1.2.0/24"), None, attrs, expiration=5.0, store_lease_id=1)
    b = Lease(IPv4Network("10.1.2.0/24"), None, attrs, expiration=5.0, store_lease_id=2)
    assert a == b


def test_events_and_snapshot() -> None:
    lease = Lease(IPv4Network("10.1.2.0/24"), None, LeaseAttrs())
    ev = LeaseEvent(EventType.ADDED, lease)
    assert ev.type.value == "added"
    assert EventType.REMOVED.value == "removed"
    assert LeaseSnapshot((lease,)).leases == (lease,)


def test_full_lease_wire_round_trip() -> None:
    key = "10.42.3.0-24&2001:cafe:42:3::-64"
    value = json.dumps(
        {
            "PublicIP": "192.168.1.3",
            "PublicIPv6": "2001:db8::3",
            "BackendType": "vxlan",
            "BackendData": {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"},
            "BackendV6Data": {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:45"},
        },
        separators=(",", ":"),
    )
    sn, sn6 = parse_subnet_key(key)
    lease = Lease(sn, sn6, LeaseAttrs.from_json(value))
    assert lease.key == key
    assert lease.attrs.to_json() == value
