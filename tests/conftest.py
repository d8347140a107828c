"""Shared fixtures. Integration tests run only inside namespaces this run creates (see pyflannel.lab.netns).

Markers of the stock-kernel VM pass (`python -m pyflannel.lab.vm`, run by scripts/test.sh after the host pass):
- `kernel_vm`: the test also runs inside the VM (the runner passes `-m kernel_vm`);
- `vm_only`: the test needs the stock kernel (ipip, wireguard, esp4...): deselected on the host, and it implies
  `kernel_vm`. Inside such a test, `require_kernel_module("ipip")` fails (never skips) if modprobe cannot load it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from needs import need

from pyflannel.lab import netns
from pyflannel.lab.vm import IN_VM_ENV


def in_vm() -> bool:
    """True inside the stock-kernel VM (the runner sets PYFLANNEL_IN_VM=1 there)."""
    return os.environ.get(IN_VM_ENV) == "1"


@pytest.hookimpl(tryfirst=True)  # before -m selects: vm_only must already imply kernel_vm
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("vm_only") and not item.get_closest_marker("kernel_vm"):
            item.add_marker("kernel_vm")
    if in_vm():
        return
    # On the host, vm_only tests are deselected (not skipped): this kernel cannot run them, the VM pass does.
    keep = [i for i in items if not i.get_closest_marker("vm_only")]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i.get_closest_marker("vm_only")])
        items[:] = keep


def _require_kernel_module(*names: str) -> None:
    for name in names:
        try:
            p = subprocess.run(["modprobe", name], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.fail(f"kernel module {name} cannot be loaded: modprobe {name}: {e}", pytrace=False)
        if p.returncode != 0:
            why = (p.stderr or p.stdout).strip() or f"exit {p.returncode}"
            pytest.fail(f"kernel module {name} cannot be loaded (kernel {os.uname().release}): {why}", pytrace=False)


@pytest.fixture(scope="session")
def require_kernel_module() -> Callable[..., None]:
    """`require_kernel_module("ipip", "wireguard")`: modprobe each, and fail the test naming the module that
    cannot be loaded. Never skips: a vm_only test runs where the module must exist."""
    return _require_kernel_module


@pytest.fixture(scope="session", autouse=True)
def _sweep_leftovers() -> Iterator[None]:
    """Remove namespaces/temp dirs of earlier crashed test runs before starting, and ours at the end."""
    if os.geteuid() == 0:
        netns.sweep(netns.STEM_TEST)
    yield
    if os.geteuid() == 0:
        netns.sweep(netns.STEM_TEST)


# What a flanneld writes by default (subnet.env, the CNI socket, the WireGuard key): an agent of the test bed must
# use its node's own paths, never the machine's.
HOST_RUN_FLANNEL = Path("/run/flannel")


def _host_run_flannel() -> set[str]:
    try:
        return {p.name for p in HOST_RUN_FLANNEL.iterdir()}
    except FileNotFoundError:
        return set()


@pytest.fixture(autouse=True)
def _host_run_flannel_untouched() -> Iterator[None]:
    before = _host_run_flannel()
    yield
    added = _host_run_flannel() - before
    assert not added, f"a test wrote this machine's {HOST_RUN_FLANNEL}: {sorted(added)}"


@pytest.fixture
def scope(request: pytest.FixtureRequest) -> Iterator[netns.RunScope]:
    """A per-test RunScope: namespaces, processes and a temp dir removed even when the test fails."""
    need(tools=("ip", "etcd", "etcdctl"))
    tag = "".join(ch for ch in request.node.name if ch.isalnum())[:12]
    s = netns.RunScope(tag=f"x{tag}")
    try:
        yield s
    finally:
        s.close()
