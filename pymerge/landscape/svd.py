"""Singular-vector alignment of two models (Ito, Yamada, Kumagai, ICLR 2025).

With W = Σ_i σ_i u_i v_iᵀ, the weight-matching objective of one layer expands as

    ⟨W^A, P W^B P'ᵀ⟩_F = Σ_ij σ_i^A σ_j^B (u_i^A · P u_j^B)(v_i^A · P' v_j^B),

so a permutation that makes the large-σ singular vectors of π(B) point along A's raises it
most. Ito et al. measure this with the alignment score

    R = Σ_ℓ ⟨U_Aᵀ P U_B, V_Aᵀ P' V_B⟩_F  /  Σ_ℓ n_ℓ

over the singular vectors whose singular values pass a threshold γ. Here (the paper's text
could not be checked for these details, so they are documented choices):

* **threshold**: ``threshold="relative"`` (default) keeps σ_i ≥ γ·σ_max of each model's
  layer (γ ∈ [0, 1): γ = 0 keeps all); ``threshold="absolute"`` keeps σ_i ≥ γ (γ ≥ 0).
* **n_ℓ**: min(#kept of A, #kept of B), the largest value the layer's sum can take (the
  two factors are sub-blocks of orthogonal matrices), so each layer's R_ℓ lies in [-1, 1]
  and a model against a permuted copy of itself with the recovering permutation has R = 1
  (for distinct singular values; repeated ones leave their vectors free to rotate).
* **layers**: every floating parameter with two or more dimensions (``params=`` narrows it),
  the first and last layers included (their unpermuted side is the identity). A conv
  weight [C_out, C_in, k, k] is read as the matrix [C_out, C_in·k·k]; permuting its input
  channels permutes whole blocks of k² columns, i.e. P' ⊗ I_{k²}. Both follow from
  applying the permutation to B first (:func:`pymerge.spec.apply_permutation`: SVD of
  P W Pᵀ' is (P U) Σ (P' V)ᵀ) and comparing A with π(B) under the identity.

SVDs run in float64 on the tensors' device.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pymerge._util.checks import check_state_pair
from pymerge.spec.apply import apply_permutation
from pymerge.spec.spec import PermutationSpec

__all__ = ["LayerAlignment", "SVDAlignment", "singular_vector_alignment", "plot_svd_alignment"]

THRESHOLDS = ("relative", "absolute")


@dataclass
class LayerAlignment:
    """One layer of :class:`SVDAlignment`: singular values of A and π(B) (descending), how
    many passed the threshold in each, the layer's sum ``score`` and ``r = score / n``."""

    name: str
    shape: tuple[int, ...]
    sigma_a: np.ndarray
    sigma_b: np.ndarray
    kept_a: int
    kept_b: int
    score: float
    r: float

    @property
    def n(self) -> int:
        return min(self.kept_a, self.kept_b)


@dataclass
class SVDAlignment:
    """Result of :func:`singular_vector_alignment`: the whole-model ``R``, per-layer
    results in state-dict order, and the threshold used."""

    R: float
    gamma: float
    threshold: str
    layers: dict[str, LayerAlignment] = field(default_factory=dict)

    def r_per_layer(self) -> dict[str, float]:
        return {k: v.r for k, v in self.layers.items()}


def _check_gamma(gamma: Any, threshold: str) -> float:
    if threshold not in THRESHOLDS:
        raise ValueError(f"threshold must be one of {THRESHOLDS}, got {threshold!r}")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float, np.floating, np.integer)):
        raise TypeError(f"gamma must be a number, got {type(gamma).__name__}")
    g = float(gamma)
    if threshold == "relative" and not 0.0 <= g < 1.0:
        raise ValueError(f"gamma must be in [0, 1) (a fraction of σ_max), got {gamma}")
    if threshold == "absolute" and not (math.isfinite(g) and g >= 0.0):
        raise ValueError(f"gamma must be a finite number >= 0 with threshold='absolute', got {g}")
    return g


def _matrix(t: Tensor) -> Tensor:
    return t.detach().reshape(t.shape[0], -1).to(torch.float64)


def _kept(s: Tensor, gamma: float, threshold: str) -> int:
    if s.numel() == 0:
        return 0
    cut = gamma * float(s[0]) if threshold == "relative" else gamma
    return int((s >= cut).sum()) if gamma > 0 else int(s.numel())


def singular_vector_alignment(
    spec: PermutationSpec | None,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    *,
    perm: Mapping[str, Tensor] | None = None,
    gamma: float = 0.3,
    threshold: str = "relative",
    params: Iterable[str] | None = None,
) -> SVDAlignment:
    """Singular values of both models per layer and the alignment score R of A and π(B).

    Args:
        spec: the permutation spec of ``perm`` (may be ``None`` when ``perm`` is).
        state_a, state_b: state dicts of one architecture (never modified).
        perm: B onto A (e.g. ``weight_matching(spec, a, b).perm``, or the ``.perm`` of
            activation matching or STE); ``None``: B as it is.
        gamma: singular-value threshold (see ``threshold``); the paper reports γ = 0 and 0.3.
        threshold: ``"relative"`` (σ ≥ γ·σ_max per layer and model, γ ∈ [0, 1)) or
            ``"absolute"`` (σ ≥ γ); the paper's convention could not be verified.
        params: the parameters to use (default: every floating one with >= 2 dims).

    Returns:
        :class:`SVDAlignment`; ``R`` is NaN when no layer keeps a singular vector.

    Raises:
        ValueError: γ out of range, mismatched states (naming the key), unknown ``params``
            names or ones with fewer than two dims, an invalid permutation (naming the group).
        TypeError: ``perm`` without a ``spec``.
    """
    g = _check_gamma(gamma, threshold)
    check_state_pair(state_a, state_b, "state_a", "state_b")
    if perm is not None:
        if spec is None:
            raise TypeError("perm needs spec (the PermutationSpec it belongs to)")
        if not isinstance(spec, PermutationSpec):
            raise TypeError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
        state_b = apply_permutation(spec, perm, state_b)
    if params is None:
        names = [k for k, v in state_a.items() if v.is_floating_point() and v.dim() >= 2]
    else:
        names = [params] if isinstance(params, str) else list(params)
        for k in names:
            if k not in state_a:
                raise ValueError(f"params names {k!r}, which is not in the state dicts")
            if state_a[k].dim() < 2 or not state_a[k].is_floating_point():
                raise ValueError(
                    f"params names {k!r} of shape {tuple(state_a[k].shape)} and dtype "
                    f"{state_a[k].dtype}: it needs a floating tensor with >= 2 dims"
                )
    if not names:
        raise ValueError("no parameter with two or more dimensions to compare")
    layers: dict[str, LayerAlignment] = {}
    total, count = 0.0, 0
    for k in names:
        wa, wb = _matrix(state_a[k]), _matrix(state_b[k].to(state_a[k].device))
        if not (torch.isfinite(wa).all() and torch.isfinite(wb).all()):
            raise ValueError(f"{k!r} holds NaN or inf values: its SVD is undefined")
        ua, sa, vha = torch.linalg.svd(wa, full_matrices=False)
        ub, sb, vhb = torch.linalg.svd(wb, full_matrices=False)
        ka, kb = _kept(sa, g, threshold), _kept(sb, g, threshold)
        n = min(ka, kb)
        if n:
            mu = ua[:, :ka].T @ ub[:, :kb]
            mv = vha[:ka] @ vhb[:kb].T
            score = float((mu * mv).sum())
        else:
            score = 0.0
        layers[k] = LayerAlignment(
            name=k,
            shape=tuple(state_a[k].shape),
            sigma_a=sa.cpu().numpy(),
            sigma_b=sb.cpu().numpy(),
            kept_a=ka,
            kept_b=kb,
            score=score,
            r=score / n if n else math.nan,
        )
        total += score
        count += n
    return SVDAlignment(
        R=total / count if count else math.nan, gamma=g, threshold=threshold, layers=layers
    )


def plot_svd_alignment(
    results: SVDAlignment | Mapping[str, SVDAlignment],
    path: str | os.PathLike[str] | None = None,
    *,
    title: str | None = None,
):
    """Two panels: R per layer (one bar per result, e.g. naive / WM / AM / STE) and the
    singular-value spectra σ_i / σ_max of every layer of A (solid) and π(B) of the first
    result (dashed). Needs matplotlib (the ``plot`` extra); returns the figure and writes a
    PNG to ``path`` when given."""
    from pymerge.landscape.plots import require_matplotlib

    if isinstance(results, SVDAlignment):
        results = {"R": results}
    if not results:
        raise ValueError("results is empty")
    mfig = require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = mfig.Figure(figsize=(11.0, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax_r, ax_s = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    first = next(iter(results.values()))
    names = list(first.layers)
    width = 0.8 / len(results)
    for j, (label, res) in enumerate(results.items()):
        rs = [res.layers[n].r if n in res.layers else np.nan for n in names]
        ax_r.bar(np.arange(len(names)) + j * width, rs, width, label=f"{label} (R={res.R:.3f})")
    ax_r.set_xticks(np.arange(len(names)) + 0.4 - width / 2)
    ax_r.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
    ax_r.set_ylabel("R per layer")
    ax_r.axhline(0.0, color="grey", linewidth=0.5)
    ax_r.legend(fontsize=7)
    ax_r.set_title(f"alignment score, γ={first.gamma:g} ({first.threshold})")
    for n in names:
        la = first.layers[n]
        (line,) = ax_s.plot(la.sigma_a / max(la.sigma_a[0], 1e-300), label=n)
        ax_s.plot(la.sigma_b / max(la.sigma_b[0], 1e-300), "--", color=line.get_color())
    if first.threshold == "relative" and first.gamma > 0:
        ax_s.axhline(first.gamma, color="k", linewidth=0.6, linestyle=":")
    ax_s.set_yscale("log")
    ax_s.set_xlabel("index i")
    ax_s.set_ylabel("σ_i / σ_max (A solid, π(B) dashed)")
    ax_s.legend(fontsize=6)
    ax_s.set_title("singular-value spectra")
    if title:
        fig.suptitle(title)
    if path is not None:
        fig.savefig(os.fspath(path), format="png", bbox_inches="tight")
    return fig
