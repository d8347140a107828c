"""The `flannel` CNI plugin executable: ADD, DEL, CHECK, VERSION, STATUS and GC.

Standard library only and lazy about imports: the runtime execs this once per pod and command, so start-up
time is the plugin's cost. `posix` stands in for `os` (whose import, _collections_abc mostly, is about
1.6 ms of a ~10 ms run), the delegate (bridge, ...) is started with posix_spawn rather than subprocess
(about 10 ms to import), and the executable ends with _exit once its output is flushed: the interpreter's
orderly shutdown (module teardown, a last GC) is another ~2 ms and frees nothing the kernel would not.
(Exec'ing the delegate in place of the plugin on ADD was measured too: no gain over posix_spawn, which is
a vfork.) Warnings go to the call's stderr (the runtime collects it), one line each, as the logging module's
last-resort handler wrote them.

run() is the whole plugin as a function of one call (a Call: environment, stdout, stderr, the delegates'
stderr). flanneld's CNI server (pyflannel/cniserver.py) runs it for the `flannel` client, several calls at once
in threads, so nothing of a call lives in module or process state: not os.environ, not fd 2, not the pid alone
(the stored config's temporary name also carries the thread), not the big-number flag of _fastjson.

Behaviour follows upstream flannel-io/cni-plugin plus the reference library's skel validation: the same
checks in the same order, the same error codes and the same message texts (Go's, from _goerr on the error
paths), the error JSON in libcni's layout. Deliberate differences (the README's CNI section lists them too):
- DEL keeps the stored config when the delegate's DEL fails (upstream loses it); an empty or corrupt stored
  config is logged and removed; DEL succeeds where nothing can have been stored (a container ID too long for
  a file name, a dataDir that is a file), where upstream answers 999;
- CHECK/STATUS/GC do real work, and a 1.1.0 config is spoken to the delegate as 1.0.0 (the reference plugins
  stop at 1.0.0) and answered as 1.1.0;
- a missing subnet.env is code 11 (try again later) for configs of 1.0.0 and later, where upstream says 999;
- the error JSON carries `cniVersion` (the spec asks for it; libcni leaves it out);
- what Go would crash or hang on is a clear error: subnet.env that is not a regular file or over 1 MiB, a
  subnet.env line without `=`, stdin over 16 MiB, JSON nested deeper than 512 levels (Go: 10000), a
  delegate printing more than 16 MiB;
- a route without `dst` is refused (upstream stores "<nil>" and leaves the refusal to the delegate); a
  delegate that fails without a code is 999 (libcni passes 0 on).
"""

import _thread
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
    ERR_IO,
    ERR_PLUGIN_NOT_AVAILABLE,
    ERR_TRY_AGAIN_LATER,
    ERR_UNKNOWN_CONTAINER,
    SUPPORTED_VERSIONS,
    CNIError,
    FlannelNetConf,
    SubnetEnvError,
    build_delegate,
    config_version,
    decode_object,
    delegate_bytes,
    go_get,
    go_json,
    load_netconf,
    load_subnet_env,
    read_file,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
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


class Call:
    """One run of the plugin: its CNI environment (also the delegates' environment), where the answer (`out`,
    bytes) and the warnings (`err`, text) go, and the delegates' stderr (a file descriptor; None: fd 2)."""

    __slots__ = ("delegate_stderr", "env", "err", "out")

    def __init__(self, env: dict[str, str], out: "BinaryIO", err: "Any", delegate_stderr: "int | None" = None) -> None:
        self.env = env
        self.out = out
        self.err = err
        self.delegate_stderr = delegate_stderr


def _log(c: Call, msg: str) -> None:
    """A warning on the call's stderr, as logging's last-resort handler wrote it (the message and a newline),
    and like it never failing the call."""
    try:  # noqa: SIM105  (contextlib is an import the plugin does without)
        c.err.write(msg + "\n")
    except Exception:
        pass


# ---------------------------------------------------------------------------------------------------------
# validation (skel)


def valid_cni_name(s: str) -> bool:
    """`^[a-zA-Z0-9][a-zA-Z0-9_.\\-]*$` without importing re (about 3 ms of start-up)."""
    return bool(s) and s[0] in _ALNUM and all(c in _NAME_CHARS for c in s)


def _validate_container_id(cid: str) -> None:
    if not valid_cni_name(cid):
        raise CNIError(ERR_INVALID_ENV, "invalid characters in containerID", cid)


# Python's isspace() also takes the ASCII separators U+001C..U+001F, which Go's unicode.IsSpace does not.
_NOT_GO_SPACE = frozenset("\x1c\x1d\x1e\x1f")


def _validate_ifname(name: str) -> None:
    if len(name.encode("utf-8", "surrogateescape")) > _MAX_IFNAME:
        raise CNIError(
            ERR_INVALID_ENV,
            "interface name is too long",
            f"interface name should be less than {_MAX_IFNAME + 1} characters",
        )
    if name in (".", ".."):
        raise CNIError(ERR_INVALID_ENV, "interface name is . or ..")
    if any(c in "/:" or (c.isspace() and c not in _NOT_GO_SPACE) for c in name):
        raise CNIError(ERR_INVALID_ENV, "interface name contains / or : or whitespace characters")


def _validate_name(raw: "dict[str, Any]") -> None:
    _, name = go_get(raw, "name")  # a string or None: decode_object checked
    if not name:
        raise CNIError(ERR_INVALID_CONFIG, "missing network name")
    if not valid_cni_name(name):
        raise CNIError(ERR_INVALID_CONFIG, "invalid characters found in network name", name)


_PARSED = {"0.1.0": (0, 1, 0), "0.2.0": (0, 2, 0), "0.3.0": (0, 3, 0), "0.3.1": (0, 3, 1), "0.4.0": (0, 4, 0),
           "1.0.0": (1, 0, 0), "1.1.0": (1, 1, 0)}  # fmt: skip


def _parse_version(v: str) -> tuple[int, int, int]:
    """version.ParseVersion; code 6 with its message."""
    if v in _PARSED:
        return _PARSED[v]
    from pyflannel.cni import _goerr

    try:
        return _goerr.parse_version(v)
    except ValueError as e:
        raise CNIError(ERR_DECODE, str(e)) from None


def _check_supported(version: str) -> None:
    if version not in SUPPORTED_VERSIONS:
        from pyflannel.cni import _goerr

        supported = " ".join(_goerr.quote(s) for s in SUPPORTED_VERSIONS)
        raise CNIError(
            ERR_INCOMPATIBLE_VERSION,
            "incompatible CNI versions",
            f"config is {_goerr.quote(version)}, plugin supports [{supported}]",
        )


def _check_floor(cmd: str, version: str, floor: str) -> None:
    """skel for CHECK/GC/STATUS: the config's version is at least `floor`, and some version of ours is at
    least the config's."""
    v = _parse_version(version)
    if v < _parse_version(floor):
        raise CNIError(ERR_INCOMPATIBLE_VERSION, f"config version does not allow {cmd}")
    if v > _PARSED[SUPPORTED_VERSIONS[-1]]:
        raise CNIError(ERR_INCOMPATIBLE_VERSION, f"plugin version does not allow {cmd}")


# ---------------------------------------------------------------------------------------------------------
# running the delegate

# A delegate's result is a few KiB; one that prints without end is cut off here instead of filling memory.
_MAX_DELEGATE_OUTPUT = 16 << 20


def _go_err(e: BaseException) -> str:
    from pyflannel.cni import _goerr

    return _goerr.strerror(e)


def _path_error(op: str, path: str, e: BaseException) -> str:
    from pyflannel.cni import _goerr

    return _goerr.path_error(op, path, e)


def _join(d: str, name: str) -> str:
    """filepath.Join for a `name` without slashes."""
    if not d:
        return name
    return d + name if d.endswith("/") else f"{d}/{name}"


def find_in_path(plugin: str, cni_path: str) -> str:
    """invoke.FindInPath, with its messages."""
    if not plugin:
        raise CNIError(ERR_INTERNAL, "no plugin name provided")
    if "/" in plugin:
        raise CNIError(ERR_INTERNAL, f"invalid plugin name: {plugin}")
    dirs = [d for d in cni_path.split(":") if d]
    if not dirs:
        raise CNIError(ERR_INTERNAL, "no paths provided")
    for d in dirs:
        p = _join(d, plugin)
        try:
            st = posix.stat(p)
        except (OSError, ValueError):  # ValueError: a NUL in the name
            continue
        if (st.st_mode & 0o170000) == 0o100000:
            return p
    raise CNIError(ERR_INTERNAL, f'failed to find plugin "{plugin}" in path [{" ".join(dirs)}]')


def exec_plugin(
    path: str,
    stdin: bytes,
    env: dict[str, str],
    stderr: "int | None" = None,
    before_input: "Callable[[], None] | None" = None,
) -> tuple[int, bytes]:
    """Run a plugin with `stdin`; its stderr is `stderr` (default: ours). Returns (exit status, stdout).

    `before_input` runs once the plugin has started and before it has its stdin (or, when it cannot start,
    before that error): a plugin reads its whole config before it acts, so what runs there is done before
    the plugin does anything, in the time its runtime takes to start. When it raises, the plugin, which has
    read nothing, is killed and reaped, and its error is the one raised."""
    rin, win = posix.pipe()
    rout, wout = posix.pipe()
    actions = [(posix.POSIX_SPAWN_DUP2, rin, 0), (posix.POSIX_SPAWN_DUP2, wout, 1)]
    if stderr is not None:
        actions.append((posix.POSIX_SPAWN_DUP2, stderr, 2))
    try:
        pid = posix.posix_spawn(path, [path], env, file_actions=actions)
    except (OSError, ValueError) as e:
        for fd in (rin, win, rout, wout):
            posix.close(fd)
        msg = f"netplugin failed with no error message: fork/exec {path}: {_go_err(e)}"
        if before_input is not None:
            before_input()
        raise CNIError(ERR_INTERNAL, msg) from None
    posix.close(rin)
    posix.close(wout)
    if before_input is not None:
        try:
            before_input()
        except BaseException:
            # Killed before its stdin closes: it never reads an (empty) config and acts on it.
            posix.kill(pid, 9)  # SIGKILL; `signal` is an import the plugin does without
            posix.waitpid(pid, 0)
            posix.close(win)
            posix.close(rout)
            raise
    try:
        # Configs are a few KiB, far below the pipe buffer, and plugins read all of stdin before writing.
        _write_all(win, stdin)
    except BrokenPipeError:
        pass
    finally:
        posix.close(win)
    chunks: list[bytes] = []
    size = 0
    try:
        while size <= _MAX_DELEGATE_OUTPUT:
            b = posix.read(rout, 65536)
            if not b:
                break
            chunks.append(b)
            size += len(b)
    finally:
        posix.close(rout)  # past the limit: the delegate's next write fails (EPIPE) and it ends
    _, status = posix.waitpid(pid, 0)
    if size > _MAX_DELEGATE_OUTPUT:
        raise CNIError(ERR_INTERNAL, f"netplugin {path} printed more than {_MAX_DELEGATE_OUTPUT} bytes")
    return posix.waitstatus_to_exitcode(status), b"".join(chunks)


def _exit_text(rc: int) -> str:
    """exec.ExitError's text: `exit status 1`, `signal: killed`."""
    if rc >= 0:
        return f"exit status {rc}"
    import signal

    try:
        name = signal.strsignal(-rc) or ""
    except ValueError:
        name = ""
    return f"signal: {name[:1].lower()}{name[1:]}" if name else f"signal {-rc}"


def _plugin_error(rc: int, out: bytes) -> CNIError:
    """invoke's pluginErr: the delegate's own error (code, msg, details) decoded as libcni's types.Error.

    All of these are CNI errors, which skel passes on unwrapped (no "failed to delegate add:")."""
    if not out:
        return _passed_on(CNIError(ERR_INTERNAL, f"netplugin failed with no error message: {_exit_text(rc)}"))
    try:
        e = _fastjson.loads(out)
        if e is None:
            e = {}
        if not isinstance(e, dict):
            raise ValueError(f"json: cannot unmarshal {_kind(e)} into Go value of type types.Error")
        _, code = go_get(e, "code")
        _, msg = go_get(e, "msg")
        _, details = go_get(e, "details")
        if code is not None and (
            isinstance(code, bool) or not isinstance(code, int) or isinstance(code, float) or not 0 <= code < 2**64
        ):
            text = f"number {code.text}" if hasattr(code, "text") else _num_text(code)
            raise ValueError(f"json: cannot unmarshal {text} into Go struct field Error.code of type uint")
        for key, v in (("msg", msg), ("details", details)):
            if v is not None and not isinstance(v, str):
                raise ValueError(f"json: cannot unmarshal {_kind(v)} into Go struct field Error.{key} of type string")
    except ValueError as err:
        from pyflannel.cni import _goerr

        return _passed_on(
            CNIError(
                ERR_INTERNAL,
                f"netplugin failed but error parsing its diagnostic message {_goerr.quote_bytes(out)}: {err}",
            )
        )
    # libcni passes a missing code on as 0 (ErrUnknown); 999 says the same and is what runtimes expect.
    return _passed_on(CNIError(int(code or 0) or ERR_INTERNAL, msg or "", details or ""))


def _passed_on(e: CNIError) -> CNIError:
    """Mark the delegate's own error result: passed on untouched (libcni's skel does not wrap a CNI error)."""
    e.passed_on = True  # type: ignore[attr-defined]
    return e


def _kind(v: "Any") -> str:
    from pyflannel.cni.conf import _go_type

    return _go_type(v)


def _num_text(v: "Any") -> str:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return _kind(v)
    from pyflannel.cni.conf import _go_float

    return f"number {_go_float(float(v))}"


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


def call_delegate(
    c: Call, command: str, dtype: str, conf: bytes, version: str, before_input: "Callable[[], None] | None" = None
) -> bytes:
    """The delegate's stdout. `before_input`: see exec_plugin; it also runs before an error finding the
    delegate, so that it always runs first."""
    try:
        path = find_in_path(dtype, c.env.get("CNI_PATH", ""))
        stdin = _to_delegate_version(conf, version)
    except BaseException:
        if before_input is not None:
            before_input()
        raise
    rc, out = exec_plugin(path, stdin, _delegate_env(c.env, command), c.delegate_stderr, before_input)
    if rc != 0:
        raise _plugin_error(rc, out)
    return out


def delegate_versions(c: Call, dtype: str) -> list[str]:
    path = find_in_path(dtype, c.env.get("CNI_PATH", ""))
    stdin = go_json({"cniVersion": CURRENT_VERSION})
    rc, out = exec_plugin(path, stdin, _delegate_env(c.env, "VERSION"), c.delegate_stderr)
    if rc != 0:
        raise _plugin_error(rc, out)
    try:
        vs = _fastjson.loads(out).get("supportedVersions") or []
        return [str(v) for v in vs]
    except (ValueError, AttributeError, TypeError):
        return []


# ---------------------------------------------------------------------------------------------------------
# the stored delegate config


def _stored_path(data_dir: str, cid: str) -> str:
    return _join(data_dir, cid)


def _is_dir(path: str) -> bool:
    try:
        return (posix.stat(path).st_mode & 0o170000) == 0o040000
    except (OSError, ValueError):
        return False


def _mkdir_all(path: str, mode: int) -> None:
    """os.MkdirAll as Go has it (parents get `mode` too), raising CNIError with its *PathError text."""
    try:
        st = posix.stat(path)
    except (OSError, ValueError):
        pass
    else:
        if (st.st_mode & 0o170000) == 0o040000:
            return
        raise CNIError(ERR_INTERNAL, f"mkdir {path}: not a directory")
    i = len(path)
    while i > 0 and path[i - 1] == "/":
        i -= 1
    j = i
    while j > 0 and path[j - 1] != "/":
        j -= 1
    if j > 1:
        _mkdir_all(path[: j - 1], mode)
    try:
        posix.mkdir(path, mode)
    except (OSError, ValueError) as e:
        if not _is_dir(path):
            raise CNIError(ERR_INTERNAL, _path_error("mkdir", path, e)) from None


class ScratchError(CNIError):
    """The stored config could not be written: ADD's own error, never wrapped as the delegate's."""


def save_scratch(data_dir: str, cid: str, data: bytes) -> "Callable[[], None]":
    """Write `<dataDir>/<cid>` (0600 in a 0700 dir) and return the rest, which makes it the stored config,
    durably (ScratchError when that fails, and then `<cid>` is as it was).

    ADD runs the rest while the delegate starts and before it is given its config (exec_plugin's
    before_input), so the delegate still creates nothing before its config is on disk, and the sync hides
    behind the delegate's start as far as it can. Errors name the stored file, as upstream's (which writes it
    in place) do.
    - A new container (the usual case): `<cid>` is created in place and the rest is one fsync of it, which
      also makes its directory entry durable on ext4, xfs and btrfs (their fsync of a new file commits its
      creation). A crash before the fsync ends can leave a partial file, but then the delegate has done
      nothing, and DEL removes a file it cannot use. The two fsyncs of the other way (a temporary file's,
      then dataDir's) cost each pod's ADD ~0.3 ms more: 1.65 against 1.37 ms added, in one run of 200
      interleaved ADDs beside the bridge alone.
    - `<cid>` exists (an earlier ADD's, which its DEL needs): the new config goes to a temporary file, and the
      rest is its fsync, the rename over `<cid>` and dataDir's fsync. A crash leaves either the earlier file
      or the whole new one. The temporary name starts with a dot, which no container ID does (so GC leaves it
      alone), and stays short (a long ID still fits); the pid and thread make it unique among concurrent
      calls (flanneld's CNI server runs several in one process)."""
    _mkdir_all(data_dir, 0o700)
    path = _stored_path(data_dir, cid)
    try:
        fd = posix.open(path, posix.O_WRONLY | posix.O_CREAT | posix.O_EXCL | posix.O_CLOEXEC, 0o600)
    except FileExistsError:
        return _replace_scratch(data_dir, path, data)
    except (OSError, ValueError) as e:
        raise ScratchError(ERR_INTERNAL, _path_error("open", path, e)) from None
    try:
        _write_all(fd, data)
    except (OSError, ValueError) as e:
        posix.close(fd)
        _unlink_quiet(path)
        raise ScratchError(ERR_INTERNAL, _path_error("write", path, e)) from None

    def store() -> None:  # run exactly once, by exec_plugin or call_delegate (before_input)
        try:
            posix.fsync(fd)
        except OSError as e:
            _unlink_quiet(path)
            raise ScratchError(ERR_INTERNAL, _path_error("sync", path, e)) from None
        finally:
            posix.close(fd)

    return store


def _replace_scratch(data_dir: str, path: str, data: bytes) -> "Callable[[], None]":
    """save_scratch over an existing `<cid>`."""
    tmp = _join(data_dir, f".tmp{posix.getpid()}.{_thread.get_ident()}")
    op = "open"
    try:
        fd = posix.open(tmp, posix.O_WRONLY | posix.O_CREAT | posix.O_TRUNC | posix.O_CLOEXEC, 0o600)
        try:
            op = "write"
            _write_all(fd, data)
        finally:
            posix.close(fd)
    except (OSError, ValueError) as e:
        _unlink_quiet(tmp)
        raise ScratchError(ERR_INTERNAL, _path_error(op, path, e)) from None

    def store() -> None:  # run exactly once, by exec_plugin or call_delegate (before_input)
        op = "sync"
        try:
            _fsync(tmp, posix.O_RDONLY)
            op = "open"  # the rename is where upstream's open of the final name would fail (a directory, ...)
            posix.rename(tmp, path)
            op = "sync"
            _fsync(data_dir or ".", posix.O_RDONLY | posix.O_DIRECTORY)
        except (OSError, ValueError) as e:
            _unlink_quiet(tmp)
            raise ScratchError(ERR_INTERNAL, _path_error(op, path, e)) from None

    return store


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[posix.write(fd, view) :]


def _fsync(path: str, flags: int) -> None:
    fd = posix.open(path, flags | posix.O_CLOEXEC)
    try:
        posix.fsync(fd)
    finally:
        posix.close(fd)


def _unlink_quiet(path: str) -> None:
    try:  # noqa: SIM105  (contextlib is an import the plugin does without)
        posix.remove(path)
    except (OSError, ValueError):
        pass


# errnos that say nothing can be stored under that path: DEL has nothing to undo.
_NOTHING_STORED = (2, 20, 21, 36, 40)  # ENOENT, ENOTDIR, EISDIR, ENAMETOOLONG, ELOOP
_MAX_STORED = 1 << 20


def _read_stored(data_dir: str, cid: str) -> "tuple[bytes | None, dict[str, Any] | None]":
    """(bytes, parsed) of the stored config; (None, None) when nothing is stored there; (bytes, None) when
    unusable (corrupt, empty, not a regular file, oversized)."""
    path = _stored_path(data_dir, cid)
    try:
        data = read_file(path, _MAX_STORED)
    except OSError as e:
        if e.errno in _NOTHING_STORED:
            return None, None
        raise CNIError(ERR_INTERNAL, _path_error("open", path, e)) from None
    except ValueError:  # a NUL cannot be in a path we wrote
        return None, None
    except SubnetEnvError:  # read_file's refusals: not a regular file, too big
        return b"", None
    try:
        d = _fastjson.loads(data)
    except ValueError:
        return data, None
    if not isinstance(d, dict) or not isinstance(d.get("type"), str) or not d["type"]:
        return data, None
    return data, d


# ---------------------------------------------------------------------------------------------------------
# commands


def _load_fenv(n: FlannelNetConf, version: str, context: str) -> "Any":
    try:
        return load_subnet_env(n.subnet_file)
    except FileNotFoundError:
        # flanneld not up yet: transient, and the spec (>= 1.0.0) has a code for that.
        code = ERR_TRY_AGAIN_LATER if _parse_version(version) >= (1, 0, 0) else ERR_INTERNAL
        raise CNIError(code, f"{context}open {n.subnet_file}: no such file or directory") from None
    except (OSError, ValueError) as e:
        raise CNIError(ERR_INTERNAL, context + _path_error("open", n.subnet_file, e)) from None
    except SubnetEnvError as e:
        raise CNIError(ERR_INTERNAL, f"{context}{e}") from None


def cmd_add(c: Call, n: FlannelNetConf, version: str) -> None:
    fenv = _load_fenv(n, version, "loadFlannelSubnetEnv failed: ")
    d = build_delegate(n, fenv)
    data = delegate_bytes(d)
    store = save_scratch(n.data_dir, c.env["CNI_CONTAINERID"], data)
    # A failed delegate ADD keeps the stored file: the runtime's following DEL needs it to clean up.
    try:
        result = call_delegate(c, "ADD", d["type"], data, version, store)
    except CNIError as e:
        if isinstance(e, ScratchError) or getattr(e, "passed_on", False):
            raise
        raise CNIError(e.code, f"failed to delegate add: {e.msg}", e.details) from None
    if version == "1.1.0":
        try:
            r = _fastjson.loads(result)
            r["cniVersion"] = version
            result = _print_result(r)
        except (ValueError, TypeError, AttributeError) as e:
            raise CNIError(ERR_DECODE, f"failed to delegate add: failed to decode the delegate's result: {e}") from None
    c.out.write(result)


def _print_result(r: "dict[str, Any]") -> bytes:
    """types.Result.Print() as upstream answers ADD: json.MarshalIndent with four spaces, no trailing newline,
    <>& escaped. The delegate printed its 1.0.0 result the same way (the 1.0.0 and 1.1.0 results are one Go
    struct), so its field order, kept here, is the struct's; only cniVersion changes."""
    from pyflannel.cni.conf import _HTML_ESCAPES, _go_float

    text = _fastjson.dumps_indent(r, _go_float)
    for ch, esc in _HTML_ESCAPES:
        if ch in text:
            text = text.replace(ch, esc)
    return text.encode("utf-8", "surrogateescape")


def cmd_del(c: Call, n: FlannelNetConf, version: str) -> None:
    cid = c.env["CNI_CONTAINERID"]
    data, d = _read_stored(n.data_dir, cid)
    path = _stored_path(n.data_dir, cid)
    if data is None:
        return  # never added, or already deleted
    if d is None:
        # No config to hand the delegate: its leftovers go with the node's next reboot, as upstream.
        _log(c, f"flannel DEL: stored delegate config {path} is empty or corrupt; removing it")
        _remove(c, path)
        return
    dver = d.get("cniVersion") if isinstance(d.get("cniVersion"), str) else version
    call_delegate(c, "DEL", d["type"], data, dver or version)
    _remove(c, path)


def _remove(c: Call, path: str) -> None:
    try:
        posix.remove(path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        _log(c, f"flannel DEL: cannot remove {path}: {_go_err(e)}")


def cmd_check(c: Call, n: FlannelNetConf, version: str) -> None:
    cid = c.env["CNI_CONTAINERID"]
    data, d = _read_stored(n.data_dir, cid)
    if data is None:
        raise CNIError(ERR_UNKNOWN_CONTAINER, f"no stored delegate config for container {cid}")
    if d is None:
        raise CNIError(ERR_INTERNAL, f"stored delegate config for container {cid} is corrupt")
    if n.prev_result is not None:
        d["prevResult"] = _explicit_route_gateways(n.prev_result)
    dver = d.get("cniVersion") if isinstance(d.get("cniVersion"), str) else version
    call_delegate(c, "CHECK", d["type"], go_json(d), dver or version)


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


def cmd_status(c: Call, n: FlannelNetConf, version: str) -> None:
    try:
        fenv = _load_fenv(n, version, "")
    except CNIError as e:
        raise CNIError(ERR_PLUGIN_NOT_AVAILABLE, "flannel is not ready: cannot use subnet.env", e.msg) from None
    d = build_delegate(n, fenv)
    try:
        versions = delegate_versions(c, d["type"])
    except CNIError as e:
        raise CNIError(ERR_PLUGIN_NOT_AVAILABLE, f"delegate {d['type']} is not available", e.msg) from None
    if version in versions:
        call_delegate(c, "STATUS", d["type"], delegate_bytes(d), "")


def cmd_gc(c: Call, n: FlannelNetConf, version: str) -> None:
    try:
        fenv = _load_fenv(n, version, "")
    except CNIError as e:
        _log(c, f"flannel GC: skipped, subnet.env unusable: {e.msg}")
        return
    d = build_delegate(n, fenv)
    if version not in delegate_versions(c, d["type"]):
        _log(c, f"flannel GC: delegate {d['type']} does not speak {version}; nothing collected")
        return
    found, valid = go_get(n.raw, "cni.dev/valid-attachments")
    if found:
        d["cni.dev/valid-attachments"] = valid
    call_delegate(c, "GC", d["type"], go_json(d), "")
    # The delegate has released what the stale attachments held: their stored configs are now garbage.
    keep = {a.get("containerID") for a in valid or [] if isinstance(a, dict)} if found else None
    if keep is None:
        return
    try:
        names = posix.listdir(n.data_dir)
    except (OSError, ValueError):
        return
    for name in names:
        if name not in keep and valid_cni_name(name):
            _remove(c, _join(n.data_dir, name))


_COMMANDS = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "STATUS": cmd_status, "GC": cmd_gc}
_FLOORS = {"CHECK": "0.4.0", "GC": "1.1.0", "STATUS": "1.1.0"}
# The runtime's stdin is a network config of a few KiB; a runaway writer is cut off here.
MAX_STDIN = 16 << 20


def _read_stdin(stdin: "BinaryIO") -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            b = stdin.read(MAX_STDIN + 1 - size)
        except OSError as e:
            # io.ReadAll(os.Stdin)'s *PathError: code 5 (a read that fails, e.g. fd 0 open write-only). A closed
            # fd 0 is not this: Go's runtime (1.22+, checkfds) reopens it on /dev/null, so stdin reads empty.
            raise CNIError(ERR_IO, f"error reading from stdin: read /dev/stdin: {_go_err(e)}") from None
        if not b:
            return b"".join(chunks)
        chunks.append(b)
        size += len(b)
        if size > MAX_STDIN:
            raise CNIError(ERR_IO, f"error reading from stdin: more than {MAX_STDIN} bytes")


def run(
    env: dict[str, str], stdin: "BinaryIO", out: "BinaryIO", err: "Any", *, delegate_stderr: "int | None" = None
) -> int:
    """The whole plugin as a function: reads env/stdin, writes the result or error JSON to `out` and warnings
    to `err`; the delegates write their stderr to the file descriptor `delegate_stderr` (None: fd 2).

    skel's order: the required variables, VERSION, the config's name, the container ID and interface name,
    the config's version, then the command."""
    version = CURRENT_VERSION
    try:
        cmd = env.get("CNI_COMMAND", "")
        missing = [] if cmd else ["CNI_COMMAND"]
        for var, cmds in _REQUIRED.items():
            if not env.get(var, "") and cmd in cmds:
                missing.append(var)
        if missing:
            if not cmd:
                err.write(f"{ABOUT}\nCNI protocol versions supported: {', '.join(SUPPORTED_VERSIONS)}\n")
                return 0
            raise CNIError(ERR_INVALID_ENV, f"required env variables [{','.join(missing)}] missing")
        if cmd == "VERSION":
            # versionInfo.Encode: json.NewEncoder(w).Encode, so a trailing newline.
            out.write(go_json({"cniVersion": CURRENT_VERSION, "supportedVersions": list(SUPPORTED_VERSIONS)}) + b"\n")
            return 0
        raw = decode_object(_read_stdin(stdin))
        _validate_name(raw)
        if cmd in _REQUIRED["CNI_CONTAINERID"]:
            _validate_container_id(env["CNI_CONTAINERID"])
            _validate_ifname(env["CNI_IFNAME"])
        fn = _COMMANDS.get(cmd)
        if fn is None:
            # Code 4 even without CNI_CONTAINERID, as libcni v1.2's skel (flannel-io/cni-plugin builds on v1.2.3):
            # it validates the container ID only for the commands that require it. v1.1's skel validated it for
            # every command but VERSION, so there an unknown command without an ID was 3, "missing containerID".
            raise CNIError(ERR_INVALID_ENV, f"unknown CNI_COMMAND: {cmd}")
        version = config_version(raw)
        if cmd in _FLOORS:
            _check_floor(cmd, version, _FLOORS[cmd])
        _check_supported(version)
        try:
            n = load_netconf(raw)
        except CNIError as e:
            if cmd == "ADD":
                e.msg = f"loadFlannelNetConf failed: {e.msg}"
            raise
        fn(Call(env, out, err, delegate_stderr), n, version)
        return 0
    except CNIError as e:
        return _answer(out, e, version if version in SUPPORTED_VERSIONS else CURRENT_VERSION)
    except Exception as e:  # a plugin must answer with CNI error JSON, whatever happened; tests look for this
        return _answer(out, CNIError(ERR_INTERNAL, f"flannel: internal error ({type(e).__name__}): {e}"))


def _answer(out: "BinaryIO", e: CNIError, version: str = CURRENT_VERSION) -> int:
    try:  # noqa: SIM105  (contextlib is an import the plugin does without)
        out.write(e.to_json(version))
    except Exception:  # stdout gone: the exit status is all the runtime gets
        pass
    return 1


def main() -> "NoReturn":
    """The executable: runs the plugin and leaves with _exit, skipping the interpreter's shutdown."""
    enc, errors = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
    env = {k.decode(enc, errors): v.decode(enc, errors) for k, v in posix.environ.items()}
    if sys.stdin is None or sys.stdout is None or sys.stderr is None:
        # The runtime left fd 0, 1 or 2 closed: no config, or nowhere to answer (the exit status still tells).
        # As Go's runtime does at start (checkfds), the closed ones are opened on /dev/null, so that no file
        # the plugin opens later (the stored config, the delegate's pipes) can land on them.
        import io

        for fd in range(3):
            try:
                posix.fstat(fd)
            except OSError:
                try:  # noqa: SIM105  (contextlib is an import the plugin does without)
                    posix.open("/dev/null", posix.O_RDWR)  # the lowest free fd: this one
                except OSError:
                    pass

        stdin: Any = sys.stdin.buffer if sys.stdin is not None else io.BytesIO()
        stdout: Any = sys.stdout.buffer if sys.stdout is not None else io.BytesIO()
        errout: Any = sys.stderr if sys.stderr is not None else io.StringIO()
    else:
        stdin, stdout, errout = sys.stdin.buffer, sys.stdout.buffer, sys.stderr
    rc = run(env, stdin, stdout, errout)
    try:
        stdout.flush()
        errout.flush()
    except Exception:
        rc = rc or 1  # the runtime never got the answer
    posix._exit(rc)


if __name__ == "__main__":
    sys.exit(main())
