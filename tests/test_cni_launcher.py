from __future__ import annotations

import json
import subprocess
from pathlib import Path

from pyflannel.cni.launcher import install


def test_launcher_runs_the_plugin_without_site(tmp_path: Path) -> None:
    dest = tmp_path / "flannel"
    install(dest)
    text = dest.read_text()
    assert text.splitlines()[0].endswith(" -IS")
    # -I ignores PYTHON* variables a runtime might leak into the plugin's environment.
    p = subprocess.run(
        [str(dest)],
        input=b'{"cniVersion":"1.0.0"}',
        capture_output=True,
        env={"CNI_COMMAND": "VERSION", "PYTHONPATH": "/nonexistent"},
        cwd="/",
        timeout=30,
    )
    assert p.returncode == 0, p.stderr
    assert "1.0.0" in json.loads(p.stdout)["supportedVersions"]
