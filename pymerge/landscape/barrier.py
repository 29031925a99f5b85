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
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from pymerge._util.checks import check_state_pair
from pymerge._util.progress import progress_bar
from pymerge.ops.interpolate import permuted_interpolate
from pymerge.spec.apply import permutation_index_map
from pymerge.spec.spec import PermutationSpec

__all__ = [
    "Curve",
    "MultiBarrier",
    "multi_model_barrier",
    "BarrierKind",
    "BARRIER_KINDS",
    "interpolation_curve",
    "barrier",
    "loss_barrier",
    "error_barrier",
]

BarrierKind = Literal["rebasin", "entezari", "midpoint"]
BARRIER_KINDS: tuple[str, ...] = ("rebasin", "entezari", "midpoint")

# "auto" evaluates several λ per vmapped call on these device types only: on this project's
# CPU the batched forward was slower in every case measured (bench/bench_curve.py, 1.07-6x
# per point for MLPs and CNNs), so CPU curves take one λ at a time. On CUDA it times the
# first points both ways and keeps the faster ("measure").
_BATCH_DEVICES = ("cuda",)
_DEFAULT_LAMBDA_BATCH = 8
# the batched path holds at most this many bytes of stacked parameters at once
_PASS_BYTES = 1 << 30
# CPU curves gather π(B) once into a scratch state of at most this size (else per point)
_GATHER_ONCE_MAX_BYTES = 1 << 30


@dataclass
class Curve:
    """Metrics along the linear path.

    ``lambdas``: float64 array ``[k]`` in [0, 1] (increasing, endpoints included);
    ``metrics``: name -> float64 array ``[k]`` (``"loss"`` when ``eval_fn`` returns a
    number). ``flags``: what to know before reading a barrier off the curve:
    ``flags["nonfinite"]`` maps each metric with NaN/inf values to the λ where they occur
    (the values are kept in the curve, never dropped). ``info``: how the curve was computed
    (``"mode"``: ``"loop"`` or ``"batched"``, ``"lambda_batch"``, and for a measured choice
    the seconds per point of each way).
    """

    lambdas: np.ndarray
    metrics: dict[str, np.ndarray] = field(default_factory=dict)
    flags: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

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


PrepareFn = Callable[[nn.Module], Any]
PREPARE_KINDS = ("reset_bn", "repair")


def _target(work: nn.Module, state_a: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The work model's own tensors (``state_dict(keep_vars=True)``) under the keys of
    ``state_a``, checked as ``load_state_dict(strict=True)`` would check them."""
    own = work.state_dict(keep_vars=True)
    if own.keys() != state_a.keys():
        missing = [k for k in own if k not in state_a]
        extra = [k for k in state_a if k not in own]
        if missing:
            raise ValueError(f"state_a lacks the model's key {missing[0]!r}")
        raise ValueError(f"state_a has key {extra[0]!r}, which the model does not have")
    for k, t in own.items():
        if t.shape != state_a[k].shape:
            raise ValueError(
                f"state_a[{k!r}] has shape {tuple(state_a[k].shape)}, the model's is "
                f"{tuple(t.shape)}"
            )
    return {k: own[k] for k in state_a}


class _Loader:
    """Writes θ(λ) = (1−λ)A + λ·π(B) straight into a work model's parameters and buffers
    (:func:`permuted_interpolate` with ``out=``: no new tensors per point, no
    ``load_state_dict`` copy).

    ``gather_once``: gather π(B) once into a scratch state (the fused op at α=1 against
    zeros: exact, NaN/inf included, up to the sign of a zero) and make every point a plain
    lerp; otherwise π(B) is never built and every point gathers B while reading it. On
    CPU the gather costs about as much as the rest of a plain lerp (a scalar indexed load
    per element of a permuted column), so once for the curve beats once per point."""

    def __init__(self, work, state_a, state_b, axes, *, gather_once: bool):
        self.work, self.a = work, state_a
        _target(work, state_a)  # fail early, naming the key
        self.state_b, self.axes_b = state_b, axes
        self._pb = None
        if axes and gather_once:
            self.b, self.axes = self.end_b(), {}
            self.gathered = True
        else:
            self.b, self.axes = state_b, axes
            self.gathered = False

    def end_b(self) -> dict[str, Tensor]:
        """π(B) exactly (the fused op at α=1 against zeros: 0·0 + 1·π(B), NaN/inf kept)."""
        if self._pb is None:
            if not self.axes_b:
                self._pb = dict(self.state_b)
            else:
                zeros = {k: torch.zeros_like(v) for k, v in self.a.items()}
                self._pb = permuted_interpolate(zeros, self.state_b, 1.0, self.axes_b)
        return self._pb

    def _write(self, lam: float, target: Mapping[str, Tensor]) -> None:
        if lam == 0.0 or lam == 1.0:  # the endpoints exactly, whatever the other one holds
            src = self.a if lam == 0.0 else self.end_b()
            with torch.no_grad():
                for k, t in target.items():
                    t.copy_(src[k])
        else:
            permuted_interpolate(self.a, self.b, lam, self.axes, out=target)

    def load(self, lam: float) -> nn.Module:
        # the tensors are looked up every time: a prepare step may have replaced some
        self._write(lam, self.work.state_dict(keep_vars=True))
        return self.work

    def states(self, lams: list[float], stacked: dict[str, Tensor]) -> None:
        """θ(λ_m) for each λ_m into row m of ``stacked`` (name -> [M, *shape])."""
        # non-floating entries (shared across λ: A's values) go to throwaway copies
        rest = {k: v.clone() for k, v in self.a.items() if k not in stacked}
        rows = [{**rest, **{k: v[m] for k, v in stacked.items()}} for m in range(len(lams))]
        inner = [m for m, lam in enumerate(lams) if lam not in (0.0, 1.0)]
        if inner:
            permuted_interpolate(
                self.a, self.b, [lams[m] for m in inner], self.axes, out=[rows[m] for m in inner]
            )
        for m, lam in enumerate(lams):
            if lam in (0.0, 1.0):
                self._write(lam, rows[m])


def _gather_once(state_a: Mapping[str, Tensor], axes, points: int) -> bool:
    """Whether to gather π(B) once for the curve: CPU tensors, a permutation to apply, at
    least two points, and a scratch copy of at most ``_GATHER_ONCE_MAX_BYTES``."""
    if not axes or points < 2:
        return False
    nbytes = 0
    for t in state_a.values():
        if t.device.type != "cpu":
            return False
        nbytes += t.numel() * t.element_size()
    return nbytes <= _GATHER_ONCE_MAX_BYTES


def _check_prepare(prepare, prepare_batches):
    if prepare is None or callable(prepare):
        return
    if isinstance(prepare, str):
        if prepare not in PREPARE_KINDS:
            raise ValueError(
                f"prepare must be a callable or one of {PREPARE_KINDS}, got {prepare!r}"
            )
        if prepare_batches is None:
            raise ValueError(f"prepare={prepare!r} needs prepare_batches= (training data)")
        return
    raise TypeError(f"prepare must be a callable or a string, got {type(prepare).__name__}")


def _preparer(prepare, prepare_batches, model, loader: _Loader | None):
    """``fn(work, lam) -> module to evaluate`` for ``prepare``."""
    if prepare is None:
        return lambda work, lam: work
    if callable(prepare):

        def run(work, lam):
            prepare(work)
            return work

        return run
    from pymerge.align.repair import repair, reset_bn_stats

    batches = list(prepare_batches) if not isinstance(prepare_batches, list) else prepare_batches
    if not batches:
        raise ValueError("prepare_batches is empty: resetting statistics needs data")
    if prepare == "reset_bn":
        return lambda work, lam: reset_bn_stats(work, batches, inplace=True)
    # REPAIR: the endpoints A and π(B) as models, built once
    ends = []
    for lam in (0.0, 1.0):
        m = copy.deepcopy(model)
        permuted_interpolate(loader.a, loader.b, lam, loader.axes, out=m.state_dict(keep_vars=True))
        ends.append(m)
    return lambda work, lam: repair(ends[0], ends[1], work, batches, alpha=lam)


def _lambda_batch(lambda_batch, eval_fn, prepare, model) -> tuple[str, int]:
    """``(mode, M)``: ``"loop"``, ``"batched"`` or ``"measure"`` and the λ per vmapped call."""
    from pymerge.landscape.evaluate import Evaluator

    if lambda_batch is None or lambda_batch is False:
        return "loop", 1
    if isinstance(lambda_batch, str):
        if lambda_batch not in ("auto", "measure"):
            raise ValueError(
                f"lambda_batch must be 'auto', 'measure', an int >= 1 or None, got {lambda_batch!r}"
            )
    elif isinstance(lambda_batch, (int, np.integer)) and not isinstance(lambda_batch, bool):
        if lambda_batch < 1:
            raise ValueError(f"lambda_batch must be >= 1, got {lambda_batch}")
    else:
        raise TypeError(
            "lambda_batch must be 'auto', 'measure', an int or None, got "
            f"{type(lambda_batch).__name__}"
        )
    batchable = isinstance(eval_fn, Evaluator) and prepare is None
    if lambda_batch == "auto":
        dev = next((p.device.type for p in model.parameters()), "cpu")
        if not batchable or dev not in _BATCH_DEVICES:
            return "loop", 1
        return "measure", _DEFAULT_LAMBDA_BATCH
    if not batchable:
        if lambda_batch == 1:
            return "loop", 1
        raise ValueError(
            "lambda_batch > 1 evaluates several λ in one vmapped call: it needs eval_fn to be "
            "a pymerge.landscape.Evaluator (which holds the data) and prepare=None"
        )
    if lambda_batch == "measure":
        return "measure", _DEFAULT_LAMBDA_BATCH
    return ("loop", 1) if lambda_batch == 1 else ("batched", int(lambda_batch))


def interpolation_curve(
    model: nn.Module,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    eval_fn: Callable[[nn.Module], float | Mapping[str, float]],
    lambdas: int | Sequence[float] | Tensor | np.ndarray = 25,
    *,
    spec: PermutationSpec | None = None,
    perm: Mapping[str, Tensor] | None = None,
    prepare: PrepareFn | str | None = None,
    prepare_batches: Iterable[Any] | None = None,
    lambda_batch: int | str | None = "auto",
    progress: bool = False,
) -> Curve:
    """Evaluate ``eval_fn`` along θ(λ) = (1−λ)θ_A + λ·π(θ_B).

    θ(λ) is computed directly at every λ (never by accumulating steps) with the fused
    :func:`pymerge.ops.permuted_interpolate`, written straight into the parameters and
    buffers of a work copy of ``model``: nothing is allocated per point and there is no
    ``load_state_dict`` copy. Endpoints are exact. On CPU, π(θ_B) is gathered once into a
    scratch state (when it is at most 1 GiB): the gather of permuted columns costs about as
    much as the rest of a lerp, so paying it once beats paying it per point; on other
    devices, or above 1 GiB, π(θ_B) is never built (B is gathered while it is read).

    Args:
        model: the architecture; a deep copy receives each θ(λ) (``model`` itself is never
            touched). Its state-dict keys and shapes must be those of ``state_a``.
        state_a, state_b: endpoint state dicts (same keys, shapes and dtypes).
        eval_fn: ``eval_fn(model) -> loss`` or a mapping such as
            ``{"loss": ..., "accuracy": ...}``; called once per λ, in order. An
            :class:`pymerge.landscape.Evaluator` (data + loss) also allows batched points.
        lambdas: number of evenly spaced points in [0, 1] (default 25) or the points
            themselves (strictly increasing, from 0 to 1).
        spec, perm: interpolate towards ``apply_permutation(spec, perm, state_b)``
            (``perm=None``: towards ``state_b`` itself).
        prepare: run at every point after θ(λ) is loaded and before ``eval_fn``: a callable
            ``prepare(model)`` (e.g. your own BatchNorm recalibration), ``"reset_bn"``
            (:func:`pymerge.align.reset_bn_stats` on ``prepare_batches``) or ``"repair"``
            (:func:`pymerge.align.repair` at ``alpha=λ`` between A and π(B), on
            ``prepare_batches``; it measures both endpoints at every point).
        prepare_batches: training batches for ``"reset_bn"`` / ``"repair"``.
        lambda_batch: how many λ one forward evaluates. ``"auto"`` (default): one at a time
            on CPU (where the batched forward measured slower in every case of
            ``bench/bench_curve.py``), ``"measure"`` on CUDA. ``"measure"``: time the
            first point alone and the next 8 in one vmapped call, keep the faster way for
            the rest. An int M >= 2: M λ per ``torch.func.vmap`` call over
            ``functional_call`` (needs an ``Evaluator`` and ``prepare=None``); 1 or None:
            one at a time. A model that vmap cannot batch falls back to one at a time
            (``curve.info["fallback"]`` says why).
        progress: a progress bar over λ.

    Returns:
        One :class:`Curve` whatever the number of λ, with float64 arrays; NaN/inf values
        of a metric are kept and listed in ``curve.flags["nonfinite"]``.
    """
    grid = _lambda_grid(lambdas)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not callable(eval_fn):
        raise TypeError(f"eval_fn must be callable, got {type(eval_fn).__name__}")
    _check_prepare(prepare, prepare_batches)
    check_state_pair(state_a, state_b, "state_a", "state_b", same_dtype=True)
    axes = _axes(spec, perm, state_b)
    mode, per = _lambda_batch(lambda_batch, eval_fn, prepare, model)
    work = copy.deepcopy(model)
    loader = _Loader(
        work, state_a, state_b, axes, gather_once=_gather_once(state_a, axes, len(grid))
    )
    prep = _preparer(prepare, prepare_batches, model, loader)
    lams = [float(x) for x in grid]
    rec = _Recorder()
    info: dict[str, Any] = {"mode": "loop", "lambda_batch": 1, "gather_once": loader.gathered}
    with progress_bar(progress, total=len(lams), desc="interpolation", unit="point") as bar:
        i = 0
        if mode == "measure":
            t0 = time.perf_counter()
            rec.add(lams[0], eval_fn(prep(loader.load(lams[0]), lams[0])))
            t_loop = time.perf_counter() - t0
            bar.update(1)
            i = 1
            chunk = lams[i : i + per]
            t0 = time.perf_counter()
            got = _batched(work, loader, eval_fn, chunk, info)
            if got is not None:
                t_batch = (time.perf_counter() - t0) / len(chunk)
                for lam, m in zip(chunk, got, strict=True):
                    rec.add(lam, m)
                bar.update(len(chunk))
                i += len(chunk)
                info["seconds_per_point"] = {"loop": t_loop, "batched": t_batch}
                mode = "batched" if t_batch < t_loop else "loop"
            else:
                mode = "loop"
        if mode == "batched":
            info.update(mode="batched", lambda_batch=per)
            while i < len(lams):
                chunk = lams[i : i + per]
                got = _batched(work, loader, eval_fn, chunk, info)
                if got is None:
                    info.update(mode="loop", lambda_batch=1)
                    break
                for lam, m in zip(chunk, got, strict=True):
                    rec.add(lam, m)
                bar.update(len(chunk))
                i += len(chunk)
        for lam in lams[i:]:
            rec.add(lam, eval_fn(prep(loader.load(lam), lam)))
            bar.update(1)
    metrics = rec.arrays()
    return Curve(lambdas=grid, metrics=metrics, flags=_flags(grid, metrics), info=info)


class _Recorder:
    """Metric values in λ order, checked for a consistent set of names."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}

    def add(self, lam: float, value: object) -> None:
        metrics = _as_metrics(value, lam)
        if self.values and set(metrics) != set(self.values):
            raise ValueError(
                f"eval_fn returned metrics {sorted(metrics)} at λ={lam:g} but "
                f"{sorted(self.values)} before"
            )
        for k, v in metrics.items():
            self.values.setdefault(k, []).append(v)

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(v, dtype=np.float64) for k, v in self.values.items()}


def _batched(work, loader: _Loader, evaluator, lams: list[float], info: dict) -> list | None:
    """Metrics at ``lams`` from one vmapped forward per batch; ``None`` (and
    ``info["fallback"]``) when vmap cannot batch this model or the pass would not fit."""
    own = {k: v.detach() for k, v in work.state_dict(keep_vars=True).items()}
    nbytes = len(lams) * sum(t.numel() * t.element_size() for t in own.values())
    if nbytes > _PASS_BYTES:
        info["fallback"] = f"{len(lams)} stacked states need {nbytes} bytes (> {_PASS_BYTES})"
        return None
    floating = {k for k, v in loader.a.items() if v.is_floating_point()}
    stacked = {
        k: torch.empty((len(lams), *own[k].shape), dtype=own[k].dtype, device=own[k].device)
        for k in floating
    }
    loader.states(lams, stacked)
    params = {k: stacked[k] if k in floating else own[k] for k in own}
    in_dims = {k: 0 if k in floating else None for k in own}
    try:
        return evaluator.batched(work, params, in_dims=in_dims)
    except (RuntimeError, NotImplementedError, ValueError) as e:
        info["fallback"] = f"vmap could not batch the model: {type(e).__name__}: {e}"[:300]
        return None


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


# --------------------------------------------------------------------------- K models

_HIGHER_IS_BETTER = ("accuracy", "acc", "top1", "top5")


@dataclass
class MultiBarrier:
    """The barrier of the mean of K (aligned) models against their mean metric.

    ``merged``: metrics of θ̄ = Σ_k w_k π_k(θ_k); ``endpoints``: metrics of each model;
    ``barriers``: per metric, ``merged − Σ_k w_k endpoint`` for lower-is-better metrics
    (e.g. ``"loss"``) and, for accuracy-like ones (``"accuracy"``), the error barrier
    ``Σ_k w_k acc_k − acc(θ̄)`` under the name ``"error"``. For K = 2 and equal weights
    this is the midpoint barrier of the curve between the two.
    """

    merged: dict[str, float]
    endpoints: list[dict[str, float]]
    weights: list[float]
    barriers: dict[str, float]


def multi_model_barrier(
    model: nn.Module,
    states: Sequence[Mapping[str, Tensor]],
    eval_fn: Callable[[nn.Module], float | Mapping[str, float]],
    *,
    spec: PermutationSpec | None = None,
    perms: Sequence[Mapping[str, Tensor] | None] | None = None,
    weights: Sequence[float] | None = None,
    prepare: PrepareFn | str | None = None,
    prepare_batches: Iterable[Any] | None = None,
) -> MultiBarrier:
    """K-model form of the loss barrier: evaluate the mean θ̄ = Σ_k w_k π_k(θ_k) of K models
    against the (weighted) mean of their own metrics.

    Args:
        model: the architecture (a deep copy is loaded; ``model`` is never touched).
        states: K >= 2 state dicts.
        eval_fn: as for :func:`interpolation_curve` (an :class:`Evaluator` works).
        spec, perms: align model k with ``perms[k]`` (a permutation of ``spec`` mapping it
            onto the anchor, e.g. ``align_to_anchor(spec, states).perms``; ``None`` entries:
            as it is). ``perms=None``: no alignment.
        weights: K weights summing to 1 (default: 1/K each).
        prepare, prepare_batches: as for :func:`interpolation_curve`, applied to the merged
            model only (``"repair"`` is not defined for K models: use ``"reset_bn"``).

    Returns:
        A :class:`MultiBarrier`. Non-finite values are kept; a warning names them.
    """
    from pymerge.ops.interpolate import interpolate
    from pymerge.spec.apply import apply_permutation

    if isinstance(states, Mapping) or not isinstance(states, Sequence):
        raise TypeError("states must be a sequence of K >= 2 state dicts")
    states = list(states)
    K = len(states)
    if K < 2:
        raise ValueError(f"multi_model_barrier needs K >= 2 state dicts, got {K}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not callable(eval_fn):
        raise TypeError(f"eval_fn must be callable, got {type(eval_fn).__name__}")
    if prepare == "repair":
        raise ValueError("prepare='repair' is defined for two endpoints; use 'reset_bn' here")
    _check_prepare(prepare, prepare_batches)
    for k in range(1, K):
        check_state_pair(states[0], states[k], "states[0]", f"states[{k}]", same_dtype=True)
    if weights is None:
        w = [1.0 / K] * K
    else:
        w = [float(x) for x in weights]
        if len(w) != K:
            raise ValueError(f"got {len(w)} weights for {K} state dicts")
        if not all(math.isfinite(x) for x in w) or abs(sum(w) - 1.0) > 1e-6:
            raise ValueError(f"weights must be finite and sum to 1, got {w}")
    if perms is not None:
        if spec is None:
            raise TypeError("perms needs spec= (the PermutationSpec they belong to)")
        if not isinstance(spec, PermutationSpec):
            raise TypeError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
        if len(perms) != K:
            raise ValueError(f"got {len(perms)} permutations for {K} state dicts")
        aligned = [
            s if p is None else apply_permutation(spec, p, s)
            for s, p in zip(states, perms, strict=True)
        ]
    else:
        aligned = states
    work = copy.deepcopy(model)
    _target(work, states[0])  # keys and shapes of the model, named on mismatch

    def evaluate(state, lam, prep) -> dict[str, float]:
        work.load_state_dict(state)
        m = work if prep is None else prep(work, lam)
        return _as_metrics(eval_fn(m), lam)

    ends = [evaluate(s, 0.0, None) for s in states]
    prep = None if prepare is None else _preparer(prepare, prepare_batches, model, None)
    merged = evaluate(interpolate(aligned, w), 0.5, prep)
    names = set(merged)
    for k, e in enumerate(ends):
        if set(e) != names:
            raise ValueError(
                f"eval_fn returned metrics {sorted(e)} for states[{k}] but {sorted(names)} "
                "for the mean"
            )
    barriers: dict[str, float] = {}
    for name in merged:
        mean_end = sum(wk * e[name] for wk, e in zip(w, ends, strict=True))
        if name.lower() in _HIGHER_IS_BETTER:
            barriers["error"] = mean_end - merged[name]
        else:
            barriers[name] = merged[name] - mean_end
    bad = [k for k, v in barriers.items() if not math.isfinite(v)]
    if bad:
        warnings.warn(
            f"non-finite barrier for {bad}: a model's metric is NaN or inf",
            RuntimeWarning,
            stacklevel=2,
        )
    return MultiBarrier(merged=merged, endpoints=ends, weights=w, barriers=barriers)
