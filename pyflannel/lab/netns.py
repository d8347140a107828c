"""Run-scoped network namespaces, processes and temp dirs, with a sweep for leftovers of crashed runs.

Everything a test or the lab makes is named `<stem><owner pid>-...`, so a later run can tell whether the
owner is still alive and remove only what was orphaned. Nothing here touches the root namespace: links are
created inside namespaces (`ip -n NS link add ... netns OTHER`), never in the caller's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

NETNS_DIR = Path("/run/netns")
STEM_TEST = "pflt"
STEM_LAB = "pfll"


class NetnsError(RuntimeError):
    pass


def run(cmd: Sequence[str], *, check: bool = True, timeout: float = 30, input: str | None = None) -> str:
    """Run a command, return stdout; raise NetnsError carrying stderr on failure."""
    try:
        p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, input=input)
    except subprocess.TimeoutExpired:
        raise NetnsError(f"timed out after {timeout}s: {' '.join(cmd)}") from None
    if check and p.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)}: exit {p.returncode}: {p.stderr.strip() or p.stdout.strip()}")
    return p.stdout


def output_or_error(cmd: Sequence[str], *, timeout: float = 20) -> str:
    """A command's output for the reader (`show`, `trace`), never an exception: its stdout when it succeeded,
    else what it said (stderr, or stdout), or why it could not run, stripped."""
    try:
        p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"({e})"
    return (p.stdout if p.returncode == 0 else p.stderr or p.stdout).rstrip()


def wait_for(pred: Callable[[], bool], timeout: float = 20, step: float = 0.2) -> bool:
    """Poll `pred` until it holds or `timeout` seconds pass; the last answer is returned either way."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def ns_exec(ns: str, cmd: Sequence[str], **kw: object) -> str:
    return run(["ip", "netns", "exec", ns, *cmd], **kw)  # type: ignore[arg-type]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_pid(name: str, stem: str) -> int | None:
    rest = name[len(stem) :]
    digits = ""
    for ch in rest:
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if digits else None


def ns_pids(ns: str) -> list[int]:
    out = run(["ip", "netns", "pids", ns], check=False, timeout=10)
    return [int(x) for x in out.split() if x.isdigit()]


def kill_ns_processes(ns: str, grace: float = 3.0) -> None:
    """SIGTERM everything running in `ns`, then SIGKILL what is left after `grace` seconds."""
    pids = ns_pids(ns)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if pid_alive(p)]
        time.sleep(0.05)
    for pid in ns_pids(ns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def delete_ns(ns: str) -> None:
    kill_ns_processes(ns)
    run(["ip", "netns", "delete", ns], check=False, timeout=15)


def list_ns() -> list[str]:
    out = run(["ip", "netns", "list"], check=False, timeout=10)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def sweep(stem: str, *, include_alive: bool = False) -> list[str]:
    """Remove namespaces and temp dirs of `stem` whose owning process is dead (or all, with include_alive)."""
    removed: list[str] = []
    for ns in list_ns():
        if not ns.startswith(stem):
            continue
        owner = _owner_pid(ns, stem)
        if include_alive or owner is None or not pid_alive(owner):
            delete_ns(ns)
            removed.append(ns)
    tmp = Path(tempfile.gettempdir())
    for d in tmp.glob(f"{stem}*"):
        owner = _owner_pid(d.name, stem)
        if include_alive or owner is None or not pid_alive(owner):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    return removed


@dataclass
class RunScope:
    """One run's namespaces, processes and temp dir, all removed by close() (call it in a finalizer)."""

    stem: str = STEM_TEST
    tag: str = ""
    prefix: str = ""
    tmpdir: Path = field(default_factory=Path)
    namespaces: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.prefix:
            self.prefix = f"{self.stem}{os.getpid()}{self.tag}-"
        if self.tmpdir == Path():
            self.tmpdir = Path(tempfile.mkdtemp(prefix=self.prefix))

    def ns_name(self, short: str) -> str:
        return f"{self.prefix}{short}"

    def add_ns(self, short: str) -> str:
        ns = self.ns_name(short)
        run(["ip", "netns", "add", ns])
        self.namespaces.append(ns)
        ns_exec(ns, ["ip", "link", "set", "lo", "up"])
        return ns

    def remove_ns(self, ns: str) -> None:
        delete_ns(ns)
        if ns in self.namespaces:
            self.namespaces.remove(ns)

    def spawn(
        self,
        ns: str,
        cmd: Sequence[str],
        *,
        log: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a long-running process inside `ns`; its output goes to `log` (default: tmpdir)."""
        logf = open(log or self.tmpdir / f"{Path(cmd[0]).name}-{len(self.procs)}.log", "ab")  # noqa: SIM115
        try:
            p = subprocess.Popen(
                ["ip", "netns", "exec", ns, *cmd],
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        finally:
            logf.close()
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=5)
        self.procs.clear()
        for ns in reversed(self.namespaces):
            delete_ns(ns)
        self.namespaces.clear()
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self) -> RunScope:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def veth(ns_a: str, name_a: str, ns_b: str, name_b: str, mtu: int = 1500) -> None:
    """A veth pair created inside ns_a with its peer moved straight into ns_b (never via the root ns)."""
    run(["ip", "-n", ns_a, "link", "add", name_a, "mtu", str(mtu), "type", "veth",
         "peer", "name", name_b, "mtu", str(mtu), "netns", ns_b])  # fmt: skip


# A node's own /var/lib/cni, as the tutorials' paths have it, without touching the host. In a mount namespace of
# its own whose mounts are slaves of the host's (as `ip netns exec` makes them: mounts made here never propagate
# back, while the host's new ones, such as a new pod's /run/netns entry, still arrive), a 4 MB tmpfs on the node's
# `.mnt` holds an overlay's upper layer for /var/lib; its `cni` directory, upper-only, is then covered by a bind
# mount of the node's `var-lib-cni`. Every process of the node gets the same view, and the mounts end with it.
# Any step failing stops the command before it runs (set -e): nothing is ever written to the host's /var/lib.
_NODE_MOUNTS = (
    'set -e; d="$1"; shift; '
    'mount -t tmpfs -o size=4m,mode=0700 pyflannel-lab "$d/.mnt"; '
    'mkdir -p "$d/.mnt/upper/cni" "$d/.mnt/work"; '
    'mount -t overlay overlay -o "lowerdir=/var/lib,upperdir=$d/.mnt/upper,workdir=$d/.mnt/work" /var/lib; '
    'mount --bind "$d/var-lib-cni" /var/lib/cni; '
    'exec "$@"'
)
VAR_LIB_CNI = "var-lib-cni"


def node_mounts(node_dir: Path) -> list[str]:
    """The command prefix that gives a program the node's own /var/lib/cni (`node_dir`/var-lib-cni); run it
    inside the node's network namespace. The program is exec'd, so its pid is the prefix's."""
    for sub in (".mnt", VAR_LIB_CNI):
        (node_dir / sub).mkdir(mode=0o700, exist_ok=True)
    return ["unshare", "--mount", "--propagation", "slave", "sh", "-c", _NODE_MOUNTS, "node-mounts", str(node_dir)]


def node_exec(ns: str, node_dir: Path) -> list[str]:
    """`[*node_exec(ns, d), "cat", "/var/lib/cni/..."]` runs in node `ns` as the node's own processes do."""
    return ["ip", "netns", "exec", ns, *node_mounts(node_dir)]


def url_host(ip: str) -> str:
    """`ip` as a URL's host: an IPv6 literal in brackets."""
    return f"[{ip}]" if ":" in ip else ip


def spawn_etcd(
    scope: RunScope,
    ns: str,
    ip: str,
    *,
    name: str = "etcd",
    cluster: str | None = None,
    extra_client_ips: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    """Start Debian's etcd inside `ns` on `ip` (client 2379, peer 2380) without waiting for it. `cluster` is the
    --initial-cluster of a multi-member cluster (`name=http://ip:2380,...`); its members must all be started
    before any becomes healthy. The data dir is named after the member, so a restart keeps its data. It also
    serves clients on `extra_client_ips` (a dual-stack member's other address)."""
    data = scope.tmpdir / f"{name}-data"
    host = url_host(ip)
    url = f"http://{host}:2379"
    listen = ",".join([url, *(f"http://{url_host(x)}:2379" for x in extra_client_ips)])
    return scope.spawn(
        ns,
        [
            shutil.which("etcd") or "/usr/bin/etcd",
            "--name", name,
            "--data-dir", str(data),
            "--listen-client-urls", listen,
            "--advertise-client-urls", url,
            "--listen-peer-urls", f"http://{host}:2380",
            "--initial-advertise-peer-urls", f"http://{host}:2380",
            "--initial-cluster", cluster or f"{name}=http://{host}:2380",
            "--initial-cluster-token", scope.prefix + "etcd",
            "--log-level", "warn",
        ],
        log=scope.tmpdir / f"{name}.log",
        env={**os.environ, "ETCD_UNSUPPORTED_ARCH": os.environ.get("ETCD_UNSUPPORTED_ARCH", "")},
    )  # fmt: skip


def wait_etcd(scope: RunScope, ns: str, ip: str, *, name: str = "etcd", timeout: float = 20) -> str:
    """Wait until the etcd member on `ip` reports healthy (it has a leader and answers); return its endpoint."""
    url = f"http://{url_host(ip)}:2379"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = subprocess.run(
            ["ip", "netns", "exec", ns, "etcdctl", "--endpoints", url, "--dial-timeout", "1s",
             "--command-timeout", "2s", "endpoint", "health"],
            capture_output=True, text=True, timeout=10, env={**os.environ, "ETCDCTL_API": "3"},
        )  # fmt: skip
        if p.returncode == 0:
            return url
        time.sleep(0.2)
    log = (scope.tmpdir / f"{name}.log").read_text(errors="replace")[-2000:]
    raise NetnsError(f"etcd {name} in {ns} did not become healthy in {timeout:.0f}s; log tail:\n{log}")


def start_etcd(scope: RunScope, ns: str, ip: str, *, name: str = "etcd") -> str:
    """Start a one-member etcd inside `ns`, listening on `ip`:2379; return the client endpoint once healthy."""
    spawn_etcd(scope, ns, ip, name=name)
    return wait_etcd(scope, ns, ip, name=name)


def etcdctl(ns: str, endpoint: str, *args: str, input: str | None = None) -> str:
    return run(
        ["ip", "netns", "exec", ns, "env", "ETCDCTL_API=3", "etcdctl", "--endpoints", endpoint, *args],
        input=input,
    )
