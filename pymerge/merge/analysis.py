"""Task-vector analysis: cosine similarity and sign agreement between the task vectors
``τ_i = θ_i - θ_base`` of K fine-tunes, for the whole model and per layer, with a heat map.

One streaming pass per tensor: each tensor's K task vectors are formed chunk by chunk in
float64 (never a flattened copy of the whole model) and reduced to three K x K matrices
accumulated in float64 (``T Tᵀ`` for the cosines; ``S Sᵀ`` and ``|S| |S|ᵀ`` with
``S = sign(T)`` for the signs), so the cost is one read of every input plus GEMMs with K
rows, and the memory is a few chunk-sized buffers whatever the model's size.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pymerge._util.args import check_int
from pymerge._util.checks import check_states
from pymerge._util.progress import track

__all__ = ["TaskVectorSimilarity", "task_vector_similarity"]

# 2**18 entries per model and chunk: the float64 buffers (K x 2 MiB) stay in cache. The
# Grams are float64 GEMMs: torch's float32 GEMM over long rows loses up to 1e-4 relative
# (measured), float64 keeps the cosines to ~1e-15; the sign products are exact.
_CHUNK = 1 << 18
_LAYER = re.compile(r"^(.*?\.\d+)(?:\.|$)")


@dataclass(frozen=True)
class TaskVectorSimilarity:
    """Cosine similarity and sign agreement of K task vectors.

    Attributes:
        names: the models' names (``names=`` or ``"model 0"``...).
        cosine: ``[K, K]`` float64, whole model: ``<τ_i, τ_j> / (‖τ_i‖ ‖τ_j‖)`` (NaN where a
            task vector is zero).
        sign_agreement: ``[K, K]`` float64, whole model: among the entries where both τ_i and
            τ_j are nonzero, the fraction with the same sign (NaN where there is none; the
            diagonal is 1 wherever τ_i has a nonzero entry).
        norms: ``[K]`` float64, ``‖τ_i‖`` over the whole model.
        layers: the groups of keys (``groups=``), in first-seen order.
        layer_cosine, layer_sign_agreement: ``[L, K, K]`` float64, the same per group.
        layer_numel: ``[L]`` int64, the entries of each group.
    """

    names: list[str]
    cosine: torch.Tensor
    sign_agreement: torch.Tensor
    norms: torch.Tensor
    layers: list[str]
    layer_cosine: torch.Tensor
    layer_sign_agreement: torch.Tensor
    layer_numel: torch.Tensor

    def layer(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(cosine, sign agreement) of one group."""
        i = self.layers.index(name)
        return self.layer_cosine[i], self.layer_sign_agreement[i]

    def to_dict(self) -> dict[str, Any]:
        """Plain lists (JSON-ready; NaN stays a float NaN)."""
        return {
            "names": list(self.names),
            "cosine": self.cosine.tolist(),
            "sign_agreement": self.sign_agreement.tolist(),
            "norms": self.norms.tolist(),
            "layers": {
                n: {
                    "cosine": self.layer_cosine[i].tolist(),
                    "sign_agreement": self.layer_sign_agreement[i].tolist(),
                    "numel": int(self.layer_numel[i]),
                }
                for i, n in enumerate(self.layers)
            },
        }

    def save_heatmap(
        self, path: str | Path, *, layers: bool = True, title: str | None = None, dpi: int = 120
    ) -> Path:
        """Write a PNG: the whole-model cosine and sign-agreement matrices (annotated), and
        with ``layers`` the off-diagonal pairs per layer (rows: layers; columns: pairs
        ``i-j``) for both. Needs matplotlib (``pip install 'pymerge[plot]'``)."""
        try:
            import matplotlib

            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError(
                "TaskVectorSimilarity.save_heatmap needs matplotlib: pip install 'pymerge[plot]'"
            ) from e
        path = Path(path)
        k = len(self.names)
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
        rows = 2 if layers and pairs and self.layers else 1
        fig, axes = plt.subplots(
            rows,
            2,
            figsize=(10, 4.2 + (0.18 * len(self.layers) + 1.0 if rows == 2 else 0)),
            squeeze=False,
        )
        for c, (mat, label, lim) in enumerate(
            (
                (self.cosine, "cosine similarity", (-1, 1)),
                (self.sign_agreement, "sign agreement", (0, 1)),
            )
        ):
            ax = axes[0][c]
            im = ax.imshow(
                mat.numpy(), vmin=lim[0], vmax=lim[1], cmap="RdBu_r" if c == 0 else "viridis"
            )
            ax.set_xticks(range(k), self.names, rotation=45, ha="right")
            ax.set_yticks(range(k), self.names)
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, f"{float(mat[i, j]):.2f}", ha="center", va="center", fontsize=8)
            ax.set_title(f"{label} (whole model)")
            fig.colorbar(im, ax=ax, fraction=0.046)
            if rows == 2:
                ax = axes[1][c]
                lm = self.layer_cosine if c == 0 else self.layer_sign_agreement
                grid = torch.stack([lm[:, i, j] for i, j in pairs], dim=1)
                im = ax.imshow(
                    grid.numpy(),
                    vmin=lim[0],
                    vmax=lim[1],
                    aspect="auto",
                    cmap="RdBu_r" if c == 0 else "viridis",
                )
                ax.set_xticks(range(len(pairs)), [f"{i}-{j}" for i, j in pairs])
                ax.set_yticks(range(len(self.layers)), self.layers, fontsize=6)
                ax.set_title(f"{label} per layer (pairs)")
                fig.colorbar(im, ax=ax, fraction=0.046)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        return path


def _layer_group(key: str) -> str:
    """``model.layers.3.mlp.up.weight`` -> ``model.layers.3``; keys outside a layer stack
    (embeddings, final norm, head) are their own group."""
    m = _LAYER.match(key)
    return m.group(1) if m else key


def task_vector_similarity(
    states: Sequence[Mapping[str, torch.Tensor]],
    *,
    base: Mapping[str, torch.Tensor],
    names: Sequence[str] | None = None,
    groups: str | Callable[[str], str] = "layer",
    keys: Sequence[str] | None = None,
    threads: int | None = 1,
    progress: bool = False,
) -> TaskVectorSimilarity:
    """Cosine similarity and sign agreement between the task vectors ``θ_i - θ_base``.

    Args:
        states: K >= 1 fine-tuned state dicts (same keys, shapes, dtypes as ``base``); not
            modified.
        base: the pre-trained state dict the task vectors start from.
        names: K labels for the heat map (default ``"model i"``).
        groups: how keys form the per-layer rows: ``"layer"`` (the key up to its first
            dotted integer, ``model.layers.3``; other keys alone), ``"key"`` (every tensor),
            or a function ``key -> group name``.
        keys: only these keys (default: every floating-point key).
        threads: torch intra-op threads during the call (restored after; None: leave torch's
            setting). One by default: the per-chunk work (K-row GEMMs, elementwise ops on
            2**18 entries) is too small for torch's thread hand-off, which on a busy 2-core
            machine made it 5-10x slower than one thread (measured; bench/RESULTS.md).
            ``torch.set_num_threads`` is process-wide: other threads' torch work shares the
            setting while this runs.
        progress: a progress bar over the keys.

    Returns:
        :class:`TaskVectorSimilarity` (``.cosine``, ``.sign_agreement``, per layer
        ``.layer_cosine`` ..., ``.save_heatmap(path)``).

    Each tensor is read once: its K task vectors are formed in float64 chunks of 2**18
    entries (exact differences of the stored values) and reduced to ``T Tᵀ``, ``S Sᵀ`` and
    ``|S| |S|ᵀ`` (``S = sign(T)``) by float64 GEMMs, accumulated per group; no whole-model
    flattening. The cosines are accurate to ~1e-15.
    """
    if isinstance(states, Mapping) or not isinstance(states, Sequence):
        raise TypeError("states must be a list of state dicts (one per fine-tune)")
    states = list(states)
    if base is None:
        raise ValueError(
            "task_vector_similarity needs base= (the model the task vectors start from)"
        )
    k = len(states)
    if k < 1:
        raise ValueError("states is empty: need at least one fine-tuned state dict")
    all_names = [f"states[{i}]" for i in range(k)] + ["base"]
    all_keys, _, dtypes, _ = check_states([*states, base], all_names)
    labels = list(names) if names is not None else [f"model {i}" for i in range(k)]
    if len(labels) != k:
        raise ValueError(f"names has {len(labels)} entries for {k} state dicts")
    if keys is None:
        keys = [key for key, d in zip(all_keys, dtypes, strict=True) if d.is_floating_point]
    else:
        keys = list(keys)
        missing = [key for key in keys if key not in base]
        if missing:
            raise ValueError(f"key {missing[0]!r} of keys= is not in the state dicts")
    if groups == "layer":
        group_of: Callable[[str], str] = _layer_group
    elif groups == "key":
        group_of = str
    elif callable(groups):
        group_of = groups
    else:
        raise ValueError(f"groups must be 'layer', 'key' or a function, got {groups!r}")

    if threads is not None:
        threads = check_int(threads, "threads", minimum=1)
    before = torch.get_num_threads()
    if threads is not None and threads != before:
        torch.set_num_threads(threads)
    try:
        per, order, numel = _accumulate(states, base, keys, group_of, k, progress)
    finally:
        if threads is not None and threads != before:
            torch.set_num_threads(before)
    total = per.sum(dim=0)
    cos, sign = _finish(total)
    lcos, lsign = _finish(per)
    return TaskVectorSimilarity(
        names=labels,
        cosine=cos,
        sign_agreement=sign,
        norms=total[0].diagonal().sqrt(),
        layers=list(order),
        layer_cosine=lcos,
        layer_sign_agreement=lsign,
        layer_numel=torch.tensor(numel, dtype=torch.int64),
    )


def _accumulate(states, base, keys, group_of, k, progress):
    """Per group ``[3, K, K]`` accumulators, the group order and sizes."""
    order: dict[str, int] = {}
    acc: list[torch.Tensor] = []  # per group: [3, K, K] float64 (T Tᵀ, S Sᵀ, |S| |S|ᵀ)
    numel: list[int] = []
    for key in track(keys, progress, desc="task-vector similarity", unit="tensor"):
        g = group_of(key)
        if g not in order:
            order[g] = len(order)
            acc.append(torch.zeros(3, k, k, dtype=torch.float64))
            numel.append(0)
        gi = order[g]
        b = base[key]
        if not b.is_floating_point():
            raise TypeError(f"key {key!r} is not floating point ({b.dtype})")
        grams = _tensor_grams([s[key] for s in states], b)
        acc[gi] += grams
        numel[gi] += b.numel()

    per = torch.stack(acc) if acc else torch.zeros(0, 3, k, k, dtype=torch.float64)
    return per, order, numel


def _tensor_grams(tensors: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """``[3, K, K]`` float64: ``T Tᵀ``, ``S Sᵀ``, ``|S| |S|ᵀ`` of one tensor's task vectors."""
    k = len(tensors)
    flat = [t.reshape(-1) for t in tensors]
    fb = base.reshape(-1)
    n = fb.numel()
    out = torch.zeros(3, k, k, dtype=torch.float64)
    m = min(n, _CHUNK)
    if m == 0:
        return out
    buf = torch.empty(k, m, dtype=torch.float64, device=fb.device)
    sbuf = torch.empty(k, m, dtype=torch.float64, device=fb.device)
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        t = buf[:, : stop - start]
        s = sbuf[:, : stop - start]
        b = fb[start:stop].to(torch.float64)
        for i, x in enumerate(flat):
            t[i].copy_(x[start:stop])
            t[i].sub_(b)
        out[0] += t @ t.T
        torch.sign(t, out=s)
        out[1] += s @ s.T
        s.abs_()
        out[2] += s @ s.T
    return out


def _finish(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sign agreement from ``[..., 3, K, K]`` accumulators."""
    gram, ss, both = g[..., 0, :, :], g[..., 1, :, :], g[..., 2, :, :]
    d = gram.diagonal(dim1=-2, dim2=-1).sqrt()
    denom = d[..., :, None] * d[..., None, :]
    cos = torch.where(denom > 0, gram / denom, torch.full_like(gram, float("nan")))
    cos = cos.clamp(-1, 1)
    agree = (both + ss) / 2  # entries where both are nonzero and the signs agree
    sign = torch.where(both > 0, agree / both, torch.full_like(both, float("nan")))
    return cos, sign
