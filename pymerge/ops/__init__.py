"""Thin fronts over the fast primitives; each picks native, Triton or torch.

The fronts are imported eagerly (they need only numpy and torch); Triton kernels and
the C++ extension are loaded lazily by the fronts themselves. Eager imports also keep
``pymerge.ops.correlation`` / ``pymerge.ops.interpolate`` naming the functions: the
submodules of the same names are reachable through ``sys.modules`` and ``from
pymerge.ops.correlation import ...``.
"""

from __future__ import annotations

from pymerge.ops.assignment import (
    AssignmentResult,
    linear_sum_assignment,
    linear_sum_assignment_batch,
    solve_assignment,
)
from pymerge.ops.correlation import CorrelationAccumulator, correlation
from pymerge.ops.interpolate import interpolate, permuted_interpolate
from pymerge.ops.moments import ChannelStats
from pymerge.ops.task_vectors import (
    TaskVectorParams,
    merge_task_vector_tensor,
    merge_task_vectors,
)

__all__ = [
    "AssignmentResult",
    "ChannelStats",
    "CorrelationAccumulator",
    "correlation",
    "interpolate",
    "linear_sum_assignment",
    "linear_sum_assignment_batch",
    "permuted_interpolate",
    "solve_assignment",
    "TaskVectorParams",
    "merge_task_vector_tensor",
    "merge_task_vectors",
]
