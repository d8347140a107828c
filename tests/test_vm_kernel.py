"""The stock-kernel VM itself: the kernel the runner booted, its modules, and links this host's kernel lacks.

Runs only inside the VM (`python -m pyflannel.lab.vm`), so the VM pass always has a test of its own.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from pyflannel.lab import netns
from pyflannel.lab.vm import HOST_KERNEL_ENV, IN_VM_ENV, KERNEL_ENV

pytestmark = [pytest.mark.kernel_vm, pytest.mark.vm_only, pytest.mark.integration]


def test_runs_in_the_vm_on_the_stock_kernel() -> None:
    assert os.environ.get(IN_VM_ENV) == "1"
    release = os.uname().release
    booted = os.environ.get(KERNEL_ENV)  # unset only for a --kernel image not named vmlinuz-<version>
    assert booted is None or release == booted, f"the guest runs {release}, the runner booted {booted}"
    assert release != os.environ.get(HOST_KERNEL_ENV), "the VM runs the host's kernel"
    assert Path("/lib/modules", release, "modules.dep").is_file()


def test_guest_has_writable_run_and_tmp_and_the_tools() -> None:
    for d in ("/run", "/tmp", "/run/netns"):
        Path(d).mkdir(parents=True, exist_ok=True)
        probe = Path(d, f".pfvm-probe-{os.getpid()}")
        probe.write_text("x")
        probe.unlink()
    for cmd in (["ip", "-V"], ["bridge", "-V"], ["etcd", "--version"], ["etcdctl", "version"], ["tcpdump", "--version"],
                ["flanneld", "--version"]):  # fmt: skip
        netns.run(cmd, timeout=30)
    assert Path("/usr/lib/cni/bridge").is_file() and Path("/usr/lib/cni/host-local").is_file()


def test_modules_the_host_kernel_lacks_load(require_kernel_module: Callable[..., None]) -> None:
    require_kernel_module("ipip", "wireguard", "esp4", "dummy")


def test_ipip_wireguard_and_esp_inside_a_namespace(
    scope: netns.RunScope, require_kernel_module: Callable[..., None]
) -> None:
    require_kernel_module("ipip", "wireguard", "esp4")
    ns = scope.add_ns("k")
    netns.run(["ip", "-n", ns, "link", "add", "pfip", "type", "ipip", "local", "10.99.0.1", "remote", "any"])
    netns.run(["ip", "-n", ns, "link", "set", "pfip", "up"])
    assert "ipip" in netns.run(["ip", "-n", ns, "-d", "link", "show", "pfip"])
    netns.run(["ip", "-n", ns, "link", "add", "pfwg", "type", "wireguard"])
    assert "wireguard" in netns.run(["ip", "-n", ns, "-d", "link", "show", "pfwg"])
    key = "0x" + "11" * 20  # rfc4106(gcm(aes)): 16-byte key + 4-byte salt
    netns.run(["ip", "-n", ns, "xfrm", "state", "add", "src", "10.99.0.1", "dst", "10.99.0.2", "proto", "esp",
               "spi", "0x100", "mode", "tunnel", "aead", "rfc4106(gcm(aes))", key, "128"])  # fmt: skip
    assert "proto esp spi 0x00000100" in netns.run(["ip", "-n", ns, "xfrm", "state"])
