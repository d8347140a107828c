"""wireguard-go, the userspace fallback of the wireguard backend: the process, and its UAPI socket.

wireguard-go creates its device (a TUN named like the device), serves the cross-platform UAPI protocol
(https://www.wireguard.com/xplatform/) on /var/run/wireguard/<name>.sock, and exits when its TUN device is
deleted. That socket path is fixed, so several nodes sharing one filesystem (network namespaces, as in the
tests and the lab) would take each other's socket, and wireguard-go also closes its listener when the file at
its path is replaced. So each wireguard-go runs in a mount namespace of its own, where /run is a fresh tmpfs:
its socket exists only there, the host's mounts are untouched (the new namespace's mounts are private, so
nothing propagates back), and the agent reaches it as /proc/<pid>/root/run/wireguard/<name>.sock.

The process is found again after an agent restart by what it holds (a TUN fd of our device's name, in our
network namespace, held by a process named wireguard-go), so no pid file is needed and a stale one cannot
mislead. It is started in a session of its own: it outlives the agent, as kernel devices do, and the next agent
adopts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, replace

from ..netlink.wireguard import (
    PublicKey,
    SecretKey,
    WgDevice,
    WgPeer,
    WgUpdate,
    format_endpoint,
    parse_endpoint,
)
from .sandbox import ChildDaemon, pids_in_own_netns, sandbox_argv

log = logging.getLogger(__name__)

# The UAPI answer to a get: about 400 bytes per peer; far above what 10000 peers need, and a bound.
MAX_UAPI_REPLY = 16 << 20
UAPI_TIMEOUT = 10.0
START_TIMEOUT = 10.0


class UapiError(RuntimeError):
    """wireguard-go refused a request or could not be reached; the message never carries a key."""


# ---------------------------------------------------------------- the UAPI text protocol


def encode_set(update: WgUpdate) -> bytes:
    lines = ["set=1"]
    if update.private_key is not None:
        lines.append(f"private_key={update.private_key.reveal_hex()}")
    if update.listen_port is not None:
        lines.append(f"listen_port={update.listen_port}")
    if update.replace_peers:
        lines.append("replace_peers=true")
    for p in update.peers:
        lines.append(f"public_key={p.public_key.raw.hex()}")
        lines.append("replace_allowed_ips=true")
        lines.append(f"preshared_key={p.psk.reveal_hex() if p.psk else '0' * 64}")
        if p.endpoint is not None:
            lines.append(f"endpoint={format_endpoint(p.endpoint)}")
        lines.append(f"persistent_keepalive_interval={p.keepalive}")
        lines.extend(f"allowed_ip={n}" for n in p.allowed_ips)
    for k in update.remove:
        lines.append(f"public_key={k.raw.hex()}")
        lines.append("remove=true")
    return ("\n".join(lines) + "\n\n").encode()


def _key(hexdigits: str) -> bytes:
    raw = bytes.fromhex(hexdigits)
    if len(raw) != 32:
        raise ValueError("a key is 32 bytes")
    return raw


def decode_get(text: str, name: str) -> WgDevice:
    """The answer to `get=1`; UapiError for an errno or a malformed line (named by its key only). The private key
    is not kept: the public key derived from it identifies it."""
    public: PublicKey | None = None
    port = fwmark = 0
    peers: list[WgPeer] = []
    cur: WgPeer | None = None
    ips: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    sec = nsec = 0

    def flush() -> None:
        if cur is not None:
            peers.append(replace(cur, allowed_ips=WgPeer.sort_ips(ips), last_handshake=sec + nsec / 1e9))

    for line in text.splitlines():
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise UapiError(f"wireguard-go {name}: malformed reply line")
        try:
            if key == "errno":
                if value != "0":
                    raise UapiError(f"wireguard-go {name}: get failed with errno {value}")
            elif key == "private_key":
                raw = _key(value)
                public = SecretKey(raw).public_key() if any(raw) else None
            elif key == "listen_port":
                port = int(value)
            elif key == "fwmark":
                fwmark = int(value)
            elif key == "public_key":
                flush()
                cur, ips, sec, nsec = WgPeer(public_key=PublicKey(_key(value))), [], 0, 0
            elif cur is None:
                continue
            elif key == "preshared_key":
                raw = _key(value)
                cur = replace(cur, psk=SecretKey(raw) if any(raw) else None)
            elif key == "endpoint":
                cur = replace(cur, endpoint=parse_endpoint(value))
            elif key == "persistent_keepalive_interval":
                cur = replace(cur, keepalive=int(value))
            elif key == "allowed_ip":
                ips.append(ipaddress.ip_network(value, strict=False))
            elif key == "last_handshake_time_sec":
                sec = int(value)
            elif key == "last_handshake_time_nsec":
                nsec = int(value)
            elif key == "rx_bytes":
                cur = replace(cur, rx_bytes=int(value))
            elif key == "tx_bytes":
                cur = replace(cur, tx_bytes=int(value))
        except ValueError:
            raise UapiError(f"wireguard-go {name}: malformed {key!r} in its reply") from None
    flush()
    return WgDevice(name=name, public_key=public, listen_port=port, fwmark=fwmark, peers=tuple(peers))


async def uapi_call(path: str, request: bytes, name: str) -> str:
    """One UAPI exchange: send `request`, read the answer up to the blank line that ends it (bounded)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), UAPI_TIMEOUT)
    except (OSError, TimeoutError) as e:
        raise UapiError(f"cannot reach wireguard-go for {name} at {path}: {getattr(e, 'strerror', None) or e}") from e
    try:
        writer.write(request)
        await writer.drain()
        data = b""
        while not (data.endswith(b"\n\n") or data == b"\n"):
            chunk = await asyncio.wait_for(reader.read(1 << 16), UAPI_TIMEOUT)
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_UAPI_REPLY:
                raise UapiError(f"wireguard-go {name}: reply larger than {MAX_UAPI_REPLY} bytes")
        return data.decode(errors="replace")
    except (OSError, TimeoutError) as e:
        raise UapiError(f"wireguard-go {name}: {getattr(e, 'strerror', None) or e or 'timed out'}") from e
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


# ---------------------------------------------------------------- the process


def _tun_names(pid: str) -> Iterator[str]:
    """The TUN device names of the fds of process `pid` (what /proc/<pid>/fdinfo says: `iff: NAME`)."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return
    for fd in fds:
        try:
            if os.readlink(f"{fd_dir}/{fd}") != "/dev/net/tun":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                info = f.read(4096)
        except OSError:
            continue
        for line in info.splitlines():
            if line.startswith("iff:"):
                yield line[4:].strip()


def find_wireguard_go(name: str) -> int | None:
    """The pid of the wireguard-go serving device `name` in this network namespace, or None."""
    for pid in pids_in_own_netns("wireguard-go"):
        if name in _tun_names(pid):
            return int(pid)
    return None


@dataclass
class WireguardGo(ChildDaemon):
    """One wireguard-go process for one device: start or adopt it, talk to it, notice when it dies."""

    name: str
    binary: str = "wireguard-go"
    pid: int = 0
    _proc: subprocess.Popen[bytes] | None = None
    _pidfd: int = -1

    @staticmethod
    def available(binary: str = "wireguard-go") -> str | None:
        """The full path of the wireguard-go binary, or None."""
        return shutil.which(binary)

    @property
    def socket_path(self) -> str:
        return f"/proc/{self.pid}/root/run/wireguard/{self.name}.sock"

    def alive(self) -> bool:
        if not self.pid:
            return False
        if self._proc is not None:
            return self._proc.poll() is None
        try:
            with open(f"/proc/{self.pid}/comm") as f:
                return f.read(64).strip() == "wireguard-go" and self.name in _tun_names(str(self.pid))
        except OSError:
            return False

    def adopt(self) -> bool:
        """Take over a wireguard-go already serving our device (left running by the previous agent)."""
        pid = find_wireguard_go(self.name)
        if pid is None:
            return False
        self._adopt(pid)
        return True

    async def start(self) -> None:
        """Start wireguard-go in its own mount namespace; returns once its UAPI socket answers."""
        binary = self.available(self.binary)
        if binary is None:
            raise UapiError(f"wireguard-go is not installed (no {self.binary} in PATH): apt-get install wireguard-go")
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "LOG_LEVEL": "error",
            # With -f: no "the kernel has WireGuard" banner, no re-exec into the background.
            "WG_PROCESS_FOREGROUND": "1",
        }
        proc = self._spawn(sandbox_argv("flannel-wg", binary, ["-f", self.name]), env)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        while loop.time() < deadline:
            if proc.poll() is not None:
                status = proc.returncode
                # Reaped and unwatched: a dead process's pidfd stays readable, and the supervisor would take it
                # for a fresh exit at once, again and again.
                self._forget()
                raise UapiError(f"wireguard-go for {self.name} exited at start with status {status}")
            if os.path.exists(self.socket_path):
                return
            await asyncio.sleep(0.02)
        await self.stop()
        raise UapiError(f"wireguard-go for {self.name} did not open its UAPI socket within {START_TIMEOUT:.0f}s")

    async def get(self) -> WgDevice:
        return decode_get(await uapi_call(self.socket_path, b"get=1\n\n", self.name), self.name)

    async def set(self, update: WgUpdate) -> None:
        if not update:
            return
        text = await uapi_call(self.socket_path, encode_set(update), self.name)
        for line in text.splitlines():
            if line.startswith("errno=") and line != "errno=0":
                raise UapiError(f"wireguard-go {self.name}: set failed with {line}")
        if "errno=" not in text:
            raise UapiError(f"wireguard-go {self.name}: no answer to a set request")


__all__ = ["UapiError", "WireguardGo", "decode_get", "encode_set", "find_wireguard_go", "uapi_call"]
