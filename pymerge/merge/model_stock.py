"""``model_stock``: Model Stock (Jang et al. 2024), the interpolation between the average of
the fine-tunes and the base set by the angle between their task vectors (mergekit's
``model_stock``)."""

from __future__ import annotations

import torch

from pymerge.merge.registry import Param, TensorContext, register_method


def model_stock_tensor(
    base: torch.Tensor, tensors: list[torch.Tensor], *, filter_wise: bool = False
) -> torch.Tensor:
    """``t · mean(θ_i) + (1 - t) · θ_0`` with ``t = k cos / (1 + (k - 1) cos)``, ``cos`` the
    mean pairwise cosine of the task vectors (each clamped to [-1, 1], norms' product clamped
    at 1e-6), over the whole tensor or, ``filter_wise``, per vector along the last dim;
    ``t = 0`` (the base) where ``|1 + (k - 1) cos| < 1e-6``."""
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() <= 1 else base
        ws = [t.unsqueeze(0) if t.dim() <= 1 else t for t in tensors]
    else:
        w0 = base.reshape(-1)
        ws = [t.reshape(-1) for t in tensors]
    offsets = [w - w0 for w in ws]
    cos = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            denom = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
            cos.append(((a * b).sum(dim=-1) / denom.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    k = len(ws)
    denom = 1 + (k - 1) * c
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(c), k * c / torch.where(singular, 1, denom))
    avg = sum(ws) / k
    return (t * avg + (1 - t) * w0).reshape(shape)


@register_method(
    name="model_stock",
    params=(Param("filter_wise", False, doc="one ratio per row (vectors along the last dim)"),),
    base="required",
    min_models=2,
    reference="Jang et al. 2024, Model Stock (arXiv 2403.19522); mergekit 'model_stock'",
)
def merge_tensor(ctx: TensorContext) -> torch.Tensor:
    """Model Stock: with k >= 2 fine-tunes of one base, ``t = k cos θ / (1 + (k - 1) cos θ)``
    (cos θ the mean pairwise cosine of the task vectors) and
    ``θ = t · mean(θ_i) + (1 - t) · θ_0``, per tensor.

    As mergekit's ``model_stock`` (``filter_wise=False``: one ratio per tensor; ``True``: per
    row; the base where the ratio is singular). Differs on purpose: computed in float32
    (float64 for float64 inputs), rounded once to the input dtype, where mergekit computes in
    the input dtype.
    """
    tensors, base = ctx.upcast()
    return model_stock_tensor(base, tensors, filter_wise=ctx.params["filter_wise"])
