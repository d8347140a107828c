"""Subprocess fuzz of the plugin executable (issue 11): what a runtime could hand it, as bytes.

Each run execs the `flannel` executable as setup.sh installs it (a fresh copy in a temporary directory: the C
client, with no agent at its socket, handing each call to the standalone plugin beside it; the served path's
differential fuzz is in tests/test_cni_server.py) with fuzzed env bytes, stdin bytes and subnet.env bytes, in
a temporary root of its own whose only delegates are fake shell scripts (no real plugin runs: nothing touches
a namespace). Each process is bounded: address space (the report's unbounded read was OOM-killed at ~24 GB),
CPU time, file size, and a wall-clock timeout.

The oracle: exit status 0 or 1; on 1, CNI error JSON on stdout (valid UTF-8, a documented code, never the
plugin's last-resort "internal error"); never a traceback on stderr; nothing written in the root outside
dataDir (and the fake delegate's own scratch directory).

Bounded for CI: PYFLANNEL_FUZZ_EXAMPLES runs per test (default 150, two tests, about 10 s together here,
derandomized); set it higher for a longer, randomized run: `PYFLANNEL_FUZZ_EXAMPLES=3000 pytest tests/test_cni_fuzz.py`.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fuzzing import any_json, fuzz_settings
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from test_cni_plugin import FAKE_DELEGATE, IPV4_ENV

from pyflannel.cni.launcher import install

FUZZ = fuzz_settings(150, HealthCheck.function_scoped_fixture)
CODES = {1, 3, 4, 5, 6, 7, 11, 50, 999}
MEMORY = 512 << 20  # address space of a fuzzed process (a plugin run needs ~30 MB)


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))
    resource.setrlimit(resource.RLIMIT_CPU, (20, 20))
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, 64 << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


@pytest.fixture(scope="module")
def exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("exe") / "flannel"
    install(dest)
    return dest


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("fuzz-roots")


class Root:
    """One run's world: bin/ (fake delegates), fake/ (their scratch), subnet.env, data/ (dataDir), cwd/."""

    def __init__(self, parent: Path) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="r", dir=parent))
        self.bin = self.path / "bin"
        self.bin.mkdir()
        for name in ("bridge", "ipvlan"):
            (self.bin / name).write_text(FAKE_DELEGATE)
            (self.bin / name).chmod(0o755)
        # A delegate that answers garbage, and one that prints without end (the output cap must stop it).
        (self.bin / "garbage").write_text('#!/bin/sh\ncat >/dev/null\nprintf \'{"code":"x","msg":\\377}\'\nexit 1\n')
        (self.bin / "garbage").chmod(0o755)
        (self.bin / "endless").write_text("#!/bin/sh\ncat >/dev/null\nexec cat /dev/zero\n")
        (self.bin / "endless").chmod(0o755)
        self.fake = self.path / "fake"
        self.fake.mkdir()
        self.cwd = self.path / "cwd"
        self.cwd.mkdir()
        self.subnet_file = self.path / "subnet.env"
        self.subnet_file.write_text(IPV4_ENV)
        self.data = self.path / "data"

    def snapshot(self, data_dir: str) -> dict[str, tuple[int, int]]:
        skip = {self.fake.resolve()}
        dd = Path(data_dir if data_dir.startswith("/") else self.cwd / data_dir)
        ancestors: set[str] = set()
        with contextlib.suppress(OSError, RuntimeError):
            skip.add(dd.resolve())
            # MkdirAll makes dataDir's parents: part of the dataDir the config names, not "outside" it.
            ancestors = {str(a) for a in dd.resolve().parents}
        out: dict[str, tuple[int, int]] = {}
        for dirpath, dirnames, filenames in os.walk(self.path):
            here = Path(dirpath)
            dirnames[:] = [d for d in dirnames if (here / d).resolve() not in skip]
            for f in filenames:
                st_ = (here / f).lstat()
                out[str(here / f)] = (st_.st_size, st_.st_mtime_ns)
            for d in dirnames:
                if str(here / d) not in ancestors:
                    out[str(here / d)] = (0, 0)
        return out


# ---- strategies ------------------------------------------------------------------------------------------------

env_bytes = st.binary(max_size=12).map(lambda b: b.replace(b"\x00", b"")) | st.sampled_from(
    [b"some-id", b"a\xff", b"\xc3(", b"eth0", b"a" * 256, b"..", b"x/y", b"ADD", b"DEL"]
)
commands = st.sampled_from([b"ADD", b"DEL", b"CHECK", b"STATUS", b"GC", b"VERSION", b""]) | env_bytes
json_values = any_json(int_bound=None, text=8, leaves=8, width=3, infinity=True)
raw_literals = st.sampled_from(
    ['"\\udc80"', '"\\ud800"', '"\\u0000"', "1e400", "-1" + "0" * 400, "9" * 5000, "[" * 600 + "]" * 600,
     '"' + "x" * 70000 + '"', "NaN", '"\\u003c&\\u2028"', "0.000001", "1E21", '{"type":"endless"}',
     '{"type":"garbage"}', '{"type":"bridge","mtu":1.5}'],
)  # fmt: skip


@st.composite
def stdins(draw: st.DrawFn, root: Root) -> tuple[bytes, str]:
    """A netconf (valid, or with fuzzed fields and raw literals spliced in), sometimes cut or raw bytes."""
    dirs = [str(root.data), f"{root.data}/nested/", str(root.subnet_file), f"{root.path}/./data2", "rel-data", ""]
    data_dir = draw(st.sampled_from(dirs))
    conf: dict[str, Any] = {"cniVersion": draw(st.sampled_from(["0.3.1", "0.4.0", "1.0.0", "1.1.0", "9", ""])),
                            "name": draw(st.sampled_from(["cbr0", "x", "", "bad name"])), "type": "flannel",
                            "subnetFile": str(root.subnet_file), "dataDir": data_dir}  # fmt: skip
    keys = ["delegate", "ipam", "runtimeConfig", "prevResult", "subnetFile", "dns", "capabilities", "name"]
    spliced: dict[str, str] = {}
    for key in draw(st.lists(st.sampled_from(keys), unique=True, max_size=3)):
        if draw(st.booleans()):
            spliced[key] = draw(raw_literals)
            conf[key] = f"@@{key}@@"
        elif key == "subnetFile":
            conf[key] = draw(st.sampled_from(["/dev/zero", "/nonexistent", str(root.path), "/dev/null"]))
        elif key == "ipam":
            conf[key] = {"routes": [{"dst": draw(st.sampled_from(["10.9.0.0/16", "::1:0/112", "x"])),
                                     "gw": draw(st.sampled_from(["", "10.9.0.1", "1"]))}]}  # fmt: skip
        else:
            conf[key] = draw(json_values)
    text = json.dumps(conf)
    for key, literal in spliced.items():
        text = text.replace(f'"@@{key}@@"', literal)
    data = text.encode("utf-8", "surrogatepass")
    mode = draw(st.sampled_from(["whole", "whole", "cut", "bytes"]))
    if mode == "cut":
        data = data[: draw(st.integers(0, len(data)))] + draw(st.binary(max_size=3))
    elif mode == "bytes":
        data = draw(st.binary(max_size=60))
    return data, data_dir


subnet_env_bytes = st.sampled_from(
    [IPV4_ENV.encode(), IPV4_ENV.replace("\n", "\r\n").encode(), b"FLANNEL_MTU=" + b"9" * 5000 + b"\n",
     IPV4_ENV.encode().replace(b"/16", b"/16\xff"), b"FLANNEL_SUBNET\n", b"x" * 70000, b"",
     b"FLANNEL_IPV6_NETWORK=::1:0/112\nFLANNEL_IPV6_SUBNET=::1:1/120\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"]
) | st.binary(max_size=80)  # fmt: skip


def run_once(exe: Path, root: Root, env: dict[bytes, bytes], stdin: bytes, data_dir: str) -> None:
    before = root.snapshot(data_dir)
    p = subprocess.run(
        [str(exe)], input=stdin, env=env, cwd=root.cwd, capture_output=True, timeout=60, preexec_fn=_limits
    )
    where = f"env={env!r} stdin={stdin[:300]!r} rc={p.returncode} out={p.stdout[:500]!r} err={p.stderr[-2000:]!r}"
    assert p.returncode in (0, 1), where
    assert b"Traceback" not in p.stderr, where
    out = p.stdout.decode("utf-8")  # valid UTF-8, always
    if p.returncode == 1:
        assert out.strip(), where  # never an empty stdout on error
        e = json.loads(out)
        assert isinstance(e, dict) and e.get("code") in CODES and isinstance(e.get("msg"), str), where
        assert "internal error (" not in e["msg"] and "[Errno" not in e["msg"], where
    elif env.get(b"CNI_COMMAND") == b"VERSION":
        assert out.endswith("\n") and json.loads(out)["supportedVersions"], where
    assert root.snapshot(data_dir) == before, "written outside dataDir: " + where


def base_env(root: Root) -> dict[bytes, bytes]:
    return {
        b"CNI_COMMAND": b"ADD",
        b"CNI_CONTAINERID": b"some-id",
        b"CNI_NETNS": b"/run/netns/none",
        b"CNI_IFNAME": b"eth0",
        b"CNI_PATH": str(root.bin).encode(),
        b"FAKE_DIR": str(root.fake).encode(),
        b"FAKE_VERSIONS": b'"0.3.1","1.0.0","1.1.0"',
        b"PATH": b"/usr/sbin:/usr/bin:/sbin:/bin",
        b"FLANNEL_CNI_SOCKET": str(root.path / "no-agent.sock").encode(),
    }


@FUZZ
@given(data=st.data(), command=commands, subnet_env=subnet_env_bytes)
def test_fuzz_stdin_and_subnet_env(
    exe: Path, roots: Path, data: st.DataObject, command: bytes, subnet_env: bytes
) -> None:
    root = Root(roots)
    root.subnet_file.write_bytes(subnet_env)
    stdin, data_dir = data.draw(stdins(root))
    env = base_env(root)
    if command:
        env[b"CNI_COMMAND"] = command
    else:
        del env[b"CNI_COMMAND"]
    run_once(exe, root, env, stdin, data_dir)


@FUZZ
@given(data=st.data(), command=commands, cid=env_bytes, ifname=env_bytes, path=env_bytes)
def test_fuzz_env(exe: Path, roots: Path, data: st.DataObject, command: bytes, cid: bytes, ifname: bytes,
                  path: bytes) -> None:  # fmt: skip
    root = Root(roots)
    env = base_env(root)
    for key, value in ((b"CNI_COMMAND", command), (b"CNI_CONTAINERID", cid), (b"CNI_IFNAME", ifname)):
        if value:
            env[key] = value
        else:
            del env[key]
    if data.draw(st.booleans()):
        env[b"CNI_PATH"] = path.replace(b"/", b"") or b":"  # never a directory with real plugins
    conf = {"cniVersion": data.draw(st.sampled_from(["1.0.0", "1.1.0"])), "name": "cbr0", "type": "flannel",
            "subnetFile": str(root.subnet_file), "dataDir": str(root.data)}  # fmt: skip
    run_once(exe, root, env, json.dumps(conf).encode(), str(root.data))
