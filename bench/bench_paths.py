"""Curved paths: the barrier of a trained Bézier curve (and polygonal chain) between two
unaligned MLPs against the straight line's.

    python bench/bench_paths.py [--width 512] [--depth 3] [--epochs 10] [--steps 3000]

Two MNIST-1D MLPs (40 -> width x depth -> 10; ``mnist1d`` data made offline, 4,000 training
and 1,000 test signals) trained from different seeds (Adam, batch 128), not aligned; then
``pymerge.connect`` trains the bend of each curve (Adam, ``--steps`` steps of one batch at
one t ~ U(0, 1)), and ``pymerge.path_curve`` evaluates the loss and accuracy at 25 points of t
on the training and test sets, along the curve and along the straight line. The barrier is
Git Re-Basin's: max_t L(t) − ½(L(0) + L(1)). Prints a table and writes ``--png`` (the curves).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch
from torch import nn


def _data():
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = 5000
    raw = make_dataset(args)
    x = torch.as_tensor(raw["x"], dtype=torch.float32)
    xt = torch.as_tensor(raw["x_test"], dtype=torch.float32)
    mean, std = x.mean(), x.std()
    return (
        (x - mean) / std,
        torch.as_tensor(raw["y"], dtype=torch.long),
        (xt - mean) / std,
        torch.as_tensor(raw["y_test"], dtype=torch.long),
    )


def _train(width, depth, x, y, seed, epochs):
    from pymerge.testing.models import MLP

    torch.manual_seed(seed)
    model = MLP(40, (width,) * depth, 10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    crit = nn.CrossEntropyLoss()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            idx = perm[i : i + 128]
            opt.zero_grad()
            crit(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--png", default=None, help="write the curves here")
    args = ap.parse_args()

    from pymerge.landscape import connect, path_curve

    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    x, y, xt, yt = _data()
    a = _train(args.width, args.depth, x, y, 1, args.epochs)
    b = _train(args.width, args.depth, x, y, 2, args.epochs)
    t_train = time.perf_counter() - t0
    crit = nn.CrossEntropyLoss()
    batches = [(x[i : i + 128], y[i : i + 128]) for i in range(0, len(x), 128)]
    acc = {"accuracy": lambda out, t: (out.argmax(1) == t).float().mean()}
    print(
        f"# {platform.node()} {platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average {load0:.2f} at start"
    )
    print(
        f"# MLP 40-{args.width}x{args.depth}-10 on MNIST-1D (4000 train / 1000 test), seeds 1 "
        f"and 2, {args.epochs} epochs each ({t_train:.0f} s); curves: Adam lr {args.lr:g}, "
        f"{args.steps} steps; 25 points of t"
    )
    print("| path | set | loss barrier | linear's | ratio | worst accuracy on the path | train s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    figures = {}
    for kind in ("bezier", "polychain"):
        t1 = time.perf_counter()
        path = connect(
            a,
            a.state_dict(),
            b.state_dict(),
            batches,
            crit,
            kind=kind,
            steps=args.steps,
            lr=args.lr,
            seed=0,
        )
        secs = time.perf_counter() - t1
        for name, data in (("train", (x, y)), ("test", (xt, yt))):
            c = path_curve(a, path, [data], crit, points=25, metrics=acc)
            lin, cur = c.barriers["linear"], c.barriers["curved"]
            print(
                f"| {kind} | {name} | {cur:.4f} | {lin:.4f} | {cur / lin:.3f} | "
                f"{c.metrics['accuracy'].min():.3f} (linear {c.linear['accuracy'].min():.3f}) "
                f"| {secs:.0f} |"
            )
            sys.stdout.flush()
            if name == "test":
                figures[kind] = (c.t, c.metrics["loss"])
                figures["linear"] = (c.t, c.linear["loss"])
    print(f"# load average {os.getloadavg()[0]:.2f} at end")
    if args.png:
        from pymerge.landscape.plots import plot_path_curves

        plot_path_curves(figures, args.png, ylabel="test loss", title="MNIST-1D MLPs, seeds 1, 2")
    return 0


if __name__ == "__main__":
    sys.exit(main())
