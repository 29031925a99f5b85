"""Loss along lines and over planes in parameter space: 1-D slices, 2-D surfaces, and the
plane through three models.

A point of a slice is θ = θ₀ + a·d₁ (+ b·d₂) for directions d over the model's floating
parameters (buffers such as BatchNorm's running statistics stay those of θ₀, as in Li et
al. 2018); a point of the plane through θ_A, θ_B, θ_C is the affine combination
(1−s−t)θ_A + sθ_B + tθ_C of the three whole states (buffers included), so that each model
sits exactly at its coordinates.

Directions:

* ``"random"``: Gaussian directions, **filter-normalised** (Li et al. 2018): each filter
  (output unit: a slice along dim 0 of a weight of two or more dimensions) rescaled to the
  norm of the same filter of the model. ``ignore="biasbn"`` (the default, as in the paper's
  figures) zeroes the directions of one-dimensional parameters (biases and normalisation
  weights); with ``ignore=None`` they are copies of the parameters, as the reference
  implementation does. ``norm="layer"`` rescales whole tensors instead, ``"weight"``
  multiplies by the weights elementwise, ``None`` leaves the Gaussian as it is.
* ``"hessian"``: the top eigenvectors of the Hessian at θ₀
  (:func:`~pymerge.landscape.hessian.hessian_eigenvalues`; unit norm, so a coordinate is a
  distance in parameter space).
* given directions: dicts parameter name -> tensor of the parameter's shape (missing
  parameters move by zero; a wrong key or shape is an error naming it).
* the plane through three models: d₁ = θ_B − θ_A and d₂ = the part of θ_C − θ_A orthogonal to
  d₁ (Gram–Schmidt), rescaled to d₁'s length, so the axes share one scale: A sits at (0, 0),
  B at (1, 0), C at ``surface.points["C"]``.

Evaluation: each point's parameters are built from one read of the base and the directions
(:func:`pymerge.ops.interpolate`, the C++ multi-tensor weighted sum on the CPU) and run with
``torch.func.functional_call`` (no copy into a module, no ``load_state_dict``), in eval mode,
under ``torch.no_grad``; the loss (and any ``metrics``) are averaged over ``batches`` weighted
by batch size, with one host synchronisation per point. NaN/inf values are kept in the grids
and listed in ``surface.flags["nonfinite"]``.
"""

from __future__ import annotations

import copy
import math
import time
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
from pymerge.landscape.hessian import (
    call,
    check_loss,
    hessian_eigenvalues,
    iter_batches,
    reiterable_batches,
)
from pymerge.ops.interpolate import interpolate

__all__ = [
    "Surface",
    "random_direction",
    "loss_slice",
    "loss_surface",
    "loss_plane",
    "evaluate_states",
]

Direction = Mapping[str, Tensor]
Norm = Literal["filter", "layer", "weight"] | None
Metric = Callable[[Any, Any], Any]


@dataclass
class Surface:
    """Metrics on a 1-D or 2-D grid of parameter-space coordinates.

    Attributes:
        coords: one float64 array per axis (``[n]``; two arrays for a surface).
        metrics: name -> float64 array, ``[n]`` or ``[n1, n2]`` with ``[i, j]`` at
            ``(coords[0][i], coords[1][j])``; ``"loss"`` always.
        directions: what each axis is (e.g. ``"random filter-normalised (seed 0)"``,
            ``"A->B"``).
        points: named points in these coordinates (``"center"``; ``"A"``, ``"B"``, ``"C"``
            for a plane).
        flags: ``"nonfinite"``: metric -> list of coordinates where it was NaN/inf (kept in
            the grid, never dropped).
        seconds: wall time of the evaluation (directions included).
        extras: ``evaluations`` (points), ``eigenvalues`` (Hessian directions),
            ``distances`` (plane: ‖B−A‖, ‖C−A‖).
    """

    coords: list[np.ndarray]
    metrics: dict[str, np.ndarray] = field(default_factory=dict)
    directions: list[str] = field(default_factory=list)
    points: dict[str, tuple[float, ...]] = field(default_factory=dict)
    flags: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    extras: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.metrics[name]

    @property
    def ndim(self) -> int:
        return len(self.coords)

    def plot(self, path: Any = None, metric: str = "loss", **kwargs: Any):
        """A matplotlib figure of ``metric`` (contours for 2-D, a curve for 1-D), saved as
        PNG at ``path`` when given; see :mod:`pymerge.landscape.plots`."""
        from pymerge.landscape.plots import plot_slice, plot_surface

        fn = plot_surface if self.ndim == 2 else plot_slice
        return fn(self, path, metric=metric, **kwargs)


# --------------------------------------------------------------------------- directions


def _float_params(model: nn.Module, state: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    """The model's floating parameters (values from ``state`` when given), detached."""
    out = {}
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            continue
        out[name] = (state[name] if state is not None else p).detach()
    if not out:
        raise ValueError("the model has no floating-point parameters")
    return out


def random_direction(
    model: nn.Module,
    *,
    state: Mapping[str, Tensor] | None = None,
    seed: int = 0,
    norm: Norm = "filter",
    ignore: Literal["biasbn"] | None = "biasbn",
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """A random direction over the model's floating parameters (Li et al. 2018).

    Gaussian entries (drawn on the CPU from ``seed``, so the same on every device), then
    ``norm="filter"``: each filter (dim-0 slice) of every parameter of 2+ dimensions
    rescaled to the norm of the model's filter; ``"layer"``: each tensor to the tensor's norm;
    ``"weight"``: multiplied by the weights elementwise; ``None``: as drawn.
    ``ignore="biasbn"``: directions of 1-D parameters (biases, norm weights) are zero;
    ``ignore=None``: with a ``norm``, they are copies of the parameters (the reference's
    choice). ``state``: the point to normalise against (default: the model's parameters).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if norm not in ("filter", "layer", "weight", None):
        raise ValueError(f"norm must be 'filter', 'layer', 'weight' or None, got {norm!r}")
    if ignore not in ("biasbn", None):
        raise ValueError(f"ignore must be 'biasbn' or None, got {ignore!r}")
    if state is not None:
        _check_state(model, state, "state")
    gen = generator if generator is not None else torch.Generator().manual_seed(check_seed(seed))
    out: dict[str, Tensor] = {}
    for name, w in _float_params(model, state).items():
        d = torch.randn(w.shape, generator=gen, dtype=torch.float64)
        wd = w.detach().to("cpu", torch.float64)
        if w.dim() <= 1:
            if ignore == "biasbn":
                d.zero_()
            elif norm is not None:
                d.copy_(wd)
        elif norm == "filter":
            dn = d.reshape(d.shape[0], -1).norm(dim=1)
            wn = wd.reshape(wd.shape[0], -1).norm(dim=1)
            d.mul_((wn / (dn + 1e-10)).reshape(-1, *([1] * (d.dim() - 1))))
        elif norm == "layer":
            d.mul_(wd.norm() / (d.norm() + 1e-10))
        elif norm == "weight":
            d.mul_(wd)
        out[name] = d.to(device=w.device, dtype=w.dtype)
    return out


def _check_direction(
    d: Any, params: Mapping[str, Tensor], what: str, model: nn.Module
) -> dict[str, Tensor]:
    """A full direction (zeros for the parameters it omits) after checking keys and shapes."""
    if not isinstance(d, Mapping):
        raise TypeError(
            f"{what} must be a dict parameter name -> Tensor, 'random' or 'hessian'; got "
            f"{type(d).__name__}"
        )
    buffers = dict(model.named_buffers())
    for key, t in d.items():
        if key not in params:
            hint = " (a buffer: directions move parameters only)" if key in buffers else ""
            raise ValueError(f"{what} has key {key!r}, which is not a parameter of the model{hint}")
        if not isinstance(t, Tensor):
            raise TypeError(f"{what}[{key!r}] is a {type(t).__name__}, not a Tensor")
        if t.shape != params[key].shape:
            raise ValueError(
                f"{what}[{key!r}] has shape {tuple(t.shape)} but the parameter has shape "
                f"{tuple(params[key].shape)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"{what}[{key!r}] has dtype {t.dtype}; a direction is floating point")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{what}[{key!r}] has NaN or inf entries")
    out = {}
    nonzero = False
    for key, p in params.items():
        if key in d:
            t = d[key].detach().to(device=p.device, dtype=p.dtype)
            nonzero = nonzero or bool(t.ne(0).any())
            out[key] = t
        else:
            out[key] = torch.zeros_like(p)
    if not nonzero:
        raise ValueError(f"{what} is zero everywhere: it spans no line")
    return out


def _check_state(model: nn.Module, state: Mapping[str, Tensor], name: str) -> None:
    check_state_pair(model.state_dict(), state, "the model's state dict", name)


# --------------------------------------------------------------------------- evaluation


def _check_metrics(metrics: Mapping[str, Metric] | None) -> dict[str, Metric]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a dict name -> fn(output, targets), got {metrics!r}")
    for k, fn in metrics.items():
        if k == "loss":
            raise ValueError("metrics may not be called 'loss' (the loss is always computed)")
        if not callable(fn):
            raise TypeError(f"metrics[{k!r}] must be callable, got {type(fn).__name__}")
    return dict(metrics)


def _as_scalar(value: Any, name: str, i: int) -> Tensor:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise TypeError(
                f"metric {name!r} returned a tensor of shape {tuple(value.shape)} on batch {i}; "
                f"it must return a scalar"
            )
        return value.detach().reshape(()).double()
    if isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float64)
    raise TypeError(f"metric {name!r} returned a {type(value).__name__} on batch {i}")


def evaluate_states(
    model: nn.Module,
    states: Iterable[tuple[Mapping[str, Tensor], Mapping[str, Tensor]]],
    batches: Iterable[Any],
    loss_fn: Callable[[Any, Any], Tensor],
    *,
    metrics: Mapping[str, Metric] | None = None,
    bar: Any = None,
) -> dict[str, list[float]]:
    """Mean loss (and metrics) over ``batches`` for each ``(params, buffers)`` in ``states``,
    run through ``functional_call`` in eval mode without grad. Lists of floats, one entry
    per state, in order."""
    fns = _check_metrics(metrics)
    batches = reiterable_batches(batches)
    device = model_device(model)
    out: dict[str, list[float]] = {"loss": [], **{k: [] for k in fns}}
    with eval_mode(model), torch.no_grad():
        for tensors in states:
            sums: dict[str, Tensor] = {}
            total = 0
            for i, x, y, n in iter_batches(batches, device):
                pred = call(model, tensors, x)
                loss = check_loss(loss_fn(pred, y), i).detach().double()
                sums["loss"] = loss * n if i == 0 else sums["loss"] + loss * n
                for k, fn in fns.items():
                    v = _as_scalar(fn(pred, y), k, i).to(loss.device) * n
                    sums[k] = v if i == 0 else sums[k] + v
                total += n
            values = torch.stack([sums[k] for k in out]).cpu().tolist()  # one sync per point
            for k, v in zip(out, values, strict=True):
                out[k].append(v / total)
            if bar is not None:
                bar.update(1)
    return out


def _flags(coords: list[np.ndarray], metrics: Mapping[str, np.ndarray]) -> dict[str, Any]:
    bad: dict[str, list] = {}
    for k, v in metrics.items():
        idx = np.argwhere(~np.isfinite(v))
        if idx.size:
            bad[k] = [tuple(float(coords[a][i]) for a, i in enumerate(row)) for row in idx]
    return {"nonfinite": bad} if bad else {}


def _axis(span: Any, steps: Any, what: str) -> np.ndarray:
    n = check_int(steps, f"{what} steps", minimum=2)
    try:
        lo, hi = (float(v) for v in span)
    except (TypeError, ValueError):
        raise TypeError(f"{what} span must be a pair (low, high), got {span!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"{what} span must be finite with low < high, got {span!r}")
    return np.linspace(lo, hi, n)


def _pair(value: Any, scalar: Callable[[Any], bool]) -> tuple[Any, Any]:
    """``value`` for both axes, or a pair of per-axis values."""
    if scalar(value):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return value[0], value[1]
    raise TypeError(f"expected one value or a pair of values (one per axis), got {value!r}")


def _is_span(v: Any) -> bool:
    return (
        isinstance(v, (tuple, list))
        and len(v) == 2
        and all(isinstance(x, (int, float, np.floating, np.integer)) for x in v)
    )


def _is_count(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


# --------------------------------------------------------------------------- set-up


def _setup(
    model: nn.Module, state: Mapping[str, Tensor] | None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(floating parameters, everything else: buffers and non-floating parameters)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if state is not None:
        _check_state(model, state, "state")
        full = {k: v.detach() for k, v in state.items()}
    else:
        full = {k: v.detach() for k, v in model.state_dict(keep_vars=True).items()}
    params = _float_params(model, full)
    device = model_device(model)
    params = {k: v.to(device) for k, v in params.items()}
    rest = {k: v.to(device) for k, v in full.items() if k not in params}
    return params, rest


def _directions(
    spec: Any,
    count: int,
    model: nn.Module,
    params: dict[str, Tensor],
    rest: dict[str, Tensor],
    state: Mapping[str, Tensor] | None,
    batches: Iterable[Any],
    loss_fn: Callable[[Any, Any], Tensor],
    *,
    seed: int,
    norm: Norm,
    ignore: str | None,
    hessian_options: Mapping[str, Any] | None,
) -> tuple[list[dict[str, Tensor]], list[str], dict[str, Any]]:
    extras: dict[str, Any] = {}
    if isinstance(spec, str):
        if spec == "random":
            gen = torch.Generator().manual_seed(check_seed(seed))
            ds = [
                random_direction(
                    model, state={**rest, **params}, norm=norm, ignore=ignore, generator=gen
                )
                for _ in range(count)
            ]
            label = f"random {norm or 'unnormalised'}{'-normalised' if norm else ''} (seed {seed})"
            names = [f"{label}, direction {i + 1}" for i in range(count)] if count > 1 else [label]
            return ds, names, extras
        if spec == "hessian":
            opts = dict(hessian_options or {})
            opts.setdefault("k", count)
            if opts["k"] < count:
                raise ValueError(
                    f"hessian_options k={opts['k']} gives fewer than {count} directions"
                )
            work = model
            if state is not None:
                work = copy.deepcopy(model)
                work.load_state_dict(state)
            res = hessian_eigenvalues(work, batches, loss_fn, **opts)
            vecs = res.vectors or []
            ds = [
                {k: vecs[i].get(k, torch.zeros_like(p)).to(p.dtype) for k, p in params.items()}
                for i in range(count)
            ]
            extras["eigenvalues"] = res.values[:count].tolist()
            names = [f"Hessian eigenvector {i + 1} (λ = {res.values[i]:.4g})" for i in range(count)]
            return ds, names, extras
        raise ValueError(f"directions must be 'random', 'hessian' or given tensors, got {spec!r}")
    given = [spec] if count == 1 and isinstance(spec, Mapping) else list(spec)
    if len(given) != count:
        raise ValueError(f"expected {count} direction(s), got {len(given)}")
    ds = [
        _check_direction(d, params, f"directions[{i}]" if count > 1 else "direction", model)
        for i, d in enumerate(given)
    ]
    return ds, [f"given direction {i + 1}" for i in range(count)], extras


def _grid_states(
    params: dict[str, Tensor],
    rest: dict[str, Tensor],
    dirs: list[dict[str, Tensor]],
    points: Iterable[Sequence[float]],
):
    """``(θ₀ + Σ c_i d_i, buffers)`` for each point: one multi-tensor weighted sum each."""
    base = [params, *dirs]
    for coeffs in points:
        theta = interpolate(base, [1.0, *map(float, coeffs)])
        yield theta, rest


# --------------------------------------------------------------------------- public


def loss_slice(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[Any, Any], Tensor],
    direction: Literal["random", "hessian"] | Direction = "random",
    *,
    state: Mapping[str, Tensor] | None = None,
    span: tuple[float, float] = (-1.0, 1.0),
    steps: int = 51,
    seed: int = 0,
    norm: Norm = "filter",
    ignore: Literal["biasbn"] | None = "biasbn",
    metrics: Mapping[str, Metric] | None = None,
    hessian_options: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> Surface:
    """The loss along θ₀ + a·d for ``steps`` values of ``a`` in ``span``.

    Args:
        model: the architecture, and θ₀ unless ``state`` is given (never modified).
        batches: ``(inputs, targets)`` pairs; the loss is their mean weighted by batch size.
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar Tensor``.
        direction: ``"random"`` (filter-normalised, see ``norm``/``ignore``), ``"hessian"``
            (the top eigenvector at θ₀) or a dict parameter name -> Tensor.
        state: θ₀ as a state dict (same keys and shapes as the model's).
        metrics: more metrics from the same forward pass, name -> ``fn(output, targets)``.
        hessian_options: keyword arguments for :func:`hessian_eigenvalues` (``"hessian"``).

    Returns:
        A 1-D :class:`Surface` (``coords[0]`` the values of ``a``).
    """
    t0 = time.perf_counter()
    batches = reiterable_batches(batches)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    grid = _axis(span, steps, "slice")
    params, rest = _setup(model, state)
    dirs, names, extras = _directions(
        direction,
        1,
        model,
        params,
        rest,
        state,
        batches,
        loss_fn,
        seed=seed,
        norm=norm,
        ignore=ignore,
        hessian_options=hessian_options,
    )
    with progress_bar(progress, total=grid.size, desc="slice", unit="point") as bar:
        values = evaluate_states(
            model,
            _grid_states(params, rest, dirs, ([a] for a in grid)),
            batches,
            loss_fn,
            metrics=metrics,
            bar=bar,
        )
    coords = [grid]
    mets = {k: np.asarray(v, dtype=np.float64) for k, v in values.items()}
    extras["evaluations"] = int(grid.size)
    return Surface(
        coords=coords,
        metrics=mets,
        directions=names,
        points={"center": (0.0,)},
        flags=_flags(coords, mets),
        seconds=time.perf_counter() - t0,
        extras=extras,
    )


def loss_surface(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[Any, Any], Tensor],
    directions: Literal["random", "hessian"] | Sequence[Direction] = "random",
    *,
    state: Mapping[str, Tensor] | None = None,
    span: tuple[float, float] | tuple[tuple[float, float], tuple[float, float]] = (-1.0, 1.0),
    steps: int | tuple[int, int] = 21,
    seed: int = 0,
    norm: Norm = "filter",
    ignore: Literal["biasbn"] | None = "biasbn",
    metrics: Mapping[str, Metric] | None = None,
    hessian_options: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> Surface:
    """The loss over θ₀ + a·d₁ + b·d₂ on a ``steps`` x ``steps`` grid.

    ``directions``: ``"random"`` (two filter-normalised random directions), ``"hessian"``
    (the top two eigenvectors at θ₀) or a pair of dicts parameter name -> Tensor. ``span``
    and ``steps``: one value for both axes or a pair. Other arguments as
    :func:`loss_slice`. Returns a 2-D :class:`Surface` (``metrics["loss"][i, j]`` at
    ``(coords[0][i], coords[1][j])``).
    """
    t0 = time.perf_counter()
    batches = reiterable_batches(batches)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    span_a, span_b = _pair(span, _is_span)
    steps_a, steps_b = _pair(steps, _is_count)
    ga, gb = _axis(span_a, steps_a, "first axis"), _axis(span_b, steps_b, "second axis")
    params, rest = _setup(model, state)
    if isinstance(directions, Mapping):
        raise TypeError("a surface needs two directions: pass a pair of dicts (d1, d2)")
    dirs, names, extras = _directions(
        directions,
        2,
        model,
        params,
        rest,
        state,
        batches,
        loss_fn,
        seed=seed,
        norm=norm,
        ignore=ignore,
        hessian_options=hessian_options,
    )
    pts = [(a, b) for a in ga for b in gb]
    with progress_bar(progress, total=len(pts), desc="surface", unit="point") as bar:
        values = evaluate_states(
            model,
            _grid_states(params, rest, dirs, pts),
            batches,
            loss_fn,
            metrics=metrics,
            bar=bar,
        )
    coords = [ga, gb]
    mets = {k: np.asarray(v, dtype=np.float64).reshape(ga.size, gb.size) for k, v in values.items()}
    extras["evaluations"] = len(pts)
    return Surface(
        coords=coords,
        metrics=mets,
        directions=names,
        points={"center": (0.0, 0.0)},
        flags=_flags(coords, mets),
        seconds=time.perf_counter() - t0,
        extras=extras,
    )


def _flat_dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor], keys: list[str]) -> float:
    return float(sum(float((a[k].double() * b[k].double()).sum()) for k in keys))


def loss_plane(
    model: nn.Module,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    state_c: Mapping[str, Tensor],
    batches: Iterable[Any],
    loss_fn: Callable[[Any, Any], Tensor],
    *,
    steps: int | tuple[int, int] = 21,
    margin: float = 0.2,
    metrics: Mapping[str, Metric] | None = None,
    progress: bool = False,
) -> Surface:
    """The loss over the plane through three models (Garipov et al. 2018's figures).

    Axes: u = θ_B − θ_A and the part of θ_C − θ_A orthogonal to u (Gram–Schmidt over the
    floating parameters), both of ‖u‖'s length, so A = (0, 0), B = (1, 0) and
    C = ``points["C"]``; the grid covers the three points with ``margin`` (a fraction of
    each side's extent) around them. A point (x, y) is the state (1−s−t)θ_A + sθ_B + tθ_C
    with s = x − y·c₁/c₂ and t = y/c₂ ((c₁, c₂) = C's coordinates), buffers included.
    Raises ValueError when the three are (nearly) collinear or A = B.
    """
    t0 = time.perf_counter()
    batches = reiterable_batches(batches)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    for name, s in (("state_a", state_a), ("state_b", state_b), ("state_c", state_c)):
        _check_state(model, s, name)
    check_state_pair(state_a, state_b, "state_a", "state_b", same_dtype=True)
    check_state_pair(state_a, state_c, "state_a", "state_c", same_dtype=True)
    keys = list(_float_params(model, state_a))
    u = {k: state_b[k].double() - state_a[k].double() for k in keys}
    v = {k: state_c[k].double() - state_a[k].double() for k in keys}
    uu = _flat_dot(u, u, keys)
    if uu == 0.0:
        raise ValueError("state_a and state_b are equal: they span no direction")
    c1 = _flat_dot(u, v, keys) / uu
    vv = _flat_dot(v, v, keys)
    perp2 = vv - c1 * c1 * uu
    if perp2 <= 1e-12 * max(vv, uu):
        raise ValueError("the three models are (nearly) collinear: they span no plane")
    c2 = math.sqrt(perp2 / uu)
    steps_a, steps_b = _pair(steps, _is_count)
    xs = [0.0, 1.0, c1]
    ys = [0.0, 0.0, c2]
    dx, dy = max(xs) - min(xs), max(ys) - min(ys)
    gx = _axis((min(xs) - margin * dx, max(xs) + margin * dx), steps_a, "first axis")
    gy = _axis((min(ys) - margin * dy, max(ys) + margin * dy), steps_b, "second axis")
    device = model_device(model)
    states = [{k: t.detach().to(device) for k, t in s.items()} for s in (state_a, state_b, state_c)]
    floats = [k for k, t in states[0].items() if t.is_floating_point()]
    others = {k: t for k, t in states[0].items() if not t.is_floating_point()}
    sub = [{k: s[k] for k in floats} for s in states]

    def gen():
        for x in gx:
            for y in gy:
                s_, t_ = x - y * c1 / c2, y / c2
                yield interpolate(sub, [1.0 - s_ - t_, s_, t_]), others

    with progress_bar(progress, total=gx.size * gy.size, desc="plane", unit="point") as bar:
        values = evaluate_states(model, gen(), batches, loss_fn, metrics=metrics, bar=bar)
    coords = [gx, gy]
    mets = {
        k: np.asarray(val, dtype=np.float64).reshape(gx.size, gy.size) for k, val in values.items()
    }
    return Surface(
        coords=coords,
        metrics=mets,
        directions=["A->B", "A->C (Gram-Schmidt)"],
        points={"A": (0.0, 0.0), "B": (1.0, 0.0), "C": (c1, c2)},
        flags=_flags(coords, mets),
        seconds=time.perf_counter() - t0,
        extras={
            "evaluations": int(gx.size * gy.size),
            "distances": {"A-B": math.sqrt(uu), "A-C": math.sqrt(vv)},
        },
    )
