"""Aligning K >= 2 models: to an anchor, or MergeMany-style to the mean of the others.

* :func:`align_to_anchor`: weight-match every model to ``states[anchor]`` (Ito et al.'s
  three-model setting: B→A and C→A, then B and C are compared although never matched).
* :func:`merge_many`: Git Re-Basin's MergeMany: repeatedly match each model (in a seeded
  random order) to the mean of the other aligned models, warm-started from its current
  permutation, until the summed squared distance of the aligned models to their mean stops
  falling. The gauge is fixed at the end so that model 0 keeps the identity.
* :func:`average_aligned`: (weighted) average of the permuted models.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from pymerge._util.checks import check_state_pair
from pymerge.align.weight_matching import WeightMatchingResult, weight_matching
from pymerge.spec import PermutationSpec, apply_permutation

Permutation = dict[str, Tensor]

__all__ = [
    "MergeManyHistory",
    "MergeManyResult",
    "align_to_anchor",
    "average_aligned",
    "merge_many",
]


def _check_states(states: Sequence[Mapping[str, Tensor]], minimum: int) -> None:
    if isinstance(states, Mapping) or not isinstance(states, Sequence):
        raise TypeError(f"states must be a sequence of state dicts, got {type(states).__name__}")
    if len(states) < minimum:
        raise ValueError(f"need at least {minimum} state dicts, got {len(states)}")
    for i, s in enumerate(states[1:], start=1):
        check_state_pair(states[0], s, "states[0]", f"states[{i}]")


def align_to_anchor(
    spec: PermutationSpec,
    states: Sequence[Mapping[str, Tensor]],
    anchor: int = 0,
    **wm_kwargs: Any,
) -> list[Permutation]:
    """Weight-match every state dict to ``states[anchor]``.

    Returns one Permutation per model (identity for the anchor):
    ``apply_permutation(spec, perms[i], states[i])`` lives in the anchor's basis.
    ``wm_kwargs`` go to :func:`weight_matching` (``max_iter``, ``seed``, ``backend``...).
    """
    _check_states(states, 2)
    if not isinstance(anchor, int) or not -len(states) <= anchor < len(states):
        raise ValueError(f"anchor must index states (0..{len(states) - 1}), got {anchor!r}")
    anchor %= len(states)
    perms: list[Permutation] = []
    sizes = spec.validate(states[anchor])
    for i, s in enumerate(states):
        if i == anchor:
            perms.append({g: torch.arange(n) for g, n in sizes.items()})
        else:
            perms.append(weight_matching(spec, states[anchor], s, **wm_kwargs).perm)
    return perms


def average_aligned(
    spec: PermutationSpec,
    states: Sequence[Mapping[str, Tensor]],
    perms: Sequence[Mapping[str, Tensor]] | None = None,
    weights: Sequence[float] | None = None,
) -> dict[str, Tensor]:
    """Σ_i w_i π_i(θ_i) for floating tensors (weights default to 1/K, normalised to sum 1),
    accumulated in float64 and cast back to each key's dtype; other tensors from states[0]."""
    _check_states(states, 1)
    k = len(states)
    if perms is not None and len(perms) != k:
        raise ValueError(f"got {len(perms)} permutations for {k} state dicts")
    if weights is None:
        w = [1.0 / k] * k
    else:
        if len(weights) != k:
            raise ValueError(f"got {len(weights)} weights for {k} state dicts")
        total = float(sum(weights))
        if total == 0.0:
            raise ValueError("weights sum to zero")
        w = [float(x) / total for x in weights]
    aligned = [
        apply_permutation(spec, p, s) if p is not None else s
        for s, p in zip(states, perms if perms is not None else [None] * k, strict=True)
    ]
    out: dict[str, Tensor] = {}
    for key, ref in states[0].items():
        if torch.is_floating_point(ref):
            acc = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
            for wi, s in zip(w, aligned, strict=True):
                acc += wi * s[key].detach().to(torch.float64)
            out[key] = acc.to(ref.dtype)
        else:
            out[key] = ref.detach().clone()
    return out


@dataclass
class MergeManyHistory:
    """``distance[t]``: Σ_i ||π_i(θ_i) − mean||² after sweep t (``initial_distance`` before);
    ``wm_iterations[t]``: weight-matching sweeps summed over the models; ``seconds[t]``."""

    initial_distance: float = float("nan")
    distance: list[float] = field(default_factory=list)
    wm_iterations: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


@dataclass
class MergeManyResult:
    """``perms[i]`` maps model i into the common basis (``perms[0]`` is the identity);
    ``merged_state`` is the average of the aligned models."""

    perms: list[Permutation]
    merged_state: dict[str, Tensor]
    history: MergeManyHistory
    converged: bool


def _cost_keys(spec: PermutationSpec, state: Mapping[str, Tensor]) -> list[str]:
    no_cost = set(spec.no_cost)
    return [k for k, v in state.items() if k not in no_cost and torch.is_floating_point(v)]


def _distance(aligned: list[dict[str, Tensor]], keys: list[str]) -> float:
    total = 0.0
    for key in keys:
        stack = torch.stack([a[key].to(torch.float64) for a in aligned])
        total += float(((stack - stack.mean(0)) ** 2).sum())
    return total


def merge_many(
    spec: PermutationSpec,
    states: Sequence[Mapping[str, Tensor]],
    max_iter: int = 100,
    seed: int = 0,
    *,
    wm_max_iter: int = 100,
    rtol: float = 1e-9,
    progress: bool = False,
    backend: str | None = None,
) -> MergeManyResult:
    """MergeMany: align K models jointly by matching each to the mean of the others.

    Args:
        spec: permutation spec; states: K >= 2 state dicts (same keys/shapes; not modified).
        max_iter: maximum sweeps over the models.
        seed: seeds the model order of each sweep and every weight matching.
        wm_max_iter: max sweeps of each weight matching.
        rtol: stop when a sweep lowers the summed distance by no more than ``rtol`` (relative).
        progress: tqdm bar over sweeps. backend: assignment backend.

    Returns:
        :class:`MergeManyResult` with the permutations of the lowest summed distance seen
        (re-expressed so that model 0 has the identity) and the averaged state.
    """
    _check_states(states, 2)
    if not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter must be a non-negative int, got {max_iter!r}")
    k = len(states)
    sizes = spec.validate(states[0])
    for i, s in enumerate(states[1:], start=1):
        try:
            spec.validate(s)
        except ValueError as exc:
            raise ValueError(f"states[{i}]: {exc}") from None
    keys = _cost_keys(spec, states[0])
    perms: list[Permutation] = [{g: torch.arange(n) for g, n in sizes.items()} for _ in states]
    warm: list[WeightMatchingResult | None] = [None] * k  # first match: greedy start
    aligned = [
        {
            key: s[key].detach().to(torch.float64)
            for key in states[0]
            if torch.is_floating_point(s[key])
        }
        for s in states
    ]
    for i, s in enumerate(states):
        for key, v in s.items():
            if not torch.is_floating_point(v):
                aligned[i][key] = v.detach()
    total = {key: sum(a[key] for a in aligned) for key in keys}
    history = MergeManyHistory(initial_distance=_distance(aligned, keys))
    best = (history.initial_distance, [dict(p) for p in perms])
    gen = torch.Generator().manual_seed(int(seed))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_iter, desc="MergeMany", unit="sweep")
    converged = False
    previous = history.initial_distance
    try:
        for sweep in range(max_iter):
            t0 = time.perf_counter()
            wm_its = 0
            for i in torch.randperm(k, generator=gen).tolist():
                others = {key: (total[key] - aligned[i][key]) / (k - 1) for key in keys}
                target = {key: others.get(key, aligned[i][key]) for key in aligned[i]}
                res = weight_matching(
                    spec,
                    target,
                    states[i],
                    max_iter=wm_max_iter,
                    init=warm[i],
                    seed=seed + 1000003 * (sweep + 1) + i,
                    backend=backend,
                )
                wm_its += res.history.iterations
                warm[i] = res
                perms[i] = res.perm
                new = apply_permutation(spec, res.perm, states[i])
                for key in keys:
                    v = new[key].detach().to(torch.float64)
                    total[key] = total[key] - aligned[i][key] + v
                    aligned[i][key] = v
            dist = _distance(aligned, keys)
            history.distance.append(dist)
            history.wm_iterations.append(wm_its)
            history.seconds.append(time.perf_counter() - t0)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(distance=f"{dist:.6g}")
            if dist < best[0]:
                best = (dist, [dict(p) for p in perms])
            if not dist < previous - rtol * abs(previous):
                converged = True
                break
            previous = dist
    finally:
        if bar is not None:
            bar.close()
    final = _fix_gauge(best[1])
    merged = average_aligned(spec, states, final)
    return MergeManyResult(perms=final, merged_state=merged, history=history, converged=converged)


def _fix_gauge(perms: list[Permutation]) -> list[Permutation]:
    """Compose every permutation with the inverse of ``perms[0]`` (same merged function)."""
    inv0 = {g: torch.argsort(p) for g, p in perms[0].items()}
    return [{g: p[inv0[g]].clone() for g, p in perm.items()} for perm in perms]
