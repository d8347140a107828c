"""The ipsec backend's pieces on their own: options, ESP proposals, the VICI messages built for charon, which
connection each lease becomes, and a real charon in a namespace of this run (its private /run, its VICI socket,
keys and connections loaded and unloaded, the PSK in no file and no log)."""

from __future__ import annotations

import json
import os
import pickle
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
from clusters import py_in
from needs import need

from pyflannel.backend.base import BackendError, ExternalInterface
from pyflannel.backend.charon import (
    ConnSpec,
    check_proposal,
    conn_message,
    established,
    find_charon,
    shared_message,
    strongswan_conf,
)
from pyflannel.backend.ipsec import DEFAULT_ESP_PROPOSAL, IpsecBackend, parse_options
from pyflannel.backend.registry import backend_class
from pyflannel.backend.sandbox import run_tmpfs_in
from pyflannel.config import parse_net_config
from pyflannel.lab.netns import RunScope
from pyflannel.lease import Lease, LeaseAttrs

PSK = "k" * 40 + "0123456789" * 6  # 100 characters


def _cfg(backend: dict[str, Any]) -> Any:
    return parse_net_config(json.dumps({"Network": "10.244.0.0/16", "Backend": {"Type": "ipsec", **backend}}))


def _ext(ip: str = "192.168.77.12") -> ExternalInterface:
    return ExternalInterface("eth0", 2, 1500, IPv4Address(ip), None, IPv4Address(ip), None)


class _NoNetlink:
    netns = None


def _lease(n: int, backend_type: str = "ipsec") -> Lease:
    return Lease(IPv4Network(f"10.244.{n}.0/24"), None,
                 LeaseAttrs(public_ip=IPv4Address(f"192.168.77.{n}"), backend_type=backend_type))  # fmt: skip


# ---------------------------------------------------------------- options


def test_defaults_are_upstreams() -> None:
    o = parse_options(_cfg({"PSK": PSK}))
    assert (o.udp_encap, o.esp_proposal, o.vici_uri, o.charon_path) == (False, DEFAULT_ESP_PROPOSAL, "", "")
    assert DEFAULT_ESP_PROPOSAL == "aes128gcm16-sha256-prfsha256-ecp256"
    assert o.psk.reveal() == PSK
    assert backend_class("IPSec") is IpsecBackend


@pytest.mark.parametrize(
    "backend,needle",
    [
        ({}, "Backend.PSK is required"),
        ({"PSK": ""}, "Backend.PSK is required"),
        ({"PSK": 12345}, "Backend.PSK: expected a string"),
        ({"PSK": "x" * 95}, "Backend.PSK is too short: 95 characters, at least 96 needed"),
        ({"PSK": PSK, "UDPEncap": "yes"}, "Backend.UDPEncap: expected true or false"),
        ({"PSK": PSK, "ESPProposal": "aes128-magic"}, "unknown algorithm keyword 'magic'"),
        ({"PSK": PSK, "ESPProposal": 7}, "Backend.ESPProposal: expected a string"),
        ({"PSK": PSK, "CharonViciUri": "tcp://1.2.3.4:4502"}, "only unix:///path sockets"),
    ],
)
def test_bad_options_are_refused_naming_the_key(backend: dict[str, Any], needle: str) -> None:
    with pytest.raises(BackendError) as e:
        parse_options(_cfg(backend))
    assert needle in str(e.value)
    if isinstance(backend.get("PSK"), str) and backend["PSK"]:
        assert backend["PSK"][:20] not in str(e.value)


def test_psk_never_printed() -> None:
    o = parse_options(_cfg({"PSK": PSK}))
    for text in (repr(o), str(o), repr(o.psk), f"{o.psk}"):
        assert PSK not in text and PSK[:16] not in text
    with pytest.raises(TypeError):
        pickle.dumps(o.psk)


@pytest.mark.parametrize(
    "text",
    [
        DEFAULT_ESP_PROPOSAL,
        "aes256gcm16",
        "aes128-sha256",
        "aes256-sha512-modp4096,aes128gcm16-ecp256",
        "chacha20poly1305-prfsha256-x25519",
        "aes128gcm16-sha256-prfsha256-ecp256-esn",
    ],
)
def test_known_proposals_pass(text: str) -> None:
    assert check_proposal(text) is None


@pytest.mark.parametrize(
    "text,why",
    [
        ("", "empty"),
        ("aes128gcm16-sha257", "unknown algorithm keyword 'sha257'"),
        ("sha256-ecp256", "names no encryption algorithm"),
        ("aes128-ecp256", "names no integrity algorithm"),
        ("aes128gcm16,,", "unknown algorithm keyword ''"),
    ],
)
def test_unknown_proposals_say_why(text: str, why: str) -> None:
    got = check_proposal(text)
    assert got is not None and why in got


def test_missing_charon_is_one_clear_error() -> None:
    with pytest.raises(BackendError, match=r"charon \(strongSwan's IKE daemon\) not found in /nope/charon"):
        IpsecBackend(_cfg({"PSK": PSK, "CharonExecutablePath": "/nope/charon"}), _ext(), _NoNetlink())  # type: ignore[arg-type]


def test_mtu_is_upstreams() -> None:
    need(root=False, files=("/usr/lib/ipsec/charon",))
    b = IpsecBackend(_cfg({"PSK": PSK}), _ext(), _NoNetlink())  # type: ignore[arg-type]
    assert b._mtu == 1423
    b = IpsecBackend(_cfg({"PSK": PSK, "UDPEncap": True}), _ext(), _NoNetlink())  # type: ignore[arg-type]
    assert b._mtu == 1415


# ---------------------------------------------------------------- leases -> connections


def test_each_lease_becomes_upstreams_connection_and_one_end_initiates() -> None:
    need(root=False, files=("/usr/lib/ipsec/charon",))
    b = IpsecBackend(_cfg({"PSK": PSK}), _ext("192.168.77.12"), _NoNetlink())  # type: ignore[arg-type]
    b._own = _lease(12)
    low, high = b._peer_for(_lease(11), warn=False), b._peer_for(_lease(13), warn=False)
    assert low is not None and high is not None
    assert low.conn.name == "192.168.77.12-10.244.12.0/24-10.244.11.0/24-192.168.77.11"
    assert low.conn.child == "10.244.12.0/24-10.244.11.0/24"
    assert (low.conn.local_ts, low.conn.remote_ts) == (("10.244.12.0/24",), ("10.244.11.0/24",))
    # The lower PublicIP initiates: toward .11 we only respond, toward .13 we initiate.
    assert (low.conn.initiator, high.conn.initiator) == (False, True)
    assert low.key_id == "flannel-192.168.77.11" and low.owners == ("192.168.77.12", "192.168.77.11")
    assert [str(p) for p in low.policies] == [
        "src 10.244.12.0/24 dst 10.244.11.0/24 dir out priority 0 tmpl src 192.168.77.12 dst 192.168.77.11 proto esp "
        "reqid 11 mode tunnel",
        "src 10.244.11.0/24 dst 10.244.12.0/24 dir in priority 0 tmpl src 192.168.77.11 dst 192.168.77.12 proto esp "
        "reqid 11 mode tunnel",
        "src 10.244.11.0/24 dst 10.244.12.0/24 dir fwd priority 0 tmpl src 192.168.77.11 dst 192.168.77.12 proto esp "
        "reqid 11 mode tunnel",
    ]
    assert b._peer_for(_lease(12), warn=False) is None  # our own
    assert b._peer_for(_lease(14, "vxlan"), warn=False) is None


def _spec(initiator: bool, encap: bool = False) -> ConnSpec:
    return ConnSpec("c", "k", "192.168.77.11", "192.168.77.12", ("10.244.1.0/24",), ("10.244.2.0/24",),
                    DEFAULT_ESP_PROPOSAL, 11, encap, initiator)  # fmt: skip


def test_conn_message_is_tunnel_mode_without_charons_policies() -> None:
    m = conn_message(_spec(True))
    ike = m["c"]
    assert (ike["version"], ike["local_addrs"], ike["remote_addrs"], ike["encap"]) == (
        "2", ["192.168.77.11"], ["192.168.77.12"], "no",
    )  # fmt: skip
    assert ike["local"] == {"auth": "psk", "id": "192.168.77.11"} and ike["remote"]["auth"] == "psk"
    child = ike["children"]["k"]
    assert child["mode"] == "tunnel" and child["policies"] == "no" and child["reqid"] == "11"
    assert (child["local_ts"], child["remote_ts"]) == (["10.244.1.0/24"], ["10.244.2.0/24"])
    assert child["esp_proposals"] == [DEFAULT_ESP_PROPOSAL]
    assert (child["start_action"], child["close_action"], child["dpd_action"]) == ("start", "start", "restart")
    child = conn_message(_spec(False, encap=True))["c"]["children"]["k"]
    assert (child["start_action"], child["close_action"], child["dpd_action"]) == ("none", "none", "clear")
    assert conn_message(_spec(False, encap=True))["c"]["encap"] == "yes"
    assert "psk" not in json.dumps(m).replace('"psk"', "")


def test_shared_message_names_both_ends() -> None:
    assert shared_message("flannel-1.2.3.4", PSK, ["1.2.3.3", "1.2.3.4"]) == {
        "id": "flannel-1.2.3.4", "type": "IKE", "data": PSK, "owners": ["1.2.3.3", "1.2.3.4"],
    }  # fmt: skip


def test_strongswan_conf_logs_low_and_touches_no_route() -> None:
    conf = strongswan_conf()
    assert "socket = unix:///run/charon.vici" in conf
    assert "install_routes = no" in conf and "default = 0" in conf and "load_modular = no" in conf
    assert "bypass-lan" not in conf and "updown" not in conf


def test_established_reads_list_sas() -> None:
    sas = [
        {b"a": {"state": b"ESTABLISHED", "child-sas": {"k-1": {"name": b"k", "state": b"INSTALLED"}}}},
        {b"b": {"state": b"CONNECTING", "child-sas": {}}},
        {"c": {"state": "ESTABLISHED"}},
    ]
    assert established(sas) == {"a": {"k"}, "c": set()}


def test_our_charon_is_recognised_under_a_machine_run_mount() -> None:
    # The VM's own /run is a tmpfs too, listed before the one the sandbox puts on top of it.
    machine = "25 1 0:22 / /run rw,nosuid,nodev shared:5 - tmpfs tmpfs rw,size=403000k,mode=755"
    ours = "40 38 0:45 / /run rw,nosuid,nodev,noexec - tmpfs flannel-charon rw,size=4096k,mode=700"
    other = "41 38 0:46 / /var rw - tmpfs flannel-charon rw"
    assert run_tmpfs_in([machine, ours], "flannel-charon")
    assert not run_tmpfs_in([machine, other], "flannel-charon")
    assert not run_tmpfs_in([machine], "flannel-charon")


# ---------------------------------------------------------------- a real charon


_SCRIPT = """
import asyncio, json, os, sys
from pyflannel.backend.charon import Charon, ConnSpec, find_charon
PSK = sys.argv[1]
async def main():
    c = Charon(find_charon())
    await c.start()
    v = c.vici()
    out = {"version": await v.version(), "pid": c.pid}
    await v.load_shared("flannel-10.9.0.2", PSK, ["10.9.0.1", "10.9.0.2"])
    spec = ConnSpec("a", "b", "10.9.0.1", "10.9.0.2", ("10.244.1.0/24",), ("10.244.2.0/24",),
                    "aes128gcm16-sha256-prfsha256-ecp256", 11, False, False)
    await v.load_conn(spec)
    out["loaded"] = [sorted(await v.conns()), sorted(await v.shared_ids())]
    root = f"/proc/{c.pid}/root/run"
    out["run"] = sorted(os.listdir(root))
    conf = f"{root}/pyflannel/strongswan.conf"
    out["conf_mode"] = oct(os.stat(conf).st_mode & 0o777)
    out["psk_in_run"] = any(PSK in open(os.path.join(d, f), errors="replace").read()
                            for d, _, fs in os.walk(root) for f in fs if not f.endswith(".vici"))
    await v.unload_conn("a")
    await v.unload_shared("flannel-10.9.0.2")
    out["unloaded"] = [sorted(await v.conns()), sorted(await v.shared_ids())]
    await c.stop()
    out["alive"] = c.alive()
    print(json.dumps(out))
asyncio.run(main())
"""


def test_real_charon_in_its_own_run(scope: RunScope, capfd: pytest.CaptureFixture[str]) -> None:
    need(files=("/usr/lib/ipsec/charon",))
    assert find_charon() is not None
    ns = scope.add_ns("chn")
    out = json.loads(py_in(ns, _SCRIPT, PSK, timeout=120).strip().splitlines()[-1])
    assert out["version"].startswith("charon 5.")
    assert out["loaded"] == [["a"], ["flannel-10.9.0.2"]]
    assert out["unloaded"] == [[], []]
    assert "charon.vici" in out["run"] and "charon.pid" in out["run"]
    assert out["conf_mode"] == "0o600" and out["psk_in_run"] is False
    assert out["alive"] is False
    # Nothing in this machine's /run: charon's socket and pid file lived only in its own.
    assert not os.path.exists("/run/charon.vici") and not os.path.exists("/run/charon.pid")
    err = capfd.readouterr()
    assert PSK not in err.out + err.err
