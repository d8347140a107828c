"""flannel-lab up --backend ipsec: on a kernel without ESP (this host's) a one-line refusal naming esp4 that makes
nothing, probed in a throwaway namespace of the lab's (the machine's own xfrm state untouched); in the stock-kernel
VM a real lab: check, show with every key hidden and never the PSK, trace whose underlay capture is ESP only.
"""

from __future__ import annotations

import hashlib
import re
import stat
import subprocess
from collections.abc import Callable

import pytest
from test_lab import LabRun, lab_factory

from pyflannel.lab.ipsec import redact
from pyflannel.lab.lab import check_esp
from pyflannel.lab.state import LabError

pytestmark = pytest.mark.integration
__all__ = ["lab_factory"]  # the fixture, imported for the tests below

HEX_KEY = re.compile(r"0x[0-9a-fA-F]{24,}")  # an SPI is 0x + 8 digits; keys are far longer


def _kernel_has_esp(prefix: str) -> bool:
    try:
        check_esp(prefix)
    except LabError:
        return False
    return True


def _root_xfrm() -> tuple[tuple[str, str], tuple[str, str]]:
    """The machine's own `ip xfrm state` and `ip xfrm policy` (read only), each as its redaction (a readable
    diff should they differ) and the sha256 of the raw text (a change in key material alone still shows), so a
    failed comparison never prints a real SA key."""

    def ip(*args: str) -> tuple[str, str]:
        out = subprocess.run(["ip", "xfrm", *args], capture_output=True, text=True, timeout=10).stdout
        return redact(out), hashlib.sha256(out.encode()).hexdigest()

    return ip("state"), ip("policy")


def test_ipsec_where_the_kernel_has_no_esp(lab_factory: Callable[[str], LabRun]) -> None:
    """This host's kernel has no esp4: `up --backend ipsec` fails at once in one line naming it and what to use
    instead, and leaves nothing (not even its probe namespace). On a host whose kernel has ESP the same command
    brings a lab up (test_ipsec_lab covers one in the VM pass)."""
    lab = lab_factory("noesp")
    before = _root_xfrm()
    if _kernel_has_esp(lab.prefix):
        lab.ok("up", "--backend", "ipsec", "--nodes", "1", "--pods-per-node", "0", timeout=400)
        lab.ok("down")
        lab.assert_gone()
        return
    p = lab.cli("up", "--backend", "ipsec")
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("flannel-lab: the ipsec backend needs the kernel's esp4 module"), p.stderr
    assert "use --backend wireguard" in p.stderr and "Traceback" not in p.stderr
    lab.assert_gone()
    assert _root_xfrm() == before
    p = lab.cli("up", "--ipsec-udp-encap")
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "an option of --backend ipsec" in p.stderr
    lab.assert_gone()
    # IPv6 is refused before any probe: upstream's ipsec is IPv4 only.
    p = lab.cli("up", "--backend", "ipsec", "--ip-family", "dual")
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "the ipsec backend carries IPv4 only" in p.stderr
    lab.assert_gone()


@pytest.mark.vm_only
@pytest.mark.parametrize("encap", [False, True], ids=["esp", "udpencap"])
def test_ipsec_lab(lab_factory: Callable[[str], LabRun], encap: bool) -> None:
    lab = lab_factory("ipsec" + ("u" if encap else ""))
    extra = ("--ipsec-udp-encap",) if encap else ()
    up = lab.ok("up", "--backend", "ipsec", "--nodes", "2", "--pods-per-node", "1", *extra, timeout=600)
    psk_file = lab.state_dir / "ipsec.psk"
    psk = psk_file.read_text().strip()
    assert len(psk) >= 96 and stat.S_IMODE(psk_file.stat().st_mode) == 0o600
    assert psk not in up and '"PSK": "(hidden' in up
    st = lab.status()
    n1, n2 = st["nodes"]
    src, dst = st["pods"][0]["ip"], st["pods"][1]["ip"]
    assert st["backend"] == "ipsec"
    # No route of flannel's own: the node's default route, where the out policy takes the packet.
    assert "default via 192.168.77.1 dev eth0" in lab.node_route(n1["netns"])
    assert "2/2 pairs ok" in lab.ok("check", timeout=180)

    show = lab.ok("show", "n1")
    assert "-- IPsec SAs (charon pid" in show and "proto esp" in show
    assert f"src {n1['ip']} dst {n2['ip']}" in show and f"src {n2['ip']} dst {n1['ip']}" in show
    assert "(key hidden)" in show and not HEX_KEY.search(show), show
    assert f"src {n1['subnet']} dst {n2['subnet']}" in show and "dir out" in show  # the policies
    assert psk not in show and psk not in lab.ok("status") and psk not in lab.ok("status", "--json")

    out = lab.ok("trace", "n1-p1", "n2-p1", timeout=180)
    assert psk not in out and not HEX_KEY.search(out.split("capture on underlay")[0])
    assert f"tmpl src {n1['ip']} dst {n2['ip']}" in out  # the out policy's template
    capture = out.split("capture on underlay")[1]
    # Only ESP between the nodes' addresses; neither pod address in clear, as text or as bytes.
    if encap:  # ESP inside UDP 4500, as tcpdump decodes it
        # tcpdump may put a checksum note first: "[no cksum] UDP-encap: ESP(spi=0x...,seq=0x5)".
        ips = rf"{re.escape(n1['ip'])}\.4500 > {re.escape(n2['ip'])}\.4500: "
        outer = ips + r"(?:\[[^]]*\] )?UDP-encap: ESP\(spi=0x[0-9a-f]+"
        assert '"UDPEncap": true' in up
    else:
        outer = rf"{re.escape(n1['ip'])} > {re.escape(n2['ip'])}: ESP\(spi=0x[0-9a-f]+"
        assert "proto ESP (50)" in capture
    assert re.search(outer, capture), capture
    assert src not in capture.split("encrypted:")[0] and dst not in capture.split("encrypted:")[0]
    assert "ICMP" not in capture and "encrypted: the underlay carries only ESP" in capture
    lab.ok("down")
    lab.assert_gone()
