"""Backend choice by net-conf.json `Backend.Type`.

Registering a backend is one line below: its type and the module of this package that defines `BACKEND`.
Modules are imported only when chosen, so an agent loads the code of its own backend and nothing else.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .base import Backend, BackendError

if TYPE_CHECKING:
    from ..config import NetConfig
    from ..iface import ExternalInterface
    from ..netlink import Netlink

BACKENDS: dict[str, str] = {
    "vxlan": "vxlan",
    "host-gw": "hostgw",
    "ipip": "ipip",
    "udp": "udp",
    "alloc": "alloc",
    "extension": "extension",
    "wireguard": "wireguard",
    "ipsec": "ipsec",
}


def backend_types() -> tuple[str, ...]:
    return tuple(BACKENDS)


def backend_class(backend_type: str) -> type[Backend]:
    """The backend registered for `backend_type` (case-insensitive, as upstream); BackendError if unknown."""
    module = BACKENDS.get(backend_type.lower())
    if module is None:
        raise BackendError(f"backend type {backend_type!r} is not supported; supported: {', '.join(backend_types())}")
    cls: type[Backend] = importlib.import_module(f"{__package__}.{module}").BACKEND
    return cls


def create_backend(cfg: NetConfig, ext: ExternalInterface, nl: Netlink) -> Backend:
    """Build the backend named by cfg.backend.type; raises BackendError for an unknown type or bad options."""
    cls = backend_class(cfg.backend.type)
    cls.check_config(cfg)
    return cls(cfg, ext, nl)


__all__ = ["BACKENDS", "backend_class", "backend_types", "create_backend"]
