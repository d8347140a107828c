"""subnet.env rendering, atomic writing and reading, against upstream's WriteSubnetFile and the CNI plugin's reader."""

from __future__ import annotations

import os
import stat
import threading
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

import pytest

from pyflannel.subnetenv import SubnetEnv, SubnetEnvError, parse_subnet_env, read_subnet_env, write_subnet_env

DUAL = SubnetEnv(
    networks=(IPv4Network("10.42.0.0/16"),),
    subnet=IPv4Network("10.42.0.0/24"),
    ipv6_networks=(IPv6Network("2001:cafe:42::/56"),),
    ipv6_subnet=IPv6Network("2001:cafe:42::/64"),
    mtu=1450,
    ipmasq=True,
)
DUAL_TEXT = (
    "FLANNEL_NETWORK=10.42.0.0/16\n"
    "FLANNEL_SUBNET=10.42.0.1/24\n"
    "FLANNEL_IPV6_NETWORK=2001:cafe:42::/56\n"
    "FLANNEL_IPV6_SUBNET=2001:cafe:42::1/64\n"
    "FLANNEL_MTU=1450\n"
    "FLANNEL_IPMASQ=true\n"
)
V4 = SubnetEnv(networks=(IPv4Network("10.42.0.0/16"),), subnet=IPv4Network("10.42.0.0/24"), mtu=1450, ipmasq=True)
V4_TEXT = "FLANNEL_NETWORK=10.42.0.0/16\nFLANNEL_SUBNET=10.42.0.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
V6 = SubnetEnv(
    ipv6_networks=(IPv6Network("2001:cafe:42::/56"),),
    ipv6_subnet=IPv6Network("2001:cafe:42::/64"),
    mtu=1430,
    ipmasq=False,
)
V6_TEXT = (
    "FLANNEL_IPV6_NETWORK=2001:cafe:42::/56\n"
    "FLANNEL_IPV6_SUBNET=2001:cafe:42::1/64\n"
    "FLANNEL_MTU=1430\n"
    "FLANNEL_IPMASQ=false\n"
)


# --- render ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("env", "text"), [(DUAL, DUAL_TEXT), (V4, V4_TEXT), (V6, V6_TEXT)])
def test_render_exact(env: SubnetEnv, text: str) -> None:
    assert env.render() == text


@pytest.mark.parametrize(("env", "text"), [(DUAL, DUAL_TEXT), (V4, V4_TEXT), (V6, V6_TEXT)])
def test_parse_render_round_trip(env: SubnetEnv, text: str) -> None:
    assert parse_subnet_env(text) == env
    assert parse_subnet_env(text).render() == text


def test_render_first_usable_address_of_non_24() -> None:
    env = SubnetEnv(
        networks=(IPv4Network("192.168.0.16/28"),),
        subnet=IPv4Network("192.168.0.20/30"),
        ipv6_networks=(IPv6Network("fd00::/48"),),
        ipv6_subnet=IPv6Network("fd00:0:0:ffff::/64"),
        mtu=1500,
    )
    assert env.render() == (
        "FLANNEL_NETWORK=192.168.0.16/28\n"
        "FLANNEL_SUBNET=192.168.0.21/30\n"
        "FLANNEL_IPV6_NETWORK=fd00::/48\n"
        "FLANNEL_IPV6_SUBNET=fd00:0:0:ffff::1/64\n"
        "FLANNEL_MTU=1500\n"
        "FLANNEL_IPMASQ=false\n"
    )


def test_render_cni_plugin_example() -> None:
    env = SubnetEnv(networks=(IPv4Network("10.1.0.0/16"),), subnet=IPv4Network("10.1.17.0/24"), mtu=1472, ipmasq=True)
    assert (
        env.render()
        == "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n"
    )


def test_render_multiple_networks_comma_separated() -> None:
    env = SubnetEnv(
        networks=(IPv4Network("10.42.0.0/16"), IPv4Network("10.43.0.0/16")),
        subnet=IPv4Network("10.43.7.0/24"),
        mtu=1450,
    )
    assert env.render().splitlines()[:2] == ["FLANNEL_NETWORK=10.42.0.0/16,10.43.0.0/16", "FLANNEL_SUBNET=10.43.7.1/24"]


# --- parse ----------------------------------------------------------------------------------------------------


def test_parse_upstream_file() -> None:
    env = parse_subnet_env(DUAL_TEXT)
    assert env.networks == (IPv4Network("10.42.0.0/16"),)
    # The stored value is the address 10.42.0.1/24; the subnet is its network.
    assert env.subnet == IPv4Network("10.42.0.0/24")
    assert env.ipv6_networks == (IPv6Network("2001:cafe:42::/56"),)
    assert env.ipv6_subnet == IPv6Network("2001:cafe:42::/64")
    assert env.mtu == 1450
    assert env.ipmasq is True


def test_parse_comma_separated_networks() -> None:
    env = parse_subnet_env(
        "FLANNEL_NETWORK=10.42.0.0/16,10.43.0.0/16, 10.44.0.0/16\n"
        "FLANNEL_SUBNET=10.43.7.1/24\n"
        "FLANNEL_IPV6_NETWORK=fd00:1::/56,fd00:2::/56\n"
        "FLANNEL_IPV6_SUBNET=fd00:2:0:3::1/64\n"
        "FLANNEL_MTU=1450\n"
        "FLANNEL_IPMASQ=false\n"
    )
    assert env.networks == tuple(IPv4Network(n) for n in ("10.42.0.0/16", "10.43.0.0/16", "10.44.0.0/16"))
    assert env.ipv6_networks == (IPv6Network("fd00:1::/56"), IPv6Network("fd00:2::/56"))
    assert env.subnet == IPv4Network("10.43.7.0/24")
    assert env.ipv6_subnet == IPv6Network("fd00:2:0:3::/64")
    assert env.ipmasq is False


def test_parse_tolerates_blank_lines_comments_and_no_final_newline() -> None:
    env = parse_subnet_env(
        "# written by hand\n\nFLANNEL_NETWORK=10.1.0.0/16\n  FLANNEL_SUBNET=10.1.17.1/24  \nFLANNEL_MTU=1472"
    )
    assert env.networks == (IPv4Network("10.1.0.0/16"),)
    assert env.subnet == IPv4Network("10.1.17.0/24")
    assert env.mtu == 1472
    assert env.ipmasq is False


def test_parse_missing_values_default() -> None:
    env = parse_subnet_env("FLANNEL_MTU=1450\n")
    assert env == SubnetEnv(mtu=1450)
    assert parse_subnet_env("") == SubnetEnv()


def test_parse_ignores_unknown_variables() -> None:
    env = parse_subnet_env(V4_TEXT + "FLANNEL_SOMETHING_NEW=1\nOTHER=x=y\n")
    assert env == V4


@pytest.mark.parametrize("value", ["true", "True", "TRUE"])
def test_parse_ipmasq_true(value: str) -> None:
    assert parse_subnet_env(f"FLANNEL_IPMASQ={value}\n").ipmasq is True


@pytest.mark.parametrize("value", ["false", "", "1", "yes"])
def test_parse_ipmasq_not_true(value: str) -> None:
    assert parse_subnet_env(f"FLANNEL_IPMASQ={value}\n").ipmasq is False


@pytest.mark.parametrize(
    "text",
    [
        "FLANNEL_NETWORK=10.42.0.0/16\nFLANNEL_SUBNET\n",
        "garbage\n",
        "FLANNEL_NETWORK=10.42.0.0/33\n",
        "FLANNEL_NETWORK=not-a-cidr\n",
        "FLANNEL_NETWORK=fd00::/48\n",
        "FLANNEL_NETWORK=10.42.0.0/16,bogus\n",
        "FLANNEL_SUBNET=10.42.300.1/24\n",
        "FLANNEL_SUBNET=2001:cafe:42::1/64\n",
        "FLANNEL_IPV6_NETWORK=10.0.0.0/8\n",
        "FLANNEL_IPV6_SUBNET=fd00::zz/64\n",
        "FLANNEL_MTU=abc\n",
        "FLANNEL_MTU=1450.5\n",
        # what Go's ParseCIDR and the CNI plugin's strconv.ParseUint(s, 10, 32) refuse (issue 11)
        "FLANNEL_IPV6_SUBNET=fd00::1%eth0/64\n",
        "FLANNEL_IPV6_NETWORK=fd00::%1/48\n",
        "FLANNEL_NETWORK=10.42.0.0/255.255.0.0\n",
        "FLANNEL_SUBNET=10.42.0.1\n",
        "FLANNEL_MTU=\u0663\n",
        "FLANNEL_MTU=1_0\n",
        "FLANNEL_MTU=-1\n",
        "FLANNEL_MTU=+1450\n",
        "FLANNEL_MTU=4294967296\n",
        "FLANNEL_MTU=" + "9" * 5000 + "\n",
    ],
)
def test_parse_malformed_raises(text: str) -> None:
    with pytest.raises(SubnetEnvError):
        parse_subnet_env(text)


def test_parse_malformed_error_is_one_short_line() -> None:
    with pytest.raises(SubnetEnvError) as e:
        parse_subnet_env("FLANNEL_MTU=" + "9" * 5000 + "\n")
    assert len(str(e.value)) < 300


@pytest.mark.parametrize(
    ("subnet", "line"),
    [
        (IPv4Network("10.0.0.5/32"), "FLANNEL_SUBNET=10.0.0.5/32"),
        (IPv4Network("255.255.255.255/32"), "FLANNEL_SUBNET=255.255.255.255/32"),
        (IPv4Network("10.0.0.4/31"), "FLANNEL_SUBNET=10.0.0.5/31"),
        (IPv4Network("255.255.255.254/31"), "FLANNEL_SUBNET=255.255.255.255/31"),
        (IPv6Network("fd00::5/128"), "FLANNEL_IPV6_SUBNET=fd00::5/128"),
        (IPv6Network("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128"),
         "FLANNEL_IPV6_SUBNET=ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128"),
    ],
)  # fmt: skip
def test_single_address_subnets_round_trip(subnet: IPv4Network | IPv6Network, line: str) -> None:
    # Upstream writes <address + 1>/32: 10.0.0.6/32 for 10.0.0.5/32 (a subnet the node does not own) and wraps
    # 255.255.255.255/32 to 0.0.0.0/32. The address itself is the only one a single-address subnet has.
    env = SubnetEnv(subnet=subnet) if subnet.version == 4 else SubnetEnv(ipv6_subnet=subnet)
    text = env.render()
    assert line + "\n" in text
    assert parse_subnet_env(text) == env


def test_subnet_env_error_is_value_error() -> None:
    assert issubclass(SubnetEnvError, ValueError)


# --- read -----------------------------------------------------------------------------------------------------


def test_read_missing_file_is_none(tmp_path: Path) -> None:
    assert read_subnet_env(tmp_path / "nope" / "subnet.env") is None


def test_read_malformed_file_is_none(tmp_path: Path) -> None:
    p = tmp_path / "subnet.env"
    p.write_text("FLANNEL_SUBNET=banana\n")
    assert read_subnet_env(p) is None
    p.write_bytes(b"FLANNEL_MTU=\xff\xfe\n")
    assert read_subnet_env(p) is None


def test_read_directory_is_none(tmp_path: Path) -> None:
    assert read_subnet_env(tmp_path) is None


def test_read_device_fifo_or_huge_file_is_none_at_once(tmp_path: Path) -> None:
    # --subnet-file=/dev/zero must not be read without bound, and a FIFO must not block the agent's start.
    assert read_subnet_env("/dev/zero") is None
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert read_subnet_env(fifo) is None
    big = tmp_path / "big"
    big.write_bytes(V4_TEXT.encode() + b"#" * (2 << 20))
    assert read_subnet_env(big) is None


def test_read_upstream_file(tmp_path: Path) -> None:
    p = tmp_path / "subnet.env"
    p.write_text(DUAL_TEXT)
    assert read_subnet_env(p) == DUAL
    assert read_subnet_env(str(p)) == DUAL


# --- write ----------------------------------------------------------------------------------------------------


def test_write_exact_bytes_mode_and_parent(tmp_path: Path) -> None:
    p = tmp_path / "run" / "flannel" / "subnet.env"
    old_umask = os.umask(0o077)
    try:
        write_subnet_env(p, DUAL)
    finally:
        os.umask(old_umask)
    assert p.read_bytes() == DUAL_TEXT.encode()
    # 0644 whatever the umask: the CNI plugin may run as another user.
    assert stat.S_IMODE(p.stat().st_mode) == 0o644
    assert p.parent.is_dir()
    assert sorted(os.listdir(p.parent)) == ["subnet.env"]


@pytest.mark.parametrize(("env", "text"), [(V4, V4_TEXT), (V6, V6_TEXT)])
def test_write_single_family(tmp_path: Path, env: SubnetEnv, text: str) -> None:
    p = tmp_path / "subnet.env"
    write_subnet_env(str(p), env)
    assert p.read_text() == text
    assert read_subnet_env(p) == env


def test_write_replaces_by_rename(tmp_path: Path) -> None:
    p = tmp_path / "subnet.env"
    write_subnet_env(p, V4)
    reader = open(p, "rb")  # noqa: SIM115 - held open across the rewrite on purpose
    try:
        inode = p.stat().st_ino
        write_subnet_env(p, DUAL)
        # A reader holding the old file sees it whole; the path now names a new inode with the new content.
        assert reader.read() == V4_TEXT.encode()
        assert p.stat().st_ino != inode
        assert p.read_text() == DUAL_TEXT
    finally:
        reader.close()
    assert sorted(os.listdir(tmp_path)) == ["subnet.env"]


def test_write_keeps_existing_mode(tmp_path: Path) -> None:
    # Upstream preserves the permissions of an existing file.
    p = tmp_path / "subnet.env"
    write_subnet_env(p, V4)
    p.chmod(0o600)
    write_subnet_env(p, DUAL)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert p.read_text() == DUAL_TEXT


def test_write_failure_leaves_no_temp_file(tmp_path: Path) -> None:
    # The target is a directory, so the final rename fails after the temp file was written.
    p = tmp_path / "subnet.env"
    p.mkdir()
    (p / "keep").write_text("x")
    with pytest.raises(OSError):
        write_subnet_env(p, V4)
    assert sorted(os.listdir(tmp_path)) == ["subnet.env"]
    assert p.is_dir()


def test_write_parent_is_a_file_raises(tmp_path: Path) -> None:
    (tmp_path / "run").write_text("")
    with pytest.raises(OSError):
        write_subnet_env(tmp_path / "run" / "subnet.env", V4)


def test_concurrent_reader_never_sees_partial_file(tmp_path: Path) -> None:
    p = tmp_path / "subnet.env"
    write_subnet_env(p, V4)
    seen: set[str] = set()
    stop = threading.Event()

    def read_loop() -> None:
        while not stop.is_set():
            seen.add(p.read_text())

    t = threading.Thread(target=read_loop)
    t.start()
    try:
        for i in range(200):
            write_subnet_env(p, DUAL if i % 2 else V4)
    finally:
        stop.set()
        t.join(timeout=10)
    assert not t.is_alive()
    assert seen <= {V4_TEXT, DUAL_TEXT}
    assert sorted(os.listdir(tmp_path)) == ["subnet.env"]
