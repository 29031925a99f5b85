"""Landscape views of MNIST-1D MLPs: a 2-D filter-normalised loss surface around a trained
model (Li et al. 2018), the loss over the plane through three models before and after weight
matching (Garipov et al. 2018's figure), and the top Hessian eigenvalue and trace at the
endpoints and at the midpoint of A and B before and after weight matching.

Uses the landscape functions :func:`pymerge.landscape.loss_surface`,
:func:`~pymerge.landscape.loss_plane`, :func:`~pymerge.landscape.hessian_eigenvalues` and
:func:`~pymerge.landscape.hessian_trace`.

    python examples/landscape_views.py [--width 128] [--samples 8000] [--epochs 12]
                                       [--steps 21] [--out-dir examples]

Writes landscape_surface.png, landscape_plane.png (unaligned) and landscape_plane_wm.png
(B and C weight-matched to A), prints the Hessian table. A few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _mnist1d import batches_of, make_data, make_model, train_pair  # noqa: E402

from pymerge.align import weight_matching  # noqa: E402
from pymerge.landscape import (  # noqa: E402
    hessian_eigenvalues,
    hessian_trace,
    loss_plane,
    loss_surface,
)
from pymerge.landscape.plots import plot_surface  # noqa: E402
from pymerge.ops import interpolate  # noqa: E402
from pymerge.spec import apply_permutation  # noqa: E402


def run(width=128, depth=2, samples=8000, epochs=12, steps=21, out_dir=None, verbose=True):
    t0 = time.perf_counter()
    data = make_data(samples)
    a, b, c = train_pair(width, depth, data, epochs=epochs, seeds=(0, 1, 2))
    model = make_model(width, depth).eval()
    spec = model.spec()
    test = batches_of(data.x_test, data.y_test)
    hess_data = batches_of(data.x_train[:2000], data.y_train[:2000])
    model_a = copy.deepcopy(model)
    model_a.load_state_dict(a)
    surface = loss_surface(model_a, test, F.cross_entropy, "random", steps=steps, seed=0)
    pb = apply_permutation(spec, weight_matching(spec, a, b).perm, b)
    pc = apply_permutation(spec, weight_matching(spec, a, c).perm, c)
    plane = loss_plane(model, a, b, c, test, F.cross_entropy, steps=steps)
    plane_wm = loss_plane(model, a, pb, pc, test, F.cross_entropy, steps=steps)
    points = {
        "A": a,
        "B": b,
        "midpoint, unaligned": interpolate([a, b], [0.5, 0.5]),
        "midpoint, WM": interpolate([a, pb], [0.5, 0.5]),
    }
    hess = {}
    for name, state in points.items():
        m = copy.deepcopy(model)
        m.load_state_dict(state)
        top = hessian_eigenvalues(m, hess_data, F.cross_entropy, k=1, tol=1e-3, seed=0)
        tr = hessian_trace(m, hess_data, F.cross_entropy, tol=2e-2, max_iter=200, seed=0)
        with torch.no_grad():
            loss = sum(float(F.cross_entropy(m(x), y, reduction="sum")) for x, y in hess_data)
        loss /= sum(int(y.shape[0]) for _, y in hess_data)
        hess[name] = {
            "loss": loss,
            "top_eigenvalue": float(top.values[0]),
            "trace": float(tr.values[0]),
            "trace_se": float(tr.std_err[0]),
        }
    out = {
        "surface": surface,
        "plane": plane,
        "plane_wm": plane_wm,
        "hessian": hess,
        "seconds": time.perf_counter() - t0,
    }
    if out_dir is not None:
        plot_surface(
            surface,
            os.path.join(out_dir, "landscape_surface.png"),
            title="test loss around A (filter-normalised random directions)",
        )
        plot_surface(
            plane,
            os.path.join(out_dir, "landscape_plane.png"),
            title="test loss on the plane through A, B, C",
        )
        plot_surface(plane_wm, os.path.join(out_dir, "landscape_plane_wm.png"),
                     title="test loss on the plane through A, π(B), π(C) (WM to A)")  # fmt: skip
    if verbose:
        _print(out, width, depth, samples, epochs)
    return out


def _print(out, width, depth, samples, epochs):
    print(f"MNIST-1D ({samples} signals), MLP {depth}x{width}, SGD {epochs} epochs; "
          f"{out['seconds']:.0f}s")  # fmt: skip
    s = out["surface"].metrics["loss"]
    print(f"surface around A: test loss {s.min():.3f} .. {s.max():.3f} on the grid")
    for name in ("plane", "plane_wm"):
        z = out[name].metrics["loss"]
        print(f"{name}: test loss {z.min():.3f} .. {z.max():.3f}; C at {out[name].points['C']}")
    print(f"{'point':<22}{'train loss':>11}{'top eigenvalue':>16}{'trace':>12}{'± se':>9}")
    for name, h in out["hessian"].items():
        print(f"{name:<22}{h['loss']:>11.4f}{h['top_eigenvalue']:>16.4f}{h['trace']:>12.3f}"
              f"{h['trace_se']:>9.3f}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--samples", type=int, default=8000)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--steps", type=int, default=21)
    p.add_argument("--out-dir", default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    run(args.width, args.depth, args.samples, args.epochs, args.steps, args.out_dir)
    print(f"wrote landscape_surface.png, landscape_plane.png, landscape_plane_wm.png in "
          f"{args.out_dir}")  # fmt: skip


if __name__ == "__main__":
    main()
