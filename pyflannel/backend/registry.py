"""Backend choice by net-conf.json `Backend.Type`, and typed access to the backend's options.

Options are read the way upstream's encoding/json reads them: key case does not matter, unknown keys are
ignored, and a value of the wrong JSON type is an error naming the key.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from ..config import NetConfig
from ..netlink import Netlink
from .base import Backend, BackendError, ExternalInterface

SUPPORTED = ("vxlan", "host-gw")


def opt_int(cfg: NetConfig, key: str, default: int, lo: int, hi: int) -> int:
    v = cfg.backend.get(key)
    if v is None:
        return default
    # JSON has one number type: 1.0 decodes into a Go int field, 1.5 does not.
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise BackendError(f"Backend.{key}: expected an integer, got {json.dumps(v)}")
    if not lo <= v <= hi:
        raise BackendError(f"Backend.{key}: {v} is out of range {lo}..{hi}")
    return v


def opt_bool(cfg: NetConfig, key: str, default: bool = False) -> bool:
    v = cfg.backend.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise BackendError(f"Backend.{key}: expected true or false, got {json.dumps(v)}")
    return v


def create_backend(cfg: NetConfig, ext: ExternalInterface, nl: Netlink) -> Backend:
    """Build the backend named by cfg.backend.type; raises BackendError for an unknown type or bad options."""
    # Imported here because the backends import the option helpers above.
    from .hostgw import HostGwBackend
    from .vxlan import VxlanBackend

    factories: dict[str, Callable[[NetConfig, ExternalInterface, Netlink], Backend]] = {
        "vxlan": VxlanBackend,
        "host-gw": HostGwBackend,
    }
    factory = factories.get(cfg.backend.type.lower())
    if factory is None:
        raise BackendError(f"backend type {cfg.backend.type!r} is not supported; supported: {', '.join(SUPPORTED)}")
    return factory(cfg, ext, nl)


def backend_types() -> tuple[str, ...]:
    return SUPPORTED


__all__ = ["SUPPORTED", "backend_types", "create_backend", "opt_bool", "opt_int"]
