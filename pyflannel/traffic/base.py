"""The traffic-rule manager the daemon drives: masquerade and forward rules, kept in place by a resync loop.

Both implementations (iptables, nftables) shell out to the distribution's tools rather than speaking
netlink themselves: the tools own the rule encoding (and the iptables-nft compatibility layer), and their
restore/`-f` inputs are the only way to get atomic, all-or-nothing changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from typing import Protocol

from pyflannel.subnetenv import SubnetEnv

log = logging.getLogger(__name__)

IPNetwork = IPv4Network | IPv6Network


class TrafficError(RuntimeError):
    """A rule tool is missing or failed; the message is meant for the log and /readyz."""


@dataclass(frozen=True)
class CmdResult:
    rc: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class CommandRunner:
    """Runs the rule tools, optionally inside another network namespace.

    `cmd_prefix` (e.g. `["ip", "netns", "exec", NS]`) lets tests drive a namespace while the daemon, already
    running inside its node namespace, uses an empty prefix. `search_path` replaces $PATH when looking up
    the tools, so a missing tool is detected here with a clear message instead of inside the prefix.
    """

    cmd_prefix: tuple[str, ...] = ()
    search_path: str | None = None
    timeout: float = 30.0

    def which(self, tool: str) -> str:
        path = self.search_path if self.search_path is not None else os.environ.get("PATH", os.defpath)
        found = shutil.which(tool, path=path)
        if found is None:
            raise TrafficError(f"{tool} not found (searched PATH={path})")
        return found

    async def run(self, tool: str, args: Sequence[str], *, input: str | None = None) -> CmdResult:
        argv = [*self.cmd_prefix, self.which(tool), *args]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as e:
            raise TrafficError(f"cannot run {' '.join(argv)}: {e}") from None
        try:
            out, err = await asyncio.wait_for(
                proc.communicate(input.encode() if input is not None else None), self.timeout
            )
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise TrafficError(f"{tool} timed out after {self.timeout}s") from None
        assert proc.returncode is not None
        return CmdResult(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))

    async def check(self, tool: str, args: Sequence[str], *, input: str | None = None) -> str:
        """Run and return stdout; a non-zero exit becomes a TrafficError carrying the tool's own message."""
        r = await self.run(tool, args, input=input)
        if r.rc != 0:
            msg = (r.stderr.strip() or r.stdout.strip() or "no output").replace("\n", "; ")
            raise TrafficError(f"{tool} {' '.join(args)}: exit {r.rc}: {msg}")
        return r.stdout


# Removes every rule one mode installs (run by the other mode at start: EnableNFTables changed across restarts).
LeftoverCleanup = Callable[[CommandRunner], Awaitable[None]]


@dataclass(frozen=True)
class MasqSpec:
    network: IPNetwork
    subnet: IPNetwork
    fully_random: bool


def prev_changed(
    network: IPNetwork, subnet: IPNetwork, prev_networks: Sequence[IPNetwork], prev_subnet: IPNetwork | None
) -> bool:
    """Upstream compares against the first network and the subnet of the previous subnet.env."""
    prev_net = prev_networks[0] if prev_networks else None
    return prev_net != network or prev_subnet != subnet


class RuleObserver(Protocol):
    """What the manager reports for the agent's metrics (pyflannel.metrics.Metrics implements it)."""

    def rules_resync(self, mode: str) -> None:
        """One periodic check of every installed rule set."""

    def rules_restore(self, mode: str, family: int, ok: bool) -> None:
        """A family's rules were found missing or altered and written again (ok: the write succeeded)."""


class _Unobserved:
    def rules_resync(self, mode: str) -> None:
        pass

    def rules_restore(self, mode: str, family: int, ok: bool) -> None:
        pass


class TrafficManager(ABC):
    """Installs flannel's masquerade/forward rules and keeps them in place.

    Tool failures never raise out of the public methods: they are logged, recorded in `last_error`, and make
    `ready` False until a later pass succeeds. Every change is one atomic transaction, so a failure leaves
    either the old rules or the new ones, never half of them. Stopping the manager leaves the rules in place
    (pods keep their egress while the agent restarts).
    """

    mode: str = ""

    def __init__(self, runner: CommandRunner, other_mode_cleanup: LeftoverCleanup | None = None) -> None:
        self.runner = runner
        # Told of every resync and restore; the agent sets its metrics here (traffic.manager).
        self.observer: RuleObserver = _Unobserved()
        # The other mode's remover of its own rules (wired by traffic.manager, so the modes never import each other).
        self._other_mode_cleanup = other_mode_cleanup
        self._lock = asyncio.Lock()
        self._errors: dict[str, str] = {}
        self._masq: dict[int, MasqSpec] = {}
        self._forward: dict[int, IPNetwork] = {}

    # --- readiness -------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return not self._errors

    @property
    def last_error(self) -> str | None:
        return "; ".join(f"{k}: {v}" for k, v in sorted(self._errors.items())) or None

    def _fail(self, what: str, err: BaseException) -> None:
        log.error("%s: %s failed: %s", self.mode, what, err)
        self._errors[what] = str(err)

    def _ok(self, what: str) -> None:
        if self._errors.pop(what, None) is not None:
            log.info("%s: %s restored", self.mode, what)

    # --- public API --------------------------------------------------------------------------------------

    async def setup_and_ensure_masq_rules(
        self,
        network: IPv4Network | None,
        subnet: IPv4Network | None,
        ipv6_network: IPv6Network | None = None,
        ipv6_subnet: IPv6Network | None = None,
        prev: SubnetEnv | None = None,
        fully_random: bool = True,
    ) -> bool:
        """Install the masquerade chain for each family that has both a network and a subnet.

        Rules of a previous network/subnet (from the old subnet.env) are removed in the same transaction
        that installs the new ones. Returns whether every family succeeded.
        """
        async with self._lock:
            ok = True
            pairs: list[tuple[int, IPNetwork | None, IPNetwork | None, Sequence[IPNetwork], IPNetwork | None]] = [
                (4, network, subnet, prev.networks if prev else (), prev.subnet if prev else None),
                (6, ipv6_network, ipv6_subnet, prev.ipv6_networks if prev else (), prev.ipv6_subnet if prev else None),
            ]
            for fam, net, sub, pnets, psub in pairs:
                if net is None or sub is None:
                    continue
                if prev is not None and prev_changed(net, sub, pnets, psub):
                    log.info(
                        "%s: network or subnet (%s, %s) differs from the previous one (%s, %s): replacing old rules",
                        self.mode, net, sub, pnets[0] if pnets else None, psub,
                    )  # fmt: skip
                self._masq[fam] = MasqSpec(net, sub, fully_random)
                ok &= await self._apply_family(fam, f"ipv{fam} masq rules")
            return ok

    async def setup_and_ensure_forward_rules(
        self, network: IPv4Network | None, ipv6_network: IPv6Network | None = None
    ) -> bool:
        """Accept forwarded traffic from and to the flannel network(s)."""
        async with self._lock:
            ok = True
            for fam, net in ((4, network), (6, ipv6_network)):
                if net is None:
                    continue
                self._forward[fam] = net
                ok &= await self._apply_family(fam, f"ipv{fam} forward rules")
            return ok

    async def ensure_once(self) -> bool:
        """One resync pass: re-check every installed rule set and restore what is missing or altered."""
        async with self._lock:
            ok = True
            for fam in sorted(set(self._masq) | set(self._forward)):
                what = f"ipv{fam} rules"
                try:
                    intact = await self._check_family(fam)
                except TrafficError as e:
                    self._fail(what, e)
                    ok = False
                    continue
                if intact:
                    self._clear_family(fam)
                    continue
                log.info("%s: some ipv%d rules are missing or changed; restoring them", self.mode, fam)
                restored = await self._apply_family(fam, what)
                self.observer.rules_restore(self.mode, fam, restored)
                ok &= restored
            self.observer.rules_resync(self.mode)
            return ok

    async def run_resync(self, interval: float) -> None:
        """Re-check the rules every `interval` seconds until cancelled; never raises otherwise."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.ensure_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug here must not stop the daemon or the loop
                log.exception("%s: resync failed unexpectedly", self.mode)
                self._errors["resync"] = f"unexpected: {e!r}"

    async def cleanup_other_mode(self) -> bool:
        """Remove what the other mode may have left behind (an agent restarted with a changed EnableNFTables)."""
        async with self._lock:
            if self._other_mode_cleanup is None:
                return True
            try:
                await self._other_mode_cleanup(self.runner)
            except TrafficError as e:
                log.warning("%s: could not clean up the other mode's rules: %s", self.mode, e)
                return False
            return True

    # --- implementation hooks ----------------------------------------------------------------------------

    async def _apply_family(self, fam: int, what: str) -> bool:
        try:
            await self._apply(fam)
        except TrafficError as e:
            self._fail(what, e)
            return False
        self._clear_family(fam)
        return True

    def _clear_family(self, fam: int) -> None:
        """The family's whole rule set is in place: whatever an earlier pass reported for it is resolved."""
        for k in [k for k in self._errors if k.startswith(f"ipv{fam} ")]:
            self._ok(k)

    @abstractmethod
    async def _apply(self, fam: int) -> None:
        """Atomically install the whole desired rule set of one family (masq and/or forward)."""

    @abstractmethod
    async def _check_family(self, fam: int) -> bool:
        """True when the installed rules of one family are exactly the desired ones."""
