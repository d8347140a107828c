"""The plugin's error answers (issue 11): never a traceback or an empty stdout, upstream's codes, Go's wording.

Each case of the robustness report is here, in-process (plugin.run) and, for what only an executable can be
given (bytes in the environment), through the launcher the runtime execs; each `bed` in test_cni_plugin's three
modes (in-process, the client served by a CNI server, the client falling back), `flannel_exe` the mode's
executable.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_cni_plugin import IPV4_ENV, MODES, TRIPWIRE, Bed, CniPaths
from test_cni_plugin import cni_paths as cni_paths  # the session's fixture

from pyflannel.cni import _fastjson, _goerr, plugin
from pyflannel.cni import conf as cniconf

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=MODES)
def bed(request: pytest.FixtureRequest, tmp_path: Path, cni_paths: CniPaths) -> Bed:
    b = Bed(tmp_path, request.param, cni_paths)
    b.write_env(IPV4_ENV)
    return b


@pytest.fixture
def flannel_exe(bed: Bed) -> Path:
    """The plugin executable of the bed's mode (as setup.sh installs them: the client, or its Python launcher)."""
    return bed.exe


def run_exe(exe: Path, env: dict[bytes, bytes], stdin: bytes) -> tuple[int, bytes, bytes]:
    p = subprocess.run([str(exe)], input=stdin, env=env, capture_output=True, timeout=30, cwd="/")
    assert p.returncode != TRIPWIRE, p.stderr.decode(errors="replace")
    return p.returncode, p.stdout, p.stderr


def error_of(rc: int, out: bytes, err: bytes = b"") -> dict[str, Any]:
    assert rc == 1, (out, err)
    assert b"Traceback" not in err, err.decode(errors="replace")
    assert out.strip(), "an error must be CNI error JSON on stdout"
    e = json.loads(out.decode("utf-8"))  # valid UTF-8, always
    assert isinstance(e["code"], int) and isinstance(e["msg"], str)
    assert "internal error (" not in e["msg"], e  # plugin.run's last resort: a case nobody handled
    assert "[Errno" not in e["msg"] + e.get("details", ""), e  # Go's wording, not Python's
    return e


def benv(bed: Bed, command: bytes, **over: bytes) -> dict[bytes, bytes]:
    e = {k.encode(): v.encode() for k, v in bed.env(command.decode()).items()}
    e.update({k.encode(): v for k, v in over.items()})
    return e


# ---- lone surrogates and undecodable bytes in what an error message quotes -----------------------------------


@pytest.mark.parametrize(
    ("stdin", "code", "msg"),
    [
        (rb'{"cniVersion":"1.0.0","name":"\udc80"}', 7, "invalid characters found in network name"),
        (rb'{"cniVersion":"\udc80","name":"a"}', 1, "incompatible CNI versions"),
    ],
)
def test_lone_surrogate_in_netconf(bed: Bed, flannel_exe: Path, stdin: bytes, code: int, msg: str) -> None:
    """Go decodes an escaped lone surrogate as U+FFFD: the message quotes that, valid UTF-8."""
    e = error_of(*run_exe(flannel_exe, benv(bed, b"ADD"), stdin))
    assert (e["code"], e["msg"]) == (code, msg)
    assert "\ufffd" in e["details"]


def test_reproducer_from_the_issue(bed: Bed, flannel_exe: Path) -> None:
    env = {b"CNI_COMMAND": b"ADD", b"CNI_CONTAINERID": b"abc", b"CNI_NETNS": b"/x", b"CNI_IFNAME": b"eth0",
           b"CNI_PATH": b"/empty", b"FLANNEL_CNI_SOCKET": bed.socket.encode()}  # fmt: skip
    e = error_of(*run_exe(flannel_exe, env, b'{"cniVersion":"1.0.0","name":"\\udc80"}\n'))
    assert e == {
        "cniVersion": "1.1.0",  # the config's version is not known yet when the name is checked
        "code": 7,
        "msg": "invalid characters found in network name",
        "details": "\ufffd",
    }


@pytest.mark.parametrize("var", [b"CNI_CONTAINERID", b"CNI_COMMAND"])
def test_byte_ff_in_env(bed: Bed, flannel_exe: Path, var: bytes) -> None:
    """A byte that is not UTF-8 comes out as Go's encoder writes it: the escape \\ufffd."""
    rc, out, err = run_exe(flannel_exe, benv(bed, b"ADD", **{var.decode(): b"a\xff"}), json.dumps(bed.conf()).encode())
    e = error_of(rc, out, err)
    assert e["code"] == 4
    assert b"\\ufffd" in out
    assert not bed.data_dir.exists()


def test_non_utf8_subnet_env(bed: Bed, flannel_exe: Path) -> None:
    bed.subnet_file.write_bytes(IPV4_ENV.replace("10.1.0.0/16", "10.1.0.0/16\xff").encode("latin-1"))
    e = error_of(*run_exe(flannel_exe, benv(bed, b"ADD"), json.dumps(bed.conf()).encode()))
    assert (e["code"], e["msg"]) == (999, "loadFlannelSubnetEnv failed: invalid CIDR address: 10.1.0.0/16\ufffd")


@pytest.mark.parametrize(
    ("name", "code", "msg"),
    [
        ("\\udc80", 11, "loadFlannelSubnetEnv failed: open {dir}/\ufffd: no such file or directory"),
        ("\\ud800", 11, "loadFlannelSubnetEnv failed: open {dir}/\ufffd: no such file or directory"),
        ("\\u0000", 999, "loadFlannelSubnetEnv failed: open {dir}/\x00: invalid argument"),
    ],
)
def test_odd_subnet_file_names(bed: Bed, flannel_exe: Path, name: str, code: int, msg: str) -> None:
    conf = json.dumps(bed.conf(cniVersion="1.0.0")).replace(str(bed.subnet_file), f"{bed.tmp}/{name}")
    e = error_of(*run_exe(flannel_exe, benv(bed, b"ADD"), conf.encode()))
    assert (e["code"], e["msg"]) == (code, msg.format(dir=bed.tmp))


# ---- what used to be code 999 with a Python exception -----------------------------------------------------------


def test_deep_stdin_is_a_decode_error(bed: Bed, flannel_exe: Path) -> None:
    for deep in (b"[" * 100_000, b'{"a":' * 100_000, b'{"name":"x","delegate":' + b"[" * 600 + b"]" * 600 + b"}"):
        e = error_of(*run_exe(flannel_exe, benv(bed, b"ADD"), deep))
        assert e["code"] == 6
        assert e["msg"].startswith("error unmarshall network config: invalid character ")
        assert e["msg"].endswith(" exceeded max depth")
    # 512 levels are fine, in-process too (the test's own stack is deeper than the executable's).
    nested: Any = 1
    floats: Any = 1.5  # through the pure-Python encoder (non-integral numbers)
    for _ in range(_fastjson.MAX_DEPTH - 2):
        nested, floats = [nested], [floats]
    rc, res, _ = bed.run("ADD", bed.conf(delegate={"x": nested, "y": floats}))
    assert rc == 0, res


def test_huge_mtu(bed: Bed) -> None:
    bed.write_env(IPV4_ENV.replace("FLANNEL_MTU=1472", "FLANNEL_MTU=" + "9" * 5000))
    rc, res, _ = bed.run("ADD", bed.conf())
    assert (rc, res["code"]) == (1, 999)
    assert res["msg"] == f'loadFlannelSubnetEnv failed: strconv.ParseUint: parsing "{"9" * 5000}": value out of range'


@pytest.mark.parametrize(
    ("extra", "literal", "field"),
    [
        ({"delegate": {"x": "BIG"}}, "1" + "0" * 400, "delegate"),
        ({"ipam": {"routes": [{"dst": "10.9.0.0/16", "table": "BIG"}]}}, "1" + "0" * 400, "ipam"),
        ({"ipam": {"routes": [{"dst": "10.9.0.0/16", "mtu": "BIG"}]}}, "1e400", "ipam"),
        ({"runtimeConfig": {"x": ["BIG"]}}, "-2e308", "runtimeConfig"),
    ],
)
def test_numbers_beyond_float64(bed: Bed, extra: dict[str, Any], literal: str, field: str) -> None:
    stdin = json.dumps(bed.conf(**extra)).replace('"BIG"', literal).encode()
    rc, res, _ = bed.run("ADD", stdin)
    assert (rc, res["code"]) == (1, 999)
    assert res["msg"] == (
        f"loadFlannelNetConf failed: failed to load netconf: json: cannot unmarshal number {literal} "
        f"into Go struct field NetConf.{field} of type float64"
    )
    assert not bed.data_dir.exists()


def test_route_integers_through_float64(bed: Bed) -> None:
    """ipam.routes goes through float64 and back into Go ints: a fraction or more than int64 is an error."""
    for value, text in ((1.5, "1.5"), (12345678901234567890, "12345678901234567000"), (1e21, "1e+21")):
        rc, res, _ = bed.run("ADD", bed.conf(ipam={"routes": [{"dst": "10.9.0.0/16", "mtu": value}]}))
        assert (rc, res["code"]) == (1, 999)
        assert res["msg"] == (
            "failed to assemble Delegate IPAM: failed to read IPAM routes: failed to parse ipam.routes: "
            f"json: cannot unmarshal number {text} into Go struct field route.mtu of type int"
        )
    rc, _, _ = bed.run("ADD", bed.conf(ipam={"routes": [{"dst": "10.9.0.0/16", "priority": 2**53 + 1}]}))
    assert rc == 0
    assert b'{"dst":"10.9.0.0/16","priority":9007199254740992}' in bed.stored().read_bytes()
    # The same float64 text in a delegate key (json.Marshal of an interface{} number).
    assert bed.run("ADD", bed.conf(delegate={"x": 2**53 + 1, "y": [[[0.5]]] * 2}))[0] == 0
    assert b'"x":9007199254740992,"y":[[[0.5]],[[0.5]]]' in bed.stored().read_bytes()


# ---- DEL is tolerant -------------------------------------------------------------------------------------------------


def test_del_with_a_container_id_too_long_for_a_file_name(bed: Bed) -> None:
    bed.data_dir.mkdir()
    rc, res, _ = bed.run("DEL", bed.conf(), CNI_CONTAINERID="a" * 256)
    assert (rc, res) == (0, None)
    rc, res, _ = bed.run("ADD", bed.conf(), CNI_CONTAINERID="a" * 256)  # ADD says why, as upstream does
    assert (rc, res["code"], res["msg"]) == (1, 999, f"open {bed.data_dir}/{'a' * 256}: file name too long")
    assert os.listdir(bed.data_dir) == []


def test_del_with_a_data_dir_that_is_a_file(bed: Bed) -> None:
    bed.data_dir.write_text("not a directory")
    rc, res, _ = bed.run("DEL", bed.conf())
    assert (rc, res) == (0, None)
    assert bed.data_dir.read_text() == "not a directory"
    rc, res, _ = bed.run("ADD", bed.conf())
    assert (rc, res["code"], res["msg"]) == (1, 999, f"mkdir {bed.data_dir}: not a directory")


def test_add_with_a_long_but_valid_container_id(bed: Bed) -> None:
    """The temporary file's name does not grow with the ID: 255 characters still fit."""
    assert bed.run("ADD", bed.conf(), CNI_CONTAINERID="b" * 255)[0] == 0
    assert os.listdir(bed.data_dir) == ["b" * 255]


# ---- Go's text for IPv6 ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("network", "expected"),
    [
        ("::1:0/112", "::1:0/112"),  # inet_ntop: ::0.1.0.0/112
        ("::ffff:10.1.0.0/112", "10.1.0.0/16"),  # IPv4-mapped: Go prints the IPv4 network
        ("fc00:0:0:1::/64", "fc00:0:0:1::/64"),
        ("1:0:0:2:0:0:0:3/128", "1:0:0:2::3/128"),  # the longest run of zero groups
        ("1:0:0:2:0:0:3:4/128", "1::2:0:0:3:4/128"),  # the first of two as long
        ("1:0:2:3:4:5:6:7/128", "1:0:2:3:4:5:6:7/128"),  # one zero group stays
    ],
)
def test_ipv6_networks_as_go_prints_them(bed: Bed, network: str, expected: str) -> None:
    bed.write_env(
        f"FLANNEL_IPV6_NETWORK={network}\nFLANNEL_IPV6_SUBNET=fc00::1/64\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n"
    )
    assert bed.run("ADD", bed.conf())[0] == 0
    assert json.loads(bed.stored().read_bytes())["ipam"]["routes"] == [{"dst": expected}]


def test_ipv6_route_gateway_as_go_prints_it(bed: Bed) -> None:
    routes = [{"dst": "::1:0/112", "gw": "::0.1.0.1"}, {"dst": "::ffff:1.2.3.4/120", "gw": "::ffff:1.2.3.1"}]
    assert bed.run("ADD", bed.conf(ipam={"routes": routes}))[0] == 0
    assert json.loads(bed.stored().read_bytes())["ipam"]["routes"][:2] == [
        {"dst": "::1:0/112", "gw": "::1:1"},
        {"dst": "1.2.3.4/24", "gw": "1.2.3.1"},
    ]


# ---- upstream's codes and message context ---------------------------------------------------------------------------


ROUTES_CONTEXT = "failed to assemble Delegate IPAM: failed to read IPAM routes: failed to parse ipam.routes: "


@pytest.mark.parametrize(
    ("ipam", "msg"),
    [
        ({"routes": {"dst": "10.9.0.0/16"}}, "json: cannot unmarshal object into Go value of type []types.Route"),
        ({"routes": "10.9.0.0/16"}, "json: cannot unmarshal string into Go value of type []types.Route"),
        ({"routes": [5]}, "json: cannot unmarshal number into Go value of type types.route"),
        ({"routes": [{"dst": "10.9.0.0"}]}, "invalid CIDR address: 10.9.0.0"),
        ({"routes": [{"dst": 7}]}, "json: cannot unmarshal number into Go struct field route.dst of type string"),
        ({"routes": [{"dst": "10.9.0.0/16", "gw": "x"}]}, "invalid IP address: x"),
        ({"routes": [{"dst": "10.9.0.0/16", "gw": 1}]},
         "json: cannot unmarshal number into Go struct field route.gw of type net.IP"),
        # A returned error (the bad dst) wins over a saved one (the bool mtu), whatever the order.
        ({"routes": [{"mtu": True, "dst": "bad"}]}, "invalid CIDR address: bad"),
    ],
)  # fmt: skip
def test_ipam_routes_errors(bed: Bed, ipam: dict[str, Any], msg: str) -> None:
    rc, res, _ = bed.run("ADD", bed.conf(ipam=ipam))
    assert (rc, res["code"]) == (1, 999)
    assert (
        res["msg"]
        == "failed to assemble Delegate IPAM: failed to read IPAM routes: failed to parse ipam.routes: " + msg
    )
    assert not bed.data_dir.exists()


def test_route_gateway_empty_is_no_gateway(bed: Bed) -> None:
    assert bed.run("ADD", bed.conf(ipam={"routes": [{"dst": "10.9.0.0/16", "gw": ""}]}))[0] == 0
    assert b'"routes":[{"dst":"10.9.0.0/16"},' in bed.stored().read_bytes()


@pytest.mark.parametrize(
    ("stdin", "command", "code", "msg"),
    [
        (b'{"name":"x",}', "ADD", 6,
         "error unmarshall network config: invalid character '}' looking for beginning of object key string"),
        (b'{"name":"x"', "ADD", 6, "error unmarshall network config: unexpected end of JSON input"),
        (b'\xef\xbb\xbf{"name":"x"}', "ADD", 6,
         "error unmarshall network config: invalid character '\u00ef' looking for beginning of value"),
        (b'{"name":"x"} x', "DEL", 6, "error unmarshall network config: invalid character 'x' after top-level value"),
        (b'[1]', "ADD", 6, 'error unmarshall network config: json: cannot unmarshal array into Go value of type '
         'struct { Name string "json:\\"name\\"" }'),
        (b'{"name":5}', "ADD", 6,
         "error unmarshall network config: json: cannot unmarshal number into Go struct field .name of type string"),
        (b'{"name":"x","cniVersion":1}', "ADD", 6, "decoding version from network config: json: cannot unmarshal "
         "number into Go struct field .cniVersion of type string"),
        (b'null', "ADD", 7, "missing network name"),
        (b'{"name":"x","delegate":"bridge"}', "ADD", 999, "loadFlannelNetConf failed: failed to load netconf: json: "
         "cannot unmarshal string into Go struct field NetConf.delegate of type map[string]interface {}"),
        (b'{"name":"x","subnetFile":5}', "DEL", 999, "failed to load netconf: json: cannot unmarshal number into "
         "Go struct field NetConf.subnetFile of type string"),
        (b'{"name":"x","dns":{"domain":["a"]}}', "ADD", 999, "loadFlannelNetConf failed: failed to load netconf: "
         "json: cannot unmarshal array into Go struct field DNS.dns.domain of type string"),
        (b'{"name":"x","capabilities":{"portMappings":1}}', "ADD", 999, "loadFlannelNetConf failed: failed to load "
         "netconf: json: cannot unmarshal number into Go struct field NetConf.capabilities of type bool"),
        (b'{"name":"x","cniVersion":"1.x.0"}', "CHECK", 6, 'failed to convert minor version part "x": '
         'strconv.Atoi: parsing "x": invalid syntax'),
        (b'{"name":"x","cniVersion":"9.0.0"}', "CHECK", 1, "plugin version does not allow CHECK"),
    ],
)  # fmt: skip
def test_go_wording(bed: Bed, stdin: bytes, command: str, code: int, msg: str) -> None:
    rc, res, _ = bed.run(command, stdin)
    assert (rc, res["code"], res["msg"]) == (1, code, msg)


def test_subnet_env_missing_is_go_wording(bed: Bed) -> None:
    bed.subnet_file.unlink()
    rc, res, _ = bed.run("ADD", bed.conf(cniVersion="0.3.1"))
    msg = f"loadFlannelSubnetEnv failed: open {bed.subnet_file}: no such file or directory"
    assert (rc, res) == (1, {"cniVersion": "0.3.1", "code": 999, "msg": msg})


@pytest.mark.parametrize("text", ["FLANNEL_MTU\n", "FLANNEL_NETWORK=10.1.0.0/16\n" + "x" * 65536 + "\n"])
def test_subnet_env_where_go_panics_or_stops(bed: Bed, text: str) -> None:
    bed.write_env(text)
    rc, res, _ = bed.run("ADD", bed.conf())
    assert (rc, res["code"]) == (1, 999)
    assert res["msg"] in (
        f'loadFlannelSubnetEnv failed: {bed.subnet_file}: line "FLANNEL_MTU" has no value',
        "loadFlannelSubnetEnv failed: bufio.Scanner: token too long",
    )


def test_subnet_env_with_crlf_lines(bed: Bed) -> None:
    """bufio.ScanLines drops a \\r before the \\n."""
    bed.write_env(IPV4_ENV.replace("\n", "\r\n"))
    assert bed.run("ADD", bed.conf())[0] == 0


def test_subnet_env_that_is_not_a_regular_file(bed: Bed) -> None:
    fifo = bed.tmp / "fifo"
    os.mkfifo(fifo)
    for path in (str(fifo), "/dev/zero"):
        rc, res, _ = bed.run("ADD", bed.conf(subnetFile=path))
        assert (rc, res["code"], res["msg"]) == (
            1,
            999,
            f"loadFlannelSubnetEnv failed: open {path}: not a regular file",
        )


def test_delegate_errors_as_invoke_words_them(bed: Bed) -> None:
    fake = bed.bin / "odd"
    for out, msg in (
        ("", "netplugin failed with no error message: exit status 3"),
        ("not json", "netplugin failed but error parsing its diagnostic message \"not json\\n\": "
                     "invalid character 'o' in literal null (expecting 'u')"),
        ('{"code":1.5,"msg":"m"}', "netplugin failed but error parsing its diagnostic message "
                                   "\"{\\\"code\\\":1.5,\\\"msg\\\":\\\"m\\\"}\\n\": json: cannot unmarshal number "
                                   "1.5 into Go struct field Error.code of type uint"),
    ):  # fmt: skip
        fake.write_text(f"#!/bin/sh\ncat >/dev/null\n{'echo ' + repr(out) if out else ''}\nexit 3\n")
        fake.chmod(0o755)
        rc, res, _ = bed.run("ADD", bed.conf(delegate={"type": "odd"}))
        assert (rc, res["code"]) == (1, 999)
        assert res["msg"] == msg


# ---- the error JSON's layout and VERSION ----------------------------------------------------------------------------


def test_error_json_layout(bed: Bed) -> None:
    """libcni's types.Error.Print(): MarshalIndent with four spaces, no trailing newline; plus cniVersion."""
    out = io.BytesIO()
    rc = plugin.run(bed.env("ADD"), io.BytesIO(b'{"name":"bad name","cniVersion":"0.4.0"}'), out, io.StringIO())
    assert rc == 1
    assert out.getvalue() == (
        b'{\n    "cniVersion": "1.1.0",\n    "code": 7,\n    "msg": "invalid characters found in network name",\n'
        b'    "details": "bad name"\n}'
    )
    e = cniconf.CNIError(999, "<a & b>\u2028")
    assert (
        e.to_json("1.0.0")
        == b'{\n    "cniVersion": "1.0.0",\n    "code": 999,\n    "msg": "\\u003ca \\u0026 b\\u003e\\u2028"\n}'
    )


def test_version_output_ends_with_a_newline(bed: Bed) -> None:
    out = io.BytesIO()
    assert plugin.run({"CNI_COMMAND": "VERSION"}, io.BytesIO(b""), out, io.StringIO()) == 0
    assert out.getvalue() == (
        b'{"cniVersion":"1.1.0","supportedVersions":["0.1.0","0.2.0","0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]}\n'
    )


def test_closed_stdin_and_stdout(bed: Bed) -> None:
    """A runtime that leaves fd 0 or 1 closed gets an answer or an exit status, never a traceback. (The client
    hands these to the standalone plugin, served or not.)"""
    env = {k: v for k, v in bed.env("ADD").items()}
    flannel_exe = bed.standalone_exe
    p = subprocess.run([str(flannel_exe)], stdin=subprocess.DEVNULL, env=env, capture_output=True, timeout=30,
                       preexec_fn=lambda: os.close(0))  # fmt: skip
    assert p.returncode == 1 and json.loads(p.stdout)["code"] == 6  # no config: unexpected end of JSON input
    p = subprocess.run([str(flannel_exe)], input=json.dumps(bed.conf()).encode(), env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, timeout=30, preexec_fn=lambda: os.close(1))  # fmt: skip
    assert b"Traceback" not in p.stderr
    assert p.returncode in (0, 1)


def test_error_paths_need_no_import_on_success(bed: Bed) -> None:
    """_goerr (Go's texts) loads only when there is an error to word."""
    code = (
        f"import sys, io, json; sys.path.insert(0, {str(REPO)!r}); from pyflannel.cni import plugin; "
        "rc = plugin.run(json.loads(sys.argv[1]), io.BytesIO(sys.argv[2].encode()), io.BytesIO(), sys.stderr); "
        "print(rc, 'pyflannel.cni._goerr' in sys.modules)"
    )
    for cmd, conf, expected in (("ADD", bed.conf(), ["0", "False"]), ("DEL", bed.conf(), ["0", "False"]),
                                ("ADD", {"name": "x", "delegate": 1}, ["1", "False"]),
                                ("ADD", b"{", ["1", "True"])):  # fmt: skip
        stdin = conf.decode() if isinstance(conf, bytes) else json.dumps(conf)
        p = subprocess.run([sys.executable, "-I", "-S", "-c", code, json.dumps(bed.env(cmd)), stdin],
                           capture_output=True, text=True, timeout=30)  # fmt: skip
        assert p.stdout.split() == expected, p.stdout + p.stderr


def test_goerr_quote_like_strconv() -> None:
    assert _goerr.quote('a"b\\c\n\x00\x7f\u00a0\u00e9\U0001f600\udcff') == '"a\\"b\\\\c\\n\\x00\\x7f\\u00a0é😀\\xff"'


def test_unknown_command_without_container_id_is_code_4(bed: Bed) -> None:
    """libcni v1.2's skel (upstream's) checks the container ID only for ADD/CHECK/DEL: an unknown command
    without one is code 4 "unknown CNI_COMMAND", not v1.1's code 3 "missing containerID"."""
    env = {k: v for k, v in bed.env("FROB").items() if k not in ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_NETNS")}
    out = io.BytesIO()
    assert plugin.run(env, io.BytesIO(json.dumps(bed.conf()).encode()), out, io.StringIO()) == 1
    e = json.loads(out.getvalue())
    assert (e["code"], e["msg"]) == (4, "unknown CNI_COMMAND: FROB")
    # The config is still checked first (skel's validateConfig runs for every command but VERSION).
    out = io.BytesIO()
    assert plugin.run(env, io.BytesIO(b"{"), out, io.StringIO()) == 1
    assert json.loads(out.getvalue())["code"] == 6


def test_unreadable_stdin_is_code_5_and_closed_stdin_is_empty(bed: Bed, tmp_path: Path) -> None:
    """skel: io.ReadAll(os.Stdin) failing is code 5 with the *PathError; a closed fd 0 is reopened on /dev/null by
    Go's runtime (checkfds, Go 1.22+), so it reads as empty stdin: code 6, unexpected end of JSON input. (The
    client hands both to the standalone plugin, served or not: the served mode's connection ends unsent.)"""
    env = {k.encode(): v.encode() for k, v in bed.env("ADD").items()}
    flannel_exe = bed.standalone_exe
    with open(tmp_path / "w", "wb") as w:  # fd 0 open write-only: read(2) fails with EBADF
        p = subprocess.run([str(flannel_exe)], stdin=w, env=env, capture_output=True, timeout=30, cwd="/")
    e = json.loads(p.stdout)
    assert (p.returncode, e["code"], e["msg"]) == (
        1,
        5,
        "error reading from stdin: read /dev/stdin: bad file descriptor",
    )
    # fd 0 closed: the answer is the empty-stdin one, and the delegate never sees a stray fd 0 (none runs here).
    p = subprocess.run([str(flannel_exe)], stdin=subprocess.DEVNULL, env=env, capture_output=True, timeout=30,
                       cwd="/", preexec_fn=lambda: os.close(0))  # fmt: skip
    e = json.loads(p.stdout)
    assert (p.returncode, e["code"]) == (1, 6)
    assert e["msg"] == "error unmarshall network config: unexpected end of JSON input"
