"""Weight matching: Git Re-Basin's coordinate descent (Ainsworth et al. 2022, Algorithm 1).

Find the permutation π of model B's units that maximises

    J(π) = Σ over state keys w (except ``spec.no_cost``) of ⟨W_w^A, π(W_w^B)⟩_F .

With every other group fixed, J is linear in one group's permutation, so the best one is a
linear assignment on that group's cost matrix (:class:`~pymerge.align._costs.CostBuilder`,
updated incrementally as neighbours change). Algorithm 1::

    π ← identity (or a warm start)
    repeat up to max_iter times:
        for each unit (a group, or the groups of a head structure) in a random order:
            C ← cost of the unit with the other groups fixed
            π_new ← argmax_P ⟨C, P⟩                         (maximising assignment)
            if ⟨C, π_new⟩ > ⟨C, π_old⟩ (beyond tol): π ← π_new
        stop after a sweep in which no unit improved

Each group's assignment is warm-started from its previous duals. The solve step
(:mod:`pymerge.align._solve`) is shared with activation matching; head structures keep
attention heads whole.

Numerics (``dtype=None``): costs are built and solved in float64 when either state holds
float64 weights, else in float32 (fp16/bf16 promoted), like the paper's reference code;
scores are summed in float64. The tolerance follows (``tol=None``: 1e-12 relative in
float64, 1e-7 in float32, so round-off is not progress).

Out of core: when a state is a lazy state dict (:class:`pymerge.io.Checkpoint`, or any
mapping with ``meta_state()``), the costs are built streaming over the parameters that touch
each group, a few tensors in memory at a time, with the same permutations as in memory.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from pymerge._util.args import check_int, check_seed
from pymerge._util.progress import progress_bar
from pymerge.align._costs import CostBuilder, check_init
from pymerge.align._solve import Solver, improves, score
from pymerge.align.result import AlignmentHistory, AlignmentResult
from pymerge.spec.apply import Permutation
from pymerge.spec.spec import PermutationSpec

__all__ = ["weight_matching", "matching_objective", "run_matching"]

Unit = tuple[str, str]


def weight_matching(
    spec: PermutationSpec,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    *,
    max_iter: int = 100,
    init: Mapping[str, Tensor] | AlignmentResult | None = None,
    seed: int = 0,
    greedy: bool = False,
    groups: Iterable[str] | None = None,
    tol: float | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    backend: str | None = None,
) -> AlignmentResult:
    """Permute ``state_b`` towards ``state_a`` by Git Re-Basin weight matching.

    Args:
        spec: permutation spec, validated against both state dicts.
        state_a: reference state dict (key -> Tensor), or a lazy one read from disk
            tensor by tensor (:func:`pymerge.io.open_checkpoint`); never modified.
        state_b: state dict to permute; same keys and shapes as ``state_a``; never modified.
        max_iter: maximum number of sweeps over all units (0: evaluate ``init`` only).
        init: warm start: a permutation (missing groups start at the identity) or a previous
            weight-matching :class:`AlignmentResult` (its assignment duals are reused too).
        seed: seeds the random unit order of every sweep (``torch.randperm`` on a
            ``torch.Generator``): same inputs and seed, same result. An int in [0, 2**63).
        greedy: make the first sweep (from the identity only) a greedy initialisation, not in
            the paper: units are visited most-determined-first (the one with the most weight
            entries whose other permuted axes are already fixed goes next) and each cost uses
            only the terms whose other axes are fixed, so no assignment is driven by the
            arbitrary identity of unvisited neighbours (on an MLP: a forward layer-by-layer
            pass). It is kept only if it beats the identity. On the random pairs of
            ``bench/bench_alignment.py`` it ends 4.1% higher on an MLP 40-512x3-10
            (J 121.15 vs 116.35, in a third of the time) and 0.07% higher on a ResNet-20x4
            (``bench/RESULTS.md``). Default False: Algorithm 1 exactly.
        groups: optimise only these groups (with the whole head structure of any of them);
            the others keep their ``init`` permutation. Default: all groups.
        tol: a unit counts as improved when its score rises by more than
            ``tol * max(1, |old score|)``; an assignment that does not improve keeps the old
            permutation. ``None``: 1e-12 in float64 arithmetic, 1e-7 in float32.
        dtype: arithmetic of the costs (``torch.float64`` or ``torch.float32``; ``None``:
            float64 if either state has float64 weights, else float32).
        progress: a progress bar over sweeps.
        backend: assignment backend (``"native"``, ``"numpy"``, or ``None`` for auto).

    Returns:
        :class:`AlignmentResult` with ``method="weight_matching"``: ``perm`` (group ->
        int64 CPU ``[n]``), ``history`` (``objective`` J after each sweep, ``seconds``,
        ``solves``, ``improved`` per sweep, ``initial_objective``), ``converged`` (the last
        sweep improved nothing) and ``extras["duals"]`` (the warm-start state).

    Raises:
        TypeError/ValueError naming the argument, key or group: mismatched state dicts, a
        spec that does not fit them, NaN/inf weights (the key and the groups it feeds), a
        bad ``init``, ``seed``, ``max_iter``, ``tol`` or ``dtype``.
    """
    max_iter = check_int(max_iter, "max_iter", minimum=0)
    seed = check_seed(seed)
    if dtype not in (None, torch.float64, torch.float32):
        raise ValueError(f"dtype must be torch.float64, torch.float32 or None, got {dtype}")
    if tol is not None and not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    t0 = time.perf_counter()
    costs = CostBuilder(spec, state_a, state_b, dtype)
    return run_matching(
        costs,
        max_iter=max_iter,
        init=init,
        seed=seed,
        greedy=greedy,
        groups=groups,
        tol=tol,
        progress=progress,
        backend=backend,
        started=t0,
    )


def run_matching(
    costs: CostBuilder,
    *,
    max_iter: int,
    init: Mapping[str, Tensor] | AlignmentResult | None,
    seed: int,
    greedy: bool,
    groups: Iterable[str] | None,
    tol: float | None,
    progress: bool,
    backend: str | None,
    started: float,
) -> AlignmentResult:
    """Algorithm 1 on a built :class:`CostBuilder` (in memory, streaming or sharded: the
    sharded builder of :mod:`pymerge.align.distributed` reduces its costs over the ranks,
    so every rank takes the same steps). Arguments as :func:`weight_matching`'s, checked."""
    t0 = started
    tol = tol if tol is not None else (1e-12 if costs.dtype == torch.float64 else 1e-7)
    duals = {}
    if isinstance(init, AlignmentResult):
        duals = dict(init.extras.get("duals", {}))
        init = init.perm
    perm = check_init(init or {}, costs)
    units = _units(costs, groups)
    solver = Solver(backend, duals)
    history = AlignmentHistory(initial_objective=costs.objective(perm))
    history.setup_seconds = time.perf_counter() - t0
    order_gen = torch.Generator().manual_seed(seed)
    converged = False
    with progress_bar(progress, total=max_iter, desc="weight matching", unit="sweep") as bar:
        for it in range(max_iter):
            t_it, solves0 = time.perf_counter(), solver.solves
            # every sweep draws its order (the greedy one too: same stream with or without)
            order = torch.randperm(len(units), generator=order_gen).tolist()
            if it == 0 and greedy and not init:
                improved, objective = _greedy_sweep(costs, units, perm, solver, history)
            else:
                improved, gain = _sweep(costs, [units[u] for u in order], perm, solver, tol)
                # J is linear in each unit, so a sweep gains the sum of its assignment gains
                objective = (
                    costs.objective(perm) if gain is None else (history.final_objective + gain)
                )
            history.record(
                objective,
                time.perf_counter() - t_it,
                solves=solver.solves - solves0,
                improved=improved,
            )
            bar.update(1)
            bar.set_postfix(objective=f"{objective:.6g}", improved=improved)
            if improved == 0 and not (it == 0 and greedy and not init):
                converged = True
                break
    if history.objective:
        history.objective[-1] = costs.objective(perm)  # the final value evaluated exactly
    return AlignmentResult(
        perm=perm,
        history=history,
        converged=converged,
        method="weight_matching",
        extras={"duals": solver.duals},
    )


def _sweep(
    costs: CostBuilder, units: list[Unit], perm: Permutation, solver: Solver, tol: float
) -> tuple[int, float | None]:
    """One coordinate-descent sweep over ``units`` in the given order. Returns the number of
    units improved and the objective gain (``None`` when the gain is not the sum of the
    assignment gains: a key carries an improved unit on two axes)."""
    improved, gain, exact = 0, 0.0, False
    for unit in units:
        unit_costs = costs.unit_costs(unit, perm)
        if not unit_costs:
            continue
        new = _assign(solver, costs, unit, unit_costs)
        old_score = sum(score(c, perm[g]) for g, c in unit_costs.items())
        new_score = sum(score(c, new[g]) for g, c in unit_costs.items())
        if all(torch.equal(new[g], perm[g]) for g in new) or not improves(
            new_score, old_score, tol
        ):
            continue
        _accept(costs, perm, new)
        improved += 1
        gain += new_score - old_score
        exact |= unit[1] in costs.nonlinear_units
    return improved, (None if exact else gain)


def _greedy_sweep(
    costs: CostBuilder,
    units: list[Unit],
    perm: Permutation,
    solver: Solver,
    history: AlignmentHistory,
) -> tuple[int, float]:
    """The optional greedy first sweep (see ``greedy``): most-determined unit first, partial
    costs, every assignment taken; undone if it ends below the identity's objective."""
    known: set[str] = set()
    allowed = set(units)
    changed = 0
    for u in costs.greedy_order():
        unit = costs.units[u]
        unit_costs = costs.unit_costs(unit, perm, known)
        known.update(costs.members(unit))
        if unit not in allowed or not unit_costs:
            continue
        new = _assign(solver, costs, unit, unit_costs, warm=False)
        if not all(torch.equal(new[g], perm[g]) for g in new):
            _accept(costs, perm, new)
            changed += 1
    objective = costs.objective(perm)
    if objective < history.initial_objective:  # it ignores couplings: never keep a loss
        for g in costs.groups:
            if not bool(torch.equal(perm[g], torch.arange(costs.sizes[g]))):
                _accept(costs, perm, {g: torch.arange(costs.sizes[g])})
        return 0, costs.objective(perm)
    return changed, objective


def _assign(
    solver: Solver,
    costs: CostBuilder,
    unit: Unit,
    unit_costs: Mapping[str, Tensor],
    *,
    warm: bool = True,
) -> dict[str, Tensor]:
    """The solve step: the best permutation of every group of ``unit`` for its cost."""
    kind, name = unit
    if kind == "group":
        return {name: solver.group(name, unit_costs[name], warm=warm)}
    return solver.heads(costs.heads[name], unit_costs)


def _accept(costs: CostBuilder, perm: Permutation, new: Mapping[str, Tensor]) -> None:
    for g, p in new.items():
        perm[g] = p
        costs.invalidate(g)


def _units(costs: CostBuilder, groups: Iterable[str] | None) -> list[Unit]:
    if groups is None:
        return list(costs.units)
    wanted = set([groups] if isinstance(groups, str) else groups)
    unknown = sorted(wanted - set(costs.groups))
    if unknown:
        raise ValueError(f"groups names {unknown[0]!r}, which is not a group of the spec")
    return [u for u in costs.units if wanted & set(costs.members(u))]


def matching_objective(
    spec: PermutationSpec,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    perm: Mapping[str, Tensor] | None = None,
) -> float:
    """J(perm) = Σ over keys (except ``spec.no_cost``) of ⟨A_w, perm(B)_w⟩, in float64
    (``perm=None``: the identity)."""
    costs = CostBuilder(spec, state_a, state_b, torch.float64)
    return costs.objective(check_init(perm or {}, costs))
