"""Spec-level interpolation: ``(1 - α) θ_A + α π(θ_B)`` for a :class:`PermutationSpec`.

The ops layer knows nothing of specs (``pymerge.ops.permuted_interpolate`` takes plain
``param -> ((axis, index), ...)`` maps); this wrapper turns ``(spec, perm)`` into those maps
with :func:`permutation_index_map` and calls it, so ``π(θ_B)`` is never built.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from pymerge.ops.interpolate import permuted_interpolate
from pymerge.spec.apply import permutation_index_map
from pymerge.spec.spec import PermutationSpec

__all__ = ["aligned_interpolate"]


def aligned_interpolate(
    spec: PermutationSpec,
    perm: Mapping[str, torch.Tensor] | None,
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    alpha: float | Sequence[float] | torch.Tensor,
    *,
    backend: str | None = None,
    out_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
    """``(1 - alpha) * state_a + alpha * apply_permutation(spec, perm, state_b)``, fused.

    Args:
        spec: the permutation spec (validated against ``state_b``).
        perm: group -> index tensor (validated; ``None``: the identity, a plain lerp).
        state_a, state_b: state dicts with the same keys, shapes, dtypes and devices.
        alpha: one float, or a sequence / 1-D tensor (all alphas from one read of A and B).
        backend, out_dtype: as for :func:`pymerge.ops.permuted_interpolate`.

    Returns:
        One state dict for a float ``alpha``, a list (one per alpha) for a sequence.
        Endpoints are exact; non-floating entries are copied from ``state_a``.
    """
    if not isinstance(spec, PermutationSpec):
        raise TypeError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
    axes = {} if perm is None else permutation_index_map(spec, perm, state_b)
    return permuted_interpolate(state_a, state_b, alpha, axes, backend=backend, out_dtype=out_dtype)
