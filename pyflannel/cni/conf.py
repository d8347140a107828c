"""The flannel CNI plugin's pure parts: its netconf, subnet.env, the delegate config and Go-compatible JSON.

Standard library only, and cheap to import: the runtime execs the plugin once per pod and per command.
Everything here mirrors upstream flannel-io/cni-plugin (flannel.go, flannel_linux.go) so the stored
delegate config is byte-identical to what the Go plugin writes.
"""

import posix

from pyflannel.cni import _fastjson

# typing and dataclasses cost about 15 ms of start-up together: annotations only. No `from __future__ import
# annotations` either (importing __future__ scans the stdlib directory: ~0.2 ms): names that exist only for
# the type checker are quoted.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"
DEFAULT_DATA_DIR = "/var/lib/cni/flannel"

# CNI error codes (spec + reference library).
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN_LATER = 11
ERR_PLUGIN_NOT_AVAILABLE = 50
ERR_INTERNAL = 999

# What the upstream plugin accepts (the reference library's version.All).
SUPPORTED_VERSIONS = ("0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
CURRENT_VERSION = "1.1.0"

# kube-flannel.yml's cni-conf.json, as containerd/cri-o read it from /etc/cni/net.d/10-flannel.conflist.
KUBE_FLANNEL_CONFLIST: "dict[str, Any]" = {
    "name": "cbr0",
    "cniVersion": "0.3.1",
    "plugins": [
        {"type": "flannel", "delegate": {"hairpinMode": True, "isDefaultGateway": True}},
        {"type": "portmap", "capabilities": {"portMappings": True}},
    ],
}


class CNIError(Exception):
    """A CNI error result: printed as JSON on stdout, exit status 1."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_dict(self, cni_version: str = CURRENT_VERSION) -> "dict[str, Any]":
        d: dict[str, Any] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            d["details"] = self.details
        return d

    def to_json(self, cni_version: str = CURRENT_VERSION) -> bytes:
        """libcni's types.Error.Print(): json.MarshalIndent with four spaces, no trailing newline, `details`
        omitted when empty. One deliberate addition: `cniVersion` first, which the spec (1.0.0 and later) asks
        of an error result and libcni leaves out; runtimes ignore it."""
        parts = [
            b'{\n    "cniVersion": ', go_json(cni_version),
            b',\n    "code": ', str(self.code).encode(),
            b',\n    "msg": ', go_json(self.msg),
        ]  # fmt: skip
        if self.details:
            parts += [b',\n    "details": ', go_json(self.details)]
        parts.append(b"\n}")
        return b"".join(parts)


# ---------------------------------------------------------------------------------------------------------
# Go encoding/json compatible output


def _go_float(f: float) -> str:
    if f != f or f in (float("inf"), float("-inf")):
        raise CNIError(ERR_INTERNAL, f"json: unsupported value: {f!r}")
    a = abs(f)
    if a == 0 or 1e-6 <= a < 1e21:
        if f == int(f) and a < 2**53:
            return str(int(f))
        from decimal import Decimal  # rare: non-integral or huge numbers in a user's delegate config

        text = format(Decimal(repr(f)), "f")  # the shortest round-trip digits, as Go's 'f', -1
        return text[:-2] if text.endswith(".0") else text  # repr(2.0**53) is "9007199254740992.0"
    s = repr(f)
    mant, _, exp = s.partition("e")
    sign = exp[0] if exp[0] in "+-" else "+"
    digits = exp.lstrip("+-")
    if sign == "-" and len(digits) == 2 and digits[0] == "0":
        digits = digits[1:]  # Go turns e-09 into e-9 but keeps e+21
    return f"{mant}e{sign}{digits}"


def _go_numbers(obj: "Any") -> "Any":
    """Numbers as Go sees them after decoding into interface{}: every number is a float64.

    (The walkers here use plain loops, one frame per level: a comprehension or any(genexpr) would be two, and
    the 512 levels _fastjson allows must fit in the interpreter's recursion limit.)"""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return obj if abs(obj) < 2**53 else _GoRaw(_go_float(float(obj)))
    if isinstance(obj, float):
        return _GoRaw(_go_float(obj))
    if isinstance(obj, dict):
        d = {}
        for k, v in obj.items():
            d[k] = _go_numbers(v)
        return d
    if isinstance(obj, list):
        out = []
        for v in obj:
            out.append(_go_numbers(v))
        return out
    return obj


class _GoRaw(float):
    """A pre-formatted number (kept as a float subclass so json emits it through float.__repr__)."""

    def __new__(cls, text: str) -> "_GoRaw":
        self = super().__new__(cls, float(text))
        self.text = text
        return self

    text: str

    def __repr__(self) -> str:
        return self.text


_HTML_ESCAPES = (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029"))


def go_json(obj: "Any") -> bytes:
    """json.Marshal's bytes: compact, map keys sorted, <>& and U+2028/9 escaped, numbers as float64."""
    text = _encode_go_numbers(_go_numbers(obj)) if _needs_number_fixup(obj) else _fastjson.dumps_sorted(obj)
    for ch, esc in _HTML_ESCAPES:
        if ch in text:
            text = text.replace(ch, esc)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # Only strings hold surrogates here: bytes that were not UTF-8 (env, file names, subnet.env, all read
        # with surrogateescape). Go's encoder writes each invalid byte as the escape \ufffd.
        return "".join("\\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text).encode("utf-8")


def _encode_go_numbers(obj: "Any") -> str:
    # Rare (non-integral or huge numbers in a user's config): the C encoder ignores float subclasses'
    # __repr__, the pure-Python one honours it.
    import json

    enc = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False)
    chunks = json.encoder._make_iterencode(  # type: ignore[attr-defined]
        None, enc.default, json.encoder.py_encode_basestring, None, repr, ":", ",", True, False, True,
    )(obj, 0)  # fmt: skip
    return "".join(chunks)


def _needs_number_fixup(obj: "Any") -> bool:
    if isinstance(obj, bool):
        return False
    if isinstance(obj, float):
        return True
    if isinstance(obj, int):
        return abs(obj) >= 2**53
    if isinstance(obj, dict):
        obj = obj.values()
    elif not isinstance(obj, list):
        return False
    for v in obj:  # noqa: SIM110  (any(genexpr) costs two frames per level: see _go_numbers)
        if _needs_number_fixup(v):
            return True
    return False


# ---------------------------------------------------------------------------------------------------------
# The plugin's own netconf, decoded as Go's encoding/json decodes it into upstream's NetConf struct


def go_get(d: "dict[str, Any]", key: str) -> "tuple[bool, Any]":
    """Go's struct decoding: keys match case-insensitively; the last matching key in the document wins."""
    found, value = False, None
    low = key.casefold()
    for k, v in d.items():
        if k == key or k.casefold() == low:
            found, value = True, v
    return found, value


class FlannelNetConf:
    """The plugin's stdin (upstream NetConf), with upstream's defaults."""

    def __init__(
        self,
        name: str = "",
        type: str = "",
        cni_version: str = "",
        subnet_file: str = DEFAULT_SUBNET_FILE,
        data_dir: str = DEFAULT_DATA_DIR,
        delegate: "dict[str, Any] | None" = None,
        ipam: "dict[str, Any] | None" = None,
        runtime_config: "dict[str, Any] | None" = None,
        prev_result: "dict[str, Any] | None" = None,
        raw: "dict[str, Any] | None" = None,
    ) -> None:
        self.name = name
        self.type = type
        self.cni_version = cni_version
        self.subnet_file = subnet_file
        self.data_dir = data_dir
        self.delegate = delegate
        self.ipam = ipam
        self.runtime_config = runtime_config
        self.prev_result = prev_result
        self.raw: dict[str, Any] = raw if raw is not None else {}


def _go_type(v: "Any") -> str:
    """The JSON kind as encoding/json names it in an UnmarshalTypeError."""
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int | float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object"


def _type_error(v: "Any", struct: str, field: str, gotype: str) -> str:
    into = f"Go struct field {struct}.{field}" if struct or field else "Go value"
    return f"json: cannot unmarshal {_go_type(v)} into {into} of type {gotype}"


_NAME_STRUCT = 'struct { Name string "json:\\"name\\"" }'
_VERSION_STRUCT = 'struct { CNIVersion string "json:\\"cniVersion\\"" }'


def decode_object(data: bytes) -> "dict[str, Any]":
    """Decode stdin as the reference library's skel does first (into `struct{Name string}`): code 6 for what
    is not JSON, not an object or a non-string name, with encoding/json's message."""
    try:
        obj = _fastjson.loads(data)
    except ValueError as e:
        raise CNIError(ERR_DECODE, f"error unmarshall network config: {e}") from None
    if obj is None:
        return {}  # null decodes into the zero struct: then "missing network name"
    if not isinstance(obj, dict):
        msg = f"json: cannot unmarshal {_go_type(obj)} into Go value of type {_NAME_STRUCT}"
        raise CNIError(ERR_DECODE, f"error unmarshall network config: {msg}")
    _, name = go_get(obj, "name")
    if name is not None and not isinstance(name, str):
        raise CNIError(ERR_DECODE, f"error unmarshall network config: {_type_error(name, '', 'name', 'string')}")
    return obj


def config_version(raw: "dict[str, Any]") -> str:
    """version.ConfigDecoder: the config's cniVersion, "0.1.0" when absent."""
    _, v = go_get(raw, "cniVersion")
    if v is not None and not isinstance(v, str):
        err = _type_error(v, "", "cniVersion", "string")
        raise CNIError(ERR_DECODE, f"decoding version from network config: {err}")
    return v or "0.1.0"


def _first_big(v: "Any") -> "Any":
    """The first number beyond float64 (a _goerr.BigNumber) inside a value, in document order."""
    if isinstance(v, float) and v - v != 0:
        return v
    if isinstance(v, dict):
        v = v.values()
    elif not isinstance(v, list):
        return None
    for x in v:
        b = _first_big(x)
        if b is not None:
            return b
    return None


def _check_any_map(v: "Any", field: str) -> None:
    """A map[string]interface{} field: an object (or null); numbers decode as float64."""
    if v is None:
        return
    if not isinstance(v, dict):
        raise ValueError(_type_error(v, "NetConf", field, "map[string]interface {}"))
    if _fastjson.overflowed():
        b = _first_big(v)
        if b is not None:
            raise ValueError(
                f"json: cannot unmarshal number {b.text} into Go struct field NetConf.{field} of type float64"
            )


def _check_str(v: "Any", struct: str, field: str) -> None:
    if v is not None and not isinstance(v, str):
        raise ValueError(_type_error(v, struct, field, "string"))


def _check_bool_map(v: "Any", field: str) -> None:
    if v is None:
        return
    if not isinstance(v, dict):
        raise ValueError(_type_error(v, "NetConf", field, "map[string]bool"))
    for x in v.values():
        if x is not None and not isinstance(x, bool):
            raise ValueError(_type_error(x, "NetConf", field, "bool"))


def _check_dns(v: "Any", field: str) -> None:
    if v is None:
        return
    if not isinstance(v, dict):
        raise ValueError(_type_error(v, "NetConf", field, "types.DNS"))
    for key in v:
        low = key.casefold()
        sub = v[key]
        if low == "domain":
            _check_str(sub, "DNS", f"{field}.domain")
        elif low in ("nameservers", "search", "options"):
            path = f"{field}.{next(k for k in ('nameservers', 'search', 'options') if k == low)}"
            if sub is None:
                continue
            if not isinstance(sub, list):
                raise ValueError(_type_error(sub, "DNS", path, "[]string"))
            for x in sub:
                _check_str(x, "DNS", path)


def _check_attachments(v: "Any", field: str) -> None:
    if v is None:
        return
    if not isinstance(v, list):
        raise ValueError(_type_error(v, "NetConf", field, "[]types.GCAttachment"))
    for a in v:
        if a is None:
            continue
        if not isinstance(a, dict):
            raise ValueError(_type_error(a, "NetConf", field, "types.GCAttachment"))
        for key, sub in a.items():
            low = key.casefold()
            if low == "containerid":
                _check_str(sub, "GCAttachment", f"{field}.containerID")
            elif low == "ifname":
                _check_str(sub, "GCAttachment", f"{field}.ifname")


# Upstream's NetConf (types.NetConf embedded, with flannel's own ipam, subnetFile, dataDir, delegate,
# runtimeConfig): JSON name -> check. Other keys are ignored, as Go ignores unknown fields.
_FIELDS: "dict[str, tuple[str, Any]]" = {
    "cniversion": ("cniVersion", lambda v, f: _check_str(v, "NetConf", f)),
    "name": ("name", lambda v, f: _check_str(v, "NetConf", f)),
    "type": ("type", lambda v, f: _check_str(v, "NetConf", f)),
    "capabilities": ("capabilities", _check_bool_map),
    "ipam": ("ipam", _check_any_map),
    "dns": ("dns", _check_dns),
    "prevresult": ("prevResult", _check_any_map),
    "cni.dev/valid-attachments": ("cni.dev/valid-attachments", _check_attachments),
    "subnetfile": ("subnetFile", lambda v, f: _check_str(v, "NetConf", f)),
    "datadir": ("dataDir", lambda v, f: _check_str(v, "NetConf", f)),
    "delegate": ("delegate", _check_any_map),
    "runtimeconfig": ("runtimeConfig", _check_any_map),
}


def load_netconf(raw: "dict[str, Any]") -> FlannelNetConf:
    """loadFlannelNetConf: json.Unmarshal into upstream's NetConf. The first type mismatch in document order
    is its error (code 999, as upstream: a plain error from the plugin's own code)."""
    try:
        for key, v in raw.items():
            field = _FIELDS.get(key.casefold())
            if field is not None:
                field[1](v, field[0])
    except ValueError as e:
        raise CNIError(ERR_INTERNAL, f"failed to load netconf: {e}") from None

    def opt(key: str, default: "Any") -> "Any":
        found, v = go_get(raw, key)
        return default if not found or v is None else v

    return FlannelNetConf(
        name=opt("name", ""),
        type=opt("type", ""),
        cni_version=opt("cniVersion", ""),
        subnet_file=opt("subnetFile", DEFAULT_SUBNET_FILE),
        data_dir=opt("dataDir", DEFAULT_DATA_DIR),
        delegate=opt("delegate", None),
        ipam=opt("ipam", None),
        runtime_config=opt("runtimeConfig", None),
        prev_result=opt("prevResult", None),
        raw=raw,
    )


# ---------------------------------------------------------------------------------------------------------
# subnet.env


class SubnetEnvError(Exception):
    pass


class FlannelSubnetEnv:
    """subnet.env as the plugin sees it: networks and subnets in Go IPNet.String() network form."""

    def __init__(self) -> None:
        self.networks: list[str] = []
        self.subnet: str | None = None  # 10.1.17.1/24 in the file becomes 10.1.17.0/24
        self.ipv6_networks: list[str] = []
        self.ipv6_subnet: str | None = None
        self.mtu: int | None = None
        self.ipmasq: bool | None = None

    def missing(self) -> str:
        m: list[str] = []
        if not self.networks and not self.ipv6_networks:
            m += ["FLANNEL_NETWORK", "FLANNEL_IPV6_NETWORK"]
        if self.subnet is None and self.ipv6_subnet is None:
            m += ["FLANNEL_SUBNET", "FLANNEL_IPV6_SUBNET"]
        if self.mtu is None:
            m.append("FLANNEL_MTU")
        if self.ipmasq is None:
            m.append("FLANNEL_IPMASQ")
        return ", ".join(m)


def _parse_cidr(s: str) -> str:
    """net.ParseCIDR + IPNet.String(): the network in canonical form."""
    try:
        return _fastjson.parse_cidr(s)[1]
    except ValueError as e:
        raise SubnetEnvError(str(e)) from None


def _parse_mtu(s: str) -> int:
    if 0 < len(s) < 10 and s.isascii() and s.isdigit():
        return int(s)  # below 2**32: the usual case, without loading Go's error texts
    from pyflannel.cni import _goerr

    try:
        return _goerr.parse_uint32(s)
    except ValueError as e:
        raise SubnetEnvError(str(e)) from None


# bufio.Scanner's limit: a line (with its \r, without its \n) of 64 KiB or more ends the scan with an error.
_MAX_LINE = 64 * 1024


def parse_subnet_env(data: "bytes | str", fn: str) -> FlannelSubnetEnv:
    """loadFlannelSubnetEnv: bufio.Scanner lines (a trailing \\r dropped), key=value split at the first `=`, no
    other trimming; networks may be comma-separated. Lines are read in order and the first bad one is the error."""
    raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    se = FlannelSubnetEnv()
    for bline in raw.split(b"\n"):
        if len(bline) >= _MAX_LINE:
            raise SubnetEnvError("bufio.Scanner: token too long")
        line = bline.decode("utf-8", "surrogateescape")
        if line.endswith("\r"):
            line = line[:-1]
        key, sep, value = line.partition("=")
        if key not in _KEYS:
            continue
        if not sep:
            # Upstream indexes parts[1] and panics: a clear error instead.
            from pyflannel.cni import _goerr

            raise SubnetEnvError(f"{fn}: line {_goerr.quote(line)} has no value")
        if key == "FLANNEL_NETWORK" or key == "FLANNEL_IPV6_NETWORK":
            nets: list[str] = []
            for cidr in value.split(","):
                n = _parse_cidr(cidr)
                if n not in nets:
                    nets.append(n)
            if key == "FLANNEL_NETWORK":
                se.networks = nets
            else:
                se.ipv6_networks = nets
        elif key == "FLANNEL_SUBNET":
            se.subnet = _parse_cidr(value)
        elif key == "FLANNEL_IPV6_SUBNET":
            se.ipv6_subnet = _parse_cidr(value)
        elif key == "FLANNEL_MTU":
            se.mtu = _parse_mtu(value)
        else:
            se.ipmasq = value == "true"
    m = se.missing()
    if m:
        raise SubnetEnvError(f"{fn} is missing {m}")
    return se


_KEYS = frozenset(
    (
        "FLANNEL_NETWORK",
        "FLANNEL_SUBNET",
        "FLANNEL_IPV6_NETWORK",
        "FLANNEL_IPV6_SUBNET",
        "FLANNEL_MTU",
        "FLANNEL_IPMASQ",
    )
)

# subnet.env is a few hundred bytes; a bigger file is refused rather than read without bound.
MAX_SUBNET_ENV = 1 << 20


def read_file(path: str, limit: int) -> bytes:
    """A regular file's bytes, at most `limit` (SubnetEnvError past it). Never blocks: a FIFO or a device is
    refused (opened non-blocking, then fstat), where Go's os.Open would wait for a FIFO's writer.
    OSError and ValueError (a NUL in the path) propagate with the syscall's errno."""
    fd = posix.open(path, posix.O_RDONLY | posix.O_CLOEXEC | posix.O_NONBLOCK)
    try:
        if (posix.fstat(fd).st_mode & 0o170000) != 0o100000:
            raise SubnetEnvError(f"open {path}: not a regular file")
        chunks: list[bytes] = []
        size = 0
        while True:
            b = posix.read(fd, limit + 1 - size)
            if not b:
                break
            chunks.append(b)
            size += len(b)
            if size > limit:
                raise SubnetEnvError(f"read {path}: larger than {limit} bytes")
        return b"".join(chunks)
    finally:
        posix.close(fd)


def load_subnet_env(fn: str) -> FlannelSubnetEnv:
    """Read and parse subnet.env; OSError/ValueError propagate (the caller words them as Go's os.Open does)."""
    return parse_subnet_env(read_file(fn, MAX_SUBNET_ENV), fn)


# ---------------------------------------------------------------------------------------------------------
# The delegate config


_ROUTE_KEYS = ("mtu", "advmss", "priority", "table", "scope")  # struct order
_ROUTE_PTR_KEYS = ("table", "scope")
_ROUTES_CONTEXT = "failed to assemble Delegate IPAM: failed to read IPAM routes: failed to parse ipam.routes: "


def _route(r: "Any") -> "dict[str, Any]":
    """One element of ipam.routes through upstream's round trip: json.Marshal of the decoded value, then
    json.Unmarshal into types.Route (dst, gw, mtu, advmss, priority, table, scope). Only its fields survive, in
    struct order. Keys are decoded in document order: an error Go's decoder returns at once (a bad dst, a bad gw
    string) ends the element, a type error (a non-string gw, a non-integer mtu) is saved and reported at its end
    unless a returned one comes. ValueError with Go's text."""
    if not isinstance(r, dict):
        # Route.UnmarshalJSON decodes into the unexported struct types.route. A null element would decode to
        # a route without destination (printed "<nil>", which the delegate refuses): refused here like a null dst.
        if r is None:
            raise ValueError("invalid CIDR address: ")
        raise ValueError(f"json: cannot unmarshal {_go_type(r)} into Go value of type types.route")
    saved: str | None = None
    fields: dict[str, Any] = {}
    for key, v in r.items():
        k = key.casefold()
        if k == "dst":
            if v is not None and not isinstance(v, str):
                raise ValueError(_type_error(v, "route", "dst", "string"))
            fields["dst"] = _fastjson.parse_cidr(v or "")[0]  # the address as given, canonicalised
        elif k == "gw":
            if isinstance(v, str):
                fields["gw"] = _fastjson.format_ip(*_fastjson.parse_ip(v)) if v else None
            elif v is not None:
                saved = saved or _type_error(v, "route", "gw", "net.IP")
        elif k in _ROUTE_KEYS:
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int | float):
                saved = saved or _type_error(v, "route", k, "int")
                continue
            # The first decode made it a float64, json.Marshal wrote it in Go's float form, ParseInt reads that.
            text = _go_float(float(v))
            n = int(text) if text.lstrip("-").isdigit() else None
            if n is None or not -(2**63) <= n < 2**63:
                saved = saved or f"json: cannot unmarshal number {text} into Go struct field route.{k} of type int"
                continue
            fields[k] = n
    if saved:
        raise ValueError(saved)
    if "dst" not in fields:
        raise ValueError("invalid CIDR address: ")  # Go would store "<nil>": see above
    out: dict[str, Any] = {"dst": fields["dst"]}
    if fields.get("gw"):
        out["gw"] = fields["gw"]
    for k in _ROUTE_KEYS:
        if k in fields and (k in _ROUTE_PTR_KEYS or fields[k] != 0):  # omitempty, except the *int pointers
            out[k] = fields[k]
    return _Ordered(out)


class _Ordered(dict):  # type: ignore[type-arg]
    """A struct-like object whose keys keep declaration order even when the rest is sorted."""


def delegate_ipam(n: FlannelNetConf, fenv: FlannelSubnetEnv) -> "dict[str, Any]":
    """getDelegateIPAM: the user's ipam keys, type default host-local, ranges from subnet.env, routes appended."""
    ipam = dict(n.ipam) if n.ipam is not None else {}
    if "type" not in ipam:
        ipam["type"] = "host-local"
    ranges: list[list[dict[str, str]]] = []
    if fenv.subnet:
        ranges.append([{"subnet": fenv.subnet}])
    if fenv.ipv6_subnet:
        ranges.append([{"subnet": fenv.ipv6_subnet}])
    ipam["ranges"] = ranges
    routes: list[dict[str, Any]] = []
    user = ipam.get("routes")
    if user is not None:
        try:
            if not isinstance(user, list):
                raise ValueError(f"json: cannot unmarshal {_go_type(user)} into Go value of type []types.Route")
            routes = [_route(r) for r in user]
        except ValueError as e:
            raise CNIError(ERR_INTERNAL, _ROUTES_CONTEXT + str(e)) from None
    routes += [_Ordered({"dst": nw}) for nw in fenv.networks]
    routes += [_Ordered({"dst": nw}) for nw in fenv.ipv6_networks]
    ipam["routes"] = routes
    return ipam


def validate_delegate(delegate: "dict[str, Any] | None") -> None:
    """cmdAdd's checks; plain errors there, so code 999 (libcni's skel wraps any error that is not a CNI error)."""
    if delegate is None:
        return
    if "type" in delegate and not isinstance(delegate["type"], str):
        raise CNIError(ERR_INTERNAL, "'delegate' dictionary, if present, must have (string) 'type' field")
    if "name" in delegate:
        raise CNIError(ERR_INTERNAL, "'delegate' dictionary must not have 'name' field, it'll be set by flannel")
    if "ipam" in delegate:
        raise CNIError(ERR_INTERNAL, "'delegate' dictionary must not have 'ipam' field, it'll be set by flannel")


def build_delegate(n: FlannelNetConf, fenv: FlannelSubnetEnv) -> "dict[str, Any]":
    """cmdAdd + doCmdAdd: the delegate config the upstream plugin stores and hands to its delegate."""
    validate_delegate(n.delegate)
    d = dict(n.delegate) if n.delegate is not None else {}
    if n.runtime_config is not None:
        d["runtimeConfig"] = n.runtime_config
    d["name"] = n.name
    if "type" not in d:
        d["type"] = "bridge"
    if "ipMasq" not in d:
        d["ipMasq"] = not fenv.ipmasq
    if "mtu" not in d:
        d["mtu"] = fenv.mtu
    if d["type"] == "bridge" and "isGateway" not in d:
        d["isGateway"] = True
    if n.cni_version:
        d["cniVersion"] = n.cni_version
    d["ipam"] = delegate_ipam(n, fenv)
    return d


def delegate_bytes(d: "dict[str, Any]") -> bytes:
    """The stored form: json.Marshal of the delegate map (routes keep types.Route field order)."""
    return go_json_ordered(d)


def go_json_ordered(obj: "Any") -> bytes:
    """go_json, except that _Ordered objects (Go structs) keep their own key order."""
    if not _has_ordered(obj):
        return go_json(obj)
    parts: list[bytes] = []
    _emit(obj, parts)
    return b"".join(parts)


def _has_ordered(obj: "Any") -> bool:
    if isinstance(obj, _Ordered):
        return True
    if isinstance(obj, dict):
        obj = obj.values()
    elif not isinstance(obj, list):
        return False
    for v in obj:  # noqa: SIM110  (any(genexpr) costs two frames per level: see _go_numbers)
        if _has_ordered(v):
            return True
    return False


def _emit(obj: "Any", out: list[bytes]) -> None:
    if isinstance(obj, dict) and _has_ordered(obj):
        keys = list(obj) if isinstance(obj, _Ordered) else sorted(obj)
        out.append(b"{")
        for i, k in enumerate(keys):
            if i:
                out.append(b",")
            out.append(go_json(k))
            out.append(b":")
            _emit(obj[k], out)
        out.append(b"}")
    elif isinstance(obj, list) and _has_ordered(obj):
        out.append(b"[")
        for i, v in enumerate(obj):
            if i:
                out.append(b",")
            _emit(v, out)
        out.append(b"]")
    else:
        out.append(go_json(obj))
