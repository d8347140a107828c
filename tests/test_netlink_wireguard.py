"""WireGuard's values and codecs without root: keys (X25519, parsing, redaction), the generic netlink messages,
and wireguard-go's UAPI text. Encoded SET requests are decoded back with the GET decoder (the kernel uses the same
attribute layout for both), so a wrong attribute number or nesting shows as a lost field."""

from __future__ import annotations

import base64
import ipaddress
import logging
import shutil
import struct
import subprocess

import pytest

from pyflannel.backend.wireguard_go import UapiError, decode_get, encode_set
from pyflannel.netlink.codec import HDR, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST
from pyflannel.netlink.wireguard import (
    GENL_ID_CTRL,
    MAX_SET_MESSAGE,
    NLA_F_NESTED,
    WGDEVICE_A_FLAGS,
    WGDEVICE_A_LISTEN_PORT,
    WGDEVICE_A_PEERS,
    WGDEVICE_A_PRIVATE_KEY,
    DeviceAccumulator,
    PublicKey,
    SecretKey,
    WgPeer,
    WgUpdate,
    decode_device_message,
    decode_family_id,
    encode_get_device,
    encode_get_family,
    encode_set_device,
    format_endpoint,
    parse_endpoint,
    renumber,
    x25519,
    x25519_base,
)

net = ipaddress.ip_network
addr = ipaddress.ip_address


def test_x25519_rfc7748_vectors() -> None:
    # RFC 7748 section 5.2 (one scalar multiplication) and 6.1 (Alice's key pair).
    k = bytes.fromhex("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4")
    u = bytes.fromhex("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c")
    assert x25519(k, u).hex() == "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"
    alice = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    assert x25519_base(alice).hex() == "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"


def test_public_key_matches_wg_pubkey() -> None:
    if shutil.which("wg") is None:
        pytest.fail("wg (wireguard-tools) is missing: run scripts/setup.sh")
    for _ in range(3):
        k = SecretKey.generate()
        out = subprocess.run(["wg", "pubkey"], input=k.reveal_base64(), capture_output=True, text=True, check=True)
        assert str(k.public_key()) == out.stdout.strip()


def test_secret_keys_never_print(caplog: pytest.LogCaptureFixture) -> None:
    k = SecretKey.generate()
    secrets = (k.reveal_base64(), k.reveal_hex(), k.reveal_base64()[:20])
    peer = WgPeer(PublicKey(b"\1" * 32), (addr("192.0.2.1"), 51820), 0, (net("10.0.0.0/24"),), psk=k)
    update = WgUpdate(private_key=k, peers=(peer,))
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("t").info("key %s %r peer %s update %r", k, k, peer, update)
    texts = [repr(k), str(k), f"{k}", repr(peer), repr(update), str([k]), caplog.text]
    for text in texts:
        for s in secrets:
            assert s not in text
    assert "SecretKey(redacted)" in repr(update)
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(k)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "abc",
        "A" * 44,
        base64.b64encode(b"x" * 31).decode() + "==",
        "!" * 43 + "=",
        base64.b64encode(b"x" * 33).decode(),
    ],
)
def test_malformed_keys_are_refused_without_echo(text: str) -> None:
    with pytest.raises(ValueError) as e:
        SecretKey.from_base64(text)
    assert (not text) or text not in str(e.value)
    with pytest.raises(ValueError):
        PublicKey.from_base64(text)


def test_key_parsing_takes_wg_genkey_output_with_a_newline() -> None:
    k = SecretKey.generate()
    assert SecretKey.from_base64(k.reveal_base64() + "\n") == k
    assert PublicKey.from_base64(str(k.public_key())) == k.public_key()


def test_endpoints_format_and_parse() -> None:
    assert format_endpoint((addr("192.0.2.1"), 51820)) == "192.0.2.1:51820"
    assert format_endpoint((addr("fd00::1"), 51821)) == "[fd00::1]:51821"
    assert parse_endpoint("[fd00::1]:51821") == (addr("fd00::1"), 51821)
    assert parse_endpoint("192.0.2.1:1") == (addr("192.0.2.1"), 1)
    with pytest.raises(ValueError):
        parse_endpoint("192.0.2.1")


def test_family_request_and_reply() -> None:
    msg = encode_get_family(7, "wireguard")
    n, kind, flags, seq, _pid = HDR.unpack_from(msg)
    assert (n, kind, flags, seq) == (len(msg), GENL_ID_CTRL, NLM_F_REQUEST, 7)
    assert msg[16:20] == bytes([3, 1, 0, 0])  # CTRL_CMD_GETFAMILY, version 1
    assert msg[20:] == struct.pack("=HH", 14, 2) + b"wireguard\0" + b"\0\0"
    reply = bytes([1, 2, 0, 0]) + struct.pack("=HHH2x", 6, 1, 0x1D)
    assert decode_family_id(reply, 0, len(reply)) == 0x1D


def test_get_device_is_a_dump_by_name() -> None:
    msg = encode_get_device(3, 0x1D, "flannel-wg")
    _n, kind, flags, _seq, _pid = HDR.unpack_from(msg)
    assert kind == 0x1D and flags == NLM_F_REQUEST | NLM_F_DUMP
    assert msg[16:18] == bytes([0, 1])  # WG_CMD_GET_DEVICE, version 1
    assert b"flannel-wg\0" in msg


def _decode_set(msgs: list[bytes]) -> DeviceAccumulator:
    acc = DeviceAccumulator()
    for m in msgs:
        decode_device_message(m, 16, len(m), acc)
    return acc


def test_set_device_round_trips_through_the_get_decoder() -> None:
    psk = SecretKey.generate()
    keys = [SecretKey.generate().public_key() for _ in range(3)]
    peers = (
        WgPeer(keys[0], (addr("192.168.77.12"), 51820), 25, (net("10.244.1.0/24"),), psk),
        WgPeer(keys[1], (addr("fd00::12"), 51821), 0, WgPeer.sort_ips([net("fd01:0:0:2::/64"), net("10.244.2.0/24")])),
    )
    update = WgUpdate(private_key=SecretKey.generate(), listen_port=51820, peers=peers, remove=(keys[2],))
    msgs = encode_set_device(0x1D, "flannel-wg", update)
    assert len(msgs) == 1
    _n, kind, flags, _seq, _pid = HDR.unpack_from(msgs[0])
    assert kind == 0x1D and flags == NLM_F_REQUEST | NLM_F_ACK and msgs[0][16] == 1  # WG_CMD_SET_DEVICE
    acc = _decode_set(msgs)
    dev = acc.device("flannel-wg")
    assert (dev.name, dev.listen_port) == ("flannel-wg", 51820)
    got = {p.public_key: p for p in dev.peers}
    assert got[keys[0]] == peers[0] and got[keys[0]].psk == psk and got[keys[0]].keepalive == 25
    assert got[keys[1]] == peers[1] and got[keys[1]].psk is None
    assert got[keys[2]].allowed_ips == ()  # the removal: a bare key (with WGPEER_F_REMOVE_ME)
    # PEERS is a nested attribute (the kernel's strict parsers want NLA_F_NESTED).
    types = [t for t, _a, _b in _raw_attrs(msgs[0])]
    assert WGDEVICE_A_PEERS | NLA_F_NESTED in types and WGDEVICE_A_PRIVATE_KEY in types


def _raw_attrs(msg: bytes) -> list[tuple[int, int, int]]:
    out, off = [], 20
    while off + 4 <= len(msg):
        n, t = struct.unpack_from("=HH", msg, off)
        out.append((t, off + 4, off + n))
        off += (n + 3) & ~3
    return out


def test_a_large_set_is_split_between_whole_peers_and_device_settings_go_first() -> None:
    keys = [PublicKey(struct.pack(">I", i) * 8) for i in range(2000)]
    peers = tuple(
        WgPeer(k, (addr("192.168.0.1") + i, 51820), 0, (net(f"10.{i >> 8}.{i & 255}.0/24"),))
        for i, k in enumerate(keys)
    )
    msgs = encode_set_device(
        0x1D, "flannel-wg", WgUpdate(private_key=SecretKey.generate(), listen_port=1, replace_peers=True, peers=peers)
    )
    assert len(msgs) > 2
    assert all(len(m) <= MAX_SET_MESSAGE + 300 for m in msgs)
    firsts = [{t for t, _a, _b in _raw_attrs(m)} for m in msgs]
    assert {WGDEVICE_A_PRIVATE_KEY, WGDEVICE_A_LISTEN_PORT, WGDEVICE_A_FLAGS} <= firsts[0]
    for later in firsts[1:]:
        assert not later & {WGDEVICE_A_PRIVATE_KEY, WGDEVICE_A_LISTEN_PORT, WGDEVICE_A_FLAGS}
    dev = _decode_set(msgs).device("flannel-wg")
    assert {p.public_key: p for p in dev.peers} == {p.public_key: p for p in peers}
    assert HDR.unpack_from(renumber(msgs[1], 99))[3] == 99


def test_a_peer_continued_in_a_second_dump_message_is_merged() -> None:
    k = PublicKey(b"\7" * 32)
    a = encode_set_device(1, "wg", WgUpdate(peers=(WgPeer(k, None, 0, (net("10.0.1.0/24"),)),)))
    b = encode_set_device(1, "wg", WgUpdate(peers=(WgPeer(k, None, 0, (net("10.0.2.0/24"),)),)))
    dev = _decode_set(a + b).device("wg")
    assert len(dev.peers) == 1 and dev.peers[0].allowed_ips == (net("10.0.1.0/24"), net("10.0.2.0/24"))


def test_uapi_set_text() -> None:
    psk = SecretKey(b"\2" * 32)
    k = PublicKey(b"\1" * 32)
    priv = SecretKey(b"\3" * 32)
    text = encode_set(
        WgUpdate(
            private_key=priv,
            listen_port=51820,
            peers=(WgPeer(k, (addr("fd00::1"), 51821), 5, (net("10.0.0.0/24"), net("fd01::/64")), psk),),
            remove=(PublicKey(b"\4" * 32),),
        )
    ).decode()
    assert text == (
        "set=1\n"
        f"private_key={'03' * 32}\n"
        "listen_port=51820\n"
        f"public_key={'01' * 32}\n"
        "replace_allowed_ips=true\n"
        f"preshared_key={'02' * 32}\n"
        "endpoint=[fd00::1]:51821\n"
        "persistent_keepalive_interval=5\n"
        "allowed_ip=10.0.0.0/24\n"
        "allowed_ip=fd01::/64\n"
        f"public_key={'04' * 32}\n"
        "remove=true\n"
        "\n"
    )


def test_uapi_get_reply_is_decoded() -> None:
    priv = SecretKey.generate()
    k1, k2 = PublicKey(b"\1" * 32), PublicKey(b"\2" * 32)
    reply = (
        f"private_key={priv.reveal_hex()}\nlisten_port=51820\n"
        f"public_key={'01' * 32}\npreshared_key={'00' * 32}\nprotocol_version=1\nendpoint=192.168.77.12:51820\n"
        "last_handshake_time_sec=10\nlast_handshake_time_nsec=500000000\ntx_bytes=7\nrx_bytes=9\n"
        "persistent_keepalive_interval=0\nallowed_ip=10.244.2.0/24\n"
        f"public_key={'02' * 32}\npreshared_key={'05' * 32}\npersistent_keepalive_interval=25\n"
        "errno=0\n\n"
    )
    dev = decode_get(reply, "flannel-wg")
    assert dev.public_key == priv.public_key() and dev.listen_port == 51820
    p1, p2 = dev.peers
    assert p1 == WgPeer(k1, (addr("192.168.77.12"), 51820), 0, (net("10.244.2.0/24"),))
    assert (p1.last_handshake, p1.tx_bytes, p1.rx_bytes) == (10.5, 7, 9)
    assert p2.public_key == k2 and p2.psk == SecretKey(b"\5" * 32) and p2.keepalive == 25 and p2.endpoint is None
    with pytest.raises(UapiError, match="errno 2"):
        decode_get("errno=2\n\n", "flannel-wg")
    with pytest.raises(UapiError) as e:
        decode_get(f"private_key={'zz' * 32}\n", "flannel-wg")
    assert "zz" not in str(e.value)
