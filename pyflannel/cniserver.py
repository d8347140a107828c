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

Who is served: a client whose SO_PEERCRED uid is 0 or the agent's own, in the agent's network namespace,
under its root directory and in its working directory: the delegates make their links where the agent runs,
and the paths a call names (CNI_PATH, dataDir, subnetFile, the delegates' own, relative ones too) must lead
where they lead for the client. Any other connection is closed unread; its client then runs the standalone
plugin, as it does when nothing listens (and as a client that is not root does when the 0600 mode stops its
connect()). Runtimes and agents run as system services from /, so the working directories agree. Mount
namespaces as such are not compared (`ip netns exec` makes one per command); instead the directories CNI keeps
its files in by convention (CNI_DIRS) and the call's CNI_PATH and netns directories must be the same files for
the client as for flanneld (a request where they are not is refused), which catches a client whose own mounts
cover them, such as the lab's per-node /var/lib/cni. Paths only the network config names (a dataDir elsewhere)
are not checked.

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

What a served call's delegates get from flanneld rather than from the runtime: the working directory, the
resource limits, the cgroup and the capabilities. The environment is the one the standalone plugin would hand
them: the client sends it as Python would have it (its C-locale coercion included) and falls back where
Python would decode it otherwise (a locale whose encoding is not UTF-8).

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
from collections.abc import Mapping
from dataclasses import dataclass

from .log import setup_logging

# The plugin's modules (~0.7 MB) are imported by the first request read, not with the agent: an agent that never
# serves (in kube-flannel's DaemonSet its own PID namespace hides every client) never loads them.

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
# Where CNI keeps its files by convention: flannel's and host-local's state, the plugins, pod netns files,
# subnet.env. (/opt/cni/bin is in CNI_PATH as a rule.)
CNI_DIRS = ("/var/lib/cni", "/opt/cni/bin", "/run/netns", "/run/flannel")
MAX_VIEW_PATHS = 32
MAX_REALPATHS = 256


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


def _file_id(path: str) -> tuple[int, int] | str:
    try:
        return _ns_id(path)
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, "error")


def view_difference(pid: int, env: Mapping[str, str], realpaths: dict[str, str]) -> str | None:
    """The first of the call's directories (CNI_DIRS, CNI_PATH's, the netns file's) that is another file, or
    none, for process `pid` than for flanneld; None when they all agree. `realpaths` caches our own view of
    their symlinks (os.path.realpath is most of the check's time; symlinks there do not move)."""
    paths = dict.fromkeys([*CNI_DIRS, *(d for d in env.get("CNI_PATH", "").split(":") if d.startswith("/"))])
    netns = env.get("CNI_NETNS", "")
    if netns.startswith("/"):
        paths[os.path.dirname(netns)] = None
    root = f"/proc/{pid}/root"
    for path in list(paths)[:MAX_VIEW_PATHS]:
        # /proc/<pid>/root resolves the path in pid's mounts, but an absolute symlink on the way from ours.
        real = realpaths.get(path)
        if real is None:
            if len(realpaths) >= MAX_REALPATHS:
                realpaths.clear()
            real = realpaths[path] = os.path.realpath(path)
        if _file_id(real) != _file_id(root + real):
            return path
    return None


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
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # the counters and _warned, from the workers
        self._warned: set[str] = set()
        self._realpaths: dict[str, str] = {}  # for view_difference

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
        for i in range(self.workers):
            t = threading.Thread(target=self._worker, args=(self._sock,), name=f"cni-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        await asyncio.Event().wait()

    def _worker(self, listener: socket.socket) -> None:
        delay = 0.1
        while not self._stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError as e:
                if self._stopping.is_set():
                    return  # close() shut the listener down
                # Out of descriptors, ...: the connection waits in the backlog.
                log.warning("CNI server: accept failed, retrying in %.1fs: %s", delay, e)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.1
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

    def _peer(self, conn: socket.socket) -> tuple[int, tuple[str, str] | None]:
        """The client's pid, and (kind, reason) when it is not to be served. The pid stays the client's: it
        waits for the answer."""
        pid, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid not in (0, self._uid):
            return pid, ("uid", f"uid {uid} is neither root nor flanneld's ({self._uid})")
        if pid <= 0:
            return pid, ("pid", "the client's process is not visible in flanneld's PID namespace")
        try:
            net, root = _ns_id(f"/proc/{pid}/ns/net"), _ns_id(f"/proc/{pid}/root")
            cwd = _ns_id(f"/proc/{pid}/cwd")
        except OSError as e:
            return pid, ("proc", f"cannot read pid {pid}'s namespaces: {e.strerror}")
        if net != self._net:
            return pid, ("net", f"pid {pid} is in another network namespace")
        if root != self._root:
            return pid, ("root", f"pid {pid} has another root directory")
        if cwd != self._cwd:
            return pid, ("cwd", f"pid {pid} runs in another working directory")
        return pid, None

    def _not_serving(self, kind: str, why: str) -> None:
        """Logged at warning the first time for each kind of reason, then at debug: a client set up so is
        refused on every call."""
        with self._lock:
            first = kind not in self._warned
            self._warned.add(kind)
        log.log(logging.WARNING if first else logging.DEBUG, "CNI server: not serving a client (it runs the "
                "standalone plugin): %s", why)  # fmt: skip

    def _serve_one(self, conn: socket.socket) -> bool:
        """One connection, in a worker thread: True when the plugin ran and its answer was sent."""
        pid, refusal = self._peer(conn)
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
        try:
            seen = view_difference(pid, req.env, self._realpaths)
            if seen is not None:
                why = f"pid {pid} sees another {seen} than flanneld"
                self._not_serving("view", why)
                with contextlib.suppress(OSError):
                    conn.sendall(encode_refusal(why))
                return False
            what = f"{req.env.get('CNI_COMMAND', '-')} {req.env.get('CNI_CONTAINERID', '-')}"
            t = time.monotonic()
            rc, out, err = run_call(req)
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
