"""Installs the `flannel` CNI plugin executable of a venv: the C client and the fast Python launcher beside it.

DEST is launcher.c compiled (static) for the venv: it hands each call to flanneld's CNI server
(pyflannel/cniserver.py) and, when none serves, execs DEST-py, the standalone plugin. DEST-py replaces pip's
console-script wrapper, which starts Python with `site` (venv .pth files, the editable-install import hook)
and imports `re`: about twice the time of `python -I -S` with the package directory put on sys.path by hand,
which is what it does. `-I` also keeps PYTHON* variables of the runtime's environment out of the plugin.
scripts/build-cni.sh builds the same client for the host-installable directory, where the standalone plugin
is the bundled interpreter instead.

usage: python -m pyflannel.cni.launcher DEST   (scripts/setup.sh runs it for .venv/bin/flannel; needs a C
compiler with a static libc: $CC, default gcc)
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

SOURCE = Path(__file__).with_name("launcher.c")
# What the venv build of launcher.c appends to its own path to find the standalone plugin.
STANDALONE_SUFFIX = "-py"

TEMPLATE = """#!{python} -IS
# Written by pyflannel.cni.launcher: starts the flannel CNI plugin without site for speed.
import sys
sys.path.insert(0, {root!r})
from pyflannel.cni.plugin import main
sys.exit(main())
"""


class BuildError(RuntimeError):
    """The C client could not be compiled."""


def render(python: str, root: str) -> str:
    return TEMPLATE.format(python=python, root=root)


def _replace(dest: Path, write: Callable[[Path], None]) -> None:
    """`dest` written through a temporary file and a rename: a runtime calling it meanwhile sees old or new."""
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def install_script(dest: Path, python: str | None = None) -> None:
    """The standalone plugin's Python launcher at `dest`."""
    import pyflannel

    root = str(Path(pyflannel.__file__).resolve().parent.parent)
    text = render(python or sys.executable, root)

    def write(tmp: Path) -> None:
        tmp.write_text(text)

    _replace(dest, write)


def build_client(dest: Path, cc: str | None = None) -> None:
    """launcher.c compiled for a venv at `dest`: its standalone plugin is `dest` + STANDALONE_SUFFIX."""

    def compile_to(tmp: Path) -> None:
        cmd = [cc or os.environ.get("CC", "gcc"), "-O2", "-Wall", "-Wextra", "-Werror", "-static", "-s",
               f'-DSTANDALONE_SUFFIX="{STANDALONE_SUFFIX}"', "-o", str(tmp), str(SOURCE)]  # fmt: skip
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise BuildError(f"cannot compile {SOURCE}: {e}") from None
        if p.returncode != 0:
            raise BuildError(f"cannot compile {SOURCE}: {(p.stderr or p.stdout).strip()}")

    _replace(dest, compile_to)


def install(dest: Path, python: str | None = None) -> None:
    """The C client at `dest` and the standalone plugin's launcher next to it (written first: the client may
    be called as soon as it is in place)."""
    install_script(dest.with_name(dest.name + STANDALONE_SUFFIX), python)
    build_client(dest)


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python -m pyflannel.cni.launcher DEST", file=sys.stderr)
        return 2
    try:
        install(Path(sys.argv[1]))
    except BuildError as e:
        print(f"launcher: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
