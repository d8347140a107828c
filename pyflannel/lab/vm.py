"""Run a pytest selection inside a VM that boots Debian's stock kernel: the kernel_vm test pass.

This machine's kernel lacks ipip, wireguard, esp4 and dummy; Debian's stock kernel (apt `linux-image-amd64`) has
them. virtme-ng boots it under qemu with the host's root filesystem shared read-only plus a writable overlay, so the
repo, its `.venv`, etcd, iproute2 and the CNI plugins are all there; the tests build their namespaces inside the VM
with the same Testbed as on the host.

    python -m pyflannel.lab.vm [--timeout S] [--accel auto|kvm|tcg] ... [-- PYTEST_ARGS...]

runs `<repo>/.venv/bin/pytest -p no:cacheprovider -q -m kernel_vm PYTEST_ARGS` in the guest (cwd = repo,
PYFLANNEL_IN_VM=1, CI passed through), streams the guest's output, and exits with the inner pytest's status.
The VM's own failures exit with EXIT_VM_FAILURE (missing kernel/qemu/vng, boot failure, no status from the guest)
or EXIT_TIMEOUT (wall-time bound reached; the VM is killed), each with one line saying why.

KVM is used only when the CPU advertises vmx/svm and /dev/kvm can create a VM; otherwise, and when a KVM boot
fails (or is not up within 60 s) before the guest runs, qemu runs under TCG, where Python runs 10-15x slower than
on the host. To keep the tests' own timeouts meaningful there, the repo, the venv and the interpreter are exported
a second time with guest-side caching, and a warm-up pulls modules, binaries and kernel modules in before pytest.

Every VM is named `pfvm<runner pid>-<random>` (qemu `-name`, guest hostname) and has a run directory of the same
name under the temp dir (the status file, vng's temp files); a sweep at start kills VMs whose runner is dead (by
PID) and removes their run directories.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import os
import re
import secrets
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .netns import pid_alive

STEM = "pfvm"
EXIT_VM_FAILURE = 100
EXIT_TIMEOUT = 124
DEFAULT_TIMEOUT = 1500.0
DEFAULT_BOOT_TIMEOUT = 300.0
KVM_BOOT_TIMEOUT = 60.0  # a KVM guest is up in seconds; past this, auto mode retries under TCG
DEFAULT_CPUS = 2
DEFAULT_MEMORY = "4G"
PASS_ENV = ("CI", "ETCD_UNSUPPORTED_ARCH")
IN_VM_ENV = "PYFLANNEL_IN_VM"
KERNEL_ENV = "PYFLANNEL_VM_KERNEL"  # the version the runner booted, for the guest's self-test
HOST_KERNEL_ENV = "PYFLANNEL_HOST_KERNEL"  # the host's own kernel release, which the guest must not be running
REPO = Path(__file__).resolve().parents[2]

_KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO, 0x00)
_KVM_CREATE_VM = 0xAE01  # _IO(KVMIO, 0x01)
_KVM_API_VERSION = 12
_VERSION_PART = re.compile(r"(\d+)")
# The VM name as it appears on a command line: qemu's `-name X`, vng/virtme-run's `--name X` or `--name=X`.
_NAME_IN_CMDLINE = re.compile(rb"(?:^|[\0 ])--?name[\0 =](" + STEM.encode() + rb"(\d+)-[A-Za-z0-9]+)")


class VMError(RuntimeError):
    """The VM itself failed (not the tests inside it)."""


# --- the kernel -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kernel:
    image: Path
    version: str


def version_key(version: str) -> tuple[tuple[int, str], ...]:
    """Natural order: 6.1.0-57 < 6.1.0-100 < 6.10.0-1."""
    return tuple((int(p), "") if p.isdigit() else (-1, p) for p in _VERSION_PART.split(version) if p)


def choose_kernel(boot: Path = Path("/boot"), modules: Path = Path("/lib/modules")) -> Kernel | None:
    """The newest /boot/vmlinuz-<version> whose modules (/lib/modules/<version>) are installed."""
    found = []
    for image in boot.glob("vmlinuz-*"):
        version = image.name[len("vmlinuz-") :]
        if version and image.is_file() and (modules / version).is_dir():
            found.append(Kernel(image, version))
    return max(found, key=lambda k: version_key(k.version), default=None)


# --- the accelerator --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Accel:
    kvm: bool
    reason: str


def cpu_virt_flags(cpuinfo: str) -> set[str]:
    """The hardware virtualization flags (vmx, svm) that /proc/cpuinfo advertises."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(f for f in value.split() if f in ("vmx", "svm"))
    return flags


def probe_dev_kvm(path: str = "/dev/kvm") -> str | None:
    """None when `path` opens, speaks KVM API 12 and creates a VM; else why not."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"{path}: {e.strerror}"
    try:
        version = fcntl.ioctl(fd, _KVM_GET_API_VERSION)
        if version != _KVM_API_VERSION:
            return f"{path}: KVM API version {version}, want {_KVM_API_VERSION}"
        vm_fd = fcntl.ioctl(fd, _KVM_CREATE_VM, 0)
        os.close(vm_fd)
    except OSError as e:
        return f"{path}: {e.strerror or e}"
    finally:
        os.close(fd)
    return None


def read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def choose_accel(mode: str, cpuinfo: str, probe: Callable[[], str | None]) -> Accel:
    """`mode` auto: KVM when the CPU has vmx/svm and the probe creates a VM, else TCG; kvm/tcg: forced."""
    if mode == "tcg":
        return Accel(False, "TCG (forced)")
    if mode == "kvm":
        return Accel(True, "KVM (forced)")
    if not cpu_virt_flags(cpuinfo):
        return Accel(False, "TCG: the CPU advertises no vmx/svm")
    why = probe()
    if why:
        return Accel(False, f"TCG: {why}")
    return Accel(True, "KVM")


# --- tools and command lines ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tools:
    vng: Path
    qemu: Path
    busybox: Path


def find_tools(venv_bin: Path, path: str | None = None) -> Tools:
    """vng (virtme-ng, from the venv or PATH), qemu-system-x86_64 and busybox (virtme's initramfs needs it)."""
    vng = venv_bin / "vng"
    if not vng.exists():
        found = shutil.which("vng", path=path)
        if found is None:
            raise VMError(f"no vng: virtme-ng is not installed in {venv_bin.parent} (run scripts/setup.sh)")
        vng = Path(found)
    qemu = shutil.which("qemu-system-x86_64", path=path)
    if qemu is None:
        raise VMError("no qemu-system-x86_64 (apt qemu-system-x86; run scripts/setup.sh)")
    busybox = next((b for b in ("busybox-static", "busybox.static", "busybox") if shutil.which(b, path=path)), None)
    if busybox is None:
        raise VMError("no busybox: virtme-ng needs it for its initramfs (apt busybox-static; run scripts/setup.sh)")
    return Tools(vng, Path(qemu), Path(shutil.which(busybox, path=path) or busybox))


WARM_UP = (
    "import importlib\n"
    "for m in ('pyflannel.daemon', 'pyflannel.cli', 'pyflannel.lab.testbed', 'pyflannel.cni.plugin', 'pyroute2',"
    " 'pytest'):\n"
    "    try: importlib.import_module(m)\n"
    "    except Exception as e: print('vm: warm-up:', m, e)\n"
    "from pyroute2 import IPRoute\n"
    "IPRoute().close()\n"
)
# What the vxlan/host-gw agents, the CNI chain and --ip-masq make the kernel load on first use anyway. Not ipip
# (it adds tunl0 to every namespace) nor anything that changes behaviour by being loaded (br_netfilter).
WARM_MODULES = (
    "vxlan", "bridge", "veth", "nf_tables", "nft_compat", "nft_chain_nat", "nf_nat", "nf_conntrack", "xt_comment",
    "xt_mark", "xt_MASQUERADE", "xt_conntrack", "xt_addrtype", "xt_multiport", "xt_tcpudp",
)  # fmt: skip
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._/+-]+$")  # what survives vng's shell and qemu's option syntax unquoted
_NO_CACHED_EXPORT = {"/", "/usr", "/etc", "/lib", "/var", "/tmp", "/run", "/home", "/opt", "/srv"}


def python_home(venv: Path) -> Path | None:
    """The interpreter installation a venv runs on (pyvenv.cfg `home` is its bin dir)."""
    try:
        cfg = (venv / "pyvenv.cfg").read_text()
    except OSError:
        return None
    for line in cfg.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "home" and value.strip():
            return Path(value.strip()).resolve().parent
    return None


def cached_exports(paths: Sequence[Path]) -> list[Path]:
    """The trees to export a second time with guest-side caching: each once, none inside another, none that
    virtme overlays or a shell would split.

    The guest's root is 9p without cache: every stat and read of a Python module is a round trip to qemu, and
    under TCG that made `import pyflannel.daemon` take ~50 s. These trees (the repo, its venv, the interpreter)
    are mounted again over themselves with `cache=loose`, read-only, so each file crosses once per VM."""
    out: list[Path] = []
    for p in sorted({Path(os.path.normpath(p)) for p in paths}, key=lambda p: len(p.parts)):
        s = str(p)
        if s in _NO_CACHED_EXPORT or not _SAFE_PATH.match(s) or "," in s:
            continue
        if any(p.is_relative_to(o) for o in out):
            continue
        out.append(p)
    return out


def cached_export_opts(exports: Sequence[Path]) -> list[str]:
    """qemu options for the cached exports: one virtio-9p device each, tags pfvm0, pfvm1..."""
    opts: list[str] = []
    for i, p in enumerate(exports):
        opts += [
            "-fsdev", f"local,id=pfvmfs{i},path={p},security_model=none,readonly=on,multidevs=remap",
            "-device", f"virtio-9p-pci,fsdev=pfvmfs{i},mount_tag=pfvm{i}",
        ]  # fmt: skip
    return opts


def inner_script(
    repo: Path,
    rundir: Path,
    pytest_args: Sequence[str],
    env: dict[str, str],
    exports: Sequence[Path] = (),
    *,
    warm_up: bool = True,
) -> str:
    """What the guest runs: mount the cached exports, mark the boot, run pytest on the kernel_vm selection, leave
    its status for the host."""
    venv_bin = repo / ".venv" / "bin"
    variables = {
        "PATH": f"{venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        IN_VM_ENV: "1",
        "PYTHONPATH": str(repo),  # this checkout's pyflannel, whatever the venv's editable install points at
        "PYTHONDONTWRITEBYTECODE": "1",  # the repo is read-only in the guest
        "PYTHONUNBUFFERED": "1",
        **env,
    }
    pytest = [str(venv_bin / "pytest"), "-p", "no:cacheprovider", "-q", "-m", "kernel_vm", *pytest_args]
    q = shlex.quote
    mount = "mount -t 9p -o ro,trans=virtio,version=9p2000.L,cache=loose,msize=512000"
    warm = [
        'echo "vm: guest up: kernel $(uname -r), $(nproc) cpus; warming the caches"',
        # The first agent a test starts would otherwise pull every module, binary and kernel module it needs
        # across 9p inside the test's own timeouts. Never fatal.
        "t0=$(date +%s)",
        f"{q(str(venv_bin / 'python'))} -c {q(WARM_UP)} || echo 'vm: warning: the warm-up failed'",
        "for c in 'etcd --version' 'etcdctl version' 'ip -V' 'bridge -V' 'tcpdump --version' 'iptables-save' "
        "'nft -v'; do $c >/dev/null 2>&1; done",
        "for p in bridge host-local portmap; do CNI_COMMAND=VERSION /usr/lib/cni/$p </dev/null >/dev/null 2>&1; done",
        f"modprobe -a -q {' '.join(WARM_MODULES)} || true",
        'echo "vm: warm-up $(( $(date +%s) - t0 )) s; running the kernel_vm tests"',
    ]
    lines = [
        "#!/bin/sh",
        "# Written by pyflannel.lab.vm; runs inside the VM.",
        f"uname -r > {q(str(rundir / 'started'))}",
        *(
            f"{mount} pfvm{i} {q(str(p))} || echo 'vm: warning: no cached mount of {p} (slower)'"
            for i, p in enumerate(exports)
        ),
        *(f"export {k}={q(v)}" for k, v in variables.items()),
        f"cd {q(str(repo))} || {{ echo 'vm: no repo at {repo}'; exit {EXIT_VM_FAILURE}; }}",
        *(warm if warm_up else ['echo "vm: guest up: kernel $(uname -r)"']),
        shlex.join(pytest),
        "rc=$?",
        f"echo $rc > {q(str(rundir / 'status.tmp'))} && mv {q(str(rundir / 'status.tmp'))} {q(str(rundir / 'status'))}",
        "exit $rc",
        "",
    ]
    return "\n".join(lines)


def vng_command(
    tools: Tools,
    kernel: Kernel,
    accel: Accel,
    *,
    name: str,
    rundir: Path,
    cwd: Path,
    cpus: int,
    memory: str,
    exports: Sequence[Path] = (),
    verbose: bool = False,
) -> list[str]:
    cmd = [str(tools.vng), "--run", str(kernel.image)]
    if not accel.kvm:
        cmd.append("--disable-kvm")
    cmd += [
        "--force-9p",
        "--qemu", str(tools.qemu),
        "--busybox", str(tools.busybox),
        "--cpus", str(cpus),
        "--memory", memory,
        "--name", name,
        f"--rwdir={rundir}",
        "--cwd", str(cwd),
    ]  # fmt: skip
    if verbose:
        cmd.append("--verbose")
    if exports:
        cmd.append("--qemu-opts=" + " ".join(cached_export_opts(exports)))
    cmd += ["--exec", f"sh {shlex.quote(str(rundir / 'inner.sh'))}"]
    return cmd


# --- leftovers of crashed runs ----------------------------------------------------------------------------


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed child its parent has not reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def owner_pid(name: str, stem: str = STEM) -> int | None:
    m = re.match(re.escape(stem) + r"(\d+)-", name)
    return int(m.group(1)) if m else None


def vm_name_in_cmdline(cmdline: bytes) -> str | None:
    """The pfvm VM name a process carries on its command line (qemu, vng, virtme-run, their shell), if any."""
    m = _NAME_IN_CMDLINE.search(cmdline)
    return m.group(1).decode() if m else None


def vm_processes(proc: Path = Path("/proc")) -> list[tuple[int, str]]:
    """(pid, VM name) of every process whose command line carries a pfvm VM name."""
    found = []
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes()
        except OSError:
            continue
        name = vm_name_in_cmdline(cmdline)
        if name:
            found.append((int(d.name), name))
    return found


def kill_pids(pids: Sequence[int], grace: float = 3.0) -> None:
    """SIGTERM each PID, SIGKILL what is still there after `grace` seconds."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    left = list(pids)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in left if _running(p)]
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def sweep(*, proc: Path = Path("/proc"), tmp: Path | None = None, only: str | None = None) -> list[str]:
    """Kill VM processes and remove run dirs whose runner is dead (or, with `only`, those of that VM name)."""

    def orphaned(name: str) -> bool:
        if only is not None:
            return name == only
        owner = owner_pid(name)
        return owner is None or (owner != os.getpid() and not pid_alive(owner))

    removed: list[str] = []
    victims = [(pid, name) for pid, name in vm_processes(proc) if pid != os.getpid() and orphaned(name)]
    kill_pids([pid for pid, _ in victims])
    removed += [f"pid {pid} ({name})" for pid, name in victims]
    for d in (tmp or Path(tempfile.gettempdir())).glob(f"{STEM}*"):
        if d.is_dir() and orphaned(d.name):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    return removed


def make_rundir(tmp: Path | None = None) -> Path:
    """A fresh `<tmp>/pfvm<our pid>-<hex>`: the run directory, whose name is also the VM's name."""
    base = tmp or Path(tempfile.gettempdir())
    for _ in range(10):
        d = base / f"{STEM}{os.getpid()}-{secrets.token_hex(4)}"
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=0o700)
            return d
    raise VMError(f"cannot create a run directory in {base}")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# --- one run ----------------------------------------------------------------------------------------------


@dataclass
class Options:
    pytest_args: list[str]
    timeout: float = DEFAULT_TIMEOUT
    boot_timeout: float = DEFAULT_BOOT_TIMEOUT
    cpus: int = DEFAULT_CPUS
    memory: str = DEFAULT_MEMORY
    accel: str = "auto"
    kernel: Path | None = None
    repo: Path = REPO
    verbose: bool = False
    dry_run: bool = False


@dataclass
class Outcome:
    status: int | None  # the inner pytest's exit status; None: the guest left none
    started: bool  # the guest ran our script
    vng_rc: int | None
    timed_out: bool
    boot_s: float | None
    wall_s: float


def _say(msg: str) -> None:
    print(f"vm: {msg}", flush=True)


def _kill_group(p: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """Stop vng, virtme-run and qemu: the process group (its id is vng's PID) we started them in."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, sig)
        try:
            p.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    # qemu is vng's grandchild: make sure the whole group is gone (bounded), not just vng.
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def _boot_once(cmd: list[str], env: dict[str, str], rundir: Path, boot_timeout: float, deadline: float) -> Outcome:
    """Start vng, copy its output to our stdout as it comes, enforce the boot and wall-time bounds."""
    t0 = time.monotonic()
    started_file, status_file = rundir / "started", rundir / "status"
    # stdout must be a pipe: qemu reopens /proc/self/fd/1, which on a regular file would truncate it.
    p = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    assert p.stdout is not None
    out_fd, pipe_fd = sys.stdout.fileno(), p.stdout.fileno()
    boot_s: float | None = None
    timed_out = False
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(pipe_fd, selectors.EVENT_READ)
            eof = False
            while True:
                if not eof and sel.select(timeout=0.5):
                    chunk = os.read(pipe_fd, 65536)
                    if chunk:
                        _write_all(out_fd, chunk)
                    else:
                        eof = True
                        sel.unregister(pipe_fd)
                if eof:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        p.wait(timeout=0.5)
                if p.poll() is not None and eof:
                    break
                now = time.monotonic()
                if boot_s is None and started_file.exists():
                    boot_s = now - t0
                if now > deadline:
                    timed_out = True
                    break
                if boot_s is None and now - t0 > boot_timeout:
                    _say(f"the guest did not start within {boot_timeout:.0f} s; stopping the VM")
                    break
    finally:
        _kill_group(p)  # also after a normal exit: nothing of the group may outlive the run
        p.stdout.close()
    if boot_s is None and started_file.exists():
        boot_s = time.monotonic() - t0
    status: int | None = None
    with contextlib.suppress(OSError, ValueError):
        status = int(status_file.read_text().strip())
    return Outcome(status, boot_s is not None, p.returncode, timed_out, boot_s, time.monotonic() - t0)


def run(opts: Options) -> int:
    """One VM pass; the inner pytest's exit status, or EXIT_VM_FAILURE / EXIT_TIMEOUT with one line why."""
    for what in sweep():
        _say(f"swept leftover of a crashed run: {what}")
    kernel = Kernel(opts.kernel, opts.kernel.name.removeprefix("vmlinuz-")) if opts.kernel else choose_kernel()
    if kernel is None or not kernel.image.is_file():
        raise VMError("no stock kernel: no /boot/vmlinuz-<version> with /lib/modules/<version> (apt linux-image-amd64)")
    venv_bin = opts.repo / ".venv" / "bin"
    if not (venv_bin / "pytest").exists():
        raise VMError(f"no {venv_bin / 'pytest'} (run scripts/setup.sh)")
    tools = find_tools(venv_bin)
    accel = choose_accel(opts.accel, read_cpuinfo(), probe_dev_kvm)
    rundir = make_rundir()
    name = rundir.name
    env = {
        **os.environ,
        "PATH": f"{tools.vng.parent}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
        "TMPDIR": str(rundir),  # vng's own temp files (the return-code file) die with the run dir
    }
    passed = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    passed[HOST_KERNEL_ENV] = os.uname().release
    if kernel.image.name.startswith("vmlinuz-"):
        passed[KERNEL_ENV] = kernel.version
    venv = (opts.repo / ".venv").resolve()
    exports = cached_exports([opts.repo, venv, *([home] if (home := python_home(venv)) else [])])
    try:
        (rundir / "inner.sh").write_text(inner_script(opts.repo, rundir, opts.pytest_args, passed, exports))
        deadline = time.monotonic() + opts.timeout
        while True:
            cmd = vng_command(
                tools, kernel, accel, name=name, rundir=rundir, cwd=opts.repo, cpus=opts.cpus, memory=opts.memory,
                exports=exports, verbose=opts.verbose,
            )  # fmt: skip
            _say(
                f"booting {kernel.image} ({accel.reason}), {opts.cpus} cpus, {opts.memory}, name {name}, "
                f"timeout {opts.timeout:.0f} s"
            )
            if opts.dry_run:
                print(shlex.join(cmd))
                print((rundir / "inner.sh").read_text(), end="")
                return 0
            # A KVM that hangs instead of failing must not cost the whole boot bound before the TCG retry.
            retry = accel.kvm and opts.accel == "auto"
            boot_timeout = min(opts.boot_timeout, KVM_BOOT_TIMEOUT) if retry else opts.boot_timeout
            out = _boot_once(cmd, env, rundir, boot_timeout, deadline)
            if out.timed_out:
                _say(f"FAILED: the VM pass hit its {opts.timeout:.0f} s bound; the VM was killed")
                return EXIT_TIMEOUT
            if out.started or not accel.kvm or opts.accel != "auto":
                break
            _say(f"the KVM boot failed before the guest ran (vng exit {out.vng_rc}); retrying under TCG")
            accel = Accel(False, "TCG: the KVM boot failed")
        boot = f"guest up after {out.boot_s:.0f} s" if out.boot_s is not None else "guest never started"
        if not out.started:
            raise VMError(
                f"the VM did not boot (vng exit {out.vng_rc}, {boot}; see its output above, or rerun with --verbose "
                "for the kernel console)"
            )
        if out.status is None:
            raise VMError(
                f"the guest left no pytest status (vng exit {out.vng_rc}, {boot}, {out.wall_s:.0f} s: "
                "a kernel panic or a crash inside the VM; see its output above)"
            )
        _say(f"inner pytest exit {out.status}; {boot}, VM pass {out.wall_s:.0f} s")
        return out.status
    finally:
        sweep(only=name)
        shutil.rmtree(rundir, ignore_errors=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pyflannel.lab.vm",
        description="Run the kernel_vm tests (pytest -m kernel_vm) inside a VM booting the stock kernel.",
        epilog="Example: python -m pyflannel.lab.vm -- -k ipip tests/test_vm_kernel.py",
    )
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="wall-time bound in s (%(default)s)")
    p.add_argument("--boot-timeout", type=float, default=DEFAULT_BOOT_TIMEOUT, help="s until the guest runs")
    p.add_argument("--cpus", type=int, default=DEFAULT_CPUS, help="guest CPUs (%(default)s)")
    p.add_argument("--memory", default=DEFAULT_MEMORY, help="guest memory (%(default)s)")
    p.add_argument(
        "--accel",
        choices=("auto", "kvm", "tcg"),
        default=os.environ.get("PYFLANNEL_VM_ACCEL", "auto"),
        help="auto: KVM when it really works, else TCG",
    )
    p.add_argument("--kernel", type=Path, help="kernel image (default: the newest /boot/vmlinuz-* with modules)")
    p.add_argument("--repo", type=Path, default=REPO, help="checkout to test, with its .venv (default %(default)s)")
    p.add_argument("--verbose", action="store_true", help="show the kernel console")
    p.add_argument("--dry-run", action="store_true", help="print the vng command and the guest script only")
    p.add_argument("pytest_args", nargs="*", help="passed to the inner pytest (after --)")
    return p


def _on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    opts = Options(
        pytest_args=list(a.pytest_args),
        timeout=a.timeout,
        boot_timeout=a.boot_timeout,
        cpus=a.cpus,
        memory=a.memory,
        accel=a.accel,
        kernel=a.kernel,
        repo=a.repo.resolve(),
        verbose=a.verbose,
        dry_run=a.dry_run,
    )
    previous = signal.signal(signal.SIGTERM, _on_sigterm)  # so run()'s finally stops the VM
    try:
        return run(opts)
    except VMError as e:
        _say(f"FAILED: {e}")
        return EXIT_VM_FAILURE
    except OSError as e:
        if e.errno != errno.EPIPE:
            _say(f"FAILED: {e}")
        return EXIT_VM_FAILURE
    except KeyboardInterrupt:
        _say("interrupted; the VM was stopped")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
