"""Aligning K >= 2 models: to an anchor, or MergeMany-style to the mean of the others.

* :func:`align_to_anchor`: weight-match every model to ``states[anchor]`` (Ito et al.'s
  three-model setting: B→A and C→A, then B and C are compared although never matched).
* :func:`merge_many`: Git Re-Basin's MergeMany: repeatedly match each model (in a seeded
  random order) to the mean of the other aligned models, warm-started from its current
  permutation, until the summed squared distance of the aligned models to their mean stops
  falling. The gauge is fixed at the end so that model 0 keeps the identity.

Both return a :class:`~pymerge.align.result.MultiAlignmentResult`. The (weighted) average of
the aligned models is ``pymerge.interpolate([apply_permutation(spec, p, s) ...], weights)``
(the one averaging entry point); ``merge_many`` puts its average in ``extras``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from pymerge._util.args import check_int, check_seed
from pymerge._util.checks import check_state_pair
from pymerge._util.progress import progress_bar
from pymerge.align.result import AlignmentHistory, AlignmentResult, MultiAlignmentResult
from pymerge.align.weight_matching import weight_matching
from pymerge.ops.interpolate import interpolate
from pymerge.spec.apply import Permutation, apply_permutation
from pymerge.spec.spec import PermutationSpec

__all__ = ["align_to_anchor", "merge_many"]


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
    *,
    anchor: int = 0,
    **wm_kwargs: Any,
) -> MultiAlignmentResult:
    """Weight-match every state dict to ``states[anchor]``.

    ``wm_kwargs`` go to :func:`~pymerge.align.weight_matching` (``max_iter``, ``seed``,
    ``backend``...). Returns a :class:`MultiAlignmentResult` (``method="anchor"``):
    ``perms[i]`` maps model ``i`` into the anchor's basis (the identity for the anchor);
    ``history`` has one entry per matched model (its final objective and seconds);
    ``converged`` is True when every matching converged; ``extras["results"]`` holds the
    per-model :class:`AlignmentResult` (None for the anchor).
    """
    _check_states(states, 2)
    if (
        isinstance(anchor, bool)
        or not isinstance(anchor, int)
        or not (-len(states) <= anchor < len(states))
    ):
        raise ValueError(f"anchor must index states (0..{len(states) - 1}), got {anchor!r}")
    anchor %= len(states)
    sizes = spec.validate(states[anchor])
    perms: list[Permutation] = []
    results: list[AlignmentResult | None] = []
    history = AlignmentHistory()
    for i, s in enumerate(states):
        if i == anchor:
            perms.append({g: torch.arange(n) for g, n in sizes.items()})
            results.append(None)
            continue
        res = weight_matching(spec, states[anchor], s, **wm_kwargs)
        perms.append(res.perm)
        results.append(res)
        history.record(res.objective, res.history.total_seconds, solves=res.history.total_solves)
    return MultiAlignmentResult(
        perms=perms,
        history=history,
        converged=all(r is None or r.converged for r in results),
        method="anchor",
        extras={"results": results, "anchor": anchor},
    )


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
    *,
    max_iter: int = 100,
    seed: int = 0,
    wm_max_iter: int = 100,
    rtol: float = 1e-9,
    progress: bool = False,
    backend: str | None = None,
) -> MultiAlignmentResult:
    """MergeMany: align K models jointly by matching each to the mean of the others.

    Args:
        spec: permutation spec; states: K >= 2 state dicts (same keys/shapes; not modified).
        max_iter: maximum sweeps over the models.
        seed: seeds the model order of each sweep and every weight matching.
        wm_max_iter: max sweeps of each weight matching.
        rtol: stop when a sweep lowers the summed distance by no more than ``rtol`` (relative).
        progress: a progress bar over sweeps. backend: assignment backend.

    Returns:
        :class:`MultiAlignmentResult` (``method="merge_many"``) with the permutations of the
        lowest summed distance seen, re-expressed so that model 0 keeps the identity;
        ``history.objective`` the summed squared distance Σ_i ||π_i(θ_i) − mean||² after
        each sweep (``initial_objective`` before), ``history.wm_iterations`` the
        weight-matching sweeps per sweep; ``extras["merged_state"]`` the average of the
        aligned models.
    """
    _check_states(states, 2)
    max_iter = check_int(max_iter, "max_iter", minimum=0)
    seed = check_seed(seed)
    k = len(states)
    sizes = spec.validate(states[0])
    for i, s in enumerate(states[1:], start=1):
        try:
            spec.validate(s)
        except ValueError as exc:
            raise ValueError(f"states[{i}]: {exc}") from None
    keys = _cost_keys(spec, states[0])
    perms: list[Permutation] = [{g: torch.arange(n) for g, n in sizes.items()} for _ in states]
    warm: list[AlignmentResult | None] = [None] * k
    aligned = [{key: s[key].detach().to(torch.float64) for key in keys} for s in states]
    total = {key: sum(a[key] for a in aligned) for key in keys}
    history = AlignmentHistory(initial_objective=_distance(aligned, keys))
    best = (history.initial_objective, [dict(p) for p in perms])
    gen = torch.Generator().manual_seed(seed)
    converged = False
    previous = history.initial_objective
    with progress_bar(progress, total=max_iter, desc="MergeMany", unit="sweep") as bar:
        for sweep in range(max_iter):
            t0 = time.perf_counter()
            wm_its = solves = 0
            for i in torch.randperm(k, generator=gen).tolist():
                target = {
                    **states[i],
                    **{key: (total[key] - aligned[i][key]) / (k - 1) for key in keys},
                }
                res = weight_matching(
                    spec,
                    target,
                    states[i],
                    max_iter=wm_max_iter,
                    init=warm[i],
                    seed=(seed + 1000003 * (sweep + 1) + i) % (2**63),
                    backend=backend,
                )
                wm_its += res.history.iterations
                solves += res.history.total_solves
                warm[i] = res
                perms[i] = res.perm
                new = apply_permutation(spec, res.perm, states[i])
                for key in keys:
                    v = new[key].detach().to(torch.float64)
                    total[key] = total[key] - aligned[i][key] + v
                    aligned[i][key] = v
            dist = _distance(aligned, keys)
            history.record(dist, time.perf_counter() - t0, solves=solves, wm_iterations=wm_its)
            bar.update(1)
            bar.set_postfix(distance=f"{dist:.6g}")
            if dist < best[0]:
                best = (dist, [dict(p) for p in perms])
            if not dist < previous - rtol * abs(previous):
                converged = True
                break
            previous = dist
    final = _fix_gauge(best[1])
    merged = interpolate(
        [apply_permutation(spec, p, s) for p, s in zip(final, states, strict=True)], [1.0 / k] * k
    )
    return MultiAlignmentResult(
        perms=final,
        history=history,
        converged=converged,
        method="merge_many",
        extras={"merged_state": merged, "best_distance": best[0]},
    )


def _fix_gauge(perms: list[Permutation]) -> list[Permutation]:
    """Compose every permutation with the inverse of ``perms[0]`` (same merged function)."""
    inv0 = {g: torch.argsort(p) for g, p in perms[0].items()}
    return [{g: p[inv0[g]].clone() for g, p in perm.items()} for perm in perms]
