"""A child daemon in a mount namespace of its own with a private /run: wireguard-go and charon use fixed paths there
(a UAPI socket, a VICI socket, a pid file), so several nodes sharing one filesystem (network namespaces, as in the
tests and the lab) would otherwise take each other's. The host's mounts are untouched: the new namespace's mounts
are private, so nothing propagates back, and the agent reaches the daemon's files as /proc/<pid>/root/run/....

ChildDaemon is the rest both share: a session of its own (it outlives the agent and is adopted by the next one),
a pidfd to notice its exit, stop by pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence

# The environment variable that hands the sandbox the files to write under the new /run before the exec (a
# daemon's configuration); the sandbox removes it from the daemon's environment.
FILES_ENV = "PYFLANNEL_SANDBOX_FILES"

# Run by the interpreter with -I -S (a few milliseconds): unshare the mount namespace, keep its mounts from
# propagating anywhere, put a private tmpfs (named argv[1], so the daemon can be recognised by its mounts) on /run,
# write the files asked for (0600), then become the daemon (same pid).
SANDBOX = """
import ctypes, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
def check(rc, what):
    if rc != 0:
        sys.stderr.write("%s sandbox: %s: %s\\n" % (sys.argv[2], what, os.strerror(ctypes.get_errno())))
        sys.exit(125)
check(libc.unshare(0x20000), "unshare(CLONE_NEWNS)")
check(libc.mount(b"none", b"/", None, 0x4000 | 0x40000, None), "make / rprivate")
check(libc.mount(sys.argv[1].encode(), b"/run", b"tmpfs", 2 | 4 | 8, b"mode=0700,size=4m"), "mount a tmpfs on /run")
for name, text in json.loads(os.environ.pop("@FILES_ENV@", "{}")).items():
    path = os.path.join("/run", name)
    os.makedirs(os.path.dirname(path), 0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, text.encode())
    os.close(fd)
os.execv(sys.argv[2], sys.argv[2:])
""".replace("@FILES_ENV@", FILES_ENV)


def sandbox_argv(tmpfs: str, binary: str, args: Sequence[str] = ()) -> list[str]:
    """The command that runs `binary ARGS` in its own mount namespace, on a fresh tmpfs /run named `tmpfs`."""
    return [sys.executable, "-I", "-S", "-c", SANDBOX, tmpfs, binary, *args]


def sandbox_env(env: Mapping[str, str], files: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` plus the files the sandbox writes under /run (relative paths) before it becomes the daemon."""
    out = dict(env)
    if files:
        out[FILES_ENV] = json.dumps(dict(files))
    return out


def run_mounted_as(pid: int | str, tmpfs: str) -> bool:
    """Whether process `pid` has a tmpfs named `tmpfs` on its /run: the mark of a daemon this module started."""
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            return run_tmpfs_in(f, tmpfs)
    except OSError:
        return False


def run_tmpfs_in(mountinfo: Iterable[str], tmpfs: str) -> bool:
    """Whether a mountinfo listing has a tmpfs named `tmpfs` on /run. Any of the /run mounts: the machine's own
    /run may be a mount too, listed first, with ours on top of it."""
    for line in mountinfo:
        left, _, right = line.partition(" - ")
        fields, extra = left.split(), right.split()
        if len(fields) > 4 and fields[4] == "/run" and extra[:2] == ["tmpfs", tmpfs]:
            return True
    return False


def own_netns() -> str:
    return os.readlink("/proc/self/ns/net")


def pids_in_own_netns(comm: str) -> Iterator[str]:
    """The pids (as /proc names them) of the processes called `comm` in this network namespace: a child a
    previous agent left running, for the next one to adopt."""
    own = own_netns()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read(64).strip() != comm:
                    continue
            if os.readlink(f"/proc/{pid}/ns/net") != own:
                continue
        except OSError:
            continue
        yield pid


def stream_is_open(stream: object) -> bool:
    try:
        return stream is not None and not getattr(stream, "closed", True) and stream.fileno() >= 0  # type: ignore[attr-defined]
    except (OSError, ValueError):
        return False


class ChildDaemon:
    """What wireguard-go and charon share as supervised children: started in a session of their own (they outlive
    the agent, as kernel state does, and are adopted by the next one), watched through a pidfd, stopped by pid.
    A subclass says what `alive` means for it (its comm, what it holds)."""

    pid: int
    _proc: subprocess.Popen[bytes] | None
    _pidfd: int
    stop_timeout: float = 5.0

    def alive(self) -> bool:
        raise NotImplementedError

    def _spawn(self, argv: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        """Start `argv` with the agent's stderr as its stdout and stderr, and watch it."""
        self._forget()
        out = sys.stderr.fileno() if stream_is_open(sys.stderr) else subprocess.DEVNULL
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=dict(env),
            start_new_session=True,  # outlives the agent; not signalled with the agent's process group
            close_fds=True,
        )
        self._proc = proc
        self.pid = proc.pid
        self._watch()
        return proc

    def _adopt(self, pid: int) -> None:
        self._forget()
        self.pid = pid
        self._watch()

    def _watch(self) -> None:
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except OSError:
            self._pidfd = -1

    async def wait_exit(self) -> None:
        """Return when the process ends (the pidfd turns readable); reaps it if it is our child."""
        if self._pidfd < 0:
            await asyncio.Future()  # nothing to watch: only a cancel ends this
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        fd = self._pidfd

        def ready() -> None:
            if not done.done():
                done.set_result(None)

        loop.add_reader(fd, ready)
        try:
            await done
        finally:
            loop.remove_reader(fd)
        if self._proc is not None:
            self._proc.poll()

    async def stop(self) -> None:
        """End the process (SIGTERM, then SIGKILL after stop_timeout)."""
        if not self.pid or not self.alive():
            self._forget()
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, 15)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.stop_timeout
        while self.alive() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, 9)
        self._forget()

    def close(self) -> None:
        """Stop watching; the process keeps running."""
        self._forget(keep_child=True)

    def _forget(self, keep_child: bool = False) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        if self._proc is not None and not keep_child:
            self._proc.poll()
        self._proc = None
        self.pid = 0


__all__ = [
    "FILES_ENV",
    "SANDBOX",
    "ChildDaemon",
    "own_netns",
    "pids_in_own_netns",
    "run_mounted_as",
    "run_tmpfs_in",
    "sandbox_argv",
    "sandbox_env",
    "stream_is_open",
]
