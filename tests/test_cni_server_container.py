"""The CNI server as kube-flannel's DaemonSet runs it: flanneld in a mount namespace of its own (the container's),
where the node's CNI directories are not what the runtime sees, and another working directory; the runtime's
`flannel` client in the node's ("host's") view, in the same network namespace.

A served call runs in the client's view: its answer and every file it writes are the standalone plugin's, the
files land where the client sees them (and not in the server's view), and a real bridge gives the pod its veth
and address; 50 ADDs at once get distinct addresses. A server that cannot enter the client's view (no
CAP_SYS_ADMIN) or cannot see its pid (a PID namespace of its own) refuses with its reason and the client's
standalone plugin answers, byte for byte the same. A worker that entered a client's view and left it serves a
client in flanneld's view as before, and one that cannot leave is replaced.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from needs import need
from test_cni_netns import flannel_bin_dir
from test_cni_plugin import IPV4_ENV, TRIPWIRE, Bed, CniPaths, wait_socket
from test_cni_plugin import cni_paths as cni_paths  # the session's fixture
from test_cni_server import REF_PLUGINS, VECTORS, ServerThread, _same_socket, _with_root, outcomes

from pyflannel import cniserver
from pyflannel.cni.driver import Driver, RuntimeConf, kube_flannel_conflist
from pyflannel.lab.netns import RunScope, run, wait_for

pytestmark = pytest.mark.integration

# The container's start: its own mounts over the node's CNI directories (COVER), its own working directory.
CONTAINER = 'for d in $COVER; do mount -t tmpfs flannel-test-cover "$d" || exit 1; done; cd "$SRV_CWD" && exec "$@"'
CALL_LINE = re.compile(r"CNI server: (\S+) (\S+): exit (\d+) in")


class ContainerServer:
    """`python -m pyflannel.cniserver` in namespace `ns`, in a mount namespace of its own where `cover` are
    empty tmpfs, run from a directory of its own; `pidns`: in a PID namespace of its own too; `drop`: without
    these capabilities (setpriv, bounding and inheritable sets)."""

    def __init__(self, scope: RunScope, ns: str, cover: list[Path], *, name: str = "srv", pidns: bool = False,
                 drop: tuple[str, ...] = ()) -> None:  # fmt: skip
        need(tools=("unshare", "setpriv", "nsenter", "mount"))
        self.pidns = pidns
        self.sock = scope.tmpdir / name / "cni.sock"
        self.sock.parent.mkdir(mode=0o700)
        self.cwd = scope.tmpdir / f"{name}-cwd"
        self.cwd.mkdir()
        self.log = scope.tmpdir / f"{name}.log"
        cmd = ["unshare", "--mount", "--propagation", "private"]
        if pidns:
            cmd += ["--pid", "--fork", "--kill-child", "--mount-proc"]
        cmd += ["sh", "-c", CONTAINER, "-"]
        if drop:
            caps = ",".join(f"-{c}" for c in drop)
            cmd += ["setpriv", "--bounding-set", caps, "--inh-caps", caps]
        cmd += [sys.executable, "-m", "pyflannel.cniserver", "--socket", str(self.sock), "-v", "1"]
        env = {**os.environ, "COVER": " ".join(map(str, cover)), "SRV_CWD": str(self.cwd)}
        self.proc = scope.spawn(ns, cmd, log=self.log, env=env)
        wait_socket(self.sock, self.proc, self.log)

    @property
    def pid(self) -> int:
        """The server's pid (with a PID namespace, unshare's child)."""
        if not self.pidns:
            return self.proc.pid
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        assert len(children) == 1, children
        return int(children[0])

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def calls(self) -> list[tuple[str, str, int]]:
        """The calls it served (its -v 1 line per call)."""
        return [(c, cid, int(rc)) for c, cid, rc in CALL_LINE.findall(self.text())]

    def sees(self, path: Path) -> list[str]:
        """What is in `path` in the server's view."""
        out = run(["nsenter", "--target", str(self.pid), "--mount", "ls", "-A", str(path)])
        return out.split()


class NodeBed(Bed):
    """A Bed whose client runs in the node's network namespace (through `ip netns exec`, a mount namespace of
    its own too) and asks the server at `sock`."""

    def __init__(self, tmp: Path, mode: str, paths: CniPaths, ns: str, sock: Path) -> None:
        super().__init__(tmp, mode, paths)
        self.ns = ns
        self.sock = sock

    @property
    def socket(self) -> str:
        return str(self.sock)

    def exec(self, env: dict[str, str] | dict[bytes, bytes], stdin: bytes) -> tuple[int, bytes, bytes]:
        p = subprocess.run(["ip", "netns", "exec", self.ns, str(self.exe)], input=stdin, env=env,
                           capture_output=True, timeout=60, cwd="/")  # fmt: skip
        assert p.returncode != TRIPWIRE, p.stderr.decode(errors="replace")
        return p.returncode, p.stdout, p.stderr


Steps = list[tuple[str, dict[str, str], bytes]]


def node_outcomes(root: Path, mode: str, paths: CniPaths, ns: str, sock: Path, steps: Steps,
                  setup: Callable[[Bed], None]) -> list[Any]:  # fmt: skip
    """test_cni_server.outcomes for a NodeBed (the client in the node's namespace), the socket path masked."""
    return _same_socket(outcomes(root, mode, paths, steps, setup, lambda r, m, p: NodeBed(r, m, p, ns, sock)))


def test_served_in_the_clients_view_as_the_standalone_plugin_answers(scope: RunScope, cni_paths: CniPaths) -> None:
    node = scope.add_ns("node")
    beds = scope.tmpdir / "beds"  # the node's CNI files; in the server's view an empty tmpfs
    beds.mkdir()
    srv = ContainerServer(scope, node, [beds])
    assert srv.sees(beds) == []
    root = beds / "bed"
    served_calls = 0
    for name, (steps, setup) in sorted(VECTORS.items()):
        steps = _with_root(steps, root)
        served = node_outcomes(root, "served", cni_paths, node, srv.sock, steps, setup)
        served_calls += len(steps)
        assert len(srv.calls()) == served_calls, (name, srv.text()[-3000:])
        assert srv.sees(beds) == [], name  # nothing it wrote landed in its own view
        standalone = node_outcomes(root, "fallback", cni_paths, node, scope.tmpdir / "no-agent.sock", steps, setup)
        assert served == standalone, name
        if name == "lifecycle":
            assert "data/some-container-id" not in served[-1]  # (DEL removed it: the ADD wrote it, in this view)
        if name == "delegate-environment":
            assert served[0][2] == b"envdump: a word on stderr\n"
    assert "not serving a client" not in srv.text()
    assert os.readlink(f"/proc/{srv.pid}/cwd") == str(srv.cwd)


class PodNode:
    """A node namespace with a host tree (the flannel client, bridge and host-local, subnet.env, the plugin's
    and host-local's state) that a ContainerServer covers, and drivers for its clients."""

    def __init__(self, scope: RunScope) -> None:
        need(files=[REF_PLUGINS / p for p in ("bridge", "host-local")])
        self.scope = scope
        self.ns = scope.add_ns("node")
        self.host = scope.tmpdir / "host"
        self.host.mkdir()
        self.plugins = self.host / "plugins"
        self.plugins.mkdir()
        for p in ("bridge", "host-local"):
            shutil.copy2(REF_PLUGINS / p, self.plugins / p)
        self.served_bin = flannel_bin_dir(self.host, served=True)
        self.any_bin = flannel_bin_dir(self.host)
        self.subnet_file = self.host / "run" / "subnet.env"
        self.subnet_file.parent.mkdir()
        self.subnet_file.write_text(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.5.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
        )
        self.lib = self.host / "lib"
        self.lib.mkdir()
        self.data_dir = self.lib / "flannel"
        self.ipam_dir = self.lib / "ipam"
        full = kube_flannel_conflist(subnet_file=str(self.subnet_file), data_dir=str(self.data_dir),
                                     ipam_data_dir=str(self.ipam_dir))  # fmt: skip
        self.conflist = dict(full, plugins=[full["plugins"][0]])  # the runtime runs portmap itself
        self.cache = scope.tmpdir / "cache"

    def driver(self, sock: Path, served: bool) -> Driver:
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "FLANNEL_CNI_SOCKET": str(sock)}
        return Driver([self.served_bin if served else self.any_bin, self.plugins], self.cache,
                      exec_prefix=["ip", "netns", "exec", self.ns], env=env)  # fmt: skip

    def pod(self, short: str) -> RuntimeConf:
        return RuntimeConf(container_id=f"ctr-{short}", netns=f"/run/netns/{self.scope.add_ns(short)}")

    def state(self) -> dict[str, bytes]:
        return {str(p.relative_to(self.lib)): p.read_bytes() for p in sorted(self.lib.rglob("*")) if p.is_file()}

    def wipe(self) -> None:
        for p in self.lib.iterdir():
            shutil.rmtree(p)
        shutil.rmtree(self.cache, ignore_errors=True)


def _ip(res: dict[str, Any]) -> str:
    return str(ipaddress.ip_interface(res["ips"][0]["address"]).ip)


def _pod_addr(rt: RuntimeConf) -> str:
    out = run(["ip", "-n", rt.netns.rsplit("/", 1)[1], "-j", "-4", "addr", "show", "eth0"])
    return str(json.loads(out)[0]["addr_info"][0]["local"])


def _shape(res: dict[str, Any]) -> str:
    """The result less what differs per ADD by design: MAC addresses and the host veth's random name."""
    text = json.dumps(res, sort_keys=True)
    text = re.sub(r'"mac": "[0-9a-f:]{17}"', '"mac": "-"', text)
    return re.sub(r'"veth[0-9a-f]{8}"', '"veth-"', text)


def test_a_pod_through_a_server_in_its_own_mount_namespace(scope: RunScope) -> None:
    node = PodNode(scope)
    srv = ContainerServer(scope, node.ns, [node.host])
    assert srv.sees(node.host) == []
    rt = node.pod("p1")
    served = node.driver(srv.sock, served=True)
    res = served.add(node.conflist, rt)
    assert srv.calls() == [("ADD", rt.container_id, 0)], srv.text()[-3000:]
    ip = _ip(res)
    assert ipaddress.ip_address(ip) in ipaddress.ip_network("10.244.5.0/24") and _pod_addr(rt) == ip
    assert run(["ip", "-n", node.ns, "link", "show", "cni0"]).strip()
    state = node.state()
    assert set(state) == {f"flannel/{rt.container_id}", f"ipam/cbr0/{ip}", "ipam/cbr0/last_reserved_ip.0",
                          "ipam/cbr0/lock"}  # fmt: skip
    assert srv.sees(node.host) == []  # written in the client's view only
    served.delete(node.conflist, rt)
    assert srv.calls()[-1] == ("DEL", rt.container_id, 0) and not (node.data_dir / rt.container_id).exists()
    # The standalone plugin, from the same state, answers and stores the same.
    node.wipe()
    alone = node.driver(scope.tmpdir / "no-agent.sock", served=False)
    res2 = alone.add(node.conflist, rt)
    assert _shape(res2) == _shape(res) and node.state() == state
    assert _pod_addr(rt) == ip
    alone.delete(node.conflist, rt)
    assert len(srv.calls()) == 2 and "not serving a client" not in srv.text()


def test_fifty_adds_at_once_from_another_mount_namespace(scope: RunScope) -> None:
    node = PodNode(scope)
    srv = ContainerServer(scope, node.ns, [node.host])
    drv = node.driver(srv.sock, served=True)
    pods = [node.pod(f"c{i}") for i in range(50)]
    with ThreadPoolExecutor(max_workers=50) as ex:
        results = list(ex.map(lambda rt: drv.add(node.conflist, rt), pods))
    ips = [_ip(r) for r in results]
    assert len(set(ips)) == 50 and all(ipaddress.ip_address(x) in ipaddress.ip_network("10.244.5.0/24") for x in ips)
    assert sorted(c for c, _, rc in srv.calls() if rc == 0) == ["ADD"] * 50, srv.text()[-3000:]
    assert [_pod_addr(rt) for rt in pods] == ips
    assert sorted(os.listdir(node.data_dir)) == sorted(rt.container_id for rt in pods)
    with ThreadPoolExecutor(max_workers=50) as ex:
        list(ex.map(lambda rt: drv.delete(node.conflist, rt), pods))
    assert os.listdir(node.data_dir) == [] and srv.sees(node.host) == []
    assert len(srv.calls()) == 100 and "not serving a client" not in srv.text()


def _refused_alike(scope: RunScope, cni_paths: CniPaths, srv: ContainerServer, node: str, beds: Path) -> None:
    """Vectors through a client of `srv` (which refuses) and through the standalone plugin alone: the same."""
    root = beds / "bed"
    for name in ("lifecycle", "delegate-environment", "bad-env"):
        steps, setup = VECTORS[name]
        steps = _with_root(steps, root)
        asked = node_outcomes(root, "fallback", cni_paths, node, srv.sock, steps, setup)
        standalone = node_outcomes(root, "fallback", cni_paths, node, scope.tmpdir / "no-agent.sock", steps, setup)
        assert asked == standalone, name
    assert srv.calls() == []


def test_without_cap_sys_admin_it_refuses_and_the_standalone_plugin_answers(
    scope: RunScope, cni_paths: CniPaths
) -> None:
    node = scope.add_ns("node")
    beds = scope.tmpdir / "beds"
    beds.mkdir()
    srv = ContainerServer(scope, node, [beds], drop=("sys_admin",))
    status = Path(f"/proc/{srv.pid}/status").read_text()
    eff = int(re.search(r"CapEff:\s*([0-9a-f]+)", status).group(1), 16)  # type: ignore[union-attr]
    assert not eff & (1 << 21), status  # CAP_SYS_ADMIN
    _refused_alike(scope, cni_paths, srv, node, beds)
    text = srv.text()
    assert re.search(r"W\d{4} .*not serving a client .*: cannot enter pid \d+'s mount namespace: Operation not "
                     r"permitted \(flanneld needs CAP_SYS_ADMIN and CAP_SYS_CHROOT\)", text), text  # fmt: skip
    assert len(re.findall(r"(?m)^W.*not serving a client", text)) == 1  # warned once; the others at debug


def test_in_a_pid_namespace_of_its_own_it_refuses_with_the_pid_reason(scope: RunScope, cni_paths: CniPaths) -> None:
    node = scope.add_ns("node")
    beds = scope.tmpdir / "beds"
    beds.mkdir()
    srv = ContainerServer(scope, node, [beds], pidns=True)
    _refused_alike(scope, cni_paths, srv, node, beds)
    assert "the client's process is not visible in flanneld's PID namespace" in srv.text(), srv.text()


# ---- a worker's view after a switch (a server in this process) ------------------------------------------------


def _worker_view(srv: ServerThread) -> tuple[str, str, tuple[int, int]]:
    """The one worker's root, cwd and mount namespace."""
    (t,) = [t for t in threading.enumerate() if t.name.startswith("cni-") and t in srv.server._threads]
    task = f"/proc/self/task/{t.native_id}"
    st = os.stat(f"{task}/ns/mnt")
    return os.readlink(f"{task}/root"), os.readlink(f"{task}/cwd"), (st.st_dev, st.st_ino)


def _own_view() -> tuple[str, str, tuple[int, int]]:
    st = os.stat("/proc/self/ns/mnt")
    return os.readlink("/proc/self/root"), os.getcwd(), (st.st_dev, st.st_ino)


def _relative_subnet_bed(tmp: Path, paths: CniPaths, sock: str) -> tuple[Bed, dict[str, str], bytes]:
    """A bed whose config names subnet.env relative to the client's working directory."""
    tmp.mkdir()
    bed = Bed(tmp, "served", paths)
    env = bed.env("ADD", FLANNEL_CNI_SOCKET=sock)
    return bed, env, json.dumps(bed.conf(subnetFile="subnet.env")).encode()


def test_a_switched_worker_serves_a_client_in_flanneld_view_as_before(
    cni_paths: CniPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One worker: a call in a client's view (another mount namespace and cwd, where the relative subnetFile
    leads elsewhere), then a client in flanneld's view whose relative subnetFile must lead where it does for
    flanneld: the worker's root, cwd and mount namespace are flanneld's again."""
    need(tools=("unshare",))
    own, elsewhere = tmp_path / "own", tmp_path / "elsewhere"
    for d, subnet in ((own, "10.1.17.1/24"), (elsewhere, "10.1.99.1/24")):
        d.mkdir()
        (d / "subnet.env").write_text(IPV4_ENV.replace("10.1.17.1/24", subnet))
    monkeypatch.chdir(own)  # the server's working directory
    srv = ServerThread(tmp_path / "run" / "cni.sock", workers=1)
    try:
        assert wait_for(lambda: len(srv.server._threads) == 1, 5)
        before = _own_view()
        assert _worker_view(srv) == before
        bed, env, conf = _relative_subnet_bed(tmp_path / "a", cni_paths, srv.server.path)
        cmd = ["unshare", "--mount", "--propagation", "private", str(cni_paths.served)]
        p = subprocess.run(cmd, input=conf, env=env, capture_output=True, timeout=60, cwd=elsewhere)
        assert p.returncode == 0, p.stdout + p.stderr
        assert b"10.1.99.0/24" in bed.stored().read_bytes()
        assert wait_for(lambda: srv.server.served == 1, 5)
        assert _worker_view(srv) == before
        # The client in flanneld's view: its relative path is flanneld's.
        bed2, env2, conf2 = _relative_subnet_bed(tmp_path / "b", cni_paths, srv.server.path)
        p = subprocess.run([str(cni_paths.served)], input=conf2, env=env2, capture_output=True, timeout=60, cwd=own)
        assert p.returncode == 0, p.stdout + p.stderr
        assert b"10.1.17.0/24" in bed2.stored().read_bytes()
        assert wait_for(lambda: srv.server.served == 2, 5)
        assert _worker_view(srv) == before
    finally:
        srv.stop()


def test_a_worker_that_cannot_leave_a_clients_view_is_replaced(
    cni_paths: CniPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The way back failing (here: made to fail once, after the real way back) ends the worker with an error
    once the answer is out, and the event loop starts another, which serves: no thread stays in a client's
    view."""
    need(tools=("unshare",))
    real_leave = cniserver.Views.leave
    failed: list[int | None] = []

    def leave(self: cniserver.Views) -> None:
        real_leave(self)
        if not failed:
            failed.append(threading.get_ident())
            raise cniserver.BrokenView("cannot return to flanneld's own view: made to fail")

    monkeypatch.setattr(cniserver.Views, "leave", leave)
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "subnet.env").write_text(IPV4_ENV)
    monkeypatch.chdir(tmp_path / "own")
    srv = ServerThread(tmp_path / "run" / "cni.sock", workers=1)
    try:
        assert wait_for(lambda: len(srv.server._threads) == 1, 5)
        first = srv.server._threads[0]
        _, env, conf = _relative_subnet_bed(tmp_path / "a", cni_paths, srv.server.path)
        cmd = ["unshare", "--mount", "--propagation", "private", str(cni_paths.served)]
        with caplog.at_level(logging.ERROR, logger="pyflannel.cniserver"):
            p = subprocess.run(cmd, input=conf, env=env, capture_output=True, timeout=60)
            assert p.returncode == 0, p.stdout + p.stderr  # answered: the call ran in the client's view
            assert wait_for(lambda: not first.is_alive(), 5)
            assert wait_for(lambda: [t.is_alive() for t in srv.server._threads] == [True], 5)
        assert "cannot return to flanneld's own view: made to fail" in caplog.text
        assert "stops, stuck in a client's view; starting another" in caplog.text
        assert failed == [first.ident]
        p = subprocess.run(cmd, input=conf, env=env, capture_output=True, timeout=60)
        assert p.returncode == 0, p.stdout + p.stderr
        assert wait_for(lambda: (srv.server.served, srv.server.refused) == (2, 0), 5)
        assert _worker_view(srv) == _own_view()
    finally:
        srv.stop()
