"""Loss-landscape geometry: linear interpolation curves and barriers."""

from pymerge.landscape.barrier import (
    BARRIER_KINDS,
    Curve,
    barrier,
    error_barrier,
    interpolation_curve,
    loss_barrier,
)

__all__ = [
    "BARRIER_KINDS",
    "Curve",
    "barrier",
    "error_barrier",
    "interpolation_curve",
    "loss_barrier",
]
