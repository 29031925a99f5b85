"""``slerp``: spherical linear interpolation between two models, per tensor (mergekit's
``slerp``)."""

from __future__ import annotations

import torch

from pymerge.merge.registry import Param, TensorContext, register_method

DOT_THRESHOLD = 0.9995  # |cos| above this: the pair is taken as colinear, lerp instead
EPS = 1e-8  # norms at or below this count as zero (the tensor is used unnormalised)


def slerp_tensor(
    t: float, v0: torch.Tensor, v1: torch.Tensor, *, dot_threshold: float = DOT_THRESHOLD
) -> torch.Tensor:
    """``sin((1-t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1`` over the whole tensor (flattened),
    with ``cos θ`` the cosine of ``v0`` and ``v1``; ``(1-t) v0 + t v1`` when
    ``|cos θ| > dot_threshold`` (colinear or antipodal) or the tensor is empty. Computed in
    the dtype of the inputs (callers pass float32 or float64)."""
    a = v0.reshape(-1)
    b = v1.reshape(-1)
    if a.numel() == 0:
        return ((1 - t) * a + t * b).reshape(v0.shape)
    na = torch.linalg.vector_norm(a)
    nb = torch.linalg.vector_norm(b)
    na = torch.where(na > EPS, na, torch.ones_like(na))
    nb = torch.where(nb > EPS, nb, torch.ones_like(nb))
    dot = ((a / na) * (b / nb)).sum().clamp(-1, 1)
    if float(dot.abs()) > dot_threshold:
        return ((1 - t) * a + t * b).reshape(v0.shape)
    theta = torch.acos(dot)
    s = torch.sin(theta)
    ca = torch.sin((1 - t) * theta) / s
    cb = torch.sin(t * theta) / s
    return (ca * a + cb * b).reshape(v0.shape)


@register_method(
    name="slerp",
    params=(
        Param(
            "t",
            doc="interpolation factor: 0 gives states[0] (mergekit's base_model), 1 states[1]",
        ),
    ),
    min_models=2,
    max_models=2,
    reference="Shoemake 1985; mergekit 'slerp'",
)
def merge_tensor(ctx: TensorContext) -> torch.Tensor:
    """Spherical interpolation from ``states[0]`` (``t=0``) to ``states[1]`` (``t=1``), each
    tensor taken as one vector.

    As mergekit's ``slerp`` (``states[0]`` is mergekit's ``base_model``): the angle is that
    between the normalised tensors (a norm at or below 1e-8 is left unnormalised), the
    unnormalised tensors are combined, pairs with ``|cos θ| > 0.9995`` fall back to linear
    interpolation, and the computation runs in float32 (float64 for float64 inputs), rounded
    once to the input dtype. ``t`` may be a gradient over layers or per-filter lists
    (``t=[{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.5}]``). pymerge takes
    the two models in ``states`` (no ``base=``); a 0-d tensor is a vector of one element
    (always colinear: lerp).
    """
    (a, b), _ = ctx.upcast()
    return slerp_tensor(ctx.params["t"], a, b)
