"""flanneld's CNI server: the flannel CNI plugin's work, done for the `flannel` client without a Python start.

A pod pays the plugin twice (ADD, DEL), and an exec'd Python plugin costs a ~9 ms interpreter start each
time. The executable the runtime calls is a small static C client (pyflannel/cni/launcher.c) that hands the
call to this server over a unix stream socket, and runs the standalone Python plugin when nothing serves.

The socket (--cni-socket; default: cni.sock beside --subnet-file, so /run/flannel/cni.sock) is made mode 0600,
its directory 0700 if missing. A dead agent's socket file is replaced; a live agent's is left alone (and not
served). The file is removed when the agent stops, which first lets running calls finish (DRAIN_TIMEOUT).
Each connection carries one call: the plugin's functional core, pyflannel.cni.plugin.run, runs in one of
WORKERS threads (its delegates are blocking subprocesses; the event loop only starts and stops the threads)
with the client's environment, stdin and stderr (the delegates write there), and its exit status, stdout and
stderr go back.

Who is served: a client whose SO_PEERCRED uid is 0 or the agent's own, whose pid flanneld can see, in the
agent's network namespace (the delegates make their links where the agent runs). Any other connection is closed
unread; its client then runs the standalone plugin, as it does when nothing listens (and as a client that is not
root does when the 0600 mode stops its connect()).

The client's files: the paths a call names (CNI_PATH, dataDir, subnetFile, the netns file, relative ones, the
delegates' own) must lead where they lead for the client. A client in flanneld's mount namespace, root and
working directory (the agent on the host, beside the runtime) sees what flanneld sees, and its call runs as it
is. Otherwise (kube-flannel's DaemonSet: flanneld in a container, with a mount namespace and root of its own;
`ip netns exec`, which makes a mount namespace per command) the worker thread enters the client's view for the
call and leaves it afterwards: it has its own fs_struct (unshare(CLONE_FS), once per thread: a thread sharing it
cannot setns into a mount namespace), opens the client's /proc/<pid>/ns/mnt, root and cwd through flanneld's
view, then setns(CLONE_NEWNS) (which resets the thread's root and cwd), fchdir+chroot to the client's root and
fchdir to its cwd; it leaves the same way with descriptors of flanneld's own, opened at start. The call then
sees exactly the client's files, and its delegates inherit that view (a fork copies the calling thread's
fs_struct and namespaces). Comparing a few directories instead, as before, could not tell what a container's
flanneld sees anywhere else, and refused every call there. Entering needs CAP_SYS_ADMIN and CAP_SYS_CHROOT, and
opening a more privileged client's /proc files CAP_SYS_PTRACE and an LSM that allows the read (containerd's
default AppArmor profile does not): without them the call is refused with the reason (logged at warning the
first time) and the client runs the standalone plugin. A thread that cannot leave a client's view serves no
more (logged as an error) and the event loop starts another in its place. While a thread is in a client's
view no module may be imported (it would be read from the client's files): the plugin's modules are imported
before the first switch, and an import that would happen there fails instead.

Protocol, version 1 (integers unsigned, big-endian):
  request  0  4  "FCNI"
           4  1  version (1)
           5  3  zero
           8  4  number of environment entries (at most MAX_ENV_COUNT)
          12  4  bytes of the environment (at most MAX_ENV_BYTES): each entry "KEY=VALUE" and a NUL, as environ
                 holds them; read as Python reads environ (an entry without "=" is skipped, the first of equal
                 keys wins, UTF-8 with surrogateescape)
          16  4  bytes of stdin (at most the plugin's MAX_STDIN)
          20     the environment, then stdin
          and with the first bytes one file descriptor (SCM_RIGHTS): the client's stderr
  reply    0  4  "FCNR"
           4  1  version (1)
           5  1  kind: 0 the plugin ran; 1 refused, nothing was run (the client runs the standalone plugin)
           6  1  exit status
           7  1  zero
           8  4  bytes of stdout (kind 1: of the reason, UTF-8)
          12  4  bytes of stderr (kind 1: zero); with stdout at most MAX_REPLY
          16     stdout, then stderr
A request the server cannot read (another magic or version, over a cap, not one descriptor) is answered with
kind 1 and the reason, a connection that ends before a whole request is closed: neither touches the agent.
At most WORKERS calls run at once; past them connections wait in the listen backlog (BACKLOG), and past that
the client's connect() fails at once, so a flood falls back to the standalone plugin instead of queueing
without bound.

What a served call's delegates get from flanneld rather than from the runtime: the umask, the resource limits,
the cgroup, the capabilities, the PID namespace and the LSM profile. The environment is the one the standalone
plugin would hand them: the client sends it as Python would have it (its C-locale coercion included) and falls
back where Python would decode it otherwise (a locale whose encoding is not UTF-8).

`python -m pyflannel.cniserver --socket PATH` serves without an agent (tests, bench/bench_cni.py).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import io
import logging
import os
import signal
import socket
import stat
import struct
import sys
import threading
import time
from dataclasses import dataclass

from .backoff import Backoff
from .log import setup_logging

# The plugin's modules (~0.7 MB) are imported by the first request read, not with the agent: an agent that never
# serves (a PID namespace of its own hides every client) never loads them; ctypes too waits for a client in
# another view (Views).

log = logging.getLogger(__name__)

PROTOCOL = 1
REQUEST_MAGIC = b"FCNI"
REPLY_MAGIC = b"FCNR"
REQUEST_HEAD = struct.Struct(">4sB3xIII")
REPLY_HEAD = struct.Struct(">4sBBBxII")
KIND_RAN = 0
KIND_REFUSED = 1
# The caps the client (launcher.c) also holds: past them it runs the standalone plugin without asking.
MAX_ENV_COUNT = 4096
MAX_ENV_BYTES = 1 << 20
MAX_REPLY = 256 << 20
# Calls at once: each holds its request (up to 17 MiB, in practice a few KiB) and a delegate process.
WORKERS = 8
BACKLOG = 128
# The client has read stdin before it connects, so a whole request arrives at once; the answer is read at once.
REQUEST_TIMEOUT = 30.0
REPLY_TIMEOUT = 30.0
# Below the agent's SHUTDOWN_STEP_TIMEOUT (5 s), which bounds its whole stop.
DRAIN_TIMEOUT = 4.0
SOCKET_MODE = 0o600
DIR_MODE = 0o700
CLONE_FS = 0x200
CLONE_NEWNS = 0x20000
# What a served call may import lazily (the plugin's error paths, rare numbers): loaded before a thread first
# enters a client's view, where an import would read the client's files.
PLUGIN_MODULES = ("pyflannel.cni.plugin", "pyflannel.cni.conf", "pyflannel.cni._goerr", "pyflannel.cni._fastjson",
                  "codecs", "decimal", "io", "json", "signal", "_socket")  # fmt: skip


class CniServerError(Exception):
    """The socket cannot be served (its path holds something else, or another agent serves it)."""


class RequestError(Exception):
    """A request the server cannot read: refused (kind 1) with this reason."""


class ClientGone(Exception):
    """The connection ended before a whole request."""


@dataclass(frozen=True)
class Request:
    env: dict[str, str]
    stdin: bytes
    stderr: int  # the client's stderr, received with the request; the server closes it after the call


def parse_env(block: bytes, count: int) -> dict[str, str]:
    """The environment block as Python's os.environ reads environ (see the module docstring)."""
    entries = block.split(b"\0")
    if entries[-1] != b"" or len(entries) - 1 != count:
        raise RequestError(f"the environment block holds {len(entries) - 1} entries, the header says {count}")
    env: dict[str, str] = {}
    for entry in entries[:-1]:
        key, eq, value = entry.partition(b"=")
        if eq:
            env.setdefault(key.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
    return env


def encode_reply(rc: int, out: bytes, err: bytes) -> bytes:
    if len(out) + len(err) > MAX_REPLY:
        from .cni.conf import CURRENT_VERSION, ERR_INTERNAL, CNIError

        msg = f"flannel: the plugin's answer of {len(out) + len(err)} bytes is over the CNI server's {MAX_REPLY}"
        out, err, rc = CNIError(ERR_INTERNAL, msg).to_json(CURRENT_VERSION), b"", 1
    return REPLY_HEAD.pack(REPLY_MAGIC, PROTOCOL, KIND_RAN, rc & 0xFF, len(out), len(err)) + out + err


def encode_refusal(reason: str) -> bytes:
    text = reason.encode("utf-8", "backslashreplace")
    return REPLY_HEAD.pack(REPLY_MAGIC, PROTOCOL, KIND_REFUSED, 0, len(text), 0) + text


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = conn.recv_into(view[got:])
        if k == 0:
            raise ClientGone(f"the connection ended after {got} of {n} bytes")
        got += k
    return bytes(buf)


def _recv_head(conn: socket.socket) -> tuple[bytes, list[int], int]:
    """The first bytes and the descriptors that came with them, close-on-exec at once (the delegates of calls
    running meanwhile must not inherit them; socket.recv_fds drops its flags). Room for two, so that a second
    one is seen and refused; more are closed by the kernel (MSG_CTRUNC)."""
    fds = array.array("i")
    data, ancdata, flags, _ = conn.recvmsg(
        REQUEST_HEAD.size, socket.CMSG_SPACE(2 * fds.itemsize), socket.MSG_CMSG_CLOEXEC
    )
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds), flags


def read_request(conn: socket.socket) -> Request:
    """One request from `conn` (in a worker thread, under the socket's timeout)."""
    from .cni import plugin

    data, fds, flags = _recv_head(conn)
    try:
        if not data:
            raise ClientGone("the connection ended before a request")
        if len(data) < REQUEST_HEAD.size:
            data += _recv_exact(conn, REQUEST_HEAD.size - len(data))
        magic, version, count, env_len, stdin_len = REQUEST_HEAD.unpack(data)
        if magic != REQUEST_MAGIC:
            raise RequestError(f"not a flannel CNI request (it starts with {magic!r})")
        if version != PROTOCOL:
            raise RequestError(f"protocol version {version}; this flanneld speaks {PROTOCOL}")
        if count > MAX_ENV_COUNT or env_len > MAX_ENV_BYTES:
            raise RequestError(f"an environment of {count} entries, {env_len} bytes (at most {MAX_ENV_COUNT}, "
                               f"{MAX_ENV_BYTES})")  # fmt: skip
        if stdin_len > plugin.MAX_STDIN:
            raise RequestError(f"stdin of {stdin_len} bytes (at most {plugin.MAX_STDIN})")
        if len(fds) != 1 or flags & socket.MSG_CTRUNC:
            raise RequestError("the request must carry exactly one file descriptor (the client's stderr)")
        env = parse_env(_recv_exact(conn, env_len), count)
        stdin = _recv_exact(conn, stdin_len)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return Request(env=env, stdin=stdin, stderr=fds[0])


def run_call(req: Request) -> tuple[int, bytes, bytes]:
    """The plugin for one request: (exit status, stdout, stderr), stderr encoded as Python's sys.stderr does."""
    from .cni import plugin

    out = io.BytesIO()
    err_bytes = io.BytesIO()
    err = io.TextIOWrapper(err_bytes, encoding="utf-8", errors="backslashreplace", write_through=True)
    rc = plugin.run(req.env, io.BytesIO(req.stdin), out, err, delegate_stderr=req.stderr)
    err.flush()
    err.detach()
    return rc, out.getvalue(), err_bytes.getvalue()


def _ns_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


class ViewError(Exception):
    """The thread cannot enter a client's view: (kind, reason) for the refusal."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


class _Libc:
    """setns and unshare through ctypes (Python 3.11 has neither), loaded with the first switch: an agent whose
    clients all share its view never imports ctypes."""

    def __init__(self) -> None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        self._get_errno = ctypes.get_errno
        self._setns = libc.setns
        self._setns.argtypes = (ctypes.c_int, ctypes.c_int)
        self._setns.restype = ctypes.c_int
        self._unshare = libc.unshare
        self._unshare.argtypes = (ctypes.c_int,)
        self._unshare.restype = ctypes.c_int

    def _check(self, rc: int) -> None:
        if rc != 0:
            e = self._get_errno()
            raise OSError(e, os.strerror(e))

    def setns(self, fd: int, nstype: int) -> None:
        self._check(self._setns(fd, nstype))

    def unshare(self, flags: int) -> None:
        self._check(self._unshare(flags))


_tls = threading.local()  # .switched: this thread is in a client's view


class _NoImportInAClientsView:
    """On sys.meta_path while switching is in use: an import in a switched thread would run the client's files
    as flanneld's code; it fails instead (PLUGIN_MODULES lists what must be loaded before)."""

    @staticmethod
    def find_spec(name: str, path: object = None, target: object = None) -> None:
        if getattr(_tls, "switched", False):
            raise ImportError(f"flannel: {name} is not imported in a client's view (the CNI server's preload)")


class Views:
    """Entering a client's filesystem view in the calling worker thread and leaving it (module docstring).
    Made at start() with descriptors of flanneld's own view; the ctypes part with the first switch."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._libc: _Libc | None = None
        self.own_error: str | None = None
        self._own: tuple[int, int, int] | None = None
        fds: list[int] = []
        try:
            fds.append(os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC))
            fds.append(os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
            fds.append(os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        except OSError as e:
            for fd in fds:
                os.close(fd)
            self.own_error = f"flanneld cannot open its own view (mount namespace, root, working directory): {e}"
        else:
            self._own = (fds[0], fds[1], fds[2])

    def close(self) -> None:
        if self._own is not None:
            for fd in self._own:
                os.close(fd)
            self._own = None

    def _ready(self) -> _Libc:
        with self._lock:
            if self._libc is None:
                import importlib

                for name in PLUGIN_MODULES:
                    importlib.import_module(name)
                self._libc = _Libc()
                sys.meta_path.insert(0, _NoImportInAClientsView)
            return self._libc

    def enter(self, pid: int) -> None:
        """This thread into pid's view, or ViewError with nothing changed. A thread whose way back fails is
        left switched: BrokenView (it must serve no more)."""
        if self._own is None:
            raise ViewError("switch", self.own_error or "no view of flanneld's own")
        libc = self._ready()
        if not getattr(_tls, "unshared", False):
            try:
                libc.unshare(CLONE_FS)
            except OSError as e:
                raise ViewError("switch", f"cannot give the worker thread its own root and cwd: {e.strerror}") from None
            _tls.unshared = True
        fds: list[int] = []
        try:
            try:
                fds.append(os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC))
                fds.append(os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
                fds.append(os.open(f"/proc/{pid}/cwd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
            except PermissionError as e:
                raise ViewError("ptrace", f"cannot open pid {pid}'s mount namespace, root or cwd: {e.strerror} "
                                "(flanneld needs CAP_SYS_PTRACE, and an LSM profile that lets it read its "
                                "clients' /proc files)") from None  # fmt: skip
            except OSError as e:
                raise ViewError("proc", f"cannot open pid {pid}'s mount namespace, root or cwd: {e.strerror}") from None
            try:
                libc.setns(fds[0], CLONE_NEWNS)
            except OSError as e:
                hint = " (flanneld needs CAP_SYS_ADMIN and CAP_SYS_CHROOT)" if e.errno == errno.EPERM else ""
                raise ViewError("setns", f"cannot enter pid {pid}'s mount namespace: {e.strerror}{hint}") from None
            _tls.switched = True
            try:
                os.fchdir(fds[1])
                os.chroot(".")
                os.fchdir(fds[2])
            except OSError as e:
                self.leave()
                hint = " (flanneld needs CAP_SYS_CHROOT)" if e.errno == errno.EPERM else ""
                raise ViewError("chroot", f"cannot take pid {pid}'s root and cwd: {e.strerror}{hint}") from None
        finally:
            for fd in fds:
                os.close(fd)

    def leave(self) -> None:
        """Back to flanneld's view; BrokenView when that fails (the thread then stays switched)."""
        assert self._own is not None and self._libc is not None
        mnt, root, cwd = self._own
        try:
            self._libc.setns(mnt, CLONE_NEWNS)
            os.fchdir(root)
            os.chroot(".")
            os.fchdir(cwd)
        except OSError as e:
            raise BrokenView(f"cannot return to flanneld's own view: {e.strerror}") from None
        _tls.switched = False


class BrokenView(Exception):
    """A worker thread that is not back in flanneld's view."""


class CniServer:
    """The server on `path`: start(), then serve_forever() until cancelled, then close().

    WORKERS threads each accept a connection and serve it whole: the kernel hands a connection straight to a
    waiting thread (a hop through the event loop cost ~0.25 ms a call), and the event loop only starts and
    stops them. Connections past the busy threads wait in the listen backlog; past that a client's connect()
    fails at once and it runs the standalone plugin."""

    def __init__(self, path: str, *, workers: int = WORKERS, backlog: int = BACKLOG) -> None:
        self.path = path
        self.workers = workers
        self.backlog = backlog
        self.served = 0  # calls answered (the plugin ran), for tests and logs
        self.refused = 0  # connections closed unserved or requests refused
        self._sock: socket.socket | None = None
        self._bound: tuple[int, int] | None = None
        self._uid = os.geteuid()
        self._net = (0, 0)
        self._root = (0, 0)
        self._cwd = (0, 0)
        self._mnt = (0, 0)
        self._views: Views | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = 0  # worker threads started, for their names
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # the counters and _warned, from the workers
        self._warned: set[str] = set()

    # ---- the socket --------------------------------------------------------------------------------

    def start(self) -> None:
        """Bind and listen; OSError or CniServerError when that cannot be done."""
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, mode=DIR_MODE, exist_ok=True)
        self._clear_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            st = os.stat(self.path)
            self._bound = (st.st_dev, st.st_ino)
            os.chmod(self.path, SOCKET_MODE)
            sock.listen(self.backlog)
            self._net = _ns_id("/proc/self/ns/net")
            self._root = _ns_id("/proc/self/root")
            self._cwd = _ns_id("/proc/self/cwd")
            self._mnt = _ns_id("/proc/self/ns/mnt")
            self._views = Views()
        except BaseException:
            sock.close()
            self._unlink()
            raise
        self._sock = sock

    def _clear_stale(self) -> None:
        """Remove a dead agent's socket file; refuse to touch a live one's, or a file that is not a socket."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise CniServerError(f"{self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.setblocking(False)  # a live agent with a full backlog answers EAGAIN at once
        try:
            probe.connect(self.path)
        except ConnectionRefusedError:
            os.unlink(self.path)
            log.info("removed the stale CNI socket %s", self.path)
            return
        except FileNotFoundError:
            return
        except BlockingIOError:
            pass
        except OSError as e:
            raise CniServerError(f"cannot check whether {self.path} is served: {e}") from None
        finally:
            probe.close()
        raise CniServerError(f"another process serves {self.path}")

    def _unlink(self) -> None:
        """Remove the socket file if it is still ours (a new agent may have replaced it already)."""
        if self._bound is None:
            return
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._bound:
                os.unlink(self.path)
        self._bound = None

    # ---- connections -------------------------------------------------------------------------------

    async def serve_forever(self) -> None:
        """Run the workers until cancelled (close() stops them)."""
        assert self._sock is not None, "start() first"
        self._loop = asyncio.get_running_loop()
        for _ in range(self.workers):
            self._start_worker()
        await asyncio.Event().wait()

    def _start_worker(self) -> None:
        """In the event loop's thread, never a worker's: a new thread starts with its creator's fs_struct and
        namespaces, and a replacement must not inherit a stuck worker's view."""
        if self._stopping.is_set() or self._sock is None:
            return
        t = threading.Thread(target=self._worker, args=(self._sock,), name=f"cni-{self._started}", daemon=True)
        self._started += 1
        t.start()
        self._threads = [x for x in self._threads if x.is_alive()] + [t]

    def _worker(self, listener: socket.socket) -> None:
        backoff = Backoff(0.1, 5.0)
        while not self._stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError as e:
                if self._stopping.is_set():
                    return  # close() shut the listener down
                # Out of descriptors, ...: the connection waits in the backlog.
                delay = backoff.next()
                log.warning("CNI server: accept failed, retrying in %.1fs: %s", delay, e)
                time.sleep(delay)
                continue
            backoff.reset()
            try:
                served = self._serve_one(conn)
            except Exception as e:  # never the agent's end, nor this worker's: this one client falls back
                log.error("CNI server: internal error: %s", e, exc_info=e)
                served = False
            finally:
                conn.close()
            with self._lock:
                if served:
                    self.served += 1
                else:
                    self.refused += 1
            if getattr(_tls, "broken", False):
                # Every later call on this thread would run in a stranger's view: it ends, another starts.
                log.error("CNI server: worker %s stops, stuck in a client's view; starting another",
                          threading.current_thread().name)  # fmt: skip
                if self._loop is not None:
                    with contextlib.suppress(RuntimeError):  # the loop closed: the server is stopping
                        self._loop.call_soon_threadsafe(self._start_worker)
                return

    def _peer(self, conn: socket.socket) -> tuple[int, tuple[str, str] | None, bool]:
        """The client's pid, (kind, reason) when it is not to be served, and whether its call must run in its
        view (another mount namespace, root or cwd). The pid stays the client's: it waits for the answer."""
        pid, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid not in (0, self._uid):
            return pid, ("uid", f"uid {uid} is neither root nor flanneld's ({self._uid})"), False
        if pid <= 0:
            return pid, ("pid", "the client's process is not visible in flanneld's PID namespace"), False
        try:
            net = _ns_id(f"/proc/{pid}/ns/net")
            if net != self._net:
                return pid, ("net", f"pid {pid} is in another network namespace"), False
            mnt, root = _ns_id(f"/proc/{pid}/ns/mnt"), _ns_id(f"/proc/{pid}/root")
            cwd = _ns_id(f"/proc/{pid}/cwd")
        except PermissionError as e:
            why = (f"cannot read pid {pid}'s namespaces: {e.strerror} (flanneld needs CAP_SYS_PTRACE, and an LSM "
                   "profile that lets it read its clients' /proc files)")  # fmt: skip
            return pid, ("ptrace", why), False
        except OSError as e:
            return pid, ("proc", f"cannot read pid {pid}'s namespaces: {e.strerror}"), False
        return pid, None, (mnt, root, cwd) != (self._mnt, self._root, self._cwd)

    def _not_serving(self, kind: str, why: str) -> None:
        """Logged at warning the first time for each kind of reason, then at debug: a client set up so is
        refused on every call."""
        with self._lock:
            first = kind not in self._warned
            self._warned.add(kind)
        log.log(logging.WARNING if first else logging.DEBUG, "CNI server: not serving a client (it runs the "
                "standalone plugin): %s", why)  # fmt: skip

    def _broken(self, e: BrokenView) -> None:
        _tls.broken = True
        log.error("CNI server: %s", e)

    def _serve_one(self, conn: socket.socket) -> bool:
        """One connection, in a worker thread: True when the plugin ran and its answer was sent."""
        pid, refusal, switch = self._peer(conn)
        if refusal is not None:
            self._not_serving(*refusal)
            return False  # closed unread
        conn.settimeout(REQUEST_TIMEOUT)
        try:
            req = read_request(conn)
        except RequestError as e:
            log.warning("CNI server: refused a request: %s", e)
            with contextlib.suppress(OSError):
                conn.sendall(encode_refusal(str(e)))
            return False
        except (ClientGone, OSError) as e:
            log.debug("CNI server: no whole request: %s", e)
            return False
        what = f"{req.env.get('CNI_COMMAND', '-')} {req.env.get('CNI_CONTAINERID', '-')}"
        t = time.monotonic()
        try:
            if switch:
                assert self._views is not None
                try:
                    self._views.enter(pid)
                except (ViewError, BrokenView) as e:
                    if isinstance(e, ViewError):
                        self._not_serving(e.kind, str(e))
                    else:
                        self._broken(e)
                    with contextlib.suppress(OSError):
                        conn.sendall(encode_refusal(str(e)))
                    return False
            try:
                rc, out, err = run_call(req)
            finally:
                if switch:
                    try:
                        self._views.leave()  # type: ignore[union-attr]
                    except BrokenView as e:
                        self._broken(e)  # the answer is still good: it goes out, then the thread ends
        finally:
            os.close(req.stderr)
        log.debug("CNI server: %s: exit %d in %.1f ms", what, rc, (time.monotonic() - t) * 1000)
        conn.settimeout(REPLY_TIMEOUT)
        try:
            conn.sendall(encode_reply(rc, out, err))
        except OSError as e:
            log.info("CNI server: the client of %s left before its answer: %s", what, e)
            return False
        return True

    async def close(self) -> None:
        """Stop accepting and remove the socket file at once, then let running calls finish (bounded)."""
        self._stopping.set()
        self._unlink()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes the workers' accept(); waiting connections end
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while any(t.is_alive() for t in self._threads) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        late = sum(t.is_alive() for t in self._threads)
        if late:
            log.warning("CNI server: %d calls still running after %.0fs; leaving them", late, DRAIN_TIMEOUT)
        self._threads = [t for t in self._threads if t.is_alive()]
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._views is not None and not late:  # a late call may still need the way back
            self._views.close()
            self._views = None
        with self._lock:
            served, refused = self.served, self.refused
        log.info("CNI server: stopped; served %d calls, refused %d", served, refused)


async def serve_cni(path: str) -> None:
    """The agent's task: serve `path` until cancelled. A socket that cannot be served is logged and the agent
    runs on (the client runs the standalone plugin)."""
    server = CniServer(path)
    try:
        server.start()
    except (OSError, CniServerError) as e:
        log.error("not serving the CNI plugin on %s (pods get the standalone plugin): %s", path, e)
        return
    log.info("serving the CNI plugin on %s", path)
    try:
        await server.serve_forever()
    finally:
        await server.close()


def main(argv: list[str] | None = None) -> int:
    import argparse  # only for this entry point: the agent imports this module too

    ap = argparse.ArgumentParser(
        prog="python -m pyflannel.cniserver", description="Serve the flannel CNI plugin without an agent."
    )
    ap.add_argument("--socket", required=True, help="the unix socket to serve")
    ap.add_argument("-v", type=int, default=0, help="log verbosity (1: every call)")
    args = ap.parse_args(argv)
    setup_logging(args.v)

    async def run() -> int:
        server = CniServer(args.socket)
        try:
            server.start()
        except (OSError, CniServerError) as e:
            log.error("cannot serve %s: %s", args.socket, e)
            return 1
        log.info("serving the CNI plugin on %s", args.socket)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        task = asyncio.create_task(server.serve_forever())
        await stop.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await server.close()
        return 0

    code = asyncio.run(run())
    logging.shutdown()
    sys.stdout.flush()
    os._exit(code)  # as flanneld: calls still running past the drain are not waited for


if __name__ == "__main__":
    sys.exit(main())
