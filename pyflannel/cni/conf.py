"""The flannel CNI plugin's pure parts: its netconf, subnet.env, the delegate config and Go-compatible JSON.

Standard library only, and cheap to import: the runtime execs the plugin once per pod and per command.
Everything here mirrors upstream flannel-io/cni-plugin (flannel.go, flannel_linux.go) so the stored
delegate config is byte-identical to what the Go plugin writes.
"""

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

        return format(Decimal(repr(f)), "f")
    s = repr(f)
    mant, _, exp = s.partition("e")
    sign = exp[0] if exp[0] in "+-" else "+"
    digits = exp.lstrip("+-")
    if sign == "-" and len(digits) == 2 and digits[0] == "0":
        digits = digits[1:]  # Go turns e-09 into e-9 but keeps e+21
    return f"{mant}e{sign}{digits}"


def _go_numbers(obj: "Any") -> "Any":
    """Numbers as Go sees them after decoding into interface{}: every number is a float64."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return obj if abs(obj) < 2**53 else _GoRaw(_go_float(float(obj)))
    if isinstance(obj, float):
        return _GoRaw(_go_float(obj))
    if isinstance(obj, dict):
        return {k: _go_numbers(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_go_numbers(v) for v in obj]
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
    return text.encode("utf-8", "replace")


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
        return any(_needs_number_fixup(v) for v in obj.values())
    if isinstance(obj, list):
        return any(_needs_number_fixup(v) for v in obj)
    return False


# ---------------------------------------------------------------------------------------------------------
# The plugin's own netconf


def go_get(d: "dict[str, Any]", key: str) -> "tuple[bool, Any]":
    """Go's struct decoding: keys match case-insensitively; the last matching key in the document wins."""
    found, value = False, None
    low = key.lower()
    for k, v in d.items():
        if k == key or k.lower() == low:
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
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int | float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object"


def decode_object(data: bytes) -> "dict[str, Any]":
    """Decode stdin as a JSON object, with code 6 on anything else (as json.Unmarshal into a struct)."""
    try:
        obj = _fastjson.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        if not data.strip():
            raise CNIError(ERR_DECODE, "error unmarshall network config: unexpected end of JSON input") from None
        raise CNIError(ERR_DECODE, f"error unmarshall network config: {e}") from None
    if not isinstance(obj, dict):
        raise CNIError(
            ERR_DECODE, f"error unmarshall network config: json: cannot unmarshal {_go_type(obj)} into Go value"
        )
    return obj


def _opt_str(raw: "dict[str, Any]", key: str, default: str) -> str:
    found, v = go_get(raw, key)
    if not found or v is None:
        return default
    if not isinstance(v, str):
        raise CNIError(
            ERR_DECODE, f"failed to load netconf: json: cannot unmarshal {_go_type(v)} into Go struct field .{key}"
        )
    return v


def _opt_obj(raw: "dict[str, Any]", key: str) -> "dict[str, Any] | None":
    found, v = go_get(raw, key)
    if not found or v is None:
        return None
    if not isinstance(v, dict):
        raise CNIError(
            ERR_DECODE, f"failed to load netconf: json: cannot unmarshal {_go_type(v)} into Go struct field .{key}"
        )
    return v


def load_netconf(raw: "dict[str, Any]") -> FlannelNetConf:
    return FlannelNetConf(
        name=_opt_str(raw, "name", ""),
        type=_opt_str(raw, "type", ""),
        cni_version=_opt_str(raw, "cniVersion", ""),
        subnet_file=_opt_str(raw, "subnetFile", DEFAULT_SUBNET_FILE),
        data_dir=_opt_str(raw, "dataDir", DEFAULT_DATA_DIR),
        delegate=_opt_obj(raw, "delegate"),
        ipam=_opt_obj(raw, "ipam"),
        runtime_config=_opt_obj(raw, "runtimeConfig"),
        prev_result=_opt_obj(raw, "prevResult"),
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
    if not s.isascii() or not s.isdigit():
        raise SubnetEnvError(f'strconv.ParseUint: parsing "{s}": invalid syntax')
    v = int(s)
    if v >= 2**32:
        raise SubnetEnvError(f'strconv.ParseUint: parsing "{s}": value out of range')
    return v


def parse_subnet_env(text: str, fn: str) -> FlannelSubnetEnv:
    """loadFlannelSubnetEnv: lines are taken verbatim (no trimming), networks may be comma-separated."""
    se = FlannelSubnetEnv()
    for line in text.split("\n"):
        key, sep, value = line.partition("=")
        if key not in _KEYS:
            continue
        if not sep:
            raise SubnetEnvError(f"{fn}: line {line!r} has no value")
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


def load_subnet_env(fn: str) -> FlannelSubnetEnv:
    """Read and parse subnet.env; OSError propagates (the caller maps it to a CNI error)."""
    with open(fn, encoding="utf-8", errors="surrogateescape") as f:
        return parse_subnet_env(f.read(), fn)


# ---------------------------------------------------------------------------------------------------------
# The delegate config


_ROUTE_INT_KEYS = ("mtu", "advmss", "priority")
_ROUTE_PTR_KEYS = ("table", "scope")


def _route(r: "Any") -> "dict[str, Any]":
    """types.Route round trip: only its fields survive, in struct order (dst, gw, mtu, advmss, ...)."""
    if not isinstance(r, dict):
        raise CNIError(
            ERR_INVALID_CONFIG, "failed to assemble Delegate IPAM: failed to read IPAM routes: not an object"
        )
    out: dict[str, Any] = {}
    _, dst = go_get(r, "dst")
    if not isinstance(dst, str):
        raise CNIError(ERR_INVALID_CONFIG, f"failed to assemble Delegate IPAM: invalid route dst {dst!r}")
    try:
        # types.IPNet keeps the address as given (not the network), canonicalised.
        out["dst"] = _fastjson.parse_cidr(dst)[0]
    except ValueError:
        raise CNIError(
            ERR_INVALID_CONFIG,
            f"failed to assemble Delegate IPAM: failed to read IPAM routes: invalid CIDR address: {dst}",
        ) from None
    _, gw = go_get(r, "gw")
    if gw is not None:
        try:
            if not isinstance(gw, str):
                raise ValueError(gw)
            out["gw"] = _fastjson.format_ip(*_fastjson.parse_ip(gw))
        except ValueError:
            raise CNIError(
                ERR_INVALID_CONFIG, f"failed to assemble Delegate IPAM: failed to read IPAM routes: invalid IP {gw!r}"
            ) from None
    for k in _ROUTE_INT_KEYS + _ROUTE_PTR_KEYS:
        _, v = go_get(r, k)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int | float) or v != int(v):
            raise CNIError(ERR_INVALID_CONFIG, f"failed to assemble Delegate IPAM: route {k} must be an integer")
        if k in _ROUTE_PTR_KEYS or v != 0:
            out[k] = int(v)
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
    if "routes" in ipam and ipam["routes"] is not None:
        if not isinstance(ipam["routes"], list):
            raise CNIError(
                ERR_INVALID_CONFIG,
                "failed to assemble Delegate IPAM: failed to read IPAM routes: "
                f"json: cannot unmarshal {_go_type(ipam['routes'])} into Go value of type []types.Route",
            )
        routes = [_route(r) for r in ipam["routes"]]
    routes += [_Ordered({"dst": nw}) for nw in fenv.networks]
    routes += [_Ordered({"dst": nw}) for nw in fenv.ipv6_networks]
    ipam["routes"] = routes
    return ipam


def validate_delegate(delegate: "dict[str, Any] | None") -> None:
    if delegate is None:
        return
    if "type" in delegate and not isinstance(delegate["type"], str):
        raise CNIError(ERR_INVALID_CONFIG, "'delegate' dictionary, if present, must have (string) 'type' field")
    if "name" in delegate:
        raise CNIError(ERR_INVALID_CONFIG, "'delegate' dictionary must not have 'name' field, it'll be set by flannel")
    if "ipam" in delegate:
        raise CNIError(ERR_INVALID_CONFIG, "'delegate' dictionary must not have 'ipam' field, it'll be set by flannel")


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
        return any(_has_ordered(v) for v in obj.values())
    if isinstance(obj, list):
        return any(_has_ordered(v) for v in obj)
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
