"""``nearswap``: take the other model's value where it is close to the base's (mergekit's
``nearswap``)."""

from __future__ import annotations

import torch

from pymerge.merge.registry import Param, TensorContext, register_method


def nearswap_tensor(t: float, base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``w · other + (1 - w) · base`` with ``w = clamp(t / max(|base - other|, 1e-6), 0, 1)``
    element-wise: entries closer than ``t`` take ``other``'s value, farther ones move toward
    it by the fraction ``t / |base - other|``."""
    w = (t / (base - other).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return w * other + (1 - w) * base


@register_method(
    name="nearswap",
    params=(Param("t", doc="distance scale: entries closer than t take the other's value"),),
    base="required",
    min_models=1,
    max_models=1,
    reference="alchemonaut, QuartetAnemoi (nearswap); mergekit 'nearswap'",
)
def merge_tensor(ctx: TensorContext) -> torch.Tensor:
    """Nearswap of the base toward the one model: per element
    ``w = clamp(t / max(|θ_base - θ|, 1e-6), 0, 1)`` and ``w · θ + (1 - w) · θ_base``.

    As mergekit's ``nearswap`` (mergekit's ``base_model`` is ``base=``, the other model is
    ``states[0]``). Differs on purpose: computed in float32 (float64 for float64 inputs),
    rounded once to the input dtype, where mergekit computes in the input dtype.
    """
    (other,), base = ctx.upcast()
    return nearswap_tensor(ctx.params["t"], base, other)
