"""Thin fronts over the fast primitives; each picks native, Triton or torch.

Submodules are imported lazily so that ``import pymerge.ops`` does not import
Triton or build anything.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "linear_sum_assignment": "pymerge.ops.assignment",
    "linear_sum_assignment_batch": "pymerge.ops.assignment",
    "AssignmentResult": "pymerge.ops.assignment",
    "solve_assignment": "pymerge.ops.assignment",
    "CorrelationAccumulator": "pymerge.ops.correlation",
    "correlation": "pymerge.ops.correlation",
    "interpolate": "pymerge.ops.interpolate",
    "permuted_interpolate": "pymerge.ops.interpolate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pymerge.ops' has no attribute {name!r}")
