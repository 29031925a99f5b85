"""Curved low-loss paths between two modes (Garipov et al. 2018; Draxler et al. 2018).

Two minima that a straight line joins over a loss barrier are often joined by a simple curve
with (almost) none. :func:`connect` trains the bend θ_C of

* ``kind="bezier"``: the quadratic Bézier curve φ(t) = (1−t)²θ_A + 2t(1−t)θ_C + t²θ_B, or
* ``kind="polychain"``: the polygonal chain θ_A → θ_C → θ_B (φ(t) = θ_A + 2t(θ_C − θ_A) for
  t ≤ ½, θ_C + (2t − 1)(θ_B − θ_C) after),

by minimising E_{t∼U(0,1)} L(φ(t)) with stochastic gradients: each step draws one t and one
batch. θ_C starts at the midpoint ½(θ_A + θ_B) (the linear path). The endpoints are fixed.
Only floating parameters are trained; floating buffers (BatchNorm running statistics) follow
the linear path between A's and B's (the bend's buffers are their midpoint), non-floating
entries are A's. :func:`path_curve` evaluates the loss along the trained curve and along the
straight line at the same t, and reports both barriers side by side.

The model is never modified (it runs through ``torch.func.functional_call``; its training
flags are restored), nor are the state dicts given.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from pymerge._util.args import check_int, check_seed
from pymerge._util.checks import check_state_pair
from pymerge._util.progress import progress_bar
from pymerge.align._hooks import eval_mode, model_device
from pymerge.landscape.barrier import barrier
from pymerge.landscape.hessian import call, check_loss, iter_batches, reiterable_batches
from pymerge.landscape.slices import evaluate_states
from pymerge.ops.interpolate import interpolate

__all__ = ["CurvedPath", "PathCurve", "connect", "path_curve"]

PathKind = Literal["bezier", "polychain"]
_KINDS = ("bezier", "polychain")


def _coefficients(kind: str, t: float) -> tuple[float, float, float]:
    """Weights of (θ_A, θ_C, θ_B) at ``t``."""
    if kind == "bezier":
        return (1.0 - t) ** 2, 2.0 * t * (1.0 - t), t * t
    if t <= 0.5:
        return 1.0 - 2.0 * t, 2.0 * t, 0.0
    return 0.0, 2.0 - 2.0 * t, 2.0 * t - 1.0


@dataclass
class CurvedPath:
    """A trained curve between two state dicts.

    Attributes:
        kind: ``"bezier"`` or ``"polychain"``.
        state_a, state_b: the endpoints (as given; never modified).
        bend: the trained bend θ_C as a full state dict (its floating buffers the midpoint of
            A's and B's, its non-floating entries A's).
        history: the training loss of each step (one t, one batch).
        ts: the t drawn at each step.
        seconds: training wall time.
    """

    kind: str
    state_a: Mapping[str, Tensor]
    state_b: Mapping[str, Tensor]
    bend: dict[str, Tensor]
    history: list[float] = field(default_factory=list)
    ts: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def point(self, t: float) -> dict[str, Tensor]:
        """φ(t) as a new state dict (t in [0, 1]; φ(0) = θ_A, φ(1) = θ_B exactly)."""
        t = float(t)
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"t must be in [0, 1], got {t}")
        wa, wc, wb = _coefficients(self.kind, t)
        keys = [k for k, v in self.state_a.items() if v.is_floating_point()]
        sub = [{k: s[k] for k in keys} for s in (self.state_a, self.bend, self.state_b)]
        out = {k: v.clone() for k, v in self.state_a.items() if not v.is_floating_point()}
        out.update(interpolate(sub, [wa, wc, wb]))
        return {k: out[k] for k in self.state_a}

    __call__ = point


@dataclass
class PathCurve:
    """Metrics along a curved path and along the straight line, at the same t.

    ``t``: float64 ``[n]`` from 0 to 1; ``metrics`` (curved) and ``linear``: name ->
    ``[n]``; ``barriers``: ``{"linear": ..., "curved": ...}`` of the loss
    (Git Re-Basin's definition, max_t L(t) − ½(L(0) + L(1))); ``flags["nonfinite"]``:
    ``"curved"``/``"linear"`` -> metric -> the t where it was NaN/inf (kept, never dropped;
    a barrier over such a curve is NaN).
    """

    kind: str
    t: np.ndarray
    metrics: dict[str, np.ndarray]
    linear: dict[str, np.ndarray]
    barriers: dict[str, float]
    flags: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        """The two barriers side by side, as text."""
        lin, cur = self.barriers.get("linear", math.nan), self.barriers["curved"]
        ratio = cur / lin if lin and math.isfinite(lin) and lin > 0 else math.nan
        return (
            "path        loss barrier\n"
            f"linear      {lin:.6g}\n"
            f"{self.kind:<11} {cur:.6g}\n"
            f"ratio       {ratio:.3g}  ({self.kind} / linear)"
        )

    def __str__(self) -> str:
        return self.table()


def _check_pair(model: nn.Module, state_a: Mapping, state_b: Mapping) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_state_pair(model.state_dict(), state_a, "the model's state dict", "state_a")
    check_state_pair(model.state_dict(), state_b, "the model's state dict", "state_b")
    check_state_pair(state_a, state_b, "state_a", "state_b", same_dtype=True)


def _cycle(batches: Iterable[Any], device: torch.device):
    while True:
        empty = True
        for item in iter_batches(batches, device):
            empty = False
            yield item
        if empty:
            raise ValueError("batches is empty: need at least one (inputs, targets) pair")


def connect(
    model: nn.Module,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    batches: Iterable[Any],
    loss_fn: Callable[[Any, Any], Tensor],
    *,
    kind: PathKind = "bezier",
    steps: int = 1000,
    lr: float = 1e-3,
    optimizer: Literal["adam", "sgd"] = "adam",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: bool = False,
) -> CurvedPath:
    """Train the bend of a curve from ``state_a`` to ``state_b`` along which the loss is low.

    Args:
        model: the architecture (never modified; run in train mode through
            ``functional_call``, its flags restored).
        state_a, state_b: the endpoints (same keys, shapes and dtypes as the model's).
        batches: ``(inputs, targets)`` pairs, cycled for ``steps`` steps.
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar Tensor`` (differentiable).
        kind: ``"bezier"`` (quadratic Bézier) or ``"polychain"`` (one bend).
        steps: optimisation steps, each on one batch at one t ~ U(0, 1).
        lr, optimizer, momentum, weight_decay: Adam (default) or SGD with momentum.
        seed: seed of the t drawn.
        progress: a progress bar over steps.

    Returns:
        A :class:`CurvedPath` (``.point(t)`` gives φ(t); :func:`path_curve` evaluates it).

    Raises:
        ValueError: mismatched state dicts (naming the key), empty batches, a loss that is
            NaN/inf at some step (naming it and t), bad options.
        TypeError: a loss that is not a scalar tensor, or does not depend on the parameters.
    """
    _check_pair(model, state_a, state_b)
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    check_int(steps, "steps", minimum=1)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    gen = torch.Generator().manual_seed(check_seed(seed))
    batches = reiterable_batches(batches)
    t0 = time.perf_counter()
    device = model_device(model)
    params = {n for n, p in model.named_parameters() if p.is_floating_point()}
    a = {k: v.detach().to(device) for k, v in state_a.items()}
    b = {k: v.detach().to(device) for k, v in state_b.items()}
    floats = [k for k, v in a.items() if v.is_floating_point()]
    bend = {k: (0.5 * (a[k] + b[k])) if k in floats else a[k].clone() for k in a}
    leaves = {k: bend[k].clone().requires_grad_(True) for k in floats if k in params}
    if not leaves:
        raise ValueError("the model has no floating-point parameters to train")
    opt = (
        torch.optim.Adam(leaves.values(), lr=lr, weight_decay=weight_decay)
        if optimizer == "adam"
        else torch.optim.SGD(leaves.values(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    )
    history: list[float] = []
    ts: list[float] = []
    stream = _cycle(batches, device)
    with (
        eval_mode(model, train=lambda m: True),
        torch.enable_grad(),
        progress_bar(progress, total=steps, desc=f"connect ({kind})", unit="step") as bar,
    ):
        for step in range(steps):
            t = float(torch.rand((), generator=gen, dtype=torch.float64))
            wa, wc, wb = _coefficients(kind, t)
            phi: dict[str, Tensor] = {}
            for k in a:
                if k in leaves:
                    phi[k] = wa * a[k] + wc * leaves[k] + wb * b[k]
                elif k in floats:
                    phi[k] = (1.0 - t) * a[k] + t * b[k]  # buffers: the linear path
                else:
                    phi[k] = a[k].clone()  # BatchNorm bumps num_batches_tracked in place
            i, x, y, _ = next(stream)
            loss = check_loss(loss_fn(call(model, phi, x), y), i, need_grad=True)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise ValueError(
                    f"the loss is {value} at step {step} (t = {t:.3f}, batch {i}): the curve "
                    f"diverged; lower lr"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append(value)
            ts.append(t)
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{value:.4g}")
    for k, leaf in leaves.items():
        bend[k] = leaf.detach().clone()
    return CurvedPath(
        kind=kind,
        state_a=state_a,
        state_b=state_b,
        bend={k: v.to(state_a[k].device) for k, v in bend.items()},
        history=history,
        ts=ts,
        seconds=time.perf_counter() - t0,
    )


def _grid(points: int | Sequence[float] | np.ndarray) -> np.ndarray:
    if isinstance(points, (int, np.integer)) and not isinstance(points, bool):
        check_int(points, "points", minimum=2)
        return np.linspace(0.0, 1.0, int(points))
    g = np.asarray(points, dtype=np.float64).reshape(-1)
    if g.size < 2 or not np.all(np.isfinite(g)) or np.any(np.diff(g) <= 0):
        raise ValueError("points must be a count >= 2 or increasing finite values in [0, 1]")
    if g[0] != 0.0 or g[-1] != 1.0:
        raise ValueError(f"points must start at 0 and end at 1, got {g[0]} .. {g[-1]}")
    return g


def _nonfinite(t: np.ndarray, metrics: Mapping[str, np.ndarray]) -> dict[str, list[float]]:
    return {k: t[~np.isfinite(v)].tolist() for k, v in metrics.items() if not np.isfinite(v).all()}


def path_curve(
    model: nn.Module,
    path: CurvedPath,
    batches: Iterable[Any],
    loss_fn: Callable[[Any, Any], Tensor],
    *,
    points: int | Sequence[float] | np.ndarray = 25,
    metrics: Mapping[str, Callable[[Any, Any], Any]] | None = None,
    linear: bool = True,
    progress: bool = False,
) -> PathCurve:
    """The loss (and ``metrics``) along ``path`` and, with ``linear``, along the straight
    line between its endpoints, at ``points`` values of t (a count, or the values from 0 to
    1). Evaluated in eval mode with ``functional_call``; barriers as Git Re-Basin defines
    them (:func:`pymerge.landscape.barrier.barrier`, ``kind="rebasin"``)."""
    if not isinstance(path, CurvedPath):
        raise TypeError(f"path must be a CurvedPath (from connect), got {type(path).__name__}")
    _check_pair(model, path.state_a, path.state_b)
    grid = _grid(points)
    batches = reiterable_batches(batches)
    device = model_device(model)
    a = {k: v.to(device) for k, v in path.state_a.items()}
    b = {k: v.to(device) for k, v in path.state_b.items()}
    floats = [k for k, v in a.items() if v.is_floating_point()]
    ints = {k: v for k, v in a.items() if not v.is_floating_point()}
    local = CurvedPath(path.kind, a, b, {k: v.to(device) for k, v in path.bend.items()})

    def curved():
        for t in grid:
            yield local.point(float(t))

    def straight():
        fa, fb = {k: a[k] for k in floats}, {k: b[k] for k in floats}
        for t in grid:
            yield {**ints, **interpolate([fa, fb], [1.0 - float(t), float(t)])}

    total = grid.size * (2 if linear else 1)
    with progress_bar(progress, total=total, desc="path curve", unit="point") as bar:
        cur = evaluate_states(model, curved(), batches, loss_fn, metrics=metrics, bar=bar)
        lin = (
            evaluate_states(model, straight(), batches, loss_fn, metrics=metrics, bar=bar)
            if linear
            else {}
        )
    cur_m = {k: np.asarray(v, dtype=np.float64) for k, v in cur.items()}
    lin_m = {k: np.asarray(v, dtype=np.float64) for k, v in lin.items()}
    flags: dict[str, Any] = {}
    bad = {"curved": _nonfinite(grid, cur_m), "linear": _nonfinite(grid, lin_m)}
    bad = {k: v for k, v in bad.items() if v}
    if bad:
        flags["nonfinite"] = bad
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NaN barriers are flagged instead
        barriers = {"curved": barrier(cur_m["loss"], grid, "rebasin")}
        if linear:
            barriers["linear"] = barrier(lin_m["loss"], grid, "rebasin")
    return PathCurve(
        kind=path.kind, t=grid, metrics=cur_m, linear=lin_m, barriers=barriers, flags=flags
    )
