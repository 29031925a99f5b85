"""``passthrough``: one model's tensors, optionally scaled (mergekit's ``passthrough``)."""

from __future__ import annotations

import torch

from pymerge.merge.registry import Param, TensorContext, register_method


@register_method(
    name="passthrough",
    params=(
        Param(
            "scale",
            None,
            per_model=True,
            nullable=True,
            kind="float",
            doc="multiply the tensor by this (None: unchanged)",
        ),
    ),
    min_models=1,
    max_models=1,
    reference="mergekit 'passthrough'",
)
def merge_tensor(ctx: TensorContext) -> torch.Tensor:
    """The single model's tensor (a copy), times ``scale`` where one is set.

    As mergekit's ``passthrough`` (used with per-filter ``scale`` to zero or rescale parts of a
    model, e.g. ``scale=[{"filter": "o_proj", "value": 0.0}, {"value": 1.0}]``; the product is
    computed in float32 and rounded once to the input dtype, as torch does for a half tensor
    times a Python float).
    """
    (x,) = ctx.tensors
    (scale,) = ctx.params["scale"]
    if scale is None:
        return x.clone()
    return x.to(ctx.compute_dtype) * scale
