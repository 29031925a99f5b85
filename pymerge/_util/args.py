"""Checks of scalar arguments shared by the public functions (seeds, counts, fractions),
each raising an error that names the argument and the value it got."""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["check_seed", "check_int", "check_fraction"]

_SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit value


def check_seed(seed: Any, name: str = "seed") -> int:
    """``seed`` as an int in ``[0, 2**63)``; TypeError for ``None``, floats, bools and
    non-integers, ValueError (naming the range) for values outside it."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an int in [0, 2**63), got {seed!r}")
    value = int(seed)
    if not 0 <= value <= _SEED_MAX:
        raise ValueError(f"{name} must be an int in [0, 2**63), got {value}")
    return value


def check_int(value: Any, name: str, *, minimum: int | None = None) -> int:
    """``value`` as an int (bools and floats refused), at least ``minimum`` when given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_fraction(
    value: Any, name: str, *, low: float = 0.0, high: float = 1.0, open_low: bool = False
) -> float:
    """``value`` as a finite float in ``[low, high]`` (``(low, high]`` with ``open_low``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    v = float(value)
    ok = math.isfinite(v) and (low < v if open_low else low <= v) and v <= high
    if not ok:
        bracket = "(" if open_low else "["
        raise ValueError(f"{name} must be in {bracket}{low:g}, {high:g}], got {v!r}")
    return v
