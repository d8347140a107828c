"""extension: the data plane is the user's commands (upstream's `pkg/backend/extension`).

Options (strings; each is split into words as a POSIX shell would, with shlex, and run without a shell):
  PreStartupCommand    before the lease is taken; its output (stdout and stderr, trimmed) becomes the lease's
                       BackendData, a JSON string
  PostStartupCommand   once the lease is held; env NETWORK, SUBNET (ours), PUBLIC_IP (ours)
  SubnetAddCommand     once per peer lease added or changed; env SUBNET and PUBLIC_IP of the peer, the peer's
                       BackendData (the string) on stdin, followed by a newline
  SubnetRemoveCommand  once per peer lease removed; same environment and stdin
  CommandTimeout       (pyflannel's own) seconds a command may run before it is killed, default 30

Because no shell parses the command line, nothing in a lease (the peer's BackendData above all, which any node
can write) can add shell syntax: it arrives on stdin only. A command that wants a shell names one itself
(`sh -c 'ip route replace "$SUBNET" via "$PUBLIC_IP"'`) and then sees lease values only as variables.

Every run is bounded: killed (its whole process group) after CommandTimeout, its output read up to
OUTPUT_LIMIT bytes. A peer command that fails or times out is logged with its output and the agent goes on, as
upstream; a failing startup command stops the agent, as upstream (the node cannot be set up without it).
Peers are the leases with BackendType "extension"; the lease's MTU is the external interface's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import NetConfig
from ..iface import ExternalInterface
from ..lease import Lease
from ..netlink import Netlink
from .base import Backend, BackendAttrs, BackendError
from .options import opt_float, opt_str

log = logging.getLogger(__name__)

BACKEND_TYPE = "extension"
COMMANDS = ("PreStartupCommand", "PostStartupCommand", "SubnetAddCommand", "SubnetRemoveCommand")
DEFAULT_TIMEOUT = 30.0
OUTPUT_LIMIT = 64 * 1024
# After a kill, how long to wait for the process to be reaped before giving up on it.
REAP_TIMEOUT = 5.0


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int | None  # None: it did not finish (timed out, or could not start)
    output: str  # stdout and stderr, trimmed, at most OUTPUT_LIMIT bytes of them
    timed_out: bool = False
    error: str = ""  # why it could not start

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        if self.error:
            return self.error
        if self.timed_out:
            return "killed after its time limit"
        return f"exit status {self.returncode}"


def split_command(key: str, text: str) -> tuple[str, ...]:
    try:
        words = tuple(shlex.split(text))
    except ValueError as e:
        raise BackendError(f"Backend.{key}: cannot split {text!r} into words: {e}") from None
    if text.strip() and not words:
        raise BackendError(f"Backend.{key}: {text!r} names no command")
    return words


async def run_command(
    argv: Sequence[str], *, stdin: bytes, env: Mapping[str, str], timeout: float, limit: int = OUTPUT_LIMIT
) -> CommandResult:
    """Run argv (no shell) with `stdin`, the agent's environment plus `env`, stdout and stderr together; kill
    its process group after `timeout` seconds."""
    words = tuple(argv)
    try:
        proc = await asyncio.create_subprocess_exec(
            *words,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,  # its own process group: a timeout kills what it started too
        )
    except OSError as e:
        return CommandResult(words, None, "", error=f"cannot run {words[0]}: {e.strerror or e}")
    assert proc.stdin is not None and proc.stdout is not None
    out = bytearray()
    stdin_pipe, stdout_pipe = proc.stdin, proc.stdout

    async def feed() -> None:
        # A command that exits without reading its input is fine.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            stdin_pipe.write(stdin)
            await stdin_pipe.drain()
        stdin_pipe.close()

    async def collect() -> None:
        while chunk := await stdout_pipe.read(65536):
            if len(out) < limit:
                out.extend(chunk[: limit - len(out)])
            # Beyond the limit the output is read and dropped, so the command never blocks on a full pipe.

    timed_out = False
    try:
        await asyncio.wait_for(asyncio.gather(feed(), collect(), proc.wait()), timeout)
    except TimeoutError:
        timed_out = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), REAP_TIMEOUT)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
    text = out.decode("utf-8", errors="replace").strip()
    return CommandResult(words, None if timed_out else proc.returncode, text, timed_out=timed_out)


class ExtensionBackend(Backend):
    backend_type = BACKEND_TYPE

    @classmethod
    def check_config(cls, cfg: NetConfig) -> None:
        for key in COMMANDS:
            split_command(key, opt_str(cfg, key))
        opt_float(cfg, "CommandTimeout", DEFAULT_TIMEOUT, 0.01, 3600)

    def __init__(self, cfg: NetConfig, ext: ExternalInterface, nl: Netlink) -> None:
        super().__init__(cfg, ext, nl)
        self.check_config(cfg)
        self.commands: dict[str, tuple[str, ...]] = {key: split_command(key, opt_str(cfg, key)) for key in COMMANDS}
        self.timeout = opt_float(cfg, "CommandTimeout", DEFAULT_TIMEOUT, 0.01, 3600)
        self._own: Lease | None = None
        # The peers whose SubnetAddCommand ran (by lease key), so a reconcile pass runs each command once per
        # change and not on every pass.
        self._applied: dict[str, Lease] = {}
        self._lock = asyncio.Lock()
        # Outcome of every run, newest last, bounded: what tests and a later metrics endpoint read.
        self.runs: list[tuple[str, CommandResult]] = []

    async def _run(self, key: str, env: Mapping[str, str], stdin: str = "") -> CommandResult | None:
        argv = self.commands[key]
        if not argv:
            return None
        res = await run_command(argv, stdin=(stdin + "\n").encode(), env=env, timeout=self.timeout)
        self.runs = [*self.runs[-99:], (key, res)]
        shown = shlex.join(argv)
        if res.ok:
            log.info("Ran command: %s\n Output: %s", shown, res.output)
        else:
            log.error("failed to run command: %s Err: %s Output: %s", shown, res.describe(), res.output)
        return res

    async def prepare(self) -> BackendAttrs:
        if self.ext.public_ip is None:
            raise BackendError("extension: the external interface has no IPv4 address")
        data: Any = None
        res = await self._run("PreStartupCommand", {})
        if res is None:
            log.info("No pre startup command configured - skipping")
        elif not res.ok:
            raise BackendError(f"extension: PreStartupCommand failed ({res.describe()}): {res.output}")
        else:
            data = res.output
        return BackendAttrs(backend_type=BACKEND_TYPE, backend_data=data, backend_v6_data=None, mtu=self.ext.mtu)

    async def start(self, own: Lease) -> None:
        self._own = own
        env = {
            "NETWORK": str(self.cfg.network or ""),
            "SUBNET": str(own.subnet or ""),
            "PUBLIC_IP": str(self.ext.public_ip or "0.0.0.0"),
        }
        res = await self._run("PostStartupCommand", env)
        if res is None:
            log.info("No post startup command configured - skipping")
        elif not res.ok:
            raise BackendError(f"extension: PostStartupCommand failed ({res.describe()}): {res.output}")

    def _peer_input(self, lease: Lease) -> tuple[dict[str, str], str] | None:
        """The environment and stdin of a peer command, or None (logged) when the lease is not for us."""
        if lease.attrs.backend_type != BACKEND_TYPE:
            log.warning("Ignoring non-extension subnet: type=%s", lease.attrs.backend_type or "(none)")
            return None
        data = lease.attrs.backend_data
        if data is None:
            data = ""
        if not isinstance(data, str):
            log.error("failed to unmarshal BackendData of %s: expected a JSON string", lease.key)
            return None
        env = {"SUBNET": str(lease.subnet or ""), "PUBLIC_IP": str(lease.attrs.public_ip or "0.0.0.0")}
        return env, data

    async def _added(self, lease: Lease) -> None:
        self._applied[lease.key] = lease
        got = self._peer_input(lease)
        if got is not None:
            log.info("Subnet added: %s via %s", lease.subnet, lease.attrs.public_ip)
            await self._run("SubnetAddCommand", got[0], got[1])

    async def _removed(self, lease: Lease) -> None:
        self._applied.pop(lease.key, None)
        got = self._peer_input(lease)
        if got is not None:
            log.info("Subnet removed: %s", lease.subnet)
            await self._run("SubnetRemoveCommand", got[0], got[1])

    async def add_peers(self, leases: Sequence[Lease]) -> None:
        async with self._lock:
            for lease in leases:
                await self._added(lease)

    async def remove_peer(self, lease: Lease) -> None:
        async with self._lock:
            await self._removed(lease)

    async def reconcile(self, peers: Sequence[Lease]) -> None:
        async with self._lock:
            current = {lease.key: lease for lease in peers}
            for key, old in list(self._applied.items()):
                if key not in current:
                    await self._removed(old)
            for key, lease in current.items():
                had = self._applied.get(key)
                if had is None or had.attrs != lease.attrs:
                    await self._added(lease)

    async def close(self) -> None:
        pass


BACKEND = ExtensionBackend
