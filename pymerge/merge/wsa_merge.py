"""``wsa``: scope-aligned averaging (Weight Scope Alignment, Xu et al. 2024), per tensor.

For every *scope layer* (``layers="weights"``, the default: a key ending in ``weight`` whose
tensor has at least 2 dimensions, i.e. Linear/Conv/Embedding weights, as
:func:`pymerge.wsa.weight_scope` picks them in a state dict; ``"all"``: every floating tensor
with at least 2 entries; ``"none"``: no rescaling, a plain weighted average), with the
normalised weights ``w_i = weight_i / sum_j weight_j``:

1. each model's scope ``(mu_i, sigma_i)``: mean and population std of the tensor;
2. the fused target :func:`pymerge.wsa.fuse_scopes` of those scopes with weights ``w``
   (``how="mean"``: ``mu~ = sum w_i mu_i``, ``sigma~ = sum w_i sigma_i``; ``"pooled"``:
   ``sigma~^2 = sum w_i (sigma_i^2 + (mu_i - mu~)^2)`` **[unverified]**);
3. each model rescaled onto it, ``theta_i' = mu~ + (theta_i - mu_i) sigma~ / sigma_i``
   (:func:`pymerge.wsa.rescale_to_scope`; a constant tensor, ``sigma_i = 0``, has no scope
   and is left as it is);
4. the weighted average ``sum_i w_i theta_i'``; with ``output_scope=True`` the average is
   rescaled onto ``(mu~, sigma~)`` as well (averaging weakly correlated models shrinks the
   std below ``sigma~``; this undoes that shrinkage).

Other tensors are the plain weighted average. Differs from the paper on purpose: the paper
aligns scopes *during training* (:class:`pymerge.wsa.ScopeRegularizer`) and then averages;
this method is the post-hoc analogue for models trained without it. Computed in float64,
rounded once to the input dtype. Parameters may differ per key (``overrides=[{"filter":
"embed", "layers": "none"}]``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from pymerge.merge.registry import Param, TensorContext, register_method
from pymerge.wsa import LayerScope, fuse_scopes, rescale_to_scope

__all__ = ["merge_tensor"]

_LAYERS = ("weights", "all", "none")


def _is_scope_layer(key: str, t: torch.Tensor, layers: str) -> bool:
    if layers == "none" or t.numel() < 2:
        return False
    if layers == "all":
        return True
    return key.rpartition(".")[2].endswith("weight") and t.dim() >= 2


def _check(params: Mapping[str, Any], key: str, k: int) -> None:
    if math.fsum(params["weight"]) <= 0.0:
        raise ValueError(
            f"wsa: the weights {params['weight']} sum to zero at key {key!r}; the average "
            "and the fused scope need a positive total weight"
        )


@register_method(
    name="wsa",
    params=(
        Param("weight", 1.0, per_model=True, low=0.0, doc="the model's weight (average, fusion)"),
        Param("how", "mean", choices=("mean", "pooled"), doc="scope fusion (pooled: [unverified])"),
        Param("layers", "weights", choices=_LAYERS, doc="which tensors are rescaled"),
        Param("output_scope", False, doc="also rescale the average onto the fused scope"),
    ),
    min_models=1,
    reference="Xu et al. 2024, Weight Scope Alignment: A Frustratingly Easy Method for Model "
    "Merging (arXiv 2408.12237)",
    check=_check,
)
def merge_tensor(ctx: TensorContext) -> torch.Tensor:
    """Scope-aligned averaging: each model's layer rescaled to the fused scope
    (``mu~ + (theta_i - mu_i) sigma~ / sigma_i``), then the weighted average (see
    :mod:`pymerge.merge.wsa_merge`)."""
    total = math.fsum(ctx.params["weight"])
    w = [x / total for x in ctx.params["weight"]]
    tensors = [t.double() for t in ctx.tensors]
    if not _is_scope_layer(ctx.key, ctx.tensors[0], ctx.params["layers"]):
        return sum(wi * t for wi, t in zip(w, tensors, strict=True))
    key = ctx.key
    scopes = []
    for t in tensors:
        var, mean = torch.var_mean(t.reshape(-1), correction=0)
        scopes.append({key: LayerScope(float(mean), float(var.sqrt()))})
    target = fuse_scopes(scopes, ctx.params["how"], weights=w)
    out = torch.zeros_like(tensors[0])
    for wi, t, s in zip(w, tensors, scopes, strict=True):
        aligned = t if s[key].std == 0 else rescale_to_scope({key: t}, target)[key]
        out += wi * aligned
    if ctx.params["output_scope"]:
        var, mean = torch.var_mean(out.reshape(-1), correction=0)
        if float(var) > 0:
            mu, sd = target[key]
            out = (out - mean) * (sd / var.sqrt()) + mu
    return out
