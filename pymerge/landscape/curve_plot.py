"""PNG of linear-mode-connectivity curves: loss (and error) along λ for several paths.

matplotlib is optional (the ``plot`` extra); drawn on a ``Figure`` with the Agg canvas, never
through ``pyplot`` (no global state, no window).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pymerge.landscape.barrier import BARRIER_KINDS, Curve, barrier

__all__ = ["plot_curves"]


def plot_curves(
    curves: Mapping[str, Curve] | Curve,
    path: str | os.PathLike[str] | None = None,
    *,
    metrics: Sequence[str] | None = None,
    title: str | None = None,
) -> Any:
    """One panel per metric (default: ``"loss"``, and ``"accuracy"`` drawn as the error
    1 − accuracy when present), one line per curve, the Git Re-Basin barrier of each in the
    legend. NaN/inf points are gaps. Returns the figure; writes a PNG to ``path`` if given.
    ImportError naming the ``plot`` extra without matplotlib."""
    from pymerge.landscape.plots import require_matplotlib

    if isinstance(curves, Curve):
        curves = {"curve": curves}
    if not curves:
        raise ValueError("curves is empty: give at least one name -> Curve")
    first = next(iter(curves.values()))
    if metrics is None:
        metrics = [m for m in ("loss", "accuracy") if m in first.metrics] or list(first.metrics)
    for name, c in curves.items():
        for m in metrics:
            if m not in c.metrics:
                raise ValueError(f"curve {name!r} has no metric {m!r}; it has {sorted(c.metrics)}")
    mfig = require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = mfig.Figure(figsize=(5.2 * len(metrics), 4.0), dpi=100)
    FigureCanvasAgg(fig)
    for i, m in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), i + 1)
        as_error = m in ("accuracy", "acc")
        for name, c in curves.items():
            v = np.asarray(c.metrics[m], dtype=np.float64)
            v = 1.0 - v if as_error else v
            label = name
            if np.all(np.isfinite(v)):
                label += f" (barrier {barrier(v, c.lambdas, BARRIER_KINDS[0]):.3g})"
            ax.plot(c.lambdas, np.where(np.isfinite(v), v, np.nan), "-o", markersize=3, label=label)
        ax.set_xlabel("λ  (θ = (1−λ)A + λ·π(B))")
        ax.set_ylabel("error (1 − accuracy)" if as_error else m)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    if path is not None:
        fig.savefig(os.fspath(path), format="png", bbox_inches="tight")
    return fig
