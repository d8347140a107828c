"""The host-installable plugin (scripts/build-cni.sh), built once per session into a temporary directory.

It must work where the runtime runs it: through the /opt/cni/bin symlink, with only the CNI variables in the
environment (env -i: no PATH, no PYTHON*, no venv), from a cwd outside the repository, and read nothing of
this machine's Python: every module it imports, on the rare paths too, comes from inside the directory.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from needs import need
from test_cni_plugin import EXPECTED_IPV4, IPV4_ENV, Bed

REPO = Path(__file__).resolve().parents[1]
INSTALL = REPO / "scripts" / "install-cni.sh"


@pytest.fixture(scope="session")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cni-build")
    p = subprocess.run(
        [str(REPO / "scripts" / "build-cni.sh")], env={**os.environ, "OUT": str(out)}, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    return (out / "flannel.dist").resolve()


@pytest.fixture
def linked(dist: Path, tmp_path: Path) -> Path:
    """The plugin reached through a symlink, as /opt/cni/bin/flannel is."""
    link_dir = tmp_path / "opt-cni-bin"
    link_dir.mkdir()
    (link_dir / "flannel").symlink_to(dist / "flannel")
    return link_dir / "flannel"


def run(exe: Path, env: dict[str, str], stdin: bytes, cwd: Path, *wrap: str) -> subprocess.CompletedProcess[bytes]:
    # env -i: only what a runtime passes.
    cmd = [*wrap, "env", "-i", *(f"{k}={v}" for k, v in env.items()), str(exe)]
    return subprocess.run(cmd, input=stdin, capture_output=True, cwd=cwd, timeout=60)


def cni_env(bed: Bed, command: str, **over: str) -> dict[str, str]:
    env = {k: v for k, v in bed.env(command, **over).items() if k != "PATH"}
    env["CNI_PATH"] = str(bed.bin)  # Bed also lists a /nonexistent dir, which the file trace would flag
    return env


def test_layout_and_bytecode(dist: Path) -> None:
    assert (dist / "python" / "python3.11").is_file()
    assert sorted(p.name for p in (dist / "app" / "pyflannel" / "cni").glob("*.py")) == [
        "__init__.py", "_fastjson.py", "_goerr.py", "conf.py", "plugin.py",
    ]  # fmt: skip
    sources = [p for p in dist.rglob("*.py") if p != dist / "main.py"]
    assert len(sources) > 50
    for src in sources:
        pyc = src.parent / "__pycache__" / f"{src.stem}.cpython-311.pyc"
        # flags 0b01: hash-based, source never checked: no stat, no recompile, a read-only dir is fine.
        assert int.from_bytes(pyc.read_bytes()[4:8], "little") == 1, pyc
    # The launcher needs no loader; Python's libraries outside glibc resolve inside the directory.
    assert "statically linked" in subprocess.run(["file", "-L", str(dist / "flannel")], capture_output=True,
                                                  text=True).stdout  # fmt: skip
    ldd = subprocess.run(["ldd", str(dist / "python" / "python3.11")], capture_output=True, text=True).stdout
    for line in ldd.splitlines():
        name, _, where = line.strip().partition(" => ")
        if where and not re.match(r"lib(c|m)\.so\.6$", name):
            assert where.startswith(str(dist)), line


def test_version_with_empty_env(linked: Path, tmp_path: Path) -> None:
    p = run(linked, {"CNI_COMMAND": "VERSION"}, b"", tmp_path)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["supportedVersions"][-1] == "1.1.0"


def test_add_del_with_empty_env(linked: Path, tmp_path: Path) -> None:
    bed = Bed(tmp_path)
    bed.write_env(IPV4_ENV)
    conf = json.dumps(bed.conf()).encode()
    p = run(linked, cni_env(bed, "ADD"), conf, tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads(p.stdout)["ips"][0]["address"] == "10.1.17.2/24"
    assert bed.stored().read_bytes() == EXPECTED_IPV4
    assert bed.delegate_in("ADD") == EXPECTED_IPV4
    p = run(linked, cni_env(bed, "DEL"), conf, tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert not bed.stored().exists()
    assert [c.split()[0] for c in bed.calls()] == ["ADD", "DEL"]


@pytest.mark.parametrize(
    ("command", "over", "stdin", "code"),
    [
        ("ADD", {"CNI_CONTAINERID": "../bad"}, None, 4),
        ("ADD", {"CNI_IFNAME": "<unset>"}, None, 4),
        ("ADD", {}, b"{not json", 6),
        ("ADD", {}, b'{"type":"flannel"}', 7),
        ("STATUS", {}, b'{"name":"cni-flannel","type":"flannel","cniVersion":"1.1.0","subnetFile":"/nonexistent"}', 50),
    ],
    ids=["containerid", "no-ifname", "json", "no-name", "status-no-subnet-env"],
)
def test_errors_with_empty_env(
    linked: Path, tmp_path: Path, command: str, over: dict[str, str], stdin: bytes | None, code: int
) -> None:
    bed = Bed(tmp_path)
    bed.write_env(IPV4_ENV)
    data = json.dumps(bed.conf()).encode() if stdin is None else stdin
    p = run(linked, cni_env(bed, command, **over), data, tmp_path)
    assert p.returncode == 1, p.stderr
    assert json.loads(p.stdout)["code"] == code
    assert b"Traceback" not in p.stderr
    assert not bed.data_dir.exists() and bed.calls() == []


def test_rare_paths_with_empty_env(linked: Path, tmp_path: Path) -> None:
    """The rare paths work in the built form too: decimal and json (imported lazily) for a non-integral number
    in a user's delegate config, the warning for a corrupt stored config."""
    bed = Bed(tmp_path)
    bed.write_env(IPV4_ENV)
    conf = json.dumps(bed.conf(delegate={"x-weight": 1.5})).encode()
    p = run(linked, cni_env(bed, "ADD"), conf, tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert b'"x-weight":1.5' in bed.stored().read_bytes()
    bed.stored().write_bytes(b"{not json")
    p = run(linked, cni_env(bed, "DEL"), conf, tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    warning = f"flannel DEL: stored delegate config {bed.stored()} is empty or corrupt; removing it\n"
    assert p.stderr == warning.encode()  # said, not crashed
    assert not bed.stored().exists()


# Runs the plugin in-process in the built interpreter over every command and the rare paths, then reports
# where each loaded module came from.
DRIVER = r"""
import io, sys
from pyflannel.cni import plugin
results = []
for env, stdin in eval(sys.argv[1]):
    out = io.BytesIO()
    rc = plugin.run(env, io.BytesIO(stdin), out, sys.stderr)
    results.append((env["CNI_COMMAND"], rc, out.getvalue()))
mods = {}
for name, m in sys.modules.items():
    spec = getattr(m, "__spec__", None)
    mods[name] = (getattr(m, "__file__", None), spec.origin if spec else None)
print(repr({"results": results, "modules": mods, "prefix": sys.prefix, "path": sys.path}))
"""


def test_imports_nothing_outside_the_dist(dist: Path, tmp_path: Path) -> None:
    bed = Bed(tmp_path)
    bed.write_env(IPV4_ENV)
    conf = json.dumps(bed.conf(cniVersion="1.1.0", delegate={"x-weight": 1.5})).encode()
    corrupt = {**cni_env(bed, "DEL"), "CNI_CONTAINERID": "corrupt"}
    runs: list[tuple[dict[str, str], bytes]] = [
        (cni_env(bed, "VERSION"), b""),
        (cni_env(bed, "ADD"), conf),
        (cni_env(bed, "CHECK"), conf),
        (cni_env(bed, "STATUS"), conf),
        (cni_env(bed, "GC"), conf),
        (cni_env(bed, "DEL"), conf),
        (corrupt, conf),
        (cni_env(bed, "ADD"), b"{not json"),
        (cni_env(bed, "ADD", CNI_CONTAINERID="../x"), conf),
        (cni_env(bed, "STATUS"), json.dumps(bed.conf(cniVersion="1.1.0", subnetFile="/nonexistent")).encode()),
    ]
    bed.data_dir.mkdir(mode=0o700)
    (bed.data_dir / "corrupt").write_bytes(b"{not json")
    p = subprocess.run(
        ["env", "-i", str(dist / "python" / "python3.11"), "-I", "-S", "-B", "-c", DRIVER, repr(runs)],
        capture_output=True, cwd="/", timeout=60,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    report: dict[str, Any] = ast.literal_eval(p.stdout.decode())
    rcs = [(cmd, rc) for cmd, rc, _ in report["results"]]
    assert rcs == [("VERSION", 0), ("ADD", 0), ("CHECK", 0), ("STATUS", 0), ("GC", 0), ("DEL", 0), ("DEL", 0),
                   ("ADD", 1), ("ADD", 1), ("STATUS", 1)]  # fmt: skip
    assert report["prefix"] == str(dist / "python")
    assert all(Path(d).is_relative_to(dist) for d in report["path"]), report["path"]
    mods: dict[str, tuple[str | None, str | None]] = report["modules"]
    assert {"decimal", "json", "_json", "pyflannel.cni.plugin", "pyflannel.cni._goerr"} <= mods.keys()
    for name, (file, origin) in mods.items():
        if name == "__main__":
            continue
        if file is None:
            assert origin in ("built-in", "frozen"), (name, origin)
        else:
            assert Path(file).is_relative_to(dist) and Path(file).is_file(), (name, file)


# glibc's own files (loader cache, libc/libm, locale data, time zone): the one thing taken from the host.
HOST_OK = re.compile(
    r"^/etc/ld\.so\.(cache|preload)$|^(/usr)?/lib(64)?/(x86_64-linux-gnu/)?(libc|libm)\.so\.6$"
    r"|^/usr/(lib|share)/locale/|^/usr/lib/x86_64-linux-gnu/gconv/|^/etc/localtime$|^/proc/self/"
)


def test_touches_no_file_outside_the_dist(linked: Path, dist: Path, tmp_path: Path) -> None:
    need(root=False, tools=("strace",))
    bed = Bed(tmp_path)
    bed.write_env(IPV4_ENV)
    trace = tmp_path / "trace"
    # Not -f: the delegate (a shell script here) is not the plugin's business.
    p = run(linked, cni_env(bed, "ADD"), json.dumps(bed.conf()).encode(), Path("/"),
            "strace", "-qq", "-e", "trace=%file", "-o", str(trace))  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    paths = set(re.findall(r'^\w+\((?:AT_FDCWD, |-?\d+, )?"([^"]+)"', trace.read_text(), re.M))
    # env (the test's, standing in for the runtime), the symlink, the launcher's readlink, the bundled python.
    execs = re.findall(r'^execve\("([^"]+)"', trace.read_text(), re.M)
    assert execs[1:] == [str(linked), str(dist / "python" / "python3.11")]
    outside = {
        p for p in paths
        if not (Path(p).is_relative_to(dist) or Path(p).is_relative_to(tmp_path) or HOST_OK.search(p))
    }  # fmt: skip
    assert outside <= {execs[0]}, outside
    assert not any(p.startswith((sys.prefix, sys.base_prefix, str(REPO))) for p in paths)


def test_install_cni_copies_a_working_plugin(dist: Path, tmp_path: Path) -> None:
    """install-cni.sh with the real build: the copy in /opt/cni/bin works through its relative symlink."""
    root = tmp_path / "root"
    (root / "opt/flannel/cni").mkdir(parents=True)
    subprocess.run(["cp", "-a", str(dist), str(root / "opt/flannel/cni/flannel.dist")], check=True)
    subprocess.run(["/bin/sh", str(INSTALL), "plugin"], env={"PATH": os.environ["PATH"], "CNI_ROOT": str(root)},
                   check=True, capture_output=True)  # fmt: skip
    shutil.rmtree(root / "opt/flannel")  # the image's copy is gone; the host's must stand alone
    p = run(root / "opt/cni/bin/flannel", {"CNI_COMMAND": "VERSION"}, b"", tmp_path)
    assert p.returncode == 0, p.stderr
    assert "supportedVersions" in json.loads(p.stdout)
