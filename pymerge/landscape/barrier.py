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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from pymerge._util.checks import check_state_pair

__all__ = [
    "Curve",
    "BarrierKind",
    "BARRIER_KINDS",
    "interpolate_state",
    "interpolation_curve",
    "barrier",
    "loss_barrier",
    "error_barrier",
]

BarrierKind = Literal["rebasin", "entezari", "midpoint"]
BARRIER_KINDS: tuple[str, ...] = ("rebasin", "entezari", "midpoint")


@dataclass
class Curve:
    """Metrics along the linear path.

    ``lambdas``: float64 array [k] in [0, 1] (sorted, endpoints included);
    ``metrics``: name -> float64 array [k] (``"loss"`` when ``eval_fn`` returns a number).
    """

    lambdas: np.ndarray
    metrics: dict[str, np.ndarray] = field(default_factory=dict)

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
    if grid.size < 2:
        raise ValueError(f"lambdas must hold >= 2 points, got {grid.size}")
    if not np.all(np.isfinite(grid)):
        raise ValueError("lambdas must be finite")
    if np.any(np.diff(grid) <= 0):
        raise ValueError("lambdas must be strictly increasing")
    if grid[0] != 0.0 or grid[-1] != 1.0:
        raise ValueError(f"lambdas must start at 0 and end at 1, got {grid[0]} .. {grid[-1]}")
    return grid


def interpolate_state(
    state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor], lam: float
) -> dict[str, Tensor]:
    """θ(λ) = (1−λ)θ_A + λθ_B for floating tensors (exact at λ=0 and 1); others from A.

    Uses :func:`pymerge.ops.interpolate` (fused, Triton on GPU) when dtypes and devices
    agree, else ``torch.lerp`` in A's dtype. Returns a new dict; the inputs are not
    modified. Keys and shapes must agree (ValueError naming the key).
    """
    check_state_pair(state_a, state_b, "state_a", "state_b")
    lam = float(lam)
    if lam in (0.0, 1.0):  # exact endpoints
        src = state_a if lam == 0.0 else state_b
        return {
            k: (src[k].detach().to(a.dtype) if torch.is_floating_point(a) else a.detach()).clone()
            for k, a in state_a.items()
        }
    same = all(
        a.dtype == state_b[k].dtype and a.device == state_b[k].device for k, a in state_a.items()
    )
    if same:  # the fused weighted sum (Triton on GPU, torch otherwise)
        from pymerge.ops.interpolate import interpolate

        return interpolate([state_a, state_b], [1.0 - lam, lam])
    out: dict[str, Tensor] = {}
    for k, a in state_a.items():
        if torch.is_floating_point(a):
            out[k] = torch.lerp(a.detach(), state_b[k].detach().to(a), lam)
        else:
            out[k] = a.detach().clone()
    return out


def _as_metrics(value: object) -> dict[str, float]:
    if isinstance(value, Mapping):
        return {str(k): float(v) for k, v in value.items()}
    if isinstance(value, Tensor):
        return {"loss": float(value.detach())}
    if isinstance(value, (int, float, np.floating, np.integer)):
        return {"loss": float(value)}
    raise TypeError(
        f"eval_fn must return a number or a mapping name -> number, got {type(value).__name__}"
    )


def interpolation_curve(
    model: nn.Module,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    eval_fn: Callable[[nn.Module], float | Mapping[str, float]],
    lambdas: int | Sequence[float] | Tensor | np.ndarray = 25,
    *,
    prepare: Callable[[nn.Module], None] | None = None,
    progress: bool = False,
) -> Curve:
    """Evaluate ``eval_fn`` along θ(λ) = (1−λ)θ_A + λθ_B.

    Args:
        model: architecture; a deep copy is loaded with θ(λ) (``model`` is untouched).
        state_a, state_b: endpoint state dicts (same keys/shapes as ``model.state_dict()``).
        eval_fn: ``eval_fn(model) -> loss`` or a mapping such as
            ``{"loss": ..., "accuracy": ...}``; called once per λ.
        lambdas: number of evenly spaced points in [0, 1] (default 25) or the points
            themselves (increasing, from 0 to 1).
        prepare: optional ``prepare(model)`` run after loading θ(λ) and before ``eval_fn``
            (e.g. BatchNorm statistics reset).
        progress: tqdm bar over λ.

    Returns:
        :class:`Curve` with float64 arrays.
    """
    grid = _lambda_grid(lambdas)
    work = copy.deepcopy(model)
    values: dict[str, list[float]] = {}
    it = grid
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(grid, desc="interpolation", unit="point")
    for lam in it:
        theta = interpolate_state(state_a, state_b, float(lam))
        work.load_state_dict(theta)
        if prepare is not None:
            prepare(work)
        metrics = _as_metrics(eval_fn(work))
        if values and set(metrics) != set(values):
            raise ValueError(
                f"eval_fn returned metrics {sorted(metrics)} at λ={lam} but {sorted(values)} before"
            )
        for k, v in metrics.items():
            values.setdefault(k, []).append(v)
    return Curve(
        lambdas=grid, metrics={k: np.asarray(v, dtype=np.float64) for k, v in values.items()}
    )


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
    if lam.size < 2 or lam[0] != 0.0 or lam[-1] != 1.0:
        raise ValueError("lambdas must start at 0 and end at 1")
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
