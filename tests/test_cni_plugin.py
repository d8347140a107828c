"""The flannel CNI plugin against upstream's vectors (flannel_linux_test.go) and the bad-input matrix.

The delegate here is a small shell script that records what it was given, so these tests need no root;
tests/test_cni_netns.py runs the same plugin with Debian's real bridge/host-local/portmap.

Every test with a `bed` runs three ways (MODES): the plugin in-process (plugin.run), and the `flannel` client
(pyflannel/cni/launcher.c) served by a CNI server process (pyflannel/cniserver.py) or falling back to the
standalone plugin because no server listens. The same expectations hold for all three: same results, stored
files and error JSON. A served call that falls back instead trips the test (its standalone plugin is a stub).
"""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyflannel.cni import _fastjson, plugin
from pyflannel.cni import conf as cniconf
from pyflannel.cni.launcher import STANDALONE_SUFFIX, build_client, install

IPV4_ENV = "\nFLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n"
IPV6_ENV = "\nFLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00::1/64\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n"
DUAL_ENV = (
    "\nFLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_IPV6_NETWORK=fc00::/48\n"
    "FLANNEL_IPV6_SUBNET=fc00::1/64\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n"
)
MULTI_ENV = (
    "\nFLANNEL_NETWORK=10.1.0.0/16,192.168.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n"
)

FAKE_DELEGATE = r"""#!/bin/sh
d="$FAKE_DIR"
cat > "$d/$CNI_COMMAND.in"
echo "$CNI_COMMAND $CNI_CONTAINERID $CNI_IFNAME" >> "$d/calls"
if [ -e "$d/fail_$CNI_COMMAND" ]; then
  printf '{"code":11,"msg":"fake %s failure","details":"from the fake"}' "$CNI_COMMAND"; exit 1
fi
case "$CNI_COMMAND" in
ADD) v=$(sed -n 's/.*"cniVersion":"\([^"]*\)".*/\1/p' "$d/ADD.in")
     printf '{"cniVersion":"%s","ips":[{"address":"10.1.17.2/24","gateway":"10.1.17.1"}]}' "$v";;
VERSION) printf '{"cniVersion":"1.1.0","supportedVersions":[%s]}' "$FAKE_VERSIONS";;
esac
"""


MODES = ("inproc", "served", "fallback")
# The exit status of the served client's stand-in for the standalone plugin: no test expects it.
TRIPWIRE = 97
TRIPWIRE_SCRIPT = f"""#!/bin/sh
echo "flannel: a served call fell back to the standalone plugin" >&2
echo TRIPWIRE
exit {TRIPWIRE}
"""


def wait_socket(path: Path, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no CNI server on {path}:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.05)


class CniPaths:
    """What the client modes use, made once per session: `served`, a client of a CNI server process (cwd /, as
    the clients the tests run) whose standalone plugin is a tripwire; `fallback`, a client whose socket does not
    exist, with the real standalone plugin (`launcher`, which the in-process mode runs as its executable)."""

    def __init__(self, tmp: Path) -> None:
        self.fallback = tmp / "fallback" / "flannel"
        self.fallback.parent.mkdir()
        install(self.fallback)
        self.launcher = self.fallback.with_name("flannel" + STANDALONE_SUFFIX)
        self.served = tmp / "served" / "flannel"
        self.served.parent.mkdir()
        build_client(self.served)
        tripwire = self.served.with_name("flannel" + STANDALONE_SUFFIX)
        tripwire.write_text(TRIPWIRE_SCRIPT)
        tripwire.chmod(0o755)
        self.socket = tmp / "srv" / "cni.sock"
        self.log = tmp / "server.log"
        with open(self.log, "wb") as log:
            self.server = subprocess.Popen(
                [sys.executable, "-m", "pyflannel.cniserver", "--socket", str(self.socket)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd="/",
            )  # fmt: skip
        try:
            wait_socket(self.socket, self.server, self.log)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait(timeout=10)


@pytest.fixture(scope="session")
def cni_paths(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CniPaths]:
    paths = CniPaths(tmp_path_factory.mktemp("cni-paths"))
    try:
        yield paths
    finally:
        paths.close()


class Bed:
    """A CNI_PATH with fake bridge/ipvlan delegates, a subnet.env and a dataDir, all in tmp_path; `mode` (one of
    MODES) is how run() runs the plugin."""

    def __init__(self, tmp: Path, mode: str = "inproc", paths: CniPaths | None = None) -> None:
        assert mode == "inproc" or paths is not None, mode
        self.mode = mode
        self.paths = paths
        self.tmp = tmp
        self.bin = tmp / "bin"
        self.bin.mkdir()
        for name in ("bridge", "ipvlan"):
            p = self.bin / name
            p.write_text(FAKE_DELEGATE)
            p.chmod(0o755)
        self.fake = tmp / "fake"
        self.fake.mkdir()
        self.subnet_file = tmp / "subnet.env"
        self.data_dir = tmp / "data"
        self.versions = '"0.3.0","0.3.1","0.4.0","1.0.0"'

    def write_env(self, text: str) -> None:
        self.subnet_file.write_text(text)

    def conf(self, **extra: Any) -> dict[str, Any]:
        c: dict[str, Any] = {
            "name": "cni-flannel",
            "type": "flannel",
            "subnetFile": str(self.subnet_file),
            "dataDir": str(self.data_dir),
        }
        c.update(extra)
        return c

    @property
    def socket(self) -> str:
        """FLANNEL_CNI_SOCKET: the session's server when served, else a path where nothing listens (never the
        machine's default, where a real agent may serve)."""
        return str(self.paths.socket if self.mode == "served" and self.paths else self.tmp / "no-agent" / "cni.sock")

    @property
    def exe(self) -> Path:
        """The executable this mode runs: the client (served or not), or the standalone plugin's launcher."""
        assert self.paths is not None, "a Bed with CniPaths"
        return {"inproc": self.paths.launcher, "served": self.paths.served, "fallback": self.paths.fallback}[self.mode]

    @property
    def standalone_exe(self) -> Path:
        """Like `exe`, but for what the client hands to the standalone plugin by design (a closed standard
        descriptor, unreadable stdin) even when served: its standalone plugin is the real one."""
        assert self.paths is not None, "a Bed with CniPaths"
        return self.paths.launcher if self.mode == "inproc" else self.paths.fallback

    def env(self, command: str, **over: str) -> dict[str, str]:
        e = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": "some-container-id",
            "CNI_NETNS": "/run/netns/nonexistent",
            "CNI_IFNAME": "eth0",
            "CNI_PATH": f"/nonexistent:{self.bin}",
            "FAKE_DIR": str(self.fake),
            "FAKE_VERSIONS": self.versions,
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "FLANNEL_CNI_SOCKET": self.socket,
        }
        e.update(over)
        return {k: v for k, v in e.items() if v != "<unset>"}

    def run(self, command: str, conf: dict[str, Any] | bytes | None, **over: str) -> tuple[int, Any, str]:
        data = conf if isinstance(conf, bytes) else b"" if conf is None else json.dumps(conf).encode()
        if self.mode == "inproc":
            out, err = io.BytesIO(), io.StringIO()
            rc = plugin.run(self.env(command, **over), io.BytesIO(data), out, err)
            raw, text = out.getvalue(), err.getvalue()
        else:
            rc, raw, errb = self.exec(self.env(command, **over), data)
            text = errb.decode("utf-8", "surrogateescape")
        return rc, (json.loads(raw) if raw.strip() else None), text

    def exec(self, env: dict[str, str] | dict[bytes, bytes], stdin: bytes) -> tuple[int, bytes, bytes]:
        """This mode's executable with `env` and `stdin`, from / (as the CNI server runs): (rc, stdout, stderr)."""
        p = subprocess.run([str(self.exe)], input=stdin, env=env, capture_output=True, timeout=60, cwd="/")
        assert p.returncode != TRIPWIRE, p.stderr.decode(errors="replace")
        return p.returncode, p.stdout, p.stderr

    def calls(self) -> list[str]:
        p = self.fake / "calls"
        return p.read_text().split("\n")[:-1] if p.exists() else []

    def delegate_in(self, command: str) -> bytes:
        return (self.fake / f"{command}.in").read_bytes()

    def stored(self, cid: str = "some-container-id") -> Path:
        return self.data_dir / cid


@pytest.fixture(params=MODES)
def bed(request: pytest.FixtureRequest, tmp_path: Path, cni_paths: CniPaths) -> Bed:
    return Bed(tmp_path, request.param, cni_paths)


# ---- upstream vectors -------------------------------------------------------------------------------------

EXPECTED_IPV4 = (
    b'{"ipMasq":false,"ipam":{"ranges":[[{"subnet":"10.1.17.0/24"}]],"routes":[{"dst":"10.1.0.0/16"}],'
    b'"type":"host-local"},"isGateway":true,"mtu":1472,"name":"cni-flannel","type":"bridge"}'
)


def test_wire_example_byte_identical(bed: Bed) -> None:
    bed.write_env(IPV4_ENV)
    rc, res, _ = bed.run("ADD", bed.conf())
    assert rc == 0, res
    assert bed.stored().read_bytes() == EXPECTED_IPV4
    assert bed.delegate_in("ADD") == EXPECTED_IPV4
    assert res["ips"][0]["address"] == "10.1.17.2/24"
    assert bed.calls() == ["ADD some-container-id eth0"]


@pytest.mark.parametrize(
    ("env", "ranges", "routes", "nips"),
    [
        (IPV4_ENV, [[{"subnet": "10.1.17.0/24"}]], [{"dst": "10.1.0.0/16"}], 1),
        (IPV6_ENV, [[{"subnet": "fc00::/64"}]], [{"dst": "fc00::/48"}], 1),
        (
            DUAL_ENV,
            [[{"subnet": "10.1.17.0/24"}], [{"subnet": "fc00::/64"}]],
            [{"dst": "10.1.0.0/16"}, {"dst": "fc00::/48"}],
            2,
        ),
        (MULTI_ENV, [[{"subnet": "10.1.17.0/24"}]], [{"dst": "10.1.0.0/16"}, {"dst": "192.168.0.0/16"}], 1),
    ],
    ids=["ipv4", "ipv6", "dual-stack", "ipv4-two-networks"],
)
def test_lifecycle_vectors(bed: Bed, env: str, ranges: Any, routes: Any, nips: int) -> None:
    bed.write_env(env)
    rc, _, _ = bed.run("ADD", bed.conf())
    assert rc == 0
    stored = bed.stored().read_bytes()
    expected = {
        "ipMasq": False,
        "ipam": {"ranges": ranges, "routes": routes, "type": "host-local"},
        "isGateway": True,
        "mtu": 1472,
        "name": "cni-flannel",
        "type": "bridge",
    }
    assert json.loads(stored) == expected
    assert stored == json.dumps(expected, sort_keys=True, separators=(",", ":")).encode()
    assert len(json.loads(stored)["ipam"]["ranges"]) == nips
    # DEL works from the stored file alone, removes it, and a second DEL succeeds.
    bed.subnet_file.unlink()
    rc, res, _ = bed.run("DEL", bed.conf())
    assert (rc, res) == (0, None)
    assert bed.delegate_in("DEL") == stored
    assert not bed.stored().exists()
    rc, res, _ = bed.run("DEL", bed.conf())
    assert (rc, res) == (0, None)
    assert bed.calls() == ["ADD some-container-id eth0", "DEL some-container-id eth0"]


def test_subnet_env_parse_vectors(tmp_path: Path) -> None:
    f = tmp_path / "s.env"
    f.write_text(DUAL_ENV)
    se = cniconf.load_subnet_env(str(f))
    assert (se.networks, se.subnet, se.ipv6_networks, se.ipv6_subnet) == (
        ["10.1.0.0/16"],
        "10.1.17.0/24",
        ["fc00::/48"],
        "fc00::/64",
    )
    assert (se.mtu, se.ipmasq) == (1472, True)
    f.write_text("FLANNEL_NETWORK=10.1.0.0/16,192.168.0.0/16,10.1.0.0/16\n" + IPV4_ENV.split("\n", 2)[2])
    assert cniconf.load_subnet_env(str(f)).networks == ["10.1.0.0/16", "192.168.0.0/16"]


def test_missing_flannel_vars_error(bed: Bed) -> None:
    bed.write_env("foo=bar")
    with pytest.raises(cniconf.SubnetEnvError, match="missing FLANNEL_NETWORK, FLANNEL_IPV6_NETWORK, FLANNEL_SUBNET, "):
        cniconf.load_subnet_env(str(bed.subnet_file))
    rc, res, _ = bed.run("ADD", bed.conf())
    assert rc == 1
    assert res["code"] == 999
    assert res["msg"] == (
        f"loadFlannelSubnetEnv failed: {bed.subnet_file} is missing FLANNEL_NETWORK, FLANNEL_IPV6_NETWORK, "
        "FLANNEL_SUBNET, FLANNEL_IPV6_SUBNET, FLANNEL_MTU, FLANNEL_IPMASQ"
    )
    assert not bed.data_dir.exists()
    assert bed.calls() == []


def test_defaults_subnet_file_and_data_dir() -> None:
    n = cniconf.load_netconf({"name": "cni-flannel", "type": "flannel"})
    assert (n.subnet_file, n.data_dir) == ("/run/flannel/subnet.env", "/var/lib/cni/flannel")
    # Go decodes struct fields case-insensitively.
    n = cniconf.load_netconf({"name": "x", "SubnetFile": "/a", "DATADIR": "/b"})
    assert (n.subnet_file, n.data_dir) == ("/a", "/b")


INPUT_ROUTES = [{"dst": "10.96.0.0/12"}, {"dst": "192.168.244.0/24", "gw": "10.1.17.20"}]


@pytest.mark.parametrize(
    ("env", "ipam_type", "ranges", "pod_routes"),
    [
        (IPV4_ENV, "my-ipam", [[{"subnet": "10.1.17.0/24"}]], [{"dst": "10.1.0.0/16"}]),
        (IPV6_ENV, "my-ipam", [[{"subnet": "fc00::/64"}]], [{"dst": "fc00::/48"}]),
        (
            DUAL_ENV,
            "my-ipam",
            [[{"subnet": "10.1.17.0/24"}], [{"subnet": "fc00::/64"}]],
            [{"dst": "10.1.0.0/16"}, {"dst": "fc00::/48"}],
        ),
        (IPV4_ENV, "", [[{"subnet": "10.1.17.0/24"}]], [{"dst": "10.1.0.0/16"}]),
        (IPV6_ENV, "", [[{"subnet": "fc00::/64"}]], [{"dst": "fc00::/48"}]),
        (
            DUAL_ENV,
            "",
            [[{"subnet": "10.1.17.0/24"}], [{"subnet": "fc00::/64"}]],
            [{"dst": "10.1.0.0/16"}, {"dst": "fc00::/48"}],
        ),
    ],
    ids=["ipv4", "ipv6", "dual", "ipv4-no-type", "ipv6-no-type", "dual-no-type"],
)
def test_delegate_ipam_pass_through(bed: Bed, env: str, ipam_type: str, ranges: Any, pod_routes: Any) -> None:
    bed.write_env(env)
    ipam: dict[str, Any] = {"unknown-param": "unknown-value", "routes": INPUT_ROUTES}
    if ipam_type:
        ipam["type"] = ipam_type
    n = cniconf.load_netconf(bed.conf(ipam=ipam))
    got = cniconf.delegate_ipam(n, cniconf.load_subnet_env(str(bed.subnet_file)))
    assert json.loads(cniconf.go_json_ordered(got)) == {
        "type": ipam_type or "host-local",
        "unknown-param": "unknown-value",
        "routes": INPUT_ROUTES + pod_routes,
        "ranges": ranges,
    }


def test_two_networks_ipam_host_local(bed: Bed) -> None:
    bed.write_env(MULTI_ENV)
    n = cniconf.load_netconf(bed.conf(ipam={"type": "host-local", "unknown-param": "unknown-value", "routes": []}))
    got = cniconf.delegate_ipam(n, cniconf.load_subnet_env(str(bed.subnet_file)))
    assert got["routes"] == [{"dst": "10.1.0.0/16"}, {"dst": "192.168.0.0/16"}]
    assert got["ranges"] == [[{"subnet": "10.1.17.0/24"}]]


def test_routes_keep_go_struct_order(bed: Bed) -> None:
    bed.write_env(IPV4_ENV)
    routes = [{"priority": 5, "gw": "10.1.17.20", "dst": "192.168.244.9/24", "junk": 1, "mtu": 0, "table": 0}]
    rc, _, _ = bed.run("ADD", bed.conf(ipam={"routes": routes, "dataDir": "/x"}))
    assert rc == 0
    stored = bed.stored().read_bytes()
    assert (
        b'"routes":[{"dst":"192.168.244.9/24","gw":"10.1.17.20","priority":5,"table":0},{"dst":"10.1.0.0/16"}]'
        in stored
    )


def test_cni_version_copied_and_runtime_config(bed: Bed) -> None:
    bed.write_env(IPV4_ENV)
    rc, res, _ = bed.run(
        "ADD",
        bed.conf(
            cniVersion="0.3.1",
            delegate={"hairpinMode": True, "isDefaultGateway": True, "cniVersion": "9.9.9"},
            runtimeConfig={"portMappings": [{"hostPort": 80, "containerPort": 8080, "protocol": "tcp"}]},
        ),
    )
    assert rc == 0, res
    d = json.loads(bed.stored().read_bytes())
    assert d["cniVersion"] == "0.3.1"
    assert d["hairpinMode"] is True and d["isDefaultGateway"] is True
    assert d["runtimeConfig"] == {"portMappings": [{"hostPort": 80, "containerPort": 8080, "protocol": "tcp"}]}
    assert res["cniVersion"] == "0.3.1"


def test_non_bridge_delegate_has_no_is_gateway(bed: Bed) -> None:
    bed.write_env(IPV4_ENV)
    rc, _, _ = bed.run("ADD", bed.conf(delegate={"type": "ipvlan", "ipMasq": True, "mtu": 1400}))
    assert rc == 0
    d = json.loads(bed.stored().read_bytes())
    assert "isGateway" not in d
    assert (d["type"], d["ipMasq"], d["mtu"]) == ("ipvlan", True, 1400)


# What the reference bridge prints for a 1.0.0 ADD: types.Result.Print(), json.MarshalIndent with four spaces.
BRIDGE_100_RESULT = """{
    "cniVersion": "1.0.0",
    "interfaces": [
        {
            "name": "cni0",
            "mac": "5e:1b:0a:7f:3c:01"
        },
        {
            "name": "veth1a2b3c4d",
            "mac": "a2:3b:44:10:9e:7f"
        },
        {
            "name": "eth0",
            "mac": "36:7e:2f:1d:aa:02",
            "sandbox": "/var/run/netns/cni-1234"
        }
    ],
    "ips": [
        {
            "interface": 2,
            "address": "10.1.17.2/24",
            "gateway": "10.1.17.1"
        }
    ],
    "routes": [
        {
            "dst": "10.1.0.0/16"
        }
    ],
    "dns": {}
}"""


def test_v110_result_is_printed_as_upstream_does(bed: Bed) -> None:
    """Upstream's ADD ends with result.Print(): MarshalIndent of the 1.1.0 result, no trailing newline. The
    delegate answered 1.0.0 in that layout (the same Go struct), so only the version differs."""
    bed.write_env(IPV4_ENV)
    (bed.bin / "bridge").write_text(f"#!/bin/sh\ncat > /dev/null\ncat <<'EOF'\n{BRIDGE_100_RESULT}\nEOF\n")
    out = io.BytesIO()
    conf = json.dumps(bed.conf(cniVersion="1.1.0")).encode()
    assert plugin.run(bed.env("ADD"), io.BytesIO(conf), out, io.StringIO()) == 0
    expected = BRIDGE_100_RESULT.replace('"cniVersion": "1.0.0"', '"cniVersion": "1.1.0"').encode()
    assert out.getvalue() == expected
    # Go's escaping and empty containers: <>& as \u003c..., non-ASCII kept, [] and {} on one line.
    r = {"cniVersion": "1.1.0", "interfaces": [], "dns": {"domain": "a<b>&c", "search": ["é"]}, "x": 1.5}
    assert plugin._print_result(r) == (
        b'{\n    "cniVersion": "1.1.0",\n    "interfaces": [],\n    "dns": {\n'
        b'        "domain": "a\\u003cb\\u003e\\u0026c",\n        "search": [\n            "\xc3\xa9"\n'
        b'        ]\n    },\n    "x": 1.5\n}'
    )


def test_v110_talks_100_to_delegate_and_answers_110(bed: Bed) -> None:
    bed.write_env(IPV4_ENV)
    rc, res, _ = bed.run("ADD", bed.conf(cniVersion="1.1.0"))
    assert rc == 0, res
    assert res["cniVersion"] == "1.1.0"
    assert json.loads(bed.stored().read_bytes())["cniVersion"] == "1.1.0"
    assert json.loads(bed.delegate_in("ADD"))["cniVersion"] == "1.0.0"
    rc, _, _ = bed.run("DEL", bed.conf(cniVersion="1.1.0"))
    assert rc == 0
    assert json.loads(bed.delegate_in("DEL"))["cniVersion"] == "1.0.0"


def test_stored_file_modes(bed: Bed) -> None:
    bed.write_env(IPV4_ENV)
    assert bed.run("ADD", bed.conf())[0] == 0
    assert stat.S_IMODE(bed.data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(bed.stored().stat().st_mode) == 0o600
    assert sorted(os.listdir(bed.data_dir)) == ["some-container-id"]


def test_stored_file_in_missing_nested_data_dir(bed: Bed) -> None:
    """Parents are created as os.makedirs would (the plugin does without `os` for start-up time)."""
    bed.write_env(IPV4_ENV)
    nested = bed.tmp / "a" / "b" / "data"
    assert bed.run("ADD", bed.conf(dataDir=f"{nested}/"))[0] == 0
    assert stat.S_IMODE(nested.stat().st_mode) == 0o700
    assert (nested / "some-container-id").read_bytes() == EXPECTED_IPV4
    assert bed.run("DEL", bed.conf(dataDir=str(nested)))[0] == 0
    assert os.listdir(nested) == []
    (bed.tmp / "file").touch()
    rc, res, _ = bed.run("ADD", bed.conf(dataDir=str(bed.tmp / "file" / "data")))
    assert (rc, res["code"]) == (1, 999)
    assert res["msg"] == f"mkdir {bed.tmp / 'file'}: not a directory"  # os.MkdirAll's error, as upstream


@pytest.mark.parametrize(
    ("delegate", "msg"),
    [
        ({"name": "x"}, "'delegate' dictionary must not have 'name' field, it'll be set by flannel"),
        ({"ipam": {}}, "'delegate' dictionary must not have 'ipam' field, it'll be set by flannel"),
        ({"type": 5}, "'delegate' dictionary, if present, must have (string) 'type' field"),
    ],
)
def test_bad_delegate(bed: Bed, delegate: dict[str, Any], msg: str) -> None:
    """Plain errors in upstream's cmdAdd, which libcni's skel answers with code 999."""
    bed.write_env(IPV4_ENV)
    rc, res, _ = bed.run("ADD", bed.conf(delegate=delegate))
    assert (rc, res["code"], res["msg"]) == (1, 999, msg)
    assert not bed.data_dir.exists()
    assert bed.calls() == []


def test_delegate_add_failure_passes_error_and_keeps_file(bed: Bed) -> None:
    bed.write_env(IPV4_ENV)
    (bed.fake / "fail_ADD").touch()
    rc, res, _ = bed.run("ADD", bed.conf())
    assert rc == 1
    assert (res["code"], res["msg"], res["details"]) == (11, "fake ADD failure", "from the fake")
    # The runtime follows a failed ADD with DEL, which needs the stored config to undo partial work.
    assert bed.stored().read_bytes() == EXPECTED_IPV4


def test_delegate_missing(bed: Bed) -> None:
    bed.write_env(IPV4_ENV)
    rc, res, _ = bed.run("ADD", bed.conf(delegate={"type": "nosuch"}))
    assert (rc, res["code"]) == (1, 999)
    assert res["msg"] == f'failed to delegate add: failed to find plugin "nosuch" in path [/nonexistent {bed.bin}]'


def _fsync_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.mark.parametrize("earlier", [None, b'{"type":"bridge","name":"an earlier ADD"}'])
def test_add_syncs_the_stored_config_while_the_delegate_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, earlier: bytes | None
) -> None:
    """The stored config is made durable while the delegate starts, and the delegate gets its config only
    after every fsync: in each, the fake delegate has started (its shell has opened ADD.in) but has read
    nothing. A new container's file is written in place and synced once; over an earlier ADD's file, a
    temporary file is synced, renamed over it, then dataDir is synced."""
    bed = Bed(tmp_path)
    bed.write_env(IPV4_ENV)
    if earlier is not None:
        bed.data_dir.mkdir(mode=0o700)
        bed.stored().write_bytes(earlier)
    seen: list[tuple[str, bytes | None, bytes | None]] = []
    real_fsync = plugin.posix.fsync
    got = bed.fake / "ADD.in"

    def fsync(fd: int) -> None:
        real_fsync(fd)
        deadline = time.monotonic() + 10
        while not got.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # a delegate that had its config would have copied it by now
        stored = bed.stored().read_bytes() if bed.stored().exists() else None
        seen.append((_fsync_path(fd), stored, got.read_bytes() if got.exists() else None))

    monkeypatch.setattr(plugin.posix, "fsync", fsync)
    rc, res, _ = bed.run("ADD", bed.conf())
    assert (rc, res["ips"][0]["address"]) == (0, "10.1.17.2/24")
    if earlier is None:
        assert seen == [(str(bed.stored()), EXPECTED_IPV4, b"")]
    else:
        assert len(seen) == 2, seen
        (tmp, stored_then, read_then), last = seen
        assert os.path.dirname(tmp) == str(bed.data_dir) and os.path.basename(tmp).startswith(".tmp")
        assert (stored_then, read_then) == (earlier, b"")  # renamed only once the data is on disk
        assert last == (str(bed.data_dir), EXPECTED_IPV4, b"")
    assert bed.delegate_in("ADD") == EXPECTED_IPV4 == bed.stored().read_bytes()
    assert [p.name for p in bed.data_dir.iterdir()] == [bed.stored().name]


@pytest.mark.parametrize("earlier", [None, b'{"type":"bridge","name":"an earlier ADD"}'])
def test_add_write_failure_leaves_the_stored_file_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, earlier: bytes | None
) -> None:
    """A full disk while the config is written: ADD's error names the stored file, the delegate is never
    run, and dataDir holds what it held (a new container's half-written file is removed)."""
    bed = Bed(tmp_path)
    bed.write_env(IPV4_ENV)
    if earlier is not None:
        bed.data_dir.mkdir(mode=0o700)
        bed.stored().write_bytes(earlier)
    real_write = plugin.posix.write

    def write(fd: int, data: bytes) -> int:
        if os.path.dirname(_fsync_path(fd)) == str(bed.data_dir):
            real_write(fd, bytes(data[:3]))
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(plugin.posix, "write", write)
    rc, res, _ = bed.run("ADD", bed.conf())
    assert (rc, res["code"], res["msg"]) == (1, 999, f"write {bed.stored()}: no space left on device")
    assert {p.name: p.read_bytes() for p in bed.data_dir.iterdir()} == (
        {} if earlier is None else {"some-container-id": earlier}
    )
    assert bed.calls() == []


@pytest.mark.parametrize("delegate", ["bridge", "nosuch"])
@pytest.mark.parametrize("earlier", [None, b'{"type":"bridge","name":"an earlier ADD"}'])
def test_add_sync_failure_keeps_the_stored_file_and_the_delegate_does_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, delegate: str, earlier: bytes | None
) -> None:
    """An fsync that fails (EIO) is ADD's error, before a missing delegate's; the delegate, started and given
    nothing, is killed; the stored file is as it was (none, or an earlier ADD's, which its DEL needs) and no
    temporary file is left."""
    bed = Bed(tmp_path)
    bed.write_env(IPV4_ENV)
    if earlier is not None:
        bed.data_dir.mkdir(mode=0o700)
        bed.stored().write_bytes(earlier)

    def fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(plugin.posix, "fsync", fsync)
    rc, res, _ = bed.run("ADD", bed.conf(delegate={"type": delegate}))
    assert (rc, res["code"], res["msg"]) == (1, 999, f"sync {bed.stored()}: input/output error")
    assert {p.name: p.read_bytes() for p in bed.data_dir.iterdir()} == (
        {} if earlier is None else {"some-container-id": earlier}
    )
    time.sleep(0.3)  # a delegate that had been given its config would have recorded the call by now
    assert bed.calls() == []
    assert not (bed.fake / "ADD.in").exists() or bed.delegate_in("ADD") == b""


# ---- DEL ----------------------------------------------------------------------------------------------------


def test_del_failure_keeps_stored_file(bed: Bed) -> None:
    bed.write_env(IPV4_ENV)
    assert bed.run("ADD", bed.conf())[0] == 0
    (bed.fake / "fail_DEL").touch()
    rc, res, _ = bed.run("DEL", bed.conf())
    assert (rc, res["code"], res["msg"]) == (1, 11, "fake DEL failure")
    assert bed.stored().read_bytes() == EXPECTED_IPV4
    (bed.fake / "fail_DEL").unlink()
    assert bed.run("DEL", bed.conf())[0] == 0
    assert not bed.stored().exists()


@pytest.mark.parametrize(
    "content", [b"", b"{not json", b"[1,2]", b'{"name":"x"}'], ids=["empty", "corrupt", "array", "notype"]
)
def test_del_unusable_stored_file_succeeds(bed: Bed, content: bytes) -> None:
    bed.data_dir.mkdir(mode=0o700)
    bed.stored().write_bytes(content)
    rc, res, _ = bed.run("DEL", bed.conf())
    assert (rc, res) == (0, None)
    assert bed.calls() == []
    assert not bed.stored().exists()


def test_del_without_netns_and_without_subnet_env(bed: Bed) -> None:
    bed.write_env(IPV4_ENV)
    assert bed.run("ADD", bed.conf())[0] == 0
    bed.subnet_file.unlink()
    rc, _, _ = bed.run("DEL", bed.conf(), CNI_NETNS="<unset>")
    assert rc == 0
    assert not bed.stored().exists()


# ---- CHECK / STATUS / GC / VERSION ----------------------------------------------------------------------------


def test_check_forwards_stored_config_with_prev_result(bed: Bed) -> None:
    bed.write_env(IPV4_ENV)
    assert bed.run("ADD", bed.conf(cniVersion="1.0.0"))[0] == 0
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "10.1.17.2/24"}]}
    rc, res, _ = bed.run("CHECK", bed.conf(cniVersion="1.0.0", prevResult=prev))
    assert (rc, res) == (0, None)
    got = json.loads(bed.delegate_in("CHECK"))
    assert got["prevResult"] == prev
    assert got["ipam"]["ranges"] == [[{"subnet": "10.1.17.0/24"}]]
    rc, res, _ = bed.run("CHECK", bed.conf(cniVersion="1.0.0", prevResult=prev), CNI_CONTAINERID="other")
    assert (rc, res["code"]) == (1, 3)


def test_check_below_040_refused(bed: Bed) -> None:
    rc, res, _ = bed.run("CHECK", bed.conf(cniVersion="0.3.1"))
    assert (rc, res["code"], res["msg"]) == (1, 1, "config version does not allow CHECK")


def test_status(bed: Bed) -> None:
    rc, res, _ = bed.run("STATUS", bed.conf(cniVersion="1.1.0"))
    assert (rc, res["code"]) == (1, 50)
    bed.write_env(IPV4_ENV)
    rc, res, _ = bed.run("STATUS", bed.conf(cniVersion="1.1.0"))
    assert (rc, res) == (0, None)
    assert [c.split()[0] for c in bed.calls()] == ["VERSION"]  # the fake speaks up to 1.0.0: no STATUS forwarded
    bed.versions = '"1.0.0","1.1.0"'
    (bed.fake / "fail_STATUS").touch()
    rc, res, _ = bed.run("STATUS", bed.conf(cniVersion="1.1.0"))
    assert (rc, res["code"]) == (1, 11)
    rc, res, _ = bed.run("STATUS", bed.conf(cniVersion="1.0.0"))
    assert (rc, res["code"], res["msg"]) == (1, 1, "config version does not allow STATUS")


def test_gc_forwards_and_collects_stale_stored_configs(bed: Bed) -> None:
    bed.write_env(IPV4_ENV)
    for cid in ("keep-me", "stale-one"):
        assert bed.run("ADD", bed.conf(cniVersion="1.1.0"), CNI_CONTAINERID=cid)[0] == 0
    bed.versions = '"1.0.0","1.1.0"'
    valid = [{"containerID": "keep-me", "ifname": "eth0"}]
    rc, res, _ = bed.run("GC", bed.conf(cniVersion="1.1.0", **{"cni.dev/valid-attachments": valid}))
    assert (rc, res) == (0, None)
    got = json.loads(bed.delegate_in("GC"))
    assert got["cni.dev/valid-attachments"] == valid
    assert got["cniVersion"] == "1.1.0"
    assert sorted(os.listdir(bed.data_dir)) == ["keep-me"]


def test_gc_with_old_delegate_keeps_everything(bed: Bed) -> None:
    bed.write_env(IPV4_ENV)
    assert bed.run("ADD", bed.conf(cniVersion="1.1.0"), CNI_CONTAINERID="stale")[0] == 0
    rc, _, _ = bed.run("GC", bed.conf(cniVersion="1.1.0", **{"cni.dev/valid-attachments": []}))
    assert rc == 0
    assert os.listdir(bed.data_dir) == ["stale"]
    assert "GC" not in [c.split()[0] for c in bed.calls()]


def test_version_and_about(bed: Bed) -> None:
    rc, res, _ = bed.run("VERSION", b"garbage is not read")
    assert rc == 0
    assert res == {"cniVersion": "1.1.0", "supportedVersions": list(cniconf.SUPPORTED_VERSIONS)}
    out, err = io.BytesIO(), io.StringIO()
    assert plugin.run({}, io.BytesIO(b""), out, err) == 0
    assert out.getvalue() == b""
    assert "CNI protocol versions supported: 0.1.0, 0.2.0, 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0" in err.getvalue()


# ---- the bad-input matrix -------------------------------------------------------------------------------------

GOOD = {"name": "cni-flannel", "type": "flannel", "cniVersion": "1.0.0"}


@pytest.mark.parametrize(
    ("command", "over", "stdin", "code", "msg"),
    [
        ("ADD", {"CNI_CONTAINERID": "<unset>"}, GOOD, 4, "required env variables [CNI_CONTAINERID] missing"),
        ("ADD", {"CNI_NETNS": "<unset>"}, GOOD, 4, "required env variables [CNI_NETNS] missing"),
        ("ADD", {"CNI_IFNAME": "<unset>"}, GOOD, 4, "required env variables [CNI_IFNAME] missing"),
        ("ADD", {"CNI_PATH": "<unset>"}, GOOD, 4, "required env variables [CNI_PATH] missing"),
        (
            "CHECK",
            {"CNI_NETNS": "<unset>", "CNI_PATH": "<unset>"},
            GOOD,
            4,
            "required env variables [CNI_NETNS,CNI_PATH] missing",
        ),
        ("DEL", {"CNI_IFNAME": "<unset>"}, GOOD, 4, "required env variables [CNI_IFNAME] missing"),
        ("GC", {"CNI_PATH": "<unset>"}, GOOD, 4, "required env variables [CNI_PATH] missing"),
        ("STATUS", {"CNI_PATH": "<unset>"}, GOOD, 4, "required env variables [CNI_PATH] missing"),
        ("ADD", {"CNI_CONTAINERID": "-leading-dash"}, GOOD, 4, "invalid characters in containerID"),
        ("ADD", {"CNI_CONTAINERID": "../../etc/passwd"}, GOOD, 4, "invalid characters in containerID"),
        ("DEL", {"CNI_CONTAINERID": "a/b"}, GOOD, 4, "invalid characters in containerID"),
        ("ADD", {"CNI_CONTAINERID": "with space"}, GOOD, 4, "invalid characters in containerID"),
        ("ADD", {"CNI_IFNAME": "a" * 16}, GOOD, 4, "interface name is too long"),
        ("ADD", {"CNI_IFNAME": ".."}, GOOD, 4, "interface name is . or .."),
        ("ADD", {"CNI_IFNAME": "eth/0"}, GOOD, 4, "interface name contains / or : or whitespace characters"),
        ("DEL", {"CNI_IFNAME": "eth:0"}, GOOD, 4, "interface name contains / or : or whitespace characters"),
        ("CHECK", {"CNI_IFNAME": "eth 0"}, GOOD, 4, "interface name contains / or : or whitespace characters"),
        ("FROB", {}, GOOD, 4, "unknown CNI_COMMAND: FROB"),
        ("ADD", {}, b"", 6, None),
        ("ADD", {}, b"{not json", 6, None),
        ("DEL", {}, b"[]", 6, None),
        ("ADD", {}, {"name": 5}, 6, None),
        ("ADD", {}, {**GOOD, "delegate": "bridge"}, 999, None),
        ("ADD", {}, {**GOOD, "cniVersion": 1}, 6, None),
        ("ADD", {}, {"type": "flannel"}, 7, "missing network name"),
        ("DEL", {}, {"name": "", "type": "flannel"}, 7, "missing network name"),
        ("ADD", {}, {"name": "bad name!", "type": "flannel"}, 7, "invalid characters found in network name"),
        ("ADD", {}, {**GOOD, "cniVersion": "2.0.0"}, 1, "incompatible CNI versions"),
        ("DEL", {}, {**GOOD, "cniVersion": "banana"}, 1, "incompatible CNI versions"),
        ("CHECK", {}, {**GOOD, "cniVersion": "banana"}, 6, None),
        ("GC", {}, {**GOOD, "cniVersion": "1.0.0"}, 1, "config version does not allow GC"),
    ],
)
def test_bad_input_matrix(bed: Bed, command: str, over: dict[str, str], stdin: Any, code: int, msg: str | None) -> None:
    bed.write_env(IPV4_ENV)
    if isinstance(stdin, dict):
        stdin = {**stdin, "subnetFile": str(bed.subnet_file), "dataDir": str(bed.data_dir)}
    rc, res, _ = bed.run(command, stdin, **over)
    assert rc == 1
    assert res["code"] == code, res
    if msg is not None:
        assert res["msg"] == msg
    assert "cniVersion" in res
    # Nothing touched: no stored config, no delegate run.
    assert not bed.data_dir.exists()
    assert bed.calls() == []


def test_subnet_env_missing_is_try_again_later(bed: Bed) -> None:
    rc, res, _ = bed.run("ADD", bed.conf(cniVersion="1.0.0"))
    assert (rc, res["code"]) == (1, 11)
    rc, res, _ = bed.run("ADD", bed.conf(cniVersion="0.3.1"))
    assert (rc, res["code"]) == (1, 999)
    assert not bed.data_dir.exists()


@pytest.mark.parametrize(
    "text",
    [
        "FLANNEL_NETWORK=10.1.0.0\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n",
        "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=-1\nFLANNEL_IPMASQ=true\n",
        "FLANNEL_NETWORK=10.1.0.0/16,bogus\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n",
    ],
)
def test_bad_subnet_env(bed: Bed, text: str) -> None:
    bed.write_env(text)
    rc, res, _ = bed.run("ADD", bed.conf())
    assert (rc, res["code"]) == (1, 999)
    assert not bed.data_dir.exists()


# ---- Go JSON compatibility ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"b": 1, "a": [True, None]}, b'{"a":[true,null],"b":1}'),
        ({"s": "<a&b>\u2028"}, b'{"s":"\\u003ca\\u0026b\\u003e\\u2028"}'),
        ({"s": "é\n\x01"}, '{"s":"é\\n\\u0001"}'.encode()),
        ({"f": 1.0, "g": 1.5, "h": 1e-7, "i": 1e21, "j": 0.000001}, b'{"f":1,"g":1.5,"h":1e-7,"i":1e+21,"j":0.000001}'),
        ({"big": 12345678901234567890}, b'{"big":12345678901234567000}'),
    ],
)
def test_go_json(value: Any, expected: bytes) -> None:
    assert cniconf.go_json(value) == expected


@pytest.mark.parametrize(
    "text",
    ["1.2.3.4", "0.0.0.0", "255.255.255.255", "10.244.1.1", "256.1.1.1", "01.2.3.4", "00.1.1.1", "1.2.3",
     "1.2.3.4.5", "1..3.4", " 1.2.3.4", "1.2.3.4 ", "\u0661.2.3.4", "+1.2.3.4", "1.2.3.0x1", "", "a.b.c.d", "1.2.3.-4"],
)  # fmt: skip
def test_ipv4_parsed_without_socket_like_inet_pton(text: str) -> None:
    try:
        ref: bytes | None = socket.inet_pton(socket.AF_INET, text)
    except OSError:
        ref = None
    if ref is None:
        with pytest.raises(ValueError):
            _fastjson.parse_ip(text)
    else:
        fam, packed = _fastjson.parse_ip(text)
        assert packed == ref
        assert _fastjson.format_ip(fam, packed) == socket.inet_ntop(socket.AF_INET, ref)


def test_ipv4_add_and_del_load_no_socket_module(bed: Bed) -> None:
    """_socket (0.3 ms of start-up) is for IPv6 addresses only."""
    bed.write_env(IPV4_ENV)
    root = str(Path(__file__).resolve().parents[1])
    code = (
        f"import sys, io, json; sys.path.insert(0, {root!r}); from pyflannel.cni import plugin; "
        "env = json.loads(sys.argv[1]); out = io.BytesIO(); "
        "rc = plugin.run(env, io.BytesIO(sys.argv[2].encode()), out, sys.stderr); "
        "print(rc, '_socket' in sys.modules)"
    )
    conf = json.dumps(bed.conf())
    for cmd in ("ADD", "DEL"):
        p = subprocess.run(
            [sys.executable, "-I", "-S", "-c", code, json.dumps(bed.env(cmd)), conf],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert p.stdout.split() == ["0", "False"], p.stdout + p.stderr
    assert bed.calls() == ["ADD some-container-id eth0", "DEL some-container-id eth0"]


# ---- as an executable ------------------------------------------------------------------------------------------


def test_runs_as_executable(bed: Bed) -> None:
    """`python -m pyflannel.cni.plugin` speaks CNI over env/stdin/stdout/exit status."""
    bed.write_env(IPV4_ENV)
    env = bed.env("ADD")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    p = subprocess.run(
        [sys.executable, "-m", "pyflannel.cni.plugin"],
        input=json.dumps(bed.conf()).encode(),
        env=env,
        capture_output=True,
        timeout=30,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads(p.stdout)["ips"][0]["address"] == "10.1.17.2/24"
    env["CNI_COMMAND"] = "ADD"
    env["CNI_CONTAINERID"] = "bad/id"
    p = subprocess.run(
        [sys.executable, "-m", "pyflannel.cni.plugin"], input=b'{"name":"x"}', env=env, capture_output=True, timeout=30
    )
    assert p.returncode == 1
    assert json.loads(p.stdout)["code"] == 4
    p = subprocess.run(  # skel's order: the config's name is checked before the container ID
        [sys.executable, "-m", "pyflannel.cni.plugin"], input=b"{}", env=env, capture_output=True, timeout=30
    )
    assert (p.returncode, json.loads(p.stdout)["code"]) == (1, 7)


def test_plugin_imports_only_stdlib() -> None:
    """The per-pod executable must not pull in anything outside the standard library (or pyflannel.cni)."""
    root = str(Path(__file__).resolve().parents[1])
    code = (
        f"import sys; sys.path.insert(0, {root!r}); before=set(sys.modules); import pyflannel.cni.plugin; "
        "print('\\n'.join(sorted(set(sys.modules)-before)))"
    )
    p = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    mods = [m for m in p.stdout.split() if m]
    third_party = [m for m in mods if m.split(".")[0] not in sys.stdlib_module_names and not m.startswith("pyflannel")]
    assert third_party == []
    ours = {"pyflannel", "pyflannel.cni", "pyflannel.cni.conf", "pyflannel.cni.plugin", "pyflannel.cni._fastjson"}
    assert {m for m in mods if m.startswith("pyflannel")} <= ours
    for heavy in ("subprocess", "logging", "typing", "dataclasses", "asyncio", "json", "re", "ipaddress", "enum"):
        assert heavy not in mods, heavy
    # Lighter, but still a measurable part of every start (os: 1.6 ms); _socket is loaded by ADD only.
    for light in ("os", "__future__", "_socket"):
        assert light not in mods, light
