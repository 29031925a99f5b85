"""Activation matching (Git Re-Basin, Ainsworth et al. 2022, Sec. 3.1).

Both models see the same inputs; at each permutation group's activation point
(``spec.activation_points[group]``: a module's output, features along ``dim``) the
Pearson correlation between every unit of model A and every unit of model B is
accumulated in a streaming fashion, and one assignment per group
(``linear_sum_assignment(corr, maximize=True)``) gives the permutation. There is no
coordinate descent: each group is solved once, independently.

Attention heads (:class:`~pymerge.spec.HeadStructure`) stay whole: for every pair of
heads the units within the head are matched, the within-head scores of all the
structure's groups are summed, and one assignment over heads picks the head
permutation.

Groups without a usable activation point (e.g. q/k/v units of ``nn.MultiheadAttention``,
whose projections are not separate modules, or a point module that runs more than once per
forward pass) are matched by weights instead (the default,
``fallback="weights"``): Git Re-Basin coordinate descent over those groups only, with the
activation-matched groups held fixed. ``fallback="error"`` raises instead, naming them.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from pymerge.align import _hooks

__all__ = ["ActivationMatchingResult", "activation_matching"]

Permutation = dict[str, torch.Tensor]


@dataclass
class ActivationMatchingResult:
    """What :func:`activation_matching` found.

    Attributes:
        perm: group -> LongTensor ``[n]`` (CPU); ``perm[g][i] = j`` means unit ``j`` of model B
            goes to position ``i``, so ``apply_permutation(spec, perm, state_b)`` looks like A.
        correlations: group -> float64 ``[n, n]`` Pearson correlation (CPU), rows = units of A,
            columns = units of B (unpermuted); only activation-matched groups. Units with zero
            variance have correlation 0.
        stats: group -> ``{"method": "activation" | "weights", "mean_corr_identity",
            "mean_corr_matched"}`` (the correlations' mean over the diagonal before and after
            the permutation; only ``"method"`` and ``"objective"`` for weight-matched groups).
        history: ``num_batches``, ``num_samples`` (rows fed per point), ``time_record_s``,
            ``time_solve_s``, ``solves`` (assignment problems solved), ``fallback_groups``,
            ``fallback_iterations``, ``objective`` (weight-matching objective of the
            fallback groups per iteration).
    """

    perm: Permutation
    correlations: dict[str, torch.Tensor]
    stats: dict[str, dict[str, Any]]
    history: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- assignment


class _Solver:
    """Counts solves; wraps ``pymerge.linear_sum_assignment`` (maximize=True)."""

    def __init__(self, backend: str | None) -> None:
        from pymerge.ops.assignment import linear_sum_assignment, linear_sum_assignment_batch

        self._lsa = linear_sum_assignment
        self._lsa_batch = linear_sum_assignment_batch
        self.backend = backend
        self.solves = 0

    def __call__(self, score: torch.Tensor) -> torch.Tensor:
        """Column assignment (LongTensor ``[n]``, CPU) maximising ``score[i, col[i]]``."""
        cost = score.detach().to("cpu", torch.float64).contiguous()
        _, cols = self._lsa(cost, maximize=True, backend=self.backend)
        self.solves += 1
        return torch.as_tensor(cols, dtype=torch.long)

    def batch(self, scores: torch.Tensor) -> torch.Tensor:
        """Column assignments ``[B, n]`` of a stack ``[B, n, n]``."""
        cost = scores.detach().to("cpu", torch.float64).contiguous()
        _, cols = self._lsa_batch(cost, maximize=True, backend=self.backend)
        self.solves += scores.shape[0]
        return torch.as_tensor(cols, dtype=torch.long)


def _solve_heads(
    scores: Mapping[str, torch.Tensor], num_heads: int, head_dim: int, solve: _Solver
) -> Permutation:
    """Whole-head assignment for groups sharing one head permutation.

    ``scores[g]`` is ``[H*D, H*D]`` (rows A, cols B). For every head pair (a, b) the units are
    matched within the block; the blocks' optimal values summed over groups form an
    ``[H, H]`` score, whose assignment is the head permutation.
    """
    h, d = num_heads, head_dim
    inner: dict[str, torch.Tensor] = {}
    head_score = torch.zeros(h, h, dtype=torch.float64)
    for g, s in scores.items():
        blocks = s.detach().to("cpu", torch.float64).reshape(h, d, h, d).permute(0, 2, 1, 3)
        blocks = blocks.reshape(h * h, d, d)
        cols = solve.batch(blocks)  # [h*h, d]
        inner[g] = cols.view(h, h, d)
        head_score += blocks.gather(2, cols.view(h * h, d, 1)).sum(dim=(1, 2)).view(h, h)
    heads = solve(head_score)
    rows = torch.arange(h)
    return {g: (heads.view(h, 1) * d + inner[g][rows, heads]).reshape(-1) for g in scores}


def _improves(new: float, old: float) -> bool:
    return new > old + 1e-12 * max(1.0, abs(old))


def _score(s: torch.Tensor, p: torch.Tensor) -> float:
    return float(s[torch.arange(s.shape[0]), p].sum())


# --------------------------------------------------------------------------- weight fallback


def _axis_matrix(t: torch.Tensor, ref: Any, n: int) -> torch.Tensor:
    t = t.movedim(ref.resolved_axis(t.dim()), 0)
    start, stop = ref.segment(t.shape[0])
    return t[start:stop].reshape(n, -1).to(torch.float64)


def _weight_cost(spec: Any, sa: dict, sb: dict, perm: Permutation, g: str, n: int) -> torch.Tensor:
    from pymerge.spec import permute_param

    cost = torch.zeros(n, n, dtype=torch.float64)
    for ref in spec.perm_to_axes[g]:
        if ref.param in spec.no_cost:
            continue
        wb = permute_param(spec, perm, ref.param, sb[ref.param], skip_groups=(g,))
        cost += (_axis_matrix(sa[ref.param], ref, n) @ _axis_matrix(wb, ref, n).T).cpu()
    return cost


def _weight_fallback(
    spec: Any,
    sa: dict,
    sb: dict,
    perm: Permutation,
    units: list[tuple[str, ...]],
    sizes: dict[str, int],
    heads: dict[str, Any],
    solve: _Solver,
    max_iter: int,
) -> tuple[list[float], int]:
    """Coordinate descent (Git Re-Basin weight matching) over ``units`` only; ``perm`` is
    updated in place (other groups stay fixed). Returns (objective per sweep, sweeps)."""
    objective: list[float] = []
    sweeps = 0
    for _ in range(max_iter):
        sweeps += 1
        improved = False
        for unit in units:
            if unit[0] == "group":
                g = unit[1]
                cost = _weight_cost(spec, sa, sb, perm, g, sizes[g])
                new = solve(cost)
                if _improves(_score(cost, new), _score(cost, perm[g])):
                    improved = True
                    perm[g] = new
            else:
                hs = heads[unit[1]]
                costs = {g: _weight_cost(spec, sa, sb, perm, g, sizes[g]) for g in hs.groups}
                new = _solve_heads(costs, hs.num_heads, hs.head_dim, solve)
                old_v = sum(_score(costs[g], perm[g]) for g in hs.groups)
                new_v = sum(_score(costs[g], new[g]) for g in hs.groups)
                if _improves(new_v, old_v):
                    improved = True
                    perm.update(new)
        total = 0.0
        for unit in units:
            gs = (unit[1],) if unit[0] == "group" else heads[unit[1]].groups
            for g in gs:
                total += _score(_weight_cost(spec, sa, sb, perm, g, sizes[g]), perm[g])
        objective.append(total)
        if not improved:
            break
    return objective, sweeps


# --------------------------------------------------------------------------- main entry


def _correlation(acc: Any) -> torch.Tensor:
    corr = acc.correlation()
    corr = torch.as_tensor(corr).detach().to("cpu", torch.float64)
    return torch.nan_to_num(corr, nan=0.0, posinf=0.0, neginf=0.0)


def activation_matching(
    model_a: nn.Module,
    model_b: nn.Module,
    batches: Iterable[Any],
    spec: Any = None,
    *,
    example_inputs: Any = None,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    backend: str | None = None,
    fallback: Literal["weights", "error"] = "weights",
    max_iter: int = 100,
) -> ActivationMatchingResult:
    """Permute model B's units to match model A's by correlating their activations.

    Args:
        model_a, model_b: same architecture (same state-dict keys and shapes). Neither is
            mutated: modules are put in eval mode while recording and each module's mode is
            restored; hooks are removed even on error; gradients are off.
        batches: iterable of input tensors, ``(inputs, targets)`` pairs (first item used) or
            mappings of keyword inputs; e.g. a list or a ``DataLoader``.
        spec: :class:`~pymerge.spec.PermutationSpec` with ``activation_points``; when None it
            is traced with ``pymerge.spec_from_model(model_a, example_inputs)`` (the first
            batch's inputs when ``example_inputs`` is None).
        max_batches: use at most this many batches.
        device: run both models there (models on another device are copied, never moved).
            None: each model runs where its parameters live.
        progress: tqdm bar over batches.
        backend: assignment backend passed to ``pymerge.linear_sum_assignment``.
        fallback: for groups without a usable activation point (none declared, or a module that
            runs more than once per forward, e.g. a ReLU module reused within a block):
            ``"weights"`` (default) matches them by weight-matching coordinate descent with the
            activation-matched groups fixed; ``"error"`` raises ``ValueError`` naming them. A
            head structure whose groups are not all observed is matched by weights as a whole.
        max_iter: sweeps of the weight-matching fallback.

    Returns:
        :class:`ActivationMatchingResult`; ``result.perm`` maps B onto A.
    """
    from pymerge.ops.correlation import CorrelationAccumulator
    from pymerge.spec import PermutationSpec

    if not isinstance(model_a, nn.Module) or not isinstance(model_b, nn.Module):
        raise TypeError(
            f"model_a and model_b must be nn.Module, got {type(model_a).__name__} and "
            f"{type(model_b).__name__}"
        )
    if fallback not in ("weights", "error"):
        raise ValueError(f"fallback must be 'weights' or 'error', got {fallback!r}")
    _hooks.check_same_architecture(model_a=model_a, model_b=model_b)

    batch_iter = iter(_hooks.iter_inputs(batches, max_batches, None))
    first = next(batch_iter, None)
    if first is None:
        raise ValueError("batches is empty: activation matching needs at least one batch")
    batch_iter = itertools.chain([first], batch_iter)

    if spec is None:
        from pymerge.spec import spec_from_model

        spec = spec_from_model(model_a, first if example_inputs is None else example_inputs)
    elif not isinstance(spec, PermutationSpec):
        raise TypeError(f"spec must be a PermutationSpec, got {type(spec).__name__}")

    state_a = model_a.state_dict()
    state_b = model_b.state_dict()
    sizes = spec.validate(state_a)
    groups = spec.groups()
    points = dict(spec.activation_points)

    head_of: dict[str, str] = {}
    for hname, hs in spec.heads.items():
        for g in hs.groups:
            head_of[g] = hname

    ma = _hooks.model_on(model_a, device)
    mb = _hooks.model_on(model_b, device)
    dev_a, dev_b = _hooks.model_device(ma), _hooks.model_device(mb)

    # a point must be a submodule that runs exactly once per forward pass (a module reused
    # within the forward, like torchvision's shared ``relu``, mixes different features)
    for g in groups:
        if g in points:
            _hooks.resolve_module(ma, points[g].module, f"activation point of group {g!r}:")
    with _hooks.eval_mode(ma):
        counts = _hooks.call_counts(
            ma, {points[g].module for g in groups if g in points}, _hooks.to_device(first, dev_a)
        )
    for g in groups:
        if g in points and counts[points[g].module] == 0:
            raise ValueError(
                f"activation point {points[g].module!r} of group {g!r} does not run in the "
                "model's forward pass"
            )
    reused = {g for g in groups if g in points and counts[points[g].module] > 1}
    usable = {g: p for g, p in points.items() if g not in reused}

    # which groups are observed; a head structure needs all of its groups observed
    missing = [g for g in groups if g not in usable]
    partial_heads = {
        name for name, hs in spec.heads.items() if any(x not in usable for x in hs.groups)
    }
    if missing and fallback == "error":
        detail = "; ".join(
            f"{g} (module {points[g].module!r} runs {counts[points[g].module]} times per forward)"
            if g in reused
            else f"{g} (no activation point)"
            for g in missing
        )
        raise ValueError(
            f"permutation groups that cannot be matched by activations: {detail}; give them "
            "an activation point that runs once per forward, or use fallback='weights'"
        )
    act_groups = [g for g in groups if g in usable and head_of.get(g) not in partial_heads]
    weight_groups = [g for g in groups if g not in act_groups]

    # one recording per distinct (module, dim)
    point_key = {g: (points[g].module, int(points[g].dim)) for g in act_groups}
    keys = sorted(set(point_key.values()))
    rec_points = {f"{m}@{d}": (m, d) for m, d in keys}

    accs: dict[str, Any] = {}
    num_batches = 0
    t0 = time.perf_counter()
    iterator: Iterable[Any] = batch_iter
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batch_iter, desc="activation matching", total=max_batches)

    if act_groups:
        with torch.no_grad(), _hooks.eval_mode(ma), _hooks.eval_mode(mb):
            for inputs in iterator:
                feats_a: dict[str, list[torch.Tensor]] = {}
                feats_b: dict[str, list[torch.Tensor]] = {}
                with _hooks.record_outputs(ma, rec_points, feats_a):
                    _hooks.call_model(ma, _hooks.to_device(inputs, dev_a))
                with _hooks.record_outputs(mb, rec_points, feats_b):
                    _hooks.call_model(mb, _hooks.to_device(inputs, dev_b))
                for key, (mod, dim) in rec_points.items():
                    if key not in feats_a or key not in feats_b:
                        gs = [g for g in act_groups if point_key[g] == (mod, dim)]
                        raise ValueError(
                            f"activation point module {mod!r} (groups {', '.join(gs)}) did not "
                            "run during the forward pass"
                        )
                    xa = torch.cat(feats_a[key]) if len(feats_a[key]) > 1 else feats_a[key][0]
                    xb = torch.cat(feats_b[key]) if len(feats_b[key]) > 1 else feats_b[key][0]
                    if key not in accs:
                        for g in act_groups:
                            if point_key[g] == (mod, dim) and xa.shape[1] != sizes[g]:
                                raise ValueError(
                                    f"group {g!r}: activation point {mod!r} has {xa.shape[1]} "
                                    f"features along dim {dim}, but the group has size {sizes[g]}"
                                )
                        accs[key] = CorrelationAccumulator(
                            xa.shape[1], xb.shape[1], dtype=torch.float64
                        )
                    accs[key].update(xa, xb.to(xa.device))
                num_batches += 1
    t_record = time.perf_counter() - t0

    solve = _Solver(backend)
    t1 = time.perf_counter()
    perm: Permutation = {}
    correlations: dict[str, torch.Tensor] = {}
    stats: dict[str, dict[str, Any]] = {}
    corr_by_key = {key: _correlation(acc) for key, acc in accs.items()}
    for g in act_groups:
        correlations[g] = corr_by_key[f"{point_key[g][0]}@{point_key[g][1]}"]
    done_heads: set[str] = set()
    for g in act_groups:
        if g in head_of:
            hname = head_of[g]
            if hname in done_heads:
                continue
            hs = spec.heads[hname]
            perm.update(
                _solve_heads(
                    {x: correlations[x] for x in hs.groups}, hs.num_heads, hs.head_dim, solve
                )
            )
            done_heads.add(hname)
        else:
            perm[g] = solve(correlations[g])
    for g in act_groups:
        c = correlations[g]
        n = c.shape[0]
        stats[g] = {
            "method": "activation",
            "mean_corr_identity": float(c.diagonal().mean()),
            "mean_corr_matched": _score(c, perm[g]) / n,
        }

    objective: list[float] = []
    sweeps = 0
    if weight_groups:
        for g in weight_groups:
            perm[g] = torch.arange(sizes[g])
        units: list[tuple[str, ...]] = []
        seen: set[str] = set()
        for g in weight_groups:
            if g in head_of:
                if head_of[g] not in seen:
                    units.append(("heads", head_of[g]))
                    seen.add(head_of[g])
            else:
                units.append(("group", g))
        sa = {k: v.detach().to("cpu") for k, v in state_a.items()}
        sb = {k: v.detach().to("cpu") for k, v in state_b.items()}
        objective, sweeps = _weight_fallback(
            spec, sa, sb, perm, units, sizes, spec.heads, solve, max_iter
        )
        for g in weight_groups:
            stats[g] = {"method": "weights", "objective": objective[-1] if objective else 0.0}
    t_solve = time.perf_counter() - t1

    n_samples = {k: int(getattr(a, "count", getattr(a, "n", -1))) for k, a in accs.items()}
    history = {
        "num_batches": num_batches,
        "num_samples": n_samples,
        "time_record_s": t_record,
        "time_solve_s": t_solve,
        "solves": solve.solves,
        "fallback_groups": weight_groups,
        "fallback_iterations": sweeps,
        "objective": objective,
    }
    perm = {g: perm[g].to(torch.long).cpu() for g in groups}
    return ActivationMatchingResult(
        perm=perm, correlations=correlations, stats=stats, history=history
    )
