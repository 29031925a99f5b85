"""What every alignment function returns: one result type per family.

* :class:`AlignmentResult`: one permutation that maps model B onto model A
  (:func:`~pymerge.align.weight_matching`, :func:`~pymerge.align.activation_matching`,
  :func:`~pymerge.align.ste_matching`).
* :class:`MultiAlignmentResult`: one permutation per model, all into a common basis
  (:func:`~pymerge.align.align_to_anchor`, :func:`~pymerge.align.merge_many`).

Both carry an :class:`AlignmentHistory` (objective and wall time per iteration), whether the
method converged, the method's name, and method-specific ``extras`` (documented by each
function).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pymerge.spec.apply import Permutation

__all__ = ["AlignmentHistory", "AlignmentResult", "MultiAlignmentResult"]


@dataclass
class AlignmentHistory:
    """Per-iteration record of an alignment run.

    ``objective[i]`` is the method's objective after iteration ``i`` (``initial_objective``
    before the first): the weight-matching sum ⟨W_A, π(W_B)⟩ (higher is better), the
    summed matched correlation for activation matching, the midpoint loss for STE (lower is
    better), the summed squared distance to the mean for MergeMany (lower is better).
    ``seconds[i]`` is the wall time of iteration ``i``; ``setup_seconds`` what came before
    the first. ``solves[i]`` counts the assignment problems solved in iteration ``i`` and
    ``improved[i]`` the groups (or head structures, or models) whose permutation changed
    for the better (empty where a method has no such notion). ``series`` holds further
    per-iteration series named by the method.
    """

    objective: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    initial_objective: float = math.nan
    setup_seconds: float = 0.0
    solves: list[int] = field(default_factory=list)
    improved: list[int] = field(default_factory=list)
    series: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def iterations(self) -> int:
        """Iterations run (sweeps, steps or solves, by method)."""
        return len(self.objective)

    @property
    def total_solves(self) -> int:
        return int(sum(self.solves))

    @property
    def total_seconds(self) -> float:
        return float(self.setup_seconds + sum(self.seconds))

    @property
    def final_objective(self) -> float:
        """The last objective (``initial_objective`` when no iteration ran)."""
        return self.objective[-1] if self.objective else self.initial_objective

    def record(
        self,
        objective: float,
        seconds: float,
        *,
        solves: int | None = None,
        improved: int | None = None,
        **series: Any,
    ) -> None:
        """Append one iteration."""
        self.objective.append(float(objective))
        self.seconds.append(float(seconds))
        if solves is not None:
            self.solves.append(int(solves))
        if improved is not None:
            self.improved.append(int(improved))
        for name, value in series.items():
            self.series.setdefault(name, []).append(value)

    def __getattr__(self, name: str) -> list[Any]:
        # a named series reads like a field: ``history.loss`` for ``series["loss"]``
        series = self.__dict__.get("series")
        if series is not None and name in series:
            return series[name]
        raise AttributeError(f"{type(self).__name__!r} has no attribute or series {name!r}")


@dataclass
class AlignmentResult:
    """Result of aligning model B to model A.

    ``perm``: group -> int64 CPU index tensor ``[n]``; ``apply_permutation(spec, perm,
    state_b)`` computes the same function as B and looks like A. ``converged``: the method
    stopped because nothing improved (not because it ran out of iterations). ``method``:
    ``"weight_matching"``, ``"activation_matching"`` or ``"ste"``. ``extras``: what else the
    method found (see each function's docstring). Passing a weight-matching result as
    ``init=`` to :func:`~pymerge.align.weight_matching` reuses its assignment duals too.
    """

    perm: Permutation
    history: AlignmentHistory
    converged: bool
    method: str
    extras: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def objective(self) -> float:
        """The final objective (see :class:`AlignmentHistory`)."""
        return self.history.final_objective


@dataclass
class MultiAlignmentResult:
    """Result of aligning K models into one common basis.

    ``perms[i]`` maps model ``i`` into the common basis (``apply_permutation(spec,
    perms[i], states[i])``); the reference model's entry is the identity. ``method``:
    ``"anchor"`` or ``"merge_many"``. ``extras`` as documented by each function; the
    weighted average of the aligned models is
    ``pymerge.interpolate([apply_permutation(spec, p, s) ...], weights)``.
    """

    perms: list[Permutation]
    history: AlignmentHistory
    converged: bool
    method: str
    extras: dict[str, Any] = field(default_factory=dict, repr=False)
