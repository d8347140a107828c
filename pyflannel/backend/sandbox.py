"""A child daemon in a mount namespace of its own with a private /run: wireguard-go and charon use fixed paths there
(a UAPI socket, a VICI socket, a pid file), so several nodes sharing one filesystem (network namespaces, as in the
tests and the lab) would otherwise take each other's. The host's mounts are untouched: the new namespace's mounts
are private, so nothing propagates back, and the agent reaches the daemon's files as /proc/<pid>/root/run/....
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence

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


__all__ = ["FILES_ENV", "SANDBOX", "own_netns", "run_mounted_as", "run_tmpfs_in", "sandbox_argv", "sandbox_env"]
