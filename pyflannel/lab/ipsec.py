"""The ipsec backend in the lab: what `show` lists (the kernel's IPsec SAs and policies, `ip xfrm state/policy`
in the node namespace, every key hidden) and the hops `trace` explains (no route of flannel's own: the xfrm
policy for the peer's subnet takes the packet, the SA to the peer's underlay IP encrypts it), plus what the
underlay capture filters on (ESP, protocol 50, or UDP 4500 with UDPEncap).

Key material never reaches the output: `ip xfrm state` prints each SA's keys in hex, and every such key is
rewritten here as "(key hidden)"; the PSK lives only in the net-conf and in the run directory's 0600 file.
"""

from __future__ import annotations

import ipaddress
import re

from .netns import ns_pids, output_or_error

ESP_PROTO = 50
NATT_PORT = 4500
# `enc cbc(aes) 0x...`, `auth-trunc hmac(sha256) 0x... 128`, `aead rfc4106(gcm(aes)) 0x... 128`: the key is the
# hex after the algorithm. Any other long hex run is hidden too, should a newer `ip` print keys elsewhere.
_KEY = re.compile(r"^(\s*(?:enc|auth|auth-trunc|aead|comp)\s+\S+\s+)0x[0-9a-fA-F]+", re.M)
_LONG_HEX = re.compile(r"0x[0-9a-fA-F]{24,}")


def redact(text: str) -> str:
    """`ip xfrm state` output with every key replaced by "(key hidden)"."""
    return _LONG_HEX.sub("(key hidden)", _KEY.sub(r"\1(key hidden)", text))


def xfrm(ns: str, *args: str) -> str:
    """`ip xfrm ARGS` in the node namespace, keys hidden."""
    return redact(output_or_error(["ip", "-n", ns, "xfrm", *args]))


def charon_pid(ns: str) -> int | None:
    """The strongSwan charon serving this node (it runs in the node's namespace, in its own mount namespace)."""
    for pid in ns_pids(ns):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == "charon":
                    return pid
        except OSError:
            continue
    return None


def blocks(text: str) -> list[str]:
    """`ip xfrm state|policy` output cut into its entries (each starts at column 0, continues indented)."""
    out: list[str] = []
    for line in text.splitlines():
        if line and not line[0].isspace():
            out.append(line)
        elif out:
            out[-1] += "\n" + line
    return out


def show_sections(ns: str) -> list[tuple[str, str, str]]:
    """(title, command, body) for `show NODE`."""
    pid = charon_pid(ns)
    who = f"charon pid {pid}" if pid else "no charon running"
    out = [
        (f"IPsec SAs ({who}; keys hidden)", "ip xfrm state", xfrm(ns, "state") or "(none)"),
        ("IPsec policies (which traffic goes through which SA)", "ip xfrm policy", xfrm(ns, "policy") or "(none)"),
    ]
    if pid is not None:
        # charon's VICI socket is in its private /run, reached through its root (swanctl prints no key).
        uri = f"unix:///proc/{pid}/root/run/charon.vici"
        sas = redact(output_or_error(["swanctl", "--list-sas", "--uri", uri]))
        out.append(("charon's IKE_SAs and CHILD_SAs", f"swanctl --list-sas --uri {uri}", sas or "(none)"))
    return out


def policy_for(ns: str, direction: str, addr: str, *, match_src: bool = False) -> str:
    """The xfrm policy of `direction` (out, in, fwd) whose selector's dst (or src) network holds `addr`."""
    ip = ipaddress.ip_address(addr)
    for b in blocks(xfrm(ns, "policy", "list", "dir", direction)):
        m = re.match(r"src (\S+) dst (\S+)", b)
        if not m:
            continue
        net = m.group(1 if match_src else 2)
        try:
            if ip in ipaddress.ip_network(net, strict=False) and ipaddress.ip_network(net, strict=False).prefixlen:
                return b
        except ValueError:
            continue
    return "(no policy)"


def state_to(ns: str, src: str, dst: str) -> str:
    """The SAs from underlay address `src` to `dst` (keys hidden)."""
    return "\n".join(blocks(xfrm(ns, "state", "list", "src", src, "dst", dst))) or "(no SA)"


def trace_hops(
    src_ns: str, src_ip: str, dst_ns: str, dst_ip: str, src_pod: str, dst_pod: str
) -> list[tuple[str, str, str]]:
    """(what, command, entry) of the source node (policy, SA) and the destination node (SA, policy)."""
    return [
        (
            f"the xfrm policy (dir out) whose selector holds {dst_pod} matches before any route is used for the "
            f"tunnel: it names ESP in tunnel mode from {src_ip} to {dst_ip}",
            f"ip xfrm policy list dir out | grep -A4 'dst <{dst_pod}'s subnet>'",
            policy_for(src_ns, "out", dst_pod),
        ),
        (
            f"the SA {src_ip} -> {dst_ip} (negotiated by charon over IKE with the PSK) encrypts the packet; a new "
            "outer IPv4 header goes in front of the ESP header",
            f"ip xfrm state list src {src_ip} dst {dst_ip}   (keys hidden)",
            state_to(src_ns, src_ip, dst_ip),
        ),
        (
            f"ESP for its own address: the kernel finds the SA by SPI, decrypts, and lets the inner packet in only "
            f"because a policy (dir fwd) allows {src_pod} -> {dst_pod} through that tunnel",
            f"ip xfrm policy list dir fwd | grep -A4 'src <{src_pod}'s subnet>'",
            policy_for(dst_ns, "fwd", src_pod, match_src=True),
        ),
    ]


def underlay_filter() -> list[str]:
    """ESP (protocol 50), or ESP in UDP 4500 (UDPEncap): not IKE on 4500, whose payload starts with four zero bytes
    (the non-ESP marker), nor NAT-T keepalives (one byte: the 4-byte test reads past them and rejects); -X shows
    the payload is ciphertext."""
    return ["-X", "ip", "proto", str(ESP_PROTO), "or", "(", "udp", "port", str(NATT_PORT), "and", "udp[8:4]", "!=",
            "0", ")"]  # fmt: skip
