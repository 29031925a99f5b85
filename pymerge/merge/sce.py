"""``sce``: Select, Calculate, Erase (FuseLLM/FuseChat, Wan et al. 2024; mergekit's ``sce``)."""

from __future__ import annotations

import torch

from pymerge.merge.registry import Param, TensorContext, register_method


def sce_mask(tvs: torch.Tensor, select_topk: float) -> torch.Tensor:
    """1 for the ``int(nonzero · select_topk)`` entries with the largest variance across the
    K task vectors (population variance; ``nonzero`` counts entries whose variance is not
    zero), 0 elsewhere; all ones for ``select_topk >= 1``, all zeros for ``<= 0``."""
    if select_topk >= 1:
        return torch.ones_like(tvs[0])
    if select_topk <= 0:
        return torch.zeros_like(tvs[0])
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * select_topk)
    mask = torch.zeros_like(var)
    if k == 0:
        return mask
    idx = torch.topk(var.abs().reshape(-1), k=k, largest=True).indices
    mask.view(-1)[idx] = 1
    return mask


def sce_tensor(base: torch.Tensor, tensors: list[torch.Tensor], select_topk: float) -> torch.Tensor:
    """``θ_0 + Σ_i w_i m_i τ_i / Σ_i w_i m_i``: τ_i the task vectors (masked by
    :func:`sce_mask`), ``w_i`` their mean squares normalised to sum to 1 (uniform when the sum
    is below 1e-6), ``m_i`` 1 where τ_i's sign agrees with the elected sign ``sign(Σ τ)``
    (``+`` where the sum is 0; zero entries never agree), the denominator clamped at 1e-6."""
    tvs = torch.stack([t - base for t in tensors])
    if select_topk < 1:
        tvs = tvs * sce_mask(tvs, select_topk).unsqueeze(0)
    elected = (tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1
    agree = (tvs.sign() == elected).to(tvs.dtype)
    w = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = float(w.sum())
    w = torch.full_like(w, 1.0 / w.shape[0]) if abs(total) < 1e-6 else w / total
    w = w.reshape(-1, *([1] * (tvs.dim() - 1))) * agree
    return base + (tvs * w).sum(dim=0) / w.sum(dim=0).clamp(min=1e-6)


@register_method(
    name="sce",
    params=(
        Param(
            "select_topk",
            1.0,
            doc="fraction of entries kept, by variance across models",
            low=0.0,
            high=1.0,
        ),
        Param("int8_mask", False, doc="mergekit's mask storage option; no effect here"),
    ),
    base="required",
    min_models=1,
    reference="Wan et al. 2024, FuseChat (arXiv 2408.07990); mergekit 'sce'",
)
def merge_tensor(ctx: TensorContext) -> torch.Tensor:
    """SCE, per tensor: **select** the ``select_topk`` fraction of entries with the highest
    variance across the task vectors, **calculate** per-model weights from the task vectors'
    mean squared magnitudes, **erase** the entries whose sign disagrees with the elected
    (summed) sign, and add the weighted mean of the survivors to the base.

    As mergekit's ``sce`` (``select_topk=1.0``: no selection; weights per tensor, uniform when
    their sum is below 1e-6; the disjoint mean's denominator clamped at 1e-6). Differs on
    purpose: ``select_topk`` must lie in [0, 1] (mergekit clips larger values to 1 and smaller
    to 0); ``int8_mask`` is accepted for config compatibility and changes nothing; the
    computation runs in float32 (float64 for float64 inputs), rounded once to the input dtype,
    where mergekit computes in the input dtype.
    """
    tensors, base = ctx.upcast()
    return sce_tensor(base, tensors, ctx.params["select_topk"])
