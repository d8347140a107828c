"""The host-installable plugin (scripts/build-cni.sh): runs with an empty environment, away from the venv.

Skipped when the build is absent (it is not part of CI: a first Nuitka build takes minutes).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from test_cni_plugin import EXPECTED_IPV4, IPV4_ENV, Bed

BUILT = Path(__file__).resolve().parents[1] / "build" / "cni" / "flannel.dist" / "flannel"

pytestmark = pytest.mark.skipif(not BUILT.is_file(), reason="no build: run scripts/build-cni.sh")


def _run(exe: Path, env: dict[str, str], stdin: bytes, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    # env -i: no PATH, no PYTHON*, no venv; only what a runtime passes.
    cmd = ["env", "-i", *(f"{k}={v}" for k, v in env.items()), str(exe)]
    return subprocess.run(cmd, input=stdin, capture_output=True, cwd=cwd, timeout=30)


def test_built_plugin_version_with_empty_env(tmp_path: Path) -> None:
    p = _run(BUILT, {"CNI_COMMAND": "VERSION"}, b"", tmp_path)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["supportedVersions"][-1] == "1.1.0"


def test_built_plugin_add_del_with_empty_env(tmp_path: Path) -> None:
    bed = Bed(tmp_path)
    bed.write_env(IPV4_ENV)
    # Reached through a symlink, as /opt/cni/bin/flannel would be.
    link_dir = tmp_path / "opt-cni-bin"
    link_dir.mkdir()
    (link_dir / "flannel").symlink_to(BUILT)
    env = {k: v for k, v in bed.env("ADD").items() if k != "PATH"}
    p = _run(link_dir / "flannel", env, json.dumps(bed.conf()).encode(), tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads(p.stdout)["ips"][0]["address"] == "10.1.17.2/24"
    assert bed.stored().read_bytes() == EXPECTED_IPV4
    env["CNI_COMMAND"] = "DEL"
    p = _run(link_dir / "flannel", env, json.dumps(bed.conf()).encode(), tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert not bed.stored().exists()
    env["CNI_CONTAINERID"] = "../bad"
    p = _run(link_dir / "flannel", env, b"{}", tmp_path)
    assert p.returncode == 1
    assert json.loads(p.stdout)["code"] == 4
