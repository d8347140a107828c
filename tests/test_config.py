"""net-conf.json parsing against upstream flannel's pkg/subnet/config.go and config_test.go."""

from __future__ import annotations

import json
import os
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from pathlib import Path
from typing import Any

import pytest

from pyflannel.config import (
    MAX_CONFIG_BYTES,
    MAX_JSON_DEPTH,
    BackendConfig,
    ConfigError,
    NetConfig,
    ci_get,
    loads_json,
    parse_net_config,
    read_config_file,
)


def parse(obj: dict[str, Any]) -> NetConfig:
    return parse_net_config(json.dumps(obj))


# --- upstream config_test.go vectors -------------------------------------------------------------------------


def test_upstream_config_defaults() -> None:
    cfg = parse_net_config('{ "network": "10.3.0.0/16" }')
    assert cfg.network == IPv4Network("10.3.0.0/16")
    assert cfg.subnet_len == 24
    assert str(cfg.subnet_min) == "10.3.1.0"
    assert str(cfg.subnet_max) == "10.3.255.0"
    assert cfg.enable_ipv4 is True
    assert cfg.enable_ipv6 is False
    assert cfg.enable_nftables is False
    assert cfg.ipv6_network is None
    assert cfg.ipv6_subnet_min is None and cfg.ipv6_subnet_max is None


def test_upstream_ipv6_config_defaults() -> None:
    cfg = parse_net_config('{ "enableIPv6": true, "ipv6Network": "fc00::/48", "enableIPv4": false }')
    assert cfg.ipv6_network == IPv6Network("fc00::/48")
    assert cfg.ipv6_subnet_len == 64
    assert str(cfg.ipv6_subnet_min) == "fc00:0:0:1::"
    assert str(cfg.ipv6_subnet_max) == "fc00:0:0:ffff::"
    assert cfg.enable_ipv4 is False
    assert cfg.network is None
    assert cfg.subnet_min is None and cfg.subnet_max is None


def test_upstream_config_overrides() -> None:
    cfg = parse_net_config(
        '{ "Network": "10.3.0.0/16", "SubnetMin": "10.3.5.0", "SubnetMax": "10.3.8.0", "SubnetLen": 28 }'
    )
    assert cfg.network == IPv4Network("10.3.0.0/16")
    assert cfg.subnet_min == IPv4Address("10.3.5.0")
    assert cfg.subnet_max == IPv4Address("10.3.8.0")
    assert cfg.subnet_len == 28


def test_upstream_ipv6_config_overrides() -> None:
    cfg = parse_net_config(
        '{ "EnableIPv6": true, "IPv6Network": "fc00::/48", "IPv6SubnetMin": "fc00:0:0:1::",'
        ' "IPv6SubnetMax": "fc00:0:0:f::", "IPv6SubnetLen": 124, "enableIPv4": false }'
    )
    assert cfg.ipv6_network == IPv6Network("fc00::/48")
    assert str(cfg.ipv6_subnet_min) == "fc00:0:0:1::"
    assert str(cfg.ipv6_subnet_max) == "fc00:0:0:f::"
    assert cfg.ipv6_subnet_len == 124


def test_upstream_registry_test_config() -> None:
    cfg = parse_net_config('{ "Network": "10.1.0.0/16", "Backend": { "Type": "host-gw" } }')
    assert cfg.network == IPv4Network("10.1.0.0/16")
    assert cfg.backend.type == "host-gw"


# --- IPv4 SubnetLen defaults and limits ----------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [8, 12, 16, 20, 22])
def test_default_subnet_len_24_up_to_slash_22(prefix: int) -> None:
    net = IPv4Network(f"10.0.0.0/{prefix}")
    cfg = parse({"Network": str(net)})
    assert cfg.subnet_len == 24
    assert cfg.subnet_min == net.network_address + 256
    assert cfg.subnet_max == net.broadcast_address - 255


@pytest.mark.parametrize("prefix", [23, 24, 25, 26, 27, 28])
def test_default_subnet_len_prefix_plus_two(prefix: int) -> None:
    net = IPv4Network(f"10.5.6.0/{prefix}")
    cfg = parse({"Network": str(net)})
    assert cfg.subnet_len == prefix + 2
    size = 1 << (32 - (prefix + 2))
    # Four subnets: the first is skipped, so min is the second and max the fourth.
    assert cfg.subnet_min == net.network_address + size
    assert cfg.subnet_max == net.network_address + 3 * size


def test_slash_28_smallest_network() -> None:
    cfg = parse({"Network": "192.168.0.16/28"})
    assert cfg.subnet_len == 30
    assert cfg.subnet_min == IPv4Address("192.168.0.20")
    assert cfg.subnet_max == IPv4Address("192.168.0.28")


@pytest.mark.parametrize("prefix", [29, 30, 31, 32])
def test_network_too_small(prefix: int) -> None:
    with pytest.raises(ConfigError, match="too small"):
        parse({"Network": f"10.0.0.0/{prefix}"})


def test_network_too_small_message_mentions_slash_28() -> None:
    with pytest.raises(ConfigError, match="Minimum useful network prefix is /28"):
        parse({"Network": "10.0.0.0/29"})


@pytest.mark.parametrize("subnet_len", [31, 32, 33])
def test_explicit_subnet_len_over_30(subnet_len: int) -> None:
    with pytest.raises(ConfigError, match="SubnetLen"):
        parse({"Network": "10.0.0.0/8", "SubnetLen": subnet_len})


def test_explicit_subnet_len_30_allowed() -> None:
    cfg = parse({"Network": "10.0.0.0/16", "SubnetLen": 30})
    assert cfg.subnet_len == 30
    assert cfg.subnet_min == IPv4Address("10.0.0.4")
    assert cfg.subnet_max == IPv4Address("10.0.255.252")


@pytest.mark.parametrize("subnet_len", [16, 17, 1])
def test_explicit_subnet_len_below_prefix_plus_two(subnet_len: int) -> None:
    with pytest.raises(ConfigError, match="SubnetLen"):
        parse({"Network": "10.0.0.0/16", "SubnetLen": subnet_len})


def test_explicit_subnet_len_prefix_plus_two_allowed() -> None:
    cfg = parse({"Network": "10.0.0.0/16", "SubnetLen": 18})
    assert cfg.subnet_len == 18
    assert cfg.subnet_min == IPv4Address("10.0.64.0")
    assert cfg.subnet_max == IPv4Address("10.0.192.0")


def test_explicit_subnet_len_on_network_smaller_than_28() -> None:
    # The /28 floor applies to the default only; an explicit /30 in a /28 is what the default would pick anyway.
    cfg = parse({"Network": "10.0.0.0/28", "SubnetLen": 30})
    assert cfg.subnet_len == 30
    with pytest.raises(ConfigError, match="SubnetLen"):
        parse({"Network": "10.0.0.0/29", "SubnetLen": 30})


def test_subnet_len_zero_means_default() -> None:
    assert parse({"Network": "10.0.0.0/16", "SubnetLen": 0}).subnet_len == 24
    assert parse({"Network": "10.0.0.0/16", "SubnetLen": None}).subnet_len == 24


def test_network_host_bits_are_masked_like_go_parsecidr() -> None:
    cfg = parse({"Network": "10.3.7.9/16"})
    assert cfg.network == IPv4Network("10.3.0.0/16")
    assert cfg.subnet_min == IPv4Address("10.3.1.0")


# --- SubnetMin / SubnetMax ------------------------------------------------------------------------------------


def test_subnet_min_max_only_one_given() -> None:
    cfg = parse({"Network": "10.3.0.0/16", "SubnetMin": "10.3.100.0"})
    assert cfg.subnet_min == IPv4Address("10.3.100.0")
    assert cfg.subnet_max == IPv4Address("10.3.255.0")
    cfg = parse({"Network": "10.3.0.0/16", "SubnetMax": "10.3.9.0"})
    assert cfg.subnet_min == IPv4Address("10.3.1.0")
    assert cfg.subnet_max == IPv4Address("10.3.9.0")


def test_subnet_min_zero_means_default() -> None:
    # Upstream compares against IP4(0) to decide "unset".
    cfg = parse({"Network": "10.3.0.0/16", "SubnetMin": "0.0.0.0", "SubnetMax": "0.0.0.0"})
    assert cfg.subnet_min == IPv4Address("10.3.1.0")
    assert cfg.subnet_max == IPv4Address("10.3.255.0")


def test_subnet_min_may_be_first_subnet_when_explicit() -> None:
    cfg = parse({"Network": "10.3.0.0/16", "SubnetMin": "10.3.0.0"})
    assert cfg.subnet_min == IPv4Address("10.3.0.0")


@pytest.mark.parametrize(
    ("key", "value"),
    [("SubnetMin", "10.4.1.0"), ("SubnetMax", "10.4.1.0"), ("SubnetMin", "10.2.255.0"), ("SubnetMax", "1.2.3.0")],
)
def test_subnet_min_max_outside_network(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"{key} is not in the range of the Network"):
        parse({"Network": "10.3.0.0/16", key: value})


@pytest.mark.parametrize(("key", "value"), [("SubnetMin", "10.3.1.1"), ("SubnetMax", "10.3.8.128")])
def test_subnet_min_max_unaligned(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"{key} is not on a SubnetLen boundary"):
        parse({"Network": "10.3.0.0/16", key: value})


def test_subnet_min_max_aligned_to_explicit_subnet_len() -> None:
    cfg = parse({"Network": "10.3.0.0/16", "SubnetLen": 26, "SubnetMin": "10.3.0.64", "SubnetMax": "10.3.0.192"})
    assert (cfg.subnet_min, cfg.subnet_max) == (IPv4Address("10.3.0.64"), IPv4Address("10.3.0.192"))
    with pytest.raises(ConfigError, match="SubnetMin is not on a SubnetLen boundary"):
        parse({"Network": "10.3.0.0/16", "SubnetLen": 26, "SubnetMin": "10.3.0.32"})


@pytest.mark.parametrize(("key", "value"), [("SubnetMin", "10.3.1"), ("SubnetMax", "fc00::"), ("SubnetMin", "x")])
def test_subnet_min_max_not_ipv4(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=key):
        parse({"Network": "10.3.0.0/16", key: value})


# --- IPv6 -----------------------------------------------------------------------------------------------------


def v6(net: str, **extra: Any) -> NetConfig:
    return parse({"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": net, **extra})


@pytest.mark.parametrize("prefix", [32, 48, 56, 60, 62])
def test_ipv6_default_subnet_len_64(prefix: int) -> None:
    net = IPv6Network(f"fd00::/{prefix}")
    cfg = v6(str(net))
    assert cfg.ipv6_subnet_len == 64
    assert cfg.ipv6_subnet_min == net.network_address + (1 << 64)
    assert cfg.ipv6_subnet_max == net.network_address + net.num_addresses - (1 << 64)


@pytest.mark.parametrize("prefix", [63, 64, 96, 120, 124])
def test_ipv6_default_subnet_len_prefix_plus_two(prefix: int) -> None:
    net = IPv6Network(f"fd00::/{prefix}")
    cfg = v6(str(net))
    assert cfg.ipv6_subnet_len == prefix + 2
    size = 1 << (128 - prefix - 2)
    assert cfg.ipv6_subnet_min == net.network_address + size
    assert cfg.ipv6_subnet_max == net.network_address + 3 * size


@pytest.mark.parametrize("prefix", [125, 126, 128])
def test_ipv6_network_too_small(prefix: int) -> None:
    with pytest.raises(ConfigError, match="IPv6Network is too small"):
        v6(f"fd00::/{prefix}")


@pytest.mark.parametrize("length", [127, 128])
def test_ipv6_explicit_subnet_len_over_126(length: int) -> None:
    with pytest.raises(ConfigError, match="IPv6SubnetLen"):
        v6("fd00::/48", IPv6SubnetLen=length)


def test_ipv6_explicit_subnet_len_limits() -> None:
    assert v6("fd00::/48", IPv6SubnetLen=126).ipv6_subnet_len == 126
    assert v6("fd00::/48", IPv6SubnetLen=50).ipv6_subnet_len == 50
    with pytest.raises(ConfigError, match="IPv6SubnetLen"):
        v6("fd00::/48", IPv6SubnetLen=49)


@pytest.mark.parametrize(
    ("key", "value", "msg"),
    [
        ("IPv6SubnetMin", "fd01::", "IPv6SubnetMin is not in the range"),
        ("IPv6SubnetMax", "fc00::", "IPv6SubnetMax is not in the range"),
        ("IPv6SubnetMin", "fd00:0:0:1::1", "IPv6SubnetMin is not on a SubnetLen boundary"),
        ("IPv6SubnetMax", "fd00:0:0:2:8000::", "IPv6SubnetMax is not on a SubnetLen boundary"),
        ("IPv6SubnetMin", "10.0.0.0", "IPv6SubnetMin"),
    ],
)
def test_ipv6_subnet_min_max_errors(key: str, value: str, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        v6("fd00::/48", **{key: value})


def test_ipv6_network_required_when_enabled() -> None:
    with pytest.raises(ConfigError, match="IPv6Network"):
        parse({"EnableIPv4": False, "EnableIPv6": True})
    with pytest.raises(ConfigError, match="IPv6Network"):
        parse({"Network": "10.0.0.0/16", "EnableIPv6": True})


def test_ipv6_network_ignored_when_disabled() -> None:
    cfg = parse({"Network": "10.0.0.0/16", "IPv6Network": "fd00::/48"})
    assert cfg.enable_ipv6 is False
    assert cfg.ipv6_network is None
    assert cfg.ipv6_subnet_len == 0


def test_ipv6_only_needs_no_network() -> None:
    cfg = v6("fd00:12::/48")
    assert cfg.network is None and cfg.subnet_len == 0
    assert cfg.subnet_fits(None)
    assert not cfg.subnet_fits(IPv4Network("10.0.1.0/24"))


def test_dual_stack() -> None:
    cfg = parse_net_config(
        '{"Network":"10.42.0.0/16","EnableIPv6":true,"IPv6Network":"2001:cafe:42::/56","Backend":{"Type":"vxlan"}}'
    )
    assert cfg.enable_ipv4 and cfg.enable_ipv6
    assert (cfg.subnet_len, str(cfg.subnet_min), str(cfg.subnet_max)) == (24, "10.42.1.0", "10.42.255.0")
    assert cfg.ipv6_subnet_len == 64
    assert str(cfg.ipv6_subnet_min) == "2001:cafe:42:1::"
    assert str(cfg.ipv6_subnet_max) == "2001:cafe:42:ff::"
    assert cfg.backend.type == "vxlan"


def test_network_required_when_ipv4_enabled() -> None:
    with pytest.raises(ConfigError, match="Network"):
        parse({})
    with pytest.raises(ConfigError, match="Network"):
        parse({"Network": ""})
    with pytest.raises(ConfigError, match="Network"):
        parse({"EnableIPv6": True, "IPv6Network": "fd00::/48"})


def test_both_families_disabled_is_an_error() -> None:
    with pytest.raises(ConfigError, match="EnableIPv4"):
        parse({"EnableIPv4": False, "Network": "10.0.0.0/16"})


def test_nftables_flag() -> None:
    assert parse({"Network": "10.0.0.0/16", "EnableNFTables": True}).enable_nftables is True
    assert parse({"Network": "10.0.0.0/16", "enablenftables": False}).enable_nftables is False


# --- subnet_fits ----------------------------------------------------------------------------------------------


def test_subnet_fits() -> None:
    cfg = parse({"Network": "10.3.0.0/16", "SubnetMin": "10.3.5.0", "SubnetMax": "10.3.8.0"})
    assert cfg.subnet_fits(IPv4Network("10.3.5.0/24"))
    assert cfg.subnet_fits(IPv4Network("10.3.8.0/24"))
    assert not cfg.subnet_fits(IPv4Network("10.3.4.0/24"))
    assert not cfg.subnet_fits(IPv4Network("10.3.9.0/24"))
    assert not cfg.subnet_fits(IPv4Network("10.3.6.0/25"))
    assert not cfg.subnet_fits(IPv4Network("10.4.6.0/24"))
    assert not cfg.subnet_fits(None)


def test_ipv6_subnet_fits() -> None:
    cfg = parse({"Network": "10.3.0.0/16", "EnableIPv6": True, "IPv6Network": "fd00::/48"})
    assert cfg.ipv6_subnet_fits(IPv6Network("fd00:0:0:1::/64"))
    assert not cfg.ipv6_subnet_fits(IPv6Network("fd00::/64"))  # the skipped first subnet
    assert not cfg.ipv6_subnet_fits(IPv6Network("fd00:0:0:1::/65"))
    assert not cfg.ipv6_subnet_fits(IPv6Network("fd01:0:0:1::/64"))
    assert not cfg.ipv6_subnet_fits(None)
    v4only = parse({"Network": "10.3.0.0/16"})
    assert v4only.ipv6_subnet_fits(None)
    assert not v4only.ipv6_subnet_fits(IPv6Network("fd00:0:0:1::/64"))


# --- key matching: Go's encoding/json semantics ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '{"network":"10.3.0.0/16","subnetlen":26,"subnetmin":"10.3.0.64","SUBNETMAX":"10.3.1.0"}',
        '{"NETWORK":"10.3.0.0/16","SubnetLen":26,"subnetMin":"10.3.0.64","subnetMAX":"10.3.1.0"}',
    ],
)
def test_keys_case_insensitive(text: str) -> None:
    cfg = parse_net_config(text)
    assert cfg.network == IPv4Network("10.3.0.0/16")
    assert cfg.subnet_len == 26
    assert cfg.subnet_min == IPv4Address("10.3.0.64")
    assert cfg.subnet_max == IPv4Address("10.3.1.0")


def test_ipv6_keys_case_insensitive() -> None:
    cfg = parse_net_config(
        '{"enableipv4":false,"ENABLEIPV6":true,"ipv6network":"fd00::/48","ipv6subnetlen":56,'
        '"IPV6SUBNETMIN":"fd00:0:0:100::","ipv6SubnetMax":"fd00:0:0:200::"}'
    )
    assert cfg.ipv6_subnet_len == 56
    assert str(cfg.ipv6_subnet_min) == "fd00:0:0:100::"
    assert str(cfg.ipv6_subnet_max) == "fd00:0:0:200::"


def test_duplicate_keys_differing_in_case_last_wins() -> None:
    # Go assigns each matching key in document order.
    cfg = parse_net_config('{"Network":"10.1.0.0/16","network":"10.2.0.0/16"}')
    assert cfg.network == IPv4Network("10.2.0.0/16")
    cfg = parse_net_config('{"network":"10.2.0.0/16","Network":"10.1.0.0/16"}')
    assert cfg.network == IPv4Network("10.1.0.0/16")


def test_unknown_keys_ignored() -> None:
    cfg = parse_net_config(
        '{"Network":"10.3.0.0/16","Whatever":[1,2,{"x":null}],"Networks":["10.9.0.0/16"],"Comment":"hi"}'
    )
    assert cfg.network == IPv4Network("10.3.0.0/16")
    assert cfg.raw["Whatever"] == [1, 2, {"x": None}]


def test_null_values_mean_default() -> None:
    cfg = parse_net_config(
        '{"Network":"10.3.0.0/16","EnableIPv4":null,"EnableIPv6":null,"SubnetMin":null,"SubnetMax":null}'
    )
    assert cfg.enable_ipv4 and not cfg.enable_ipv6
    assert str(cfg.subnet_min) == "10.3.1.0"


def test_ci_get() -> None:
    obj = {"Type": "vxlan", "vni": 4}
    assert ci_get(obj, "type") == "vxlan"
    assert ci_get(obj, "VNI") == 4
    assert ci_get(obj, "Port") is None
    assert ci_get(obj, "Port", 0) == 0
    assert ci_get({"port": None}, "Port", 8472) is None


# --- Backend --------------------------------------------------------------------------------------------------


def test_backend_absent_defaults_to_udp() -> None:
    cfg = parse({"Network": "10.0.0.0/16"})
    assert cfg.backend == BackendConfig(type="udp", options={})


@pytest.mark.parametrize("typ", ["vxlan", "VXLAN", "VxLan"])
def test_backend_type_case_insensitive(typ: str) -> None:
    cfg = parse({"Network": "10.0.0.0/16", "Backend": {"Type": typ, "VNI": 4}})
    assert cfg.backend.type == "vxlan"


def test_backend_keys_case_insensitive() -> None:
    cfg = parse_net_config(
        '{"Network":"10.0.0.0/16","backend":{"type":"vxlan","vni":4,"Port":4789,"directrouting":true}}'
    )
    assert cfg.backend.type == "vxlan"
    assert cfg.backend.get("VNI") == 4
    assert cfg.backend.get("port") == 4789
    assert cfg.backend.get("DirectRouting") is True
    assert cfg.backend.get("GBP") is None
    assert cfg.backend.get("GBP", False) is False


def test_backend_options_kept_verbatim() -> None:
    cfg = parse({"Network": "10.0.0.0/16", "Backend": {"Type": "wireguard", "PSK": "abc=", "ListenPort": 51821}})
    assert cfg.backend.type == "wireguard"
    assert cfg.backend.options == {"Type": "wireguard", "PSK": "abc=", "ListenPort": 51821}


@pytest.mark.parametrize("backend", ["vxlan", 1, [{"Type": "vxlan"}], True])
def test_backend_not_an_object(backend: Any) -> None:
    with pytest.raises(ConfigError, match="Backend"):
        parse({"Network": "10.0.0.0/16", "Backend": backend})


@pytest.mark.parametrize("typ", [1, True, {"x": 1}, ""])
def test_backend_type_not_a_string(typ: Any) -> None:
    with pytest.raises(ConfigError, match=r"Backend\.Type"):
        parse({"Network": "10.0.0.0/16", "Backend": {"Type": typ}})


# --- malformed input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "{", '{"Network": "10.0.0.0/16",}', "not json", b"\xff\xfe{"])
def test_malformed_json(text: str | bytes) -> None:
    with pytest.raises(ConfigError, match="JSON"):
        parse_net_config(text)


@pytest.mark.parametrize("text", ["[]", '["10.0.0.0/16"]', '"10.0.0.0/16"', "42", "null", "true"])
def test_not_an_object(text: str) -> None:
    with pytest.raises(ConfigError, match="object"):
        parse_net_config(text)


def test_bytes_input() -> None:
    assert parse_net_config(b'{"Network":"10.3.0.0/16"}').subnet_len == 24


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("Network", 10),
        ("Network", ["10.0.0.0/16"]),
        ("Network", "10.0.0.0"),
        ("Network", "10.0.0.0/33"),
        ("Network", "fd00::/48"),
        ("Network", "garbage"),
        ("SubnetLen", "24"),
        ("SubnetLen", 24.0),
        ("SubnetLen", 24.5),
        ("SubnetLen", True),
        ("SubnetLen", -1),
        ("SubnetLen", [24]),
        ("SubnetMin", 167772416),
        ("SubnetMax", {"ip": "10.0.1.0"}),
        ("EnableIPv4", "true"),
        ("EnableIPv4", 1),
        ("EnableIPv6", "yes"),
        ("EnableNFTables", 0),
    ],
)
def test_wrong_types_name_the_key(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=key):
        parse({"Network": "10.0.0.0/16", key: value})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("IPv6Network", 6),
        ("IPv6Network", "10.0.0.0/8"),
        ("IPv6Network", "fd00::/129"),
        ("IPv6SubnetLen", "64"),
        ("IPv6SubnetLen", -64),
        ("IPv6SubnetMin", 1),
        ("IPv6SubnetMax", ["fd00::"]),
    ],
)
def test_ipv6_wrong_types_name_the_key(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=key):
        parse({"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd00::/48", key: value})


def test_config_error_is_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# --- what Go's decoder refuses (issue 11) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '{"Network":"10.0.0.0/16","x":' + "[" * 995 + "]" * 995 + "}",
        '{"Network":"10.0.0.0/16","x":' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"Network":"10.0.0.0/16","x":' + '{"a":' * 101 + "1" + "}" * 101 + "}",
        '{"Network":"10.0.0.0/16","x":' + "1" * 5000 + "}",
        '{"Network":"10.0.0.0/16","SubnetLen":' + "2" * 4301 + "}",
        '{"Network":"10.0.0.0/16","x":1e400}',
        '{"Network":"10.0.0.0/16","Backend":{"Type":"vxlan","VNI":NaN}}',
        '{"Network":"10.0.0.0/16","Backend":{"Type":"vxlan","VNI":-Infinity}}',
    ],
)
def test_json_go_refuses_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="not valid JSON") as e:
        parse_net_config(text)
    assert len(str(e.value)) < 200


def test_nesting_up_to_the_bound_is_accepted() -> None:
    text = '{"Network":"10.0.0.0/16","x":' + "[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1) + "}"
    assert parse_net_config(text).network == IPv4Network("10.0.0.0/16")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("Network", "10.0.0.0/255.255.0.0"),  # Python's netmask form; Go's ParseCIDR wants a length
        ("Network", "10.0.0.0/0.0.255.255"),
        ("Network", "10.0.0.0/+16"),
        ("Network", "10.0.0.0/1\u0666"),
        ("Network", "10.0.0.0/" + "1" * 5000),
        ("Network", "::ffff:10.0.0.0/112"),
    ],
)
def test_cidrs_go_refuses(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=key):
        parse({"Network": "10.0.0.0/16", key: value})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("IPv6Network", "fd00::%eth0/48"),
        ("IPv6Network", "fd00::/48%eth0"),
        ("IPv6SubnetMin", "fd00:0:0:1::%eth0"),
        ("IPv6SubnetMax", "fd00:0:0:ff::%1"),
    ],
)
def test_ipv6_zones_are_refused(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=key):
        parse({"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd00::/48", key: value})


def test_cidr_prefix_with_leading_zeros_reads_as_go_does() -> None:
    assert parse({"Network": "10.0.0.0/016"}).network == IPv4Network("10.0.0.0/16")


def test_loads_json_go_semantics() -> None:
    assert loads_json(b'{"a":"\xff"}') == {"a": "\ufffd"}
    assert loads_json('["\\udc80", {"\\ud800": "\\udfff"}, "\\ud83d\\ude00"]') == [
        "\ufffd",
        {"\ufffd": "\ufffd"},
        "\U0001f600",
    ]
    assert loads_json("-" + "9" * 308) == -int("9" * 308)
    for bad in ("NaN", "[Infinity]", "1e309", "-1e309", "1" * 310, "[" * 2000 + "]" * 2000):
        with pytest.raises(ValueError):
            loads_json(bad)


# --- reading the file: a size cap, regular files only, never blocking ----------------------------------------


def test_read_config_file(tmp_path: Path) -> None:
    p = tmp_path / "net-conf.json"
    p.write_bytes(b'{"Network":"10.0.0.0/16"}')
    assert read_config_file(str(p), "net conf") == b'{"Network":"10.0.0.0/16"}'
    p.write_bytes(b"x" * MAX_CONFIG_BYTES)
    assert len(read_config_file(str(p), "net conf")) == MAX_CONFIG_BYTES
    p.write_bytes(b"x" * (MAX_CONFIG_BYTES + 1))
    with pytest.raises(ConfigError, match=f"net conf {p}: larger than {MAX_CONFIG_BYTES} bytes"):
        read_config_file(str(p), "net conf")


def test_read_config_file_refuses_what_is_not_a_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # A FIFO without a writer would block a plain open() forever; here it is refused at once.
    with pytest.raises(ConfigError, match=f"cannot read net conf {fifo}: it is not a regular file"):
        read_config_file(str(fifo), "net conf")
    with pytest.raises(ConfigError, match="/dev/zero: it is not a regular file"):
        read_config_file("/dev/zero", "net conf")
    with pytest.raises(ConfigError, match="it is a directory"):
        read_config_file(str(tmp_path), "net conf")
    with pytest.raises(ConfigError, match="No such file or directory"):
        read_config_file(str(tmp_path / "missing"), "net conf")
    with pytest.raises(ConfigError, match="cannot read net conf"):
        read_config_file("a\0b", "net conf")


def test_read_config_file_follows_a_symlink_to_a_regular_file(tmp_path: Path) -> None:
    # kube-flannel's ConfigMap mount is a chain of symlinks.
    (tmp_path / "real").write_bytes(b"{}")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert read_config_file(str(tmp_path / "link"), "net conf") == b"{}"
