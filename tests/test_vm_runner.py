"""The stock-kernel VM runner's pure parts (no VM): kernel choice, KVM fallback, command lines, the sweep."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyflannel.lab import vm

CPUINFO_VMX = "processor\t: 0\nflags\t\t: fpu vme de pse vmx sse2\n\nprocessor\t: 1\nflags\t\t: fpu vmx\n"
CPUINFO_PLAIN = "processor\t: 0\nflags\t\t: fpu vme de pse sse2 hypervisor\n"


def _kernel_tree(tmp_path: Path, images: list[str], modules: list[str]) -> tuple[Path, Path]:
    boot, mods = tmp_path / "boot", tmp_path / "modules"
    boot.mkdir()
    mods.mkdir()
    for v in images:
        (boot / f"vmlinuz-{v}").write_bytes(b"kernel")
    (boot / "initrd.img-6.1.0-57-amd64").write_bytes(b"")
    for v in modules:
        (mods / v).mkdir()
    return boot, mods


def test_choose_kernel_takes_the_newest_with_modules(tmp_path: Path) -> None:
    boot, mods = _kernel_tree(
        tmp_path,
        ["6.1.0-9-amd64", "6.1.0-57-amd64", "6.1.0-100-amd64", "6.10.0-1-amd64"],
        ["6.1.0-9-amd64", "6.1.0-57-amd64", "6.1.0-100-amd64"],  # 6.10's modules are gone
    )
    k = vm.choose_kernel(boot, mods)
    assert k == vm.Kernel(boot / "vmlinuz-6.1.0-100-amd64", "6.1.0-100-amd64")


def test_choose_kernel_none_without_modules(tmp_path: Path) -> None:
    boot, mods = _kernel_tree(tmp_path, ["6.1.0-57-amd64"], [])
    assert vm.choose_kernel(boot, mods) is None
    assert vm.choose_kernel(tmp_path / "nosuch", mods) is None


def test_version_key_is_natural() -> None:
    versions = ["6.10.0-1", "6.1.0-100", "6.1.0-57", "5.15.0-9", "6.1.0-57-rt"]
    assert sorted(versions, key=vm.version_key) == ["5.15.0-9", "6.1.0-57", "6.1.0-57-rt", "6.1.0-100", "6.10.0-1"]


def test_cpu_virt_flags() -> None:
    assert vm.cpu_virt_flags(CPUINFO_VMX) == {"vmx"}
    assert vm.cpu_virt_flags(CPUINFO_PLAIN) == set()
    assert vm.cpu_virt_flags("flags : svm lm\n") == {"svm"}


def test_accel_falls_back_to_tcg() -> None:
    def ok() -> str | None:
        return None

    def broken() -> str | None:
        return "/dev/kvm: Permission denied"

    def unused() -> str | None:
        raise AssertionError("the probe must not run without vmx/svm")

    assert vm.choose_accel("auto", CPUINFO_VMX, ok) == vm.Accel(True, "KVM")
    # /dev/kvm exists and even creates a VM here, but without vmx/svm qemu's KVM fails: the flags decide first.
    assert not vm.choose_accel("auto", CPUINFO_PLAIN, unused).kvm
    got = vm.choose_accel("auto", CPUINFO_VMX, broken)
    assert not got.kvm and "Permission denied" in got.reason
    assert not vm.choose_accel("tcg", CPUINFO_VMX, ok).kvm
    assert vm.choose_accel("kvm", CPUINFO_PLAIN, unused).kvm


def test_probe_dev_kvm_reports_a_missing_device(tmp_path: Path) -> None:
    why = vm.probe_dev_kvm(str(tmp_path / "kvm"))
    assert why is not None and "kvm" in why


def _tools() -> vm.Tools:
    return vm.Tools(Path("/v/bin/vng"), Path("/usr/bin/qemu-system-x86_64"), Path("/usr/bin/busybox"))


def test_vng_command_tcg() -> None:
    k = vm.Kernel(Path("/boot/vmlinuz-6.1.0-57-amd64"), "6.1.0-57-amd64")
    rundir = Path("/tmp/pfvm123-abcd")
    cmd = vm.vng_command(
        _tools(), k, vm.Accel(False, "TCG"), name="pfvm123-abcd", rundir=rundir, cwd=Path("/repo"), cpus=2, memory="4G"
    )
    assert cmd[:3] == ["/v/bin/vng", "--run", "/boot/vmlinuz-6.1.0-57-amd64"]
    assert "--disable-kvm" in cmd and "--force-9p" in cmd
    assert cmd[cmd.index("--name") + 1] == "pfvm123-abcd"
    assert cmd[cmd.index("--memory") + 1] == "4G" and cmd[cmd.index("--cpus") + 1] == "2"
    assert "--rwdir=/tmp/pfvm123-abcd" in cmd
    assert cmd[-2:] == ["--exec", "sh /tmp/pfvm123-abcd/inner.sh"]
    kvm = vm.vng_command(
        _tools(), k, vm.Accel(True, "KVM"), name="n", rundir=rundir, cwd=Path("/r"), cpus=1, memory="1G"
    )
    assert "--disable-kvm" not in kvm


def test_inner_script_runs_the_kernel_vm_selection(tmp_path: Path) -> None:
    repo, rundir = Path("/repo"), tmp_path / "pfvm1-ab"
    text = vm.inner_script(repo, rundir, ["-k", "ipip or wg", "tests/x.py"], {"CI": "true"})
    assert f"uname -r > {rundir}/started" in text
    assert "export PYFLANNEL_IN_VM=1" in text and "export CI=true" in text and "export PYTHONPATH=/repo" in text
    pytest_line = next(line for line in text.splitlines() if line.startswith("/repo/.venv/bin/pytest"))
    assert shlex.split(pytest_line)[1:] == [
        "-p", "no:cacheprovider", "-q", "-m", "kernel_vm", "-k", "ipip or wg", "tests/x.py"
    ]  # fmt: skip
    assert f"mv {rundir}/status.tmp {rundir}/status" in text


def test_inner_script_reports_status_through_the_run_dir(tmp_path: Path) -> None:
    """The script as the guest runs it, here with a fake pytest: its status lands in <rundir>/status."""
    repo = tmp_path / "repo"
    (repo / ".venv" / "bin").mkdir(parents=True)
    fake = repo / ".venv" / "bin" / "pytest"
    fake.write_text('#!/bin/sh\necho "args: $*"; exit 3\n')
    fake.chmod(0o755)
    rundir = tmp_path / "run"
    rundir.mkdir()
    (rundir / "inner.sh").write_text(vm.inner_script(repo, rundir, ["-k", "a b"], {}, warm_up=False))
    p = subprocess.run(["sh", str(rundir / "inner.sh")], capture_output=True, text=True, timeout=30)
    assert p.returncode == 3
    assert "args: -p no:cacheprovider -q -m kernel_vm -k a b" in p.stdout
    assert (rundir / "status").read_text().strip() == "3"
    assert (rundir / "started").read_text().strip()


def test_vm_name_in_cmdline() -> None:
    qemu = b"/usr/bin/qemu-system-x86_64\0-name\0pfvm4242-0a1b2c3d\0-m\04G\0"
    assert vm.vm_name_in_cmdline(qemu) == "pfvm4242-0a1b2c3d"
    vng = b"python3\0/v/bin/vng\0--name\0pfvm17-ff\0--exec\0x\0"
    assert vm.vm_name_in_cmdline(vng) == "pfvm17-ff"
    shell = b"/bin/sh\0-c\0virtme-run --kimg /boot/x --name pfvm17-ff --memory 4G\0"
    assert vm.vm_name_in_cmdline(shell) == "pfvm17-ff"
    assert vm.vm_name_in_cmdline(b"vng\0--name=pfvm9-ab\0") == "pfvm9-ab"
    assert vm.vm_name_in_cmdline(b"qemu\0-name\0other\0") is None
    assert vm.vm_name_in_cmdline(b"grep\0pfvm17-ff\0") is None
    assert vm.owner_pid("pfvm4242-0a1b") == 4242 and vm.owner_pid("pflt12-x") is None


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_sweep_removes_run_dirs_of_dead_runners_only(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "1").mkdir(parents=True)
    (proc / "1" / "cmdline").write_bytes(b"init\0")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    dead = tmp / f"pfvm{_dead_pid()}-00aa"
    mine = tmp / f"pfvm{vm.os.getpid()}-00bb"
    other = tmp / "pflt1-x"
    for d in (dead, mine, other):
        d.mkdir()
    removed = vm.sweep(proc=proc, tmp=tmp)
    assert removed == [str(dead)]
    assert not dead.exists() and mine.exists() and other.exists()
    assert vm.sweep(proc=proc, tmp=tmp, only=mine.name) == [str(mine)]


def test_sweep_kills_an_orphaned_vm_by_pid(tmp_path: Path) -> None:
    """A process carrying a dead runner's VM name is killed; one of a live runner is left alone."""
    name_dead, name_live = f"pfvm{_dead_pid()}-0dead0", f"pfvm{vm.os.getpid()}-0a11fe"
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)", "-name"]
    orphan = subprocess.Popen([*sleeper, name_dead])
    live = subprocess.Popen([*sleeper, name_live])
    time.sleep(0.5)  # until the interpreter runs with its argv in place
    try:
        removed = vm.sweep(tmp=tmp_path)
        assert f"pid {orphan.pid} ({name_dead})" in removed
        assert orphan.wait(timeout=10) != 0
        assert live.poll() is None
    finally:
        for p in (orphan, live):
            p.kill()
            p.wait(timeout=10)


def test_cli_fails_in_one_line_without_a_kernel(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = vm.main(["--kernel", str(tmp_path / "vmlinuz-0.0"), "--", "-k", "x"])
    assert rc == vm.EXIT_VM_FAILURE
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("vm: FAILED: no stock kernel")


def test_cached_exports_once_each_and_never_the_overlaid_roots() -> None:
    got = vm.cached_exports(
        [Path("/work/main"), Path("/work/main/.venv"), Path("/root/.pyenv/versions/3.11.7"), Path("/usr"),
         Path("/srv/with space"), Path("/work/main/")]
    )  # fmt: skip
    assert got == [Path("/work/main"), Path("/root/.pyenv/versions/3.11.7")]
    opts = vm.cached_export_opts(got)
    assert opts[:4] == [
        "-fsdev", "local,id=pfvmfs0,path=/work/main,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=pfvmfs0,mount_tag=pfvm0",
    ]  # fmt: skip
    text = vm.inner_script(Path("/work/main"), Path("/tmp/pfvm1-ab"), [], {}, got)
    assert "cache=loose" in text and "pfvm1 /root/.pyenv/versions/3.11.7" in text
    assert text.index("pfvm0 /work/main") < text.index("cd /work/main")


def test_python_home_from_pyvenv_cfg(tmp_path: Path) -> None:
    (tmp_path / "pyvenv.cfg").write_text("home = /opt/py/bin\ninclude-system-site-packages = false\n")
    assert vm.python_home(tmp_path) == Path("/opt/py")
    assert vm.python_home(tmp_path / "nosuch") is None
