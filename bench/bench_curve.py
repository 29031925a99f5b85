"""End-to-end LMC curve: ``interpolation_curve`` (fused permuted path) against
materialise-then-interpolate, and against the floor of bare forward evaluations.

Case: the MNIST-1D MLP shape at width 512 (40 -> 512 -> 512 -> 512 -> 10, 0.8M parameters,
float32), 4096 samples, 25 points, B aligned to A by a random permutation of every group.

Rows (same run, taking turns, medians of ``--repeats``):

* ``pymerge curve``: ``interpolation_curve(model, a, b, eval_fn, 25, spec=spec, perm=perm)``
  (the default, ``lambda_batch="auto"``: one λ at a time on CPU); θ(λ) is written straight
  into the work model's parameters by the fused permuted lerp (π(B) never built, nothing
  allocated per point, no ``load_state_dict`` copy).
* ``pymerge curve, batched 8`` / ``25``: the same with ``eval_fn=Evaluator((x, y))`` and
  ``lambda_batch=8`` / ``25``: θ(λ) for 8 (25) λ stacked along a leading dimension of every
  parameter, one ``torch.func.vmap(functional_call)`` forward per pass.
* ``pymerge curve, measure``: ``lambda_batch="measure"`` (times one point alone and 8 in
  one call, keeps the faster way; what ``"auto"`` does on CUDA).
* ``materialise + interpolate``: ``apply_permutation`` once, then for every λ
  ``pymerge.interpolate([a, pb], [1 - λ, λ])``, ``load_state_dict``, ``eval_fn`` (what 0.1
  did).
* ``materialise + torch lerp``: the same with a plain ``torch.lerp`` per tensor.
* ``floor: 25 forwards``: ``eval_fn`` 25 times on a model already loaded (no interpolation,
  no loading): the physical floor of any curve.

    python bench/bench_curve.py [--repeats 7] [--threads 1] [--samples 4096] [--width 512]
                                [--no-batched]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
import torch.nn.functional as F


def setup(width: int = 512, samples: int = 4096, seed: int = 0):
    from pymerge.spec import random_permutation
    from pymerge.testing.models import MLP

    torch.manual_seed(seed)
    model = MLP(40, (width, width, width), 10)
    a = {k: v.detach().clone() for k, v in model.state_dict().items()}
    b = {k: v.detach().clone() for k, v in MLP(40, (width, width, width), 10).state_dict().items()}
    spec = model.spec()
    perm = random_permutation(spec, b, seed=1)
    x = torch.randn(samples, 40)
    y = torch.randint(0, 10, (samples,))

    def eval_fn(m):
        with torch.no_grad():
            return float(F.cross_entropy(m(x), y))

    eval_fn.data = (x, y)
    return model.eval(), a, b, spec, perm, eval_fn


def run_pymerge(model, a, b, spec, perm, eval_fn, points, lambda_batch="auto"):
    from pymerge.landscape import interpolation_curve

    curve = interpolation_curve(
        model, a, b, eval_fn, points, spec=spec, perm=perm, lambda_batch=lambda_batch
    )
    return curve["loss"]


def run_materialise(model, a, b, spec, perm, eval_fn, points, lerp=False):
    from pymerge.ops import interpolate
    from pymerge.spec import apply_permutation

    pb = apply_permutation(spec, perm, b)
    work = copy.deepcopy(model)
    out = []
    for i in range(points):
        lam = i / (points - 1)
        if lerp:
            theta = {k: torch.lerp(a[k], pb[k], lam) for k in a}
        else:
            theta = interpolate([a, pb], [1.0 - lam, lam])
        work.load_state_dict(theta)
        out.append(eval_fn(work))
    return out


def run_floor(model, eval_fn, points):
    return [eval_fn(model) for _ in range(points)]


def interleaved_medians(rows, repeats: int) -> dict[str, tuple[float, float]]:
    """(median, min) seconds of each row, the rows taking turns (a change of machine load
    hits every row alike); one untimed warm-up call each."""
    for _, fn in rows:
        fn()
    times: dict[str, list[float]] = {name: [] for name, _ in rows}
    for _ in range(repeats):
        for name, fn in rows:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(ts), min(ts)) for name, ts in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--points", type=int, default=25)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--no-batched", action="store_true", help="skip the batched (vmap) rows")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, a, b, spec, perm, eval_fn = setup(args.width, args.samples)
    n = args.points
    from pymerge.landscape import Evaluator

    ev = Evaluator(eval_fn.data, accuracy=False)
    fused = run_pymerge(model, a, b, spec, perm, eval_fn, n)
    plain = run_materialise(model, a, b, spec, perm, eval_fn, n)
    assert max(abs(float(x) - y) for x, y in zip(fused, plain, strict=True)) < 1e-4
    stacked = run_pymerge(model, a, b, spec, perm, ev, n, lambda_batch=8)
    assert max(abs(float(x) - y) for x, y in zip(fused, stacked, strict=True)) < 1e-4
    rows = [
        (
            "pymerge curve (fused permuted)",
            lambda: run_pymerge(model, a, b, spec, perm, eval_fn, n),
        ),
        ("materialise + interpolate", lambda: run_materialise(model, a, b, spec, perm, eval_fn, n)),
        (
            "materialise + torch lerp",
            lambda: run_materialise(model, a, b, spec, perm, eval_fn, n, lerp=True),
        ),
        (f"floor: {n} forwards", lambda: run_floor(model, eval_fn, n)),
    ]
    if not args.no_batched:
        rows += [
            (
                "pymerge curve, batched 8",
                lambda: run_pymerge(model, a, b, spec, perm, ev, n, lambda_batch=8),
            ),
            (
                f"pymerge curve, batched {n}",
                lambda: run_pymerge(model, a, b, spec, perm, ev, n, lambda_batch=n),
            ),
            (
                "pymerge curve, measure",
                lambda: run_pymerge(model, a, b, spec, perm, ev, n, lambda_batch="measure"),
            ),
        ]
    load_before = os.getloadavg()[0]
    times = interleaved_medians(rows, args.repeats)
    load_after = os.getloadavg()[0]
    floor, floor_min = times[f"floor: {n} forwards"]
    ours, ours_min = times["pymerge curve (fused permuted)"]
    print(
        f"{n}-point curve, MLP 40-{args.width}x3-10, {args.samples} samples, "
        f"{torch.get_num_threads()} thread(s), median and min of {args.repeats}, "
        f"load average {load_before:.2f} before / {load_after:.2f} after"
    )
    print(
        f"{'row':<34}{'median ms':>10}{'x floor':>9}{'min ms':>9}{'x floor':>9}"
        f"{'t / t(pymerge)':>16}"
    )
    for name, (t, tmin) in times.items():
        print(
            f"{name:<34}{1e3 * t:>10.1f}{t / floor:>9.3f}{1e3 * tmin:>9.1f}"
            f"{tmin / floor_min:>9.3f}{t / ours:>16.2f}"
        )


if __name__ == "__main__":
    main()
