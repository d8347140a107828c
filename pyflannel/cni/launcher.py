"""Writes a fast start-up launcher for the `flannel` CNI plugin over pip's console-script wrapper.

The runtime execs the plugin for every pod ADD and DEL, so interpreter start-up is most of its cost. pip's
wrapper starts Python with `site` (venv .pth files, the editable-install import hook) and imports `re`:
about twice the time of `python -I -S` with the package directory put on sys.path by hand, which is what
the launcher does. `-I` also keeps PYTHON* variables of the runtime's environment out of the plugin.

usage: python -m pyflannel.cni.launcher DEST   (scripts/setup.sh runs it for .venv/bin/flannel)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TEMPLATE = """#!{python} -IS
# Written by pyflannel.cni.launcher: starts the flannel CNI plugin without site for speed.
import sys
sys.path.insert(0, {root!r})
from pyflannel.cni.plugin import main
sys.exit(main())
"""


def render(python: str, root: str) -> str:
    return TEMPLATE.format(python=python, root=root)


def install(dest: Path, python: str | None = None) -> None:
    import pyflannel

    root = str(Path(pyflannel.__file__).resolve().parent.parent)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_text(render(python or sys.executable, root))
    os.chmod(tmp, 0o755)
    os.replace(tmp, dest)


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python -m pyflannel.cni.launcher DEST", file=sys.stderr)
        return 2
    install(Path(sys.argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
