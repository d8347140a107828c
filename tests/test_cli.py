from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pyflannel.cli import DEFAULT_ETCD_ENDPOINTS, FLAGS, UsageError, main, parse_args
from pyflannel.lab import netns

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
    # Upstream: fmt.Fprintln(os.Stderr, version.Version), the release tag.
    assert main(["--version"]) == 0
    out = capsys.readouterr()
    assert out.out == ""
    assert re.fullmatch(r"v\d+\.\d+\.\d+\n", out.err)


# --- values as Go's flag package reads them (issue 11) --------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "want"),
    [("8471", 8471), ("+5", 5), ("0", 0), ("010", 8), ("0x1F", 31), ("0X10", 16), ("0o17", 15), ("0b101", 5),
     ("1_0", 10), ("0x_1f", 31), ("-0", 0)],
)  # fmt: skip
def test_integers_as_go_parseint_base_0(raw: str, want: int) -> None:
    # Go's flag.Int is strconv.ParseInt(s, 0, 64): base prefixes, a leading 0 is octal, `_` between digits.
    assert parse_args([f"--v={raw}"], {})["v"] == want
    assert parse_args([], {"FLANNELD_V": raw})["v"] == want


@pytest.mark.parametrize(
    "raw",
    ["\u0663", "1\u0660", " 5", "5 ", "", "1__0", "_10", "10_", "08", "0x", "1e3", "5.0", "--5", "0b2",
     "9223372036854775808", "-9223372036854775809", "9" * 5000],
)  # fmt: skip
def test_integers_go_refuses_are_usage_errors(raw: str) -> None:
    with pytest.raises(UsageError, match="invalid integer value") as e:
        parse_args([f"--v={raw}"], {})
    assert len(str(e.value)) < 200
    with pytest.raises(UsageError, match="FLANNELD_V"):
        parse_args([], {"FLANNELD_V": raw})


@pytest.mark.parametrize(("raw", "want"), [("1", True), ("t", True), ("T", True), ("TRUE", True), ("True", True),
                                           ("0", False), ("f", False), ("F", False), ("FALSE", False)])  # fmt: skip
def test_booleans_as_go_parsebool(raw: str, want: bool) -> None:
    assert parse_args([f"--ip-masq={raw}"], {})["ip-masq"] is want


@pytest.mark.parametrize("raw", ["tRuE", " true", "yes", "on", "2", ""])
def test_booleans_go_refuses_are_usage_errors(raw: str) -> None:
    with pytest.raises(UsageError, match="invalid boolean value"):
        parse_args([f"--ip-masq={raw}"], {})


@pytest.mark.parametrize("port", ["99999", "65536", "-1", "0x10000"])
def test_healthz_port_out_of_range_is_a_usage_error(port: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UsageError, match=r"--healthz-port must be between 0 .* and 65535"):
        parse_args([f"--healthz-port={port}"], {})
    assert main([f"--healthz-port={port}"]) == 2
    err = capsys.readouterr().err
    assert "--healthz-port must be between" in err
    assert "Traceback" not in err
    assert parse_args(["--healthz-port=65535"], {})["healthz-port"] == 65535


# --- the agent as a process: bad paths and endpoints fail at once, in one line --------------------------------

AGENT_MEMORY = 1 << 30  # RLIMIT_AS: an unbounded read fails here instead of exhausting the machine


def _agent(scope: netns.RunScope, ns: str, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = scope.tmpdir / f"agent-{len(scope.procs)}.log"
    cmd = ["prlimit", f"--as={AGENT_MEMORY}", "--", sys.executable, "-m", "pyflannel.cli", *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLANNELD_")}
    env["NODE_NAME"] = "n1"
    return scope.spawn(ns, cmd, log=log, env=env), log


def _exit_of(p: subprocess.Popen[bytes], log: Path, timeout: float = 20) -> tuple[int, str]:
    try:
        code = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()  # our own child, by PID (scope.close() would too)
        p.wait(timeout=5)
        pytest.fail(f"the agent was still running after {timeout}s:\n{log.read_text()[-2000:]}")
    return code, log.read_text()


def _one_clear_line(out: str, want: str) -> None:
    assert want in out, out
    assert "Traceback" not in out, out
    assert len([ln for ln in out.splitlines() if ln.startswith(("E", "F"))]) == 1, out


@pytest.mark.integration
def test_net_config_path_that_is_no_regular_file_fails_at_once(scope: netns.RunScope) -> None:
    ns = scope.add_ns("cli")
    fifo = scope.tmpdir / "fifo"
    os.mkfifo(fifo)
    big = scope.tmpdir / "big.json"
    with open(big, "wb") as f:
        f.truncate(8 << 30)  # sparse: 8 GiB that would not fit in the agent's 1 GiB
    for path, why in (("/dev/zero", "it is not a regular file"), (str(fifo), "it is not a regular file"),
                      (str(big), "larger than 1048576 bytes")):  # fmt: skip
        p, log = _agent(
            scope, ns, "--kube-subnet-mgr", "--kube-api-url=http://127.0.0.1:1", f"--net-config-path={path}"
        )
        code, out = _exit_of(p, log)
        assert code == 1, out
        _one_clear_line(out, f"failed to read net conf {path}: {why}")


@pytest.mark.integration
def test_bad_net_conf_is_one_line_naming_the_file(scope: netns.RunScope) -> None:
    ns = scope.add_ns("cli")
    conf = scope.tmpdir / "net-conf.json"
    conf.write_text('{"Network":"10.244.0.0/16","x":' + "[" * 5000 + "]" * 5000 + "}")
    p, log = _agent(scope, ns, "--kube-subnet-mgr", "--kube-api-url=http://127.0.0.1:1", f"--net-config-path={conf}")
    code, out = _exit_of(p, log)
    assert code == 1, out
    _one_clear_line(out, f"{conf}: net-conf.json is not valid JSON: JSON nested deeper than 100 levels")


@pytest.mark.integration
def test_etcd_endpoint_that_is_no_url_fails_at_once(scope: netns.RunScope) -> None:
    ns = scope.add_ns("cli")
    p, log = _agent(scope, ns, "--etcd-endpoints=not-a-url")
    code, out = _exit_of(p, log, timeout=10)
    assert code == 1, out
    _one_clear_line(out, "bad etcd endpoint 'not-a-url': expected http://HOST:PORT")


@pytest.mark.integration
def test_sigterm_ends_an_agent_waiting_for_etcd(scope: netns.RunScope) -> None:
    ns = scope.add_ns("cli")
    p, log = _agent(scope, ns, "--etcd-endpoints=http://127.0.0.1:1")  # nothing listens: it waits, retrying
    assert netns.wait_for(lambda: "retrying" in log.read_text(), timeout=20), log.read_text()
    assert p.poll() is None, log.read_text()
    p.send_signal(signal.SIGTERM)
    code, out = _exit_of(p, log, timeout=10)
    assert code == 0, out
    assert "Traceback" not in out, out


def test_healthz_port_out_of_range_in_the_environment_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="--healthz-port"):
        parse_args([], {"FLANNELD_HEALTHZ_PORT": "99999"})


def test_health_server_refuses_an_unusable_address_with_oserror() -> None:
    # Agent.run turns an OSError from the health server into one line and exit 1.
    from pyflannel.health import HealthServer

    async def start(host: str, port: int) -> None:
        await HealthServer(host, port, lambda: (True, "")).start()

    for host, port in (("127.0.0.1", 99999), ("127.0.0.1", -1), ("\udc80", 8471)):
        with pytest.raises(OSError):
            asyncio.run(start(host, port))
