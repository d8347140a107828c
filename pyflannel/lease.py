"""A subnet lease and its wire form, byte-compatible with upstream flannel.

Key:   `10.12.13.0-24` or, dual-stack, `10.12.13.0-24&fd00:12:13::-56` (under `<prefix>/subnets/`).
Value: `{"PublicIP":"1.2.3.4","PublicIPv6":null,"BackendType":"vxlan","BackendData":{...}}`, the field
order of upstream's Go struct, with BackendType/BackendData/BackendV6Data omitted when empty.
"""

from __future__ import annotations

import enum
import json
import re
import sys
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from .config import ci_fold, loads_json, parse_ip


class LeaseError(ValueError):
    """A lease key or value that cannot be decoded (for example garbage written by another node)."""


_KEY_RE = re.compile(r"(\d+\.\d+\.\d+\.\d+)-(\d+)(?:&([a-f\d:]+)-(\d+))?", re.ASCII)
_UNSET4 = IPv4Address("0.0.0.0")


@dataclass(frozen=True, slots=True)
class LeaseAttrs:
    public_ip: IPv4Address | None = None
    public_ipv6: IPv6Address | None = None
    backend_type: str = ""
    # Decoded JSON, None when absent. Kept as plain data so that unknown fields survive a round trip.
    backend_data: Any = None
    backend_v6_data: Any = None

    def to_json(self) -> str:
        obj: dict[str, Any] = {
            "PublicIP": str(self.public_ip or _UNSET4),
            "PublicIPv6": str(self.public_ipv6) if self.public_ipv6 else None,
        }
        if self.backend_type:
            obj["BackendType"] = self.backend_type
        if self.backend_data is not None:
            obj["BackendData"] = self.backend_data
        if self.backend_v6_data is not None:
            obj["BackendV6Data"] = self.backend_v6_data
        return json.dumps(obj, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> LeaseAttrs:
        try:
            obj = loads_json(text)
        except ValueError as e:
            raise LeaseError(f"lease value is not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise LeaseError("lease value is not a JSON object")
        obj = ci_fold(obj)
        pub = obj.get("publicip")
        pub6 = obj.get("publicipv6")
        btype = obj.get("backendtype")
        if btype is None:
            btype = ""  # a JSON null leaves Go's string field empty
        # Python's address classes also take integers; upstream's decoder takes only strings.
        if not isinstance(pub, str | None) or not isinstance(pub6, str | None):
            raise LeaseError(f"lease value has a non-string PublicIP/PublicIPv6: {_cut(pub)} / {_cut(pub6)}")
        ip4 = _public_ip(pub, pub6, 4)
        ip6 = _public_ip(pub, pub6, 6)
        if ip4 == _UNSET4:
            ip4 = None
        if not isinstance(btype, str):
            raise LeaseError(f"lease value has a non-string BackendType: {_cut(btype)}")
        return cls(
            public_ip=ip4,
            public_ipv6=ip6,
            # Thousands of peers carry the same type and the same BackendData field names: one string each.
            backend_type=sys.intern(btype) if btype else "",
            backend_data=_interned_keys(obj.get("backenddata")),
            backend_v6_data=_interned_keys(obj.get("backendv6data")),
        )


def _interned_keys(data: Any) -> Any:
    if isinstance(data, dict) and len(data) <= 8:
        return {sys.intern(k): v for k, v in data.items()}
    return data


def _cut(v: Any, limit: int = 60) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _public_ip(pub: str | None, pub6: str | None, version: int) -> Any:
    """PublicIP (version 4) or PublicIPv6 (6) of a lease value; None when absent or empty."""
    text = pub if version == 4 else pub6
    if text is None or text == "":
        return None
    try:
        ip = parse_ip(text)
    except ValueError:
        ip = None
    if ip is None or ip.version != version:
        raise LeaseError(f"lease value has a bad PublicIP/PublicIPv6: {_cut(pub)} / {_cut(pub6)}")
    return ip


def make_subnet_key(sn: IPv4Network | None, sn6: IPv6Network | None) -> str:
    # Upstream writes 0.0.0.0-0 for the IPv4 half of an IPv6-only lease.
    v4 = f"{sn.network_address}-{sn.prefixlen}" if sn is not None else "0.0.0.0-0"
    if sn6 is None:
        return v4
    return f"{v4}&{sn6.network_address}-{sn6.prefixlen}"


def parse_subnet_key(key: str) -> tuple[IPv4Network | None, IPv6Network | None]:
    """Parse the last path element of a lease key; raises LeaseError."""
    m = _KEY_RE.fullmatch(key)  # not match + $, which lets a trailing newline through
    if not m:
        raise LeaseError(f"not a subnet key: {_cut(key)}")
    ip_text, len_text, ip6_text, len6_text = m.groups()
    try:
        ip = parse_ip(ip_text)
        # From the parsed address's bytes: given the text ipaddress would parse it a second time, and given an
        # address object it formats and re-parses it (3x the time per lease of a 5000-lease list).
        sn: IPv4Network | None = IPv4Network((ip.packed, int(len_text)))
        sn6 = IPv6Network(f"{ip6_text}/{len6_text}") if ip6_text else None
    except ValueError as e:
        raise LeaseError(f"not a subnet key: {_cut(key)}: {_cut(str(e))}") from None
    assert sn is not None
    if sn.prefixlen == 0:
        sn = None
    if sn is None and sn6 is None:
        raise LeaseError(f"subnet key holds no subnet: {key!r}")
    # Only the form make_subnet_key writes (upstream's MakeSubnetKey): `10.1.2.0-024` or `FD00::-64` name the
    # same subnet as another key, so the lease would be renewed, compared and deleted under a key it is not at.
    # parse_ip takes only canonical dotted quads, so an IPv4-only key needs just its length checked.
    canonical = len_text == str(int(len_text)) if sn6 is None else make_subnet_key(sn, sn6) == key
    if not canonical:
        raise LeaseError(f"not a subnet key in canonical form: {key!r} (expected {make_subnet_key(sn, sn6)!r})")
    return sn, sn6


@dataclass(frozen=True, slots=True)
class Lease:
    subnet: IPv4Network | None
    ipv6_subnet: IPv6Network | None
    attrs: LeaseAttrs
    # Unix time the lease expires; None for a reservation (a key with no etcd lease) or a kube node.
    expiration: float | None = None
    # Store-specific handle (etcd lease id), not part of the wire form.
    store_lease_id: int = field(default=0, compare=False)
    # The subnet key, made once: every table of leases is keyed by it, and events look it up.
    key: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", make_subnet_key(self.subnet, self.ipv6_subnet))

    @property
    def is_reservation(self) -> bool:
        return self.expiration is None


class EventType(enum.Enum):
    ADDED = "added"
    REMOVED = "removed"


@dataclass(frozen=True, slots=True)
class LeaseEvent:
    type: EventType
    lease: Lease


@dataclass(frozen=True, slots=True)
class LeaseSnapshot:
    """The complete set of leases, sent first and after every re-list (compaction, reconnect).

    The consumer diffs it against what it holds, so a lease that vanished while the watch was down is removed.
    """

    leases: tuple[Lease, ...]


WatchUpdate = LeaseSnapshot | list[LeaseEvent]
