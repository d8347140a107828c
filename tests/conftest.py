"""Shared fixtures. Integration tests run only inside namespaces this run creates (see pyflannel.lab.netns)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from pyflannel.lab import netns


def _can_netns() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", "etcd", "etcdctl"):
        if shutil.which(tool) is None:
            return f"needs {tool} (run scripts/setup.sh)"
    return None


@pytest.fixture(scope="session", autouse=True)
def _sweep_leftovers() -> Iterator[None]:
    """Remove namespaces/temp dirs of earlier crashed test runs before starting, and ours at the end."""
    if os.geteuid() == 0:
        netns.sweep(netns.STEM_TEST)
    yield
    if os.geteuid() == 0:
        netns.sweep(netns.STEM_TEST)


@pytest.fixture
def scope(request: pytest.FixtureRequest) -> Iterator[netns.RunScope]:
    """A per-test RunScope: namespaces, processes and a temp dir removed even when the test fails."""
    why = _can_netns()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"integration test cannot run in CI: {why}")
        pytest.skip(why)
    tag = "".join(ch for ch in request.node.name if ch.isalnum())[:12]
    s = netns.RunScope(tag=f"x{tag}")
    try:
        yield s
    finally:
        s.close()
