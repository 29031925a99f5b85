"""Cost of a 21x21 loss surface against its floor: 441 bare forward evaluations.

    python bench/bench_slices.py [--repeats 3] [--steps 21] [--samples 4096] [--batch 1024]

Model: the MNIST-1D-sized MLP 40 -> 512 x 3 -> 10 (float32, eval mode); data: ``--samples``
random inputs made here with torch, in batches of ``--batch``. The floor is what any slice
must pay: for each of the steps² points, the loss over every batch with the model as it is
(``loss_fn(model(x), y)`` under ``torch.no_grad``), with nothing else done. pymerge's
``loss_surface`` (filter-normalised random directions) builds each point's parameters and
evaluates them with ``functional_call``; ``loss_plane`` (three models) likewise. Runs are
interleaved (floor, surface, plane, floor, ...); medians; ratio = surface / floor.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=21)
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1024)
    args = ap.parse_args()

    from pymerge.landscape import loss_plane, loss_surface
    from pymerge.testing.models import MLP

    torch.manual_seed(0)
    models = [MLP(40, (512, 512, 512), 10).eval() for _ in range(3)]
    model = models[0]
    x = torch.randn(args.samples, 40)
    y = torch.randint(0, 10, (args.samples,))
    batches = [(x[i : i + args.batch], y[i : i + args.batch]) for i in range(0, len(x), args.batch)]
    crit = nn.CrossEntropyLoss()
    points = args.steps * args.steps

    def floor() -> None:
        with torch.no_grad():
            for _ in range(points):
                total = 0.0
                for xb, yb in batches:
                    total += float(crit(model(xb), yb)) * len(xb)

    def surface() -> None:
        loss_surface(model, batches, crit, steps=args.steps)

    states = [m.state_dict() for m in models]

    def plane() -> None:
        loss_plane(model, *states, batches, crit, steps=args.steps)

    load0 = os.getloadavg()[0]
    runs: dict[str, list[float]] = {"floor": [], "surface": [], "plane": []}
    floor()  # warm-up
    for _ in range(args.repeats):
        for name, fn in (("floor", floor), ("surface", surface), ("plane", plane)):
            t = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(
        f"# {platform.node()} {platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average {load0:.2f} at start, "
        f"{os.getloadavg()[0]:.2f} at end"
    )
    print(
        f"# MLP 40-512x3-10, {args.samples} samples in batches of {args.batch}, "
        f"{args.steps}x{args.steps} = {points} points, medians of {args.repeats} interleaved runs"
    )
    print("| run | seconds | per point ms | x floor |")
    print("| --- | ---: | ---: | ---: |")
    for k in ("floor", "surface", "plane"):
        print(f"| {k} | {med[k]:.2f} | {1e3 * med[k] / points:.1f} | {med[k] / med['floor']:.3f} |")
    print(
        "# all runs (s): "
        + "; ".join(f"{k} {', '.join(f'{v:.2f}' for v in vs)}" for k, vs in runs.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
