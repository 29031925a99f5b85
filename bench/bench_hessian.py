"""Top Hessian eigenvalue: pymerge against PyHessian on the same model, data and tolerance.

    python bench/bench_hessian.py [--repeats 5] [--tol 1e-3] [--quick]

Models (float32, trained briefly so the spectrum is that of a trained network, in eval mode
for both libraries, as PyHessian puts the model in eval mode itself):

* ``mlp``: MNIST-1D-sized MLP 40 -> 512 x 3 -> 10 on MNIST-1D (``mnist1d``, made offline;
  4,000 training signals).
* ``cnn``: a small CNN (``pymerge.testing.models.CNN``, widths 16/32/32, BatchNorm, global
  pooling) on the 8x8 digits of ``sklearn.datasets.load_digits`` (1,797 images).

Data: the same tensors for both, in two forms: ``one batch`` (2,048 samples / every digit:
PyHessian's ``data=(x, y)`` mode, which builds the gradient graph once and reuses it for every
product) and ``streamed`` (4 batches: PyHessian's ``dataloader=`` mode, which rebuilds it for
each batch of each product; pymerge streams the same batches).

Fairness: both stop on the same rule (relative change of the estimate between iterations
below ``tol``, PyHessian's rule, which pymerge uses for Lanczos too), with the same iteration
cap (100); both start from a seeded random vector; PyHessian's construction (its first
forward/backward) is timed as part of its call; the model's ``.grad`` is cleared before each
PyHessian run (its single-batch mode accumulates into ``.grad``). Runs are interleaved
(pymerge, PyHessian, pymerge, ...), medians reported. The accuracy of each result is checked
against a tight reference (Lanczos, tol 1e-10, 300 steps): the speed-up must not come from a
looser answer.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
from torch import nn


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int = 0):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    crit = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0])
        for i in range(0, x.shape[0], 128):
            idx = perm[i : i + 128]
            opt.zero_grad()
            crit(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.zero_grad(set_to_none=True)
    return acc


def mlp_case(quick: bool):
    from mnist1d.data import get_dataset_args, make_dataset

    from pymerge.testing.models import MLP

    args = get_dataset_args()
    args.num_samples = 5000
    raw = make_dataset(args)
    x = torch.as_tensor(raw["x"], dtype=torch.float32)
    x = (x - x.mean()) / x.std()
    y = torch.as_tensor(raw["y"], dtype=torch.long)
    torch.manual_seed(0)
    model = MLP(40, (512, 512, 512), 10)
    acc = _train(model, x, y, epochs=2 if quick else 8)
    n = 1024 if quick else 2048
    return "mlp 40-512x3-10", model, x[:n], y[:n], acc


def cnn_case(quick: bool):
    from sklearn.datasets import load_digits

    from pymerge.testing.models import CNN

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.as_tensor(d.target, dtype=torch.long)
    torch.manual_seed(0)
    model = CNN(in_channels=1, widths=(16, 32, 32), num_classes=10, norm="bn", image_size=8)
    acc = _train(model, x, y, epochs=3 if quick else 15)
    n = 512 if quick else x.shape[0]
    return "cnn 16-32-32 (bn)", model, x[:n], y[:n], acc


def run_pymerge(model, batches, crit, tol: float, seed: int):
    from pymerge.landscape import hessian_eigenvalues

    r = hessian_eigenvalues(model, batches, crit, k=1, tol=tol, max_iter=100, seed=seed)
    return r.values[0], r.extras["hvps"]


def run_pyhessian(model, batches, crit, tol: float, seed: int):
    from pyhessian import hessian

    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    if len(batches) == 1:
        h = hessian(model, crit, data=batches[0], cuda=False)
    else:
        h = hessian(model, crit, dataloader=batches, cuda=False)
    values, _ = h.eigenvalues(maxIter=100, tol=tol, top_n=1)
    model.zero_grad(set_to_none=True)
    return values[0], None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--quick", action="store_true", help="small data, 2 repeats (a smoke test)")
    args = ap.parse_args()
    repeats = 2 if args.quick else args.repeats
    try:
        import pyhessian  # noqa: F401
    except ImportError:
        print("needs PyHessian: pip install pyhessian (the bench extra)", file=sys.stderr)
        return 2
    from pymerge.landscape import hessian_eigenvalues

    crit = nn.CrossEntropyLoss()
    print(
        f"# {platform.node()} {platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f} at start"
    )
    print(f"# tol {args.tol:g}, max_iter 100, top-1 eigenvalue, {repeats} interleaved repeats")
    print(
        "| model | data | pymerge s | PyHessian s | speed-up (wall) | speed-up (CPU time) | "
        "pymerge HVPs | pymerge rel. err | PyHessian rel. err |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for make in (mlp_case, cnn_case):
        name, model, x, y, acc = make(args.quick)
        n = x.shape[0]
        forms = {
            f"one batch of {n}": [(x, y)],
            f"streamed, 4 batches of {n // 4}": [
                (x[i : i + n // 4], y[i : i + n // 4]) for i in range(0, 4 * (n // 4), n // 4)
            ],
        }
        for form, batches in forms.items():
            ref = hessian_eigenvalues(
                model, batches, crit, k=1, tol=1e-10, max_iter=300, seed=123
            ).values[0]
            times: dict[str, list[float]] = {"pymerge": [], "pyhessian": []}
            cpu: dict[str, list[float]] = {"pymerge": [], "pyhessian": []}
            errs: dict[str, list[float]] = {"pymerge": [], "pyhessian": []}
            hvps = []
            for r in range(repeats):
                for lib, fn in (("pymerge", run_pymerge), ("pyhessian", run_pyhessian)):
                    t, c = time.perf_counter(), time.process_time()
                    val, count = fn(model, batches, crit, args.tol, r)
                    times[lib].append(time.perf_counter() - t)
                    cpu[lib].append(time.process_time() - c)
                    errs[lib].append(abs(val - ref) / abs(ref))
                    if count is not None:
                        hvps.append(count)
            tp, th = statistics.median(times["pymerge"]), statistics.median(times["pyhessian"])
            cp, ch = statistics.median(cpu["pymerge"]), statistics.median(cpu["pyhessian"])
            print(
                f"| {name} (train acc {acc:.2f}) | {form} | {tp:.2f} | {th:.2f} | "
                f"{th / tp:.2f}x | {ch / cp:.2f}x | {int(np.median(hvps))} | "
                f"{np.median(errs['pymerge']):.1e} | {np.median(errs['pyhessian']):.1e} |"
            )
            sys.stdout.flush()
    print(
        f"# load average {os.getloadavg()[0]:.2f} at end; top eigenvalue reference: Lanczos "
        f"tol 1e-10; CPU time = this process's user+system time (less sensitive to other load)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
