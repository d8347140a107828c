"""The `flannel` CNI plugin executable: ADD, DEL, CHECK, VERSION, STATUS and GC.

Standard library only and lazy about imports: the runtime execs this once per pod and command, so start-up
time is the plugin's cost. `posix` stands in for `os` (whose import, _collections_abc mostly, is about
1.6 ms of a ~10 ms run), the delegate (bridge, ...) is started with posix_spawn rather than subprocess
(about 10 ms to import), and the executable ends with _exit once its output is flushed: the interpreter's
orderly shutdown (module teardown, a last GC) is another ~2 ms and frees nothing the kernel would not.
(Exec'ing the delegate in place of the plugin on ADD was measured too: no gain over posix_spawn, which is
a vfork.) Logging goes to stderr (the runtime collects it); the logging module is imported only on the rare
paths that log.

Behaviour follows upstream flannel-io/cni-plugin plus the reference library's skel validation, with these
deliberate differences: DEL keeps the stored config when the delegate's DEL fails (upstream loses it), an
empty or corrupt stored config is logged and removed, CHECK/STATUS/GC do real work, and a 1.1.0 config is
spoken to the delegate as 1.0.0 (the reference plugins stop at 1.0.0) and answered as 1.1.0.
"""

import posix
import sys

from pyflannel.cni import _fastjson
from pyflannel.cni.conf import (
    CURRENT_VERSION,
    ERR_DECODE,
    ERR_INCOMPATIBLE_VERSION,
    ERR_INTERNAL,
    ERR_INVALID_CONFIG,
    ERR_INVALID_ENV,
    ERR_PLUGIN_NOT_AVAILABLE,
    ERR_TRY_AGAIN_LATER,
    ERR_UNKNOWN_CONTAINER,
    SUPPORTED_VERSIONS,
    CNIError,
    FlannelNetConf,
    SubnetEnvError,
    build_delegate,
    decode_object,
    delegate_bytes,
    go_get,
    go_json,
    load_netconf,
    load_subnet_env,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, BinaryIO, NoReturn

# Quoted annotations instead of `from __future__ import annotations`: see conf.py.
ABOUT = "CNI Plugin flannel version 0.1.0 (pyflannel)"
_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_NAME_CHARS = _ALNUM | frozenset("_.-")
_MAX_IFNAME = 15
# Which env vars each command needs (reference library skel.getCmdArgsFromEnv).
_REQUIRED: dict[str, tuple[str, ...]] = {
    "CNI_CONTAINERID": ("ADD", "CHECK", "DEL"),
    "CNI_NETNS": ("ADD", "CHECK"),
    "CNI_IFNAME": ("ADD", "CHECK", "DEL"),
    "CNI_ARGS": (),
    "CNI_PATH": ("ADD", "CHECK", "DEL", "GC", "STATUS"),
}
# The newest version the reference plugins shipped by distributions speak.
_DELEGATE_MAX = "1.0.0"


def _log(msg: str) -> None:
    import logging

    logging.getLogger(__name__).warning("%s", msg)


# ---------------------------------------------------------------------------------------------------------
# validation (skel)


def valid_cni_name(s: str) -> bool:
    """`^[a-zA-Z0-9][a-zA-Z0-9_.\\-]*$` without importing re (about 3 ms of start-up)."""
    return bool(s) and s[0] in _ALNUM and all(c in _NAME_CHARS for c in s)


def _validate_container_id(cid: str) -> None:
    if not valid_cni_name(cid):
        raise CNIError(ERR_INVALID_ENV, "invalid characters in containerID", cid)


def _validate_ifname(name: str) -> None:
    if len(name.encode("utf-8", "surrogateescape")) > _MAX_IFNAME:
        raise CNIError(
            ERR_INVALID_ENV,
            "interface name is too long",
            f"interface name should be less than {_MAX_IFNAME + 1} characters",
        )
    if name in (".", ".."):
        raise CNIError(ERR_INVALID_ENV, "interface name is . or ..")
    if any(c in "/:" or c.isspace() for c in name):
        raise CNIError(ERR_INVALID_ENV, "interface name contains / or : or whitespace characters")


def _validate_name(raw: "dict[str, Any]") -> None:
    _, name = go_get(raw, "name")
    if name is not None and not isinstance(name, str):
        raise CNIError(ERR_DECODE, "error unmarshall network config: json: cannot unmarshal name into a string")
    if not name:
        raise CNIError(ERR_INVALID_CONFIG, "missing network name")
    if not valid_cni_name(name):
        raise CNIError(ERR_INVALID_CONFIG, "invalid characters found in network name", name)


def _config_version(raw: "dict[str, Any]") -> str:
    _, v = go_get(raw, "cniVersion")
    if v is not None and not isinstance(v, str):
        raise CNIError(ERR_DECODE, "decoding version from network config: cniVersion is not a string")
    return v or "0.1.0"


def _parse_version(v: str) -> tuple[int, int, int]:
    parts = v.split(".")
    try:
        if len(parts) != 3 or any(not p.isdigit() for p in parts):
            raise ValueError
        return (int(parts[0]), int(parts[1]), int(parts[2]))
    except ValueError:
        raise CNIError(ERR_DECODE, f"unable to parse version string: {v}") from None


def _check_supported(version: str) -> None:
    if version not in SUPPORTED_VERSIONS:
        supported = " ".join(f'"{s}"' for s in SUPPORTED_VERSIONS)
        raise CNIError(
            ERR_INCOMPATIBLE_VERSION,
            "incompatible CNI versions",
            f'config is "{version}", plugin supports [{supported}]',
        )


def _check_floor(cmd: str, version: str, floor: str) -> None:
    if _parse_version(version) < _parse_version(floor):
        raise CNIError(ERR_INCOMPATIBLE_VERSION, f"config version does not allow {cmd}")


# ---------------------------------------------------------------------------------------------------------
# running the delegate


def _join(d: str, name: str) -> str:
    """os.path.join for a `name` without slashes."""
    if not d:
        return name
    return d + name if d.endswith("/") else f"{d}/{name}"


def find_in_path(plugin: str, cni_path: str) -> str:
    if "/" in plugin:
        raise CNIError(ERR_INTERNAL, f"invalid plugin name: {plugin}")
    dirs = [d for d in cni_path.split(":") if d]
    for d in dirs:
        p = _join(d, plugin)
        try:
            st = posix.stat(p)
        except OSError:
            continue
        if (st.st_mode & 0o170000) == 0o100000:
            return p
    raise CNIError(ERR_INTERNAL, f'failed to find plugin "{plugin}" in path [{" ".join(dirs)}]')


def exec_plugin(path: str, stdin: bytes, env: dict[str, str]) -> tuple[int, bytes]:
    """Run a plugin with `stdin`; its stderr is ours. Returns (exit status, stdout)."""
    rin, win = posix.pipe()
    rout, wout = posix.pipe()
    try:
        pid = posix.posix_spawn(
            path,
            [path],
            env,
            file_actions=[(posix.POSIX_SPAWN_DUP2, rin, 0), (posix.POSIX_SPAWN_DUP2, wout, 1)],
        )
    except OSError as e:
        for fd in (rin, win, rout, wout):
            posix.close(fd)
        raise CNIError(ERR_INTERNAL, f"failed to exec {path}: {e}") from None
    posix.close(rin)
    posix.close(wout)
    try:
        # Configs are a few KiB, far below the pipe buffer, and plugins read all of stdin before writing.
        view = memoryview(stdin)
        while view:
            n = posix.write(win, view)
            view = view[n:]
    except BrokenPipeError:
        pass
    finally:
        posix.close(win)
    chunks: list[bytes] = []
    try:
        while True:
            b = posix.read(rout, 65536)
            if not b:
                break
            chunks.append(b)
    finally:
        posix.close(rout)
    _, status = posix.waitpid(pid, 0)
    return posix.waitstatus_to_exitcode(status), b"".join(chunks)


def _plugin_error(rc: int, out: bytes) -> CNIError:
    """The delegate's own error (code, msg, details), passed through like the reference library does."""
    if not out.strip():
        return CNIError(ERR_INTERNAL, f"netplugin failed with no error message: exit status {rc}")
    try:
        e = _fastjson.loads(out)
        code = int(e.get("code", 0)) or ERR_INTERNAL
        return CNIError(code, str(e.get("msg", "")), str(e.get("details", "") or ""))
    except (ValueError, AttributeError, TypeError) as err:
        return CNIError(ERR_INTERNAL, f"netplugin failed but error parsing its diagnostic message {out!r}: {err}")


def _delegate_env(env: dict[str, str], command: str) -> dict[str, str]:
    denv = dict(env)
    denv["CNI_COMMAND"] = command
    return denv


def _to_delegate_version(conf: bytes, version: str) -> bytes:
    """A 1.1.0 config talks 1.0.0 to the delegate: ADD/DEL/CHECK are the same in both."""
    if version != "1.1.0":
        return conf
    d = _fastjson.loads(conf)
    d["cniVersion"] = _DELEGATE_MAX
    prev = d.get("prevResult")
    if isinstance(prev, dict) and prev.get("cniVersion") == "1.1.0":
        prev["cniVersion"] = _DELEGATE_MAX
    return go_json(d)


def call_delegate(env: dict[str, str], command: str, dtype: str, conf: bytes, version: str) -> bytes:
    path = find_in_path(dtype, env.get("CNI_PATH", ""))
    rc, out = exec_plugin(path, _to_delegate_version(conf, version), _delegate_env(env, command))
    if rc != 0:
        raise _plugin_error(rc, out)
    return out


def delegate_versions(env: dict[str, str], dtype: str) -> list[str]:
    path = find_in_path(dtype, env.get("CNI_PATH", ""))
    rc, out = exec_plugin(path, go_json({"cniVersion": CURRENT_VERSION}), _delegate_env(env, "VERSION"))
    if rc != 0:
        raise _plugin_error(rc, out)
    try:
        vs = _fastjson.loads(out).get("supportedVersions") or []
        return [str(v) for v in vs]
    except (ValueError, AttributeError):
        return []


# ---------------------------------------------------------------------------------------------------------
# the stored delegate config


def _stored_path(data_dir: str, cid: str) -> str:
    return _join(data_dir, cid)


def _makedirs(path: str, mode: int) -> None:
    """os.makedirs(path, mode, exist_ok=True): parents get the default mode, as there."""
    try:
        posix.mkdir(path, mode)
    except FileExistsError:
        return
    except FileNotFoundError:
        parent = path.rstrip("/").rpartition("/")[0]
        if not parent or parent == path:
            raise
        _makedirs(parent, 0o777)
        posix.mkdir(path, mode)


def save_scratch(data_dir: str, cid: str, data: bytes) -> None:
    """Write `<dataDir>/<cid>` durably (0600 in a 0700 dir) before the delegate creates anything."""
    _makedirs(data_dir, 0o700)
    path = _stored_path(data_dir, cid)
    tmp = f"{path}.tmp{posix.getpid()}"
    fd = posix.open(tmp, posix.O_WRONLY | posix.O_CREAT | posix.O_TRUNC | posix.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[posix.write(fd, view) :]
        posix.fsync(fd)
    finally:
        posix.close(fd)
    posix.rename(tmp, path)
    dfd = posix.open(data_dir or ".", posix.O_RDONLY | posix.O_DIRECTORY | posix.O_CLOEXEC)
    try:
        posix.fsync(dfd)
    finally:
        posix.close(dfd)


def _read_stored(data_dir: str, cid: str) -> "tuple[bytes | None, dict[str, Any] | None]":
    """(bytes, parsed) of the stored config; (None, None) when missing; (bytes, None) when unusable."""
    try:
        with open(_stored_path(data_dir, cid), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None, None
    try:
        d = _fastjson.loads(data)
    except ValueError:
        return data, None
    if not isinstance(d, dict) or not isinstance(d.get("type"), str) or not d["type"]:
        return data, None
    return data, d


# ---------------------------------------------------------------------------------------------------------
# commands


def _load_fenv(n: FlannelNetConf, version: str) -> "Any":
    try:
        return load_subnet_env(n.subnet_file)
    except FileNotFoundError as e:
        # flanneld not up yet: transient, and the spec (>= 1.0.0) has a code for that.
        code = ERR_TRY_AGAIN_LATER if _parse_version(version) >= (1, 0, 0) else ERR_INTERNAL
        raise CNIError(code, f"open {n.subnet_file}: no such file or directory", str(e)) from None
    except OSError as e:
        raise CNIError(ERR_INTERNAL, f"open {n.subnet_file}: {e.strerror}") from None
    except SubnetEnvError as e:
        raise CNIError(ERR_INTERNAL, str(e)) from None


def cmd_add(env: dict[str, str], n: FlannelNetConf, version: str, out: "BinaryIO") -> None:
    fenv = _load_fenv(n, version)
    d = build_delegate(n, fenv)
    data = delegate_bytes(d)
    try:
        save_scratch(n.data_dir, env["CNI_CONTAINERID"], data)
    except OSError as e:
        raise CNIError(ERR_INTERNAL, f"failed to save delegate config in {n.data_dir}: {e}") from None
    # A failed delegate ADD keeps the stored file: the runtime's following DEL needs it to clean up.
    result = call_delegate(env, "ADD", d["type"], data, version)
    if version == "1.1.0":
        try:
            r = _fastjson.loads(result)
        except ValueError:
            raise CNIError(
                ERR_DECODE, "failed to decode the delegate's result", result.decode(errors="replace")
            ) from None
        r["cniVersion"] = version
        result = _fastjson.dumps(r).encode()
    out.write(result)


def cmd_del(env: dict[str, str], n: FlannelNetConf, version: str, out: "BinaryIO") -> None:
    cid = env["CNI_CONTAINERID"]
    data, d = _read_stored(n.data_dir, cid)
    path = _stored_path(n.data_dir, cid)
    if data is None:
        return  # never added, or already deleted
    if d is None:
        # No config to hand the delegate: its leftovers go with the node's next reboot, as upstream.
        _log(f"flannel DEL: stored delegate config {path} is empty or corrupt; removing it")
        _remove(path)
        return
    dver = d.get("cniVersion") if isinstance(d.get("cniVersion"), str) else version
    call_delegate(env, "DEL", d["type"], data, dver or version)
    _remove(path)


def _remove(path: str) -> None:
    try:
        posix.remove(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        _log(f"flannel DEL: cannot remove {path}: {e}")


def cmd_check(env: dict[str, str], n: FlannelNetConf, version: str, out: "BinaryIO") -> None:
    cid = env["CNI_CONTAINERID"]
    data, d = _read_stored(n.data_dir, cid)
    if data is None:
        raise CNIError(ERR_UNKNOWN_CONTAINER, f"no stored delegate config for container {cid}")
    if d is None:
        raise CNIError(ERR_INTERNAL, f"stored delegate config for container {cid} is corrupt")
    if n.prev_result is not None:
        d["prevResult"] = _explicit_route_gateways(n.prev_result)
    dver = d.get("cniVersion") if isinstance(d.get("cniVersion"), str) else version
    call_delegate(env, "CHECK", d["type"], go_json(d), dver or version)


def _explicit_route_gateways(prev: "dict[str, Any]") -> "dict[str, Any]":
    """Give gateway-less routes the gateway ADD actually used.

    host-local returns flannel's network routes without `gw`, and the bridge installs them via the pod's
    gateway; the reference bridge's CHECK then looks for a route with no gateway and fails. Naming the
    gateway makes CHECK compare what is really there.
    """
    ips = prev.get("ips")
    routes = prev.get("routes")
    if not isinstance(ips, list) or not isinstance(routes, list):
        return prev
    gw4 = gw6 = None
    for ip in ips:
        gw = ip.get("gateway") if isinstance(ip, dict) else None
        if isinstance(gw, str):
            if ":" in gw:
                gw6 = gw6 or gw
            else:
                gw4 = gw4 or gw
    fixed = []
    for r in routes:
        if isinstance(r, dict) and not r.get("gw") and isinstance(r.get("dst"), str):
            gw = gw6 if ":" in r["dst"] else gw4
            if gw:
                r = {**r, "gw": gw}
        fixed.append(r)
    return {**prev, "routes": fixed}


def cmd_status(env: dict[str, str], n: FlannelNetConf, version: str, out: "BinaryIO") -> None:
    try:
        fenv = load_subnet_env(n.subnet_file)
    except (OSError, SubnetEnvError) as e:
        raise CNIError(ERR_PLUGIN_NOT_AVAILABLE, "flannel is not ready: cannot use subnet.env", str(e)) from None
    d = build_delegate(n, fenv)
    try:
        versions = delegate_versions(env, d["type"])
    except CNIError as e:
        raise CNIError(ERR_PLUGIN_NOT_AVAILABLE, f"delegate {d['type']} is not available", e.msg) from None
    if version in versions:
        call_delegate(env, "STATUS", d["type"], delegate_bytes(d), "")


def cmd_gc(env: dict[str, str], n: FlannelNetConf, version: str, out: "BinaryIO") -> None:
    try:
        fenv = load_subnet_env(n.subnet_file)
    except (OSError, SubnetEnvError) as e:
        _log(f"flannel GC: skipped, subnet.env unusable: {e}")
        return
    d = build_delegate(n, fenv)
    if version not in delegate_versions(env, d["type"]):
        _log(f"flannel GC: delegate {d['type']} does not speak {version}; nothing collected")
        return
    found, valid = go_get(n.raw, "cni.dev/valid-attachments")
    if found:
        d["cni.dev/valid-attachments"] = valid
    call_delegate(env, "GC", d["type"], go_json(d), "")
    # The delegate has released what the stale attachments held: their stored configs are now garbage.
    keep = {a.get("containerID") for a in valid or [] if isinstance(a, dict)} if found else None
    if keep is None:
        return
    try:
        names = posix.listdir(n.data_dir)
    except OSError:
        return
    for name in names:
        if name not in keep and valid_cni_name(name) and ".tmp" not in name:
            _remove(_join(n.data_dir, name))


_COMMANDS = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "STATUS": cmd_status, "GC": cmd_gc}
_FLOORS = {"CHECK": "0.4.0", "GC": "1.1.0", "STATUS": "1.1.0"}


def run(env: dict[str, str], stdin: "BinaryIO", out: "BinaryIO", err: "Any") -> int:
    """The whole plugin as a function: reads env/stdin, writes the result or error JSON to `out`."""
    version = CURRENT_VERSION
    try:
        cmd = env.get("CNI_COMMAND", "")
        missing = [] if cmd else ["CNI_COMMAND"]
        for var, cmds in _REQUIRED.items():
            val = env.get(var, "")
            if not val:
                if cmd in cmds:
                    missing.append(var)
            elif cmd in cmds and var == "CNI_CONTAINERID":
                _validate_container_id(val)
            elif cmd in cmds and var == "CNI_IFNAME":
                _validate_ifname(val)
        if missing:
            if not cmd:
                err.write(f"{ABOUT}\nCNI protocol versions supported: {', '.join(SUPPORTED_VERSIONS)}\n")
                return 0
            raise CNIError(ERR_INVALID_ENV, f"required env variables [{','.join(missing)}] missing")
        if cmd == "VERSION":
            out.write(go_json({"cniVersion": CURRENT_VERSION, "supportedVersions": list(SUPPORTED_VERSIONS)}))
            return 0
        raw = decode_object(stdin.read())
        _validate_name(raw)
        fn = _COMMANDS.get(cmd)
        if fn is None:
            raise CNIError(ERR_INVALID_ENV, f"unknown CNI_COMMAND: {cmd}")
        version = _config_version(raw)
        if cmd in _FLOORS:
            _check_floor(cmd, version, _FLOORS[cmd])
        _check_supported(version)
        n = load_netconf(raw)
        fn(env, n, version, out)
        return 0
    except CNIError as e:
        out.write(_fastjson.dumps(e.to_dict(version if version in SUPPORTED_VERSIONS else CURRENT_VERSION)).encode())
        return 1
    except Exception as e:  # a plugin must answer with CNI error JSON, whatever happened
        out.write(_fastjson.dumps(CNIError(ERR_INTERNAL, f"{type(e).__name__}: {e}").to_dict()).encode())
        return 1


def main() -> "NoReturn":
    """The executable: runs the plugin and leaves with _exit, skipping the interpreter's shutdown."""
    enc, errors = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
    env = {k.decode(enc, errors): v.decode(enc, errors) for k, v in posix.environ.items()}
    rc = run(env, sys.stdin.buffer, sys.stdout.buffer, sys.stderr)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        rc = rc or 1  # the runtime never got the answer
    posix._exit(rc)


if __name__ == "__main__":
    sys.exit(main())
