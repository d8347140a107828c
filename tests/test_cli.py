from __future__ import annotations

import pytest

from pyflannel.cli import DEFAULT_ETCD_ENDPOINTS, FLAGS, UsageError, main, parse_args

UPSTREAM_FLAGS = {
    "etcd-endpoints", "etcd-prefix", "etcd-keyfile", "etcd-certfile", "etcd-cafile", "etcd-username",
    "etcd-password", "iface", "iface-regex", "iface-can-reach", "subnet-file", "public-ip", "public-ipv6",
    "subnet-lease-renew-margin", "ip-masq", "ip-masq-fully-random-disable", "kube-subnet-mgr", "kube-api-url",
    "kubeconfig-file", "kube-annotation-prefix", "version", "healthz-ip", "healthz-port", "iptables-resync",
    "iptables-forward-rules", "ip-blackhole-route", "net-config-path", "set-node-network-unavailable", "v",
}  # fmt: skip


def test_every_upstream_flag_is_accepted() -> None:
    assert {f.name for f in FLAGS} >= UPSTREAM_FLAGS


def test_defaults_match_upstream() -> None:
    o = parse_args([], {})
    assert o["etcd-endpoints"] == DEFAULT_ETCD_ENDPOINTS
    assert o["etcd-prefix"] == "/coreos.com/network"
    assert o["subnet-file"] == "/run/flannel/subnet.env"
    assert o["subnet-lease-renew-margin"] == 60
    assert o["iptables-resync"] == 5
    assert o["iptables-forward-rules"] is True
    assert o["healthz-ip"] == "0.0.0.0"
    assert o["healthz-port"] == 0
    assert o["kube-annotation-prefix"] == "flannel.alpha.coreos.com"
    assert o["net-config-path"] == "/etc/kube-flannel/net-conf.json"
    assert o["set-node-network-unavailable"] is True


def test_go_flag_syntax() -> None:
    o = parse_args(
        ["-etcd-prefix=/x", "--ip-masq", "--iptables-forward-rules=false", "--iface", "eth0", "-iface=10.0.0.1",
         "-v", "2", "--healthz-port=8471"],
        {},
    )  # fmt: skip
    assert o["etcd-prefix"] == "/x"
    assert o["ip-masq"] is True
    assert o["iptables-forward-rules"] is False
    assert o["iface"] == ["eth0", "10.0.0.1"]
    assert o["v"] == 2
    assert o["healthz-port"] == 8471


def test_environment_and_flag_precedence() -> None:
    env = {
        "FLANNELD_ETCD_PREFIX": "/env",
        "FLANNELD_IP_MASQ": "true",
        "FLANNELD_IFACE": "eth1,eth2",
        "FLANNELD_SUBNET_LEASE_RENEW_MARGIN": "30",
    }
    o = parse_args(["--etcd-prefix=/flag"], env)
    assert o["etcd-prefix"] == "/flag"
    assert o["ip-masq"] is True
    assert o["iface"] == ["eth1", "eth2"]
    assert o["subnet-lease-renew-margin"] == 30


@pytest.mark.parametrize(
    "argv",
    [["--nope"], ["--healthz-port=abc"], ["--ip-masq=maybe"], ["--subnet-lease-renew-margin=0"],
     ["--subnet-lease-renew-margin=1440"], ["--etcd-prefix"], ["stray"]],
)  # fmt: skip
def test_bad_flags_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        parse_args(argv, {})


def test_main_reports_usage_error_without_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--healthz-port=abc"]) == 2
    err = capsys.readouterr().err
    assert "invalid integer value 'abc' for -healthz-port" in err
    assert "Traceback" not in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip()
