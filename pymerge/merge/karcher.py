"""``karcher``: the Karcher (Riemannian) mean of the normalised tensors on the unit sphere,
rescaled by the mean norm (mergekit's ``karcher``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from pymerge.merge.registry import Param, TensorContext, register_method


def _check(params: Mapping[str, Any], key: str, k: int) -> None:
    if math.fsum(params["weight"]) == 0.0:
        raise ValueError(f"karcher: the weights {params['weight']} sum to zero at key {key!r}")


def karcher_tensor(
    tensors: list[torch.Tensor], alphas: list[float], *, max_iter: int = 10, tol: float = 1e-5
) -> torch.Tensor:
    """Weighted Karcher mean on the unit sphere by fixed-point iteration (``alphas`` sum to
    1): start from the normalised weighted mean of the unit tensors, step along the weighted
    mean of the log maps (``θ / sin θ · (u - cos θ · m)``, terms with ``θ < tol`` skipped)
    until its norm is below ``tol`` or ``max_iter`` steps; scale by ``Σ α_i ‖θ_i‖``. Tensors
    with norm ``<= tol`` take no part in the direction (all of them: zeros)."""
    shape = tensors[0].shape
    flat = [t.reshape(-1) for t in tensors]
    norms = [torch.linalg.vector_norm(x) for x in flat]
    valid = [i for i, n in enumerate(norms) if float(n) > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = math.fsum(alphas[i] for i in valid)
    a = [alphas[i] / total for i in valid]
    units = [flat[i] / norms[i] for i in valid]
    mean = torch.zeros_like(units[0])
    for ai, u in zip(a, units, strict=True):
        mean += ai * u
    mn = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if float(mn) < tol else mean / mn
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for ai, u in zip(a, units, strict=True):
            dot = torch.clamp(torch.dot(mean, u), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += ai * (theta / torch.sin(theta)) * (u - dot * mean)
        tn = torch.linalg.vector_norm(tangent)
        if float(tn) < tol:
            break
        mean = torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)
        un = torch.linalg.vector_norm(mean)
        if float(un) > tol:
            mean = mean / un
    scale = sum(ai * n for ai, n in zip(alphas, norms, strict=True))
    return (scale * mean).reshape(shape)


@register_method(
    name="karcher",
    params=(
        Param("max_iter", 10, doc="most fixed-point iterations", low=1),
        Param(
            "tol",
            1e-5,
            doc="stop when the tangent step is shorter; norms below are zero",
            low=0.0,
            open_low=True,
        ),
        Param("weight", 1.0, per_model=True, doc="the model's weight (pymerge's extension)"),
    ),
    min_models=1,
    reference="Karcher 1977; Grove & Karcher 1973; mergekit 'karcher'",
    check=_check,
)
def merge_tensor(ctx: TensorContext) -> torch.Tensor:
    """The Karcher mean of the K normalised tensors on the unit sphere, times the weighted
    mean of their norms.

    As mergekit's ``karcher`` (``max_iter=10``, ``tol=1e-5``; every tensor one vector; K = 1
    returns the model; all-zero inputs give zeros). Differs on purpose: a per-model
    ``weight`` (default 1: mergekit's uniform weights; normalised to sum to 1) and the
    computation in float32 (float64 for float64 inputs), rounded once to the input dtype,
    where mergekit rounds the unit tensors and the iterates to the input dtype.
    """
    tensors, _ = ctx.upcast()
    if len(tensors) == 1:
        return tensors[0]
    w = ctx.params["weight"]
    total = math.fsum(w)
    alphas = [x / total for x in w]
    return karcher_tensor(tensors, alphas, max_iter=ctx.params["max_iter"], tol=ctx.params["tol"])
