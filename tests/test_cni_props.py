"""Property tests of the flannel CNI plugin's inputs (issue 11): its stdin and env, in-process, and a
differential test of its JSON reader (pyflannel/cni/_fastjson.py) against the standard library's `json`.

The oracle: success, or CNI error JSON (valid UTF-8, a documented code, exit status 1); never an exception
out of plugin.run, never its last-resort "internal error" answer, and nothing written outside dataDir.
tests/test_cni_fuzz.py does the same through the executable.

Bounded for CI: PYFLANNEL_FUZZ_EXAMPLES examples per property (default 150, derandomized so a CI run is
repeatable); set it higher for a longer, randomized run: `PYFLANNEL_FUZZ_EXAMPLES=5000 pytest tests/test_cni_props.py`.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from fuzzing import any_json, fuzz_settings
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from test_cni_plugin import IPV4_ENV, Bed

from pyflannel.cni import _fastjson, _goerr, plugin

FUZZ = fuzz_settings(150, HealthCheck.filter_too_much)
# What the plugin answers (the spec's well-known codes, 50 for STATUS, 999), plus the fake delegate's own 11.
CODES = {1, 3, 4, 5, 6, 7, 11, 50, 999}
COMMANDS = ["ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION"]

# ---- strategies ------------------------------------------------------------------------------------------------

values = any_json(int_bound=2**70, text=12, leaves=12)
# Names that are often valid CNI names, sometimes not at all.
names = st.sampled_from(["cni-flannel", "cbr0", "a.b_c-d", "", "bad name", "-x", "\ufffd", "é"]) | st.text(max_size=6)
versions = st.sampled_from(["0.1.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0", "", "1.0", "2.0.0", "x.y.z"]) | st.text(
    max_size=5
)
cidrs = st.sampled_from(["10.9.0.0/16", "10.9.0.1/24", "::1:0/112", "fc00::/48", "::ffff:1.2.3.0/120", "bogus",
                         "1.2.3.4", "", "10.0.0.0/33", "01.2.3.4/8"])  # fmt: skip
routes = st.fixed_dictionaries(
    {},
    optional={
        "dst": cidrs | values,
        "gw": st.sampled_from(["10.9.0.1", "", "::1", "x"]) | values,
        "mtu": values,
        "table": st.integers(min_value=-(2**64), max_value=2**64) | values,
        "priority": st.floats(allow_nan=False, allow_infinity=False) | st.integers(),
    },
)
ipams = st.fixed_dictionaries(
    {}, optional={"type": values, "routes": st.lists(routes | values, max_size=3) | values, "x": values}
)
delegates = st.dictionaries(
    st.sampled_from(["type", "name", "ipam", "mtu", "ipMasq", "isGateway", "hairpinMode", "x", "y"])
    | st.text(max_size=5),
    values,
    max_size=5,
) | st.fixed_dictionaries({"type": st.sampled_from(["bridge", "ipvlan", "nosuch", "", "../x", "a\x00b"])})


@st.composite
def netconfs(draw: st.DrawFn, bed: Bed) -> dict[str, Any]:
    conf: dict[str, Any] = {"name": draw(names), "type": "flannel", "subnetFile": str(bed.subnet_file),
                            "dataDir": str(bed.data_dir)}  # fmt: skip
    optional = {
        "cniVersion": versions | values,
        "delegate": delegates | values,
        "ipam": ipams | values,
        "runtimeConfig": values,
        "prevResult": values,
        "capabilities": st.dictionaries(st.text(max_size=4), st.booleans() | values, max_size=2) | values,
        "dns": st.fixed_dictionaries({}, optional={"domain": values, "nameservers": values}) | values,
        "cni.dev/valid-attachments": st.lists(st.fixed_dictionaries({"containerID": values}), max_size=2) | values,
        "subnetFile": st.sampled_from([str(bed.subnet_file), "/dev/zero", "/nonexistent", str(bed.tmp), ""]),
        "dataDir": st.sampled_from([str(bed.data_dir), f"{bed.data_dir}/nested/", str(bed.subnet_file)]),
        "SubnetFile": values,
    }
    for key in draw(st.lists(st.sampled_from(sorted(optional)), unique=True, max_size=5)):
        conf[key] = draw(optional[key])
    return conf


_ENV_LINES = [
    *IPV4_ENV.strip().split("\n"),
    "FLANNEL_IPV6_NETWORK=fc00::/48",
    "FLANNEL_IPV6_SUBNET=fc00::1/64",
    "FLANNEL_MTU=99999999999",
    "FLANNEL_MTU=",
    "FLANNEL_NETWORK=::1:0/112",
    "FLANNEL_SUBNET",
    "FLANNEL_NETWORK=10.1.0.0/16,10.2.0.0/16\r",
    "# comment",
    "",
]
subnet_envs = st.lists(st.sampled_from(_ENV_LINES) | st.text(max_size=20), max_size=8).map("\n".join)
env_text = st.text(max_size=10) | st.sampled_from(["some-id", "eth0", "a" * 300, "a\udcff", "\udc80"])


def fresh_bed() -> tuple[tempfile.TemporaryDirectory[str], Bed]:
    d = tempfile.TemporaryDirectory(prefix="pfl-cni-prop-")
    bed = Bed(Path(d.name))
    bed.write_env(IPV4_ENV)
    return d, bed


def snapshot(root: Path, skip: list[Path]) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not any((here / d).resolve() == s.resolve() for s in skip)]
        for f in [*filenames, *dirnames]:
            p = here / f
            st_ = p.lstat()
            out[str(p)] = (st_.st_size, st_.st_mtime_ns) if not p.is_dir() else (0, 0)
    return out


def check_answer(rc: int, out: bytes, command: str) -> dict[str, Any] | None:
    """The oracle for one answer; returns the error object, if any."""
    assert rc in (0, 1)
    text = out.decode("utf-8")  # Go's encoder writes valid UTF-8 only; so must we
    if rc == 0:
        if command == "VERSION":
            assert json.loads(text)["supportedVersions"]
        return None
    e = json.loads(text)
    assert isinstance(e, dict) and e["code"] in CODES, e
    assert isinstance(e["msg"], str) and "internal error (" not in e["msg"], e
    assert "[Errno" not in e["msg"] and "Traceback" not in e["msg"], e
    assert isinstance(e.get("details", ""), str)
    return e


# ---- the plugin in-process -------------------------------------------------------------------------------------


@FUZZ
@given(data=st.data(), command=st.sampled_from(COMMANDS), subnet_env=subnet_envs)
def test_any_stdin_gets_a_clear_answer(data: st.DataObject, command: str, subnet_env: str) -> None:
    tmp, bed = fresh_bed()
    with tmp:
        bed.write_env(subnet_env)
        bed.versions = '"0.3.1","1.0.0","1.1.0"'
        conf = data.draw(netconfs(bed))
        stdin = json.dumps(conf).encode("utf-8", "surrogatepass")
        if data.draw(st.booleans()):  # sometimes cut or spliced: malformed JSON
            cut = data.draw(st.integers(0, len(stdin)))
            stdin = stdin[:cut] + data.draw(st.binary(max_size=4))
        before = snapshot(bed.tmp, [bed.data_dir, bed.fake])
        out = io.BytesIO()
        rc = plugin.run(bed.env(command), io.BytesIO(stdin), out, io.StringIO())
        check_answer(rc, out.getvalue(), command)
        assert snapshot(bed.tmp, [bed.data_dir, bed.fake]) == before  # nothing written outside dataDir


@FUZZ
@given(command=st.sampled_from([*COMMANDS, "FROB"]) | env_text, cid=env_text, ifname=env_text, netns=env_text)
def test_any_env_gets_a_clear_answer(command: str, cid: str, ifname: str, netns: str) -> None:
    """Env values as the executable decodes them (surrogateescape: U+DC80..U+DCFF for bytes that are not UTF-8)."""
    tmp, bed = fresh_bed()
    with tmp:
        env = bed.env(command, CNI_CONTAINERID=cid or "<unset>", CNI_IFNAME=ifname or "<unset>",
                      CNI_NETNS=netns or "<unset>")  # fmt: skip
        out = io.BytesIO()
        rc = plugin.run(env, io.BytesIO(json.dumps(bed.conf()).encode()), out, io.StringIO())
        if command == "":
            assert (rc, out.getvalue()) == (0, b"")  # the about text, on stderr
            return
        check_answer(rc, out.getvalue(), command)
        stored = set(os.listdir(bed.data_dir)) if bed.data_dir.exists() else set()
        assert stored <= ({cid} if rc == 0 and command == "ADD" else {cid, *stored})


def _norm(v: Any) -> Any:
    """A JSON value as Go's interface{} holds it: numbers are float64."""
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, int | float):
        return float(v)
    if isinstance(v, list):
        return [_norm(x) for x in v]
    return {k: _norm(x) for k, x in v.items()}


@FUZZ
@given(extra=st.dictionaries(st.text(max_size=6).filter(lambda k: k not in ("type", "name", "ipam")), values,
                             max_size=5))  # fmt: skip
def test_stored_config_keeps_every_delegate_value(extra: dict[str, Any]) -> None:
    """Whatever the user's delegate holds comes back from the stored (Go-encoded) bytes as Go would hold it."""
    tmp, bed = fresh_bed()
    with tmp:
        rc, res, _ = bed.run("ADD", bed.conf(delegate=extra))
        assert rc == 0, res
        stored = bed.stored().read_bytes()
        d = json.loads(stored)
        for k, v in extra.items():
            assert _norm(d[k]) == _norm(v), (k, stored)
        assert list(d) == sorted(d)  # json.Marshal of a map: sorted keys
        assert b" " not in stored.replace(b'" "', b"").split(b'"')[0]  # compact


# ---- _fastjson against json ------------------------------------------------------------------------------------


def _no_constants(name: str) -> Any:
    raise ValueError(name)


def _go_strings(v: Any) -> Any:
    """Go's decoder reads a lone surrogate escape as U+FFFD."""
    if isinstance(v, str):
        return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in v)
    if isinstance(v, list):
        return [_go_strings(x) for x in v]
    if isinstance(v, dict):
        return {_go_strings(k): _go_strings(x) for k, x in v.items()}
    return v


def _reference(text: str) -> tuple[bool, Any]:
    """The standard library's answer, with Go's rules: NaN and Infinity are not JSON, lone surrogates are U+FFFD."""
    try:
        return True, _go_strings(json.loads(text, parse_constant=_no_constants))
    except (ValueError, RecursionError):
        return False, None


documents = st.builds(
    lambda v, indent, ascii_: json.dumps(v, indent=indent, ensure_ascii=ascii_),
    values,
    st.none() | st.integers(0, 2),
    st.booleans(),
)


_SPLICES = [*'{}[],:"\\ 0-.eE+tfnu\x00\x1f', "", "NaN", "\ufeff", "1e400"]


@st.composite
def mutated(draw: st.DrawFn) -> str:
    doc = draw(documents)
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(doc)))
        doc = doc[:i] + draw(st.sampled_from(_SPLICES)) + doc[i + 1 :]
    return doc


@FUZZ
@given(text=documents | mutated() | st.text(max_size=30))
def test_fastjson_agrees_with_json(text: str) -> None:
    ok, ref = _reference(text)
    try:
        got: Any = _fastjson.loads(text.encode("utf-8"))
        mine = True
    except _fastjson.JSONError as e:
        mine, got = False, str(e)
    assert mine == ok, (text, got)
    if ok:
        assert got == ref
    # The Go scanner (the error texts' source) draws the same line between JSON and not.
    assert (_goerr.syntax_error(text.encode("utf-8")) is None) == ok, text


@FUZZ
@given(data=st.binary(max_size=40) | documents.map(lambda d: d.encode()).map(lambda b: b[: len(b) // 2] + b"\xff"))
def test_fastjson_on_bytes_that_are_not_utf8(data: bytes) -> None:
    """Go reads each invalid byte in a string as U+FFFD and refuses one outside a string."""
    try:
        got = _fastjson.loads(data)
    except _fastjson.JSONError as e:
        assert _goerr.syntax_error(data) == str(e)
        return
    assert _goerr.syntax_error(data) is None
    ok, ref = _reference(data.decode("utf-8", "replace"))
    assert ok and isinstance(ref, type(got))


def test_fastjson_where_it_differs_from_json_on_purpose() -> None:
    """Go's decoder, not Python's: lone surrogates, numbers beyond float64, nesting, the BOM."""
    assert _fastjson.loads(b'["\\udc80", "\\ud83d\\ude00", "\\ud800x"]') == ["\ufffd", "\U0001f600", "\ufffdx"]
    assert _fastjson.loads(b'{"\\udfff": 1}') == {"\ufffd": 1}
    big = _fastjson.loads(b"[1e400, -" + b"9" * 5000 + b", 1" + b"0" * 300 + b"]")
    assert [type(x).__name__ for x in big] == ["BigNumber", "BigNumber", "int"]
    assert big[1].text == "-" + "9" * 5000 and _fastjson.overflowed()
    assert _fastjson.loads(b"[1]") == [1] and not _fastjson.overflowed()
    depth = _fastjson.MAX_DEPTH
    assert _fastjson.loads(b"[" * depth + b"]" * depth)
    for doc in (b"[" * (depth + 1) + b"]" * (depth + 1), b'{"a":' * (depth + 1) + b"1" + b"}" * (depth + 1)):
        try:
            _fastjson.loads(doc)
        except _fastjson.JSONError as e:
            assert str(e).endswith("exceeded max depth")
        else:
            raise AssertionError("too deep, yet decoded")
    assert _fastjson.loads(b'"' + b"[" * 2000 + b'"') == "[" * 2000  # brackets in a string do not nest
    try:
        _fastjson.loads(b'\xef\xbb\xbf{"a":1}')
    except _fastjson.JSONError as e:
        assert str(e) == "invalid character '\u00ef' looking for beginning of value"
    else:
        raise AssertionError("a BOM is not JSON for Go")
