"""The extension backend's command runner and peer handling, with real processes (no namespaces needed).

Each command here is a small Python program that reports what it got (argv, stdin, environment) as JSON, so
the assertions see exactly what reached it; marker files show that shell syntax in the data never ran.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
import time
from collections.abc import Coroutine
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, TypeVar

import pytest

from pyflannel.backend.base import BackendError
from pyflannel.backend.extension import ExtensionBackend, run_command, split_command
from pyflannel.config import parse_net_config
from pyflannel.iface import ExternalInterface
from pyflannel.lease import Lease, LeaseAttrs
from pyflannel.netlink import Netlink

REPORT = "import json, os, sys; print(json.dumps({'argv': sys.argv[1:], 'stdin': sys.stdin.read(), " \
    "'env': {k: os.environ.get(k) for k in ('SUBNET', 'PUBLIC_IP', 'NETWORK')}}))"  # fmt: skip

HOSTILE = "a'b\"c $(touch {m}/dollar) `touch {m}/tick`; touch {m}/semi && touch {m}/and | touch {m}/pipe \\ $HOME"


T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def test_words_without_a_shell_and_data_on_stdin(tmp_path: Path) -> None:
    hostile = HOSTILE.format(m=tmp_path)
    argv = split_command("SubnetAddCommand", f"{shlex.quote(sys.executable)} -c {shlex.quote(REPORT)} 'two words' $X")
    res = run(run_command(argv, stdin=hostile.encode(), env={"SUBNET": "10.1.2.0/24"}, timeout=30))
    assert res.ok, res
    got = json.loads(res.output)
    assert got["argv"] == ["two words", "$X"]  # quotes grouped words; no variable was expanded
    assert got["stdin"] == hostile
    assert got["env"]["SUBNET"] == "10.1.2.0/24"
    assert list(tmp_path.iterdir()) == []  # nothing in the data ran


def test_a_hung_command_is_killed_at_its_bound_with_what_it_started() -> None:
    script = "import subprocess, sys, time; subprocess.Popen(['sleep', '300']); print('started', flush=True); " \
        "time.sleep(300)"  # fmt: skip
    t0 = time.monotonic()
    res = run(run_command([sys.executable, "-c", script], stdin=b"", env={}, timeout=1.5))
    took = time.monotonic() - t0
    assert res.timed_out and res.returncode is None and not res.ok
    assert res.output == "started"
    assert "time limit" in res.describe()
    assert took < 60  # bounded: the grandchild holding the pipe was killed with it, or this would hang


def test_output_is_bounded_and_a_missing_program_is_reported() -> None:
    spew = "import sys; sys.stdout.write('x' * (4 << 20))"
    res = run(run_command([sys.executable, "-c", spew], stdin=b"", env={}, timeout=30, limit=1000))
    assert res.ok and res.output == "x" * 1000
    res = run(run_command(["/nonexistent/prog"], stdin=b"", env={}, timeout=5))
    assert not res.ok and "cannot run /nonexistent/prog" in res.error


@pytest.mark.parametrize(
    "backend, why",
    [
        ({"Type": "extension", "SubnetAddCommand": "echo 'unbalanced"}, "cannot split"),
        ({"Type": "extension", "SubnetAddCommand": 3}, "expected a string"),
        ({"Type": "extension", "CommandTimeout": "x"}, "expected a number"),
    ],
)
def test_bad_options_are_one_line_errors(backend: dict[str, object], why: str) -> None:
    cfg = parse_net_config(json.dumps({"Network": "10.5.0.0/16", "Backend": backend}))
    with pytest.raises(BackendError, match=why):
        ExtensionBackend.check_config(cfg)


def _backend(tmp_path: Path, **commands: str) -> ExtensionBackend:
    cfg = parse_net_config(json.dumps({"Network": "10.5.0.0/16", "Backend": {"Type": "extension", **commands}}))
    ext = ExternalInterface("eth0", 2, 1500, IPv4Address("192.0.2.1"), None, IPv4Address("192.0.2.1"), None)
    return ExtensionBackend(cfg, ext, Netlink())


def _lease(third: int, data: object, btype: str = "extension") -> Lease:
    attrs = LeaseAttrs(public_ip=IPv4Address(f"192.0.2.{third}"), backend_type=btype, backend_data=data)
    return Lease(IPv4Network(f"10.5.{third}.0/24"), None, attrs)


def test_peer_commands_get_the_peers_data_once_per_event(tmp_path: Path) -> None:
    cmd = f"{shlex.quote(sys.executable)} -c {shlex.quote(REPORT)}"
    be = _backend(
        tmp_path, SubnetAddCommand=f"{cmd} add", SubnetRemoveCommand=f"{cmd} remove", PreStartupCommand=f"{cmd} pre"
    )
    hostile = HOSTILE.format(m=tmp_path)

    async def scenario() -> None:
        attrs = await be.prepare()
        assert attrs.backend_type == "extension" and isinstance(attrs.backend_data, str)
        assert json.loads(attrs.backend_data)["argv"] == ["pre"]  # its output is the lease's BackendData
        peer, other = _lease(7, hostile), _lease(8, None, btype="vxlan")
        await be.reconcile([peer, other])
        await be.reconcile([peer, other])  # nothing changed: no second run
        await be.remove_peer(peer)

    run(scenario())
    runs = [(key, json.loads(r.output)) for key, r in be.runs]
    assert [k for k, _ in runs] == ["PreStartupCommand", "SubnetAddCommand", "SubnetRemoveCommand"]
    for key, got in runs[1:]:
        assert got["argv"] == ["add" if key == "SubnetAddCommand" else "remove"]
        assert got["stdin"] == hostile + "\n"
        assert got["env"]["SUBNET"] == "10.5.7.0/24" and got["env"]["PUBLIC_IP"] == "192.0.2.7"
    assert list(tmp_path.iterdir()) == []


def test_a_failing_peer_command_is_logged_and_the_backend_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    script = "import sys; print('no route'); sys.exit(3)"
    fail = f"{shlex.quote(sys.executable)} -c {shlex.quote(script)}"
    be = _backend(tmp_path, SubnetAddCommand=fail)
    run(be.add_peers([_lease(9, ""), _lease(10, "")]))
    assert [r.returncode for _, r in be.runs] == [3, 3]
    assert "failed to run command" in caplog.text and "no route" in caplog.text and "exit status 3" in caplog.text


def test_a_failing_startup_command_stops_the_agent_with_its_output(tmp_path: Path) -> None:
    be = _backend(tmp_path, PreStartupCommand="false")
    with pytest.raises(BackendError, match="PreStartupCommand failed"):
        run(be.prepare())
    assert os.path.exists("/bin/false") or os.path.exists("/usr/bin/false")
