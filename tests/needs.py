"""The one way a test says what it needs: a missing prerequisite skips it on a developer's machine and fails it
under CI (CI=true), where every prerequisite is installed by scripts/setup.sh and a skip would hide a gap."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import pytest

REF_PLUGINS = Path("/usr/lib/cni")  # Debian's containernetworking-plugins


def missing(*, root: bool = True, tools: Iterable[str] = (), files: Iterable[str | Path] = ()) -> str | None:
    """Why the environment cannot run the test (None: it can)."""
    if root and os.geteuid() != 0:
        return "needs root"
    for tool in tools:
        if shutil.which(tool) is None:
            return f"needs {tool} (run scripts/setup.sh)"
    for f in files:
        if not Path(f).exists():
            return f"needs {f} (run scripts/setup.sh)"
    return None


def require(why: str | None) -> None:
    """Skip for `why` locally; fail loudly under CI. No-op when `why` is None."""
    if why is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"cannot run in CI: {why}", pytrace=False)
    pytest.skip(why)


def need(*, root: bool = True, tools: Iterable[str] = (), files: Iterable[str | Path] = ()) -> None:
    require(missing(root=root, tools=tools, files=files))
