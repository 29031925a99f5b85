"""``multislerp``: the weighted spherical barycentre of K models (mergekit's ``multislerp``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from pymerge.merge.registry import Param, TensorContext, register_method

EPS = 1e-8


def _check(params: Mapping[str, Any], key: str, k: int) -> None:
    if params["normalize_weights"] and k > 1 and math.fsum(params["weight"]) == 0.0:
        raise ValueError(
            f"multislerp: the weights {params['weight']} sum to zero at key {key!r}, which "
            "normalize_weights=True cannot divide by"
        )


def multislerp_tensor(
    tensors: list[torch.Tensor], weights: list[float], *, normalize: bool = True, key: str = ""
) -> torch.Tensor:
    """The barycentre on the sphere of the flattened ``tensors``: project the unit vectors to
    the tangent space at their weighted (normalised) mean, average there with the weights, map
    back with the exponential map and rescale by the weighted mean of the norms. In the dtype
    of the inputs."""
    shape = tensors[0].shape
    x = torch.stack([t.reshape(-1) for t in tensors])
    w = torch.tensor(weights, dtype=x.dtype, device=x.device)
    if normalize:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    units = x / (norms + EPS)
    mean = (units * w[:, None]).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if float(mean_norm) < EPS:
        if len(tensors) == 2:  # antipodal pair: lerp
            return (x[0] * w[0] + x[1] * w[1]).reshape(shape)
        raise ValueError(
            f"multislerp: at key {key!r} the weighted sum of the unit tensors is zero (antipodal "
            "tensors whose weights cancel); use other weights"
        )
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    tangent = ((units - dots * mean) * w[:, None]).sum(0)
    tn = torch.linalg.vector_norm(tangent) + EPS
    out = mean * torch.cos(tn) + tangent * (torch.sin(tn) / tn)
    return (out * (norms[:, 0] * w).sum()).reshape(shape)


@register_method(
    name="multislerp",
    params=(
        Param("weight", 1.0, per_model=True, doc="the model's weight in the barycentre"),
        Param("normalize_weights", True, doc="divide the weights by their sum"),
    ),
    base="optional",
    min_models=1,
    reference="Goddard, multislerp (goddard.blog); mergekit 'multislerp'",
    check=_check,
)
def merge_tensor(ctx: TensorContext) -> torch.Tensor:
    """Weighted spherical barycentre of the K tensors (of the task vectors ``θ_i - θ_base``
    when a base is given, added back to it), rescaled by the weighted mean norm.

    As mergekit's ``multislerp``: each tensor is one vector; unit vectors use ``norm + 1e-8``;
    an antipodal pair whose weights cancel is lerped, more cancelling tensors raise (naming the
    key); K = 1 returns the model. Differs on purpose: ``weight`` defaults to 1 (mergekit
    requires it), weights summing to zero with ``normalize_weights`` raise before any work,
    and the computation runs in float32 (float64 for float64 inputs), rounded once to the
    input dtype, where mergekit computes in the input dtype.
    """
    tensors, base = ctx.upcast()
    if len(tensors) == 1:
        return tensors[0]
    if base is not None:
        tensors = [t - base for t in tensors]
    out = multislerp_tensor(
        tensors, ctx.params["weight"], normalize=ctx.params["normalize_weights"], key=ctx.key
    )
    return out if base is None else out + base
