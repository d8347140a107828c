"""flanneld's flags: upstream's flags, their FLANNELD_* environment forms, Go flag syntax.

Go's flag package accepts `-flag`, `--flag`, `-flag=value` and `-flag value`; booleans take a value only
with `=` (`--ip-masq=false`). Every flag can also come from `FLANNELD_<NAME_WITH_UNDERSCORES>`; the flag wins.
Values are read as Go's flag package reads them: integers with strconv.ParseInt(s, 0, 64) (`0x1f`, `010` is
octal 8, `1_000`; no spaces, no non-ASCII digits), booleans with strconv.ParseBool.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_ETCD_ENDPOINTS = "http://127.0.0.1:4001,http://127.0.0.1:2379"


class UsageError(ValueError):
    pass


@dataclass(frozen=True)
class Flag:
    name: str
    kind: type  # str, int, bool, or list (repeatable string)
    default: Any
    help: str


FLAGS: tuple[Flag, ...] = (
    Flag("etcd-endpoints", str, DEFAULT_ETCD_ENDPOINTS, "a comma-delimited list of etcd endpoints"),
    Flag("etcd-prefix", str, "/coreos.com/network", "etcd prefix"),
    Flag("etcd-keyfile", str, "", "SSL key file used to secure etcd communication"),
    Flag("etcd-certfile", str, "", "SSL certification file used to secure etcd communication"),
    Flag("etcd-cafile", str, "", "SSL Certificate Authority file used to secure etcd communication"),
    Flag("etcd-username", str, "", "username for BasicAuth to etcd"),
    Flag("etcd-password", str, "", "password for BasicAuth to etcd"),
    Flag("iface", list, [], "interface to use (IP or name) for inter-host communication; may be repeated"),
    Flag("iface-regex", list, [], "regex expression to match the first interface to use; may be repeated"),
    Flag("iface-can-reach", str, "", "detect the interface to use by the route to this IP"),
    Flag("subnet-file", str, "/run/flannel/subnet.env", "filename where env variables (subnet, MTU, ...) are written"),
    Flag("public-ip", str, "", "IP accessible by other nodes for inter-host communication"),
    Flag("public-ipv6", str, "", "IPv6 accessible by other nodes for inter-host communication"),
    Flag("subnet-lease-renew-margin", int, 60, "subnet lease renewal margin, in minutes (1..1439)"),
    Flag("ip-masq", bool, False, "setup IP masquerade rule for traffic destined outside of overlay network"),
    Flag("ip-masq-fully-random-disable", bool, False, "disable --random-fully on the MASQUERADE rules"),
    Flag("kube-subnet-mgr", bool, False, "contact the Kubernetes API for subnet assignment instead of etcd"),
    Flag("kube-api-url", str, "", "Kubernetes API server URL; only with --kube-subnet-mgr out of cluster"),
    Flag("kubeconfig-file", str, "", "kubeconfig file location; only with --kube-subnet-mgr"),
    Flag("kube-annotation-prefix", str, "flannel.alpha.coreos.com", "Kubernetes annotation prefix"),
    Flag("version", bool, False, "print version and exit"),
    Flag("healthz-ip", str, "0.0.0.0", "the IP address for the healthz server to listen on"),
    Flag("healthz-port", int, 0, "the port for the healthz server to listen on (0 to disable)"),
    Flag("iptables-resync", int, 5, "resync period for iptables rules, in seconds"),
    Flag("iptables-forward-rules", bool, True, "add default accept rules to the FORWARD chain"),
    Flag("ip-blackhole-route", bool, False, "add a blackhole route for this node's subnet"),
    Flag("net-config-path", str, "/etc/kube-flannel/net-conf.json", "path to the network configuration file"),
    Flag("set-node-network-unavailable", bool, True, "set the NetworkUnavailable node condition to False"),
    Flag("v", int, 0, "log level verbosity"),
    # Not upstream: the CNI plugin's work served by the agent (pyflannel/cniserver.py). None: cni.sock beside
    # --subnet-file (daemon.agent_config_from_options).
    Flag(
        "cni-socket",
        str,
        None,
        "unix socket where the flannel CNI plugin's calls are served, '' to serve none "
        "(default: cni.sock in the directory of --subnet-file)",
    ),
    # Not upstream: how often backends re-check their kernel entries (upstream never does).
    Flag(
        "reconcile-interval",
        int,
        30,
        "seconds between full checks that the kernel holds every peer's entries "
        "(a backstop: kernel change notifications trigger a repair at once)",
    ),
)
_BY_NAME = {f.name: f for f in FLAGS}


@dataclass
class Options:
    values: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.values[name]


_TRUE = frozenset(("1", "t", "T", "TRUE", "true", "True"))
_FALSE = frozenset(("0", "f", "F", "FALSE", "false", "False"))
_BASES = {"b": 2, "o": 8, "x": 16}
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def go_parse_int(text: str) -> int:
    """strconv.ParseInt(text, 0, 64), as Go's flag package reads an int flag; raises ValueError ("invalid syntax"
    or "value out of range")."""
    s = text
    neg = s[:1] == "-"
    if s[:1] in ("+", "-"):
        s = s[1:]
    base, digits = 10, s
    if s[:1] == "0":
        if len(s) >= 3 and s[1].lower() in _BASES:
            base, digits = _BASES[s[1].lower()], s[2:]
        else:
            base, digits = 8, s[1:]
    clean = digits.replace("_", "")
    valid = "0123456789abcdef"[:base]
    if not s or (digits and not clean) or any(c not in valid for c in clean.lower()):
        raise ValueError("invalid syntax")
    if "_" in digits and not _underscores_ok(s):
        raise ValueError("invalid syntax")
    if len(clean.lstrip("0")) > 64:
        raise ValueError("value out of range")
    n = int(clean, base) if clean else 0
    n = -n if neg else n
    if not _INT64_MIN <= n <= _INT64_MAX:
        raise ValueError("value out of range")
    return n


def _underscores_ok(s: str) -> bool:
    """Go's underscoreOK: each `_` separates two digits (a base prefix counts as a digit)."""
    saw, i, hexa = "^", 0, False
    if len(s) >= 2 and s[0] == "0" and s[1].lower() in _BASES:
        saw, i, hexa = "0", 2, s[1].lower() == "x"
    for c in s[i:]:
        if c in "0123456789" or (hexa and c.lower() in "abcdef"):
            saw = "0"
        elif c == "_":
            if saw != "0":
                return False
            saw = "_"
        elif saw == "_":
            return False
        else:
            saw = "!"
    return saw != "_"


def _convert(flag: Flag, raw: str, source: str) -> Any:
    if flag.kind is bool:
        if raw in _TRUE:
            return True
        if raw in _FALSE:
            return False
        raise UsageError(f"invalid boolean value {raw[:40]!r} for {source}")
    if flag.kind is int:
        try:
            return go_parse_int(raw)
        except ValueError as e:
            why = "" if str(e) == "invalid syntax" else f": {e}"
            raise UsageError(f"invalid integer value {raw[:40]!r} for {source}{why}") from None
    return raw


def parse_args(argv: Sequence[str], environ: Mapping[str, str]) -> Options:
    values: dict[str, Any] = {f.name: (list(f.default) if f.kind is list else f.default) for f in FLAGS}
    from_flags: set[str] = set()
    i = 0
    args = list(argv)
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            break
        if not arg.startswith("-") or arg == "-":
            raise UsageError(f"unexpected argument {arg!r}")
        name, eq, val = arg.lstrip("-").partition("=")
        if name in ("h", "help"):
            raise UsageError("")
        flag = _BY_NAME.get(name)
        if flag is None:
            raise UsageError(f"flag provided but not defined: -{name}")
        if not eq:
            if flag.kind is bool:
                val = "true"
            else:
                if i >= len(args):
                    raise UsageError(f"flag needs an argument: -{name}")
                val = args[i]
                i += 1
        v = _convert(flag, val, f"-{name}")
        if flag.kind is list:
            if name not in from_flags:
                values[name] = []
            values[name].append(v)
        else:
            values[name] = v
        from_flags.add(name)
    for flag in FLAGS:
        if flag.name in from_flags:
            continue
        env = "FLANNELD_" + flag.name.upper().replace("-", "_")
        if env in environ:
            raw = environ[env]
            if flag.kind is list:
                values[flag.name] = [p.strip() for p in raw.split(",") if p.strip()]
            else:
                values[flag.name] = _convert(flag, raw, env)
    margin = values["subnet-lease-renew-margin"]
    if not 1 <= margin <= 1439:
        raise UsageError("--subnet-lease-renew-margin must be between 1 and 1439 minutes")
    port = values["healthz-port"]
    if not 0 <= port <= 65535:
        raise UsageError(f"--healthz-port must be between 0 (off) and 65535, got {port}")
    if values["iptables-resync"] < 1:
        raise UsageError("--iptables-resync must be at least 1 second")
    if values["reconcile-interval"] < 1:
        raise UsageError("--reconcile-interval must be at least 1 second")
    return Options(values)


def usage() -> str:
    lines = ["Usage: flanneld [OPTION]...", ""]
    for f in FLAGS:
        kind = {str: " string", int: " int", bool: "", list: " value"}[f.kind]
        default = f" (default {f.default!r})" if f.default not in ("", [], False, 0, None) else ""
        lines.append(f"  -{f.name}{kind}\n    \t{f.help}{default}")
    return "\n".join(lines)
