"""``linear``: the weighted average of K models (model soups; mergekit's ``linear``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from pymerge.merge.registry import Param, StateContext, TensorContext, register_method
from pymerge.ops import interpolate


def _check(params: Mapping[str, Any], key: str, k: int) -> None:
    if params["normalize"] and math.fsum(params["weight"]) == 0.0:
        raise ValueError(
            f"linear: the weights {params['weight']} sum to zero at key {key!r}, which "
            "normalize=True cannot divide by (pass normalize=False, or other weights)"
        )


def _merge_state(ctx: StateContext) -> dict[str, torch.Tensor]:
    """All keys at once through ``pymerge.ops.interpolate`` (the C++/Triton multi-tensor
    loops) when every key has the same weights; per tensor otherwise."""
    first = ctx.params[ctx.keys[0]] if ctx.keys else None
    same = first is not None and all(ctx.params[k] == first for k in ctx.keys)
    if not same:
        return {
            k: ctx.plan.merge_tensor(k, [s[k] for s in ctx.states], params=ctx.params[k])
            for k in ctx.keys
        }
    w = list(first["weight"])
    if first["normalize"]:
        total = math.fsum(w)
        w = [x / total for x in w]
    subs = [{k: s[k] for k in ctx.keys} for s in ctx.states]
    return interpolate(subs, w)


@register_method(
    name="linear",
    params=(
        Param("weight", 1.0, per_model=True, doc="the model's weight in the average"),
        Param("normalize", True, doc="divide by the sum of the weights"),
    ),
    min_models=1,
    reference="Wortsman et al. 2022, Model soups (arXiv 2203.05482); mergekit 'linear'",
    merge_state=_merge_state,
    check=_check,
)
def merge_tensor(ctx: TensorContext) -> torch.Tensor:
    """Weighted average ``sum_i w_i theta_i / sum_i w_i`` (``normalize=False``: the plain
    weighted sum).

    As mergekit's ``linear``: computed in float32 (float64 for float64 inputs) and rounded
    once to the input dtype. Differs on purpose: ``weight`` defaults to 1 (a uniform average;
    mergekit requires it), and weights summing to zero with ``normalize`` raise before any
    work (mergekit divides by zero).
    """
    dt = ctx.compute_dtype
    w = ctx.params["weight"]
    acc = torch.zeros(ctx.tensors[0].shape, dtype=dt, device=ctx.tensors[0].device)
    for t, wi in zip(ctx.tensors, w, strict=True):
        acc.add_(t.to(dt), alpha=wi)
    if ctx.params["normalize"]:
        acc.div_(math.fsum(w))
    return acc
