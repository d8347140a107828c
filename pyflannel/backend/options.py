"""Typed access to net-conf.json's `Backend` options.

Options are read the way upstream's encoding/json reads them: key case does not matter, unknown keys are
ignored, and a value of the wrong JSON type is an error naming the key.
"""

from __future__ import annotations

import json

from ..config import NetConfig
from .base import BackendError


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


def opt_str(cfg: NetConfig, key: str, default: str = "") -> str:
    v = cfg.backend.get(key)
    if v is None:
        return default
    if not isinstance(v, str):
        raise BackendError(f"Backend.{key}: expected a string, got {json.dumps(v)}")
    return v


def opt_float(cfg: NetConfig, key: str, default: float, lo: float, hi: float) -> float:
    v = cfg.backend.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise BackendError(f"Backend.{key}: expected a number, got {json.dumps(v)}")
    if not lo <= v <= hi:
        raise BackendError(f"Backend.{key}: {v} is out of range {lo:g}..{hi:g}")
    return float(v)


__all__ = ["opt_bool", "opt_float", "opt_int", "opt_str"]
