"""Property tests of the parsers that read what other nodes and people write (issue 11).

The oracle everywhere: success, or the clear error of the documented kind (ConfigError, LeaseError,
SubnetEnvError, ValueError for a Node, StoreError for a watch line); never another exception. What succeeds
must also survive its own round trip (the wire form written back reads as the same value).

Bounded for CI: PYFLANNEL_FUZZ_EXAMPLES examples per property (default 200, derandomized so a CI run is
repeatable); set it higher for a longer, randomized run, e.g. `PYFLANNEL_FUZZ_EXAMPLES=20000 pytest
tests/test_properties.py`.
"""

from __future__ import annotations

import json
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any

import pytest
from fuzzing import any_json, fuzz_settings
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from pyflannel.config import MAX_JSON_DEPTH, ConfigError, NetConfig, parse_net_config
from pyflannel.lease import Lease, LeaseAttrs, LeaseError, make_subnet_key, parse_subnet_key
from pyflannel.store.base import StoreError
from pyflannel.store.kube import Annotations, KubeOptions, KubeStore, node_to_lease
from pyflannel.subnetenv import SubnetEnv, SubnetEnvError, parse_subnet_env, read_subnet_env, write_subnet_env

FUZZ = fuzz_settings(200, HealthCheck.filter_too_much)

# --- strategies -------------------------------------------------------------------------------------------------

json_values = any_json(int_bound=10**30, text=20, leaves=20)

# Pieces that broke decoders before: numbers past float64 or int()'s digit limit, non-JSON constants, lone
# surrogates, zones, deep nesting, control characters, byte order marks.
NASTY = [
    "NaN", "Infinity", "-Infinity", "1e400", "-1e400", "9" * 400, "9" * 5000, "1.5", "-0", "0x10", "\\udc80",
    "\\ud800\\udc00", '"', "\\", "{", "}", "[", "]", ",", ":", " ", "\n", "\x00", "\ufeff", "null", "true",
    "%eth0", "/", "::", ".", "-", "&", "\u0663", "\udc80",
]  # fmt: skip


@st.composite
def deep(draw: st.DrawFn) -> str:
    n = draw(st.sampled_from([MAX_JSON_DEPTH - 1, MAX_JSON_DEPTH, MAX_JSON_DEPTH + 1, 995, 3000]))
    opener = draw(st.sampled_from(["[", '{"a":']))
    closer = "]" if opener == "[" else "}"
    inner = draw(st.sampled_from(["", "1", "null"])) if opener != "[" else ""
    return opener * n + (inner or ("1" if opener != "[" else "")) + closer * n


def spliced(base: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A valid text with NASTY pieces or deep nesting inserted at random places."""

    @st.composite
    def build(draw: st.DrawFn) -> str:
        text = draw(base)
        for _ in range(draw(st.integers(0, 3))):
            piece = draw(st.sampled_from(NASTY) | deep())
            at = draw(st.integers(0, len(text)))
            text = text[:at] + piece + text[at:]
        return text

    return build()


NET_KEYS = [
    "Network", "SubnetLen", "SubnetMin", "SubnetMax", "EnableIPv4", "EnableIPv6", "EnableNFTables", "IPv6Network",
    "IPv6SubnetLen", "IPv6SubnetMin", "IPv6SubnetMax", "Backend",
]  # fmt: skip
v4_nets = st.builds(lambda a, p: str(IPv4Network((a, p), strict=False)), st.integers(0, 2**32 - 1), st.integers(0, 32))
v6_nets = st.builds(
    lambda a, p: str(IPv6Network((a, p), strict=False)), st.integers(0, 2**128 - 1), st.integers(0, 128)
)
addresses = st.ip_addresses().map(str)
net_values = (
    v4_nets
    | v6_nets
    | addresses
    | st.integers(-5, 140)
    | st.booleans()
    | st.sampled_from(["10.244.0.0/16", "fd00::/48", "10.244.1.0", "fd00:0:0:1::", "", "fd00::%eth0/48"])
    | st.builds(lambda t: {"Type": t}, st.sampled_from(["vxlan", "host-gw", "ipip", "VXLAN", "", 7]))
    | json_values
)


@st.composite
def net_conf_objects(draw: st.DrawFn) -> dict[str, Any]:
    keys = draw(st.lists(st.sampled_from(NET_KEYS), max_size=8))
    obj: dict[str, Any] = {}
    for k in keys:
        k = draw(st.sampled_from([k, k.lower(), k.upper()]))
        obj[k] = draw(net_values)
    return obj


net_conf_texts = (
    st.text(max_size=80)
    | net_conf_objects().map(json.dumps)
    | spliced(net_conf_objects().map(json.dumps))
    | spliced(st.just('{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":1}}'))
)


# --- net-conf.json ----------------------------------------------------------------------------------------------


def _check_net_config(net: NetConfig) -> None:
    assert net.enable_ipv4 or net.enable_ipv6
    if net.enable_ipv4:
        assert net.network is not None and net.subnet_min is not None and net.subnet_max is not None
        assert net.network.prefixlen + 2 <= net.subnet_len <= 30
        assert net.subnet_min <= net.subnet_max
        assert net.subnet_min in net.network and net.subnet_max in net.network
    if net.enable_ipv6:
        assert net.ipv6_network is not None and net.ipv6_subnet_min is not None and net.ipv6_subnet_max is not None
        assert net.ipv6_network.prefixlen + 2 <= net.ipv6_subnet_len <= 126
        assert net.ipv6_subnet_min in net.ipv6_network and net.ipv6_subnet_max in net.ipv6_network
    json.dumps(net.raw, allow_nan=False)  # what was accepted is JSON and can be written again


@FUZZ
@given(st.one_of(net_conf_texts, net_conf_texts.map(lambda t: t.encode("utf-8", "surrogatepass")), st.binary()))
def test_net_conf_parses_or_is_a_config_error(text: str | bytes) -> None:
    try:
        net = parse_net_config(text)
    except ConfigError as e:
        assert "\n" not in str(e) and len(str(e)) < 400, str(e)
        return
    _check_net_config(net)


# --- lease keys -------------------------------------------------------------------------------------------------


@st.composite
def subnet_pairs(draw: st.DrawFn) -> tuple[IPv4Network | None, IPv6Network | None]:
    sn = IPv4Network((draw(st.integers(0, 2**32 - 1)), draw(st.integers(1, 32))), strict=False)
    sn6 = IPv6Network((draw(st.integers(0, 2**128 - 1)), draw(st.integers(0, 128))), strict=False)
    shape = draw(st.sampled_from(["v4", "v6", "dual"]))
    return (sn if shape != "v6" else None), (sn6 if shape != "v4" else None)


key_texts = (
    subnet_pairs().map(lambda p: make_subnet_key(*p))
    | spliced(subnet_pairs().map(lambda p: make_subnet_key(*p)))
    | st.text(alphabet="0123456789.-&abcdefABCDEF:%/ x\n\u0663", max_size=50)
)


@FUZZ
@given(subnet_pairs())
def test_every_key_we_write_reads_back(pair: tuple[IPv4Network | None, IPv6Network | None]) -> None:
    assert parse_subnet_key(make_subnet_key(*pair)) == pair


@FUZZ
@given(key_texts)
def test_lease_key_parses_to_its_canonical_self_or_is_a_lease_error(key: str) -> None:
    try:
        sn, sn6 = parse_subnet_key(key)
    except LeaseError as e:
        assert len(str(e)) < 400
        return
    assert make_subnet_key(sn, sn6) == key  # only the one spelling upstream's MakeSubnetKey writes


# --- lease values -----------------------------------------------------------------------------------------------

LEASE_KEYS = ["PublicIP", "PublicIPv6", "BackendType", "BackendData", "BackendV6Data"]
lease_field_values = addresses | st.sampled_from(["0.0.0.0", "", "fe80::1%eth0", "vxlan"]) | json_values


@st.composite
def lease_objects(draw: st.DrawFn) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for k in draw(st.lists(st.sampled_from(LEASE_KEYS), max_size=6)):
        obj[draw(st.sampled_from([k, k.lower()]))] = draw(lease_field_values)
    return obj


lease_texts = (
    st.text(max_size=60)
    | lease_objects().map(json.dumps)
    | spliced(lease_objects().map(json.dumps))
    | spliced(st.just('{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1}}'))
)


@FUZZ
@given(st.one_of(lease_texts, lease_texts.map(lambda t: t.encode("utf-8", "surrogatepass")), st.binary()))
def test_lease_value_decodes_or_is_a_lease_error(text: str | bytes) -> None:
    try:
        attrs = LeaseAttrs.from_json(text)
    except LeaseError as e:
        assert len(str(e)) < 400, str(e)
        return
    out = attrs.to_json()
    out.encode("utf-8")  # no lone surrogate survives
    json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} written"))
    assert LeaseAttrs.from_json(out) == attrs
    assert LeaseAttrs.from_json(out).to_json() == out


# --- subnet.env -------------------------------------------------------------------------------------------------

ENV_KEYS = ["FLANNEL_NETWORK", "FLANNEL_SUBNET", "FLANNEL_IPV6_NETWORK", "FLANNEL_IPV6_SUBNET", "FLANNEL_MTU",
            "FLANNEL_IPMASQ", "OTHER", "# comment"]  # fmt: skip
env_values = (
    v4_nets
    | v6_nets
    | st.builds(lambda a, b: f"{a},{b}", v4_nets, v4_nets)
    | st.integers(-1, 2**33).map(str)
    | st.sampled_from(["true", "false", "TRUE", "", "1_0", "\u0663", "10.0.0.1%x/8", "fd00::1%eth0/64"])
    | st.text(max_size=20)
)


@st.composite
def env_texts(draw: st.DrawFn) -> str:
    lines = []
    for _ in range(draw(st.integers(0, 8))):
        key = draw(st.sampled_from(ENV_KEYS))
        sep = draw(st.sampled_from(["=", "=", "=", " = ", ""]))
        lines.append(f"{key}{sep}{draw(env_values)}")
    return "\n".join(lines) + draw(st.sampled_from(["", "\n", "\r\n"]))


@FUZZ
@given(env_texts() | spliced(env_texts()) | st.text(max_size=80))
def test_subnet_env_parses_or_is_a_subnet_env_error(text: str) -> None:
    try:
        env = parse_subnet_env(text)
    except SubnetEnvError as e:
        assert len(str(e)) < 400, str(e)
        return
    assert parse_subnet_env(env.render()) == env


@st.composite
def subnet_envs(draw: st.DrawFn) -> SubnetEnv:
    def net4() -> IPv4Network:
        return IPv4Network((draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 32))), strict=False)

    def net6() -> IPv6Network:
        return IPv6Network((draw(st.integers(0, 2**128 - 1)), draw(st.integers(0, 128))), strict=False)

    v4, v6 = draw(st.sampled_from([(True, False), (False, True), (True, True)]))
    return SubnetEnv(
        networks=tuple(net4() for _ in range(draw(st.integers(1, 2)))) if v4 else (),
        subnet=net4() if v4 else None,
        ipv6_networks=tuple(net6() for _ in range(draw(st.integers(1, 2)))) if v6 else (),
        ipv6_subnet=net6() if v6 else None,
        mtu=draw(st.integers(0, 2**32 - 1)),
        ipmasq=draw(st.booleans()),
    )


@FUZZ
@given(subnet_envs())
def test_every_subnet_env_we_write_reads_back(env: SubnetEnv) -> None:
    # Including /32 and /128 subnets and the last address of the space (issue 11: 10.0.0.5/32 came back as .6).
    assert parse_subnet_env(env.render()) == env


def test_written_subnet_env_reads_back_from_disk(tmp_path: Path) -> None:
    @FUZZ
    @given(subnet_envs())
    def prop(env: SubnetEnv) -> None:
        write_subnet_env(tmp_path / "subnet.env", env)
        assert read_subnet_env(tmp_path / "subnet.env") == env

    prop()


# --- kube annotations -------------------------------------------------------------------------------------------

P = "flannel.alpha.coreos.com/"
ANN = Annotations.for_prefix(P)
NETS = [
    parse_net_config('{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}'),
    parse_net_config('{"EnableIPv6":true,"Network":"10.244.0.0/16","IPv6Network":"fd00::/48"}'),
    parse_net_config('{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/48"}'),
]
ANN_KEYS = ["kube-subnet-manager", "backend-type", "backend-data", "backend-v6-data", "public-ip", "public-ipv6"]
annotation_values = (
    st.just("true")
    | addresses
    | json_values.map(json.dumps)
    | spliced(st.just('{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}'))
    | st.sampled_from(["null", "", "vxlan", "fe80::1%eth0", "192.168.77.012"])
    | json_values
)
cidr_values = v4_nets | v6_nets | st.sampled_from(["10.244.3.0/24", "fd00:0:0:3::/64", "fd00::%1/64"]) | json_values


@st.composite
def nodes(draw: st.DrawFn) -> Any:
    annotations: dict[str, Any] = {P + "kube-subnet-manager": "true"}
    for k in draw(st.lists(st.sampled_from(ANN_KEYS), max_size=8)):
        annotations[P + k] = draw(annotation_values)
    spec: Any = draw(
        st.sampled_from(["podCIDRs", "podCIDR", "both", "none"]).flatmap(
            lambda shape: st.builds(
                lambda cidrs, one: {"podCIDRs": cidrs, "podCIDR": one} if shape == "both"
                else {"podCIDRs": cidrs} if shape == "podCIDRs"
                else {"podCIDR": one} if shape == "podCIDR" else {},
                st.lists(cidr_values, max_size=3) | json_values,
                cidr_values,
            )
        )
    )  # fmt: skip
    node: Any = {"metadata": {"name": draw(st.text(max_size=5)), "annotations": annotations}, "spec": spec}
    return draw(st.sampled_from([node, node, node, {"metadata": draw(json_values)}, draw(json_values)]))


@FUZZ
@given(nodes(), st.sampled_from(NETS))
def test_node_decodes_or_is_a_value_error(node: Any, net: NetConfig) -> None:
    try:
        lease = node_to_lease(node, ANN, net)
    except ValueError as e:
        assert len(str(e)) < 400, str(e)
        return
    if lease is None:
        return
    assert isinstance(lease, Lease)
    assert (lease.subnet is not None) == net.enable_ipv4
    assert (lease.ipv6_subnet is not None) == net.enable_ipv6
    lease.attrs.to_json().encode("utf-8")


@FUZZ
@given(st.lists(nodes(), max_size=3), st.sampled_from(NETS))
def test_node_list_never_fails_the_store(items: list[Any], net: NetConfig) -> None:
    store = KubeStore(KubeOptions(node_name="n1"))
    for lease in store._leases(items, net, {}).values():
        assert isinstance(lease, Lease)


watch_lines = (
    st.builds(
        lambda t, n: json.dumps({"type": t, "object": n}),
        st.sampled_from(["ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR", "OTHER"]),
        nodes(),
    )
    | spliced(st.just('{"type":"ADDED","object":{"metadata":{"name":"a","resourceVersion":"5"}}}'))
    | st.text(max_size=40)
)


@FUZZ
@given(st.lists(watch_lines, min_size=1, max_size=4), st.sampled_from(NETS))
def test_watch_lines_apply_or_are_store_errors(lines: list[str], net: NetConfig) -> None:
    store = KubeStore(KubeOptions(node_name="n1"))
    current: dict[str, Lease] = {}
    for line in lines:
        try:
            store._apply_watch_line(line.encode("utf-8", "surrogatepass"), "1", current, net, [])
        except StoreError:
            pass  # the watch re-lists; _WatchGone is the 410 case, handled the same way by the loop
        except Exception as e:  # pragma: no cover - the property under test
            if type(e).__name__ != "_WatchGone":
                raise
