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
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn

from pymerge._util.progress import track
from pymerge.align import _hooks
from pymerge.align._solve import Solver, score
from pymerge.align.result import AlignmentHistory, AlignmentResult
from pymerge.spec.apply import Permutation
from pymerge.spec.spec import PermutationSpec

__all__ = ["activation_matching"]


def _correlation(acc: Any) -> torch.Tensor:
    corr = acc.correlation()
    corr = torch.as_tensor(corr).detach().to("cpu", torch.float64)
    return torch.nan_to_num(corr, nan=0.0, posinf=0.0, neginf=0.0)


def activation_matching(
    spec: PermutationSpec | None,
    model_a: nn.Module,
    model_b: nn.Module,
    batches: Iterable[Any],
    *,
    example_inputs: Any = None,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    fallback: Literal["weights", "error"] = "weights",
    max_iter: int = 100,
    progress: bool = False,
    backend: str | None = None,
) -> AlignmentResult:
    """Permute model B's units to match model A's by correlating their activations.

    Args:
        spec: :class:`~pymerge.spec.PermutationSpec` with ``activation_points``; ``None``:
            traced with ``pymerge.spec_from_model(model_a, example_inputs)`` (the first
            batch's inputs when ``example_inputs`` is None).
        model_a, model_b: same architecture (same state-dict keys and shapes). Neither is
            mutated: modules are put in eval mode while recording and each module's mode is
            restored; hooks are removed even on error; gradients are off.
        batches: iterable of input tensors, ``(inputs, targets)`` pairs (first item used) or
            mappings of keyword inputs; e.g. a list or a ``DataLoader``.
        example_inputs: inputs for tracing when ``spec`` is None.
        max_batches: use at most this many batches.
        device: run both models there (models on another device are copied, never moved).
            None: each model runs where its parameters live.
        fallback: for groups without a usable activation point (none declared, or a module
            that runs more than once per forward, e.g. a ReLU module reused within a block):
            ``"weights"`` (default) matches them by weight matching with the
            activation-matched groups fixed; ``"error"`` raises ``ValueError`` naming them.
            A head structure whose groups are not all observed is matched by weights whole.
        max_iter: sweeps of the weight-matching fallback.
        progress: a progress bar over batches.
        backend: assignment backend passed to the solver.

    Returns:
        :class:`AlignmentResult` with ``method="activation_matching"``; ``perm`` maps B onto
        A. ``history`` has one iteration (objective: the summed matched correlation of the
        activation-matched groups; ``solves``). ``extras``: ``correlations`` (group -> float64
        ``[n, n]`` Pearson correlation, rows units of A, columns units of B, unpermuted;
        zero-variance units have correlation 0), ``stats`` (group -> ``method``
        (``"activation"``/``"weights"``), ``mean_corr_identity``, ``mean_corr_matched``),
        ``num_batches``, ``num_samples``, ``fallback_groups``, ``time_record_s``,
        ``time_solve_s`` and ``fallback`` (the weight-matching result, or None).
    """
    if isinstance(spec, nn.Module):
        raise TypeError(
            "activation_matching takes the spec first: activation_matching(spec, model_a, "
            "model_b, batches, ...) (spec=None traces model_a)"
        )
    if not isinstance(model_a, nn.Module) or not isinstance(model_b, nn.Module):
        raise TypeError(
            f"model_a and model_b must be nn.Module, got {type(model_a).__name__} and "
            f"{type(model_b).__name__}"
        )
    if fallback not in ("weights", "error"):
        raise ValueError(f"fallback must be 'weights' or 'error', got {fallback!r}")
    _hooks.check_same_architecture(model_a=model_a, model_b=model_b)
    t0 = time.perf_counter()
    batch_iter = iter(_hooks.iter_inputs(batches, max_batches, None))
    first = next(batch_iter, None)
    if first is None:
        raise ValueError("batches is empty: activation matching needs at least one batch")
    batch_iter = itertools.chain([first], batch_iter)
    spec = _resolve_spec(spec, model_a, first if example_inputs is None else example_inputs)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    sizes = spec.validate(state_a)
    ma, mb = _hooks.model_on(model_a, device), _hooks.model_on(model_b, device)
    act_groups, weight_groups = _split_groups(spec, ma, first, fallback)
    points = {
        g: (spec.activation_points[g].module, int(spec.activation_points[g].dim))
        for g in act_groups
    }
    batch_iter = track(batch_iter, progress, total=max_batches, desc="activation matching")
    accs, num_batches = _record(ma, mb, batch_iter, points, sizes)
    t_record = time.perf_counter() - t0

    t1 = time.perf_counter()
    solver = Solver(backend)
    correlations = {g: _correlation(accs[points[g]]) for g in act_groups}
    perm = _solve_correlations(spec, correlations, solver)
    stats: dict[str, dict[str, Any]] = {
        g: {
            "method": "activation",
            "mean_corr_identity": float(c.diagonal().mean()),
            "mean_corr_matched": score(c, perm[g]) / c.shape[0],
        }
        for g, c in correlations.items()
    }
    wm = None
    if weight_groups:
        from pymerge.align.weight_matching import weight_matching

        wm = weight_matching(
            spec,
            state_a,
            state_b,
            init=perm,
            groups=weight_groups,
            max_iter=max_iter,
            dtype=torch.float64,
            backend=backend,
        )
        perm = dict(wm.perm)
        solver.solves += wm.history.total_solves
        for g in weight_groups:
            stats[g] = {"method": "weights", "objective": wm.objective}
    t_solve = time.perf_counter() - t1

    history = AlignmentHistory(
        initial_objective=float(sum(float(c.diagonal().sum()) for c in correlations.values()))
    )
    history.record(
        sum(score(c, perm[g]) for g, c in correlations.items()),
        t_record + t_solve,
        solves=solver.solves,
    )
    extras = {
        "correlations": correlations,
        "stats": stats,
        "num_batches": num_batches,
        "num_samples": {f"{m}@{d}": acc.count for (m, d), acc in accs.items()},
        "fallback_groups": weight_groups,
        "time_record_s": t_record,
        "time_solve_s": t_solve,
        "fallback": wm,
    }
    perm = {g: perm.get(g, torch.arange(n)).to(torch.long).cpu() for g, n in sizes.items()}
    return AlignmentResult(
        perm=perm,
        history=history,
        converged=wm is None or wm.converged,
        method="activation_matching",
        extras=extras,
    )


def _resolve_spec(spec: PermutationSpec | None, model: nn.Module, inputs: Any) -> PermutationSpec:
    if spec is None:
        from pymerge.spec import spec_from_model

        return spec_from_model(model, inputs)
    if not isinstance(spec, PermutationSpec):
        raise TypeError(f"spec must be a PermutationSpec or None, got {type(spec).__name__}")
    return spec


def _split_groups(
    spec: PermutationSpec, model: nn.Module, first: Any, fallback: str
) -> tuple[list[str], list[str]]:
    """Groups matched by activations and groups left to the weight fallback.

    A point must be a submodule that runs exactly once per forward pass (a module reused
    within the forward, like torchvision's shared ``relu``, mixes different features); a
    head structure needs all of its groups observed.
    """
    groups = spec.groups()
    points = spec.activation_points
    for g in groups:
        if g in points:
            _hooks.resolve_module(model, points[g].module, f"activation point of group {g!r}:")
    with _hooks.eval_mode(model):
        counts = _hooks.call_counts(
            model,
            {points[g].module for g in groups if g in points},
            _hooks.to_device(first, _hooks.model_device(model)),
        )
    for g in groups:
        if g in points and counts[points[g].module] == 0:
            raise ValueError(
                f"activation point {points[g].module!r} of group {g!r} does not run in the "
                "model's forward pass"
            )
    usable = {g for g in groups if g in points and counts[points[g].module] == 1}
    missing = [g for g in groups if g not in usable]
    if missing and fallback == "error":
        detail = "; ".join(
            f"{g} (module {points[g].module!r} runs {counts[points[g].module]} times per forward)"
            if g in points
            else f"{g} (no activation point)"
            for g in missing
        )
        raise ValueError(
            f"permutation groups that cannot be matched by activations: {detail}; give them "
            "an activation point that runs once per forward, or use fallback='weights'"
        )
    partial = {n for n, hs in spec.heads.items() if any(x not in usable for x in hs.groups)}
    head_of = {g: n for n, hs in spec.heads.items() for g in hs.groups}
    act = [g for g in groups if g in usable and head_of.get(g) not in partial]
    return act, [g for g in groups if g not in act]


def _record(
    ma: nn.Module,
    mb: nn.Module,
    batches: Iterable[Any],
    points: dict[str, tuple[str, int]],
    sizes: dict[str, int],
) -> tuple[dict[tuple[str, int], Any], int]:
    """Stream both models' features at every distinct point into one correlation
    accumulator per point. Returns the accumulators and the number of batches."""
    from pymerge.ops.correlation import CorrelationAccumulator

    rec = {f"{m}@{d}": (m, d) for m, d in sorted(set(points.values()))}
    accs: dict[tuple[str, int], Any] = {}
    dev_a, dev_b = _hooks.model_device(ma), _hooks.model_device(mb)
    num_batches = 0
    if not rec:
        return accs, 0
    with torch.no_grad(), _hooks.eval_mode(ma), _hooks.eval_mode(mb):
        for inputs in batches:
            feats_a: dict[str, list[torch.Tensor]] = {}
            feats_b: dict[str, list[torch.Tensor]] = {}
            with _hooks.record_outputs(ma, rec, feats_a):
                _hooks.call_model(ma, _hooks.to_device(inputs, dev_a))
            with _hooks.record_outputs(mb, rec, feats_b):
                _hooks.call_model(mb, _hooks.to_device(inputs, dev_b))
            for key, point in rec.items():
                gs = [g for g, p in points.items() if p == point]
                if key not in feats_a or key not in feats_b:
                    raise ValueError(
                        f"activation point module {point[0]!r} (groups {', '.join(gs)}) did "
                        "not run during the forward pass"
                    )
                xa, xb = torch.cat(feats_a[key]), torch.cat(feats_b[key])
                if point not in accs:
                    for g in gs:
                        if xa.shape[1] != sizes[g]:
                            raise ValueError(
                                f"group {g!r}: activation point {point[0]!r} has "
                                f"{xa.shape[1]} features along dim {point[1]}, but the group "
                                f"has size {sizes[g]}"
                            )
                    accs[point] = CorrelationAccumulator(
                        xa.shape[1], xb.shape[1], dtype=torch.float64
                    )
                accs[point].update(xa, xb.to(xa.device))
            num_batches += 1
    return accs, num_batches


def _solve_correlations(
    spec: PermutationSpec, correlations: dict[str, torch.Tensor], solver: Solver
) -> Permutation:
    """One assignment per group (whole heads for head structures) on its correlations."""
    perm: Permutation = {}
    for hs in spec.heads.values():
        if all(g in correlations for g in hs.groups):
            perm.update(solver.heads(hs, {g: correlations[g] for g in hs.groups}))
    for g, c in correlations.items():
        if g not in perm:
            perm[g] = solver.group(g, c)
    return perm
