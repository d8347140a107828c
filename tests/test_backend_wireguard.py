"""The wireguard backend's pieces on their own: options, the key file, which peer each lease becomes in each Mode,
and wireguard-go run in two network namespaces at once (each in its own mount namespace, so their UAPI sockets of
the same name do not collide and nothing appears in this machine's /run)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import sys
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from pathlib import Path
from typing import Any

import pytest
from needs import need

from pyflannel.backend.base import BackendError, ExternalInterface
from pyflannel.backend.wireguard import (
    DEVICE,
    DEVICE_V6,
    WireguardBackend,
    load_or_create_key,
    parse_options,
)
from pyflannel.config import parse_net_config
from pyflannel.lab.netns import RunScope, ns_exec
from pyflannel.lease import Lease, LeaseAttrs
from pyflannel.netlink.wireguard import PublicKey, SecretKey, WgUpdate


def _cfg(backend: dict[str, Any], **extra: Any) -> Any:
    conf = {"Network": "10.244.0.0/16", "Backend": {"Type": "wireguard", **backend}, **extra}
    return parse_net_config(json.dumps(conf))


def _ext(v6: bool = False, ip4: str = "192.168.77.11", ip6: str = "fd00:77::11") -> ExternalInterface:
    a6 = IPv6Address(ip6) if v6 else None
    return ExternalInterface("eth0", 2, 1500, IPv4Address(ip4), a6, IPv4Address(ip4), a6)


class _NoNetlink:
    netns = None


def _backend(backend: dict[str, Any], v6: bool = False, **extra: Any) -> WireguardBackend:
    cfg = _cfg(backend, **({"EnableIPv6": True, "IPv6Network": "fd01::/56"} if v6 else {}), **extra)
    return WireguardBackend(cfg, _ext(v6), _NoNetlink())  # type: ignore[arg-type]


def _lease(n: int, key: PublicKey | str, v6: bool = False, port: int | None = None, **attrs: Any) -> Lease:
    data: dict[str, Any] = {"PublicKey": str(key)}
    if port is not None:
        data["Port"] = port
    return Lease(
        IPv4Network(f"10.244.{n}.0/24"),
        IPv6Network(f"fd01:0:0:{n}::/64") if v6 else None,
        LeaseAttrs(
            public_ip=IPv4Address(f"192.168.77.{n}"),
            public_ipv6=IPv6Address(f"fd00:77::{n}") if v6 else None,
            backend_type=attrs.get("backend_type", "wireguard"),
            backend_data=data,
            backend_v6_data=data if v6 else None,
        ),
    )


# ---------------------------------------------------------------- options


def test_defaults_are_upstreams() -> None:
    o = parse_options(_cfg({}))
    assert (o.listen_port, o.listen_port_v6, o.psk, o.keepalive, o.mode, o.mtu, o.implementation) == (
        51820, 51821, None, 0, "separate", 0, "auto",
    )  # fmt: skip
    b = _backend({})
    assert [(d.name, d.port, d.versions) for d in b.devs] == [(DEVICE, 51820, (4,))]
    assert b._mtu == 1420
    assert _backend({"MTU": 1400})._mtu == 1320


def test_modes_choose_the_devices() -> None:
    sep = _backend({}, v6=True)
    assert [(d.name, d.port, d.versions) for d in sep.devs] == [(DEVICE, 51820, (4,)), (DEVICE_V6, 51821, (6,))]
    for mode in ("auto", "ipv4", "ipv6"):
        one = _backend({"Mode": mode, "ListenPortV6": 4000}, v6=True)
        assert [(d.name, d.port, d.versions) for d in one.devs] == [(DEVICE, 51820, (4, 6))]


@pytest.mark.parametrize(
    "backend,needle",
    [
        ({"Mode": "Separate"}, "Backend.Mode"),
        ({"Mode": 1}, "Backend.Mode: expected a string"),
        ({"PSK": 5}, "Backend.PSK: expected a string"),
        ({"PSK": "short"}, "Backend.PSK: not a WireGuard key"),
        ({"PersistentKeepaliveInterval": -1}, "PersistentKeepaliveInterval"),
        ({"ListenPortV6": 0}, "ListenPortV6"),
        ({"Implementation": "go"}, "Backend.Implementation"),
    ],
)
def test_bad_options(backend: dict[str, Any], needle: str) -> None:
    with pytest.raises(BackendError, match=needle) as e:
        WireguardBackend.check_config(_cfg(backend))
    if isinstance(backend.get("PSK"), str):
        assert backend["PSK"] not in str(e.value)


def test_psk_is_parsed_and_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    psk = SecretKey.generate()
    with caplog.at_level(logging.INFO):
        b = _backend({"PSK": psk.reveal_base64()})
    assert b.opts.psk == psk
    assert "PSK=set" in caplog.text and psk.reveal_base64() not in caplog.text
    assert psk.reveal_base64() not in repr(b.opts)


# ---------------------------------------------------------------- the key file


def test_key_file_is_made_0400_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "wgkey"
    key, created = load_or_create_key(str(path))
    assert created
    assert stat.S_IMODE(path.stat().st_mode) == 0o400
    assert SecretKey.from_base64(path.read_text()) == key
    again, created2 = load_or_create_key(str(path))
    assert again == key and not created2
    assert [p.name for p in path.parent.iterdir()] == ["wgkey"]  # no temp file left


def test_a_key_file_written_by_wg_genkey_is_used(tmp_path: Path) -> None:
    path = tmp_path / "wgkey"
    k = SecretKey.generate()
    path.write_text(k.reveal_base64() + "\n")
    assert load_or_create_key(str(path)) == (k, False)


@pytest.mark.parametrize("content", [b"garbage", b"", b"\0" * 32, b"A" * 10000])
def test_a_bad_key_file_is_an_error_and_is_kept(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "wgkey"
    path.write_bytes(content)
    with pytest.raises(BackendError) as e:
        load_or_create_key(str(path))
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    if content:
        assert content[:6].decode(errors="replace") not in msg.replace(str(path), "")
    assert path.read_bytes() == content


def test_a_key_file_that_is_a_directory_or_a_device_is_refused(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(BackendError, match="it is a directory"):
        load_or_create_key(str(tmp_path / "d"))
    (tmp_path / "z").symlink_to("/dev/zero")
    with pytest.raises(BackendError, match="not a regular file"):
        load_or_create_key(str(tmp_path / "z"))
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(BackendError):
        load_or_create_key(str(tmp_path / "dangling"))
    assert not (tmp_path / "nowhere").exists()


# ---------------------------------------------------------------- leases to peers


def test_a_lease_becomes_a_peer_with_its_port_or_ours() -> None:
    b = _backend({"PersistentKeepaliveInterval": 25})
    dev = b.devs[0]
    k = SecretKey.generate().public_key()
    p = b._peer_for(_lease(12, k, port=4000), dev, warn=True)
    assert p is not None
    assert (p.public_key, p.endpoint, p.keepalive, p.allowed_ips) == (
        k, (IPv4Address("192.168.77.12"), 4000), 25, (ip_network("10.244.12.0/24"),),
    )  # fmt: skip
    # Upstream's leases carry no Port: our own ListenPort, as upstream uses.
    p2 = b._peer_for(_lease(13, k), dev, warn=True)
    assert p2 is not None and p2.endpoint == (IPv4Address("192.168.77.13"), 51820)


def test_malformed_or_foreign_leases_are_skipped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    b = _backend({})
    dev = b.devs[0]
    with caplog.at_level(logging.WARNING):
        assert b._peer_for(_lease(12, "not-a-key"), dev, warn=True) is None
        assert b._peer_for(_lease(13, SecretKey.generate().public_key(), backend_type="vxlan"), dev, warn=True) is None
    assert "lease 10.244.12.0-24 has no valid PublicKey" in caplog.text
    assert "ignoring non-wireguard subnet 10.244.13.0-24: type=vxlan" in caplog.text


def test_a_lease_with_our_own_key_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    b = _backend({})
    me = SecretKey.generate()
    b._key, b._public = me, me.public_key()
    with caplog.at_level(logging.WARNING):
        assert b._peer_for(_lease(12, me.public_key()), b.devs[0], warn=True) is None
    assert "advertises this node's own public key" in caplog.text


def test_peer_updates_replace_and_removals_remove() -> None:
    b = _backend({})
    sent: list[tuple[str, WgUpdate]] = []

    async def record(dev: Any, update: WgUpdate) -> None:
        sent.append((dev.name, update))

    b._set = record  # type: ignore[method-assign]
    k1, k2 = (SecretKey.generate().public_key() for _ in range(2))

    async def steps() -> None:
        await b.add_peers([_lease(12, k1)])
        await b.add_peers([_lease(12, k2, port=4000)])  # the node restarted with a new key and port
        await b.remove_peer(_lease(12, k2, port=4000))

    asyncio.run(steps())
    (d1, u1), (d2, u2), (d3, u3) = sent
    assert d1 == d2 == d3 == DEVICE
    assert [p.public_key for p in u1.peers] == [k1] and u1.remove == ()
    assert [p.public_key for p in u2.peers] == [k2] and u2.remove == (k1,)
    assert u2.peers[0].endpoint == (IPv4Address("192.168.77.12"), 4000)
    assert u2.peers[0].allowed_ips == (ip_network("10.244.12.0/24"),)
    assert u3.peers == () and u3.remove == (k2,)
    assert b.devs[0].desired() == {}


def test_endpoints_per_mode() -> None:
    k = SecretKey.generate().public_key()
    lease = _lease(12, k, v6=True)
    sep = _backend({}, v6=True)
    p4, p6 = (sep._peer_for(lease, d, warn=True) for d in sep.devs)
    assert p4 is not None and p4.endpoint == (IPv4Address("192.168.77.12"), 51820)
    assert p4.allowed_ips == (ip_network("10.244.12.0/24"),)
    # The lease's IPv6 data has no Port: our own ListenPortV6, as upstream.
    assert p6 is not None and p6.endpoint == (IPv6Address("fd00:77::12"), 51821)
    assert p6.allowed_ips == (ip_network("fd01:0:0:12::/64"),)
    both = (ip_network("10.244.12.0/24"), ip_network("fd01:0:0:12::/64"))
    for mode, ip in (("ipv4", "192.168.77.12"), ("ipv6", "fd00:77::12"), ("auto", "192.168.77.12")):
        one = _backend({"Mode": mode}, v6=True)
        p = one._peer_for(lease, one.devs[0], warn=True)
        assert p is not None and p.allowed_ips == both
        assert p.endpoint is not None and str(p.endpoint[0]) == ip, mode


def test_two_leases_with_one_key_share_the_peer_until_one_goes() -> None:
    b = _backend({})
    dev = b.devs[0]
    k = SecretKey.generate().public_key()
    old, new = _lease(12, k), _lease(14, k)
    dev.set_spec(old.key, b._peer_for(old, dev, warn=True))
    dev.set_spec(new.key, b._peer_for(new, dev, warn=True))
    merged = dev.merged(k)
    assert merged is not None and merged.allowed_ips == (ip_network("10.244.12.0/24"), ip_network("10.244.14.0/24"))
    assert dev.set_spec(old.key, None) == {k}
    after = dev.merged(k)
    assert after is not None and after.allowed_ips == (ip_network("10.244.14.0/24"),)
    assert dev.set_spec(new.key, None) == {k} and dev.merged(k) is None and dev.desired() == {}


# ---------------------------------------------------------------- wireguard-go, two at once


_RUN_WG_GO = """
import asyncio, ipaddress, json, os, sys
from pyflannel.backend.wireguard_go import WireguardGo, find_wireguard_go
from pyflannel.netlink.wireguard import PublicKey, SecretKey, WgUpdate, WgPeer, WgUpdate

async def main():
    wg = WireguardGo("flannel-wg")
    await wg.start()
    key = SecretKey.generate()
    peer = WgPeer(PublicKey(bytes([int(sys.argv[1])]) * 32), (ipaddress.ip_address("192.0.2.1"), 51820), 0,
                  (ipaddress.ip_network("10.9.%s.0/24" % sys.argv[1]),))
    await wg.set(WgUpdate(private_key=key, listen_port=51820, peers=(peer,)))
    dev = await wg.get()
    same = dev.public_key == key.public_key()
    print(json.dumps({"pid": wg.pid, "found": find_wireguard_go("flannel-wg"), "same_key": same,
                      "peers": [str(p.public_key) for p in dev.peers], "port": dev.listen_port,
                      "ips": [str(n) for p in dev.peers for n in p.allowed_ips]}))
    await wg.stop()
    print(json.dumps({"after_stop": find_wireguard_go("flannel-wg")}))

asyncio.run(main())
"""


def test_two_wireguard_go_of_one_name_in_two_namespaces(tmp_path: Path) -> None:
    need(tools=("ip", "wireguard-go"))
    had_run_wireguard = Path("/run/wireguard").exists()
    with RunScope(tag="wggo") as scope:
        outs = []
        for i in (1, 2):
            ns = scope.add_ns(f"g{i}")
            out = ns_exec(ns, [sys.executable, "-c", _RUN_WG_GO, str(i)], timeout=60)
            outs.append([json.loads(line) for line in out.splitlines()])
        for i, (first, second) in enumerate(outs, start=1):
            assert first["found"] == first["pid"] and first["same_key"] and first["port"] == 51820
            assert first["peers"] == [str(PublicKey(bytes([i]) * 32))] and first["ips"] == [f"10.9.{i}.0/24"]
            assert second == {"after_stop": None}
    assert Path("/run/wireguard").exists() == had_run_wireguard  # the host's /run never saw a socket
    assert os.path.exists("/proc/self/ns/mnt")


def test_a_wireguard_go_that_exits_at_start_is_not_watched_as_a_fresh_exit() -> None:
    # A dead process's pidfd stays readable: kept, the supervisor would see a new exit at once, forever.
    need(root=True, tools=["unshare"])
    from pyflannel.backend.wireguard_go import UapiError, WireguardGo

    async def go() -> None:
        wg = WireguardGo(name="pfwgtest0", binary="false")
        with pytest.raises(UapiError, match="exited at start"):
            await wg.start()
        assert wg.pid == 0 and not wg.alive()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(wg.wait_exit(), 0.5)

    asyncio.run(go())
