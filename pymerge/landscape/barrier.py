"""Linear mode connectivity: interpolation curves and loss/error barriers.

θ(λ) = (1−λ)θ_A + λθ_B is evaluated directly at every λ (never by accumulating steps),
endpoints included. Three barrier definitions are offered, by name:

* ``"rebasin"`` (Git Re-Basin, Ainsworth et al. 2022):
  max_λ L(θ(λ)) − ½(L(θ_A) + L(θ_B)).
* ``"entezari"`` (Entezari et al. 2022):
  sup_λ [L(θ(λ)) − ((1−λ)L(θ_A) + λL(θ_B))].
* ``"midpoint"``: L(θ(½)) − ½(L_A + L_B) (can be negative; needs λ=½ on the grid).

For accuracy-like metrics (higher is better) the same forms are taken on the error
1 − accuracy, see :func:`error_barrier`.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from torch import Tensor, nn

from pymerge._util.checks import check_state_pair
from pymerge._util.progress import progress_bar
from pymerge.ops.interpolate import permuted_interpolate
from pymerge.spec.apply import permutation_index_map
from pymerge.spec.spec import PermutationSpec

__all__ = [
    "Curve",
    "BarrierKind",
    "BARRIER_KINDS",
    "interpolation_curve",
    "barrier",
    "loss_barrier",
    "error_barrier",
]

BarrierKind = Literal["rebasin", "entezari", "midpoint"]
BARRIER_KINDS: tuple[str, ...] = ("rebasin", "entezari", "midpoint")

# the fused path computes this many interpolated states per read of A and B at most
_MAX_ALPHAS_PER_PASS = 8
# ... and never more than this many bytes of interpolated states at once
_PASS_BYTES = 1 << 30


@dataclass
class Curve:
    """Metrics along the linear path.

    ``lambdas``: float64 array ``[k]`` in [0, 1] (increasing, endpoints included);
    ``metrics``: name -> float64 array ``[k]`` (``"loss"`` when ``eval_fn`` returns a
    number). ``flags``: what to know before reading a barrier off the curve:
    ``flags["nonfinite"]`` maps each metric with NaN/inf values to the λ where they occur
    (the values are kept in the curve, never dropped).
    """

    lambdas: np.ndarray
    metrics: dict[str, np.ndarray] = field(default_factory=dict)
    flags: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.metrics[name]


def _lambda_grid(lambdas: int | Sequence[float] | Tensor | np.ndarray) -> np.ndarray:
    if isinstance(lambdas, (int, np.integer)) and not isinstance(lambdas, bool):
        if lambdas < 2:
            raise ValueError(f"lambdas must be >= 2 points (endpoints included), got {lambdas}")
        return np.linspace(0.0, 1.0, int(lambdas))
    grid = np.asarray(
        lambdas.detach().cpu().numpy() if isinstance(lambdas, Tensor) else lambdas,
        dtype=np.float64,
    ).reshape(-1)
    return _check_grid(grid, "lambdas")


def _check_grid(grid: np.ndarray, name: str) -> np.ndarray:
    if grid.size < 2:
        raise ValueError(f"{name} must hold >= 2 points, got {grid.size}")
    if not np.all(np.isfinite(grid)):
        raise ValueError(f"{name} must be finite")
    if np.any(np.diff(grid) <= 0):
        i = int(np.nonzero(np.diff(grid) <= 0)[0][0])
        raise ValueError(
            f"{name} must be strictly increasing, got {grid[i]} then {grid[i + 1]} "
            f"at positions {i} and {i + 1}"
        )
    if grid[0] != 0.0 or grid[-1] != 1.0:
        raise ValueError(f"{name} must start at 0 and end at 1, got {grid[0]} .. {grid[-1]}")
    return grid


def _as_metrics(value: object, lam: float) -> dict[str, float]:
    where = (
        f"eval_fn returned {{}} at λ={lam:g}; it must return a number or a mapping name -> number"
    )
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            out[str(k)] = _as_number(v, where, f"[{k!r}]")
        return out
    return {"loss": _as_number(value, where, "")}


def _as_number(v: object, where: str, item: str) -> float:
    if isinstance(v, Tensor):
        if v.numel() != 1:
            raise TypeError(where.format(f"{item} a tensor of shape {tuple(v.shape)}".strip()))
        return float(v.detach())
    if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool):
        return float(v)
    raise TypeError(where.format(f"{item} a {type(v).__name__}".strip()))


def _axes(
    spec: PermutationSpec | None,
    perm: Mapping[str, Tensor] | None,
    state_b: Mapping[str, Tensor],
) -> dict[str, tuple[tuple[int, Tensor], ...]]:
    if perm is None:
        return {}
    if spec is None:
        raise TypeError("perm needs spec= (the PermutationSpec it belongs to)")
    if not isinstance(spec, PermutationSpec):
        raise TypeError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
    return permutation_index_map(spec, perm, state_b)


def _chunks(grid: np.ndarray, state: Mapping[str, Tensor]) -> list[list[float]]:
    """λ values in passes of at most ``_MAX_ALPHAS_PER_PASS`` states and ``_PASS_BYTES``."""
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    per = max(1, min(_MAX_ALPHAS_PER_PASS, _PASS_BYTES // max(nbytes, 1)))
    lams = [float(x) for x in grid]
    return [lams[i : i + per] for i in range(0, len(lams), per)]


def interpolation_curve(
    model: nn.Module,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    eval_fn: Callable[[nn.Module], float | Mapping[str, float]],
    lambdas: int | Sequence[float] | Tensor | np.ndarray = 25,
    *,
    spec: PermutationSpec | None = None,
    perm: Mapping[str, Tensor] | None = None,
    prepare: Callable[[nn.Module], None] | None = None,
    progress: bool = False,
) -> Curve:
    """Evaluate ``eval_fn`` along θ(λ) = (1−λ)θ_A + λ·π(θ_B).

    θ(λ) is computed directly at every λ (never by accumulating steps) with the fused
    :func:`pymerge.ops.permuted_interpolate`: ``π(θ_B)`` is never built, and A and B are
    read once for several λ at a time. Endpoints are exact.

    Args:
        model: the architecture; a deep copy is loaded with each θ(λ) (``model`` itself is
            never touched).
        state_a, state_b: endpoint state dicts (same keys/shapes as ``model.state_dict()``).
        eval_fn: ``eval_fn(model) -> loss`` or a mapping such as
            ``{"loss": ..., "accuracy": ...}``; called once per λ, in order.
        lambdas: number of evenly spaced points in [0, 1] (default 25) or the points
            themselves (strictly increasing, from 0 to 1).
        spec, perm: interpolate towards ``apply_permutation(spec, perm, state_b)``
            (``perm=None``: towards ``state_b`` itself).
        prepare: optional ``prepare(model)`` run after loading θ(λ) and before ``eval_fn``
            (e.g. a BatchNorm statistics reset).
        progress: a progress bar over λ.

    Returns:
        One :class:`Curve` whatever the number of λ, with float64 arrays; NaN/inf values
        of a metric are kept and listed in ``curve.flags["nonfinite"]``.
    """
    grid = _lambda_grid(lambdas)
    if not callable(eval_fn):
        raise TypeError(f"eval_fn must be callable, got {type(eval_fn).__name__}")
    check_state_pair(state_a, state_b, "state_a", "state_b", same_dtype=True)
    axes = _axes(spec, perm, state_b)
    work = copy.deepcopy(model)
    values: dict[str, list[float]] = {}
    with progress_bar(progress, total=len(grid), desc="interpolation", unit="point") as bar:
        for lams in _chunks(grid, state_a):
            thetas = permuted_interpolate(state_a, state_b, lams, axes)
            for lam, theta in zip(lams, thetas, strict=True):
                work.load_state_dict(theta)
                if prepare is not None:
                    prepare(work)
                metrics = _as_metrics(eval_fn(work), lam)
                if values and set(metrics) != set(values):
                    raise ValueError(
                        f"eval_fn returned metrics {sorted(metrics)} at λ={lam:g} but "
                        f"{sorted(values)} before"
                    )
                for k, v in metrics.items():
                    values.setdefault(k, []).append(v)
                bar.update(1)
            del thetas
    metrics = {k: np.asarray(v, dtype=np.float64) for k, v in values.items()}
    return Curve(lambdas=grid, metrics=metrics, flags=_flags(grid, metrics))


def _flags(grid: np.ndarray, metrics: Mapping[str, np.ndarray]) -> dict[str, Any]:
    bad = {k: grid[~np.isfinite(v)].tolist() for k, v in metrics.items()}
    bad = {k: v for k, v in bad.items() if v}
    return {"nonfinite": bad} if bad else {}


def barrier(
    values: Sequence[float] | np.ndarray,
    lambdas: Sequence[float] | np.ndarray,
    kind: BarrierKind = "rebasin",
) -> float:
    """Barrier of a lower-is-better metric sampled at ``lambdas`` (first 0, last 1).

    ``kind``: ``"rebasin"`` max_λ v(λ) − ½(v_0 + v_1); ``"entezari"``
    max_λ [v(λ) − ((1−λ)v_0 + λv_1)]; ``"midpoint"`` v(½) − ½(v_0 + v_1).
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    lam = np.asarray(lambdas, dtype=np.float64).reshape(-1)
    if v.shape != lam.shape:
        raise ValueError(f"values has {v.size} points but lambdas has {lam.size}")
    _check_grid(lam, "lambdas")
    if not np.all(np.isfinite(v)):
        where = ", ".join(f"{x:g}" for x in lam[~np.isfinite(v)])
        warnings.warn(
            f"the curve has non-finite values at λ = {where}: the barrier is not finite",
            RuntimeWarning,
            stacklevel=2,
        )
        return math.nan
    v0, v1 = v[0], v[-1]
    if kind == "rebasin":
        return float(v.max() - 0.5 * (v0 + v1))
    if kind == "entezari":
        return float(np.max(v - ((1.0 - lam) * v0 + lam * v1)))
    if kind == "midpoint":
        hit = np.nonzero(np.isclose(lam, 0.5, rtol=0.0, atol=1e-12))[0]
        if hit.size == 0:
            raise ValueError(
                "kind='midpoint' needs λ=0.5 on the grid (use an odd number of points)"
            )
        return float(v[hit[0]] - 0.5 * (v0 + v1))
    raise ValueError(f"kind must be one of {BARRIER_KINDS}, got {kind!r}")


def loss_barrier(curve: Curve, kind: BarrierKind = "rebasin", metric: str = "loss") -> float:
    """Barrier (see :func:`barrier`) of the lower-is-better ``metric`` of ``curve``."""
    if metric not in curve.metrics:
        raise ValueError(f"curve has no metric {metric!r}; it has {sorted(curve.metrics)}")
    return barrier(curve.metrics[metric], curve.lambdas, kind)


def error_barrier(curve: Curve, kind: BarrierKind = "rebasin", metric: str = "accuracy") -> float:
    """Barrier of the error 1 − ``metric`` (``metric`` an accuracy in [0, 1])."""
    if metric not in curve.metrics:
        raise ValueError(f"curve has no metric {metric!r}; it has {sorted(curve.metrics)}")
    return barrier(1.0 - curve.metrics[metric], curve.lambdas, kind)
