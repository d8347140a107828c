"""strongSwan's charon for the ipsec backend: the process, its configuration, and VICI, its control socket.

charon negotiates IKEv2 and installs the ESP SAs; the agent installs the policies itself (pyflannel.netlink.xfrm).
The agent talks to it with strongSwan's own Python binding (`vici`), one short session per request: the binding is
blocking, so each request runs in a thread of its own (asyncio.to_thread) with a socket timeout as its bound.

The process: charon keeps its VICI socket and pid file in /run, which several nodes sharing one filesystem would
fight over, so it runs in a mount namespace of its own with a private /run (backend/sandbox.py, as wireguard-go
does), configured by a strongswan.conf written there. It runs in the agent's network namespace. Like wireguard-go
and kernel devices it outlives the agent (a session of its own), so an agent restart costs no SA: the next agent
adopts it, recognising it by its comm, its network namespace and the tmpfs on its /run (named TMPFS).

Secrets: the PSK goes to charon only inside a load-shared request; no file holds it. charon logs to the agent's
stderr at level 0 (SAs established, deleted, failed), far below the level 4 at which strongSwan prints key material.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .sandbox import ChildDaemon, pids_in_own_netns, run_mounted_as, sandbox_argv, sandbox_env

log = logging.getLogger(__name__)

TMPFS = "flannel-charon"
VICI_PATH = "/run/charon.vici"
CONF_NAME = "pyflannel/strongswan.conf"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
VICI_TIMEOUT = 15.0
# Where upstream looks for charon when CharonExecutablePath is not given (PATH first).
CHARON_PATHS = (
    "charon",
    "/usr/lib/strongswan/charon",
    "/usr/lib/ipsec/charon",
    "/usr/libexec/strongswan/charon",
    "/usr/libexec/ipsec/charon",
)
# What a PSK-only IKEv2 daemon needs, and nothing that would touch the node on its own (no bypass-lan, no
# updown, no resolve, no connmark): an explicit list rather than every plugin the distribution ships.
PLUGINS = "random nonce openssl aes sha1 sha2 hmac gcm gmp kdf pem pkcs1 pubkey x509 kernel-netlink socket-default vici"

# ---------------------------------------------------------------- proposals

# strongSwan's proposal keywords (https://docs.strongswan.org/docs/5.9/config/proposals.html): what an
# ESPProposal may be made of. An unknown word is refused before anything is built.
_ENCRYPTION = {
    *(f"aes{k}" for k in (128, 192, 256)),
    *(f"aes{k}ctr" for k in (128, 192, 256)),
    *(f"aes{k}ccm{t}" for k in (128, 192, 256) for t in (8, 12, 16)),
    *(f"aes{k}gcm{t}" for k in (128, 192, 256) for t in (8, 12, 16)),
    *(f"aes{k}gmac" for k in (128, 192, 256)),
    *(f"camellia{k}" for k in (128, 192, 256)),
    "aes", "aesgcm", "aesccm", "3des", "blowfish", "cast128", "chacha20poly1305", "null",
}  # fmt: skip
_AEAD = {w for w in _ENCRYPTION if "gcm" in w or "ccm" in w or w == "chacha20poly1305"}
_INTEGRITY = {"md5", "sha1", "sha", "sha256", "sha2_256", "sha384", "sha2_384", "sha512", "sha2_512",
              "sha1_160", "sha256_96", "sha2_256_96", "aesxcbc", "aescmac", "md5_128"}  # fmt: skip
_PRF = {"prfmd5", "prfsha1", "prfsha256", "prfsha384", "prfsha512", "prfaesxcbc", "prfaescmac"}
_DH = {"modp768", "modp1024", "modp1536", "modp2048", "modp3072", "modp4096", "modp6144", "modp8192",
       "modp1024s160", "modp2048s224", "modp2048s256", "ecp192", "ecp224", "ecp256", "ecp384", "ecp521",
       "ecp224bp", "ecp256bp", "ecp384bp", "ecp512bp", "curve25519", "x25519", "curve448", "x448", "none"}  # fmt: skip
_ESN = {"esn", "noesn"}


def check_proposal(text: str) -> str | None:
    """Why `text` is not an ESP proposal strongSwan takes (None: it is one). Comma-separated proposals, each of
    dash-separated keywords: at least one encryption algorithm, and integrity unless it is an AEAD."""
    if not text or len(text) > 512:
        return "empty or too long"
    for prop in text.split(","):
        words = prop.strip().split("-")
        unknown = [w for w in words if w not in _ENCRYPTION | _INTEGRITY | _PRF | _DH | _ESN]
        if unknown:
            return f"unknown algorithm keyword {unknown[0][:40]!r}"
        enc = [w for w in words if w in _ENCRYPTION]
        if not enc:
            return f"{prop.strip()!r} names no encryption algorithm"
        if not any(w in _INTEGRITY for w in words) and not all(w in _AEAD for w in enc):
            return f"{prop.strip()!r} names no integrity algorithm for a non-AEAD cipher"
    return None


# ---------------------------------------------------------------- configuration and messages


def strongswan_conf(vici_path: str = VICI_PATH) -> str:
    """The strongswan.conf of a charon run by the agent: no routes or virtual IPs (the agent and the node's
    routing own them), short retransmissions (a peer that restarts is found again in seconds, not minutes), and
    logs on stderr at a low level."""
    return f"""charon {{
    load_modular = no
    load = {PLUGINS}
    install_routes = no
    install_virtual_ip = no
    retransmit_tries = 4
    retransmit_timeout = 2.0
    retransmit_base = 1.4
    plugins {{
        vici {{
            socket = unix://{vici_path}
        }}
    }}
    filelog {{
        # The name `stderr` with no path: charon's own fd 2 (the agent's log), not whatever /dev/stderr opens to.
        stderr {{
            default = 0
            ike_name = yes
        }}
    }}
    syslog {{
        daemon {{
            default = -1
        }}
    }}
}}
"""


@dataclass(frozen=True)
class ConnSpec:
    """One peer's IKE connection: tunnel mode between the two public IPs, our subnet <-> the peer's."""

    name: str
    child: str
    local_ip: str
    remote_ip: str
    local_ts: tuple[str, ...]
    remote_ts: tuple[str, ...]
    esp_proposal: str
    reqid: int
    encap: bool
    initiator: bool


IKE_PROPOSAL = "aes256-sha256-modp4096"  # upstream's
DPD_DELAY = "10s"


def conn_message(c: ConnSpec) -> dict[str, Any]:
    """The load-conn request for `c` (swanctl.conf's structure). Only one end initiates (see ipsec.py), so a pair
    gets one IKE_SA and one CHILD_SA; `policies = no`: the agent owns the policies, charon only the SAs."""
    child: dict[str, Any] = {
        "mode": "tunnel",
        "local_ts": list(c.local_ts),
        "remote_ts": list(c.remote_ts),
        "esp_proposals": [c.esp_proposal],
        "reqid": str(c.reqid),
        "policies": "no",
        "rekey_time": "1h",
        "start_action": "start" if c.initiator else "none",
        "close_action": "start" if c.initiator else "none",
        "dpd_action": "restart" if c.initiator else "clear",
    }
    return {
        c.name: {
            "version": "2",
            "local_addrs": [c.local_ip],
            "remote_addrs": [c.remote_ip],
            "proposals": [IKE_PROPOSAL],
            "encap": "yes" if c.encap else "no",
            "keyingtries": "0",  # the initiator retries until the peer answers
            "dpd_delay": DPD_DELAY,
            "unique": "replace",  # a restarted peer's new IKE_SA replaces the one it forgot
            "mobike": "no",  # the ends are the leases' PublicIPs; a change of address is a new lease
            "local": {"auth": "psk", "id": c.local_ip},
            "remote": {"auth": "psk", "id": c.remote_ip},
            "children": {c.child: child},
        }
    }


def shared_message(key_id: str, psk: str, owners: Iterable[str]) -> dict[str, Any]:
    """The load-shared request: the PSK for IKE between `owners` (our public IP and the peer's)."""
    return {"id": key_id, "type": "IKE", "data": psk, "owners": list(owners)}


class ViciError(RuntimeError):
    """charon refused a request or could not be reached; the message never carries the PSK."""


def _text(v: Any) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def established(sas: Iterable[Mapping[str, Any]], any_state: bool = False) -> dict[str, set[str]]:
    """IKE_SA name -> the names of its installed CHILD_SAs, for every ESTABLISHED IKE_SA of a list-sas answer (with
    `any_state`: every IKE_SA, also those still connecting, rekeying or being deleted)."""
    out: dict[str, set[str]] = {}
    for entry in sas:
        for name, sa in entry.items():
            if not any_state and _text(sa.get("state", b"")) != "ESTABLISHED":
                continue
            children = sa.get("child-sas", {}) or {}
            kids = out.setdefault(_text(name), set())
            for child in children.values():
                if _text(child.get("state", b"")) == "INSTALLED":
                    kids.add(_text(child.get("name", b"")))
    return out


class Vici:
    """Requests to one charon's VICI socket (a path, possibly under /proc/<pid>/root)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _call(self, what: str, fn: str, *args: Any) -> Any:
        import vici  # imported where used: agents of other backends never load it

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(VICI_TIMEOUT)
        try:
            sock.connect(self.path)
            session = vici.Session(sock)
            result = getattr(session, fn)(*args)
            if fn in ("list_sas", "initiate", "list_conns"):
                result = list(result)
            return result
        except (OSError, TimeoutError) as e:
            raise ViciError(
                f"cannot reach charon at {self.path} ({what}): {getattr(e, 'strerror', None) or e}"
            ) from None
        except Exception as e:  # the binding's CommandException / SessionException
            # charon's own error text; a request's content (the PSK) is never part of it.
            raise ViciError(f"charon refused {what}: {_text(e)[:300]}") from None
        finally:
            sock.close()

    async def call(self, what: str, fn: str, *args: Any) -> Any:
        return await asyncio.to_thread(self._call, what, fn, *args)

    async def version(self) -> str:
        v = await self.call("version", "version")
        return f"{_text(v.get('daemon', b'charon'))} {_text(v.get('version', b'?'))}"

    async def load_shared(self, key_id: str, psk: str, owners: Iterable[str]) -> None:
        await self.call(f"load-shared {key_id}", "load_shared", shared_message(key_id, psk, owners))

    async def unload_shared(self, key_id: str) -> None:
        await self.call(f"unload-shared {key_id}", "unload_shared", {"id": key_id})

    async def shared_ids(self) -> set[str]:
        r = await self.call("get-shared", "get_shared")
        return {_text(k) for k in r.get("keys", [])}

    async def load_conn(self, spec: ConnSpec) -> None:
        await self.call(f"load-conn {spec.name}", "load_conn", conn_message(spec))

    async def unload_conn(self, name: str) -> None:
        await self.call(f"unload-conn {name}", "unload_conn", {"name": name})

    async def conns(self) -> set[str]:
        r = await self.call("get-conns", "get_conns")
        return {_text(k) for k in r.get("conns", [])}

    async def sas(self, any_state: bool = False) -> dict[str, set[str]]:
        # Not noblock: an IKE_SA busy in a job would be left out, and look missing.
        return established(await self.call("list-sas", "list_sas"), any_state)

    async def initiate(self, conn: str, child: str) -> None:
        # timeout -1: return at once and let charon go on; the periodic check looks at the result.
        await self.call(f"initiate {conn}", "initiate", {"ike": conn, "child": child, "timeout": "-1"})


# ---------------------------------------------------------------- the process


def find_charon(explicit: str = "") -> str | None:
    """The charon executable: `explicit` (CharonExecutablePath) if given, else upstream's well-known paths."""
    for p in (explicit,) if explicit else CHARON_PATHS:
        found = shutil.which(p)
        if found is not None:
            return found
    return None


def find_ours() -> int | None:
    """The pid of a charon the agent started in this network namespace (left running by the previous agent)."""
    for pid in pids_in_own_netns("charon"):
        if run_mounted_as(pid, TMPFS):
            return int(pid)
    return None


class CharonError(RuntimeError):
    """charon could not be started."""


class Charon(ChildDaemon):
    """One charon process: start or adopt it, reach its VICI socket, notice when it dies (SIGTERM makes it close
    its SAs on the way out)."""

    stop_timeout = STOP_TIMEOUT

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.pid = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._pidfd = -1

    @property
    def vici_path(self) -> str:
        return f"/proc/{self.pid}/root{VICI_PATH}"

    def vici(self) -> Vici:
        return Vici(self.vici_path)

    def alive(self) -> bool:
        if not self.pid:
            return False
        if self._proc is not None:
            return self._proc.poll() is None
        try:
            with open(f"/proc/{self.pid}/comm") as f:
                return f.read(64).strip() == "charon"
        except OSError:
            return False

    def adopt(self) -> bool:
        pid = find_ours()
        if pid is None:
            return False
        self._adopt(pid)
        return True

    async def start(self) -> None:
        """Start charon in its own mount namespace; returns once its VICI socket answers."""
        env = sandbox_env(
            {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "STRONGSWAN_CONF": f"/run/{CONF_NAME}"},
            {CONF_NAME: strongswan_conf()},
        )
        proc = self._spawn(sandbox_argv(TMPFS, self.binary), env)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        while loop.time() < deadline:
            if proc.poll() is not None:
                status = proc.returncode
                self._forget()
                raise CharonError(f"charon ({self.binary}) exited at start with status {status}")
            if os.path.exists(self.vici_path):
                with contextlib.suppress(ViciError):
                    await self.vici().version()
                    return
            await asyncio.sleep(0.1)
        await self.stop()
        raise CharonError(f"charon did not open its VICI socket within {START_TIMEOUT:.0f}s")


__all__ = [
    "Charon",
    "CharonError",
    "ConnSpec",
    "Vici",
    "ViciError",
    "check_proposal",
    "conn_message",
    "established",
    "find_charon",
    "shared_message",
    "strongswan_conf",
]
