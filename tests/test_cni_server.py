"""flanneld's CNI server (pyflannel/cniserver.py) and the `flannel` client (pyflannel/cni/launcher.c).

Without root: the protocol against a server in this process (refusals with a reason, caps, clients that go
away, no descriptor left behind), the socket's life (modes, a dead agent's file, a live agent's, removal), the
plugin's state per thread, 50 calls at once, and the served and standalone answers compared byte for byte
(exit status, stdout, stderr, every file written, the delegates' environment and descriptors) on vectors and on
fuzzed input. With root, a real flanneld in a namespace testbed: 50 ADDs at once through it, a client killed
mid-call, the agent killed or stopped mid-call, the standalone plugin while the agent is down, clients it must
not serve (not root; another network namespace; another working directory) and garbage requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fuzzing import fuzz_settings
from hypothesis import given
from hypothesis import strategies as st
from needs import need
from test_cni_netns import flannel_bin_dir
from test_cni_plugin import GOOD, IPV4_ENV, TRIPWIRE, Bed, CniPaths
from test_cni_plugin import cni_paths as cni_paths  # the session's fixture

from pyflannel import cniserver
from pyflannel.cni import _fastjson, plugin
from pyflannel.cni.driver import Driver, RuntimeConf, kube_flannel_conflist
from pyflannel.cni.launcher import install_script
from pyflannel.cniserver import CniServer, CniServerError, serve_cni
from pyflannel.daemon import agent_config_from_options
from pyflannel.flags import parse_args
from pyflannel.lab.netns import RunScope, ns_exec, run, wait_for
from pyflannel.lab.testbed import Testbed

REF_PLUGINS = Path("/usr/lib/cni")
NETWORK = "10.244.0.0/16"


# ---- a server in this process, and a raw client -------------------------------------------------------------


class ServerThread:
    """A CniServer in this process, on an event loop of its own in a thread; stop() cancels and closes it."""

    def __init__(self, path: Path, **kw: int) -> None:
        self.server = CniServer(str(path), **kw)
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._task: asyncio.Task[None] | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self._ready.wait(10), "server did not start"
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.server.start()
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._task = self.loop.create_task(self.server.serve_forever())
        self._ready.set()
        with contextlib.suppress(asyncio.CancelledError):
            self.loop.run_until_complete(self._task)
        self.loop.run_until_complete(self.server.close())
        self.loop.close()

    def stop(self) -> None:
        task = self._task
        if task is not None:
            self.loop.call_soon_threadsafe(task.cancel)
        self.thread.join(15)
        assert not self.thread.is_alive()


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[ServerThread]:
    s = ServerThread(tmp_path / "run" / "cni.sock")
    try:
        yield s
    finally:
        s.stop()


def request_bytes(env: dict[bytes, bytes], stdin: bytes, **head: Any) -> bytes:
    block = b"".join(f"{k.decode()}={v.decode()}".encode() + b"\0" for k, v in env.items())
    fields = {"magic": b"FCNI", "version": 1, "count": len(env), "env_len": len(block), "stdin_len": len(stdin)}
    fields.update(head)
    return cniserver.REQUEST_HEAD.pack(*fields.values()) + block + stdin


def exchange(path: Path, data: bytes, fds: tuple[int, ...] = (2,)) -> bytes:
    """Send `data` (with `fds`), then read one reply as the client does: the head, then the lengths it names
    (past a refusal the server closes with the request unread, so what follows is a reset, not an end)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(20)
        s.connect(str(path))
        sent = socket.send_fds(s, [data], list(fds)) if fds else 0
        if data[sent:]:  # (an empty send after the server's answer and close would be EPIPE)
            s.sendall(data[sent:])
        reply = b""
        need = cniserver.REPLY_HEAD.size
        while len(reply) < need:
            chunk = s.recv(need - len(reply))
            if not chunk:
                break
            reply += chunk
            if len(reply) == cniserver.REPLY_HEAD.size:
                *_, out_len, err_len = cniserver.REPLY_HEAD.unpack(reply)
                need += out_len + err_len
    return reply


def parse_reply(reply: bytes) -> tuple[int, int, bytes, bytes]:
    magic, version, kind, rc, out_len, err_len = cniserver.REPLY_HEAD.unpack(reply[: cniserver.REPLY_HEAD.size])
    assert (magic, version) == (b"FCNR", 1)
    body = reply[cniserver.REPLY_HEAD.size :]
    assert len(body) == out_len + err_len
    return kind, rc, body[:out_len], body[out_len:]


def own_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def plugin_answer(env: dict[str, str], stdin: bytes) -> tuple[int, bytes]:
    import io

    out = io.BytesIO()
    rc = plugin.run(env, io.BytesIO(stdin), out, io.StringIO())
    return rc, out.getvalue()


# ---- the protocol --------------------------------------------------------------------------------------------


def test_a_request_is_answered_as_the_plugin_answers(srv: ServerThread) -> None:
    path = Path(srv.server.path)
    assert (path.stat().st_mode & 0o777, path.parent.stat().st_mode & 0o777) == (0o600, 0o700)
    kind, rc, out, err = parse_reply(exchange(path, request_bytes({b"CNI_COMMAND": b"VERSION"}, b"")))
    assert (kind, rc, out, err) == (0, *plugin_answer({"CNI_COMMAND": "VERSION"}, b""), b"")
    # No command: the plugin's about text goes to stderr.
    kind, rc, out, err = parse_reply(exchange(path, request_bytes({b"A": b"1"}, b"")))
    assert (kind, rc, out) == (0, 0, b"") and err.startswith(b"CNI Plugin flannel version")
    # An error answer, and the environment read as Python reads environ (first of equal keys, no "=": skipped).
    env = {b"CNI_COMMAND": b"ADD", b"CNI_CONTAINERID": b"x", b"CNI_NETNS": b"/x", b"CNI_IFNAME": b"eth0",
           b"CNI_PATH": b"/nonexistent"}  # fmt: skip
    data = request_bytes(env, b"{")
    kind, rc, out, _ = parse_reply(exchange(path, data))
    assert (kind, rc, out) == (0, 1, plugin_answer({k.decode(): v.decode() for k, v in env.items()}, b"{")[1])
    odd = b"CNI_COMMAND=VERSION\0CNI_COMMAND=ADD\0NOEQUALS\0"
    head = cniserver.REQUEST_HEAD.pack(b"FCNI", 1, 3, len(odd), 0)
    assert parse_reply(exchange(path, head + odd))[:3] == (0, 0, plugin_answer({"CNI_COMMAND": "VERSION"}, b"")[1])
    assert wait_for(lambda: srv.server.served == 4, 5)


def test_requests_it_cannot_read_are_refused_with_a_reason(srv: ServerThread) -> None:
    path = Path(srv.server.path)
    version = request_bytes({b"CNI_COMMAND": b"VERSION"}, b"")
    fds_before = own_fds()
    cases: list[tuple[bytes, tuple[int, ...], str]] = [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", (2,), "not a flannel CNI request (it starts with b'GET '"),
        (request_bytes({}, b"", version=2), (2,), "protocol version 2; this flanneld speaks 1"),
        (request_bytes({}, b"", count=5000), (2,), "an environment of 5000 entries, 0 bytes (at most 4096, 1048576)"),
        (request_bytes({}, b"", env_len=2 << 20), (2,), "an environment of 0 entries, 2097152 bytes"),
        (request_bytes({}, b"", stdin_len=(16 << 20) + 1), (2,), "stdin of 16777217 bytes (at most 16777216)"),
        (version, (), "the request must carry exactly one file descriptor (the client's stderr)"),
        (version, (2, 1), "the request must carry exactly one file descriptor (the client's stderr)"),
        (request_bytes({b"A": b"1"}, b"", count=2), (2,), "the environment block holds 1 entries, the header says 2"),
    ]
    for data, fds, reason in cases:
        kind, rc, text, err = parse_reply(exchange(path, data, fds))
        assert (kind, rc, err) == (1, 0, b""), reason
        assert text.decode().startswith(reason), (text, reason)
    # Still serving, with no descriptor received along the way left open.
    assert parse_reply(exchange(path, version))[:2] == (0, 0)
    assert wait_for(lambda: own_fds() == fds_before, 5), (own_fds(), fds_before)
    assert wait_for(lambda: (srv.server.served, srv.server.refused) == (1, len(cases)), 5)


def test_the_server_logs_its_counts_as_it_stops(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """bench/bench_cni.py counts the calls served (not fallen back) from this line."""
    s = ServerThread(tmp_path / "run" / "cni.sock")
    try:
        path = Path(s.server.path)
        for _ in range(3):
            assert parse_reply(exchange(path, request_bytes({b"CNI_COMMAND": b"VERSION"}, b"")))[:2] == (0, 0)
        assert parse_reply(exchange(path, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", (2,)))[0] == 1
        assert wait_for(lambda: (s.server.served, s.server.refused) == (3, 1), 5)
    finally:
        with caplog.at_level(logging.INFO, logger="pyflannel.cniserver"):
            s.stop()
    assert "CNI server: stopped; served 3 calls, refused 1" in caplog.messages


def test_a_client_that_goes_away_is_no_concern(srv: ServerThread) -> None:
    path = Path(srv.server.path)
    full = request_bytes({b"CNI_COMMAND": b"VERSION", b"PAD": b"x" * 100}, b"")
    fds_before = own_fds()
    for cut in (0, 7, cniserver.REQUEST_HEAD.size, len(full) - 3):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(srv.server.path)
            if cut:
                socket.send_fds(s, [full[:cut]], [2])
    assert wait_for(lambda: srv.server.refused == 4, 5)
    assert parse_reply(exchange(path, full))[:2] == (0, 0)
    assert wait_for(lambda: own_fds() == fds_before, 5), (own_fds(), fds_before)


def test_socket_life(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "a" / "b" / "cni.sock"
    # A dead agent's socket file is replaced.
    path.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))
    first = ServerThread(path)
    try:
        assert exchange(path, request_bytes({b"CNI_COMMAND": b"VERSION"}, b""))[:6] == b"FCNR\x01\x00"
        # A live agent's is left alone.
        with pytest.raises(CniServerError, match="another process serves"):
            CniServer(str(path)).start()
        assert path.exists()
    finally:
        first.stop()
    assert not path.exists()  # removed on stop
    # Something else at the path is not touched; a socket replaced by a newer agent is not removed.
    path.write_text("mine")
    with pytest.raises(CniServerError, match="exists and is not a socket"):
        CniServer(str(path)).start()
    assert path.read_text() == "mine"
    path.unlink()
    second = ServerThread(path)
    path.unlink()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as newer:
        newer.bind(str(path))
        second.stop()
        assert path.exists()
    # The agent's task: a socket it cannot make is one error line, and the task ends (the agent runs on).
    (tmp_path / "file").write_text("")
    with caplog.at_level("ERROR", logger="pyflannel.cniserver"):
        asyncio.run(asyncio.wait_for(serve_cni(str(tmp_path / "file" / "cni.sock")), 5))
    assert "not serving the CNI plugin on" in caplog.text


def test_a_client_with_other_files_at_the_cni_paths_is_served_in_its_view(
    srv: ServerThread, cni_paths: CniPaths, tmp_path: Path
) -> None:
    """A client in a mount namespace of its own that mounts another directory over one of its CNI_PATH entries
    (as the lab's nodes do over /var/lib/cni): its call runs in its view, so the delegate is the one it sees
    there; and the worker is back in flanneld's view for the next client."""
    need(tools=("unshare", "mount"))
    bed = Bed(tmp_path, "served", cni_paths)
    bed.write_env(IPV4_ENV)
    theirs = tmp_path / "their-bin"
    theirs.mkdir()
    for d, who in ((bed.bin, "flanneld-view"), (theirs, "client-view")):
        (d / "bridge").write_text(f"#!/bin/sh\ncat >/dev/null\necho '{who}' > \"$FAKE_DIR/who\"\nprintf '{{}}'\n")
        (d / "bridge").chmod(0o755)
    env = bed.env("ADD", FLANNEL_CNI_SOCKET=srv.server.path)
    script = 'mount --bind "$1" "$2" && exec "$3"'
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "-", str(theirs), str(bed.bin),
           str(cni_paths.served)]  # fmt: skip
    p = subprocess.run(cmd, input=json.dumps(bed.conf()).encode(), env=env, capture_output=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert (bed.fake / "who").read_text() == "client-view\n"
    assert wait_for(lambda: (srv.server.served, srv.server.refused) == (1, 0), 5)
    # The same client without the mount sees flanneld's files again.
    p = subprocess.run([str(cni_paths.served)], input=json.dumps(bed.conf()).encode(), env=env, capture_output=True,
                       timeout=60, cwd=os.getcwd())  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    assert (bed.fake / "who").read_text() == "flanneld-view\n"
    assert wait_for(lambda: srv.server.served == 2, 5)


def test_version_reads_no_stdin(srv: ServerThread, cni_paths: CniPaths) -> None:
    """As the plugin, which answers VERSION (or no command) before it reads stdin: a stdin left open is no hang."""
    for env in ({"CNI_COMMAND": "VERSION"}, {}):
        p = subprocess.Popen([str(cni_paths.served)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env={**env, "FLANNEL_CNI_SOCKET": srv.server.path})  # fmt: skip
        try:
            assert p.wait(timeout=20) == 0
            assert p.stdout is not None and p.stderr is not None
            out, err = p.stdout.read(), p.stderr.read()
            assert (b"supportedVersions" in out) if env else err.startswith(b"CNI Plugin flannel version")
        finally:
            p.kill()
            p.communicate()
    assert wait_for(lambda: srv.server.served == 2, 5)


def test_the_flag(tmp_path: Path) -> None:
    def sock(*argv: str, **env: str) -> str:
        return agent_config_from_options(parse_args(list(argv), env)).cni_socket

    assert sock() == "/run/flannel/cni.sock"
    assert sock("--subnet-file=/x/y/subnet.env") == "/x/y/cni.sock"
    assert sock("--cni-socket=/s") == "/s"
    assert sock("--cni-socket=") == ""
    assert sock(FLANNELD_CNI_SOCKET="") == ""


# ---- the plugin's state is per call --------------------------------------------------------------------------


def test_big_number_flag_is_per_thread() -> None:
    """Thread A's big number must not be forgotten because thread B parsed something else meanwhile."""
    seen: list[bool] = []
    a_parsed, b_parsed = threading.Event(), threading.Event()

    def a() -> None:
        _fastjson.loads(b'{"x": 1e400}')
        a_parsed.set()
        b_parsed.wait(5)
        seen.append(_fastjson.overflowed())

    def b() -> None:
        a_parsed.wait(5)
        _fastjson.loads(b'{"x": 1}')
        b_parsed.set()

    threads = [threading.Thread(target=f) for f in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == [True]


def test_stored_configs_written_at_once_from_two_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Thread A is held between writing its temporary file and renaming it while thread B writes and syncs
    another container's config in the same dataDir: with one temporary name per process, B would truncate A's
    file and A would rename B's. Both replace an earlier ADD's file (a new container's is written in place)."""
    data_dir = str(tmp_path / "data")
    (tmp_path / "data").mkdir(mode=0o700)
    for name in ("a", "b"):
        (tmp_path / "data" / name).write_bytes(b"earlier")
    holder = threading.get_ident()
    b_done = threading.Event()
    real_rename = plugin.posix.rename

    def b() -> None:
        plugin.save_scratch(data_dir, "b", b"B" * 10)()
        b_done.set()

    def rename(src: str, dst: str) -> None:
        if threading.get_ident() == holder and not b_done.is_set():
            t = threading.Thread(target=b)
            t.start()
            t.join(10)
        real_rename(src, dst)

    monkeypatch.setattr(plugin.posix, "rename", rename)
    plugin.save_scratch(data_dir, "a", b"A" * 10)()
    assert b_done.is_set()
    assert {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()} == {"a": b"A" * 10, "b": b"B" * 10}


def test_fifty_calls_at_once(srv: ServerThread, cni_paths: CniPaths, tmp_path: Path) -> None:
    """50 ADDs through the client at once, every other with a number beyond float64 in its config (an error):
    every call gets its own answer, every good one its stored config, and no temporary file is left."""
    bed = Bed(tmp_path, "served", cni_paths)
    bed.write_env(IPV4_ENV)
    client = cni_paths.served  # its standalone plugin is a tripwire: every call must be served

    def add(i: int) -> tuple[int, int, bytes]:
        env = bed.env("ADD", CNI_CONTAINERID=f"c{i}", FLANNEL_CNI_SOCKET=srv.server.path)
        conf = json.dumps(bed.conf(delegate={"x": "BIG" if i % 2 else 1})).replace('"BIG"', "1e400").encode()
        p = subprocess.run([str(client)], input=conf, env=env, capture_output=True, timeout=120)
        return i, p.returncode, p.stdout

    with ThreadPoolExecutor(max_workers=50) as ex:
        results = list(ex.map(add, range(50)))
    for i, rc, out in results:
        assert rc != TRIPWIRE
        if i % 2:
            assert rc == 1 and b"cannot unmarshal number 1e400" in out, out
        else:
            assert rc == 0 and json.loads(out)["ips"][0]["address"] == "10.1.17.2/24", out
    assert sorted(os.listdir(bed.data_dir)) == sorted(f"c{i}" for i in range(0, 50, 2))
    assert wait_for(lambda: srv.server.served == 50, 5)


GATE_DELEGATE = r"""#!/bin/sh
cat > /dev/null
if mkdir "$FAKE_DIR/held" 2>/dev/null; then  # the first call waits for the test (20 s at most)
  : > "$FAKE_DIR/entered"
  i=0
  while [ ! -e "$FAKE_DIR/open" ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
fi
echo "$PPID" >> "$FAKE_DIR/ppids"
printf '{"cniVersion":"1.0.0","ips":[{"address":"10.1.17.3/24"}]}'
"""


def test_a_full_backlog_gets_the_standalone_plugin_at_once(cni_paths: CniPaths, tmp_path: Path) -> None:
    """One worker, busy, and a listen backlog of one: the calls past what the backlog holds do not wait for
    the worker, they run the standalone plugin."""
    srv = ServerThread(tmp_path / "run" / "cni.sock", workers=1, backlog=1)
    try:
        bed = Bed(tmp_path, "fallback", cni_paths)
        bed.write_env(IPV4_ENV)
        (bed.bin / "gate").write_text(GATE_DELEGATE)
        (bed.bin / "gate").chmod(0o755)
        conf = json.dumps(bed.conf(delegate={"type": "gate"})).encode()

        def call(i: int) -> subprocess.Popen[bytes]:
            env = bed.env("ADD", CNI_CONTAINERID=f"c{i}", FLANNEL_CNI_SOCKET=srv.server.path)
            p = subprocess.Popen([str(cni_paths.fallback)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, env=env)  # fmt: skip
            assert p.stdin is not None
            p.stdin.write(conf)
            p.stdin.close()
            p.stdin = None
            return p

        first = call(0)
        assert wait_for(lambda: (bed.fake / "entered").exists(), 20)
        rest = [call(i) for i in range(1, 6)]
        # The backlog holds two (Linux queues backlog + 1): the other three run standalone, gate closed.
        assert wait_for(lambda: sum(p.poll() is not None for p in rest) >= 3, 20)
        assert not (bed.fake / "open").exists()
        (bed.fake / "open").touch()
        for p in [first, *rest]:
            out, err = p.communicate(timeout=30)
            assert p.returncode == 0, out + err
        ppids = [int(x) for x in (bed.fake / "ppids").read_text().split()]
        assert ppids.count(os.getpid()) == 3  # served: the delegate's parent is this process (the server's)
        assert len(ppids) == 6 and sorted(os.listdir(bed.data_dir)) == [f"c{i}" for i in range(6)]
        assert wait_for(lambda: (srv.server.served, srv.server.refused) == (3, 0), 5)
    finally:
        srv.stop()


# ---- served and standalone answer alike, byte for byte -------------------------------------------------------

ENV_DELEGATE = r"""#!/bin/sh
cat > /dev/null
# Exactly what it was started with: the environment block and the open descriptors.
cat /proc/$$/environ > "$FAKE_DIR/environ.$CNI_COMMAND"
ls /proc/$$/fd > "$FAKE_DIR/fds.$CNI_COMMAND"
echo "envdump: a word on stderr" >&2
printf '{"cniVersion":"1.0.0","ips":[{"address":"10.1.17.9/24","gateway":"10.1.17.1"}]}'
"""


def outcomes(root: Path, mode: str, paths: CniPaths, steps: list[tuple[str, dict[str, str], bytes]],
             setup: Callable[[Bed], None],
             make_bed: Callable[[Path, str, CniPaths], Bed] = Bed) -> list[Any]:  # fmt: skip
    """Run `steps` in a fresh bed (`make_bed`) at `root` (the same paths for every mode): each step's exit
    status, stdout and stderr, and then every file under the bed but the fake delegates."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    bed = make_bed(root, mode, paths)
    (bed.bin / "envdump").write_text(ENV_DELEGATE)
    (bed.bin / "envdump").chmod(0o755)
    bed.write_env(IPV4_ENV)
    setup(bed)
    got: list[Any] = []
    for command, over, stdin in steps:
        env = {k: v for k, v in {**bed.env(command), **over}.items() if v != "<unset>"}
        got.append(bed.exec(env, stdin))
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_relative_to(bed.bin):
            files[str(p.relative_to(root))] = p.read_bytes()
    got.append(files)
    return got


def _conf(**extra: Any) -> bytes:
    return json.dumps({"cniVersion": "1.0.0", "name": "cbr0", "type": "flannel", "subnetFile": "@/subnet.env",
                       "dataDir": "@/data", **extra}).encode()  # fmt: skip


def _noop(bed: Bed) -> None:
    pass


def _corrupt(bed: Bed) -> None:
    bed.data_dir.mkdir(mode=0o700)
    bed.stored().write_bytes(b"{not json")


ENV_DUMP = _conf(delegate={"type": "envdump"})
VECTORS: dict[str, tuple[list[tuple[str, dict[str, str], bytes]], Callable[[Bed], None]]] = {
    "lifecycle": ([("ADD", {}, _conf()), ("CHECK", {}, _conf(prevResult={"cniVersion": "1.0.0"})),
                   ("DEL", {}, _conf()), ("DEL", {}, _conf())], _noop),
    "v110-status-gc": ([("ADD", {}, _conf(cniVersion="1.1.0")), ("STATUS", {}, _conf(cniVersion="1.1.0")),
                        ("GC", {}, _conf(cniVersion="1.1.0", **{"cni.dev/valid-attachments": []}))], _noop),
    "version-and-about": ([("VERSION", {}, b""), ("", {"CNI_COMMAND": "<unset>"}, b"")], _noop),
    "delegate-environment": ([("ADD", {}, ENV_DUMP), ("DEL", {}, ENV_DUMP)], _noop),
    "delegate-fails": ([("ADD", {"FAKE_DIR": "/nonexistent"}, _conf())], _noop),
    "corrupt-stored-config": ([("DEL", {}, _conf())], _corrupt),
    "no-subnet-env": ([("ADD", {}, _conf(subnetFile="/nonexistent"))], _noop),
    "bad-stdin": ([("ADD", {}, b"{not json"), ("DEL", {}, b"\xff\xfe"), ("ADD", {}, b"")], _noop),
    "bad-env": ([("ADD", {"CNI_CONTAINERID": "../x"}, _conf()), ("ADD", {"CNI_IFNAME": "<unset>"}, _conf()),
                 ("FROB", {}, _conf()), ("ADD", {"CNI_PATH": "<unset>"}, json.dumps(GOOD).encode())], _noop),
    "big-numbers": ([("ADD", {}, _conf(delegate={"x": 1}).replace(b'"x": 1', b'"x": 1e400'))], _noop),
}  # fmt: skip


def _same_socket(got: list[Any]) -> list[Any]:
    """The one difference the modes must have: FLANNEL_CNI_SOCKET (a server's; a path where none listens),
    which reaches the delegates' environment."""
    files = {k: re.sub(rb"FLANNEL_CNI_SOCKET=[^\0]*", b"FLANNEL_CNI_SOCKET=", v) for k, v in got[-1].items()}
    return [*got[:-1], files]


def _with_root(steps: list[tuple[str, dict[str, str], bytes]], root: Path) -> list[tuple[str, dict[str, str], bytes]]:
    return [(c, o, s.replace(b"@/", f"{root}/".encode())) for c, o, s in steps]


@pytest.mark.parametrize("vector", sorted(VECTORS))
def test_served_and_standalone_answer_alike(vector: str, cni_paths: CniPaths, tmp_path: Path) -> None:
    steps, setup = VECTORS[vector]
    root = tmp_path / "bed"
    steps = _with_root(steps, root)
    served = outcomes(root, "served", cni_paths, steps, setup)
    standalone = outcomes(root, "fallback", cni_paths, steps, setup)
    assert _same_socket(served) == _same_socket(standalone)
    if vector == "delegate-environment":
        files = served[-1]
        assert files["fake/fds.ADD"] == files["fake/fds.DEL"]
        assert served[0][2] == b"envdump: a word on stderr\n"  # the delegate's stderr is the client's


@pytest.mark.parametrize(
    "locale",
    [{}, {"LANG": "C.UTF-8"}, {"LC_ALL": "C"}, {"LC_ALL": ""}, {"LANG": "xx_YY.UTF-8"}, {"LANG": "POSIX"},
     {"LC_CTYPE": "C", "LANG": "C.UTF-8"}, {"LC_CTYPE": "POSIX"}, {"LC_ALL": "", "LC_CTYPE": "C"}],
    ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "none",
)  # fmt: skip
def test_delegates_get_the_environment_python_would_give(
    locale: dict[str, str], cni_paths: CniPaths, tmp_path: Path
) -> None:
    """The standalone plugin's delegates see Python's environment after its C-locale coercion (PEP 538): the
    client sends that environment, so a served call's delegates see the same bytes in the same order."""
    root = tmp_path / "bed"
    steps = _with_root([("ADD", locale, ENV_DUMP)], root)
    served = _same_socket(outcomes(root, "served", cni_paths, steps, _noop))
    standalone = _same_socket(outcomes(root, "fallback", cni_paths, steps, _noop))
    assert served[-1]["fake/environ.ADD"] == standalone[-1]["fake/environ.ADD"]
    assert served == standalone


env_values = st.binary(max_size=10).map(lambda b: b.replace(b"\0", b"").replace(b"=", b"")) | st.sampled_from(
    [b"some-id", b"a\xff", b"eth0", b"..", b"x/y", b"ADD", b"DEL", b"VERSION", b"C.UTF-8"]
)


@fuzz_settings(60)
@given(
    command=st.sampled_from([b"ADD", b"DEL", b"CHECK", b"STATUS", b"GC", b"VERSION", b"FROB"]),
    cid=env_values,
    ifname=env_values,
    extra=st.dictionaries(st.sampled_from([b"LANG", b"LC_ALL", b"LC_CTYPE", b"X", b"CNI_ARGS"]), env_values),
    stdin=st.sampled_from([b"whole", b"cut", b"bytes"]).flatmap(
        lambda how: st.binary(max_size=40) if how == b"bytes" else st.integers(0, 200).map(lambda n: (how, n))
    ),
)
def test_fuzz_served_and_standalone_answer_alike(
    cni_paths: CniPaths, tmp_path_factory: pytest.TempPathFactory, command: bytes, cid: bytes, ifname: bytes,
    extra: dict[bytes, bytes], stdin: Any,
) -> None:  # fmt: skip
    root = tmp_path_factory.mktemp("fz") / "bed"
    conf = _with_root([("", {}, ENV_DUMP)], root)[0][2]
    data = stdin if isinstance(stdin, bytes) else conf if stdin[0] == b"whole" else conf[: stdin[1]]
    got = []
    for mode in ("served", "fallback"):
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        bed = Bed(root, mode, cni_paths)
        (bed.bin / "envdump").write_text(ENV_DELEGATE)
        (bed.bin / "envdump").chmod(0o755)
        bed.write_env(IPV4_ENV)
        env = {k.encode(): v.encode() for k, v in bed.env("ADD").items()}
        env.update({b"CNI_COMMAND": command, b"CNI_CONTAINERID": cid, b"CNI_IFNAME": ifname, **extra})
        rc, out, err = bed.exec(env, data)
        files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
        got.append(_same_socket([rc, out, err, files]))
    assert got[0] == got[1]


# ---- a real flanneld -----------------------------------------------------------------------------------------

SHIM = r"""#!/bin/sh
# The bridge, recording who runs it (served: flanneld; standalone: the client, whose pid the plugin keeps) and,
# with a gate set, holding the first ADD until the test opens it (30 s at most).
echo "$CNI_COMMAND $PPID" >> "$SHIM_DIR/calls"
if [ "$CNI_COMMAND" = ADD ] && [ -e "$SHIM_DIR/gate" ] && mkdir "$SHIM_DIR/held" 2>/dev/null; then
  echo $$ > "$SHIM_DIR/entered"
  i=0
  while [ ! -e "$SHIM_DIR/open" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
fi
exec /usr/lib/cni/bridge
"""


class Agent:
    """A testbed node running flanneld (host-gw), a conflist with its data under the node's dir, and `flannel`
    clients: `served_bin`'s trips when a call falls back, `any_bin`'s runs the standalone plugin. The bridge is
    a shim (SHIM) in front of the real one."""

    def __init__(self, scope: RunScope, name: str = "a1") -> None:
        need(tools=("etcd", "etcdctl"), files=[REF_PLUGINS / p for p in ("bridge", "host-local", "portmap")])
        self.scope = scope
        self.tb = Testbed(scope)
        self.tb.start_etcd()
        self.tb.put_config({"Network": NETWORK, "Backend": {"Type": "host-gw"}})
        self.node = self.tb.add_node(name)
        self.sock = self.node.dir / "cni.sock"
        self.shim = scope.tmpdir / "shim"
        self.shim.mkdir()
        (self.shim / "bridge").write_text(SHIM)
        (self.shim / "bridge").chmod(0o755)
        self.served_bin = flannel_bin_dir(scope.tmpdir, served=True)
        self.any_bin = flannel_bin_dir(scope.tmpdir)
        self.data_dir = self.node.dir / "cni" / "flannel"
        self.ipam_dir = self.node.dir / "cni" / "ipam"
        self.conflist = kube_flannel_conflist(
            subnet_file=str(self.node.subnet_file), data_dir=str(self.data_dir), ipam_data_dir=str(self.ipam_dir)
        )
        self.env = {**os.environ, "FLANNEL_CNI_SOCKET": str(self.sock), "SHIM_DIR": str(self.shim)}
        self.start()
        self.subnet = ipaddress.ip_network(self.tb.wait_ready(self.node).subnet)  # type: ignore[arg-type]

    def start(self, *extra: str, serving: bool = True) -> None:
        before = self.log().count("serving the CNI plugin on")
        self.tb.start_agent(self.node, *extra)
        self.tb.wait_ready(self.node)
        if serving:
            assert wait_for(lambda: self.log().count("serving the CNI plugin on") > before, 60), self.log()[-3000:]

    def log(self) -> str:
        return self.tb.log_tail(self.node, 1 << 20)

    @property
    def pid(self) -> int:
        assert self.node.proc is not None
        return self.node.proc.pid

    def fds(self) -> int:
        """The agent's open descriptors, less its TCP connections: the store opens and closes those to etcd on its
        own schedule (its watch-liveness probe), while a leak of the CNI server is a unix socket, pipe or file."""
        tcp: set[str] = set()
        for table in ("tcp", "tcp6"):
            with contextlib.suppress(FileNotFoundError):
                for line in Path(f"/proc/{self.pid}/net/{table}").read_text().splitlines()[1:]:
                    tcp.add(line.split()[9])
        links = []
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            with contextlib.suppress(FileNotFoundError):
                links.append(os.readlink(f"/proc/{self.pid}/fd/{fd}"))
        return sum(1 for x in links if not (x.startswith("socket:[") and x[8:-1] in tcp))

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def driver(self, served: bool = True, ns: str | None = None) -> Driver:
        return Driver(
            [self.served_bin if served else self.any_bin, self.shim, REF_PLUGINS],
            self.node.dir / "cni" / "cache",
            exec_prefix=["ip", "netns", "exec", ns or self.node.ns],
            env=self.env,
        )

    def pod(self, short: str) -> RuntimeConf:
        ns = self.scope.add_ns(f"{self.node.name}{short}")
        return RuntimeConf(container_id=f"ctr-{short}", netns=f"/run/netns/{ns}")

    def popen(self, command: str, rt: RuntimeConf, served: bool) -> subprocess.Popen[bytes]:
        """The flannel plugin alone for `rt`, through the client, started and fed; its pid is the client's."""
        bin_dir = self.served_bin if served else self.any_bin
        conf = Driver.build_config(self.conflist, self.conflist["plugins"][0], None, rt)
        cni_path = os.pathsep.join(map(str, (bin_dir, self.shim, REF_PLUGINS)))
        env = {**self.env, "CNI_COMMAND": command, "CNI_CONTAINERID": rt.container_id, "CNI_NETNS": rt.netns,
               "CNI_IFNAME": rt.ifname, "CNI_PATH": cni_path}  # fmt: skip
        p = subprocess.Popen(
            ["ip", "netns", "exec", self.node.ns, str(bin_dir / "flannel")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        )  # fmt: skip
        assert p.stdin is not None
        p.stdin.write(json.dumps(conf).encode())
        p.stdin.close()
        p.stdin = None  # for communicate()
        return p

    def calls(self) -> list[tuple[str, int]]:
        f = self.shim / "calls"
        return [(c, int(pid)) for c, pid in (line.split() for line in f.read_text().splitlines())] if f.exists() else []

    def allocated(self) -> list[str]:
        d = self.ipam_dir / self.conflist["name"]
        return sorted(f.name for f in d.iterdir() if f.name[0].isdigit()) if d.exists() else []

    def ip_of(self, rt: RuntimeConf) -> str:
        ns = rt.netns.rsplit("/", 1)[1]
        out = run(["ip", "-n", ns, "-j", "-4", "addr", "show", "eth0"])
        return str(json.loads(out)[0]["addr_info"][0]["local"])

    def entered(self) -> bool:
        return (self.shim / "entered").exists()


def _result_ip(out: bytes) -> str:
    return str(ipaddress.ip_interface(json.loads(out)["ips"][0]["address"]).ip)


@pytest.mark.integration
def test_fifty_adds_at_once_through_flanneld(scope: RunScope) -> None:
    a = Agent(scope)
    drv = a.driver(served=True)
    warm = a.pod("w")
    drv.add(a.conflist, warm)
    drv.delete(a.conflist, warm)
    fds0, threads0 = a.fds(), a.threads()
    pods = [a.pod(f"c{i}") for i in range(50)]
    with ThreadPoolExecutor(max_workers=50) as ex:
        results = list(ex.map(lambda rt: drv.add(a.conflist, rt), pods))
    ips = [str(ipaddress.ip_interface(r["ips"][0]["address"]).ip) for r in results]
    assert len(set(ips)) == 50 and all(ipaddress.ip_address(ip) in a.subnet for ip in ips)
    assert a.allocated() == sorted(ips)
    assert len(os.listdir(a.data_dir)) == 50
    assert [pid for c, pid in a.calls() if c == "ADD"] == [a.pid] * 51  # every bridge was the agent's child
    assert a.threads() <= threads0 + cniserver.WORKERS
    assert [a.ip_of(rt) for rt in pods] == ips
    with ThreadPoolExecutor(max_workers=50) as ex:
        list(ex.map(lambda rt: drv.delete(a.conflist, rt), pods))
    assert a.allocated() == [] and os.listdir(a.data_dir) == []
    assert wait_for(lambda: a.fds() == fds0, 10), (a.fds(), fds0)


@pytest.mark.integration
def test_a_client_killed_mid_call(scope: RunScope) -> None:
    """The agent finishes the call (as an exec'd plugin's delegate would), drops the answer nobody reads,
    leaks nothing, and serves on; the runtime's DEL that follows cleans up."""
    a = Agent(scope)
    drv = a.driver(served=True)
    warm = a.pod("w")
    drv.add(a.conflist, warm)
    fds0, threads0 = a.fds(), a.threads()
    (a.shim / "gate").touch()
    rt = a.pod("k")
    p = a.popen("ADD", rt, served=True)
    assert wait_for(a.entered, 30)
    p.kill()
    p.wait(10)
    (a.shim / "open").touch()
    assert wait_for(lambda: "left before its answer" in a.log(), 30), a.log()[-2000:]
    assert wait_for(lambda: a.fds() == fds0, 10), (a.fds(), fds0)
    assert a.threads() <= threads0 + 1
    assert (a.data_dir / rt.container_id).exists() and len(a.allocated()) == 2
    drv.delete(a.conflist, rt)
    other = a.pod("o")
    assert ipaddress.ip_address(_result_ip(json.dumps(drv.add(a.conflist, other)).encode())) in a.subnet
    for x in (warm, other):
        drv.delete(a.conflist, x)
    assert a.allocated() == [] and a.node.proc is not None and a.node.proc.poll() is None


@pytest.mark.integration
def test_the_agent_killed_mid_call(scope: RunScope) -> None:
    """SIGKILL to the agent and its children (a container restart) while it runs an ADD: the client gets no
    reply, runs the standalone plugin with the same stdin, and the pod comes up right; the restarted agent
    replaces the dead one's socket file and serves the DEL."""
    a = Agent(scope)
    (a.shim / "gate").touch()
    rt = a.pod("r")
    p = a.popen("ADD", rt, served=False)
    assert wait_for(a.entered, 30)
    dead = a.pid
    os.killpg(dead, signal.SIGKILL)  # the agent's process group: it and the delegate it started
    a.tb.stop_agent(a.node)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, out + err
    ip = _result_ip(out)
    assert ipaddress.ip_address(ip) in a.subnet and a.ip_of(rt) == ip
    assert a.calls() == [("ADD", dead), ("ADD", p.pid)]
    assert a.sock.exists()  # the dead agent's file
    a.start()
    assert a.log().count("removed the stale CNI socket") == 1
    a.driver(served=True).delete(a.conflist, rt)
    assert a.calls()[-1] == ("DEL", a.pid)
    assert a.allocated() == []


@pytest.mark.integration
def test_the_agent_stopped_mid_call(scope: RunScope) -> None:
    """SIGTERM while it runs an ADD: the socket file goes at once (new calls get the standalone plugin), the
    running call is finished and answered, then the agent exits 0."""
    a = Agent(scope)
    (a.shim / "gate").touch()
    rt = a.pod("s1")
    p = a.popen("ADD", rt, served=True)
    assert wait_for(a.entered, 30)
    agent = a.node.proc
    assert agent is not None
    agent.send_signal(signal.SIGTERM)
    assert wait_for(lambda: not a.sock.exists(), 5)
    meanwhile = a.pod("s2")
    ip2 = _result_ip(json.dumps(a.driver(served=False).add(a.conflist, meanwhile)).encode())
    (a.shim / "open").touch()
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, out + err
    ip1 = _result_ip(out)
    assert agent.wait(15) == 0
    a.node.proc = None
    assert (a.ip_of(rt), a.ip_of(meanwhile)) == (ip1, ip2) and ip1 != ip2
    calls = a.calls()
    assert calls[0] == ("ADD", agent.pid) and calls[1][0] == "ADD" and calls[1][1] != agent.pid
    assert "calls still running" not in a.log()


@pytest.mark.integration
def test_the_standalone_plugin_while_the_agent_is_down(scope: RunScope) -> None:
    a = Agent(scope)
    drv = a.driver(served=False)
    a.tb.stop_agent(a.node)  # SIGTERM: the socket file goes with it
    assert not a.sock.exists()
    pods = [a.pod(f"d{i}") for i in range(3)]
    ips = [_result_ip(json.dumps(drv.add(a.conflist, rt)).encode()) for rt in pods[:2]]
    # A dead agent's socket file: the client's connect is refused.
    a.start()
    a.node.proc.kill()  # type: ignore[union-attr]
    a.tb.stop_agent(a.node)
    assert a.sock.exists(), a.log()[-4000:]
    ips.append(_result_ip(json.dumps(drv.add(a.conflist, pods[2])).encode()))
    assert len(set(ips)) == 3 and a.allocated() == sorted(ips)
    assert [c for c in a.calls()] == [("ADD", pid) for _, pid in a.calls()] and len(a.calls()) == 3
    # Serving turned off: the agent leaves the socket path alone (the dead agent's file stays) and serves nothing.
    serving = a.log().count("serving the CNI plugin on")
    a.start("--cni-socket=", serving=False)
    drv.delete(a.conflist, pods[0])
    assert a.calls()[-1][0] == "DEL" and a.calls()[-1][1] != a.pid
    assert a.log().count("serving the CNI plugin on") == serving and a.sock.exists()
    # A socket it cannot make (its directory would be subnet.env): one error line, and the agent runs on.
    a.tb.stop_agent(a.node)
    a.start(f"--cni-socket={a.node.subnet_file}/cni.sock", serving=False)
    assert wait_for(lambda: "not serving the CNI plugin on" in a.log(), 10)
    time.sleep(1)
    assert a.node.proc is not None and a.node.proc.poll() is None
    # Turned on again: the dead agent's file is replaced, and the DELs are served.
    a.tb.stop_agent(a.node)
    a.start()
    assert a.log().count("removed the stale CNI socket") == 1
    served = a.driver(served=True)
    for rt in pods[1:]:
        served.delete(a.conflist, rt)
    assert [pid for c, pid in a.calls() if c == "DEL"][-2:] == [a.pid, a.pid]
    assert a.allocated() == []


@pytest.mark.integration
def test_clients_in_another_network_namespace_are_not_served_another_directory_is(scope: RunScope) -> None:
    """The agent's delegates would make links in its own network namespace: a client in another gets the
    standalone plugin, which works where the client is. A client in another working directory (or mount
    namespace, or root) is served in its own view, so its relative paths lead where they lead for it."""
    a = Agent(scope)
    other = scope.add_ns("other")
    odir = scope.tmpdir / "other"
    odir.mkdir()
    (odir / "subnet.env").write_text(
        "FLANNEL_NETWORK=10.99.0.0/16\nFLANNEL_SUBNET=10.99.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
    )
    conflist = kube_flannel_conflist(subnet_file=str(odir / "subnet.env"), data_dir=str(odir / "flannel"),
                                     ipam_data_dir=str(odir / "ipam"))  # fmt: skip
    rt = a.pod("x")
    res = a.driver(served=False, ns=other).add(conflist, rt)
    assert res["ips"][0]["address"].startswith("10.99.1.")
    assert run(["ip", "-n", other, "link", "show", "cni0"]).strip()
    assert run(["ip", "-n", a.node.ns, "link", "show", "cni0"], check=False).strip() == ""
    assert "is in another network namespace" in a.log()
    assert a.calls()[0][1] != a.pid
    # Another working directory (the agent runs from the test's): served (the client's standalone plugin is a
    # tripwire), with subnetFile and dataDir relative to the client's directory.
    rel = a.pod("rel")
    conf = Driver.build_config(conflist, conflist["plugins"][0], None, rel)
    conf.update(subnetFile="subnet.env", dataDir="flannel")
    env = {**a.env, "CNI_CONTAINERID": rel.container_id, "CNI_NETNS": rel.netns, "CNI_IFNAME": "eth0",
           "CNI_PATH": f"{a.shim}:{REF_PLUGINS}"}  # fmt: skip
    for command in ("ADD", "DEL"):
        p = subprocess.run(["ip", "netns", "exec", a.node.ns, str(a.served_bin / "flannel")],
                           input=json.dumps(conf).encode(), env={**env, "CNI_COMMAND": command}, capture_output=True,
                           cwd=odir, timeout=30)  # fmt: skip
        assert p.returncode == 0, p.stdout + p.stderr
        assert a.calls()[-1] == (command, a.pid)
        if command == "ADD":  # stored where the client's relative dataDir leads, from its subnet.env
            assert b'"10.99.1.0/24"' in (odir / "flannel" / rel.container_id).read_bytes()
    assert not (odir / "flannel" / rel.container_id).exists()
    assert "not serving a client" not in a.log().split("is in another network namespace", 1)[1]


@pytest.mark.integration
def test_a_client_that_is_not_root_is_not_served(scope: RunScope) -> None:
    need(tools=("setpriv",), files=["/usr/bin/python3.11"])
    a = Agent(scope)
    # A client nobody may run, with a standalone plugin on the system's Python (the venv's may be private).
    os.chmod(scope.tmpdir, 0o711)
    pub = scope.tmpdir / "pub"
    pub.mkdir(mode=0o755)
    shutil.copy2(a.any_bin / "flannel", pub / "flannel")
    install_script(pub / "flannel-py", python="/usr/bin/python3.11")
    as_nobody = ["ip", "netns", "exec", a.node.ns, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                 str(pub / "flannel")]  # fmt: skip
    version = {"CNI_COMMAND": "VERSION", "FLANNEL_CNI_SOCKET": str(a.sock), "PATH": "/usr/bin:/bin"}

    def as_nobody_run(env: dict[str, str], stdin: bytes) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(as_nobody, input=stdin, env=env, capture_output=True, cwd="/", timeout=60)

    # Mode 0600: its connect() is refused, the standalone plugin answers.
    assert a.sock.stat().st_mode & 0o777 == 0o600
    p = as_nobody_run(version, b"")
    assert p.returncode == 0 and json.loads(p.stdout)["supportedVersions"], p.stdout + p.stderr
    assert "neither root nor flanneld's" not in a.log()
    # Mode 0666: it connects, and the agent closes the connection unread (SO_PEERCRED).
    os.chmod(a.sock, 0o666)
    p = as_nobody_run(version, b"")
    assert p.returncode == 0 and json.loads(p.stdout)["supportedVersions"], p.stdout + p.stderr
    assert "uid 65534 is neither root nor flanneld's (0)" in a.log()
    # An ADD fails clearly in the standalone plugin (nobody may not write the node's data), and nothing ran.
    rt = a.pod("n")
    conf = Driver.build_config(a.conflist, a.conflist["plugins"][0], None, rt)
    env = {**version, "CNI_COMMAND": "ADD", "CNI_CONTAINERID": rt.container_id, "CNI_NETNS": rt.netns,
           "CNI_IFNAME": "eth0", "CNI_PATH": f"{a.shim}:{REF_PLUGINS}"}  # fmt: skip
    p = as_nobody_run(env, json.dumps(conf).encode())
    assert p.returncode == 1 and b"Traceback" not in p.stderr
    e = json.loads(p.stdout)
    assert e["code"] == 999 and "permission denied" in e["msg"], e
    assert a.calls() == [] and not a.data_dir.exists()


RAW_CLIENT = r"""
import json, socket, struct, sys
def ask(data, fds=(2,), cut=False):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(sys.argv[1])
    n = socket.send_fds(s, [data], list(fds)) if fds else 0
    if data[n:]:
        s.sendall(data[n:])
    if cut:
        s.close()
        return None
    out, need = b"", 16  # the head, then the lengths it names (past a refusal comes a reset, not an end)
    while len(out) < need:
        b = s.recv(need - len(out))
        if not b:
            break
        out += b
        if len(out) == 16:
            need += sum(struct.unpack(">II", out[8:16]))
    s.close()
    return out.decode("latin-1")
head = struct.Struct(">4sB3xIII")
print(json.dumps([
    ask(b"\x00" * 64),
    ask(head.pack(b"FCNI", 9, 0, 0, 0)),
    ask(head.pack(b"FCNI", 1, 1, 100, 0) + b"X=1", cut=True),
    ask(head.pack(b"FCNI", 1, 0, 0, 0), fds=()),
    ask(head.pack(b"FCNI", 1, 1, 20, 0) + b"CNI_COMMAND=VERSION\0"),
]))
"""


@pytest.mark.integration
def test_garbage_requests_leave_the_agent_serving(scope: RunScope) -> None:
    a = Agent(scope)
    replies = json.loads(ns_exec(a.node.ns, [sys.executable, "-c", RAW_CLIENT, str(a.sock)]))
    reasons = [r[cniserver.REPLY_HEAD.size :] if r else r for r in replies[:4]]
    assert reasons == [
        "not a flannel CNI request (it starts with b'\\x00\\x00\\x00\\x00')",
        "protocol version 9; this flanneld speaks 1",
        None,
        "the request must carry exactly one file descriptor (the client's stderr)",
    ]
    assert replies[4][:7] == "FCNR\x01\x00\x00" and "supportedVersions" in replies[4]
    assert a.log().count("CNI server: refused a request") == 3
    drv = a.driver(served=True)
    rt = a.pod("g")
    drv.add(a.conflist, rt)
    drv.delete(a.conflist, rt)
    assert a.calls() == [("ADD", a.pid), ("DEL", a.pid)] and a.allocated() == []


def test_reply_head_is_what_the_client_reads() -> None:
    """launcher.c reads replies and writes requests with these sizes and offsets."""
    src = (Path(__file__).resolve().parents[1] / "pyflannel" / "cni" / "launcher.c").read_text()
    assert f"#define REQUEST_HEAD {cniserver.REQUEST_HEAD.size}" in src
    assert f"#define REPLY_HEAD {cniserver.REPLY_HEAD.size}" in src
    assert f"#define PROTOCOL {cniserver.PROTOCOL}" in src
    assert "#define MAX_STDIN (16u << 20)" in src and plugin.MAX_STDIN == 16 << 20
    assert "#define MAX_ENV_COUNT 4096u" in src and cniserver.MAX_ENV_COUNT == 4096
    assert "#define MAX_ENV_BYTES (1u << 20)" in src and cniserver.MAX_ENV_BYTES == 1 << 20
    assert "#define MAX_REPLY (256u << 20)" in src and cniserver.MAX_REPLY == 256 << 20
    assert struct.calcsize(">4sB3xIII") == cniserver.REQUEST_HEAD.size
