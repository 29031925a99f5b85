"""PNG figures of the landscape results: contours of a surface, a slice's curve, the linear
and curved paths' losses, and a Hessian spectral density.

matplotlib is optional (the ``plot`` extra: ``pip install "pymerge[plot]"``); without it each
function raises an ImportError that says so. Figures are drawn on a
``matplotlib.figure.Figure`` with the Agg canvas, never through ``pyplot``: no global state,
no window, no change to the user's backend. Each function returns the figure and, when
``path`` is given, also writes it there as PNG (``format="png"`` whatever the file name).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["plot_surface", "plot_slice", "plot_path_curves", "plot_density", "require_matplotlib"]

_HINT = 'plotting needs matplotlib, the "plot" extra: pip install "pymerge[plot]"'


def require_matplotlib() -> Any:
    """The ``matplotlib.figure`` module, or an ImportError naming the ``plot`` extra."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        raise ImportError(_HINT) from None
    import matplotlib.figure

    return matplotlib.figure


def _figure(size: tuple[float, float] = (6.0, 4.8)):
    mfig = require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = mfig.Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike[str] | None) -> None:
    if path is not None:
        fig.savefig(os.fspath(path), format="png", bbox_inches="tight")


def _metric(surface: Any, metric: str) -> np.ndarray:
    if metric not in surface.metrics:
        raise ValueError(f"the surface has no metric {metric!r}; it has {sorted(surface.metrics)}")
    return np.asarray(surface.metrics[metric], dtype=np.float64)


def plot_surface(
    surface: Any,
    path: str | os.PathLike[str] | None = None,
    *,
    metric: str = "loss",
    levels: int = 30,
    log: bool | None = None,
    title: str | None = None,
):
    """Filled contours of a 2-D :class:`~pymerge.landscape.slices.Surface` with its named
    points marked (the center, or A, B, C of a plane). ``log``: contour the log10 of a
    positive metric (default: when its range spans more than two decades). NaN/inf points are
    left blank."""
    if surface.ndim != 2:
        raise ValueError(f"plot_surface needs a 2-D surface, got {surface.ndim}-D (plot_slice)")
    z = _metric(surface, metric)
    finite = z[np.isfinite(z)]
    if finite.size == 0:
        raise ValueError(f"metric {metric!r} has no finite value to plot")
    if log is None:
        log = bool(finite.min() > 0 and finite.max() / finite.min() > 100)
    if log and not finite.min() > 0:
        raise ValueError(f"log=True needs a positive metric; {metric!r} reaches {finite.min():g}")
    shown = (
        np.log10(np.where(np.isfinite(z), z, np.nan))
        if log
        else np.where(np.isfinite(z), z, np.nan)
    )
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    X, Y = np.meshgrid(surface.coords[0], surface.coords[1], indexing="ij")
    cs = ax.contourf(X, Y, np.ma.masked_invalid(shown), levels=levels, cmap="viridis")
    ax.contour(X, Y, np.ma.masked_invalid(shown), levels=levels, colors="k", linewidths=0.3)
    fig.colorbar(cs, ax=ax, label=f"log10 {metric}" if log else metric)
    for name, pt in surface.points.items():
        ax.plot(pt[0], pt[1], "o", color="white", markeredgecolor="black", markersize=7)
        ax.annotate(name, (pt[0], pt[1]), textcoords="offset points", xytext=(6, 6), color="white")
    dirs = list(surface.directions) + ["", ""]
    ax.set_xlabel(dirs[0])
    ax.set_ylabel(dirs[1])
    ax.set_aspect("equal" if "A" in surface.points else "auto")
    ax.set_title(title or f"{metric} surface")
    _save(fig, path)
    return fig


def plot_slice(
    surface: Any,
    path: str | os.PathLike[str] | None = None,
    *,
    metric: str = "loss",
    log: bool = False,
    title: str | None = None,
):
    """The curve of a 1-D :class:`~pymerge.landscape.slices.Surface` (NaN/inf points are
    gaps)."""
    if surface.ndim != 1:
        raise ValueError(f"plot_slice needs a 1-D slice, got {surface.ndim}-D (plot_surface)")
    z = _metric(surface, metric)
    fig = _figure((6.0, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(surface.coords[0], np.where(np.isfinite(z), z, np.nan), "-o", markersize=3)
    if log:
        ax.set_yscale("log")
    ax.axvline(0.0, color="grey", linewidth=0.5)
    ax.set_xlabel(surface.directions[0] if surface.directions else "a")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} along a slice")
    ax.grid(alpha=0.3)
    _save(fig, path)
    return fig


def plot_path_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike[str] | None = None,
    *,
    ylabel: str = "loss",
    title: str | None = None,
):
    """Several curves over t in [0, 1] on one axis: ``curves`` name -> (t, values), e.g.
    the linear and the curved path of :func:`~pymerge.landscape.paths.path_curve`."""
    if not curves:
        raise ValueError("curves is empty: give at least one name -> (t, values)")
    fig = _figure((6.0, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    for name, (t, v) in curves.items():
        v = np.asarray(v, dtype=np.float64)
        ax.plot(
            np.asarray(t, dtype=np.float64),
            np.where(np.isfinite(v), v, np.nan),
            "-o",
            markersize=3,
            label=name,
        )
    ax.set_xlabel("t")
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    ax.set_title(title or f"{ylabel} along the paths")
    _save(fig, path)
    return fig


def plot_density(
    result: Any,
    path: str | os.PathLike[str] | None = None,
    *,
    log: bool = True,
    title: str | None = None,
):
    """The spectral density of a :func:`~pymerge.landscape.hessian.hessian_density` result
    (log scale by default, as Ghorbani et al. plot it)."""
    if getattr(result, "density", None) is None or getattr(result, "grid", None) is None:
        raise ValueError("plot_density needs the result of hessian_density (grid and density)")
    fig = _figure((6.0, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    dens = np.asarray(result.density, dtype=np.float64)
    floor = max(float(dens.max()) * 1e-12, 1e-300)
    ax.plot(result.grid, np.maximum(dens, floor) if log else dens)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.grid(alpha=0.3)
    ax.set_title(title or "Hessian spectral density (SLQ)")
    _save(fig, path)
    return fig
