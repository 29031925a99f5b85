"""REPAIR (Jordan et al. 2022) on a small CNN: after weight matching, the midpoint of two
networks suffers variance collapse; rescaling its channels to the interpolated statistics of
the endpoints (REPAIR), or recomputing BatchNorm statistics for a BatchNorm network, recovers
much of the lost accuracy.

Data: scikit-learn's 8x8 digits (1797 images, offline), 80/20 split. Two CNNs of each kind
(3 conv layers 16-32-64 without normalisation, and the same with BatchNorm) are trained from
different seeds, B is weight-matched to A, and the merge ½(A + π(B)) is evaluated as it is
and after REPAIR (``pymerge.align.repair``; for the BatchNorm net this is the statistics
reset, ``pymerge.align.reset_bn_stats``). The whole test-error curve along λ is drawn with
and without the correction at every point (``interpolation_curve(prepare="repair" /
"reset_bn")``).

    python examples/repair_cnn.py [--epochs 30] [--points 11] [--png repair_cnn.png]

About a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
import torch.nn.functional as F

from pymerge.align import repair, reset_bn_stats, weight_matching
from pymerge.landscape import Evaluator, interpolation_curve, plot_curves
from pymerge.ops import interpolate
from pymerge.spec import apply_permutation
from pymerge.testing.models import CNN


def digits(seed: int = 0):
    """Standardised 8x8 digits as [N, 1, 8, 8] float32, 80/20 split (seeded)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.as_tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(x.shape[0], generator=g)
    n = int(0.8 * x.shape[0])
    tr, te = order[:n], order[n:]
    mean, std = x[tr].mean(), x[tr].std()
    return (x[tr] - mean) / std, y[tr], (x[te] - mean) / std, y[te]


def make(norm: str) -> CNN:
    return CNN(1, (16, 32, 64), 10, norm=norm, image_size=8)


def train(model, x, y, *, epochs: int, seed: int, lr: float = 0.05, batch: int = 64):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = epochs * (-(-x.shape[0] // batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], batch):
            idx = order[i : i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run(epochs: int = 30, points: int = 11, verbose: bool = True, curves_too: bool = True):
    t0 = time.perf_counter()
    xtr, ytr, xte, yte = digits()
    train_batches = [(xtr[i : i + 256], ytr[i : i + 256]) for i in range(0, xtr.shape[0], 256)]
    test = Evaluator((xte, yte))
    out = {}
    curves = {}
    for norm, label in (("none", "plain CNN"), ("bn", "BatchNorm CNN")):
        states = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            states.append(train(make(norm), xtr, ytr, epochs=epochs, seed=seed))
        a, b = states
        model = make(norm).eval()
        spec = model.spec()
        perm = weight_matching(spec, a, b).perm
        pb = apply_permutation(spec, perm, b)
        row = {}
        for name, s in (("A", a), ("B", b)):
            model.load_state_dict(s)
            row[name] = test(model)["accuracy"]
        merged = copy.deepcopy(model)
        merged.load_state_dict(interpolate([a, b], [0.5, 0.5]))
        row["naive average"] = test(merged)["accuracy"]
        merged.load_state_dict(interpolate([a, pb], [0.5, 0.5]))
        row["WM average"] = test(merged)["accuracy"]
        ma, mb = copy.deepcopy(model), copy.deepcopy(model)
        ma.load_state_dict(a)
        mb.load_state_dict(pb)
        if norm == "bn":
            fixed = reset_bn_stats(merged, train_batches)
            row["WM + REPAIR (BN reset)"] = test(fixed)["accuracy"]
            prepare = "reset_bn"
        else:
            fixed = repair(ma, mb, merged, train_batches, alpha=0.5)
            row["WM + REPAIR"] = test(fixed)["accuracy"]
            prepare = "repair"
        out[label] = row
        if not curves_too:
            continue
        curves[f"{label}, WM"] = interpolation_curve(
            model, a, b, test, points, spec=spec, perm=perm
        )
        curves[f"{label}, WM + {prepare}"] = interpolation_curve(
            model, a, b, test, points, spec=spec, perm=perm, prepare=prepare,
            prepare_batches=train_batches,
        )  # fmt: skip
    res = {"rows": out, "curves": curves, "seconds": time.perf_counter() - t0}
    if verbose:
        _print(res, epochs)
    return res


def _print(res, epochs):
    print(f"digits 8x8, CNN 16-32-64, SGD {epochs} epochs; test accuracy ({res['seconds']:.0f}s)")
    for label, row in res["rows"].items():
        print(f"  {label}")
        for k, v in row.items():
            print(f"    {k:<24} {v:.4f}")
        fixed = [v for k, v in row.items() if "REPAIR" in k][0]
        ends = 0.5 * (row["A"] + row["B"])
        gap = ends - row["WM average"]
        closed = (fixed - row["WM average"]) / gap if gap > 0 else float("nan")
        print(
            f"    REPAIR closes {100 * closed:.0f}% of the gap between the WM merge and "
            "the endpoints"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--points", type=int, default=11)
    p.add_argument("--png", default=os.path.join(os.path.dirname(__file__), "repair_cnn.png"))
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    res = run(args.epochs, args.points)
    plot_curves(res["curves"], args.png, metrics=["accuracy"], title="test error along λ")
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
