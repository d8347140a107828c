from __future__ import annotations

import json
import subprocess
from pathlib import Path

from pyflannel.cni.launcher import STANDALONE_SUFFIX, install


def test_install_writes_the_client_and_the_standalone_launcher(tmp_path: Path) -> None:
    dest = tmp_path / "flannel"
    install(dest)
    assert dest.read_bytes()[:4] == b"\x7fELF"  # the C client (launcher.c)
    text = dest.with_name("flannel" + STANDALONE_SUFFIX).read_text()
    assert text.splitlines()[0].endswith(" -IS")
    # No agent serves this socket: the client execs the launcher, which runs without site, and -I ignores
    # PYTHON* variables a runtime might leak into the plugin's environment.
    p = subprocess.run(
        [str(dest)],
        input=b'{"cniVersion":"1.0.0"}',
        capture_output=True,
        env={"CNI_COMMAND": "VERSION", "PYTHONPATH": "/nonexistent", "FLANNEL_CNI_SOCKET": str(tmp_path / "none")},
        cwd="/",
        timeout=30,
    )
    assert p.returncode == 0, p.stderr
    assert "1.0.0" in json.loads(p.stdout)["supportedVersions"]


def test_client_found_through_a_symlink(tmp_path: Path) -> None:
    """/opt/cni/bin/flannel may be a symlink: the standalone plugin is found beside the resolved client."""
    (tmp_path / "real").mkdir()
    install(tmp_path / "real" / "flannel")
    (tmp_path / "flannel").symlink_to(tmp_path / "real" / "flannel")
    p = subprocess.run([str(tmp_path / "flannel")], input=b"", capture_output=True, timeout=30,
                       env={"CNI_COMMAND": "VERSION", "FLANNEL_CNI_SOCKET": ""})  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads(p.stdout)["supportedVersions"][-1] == "1.1.0"
