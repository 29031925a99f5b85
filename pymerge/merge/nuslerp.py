"""``nuslerp``: SLERP with per-model weights, row-wise or flattened, optionally around a base
(mergekit's ``nuslerp``)."""

from __future__ import annotations

import torch

from pymerge.merge.registry import Param, TensorContext, register_method

NORM_EPS = 1e-7  # norms are clamped to at least this before normalising
COLINEAR_EPS = 1e-8  # colinear when 1 - cos^2 <= COLINEAR_EPS**2


def nuslerp_tensor(
    t: float, v0: torch.Tensor, v1: torch.Tensor, *, dim: int = -1, flatten: bool = False
) -> torch.Tensor:
    """SLERP of ``v0`` and ``v1`` along vectors: the whole tensor (``flatten``), the slices
    along ``dim`` (every vector ``x[..., :]`` for ``dim=-1``; ``x[:, j...]`` for ``dim=0``).
    Vectors with ``1 - cos^2 <= 1e-16`` are lerped. In the dtype of the inputs."""
    shape = v0.shape
    if flatten or v0.dim() == 0:
        v0 = v0.reshape(-1)
        v1 = v1.reshape(-1)
    elif dim != -1:
        v0 = v0.transpose(dim, -1)
        v1 = v1.transpose(dim, -1)
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=NORM_EPS)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=NORM_EPS)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos * cos) <= COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    s = torch.sin(theta)
    sph = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / s
    out = torch.where(colinear, (1 - t) * v0 + t * v1, sph)
    if dim != -1 and not flatten and len(shape) > 0:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


@register_method(
    name="nuslerp",
    params=(
        Param("weight", 1.0, per_model=True, doc="relative weight; t = w1 / (w0 + w1)"),
        Param("nuslerp_row_wise", False, doc="SLERP the vectors along dim 0 (columns)"),
        Param("nuslerp_flatten", True, doc="SLERP the whole tensor as one vector"),
    ),
    base="optional",
    min_models=2,
    max_models=2,
    reference="mergekit 'nuslerp'",
)
def merge_tensor(ctx: TensorContext) -> torch.Tensor:
    """SLERP of two models with ``t = w_1 / (w_0 + w_1)`` (0.5 when the weights sum to less
    than 1e-6 in magnitude); with a base, of the task vectors ``θ_i - θ_base``, added back to
    the base.

    As mergekit's ``nuslerp``: ``nuslerp_flatten=True`` (default) takes the tensor as one
    vector; with ``nuslerp_flatten=False`` each row (vectors along the last dim) or, with
    ``nuslerp_row_wise=True``, each vector along dim 0 is interpolated on its own; vectors
    with ``1 - cos² <= 1e-16`` are lerped; norms are clamped at 1e-7. Differs on purpose:
    ``weight`` defaults to 1 (t = 0.5; mergekit requires it) and the computation runs in
    float32 (float64 for float64 inputs), rounded once to the input dtype, where mergekit
    computes in the input dtype (identical for float32/float64 inputs).
    """
    (a, b), base = ctx.upcast()
    w0, w1 = ctx.params["weight"]
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    dim = 0 if ctx.params["nuslerp_row_wise"] else -1
    flatten = ctx.params["nuslerp_flatten"]
    if base is None:
        return nuslerp_tensor(t, a, b, dim=dim, flatten=flatten)
    return base + nuslerp_tensor(t, a - base, b - base, dim=dim, flatten=flatten)
