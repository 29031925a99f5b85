"""Loss-landscape geometry: linear interpolation curves and barriers."""

from pymerge.landscape.barrier import (
    BARRIER_KINDS,
    Curve,
    MultiBarrier,
    barrier,
    error_barrier,
    interpolation_curve,
    loss_barrier,
    multi_model_barrier,
)
from pymerge.landscape.evaluate import Evaluator

__all__ = [
    "BARRIER_KINDS",
    "Curve",
    "barrier",
    "error_barrier",
    "interpolation_curve",
    "loss_barrier",
    "Evaluator",
    "MultiBarrier",
    "multi_model_barrier",
]
