"""Linear mode connectivity on MNIST-1D before and after weight matching.

Trains the same 3-hidden-layer MLP twice from different seeds on locally generated
MNIST-1D (20 000 samples by default), then compares the test-loss barrier of the linear
path θ_A → θ_B with the path θ_A → π(θ_B) after :func:`pymerge.weight_matching`.

    python examples/mnist1d_barrier.py [--width 512] [--samples 20000] [--epochs 20]

Training: SGD (momentum 0.9, lr 0.05, cosine decay), batch 128, seeds 0 and 1 (init and
data order). About a minute on one core.

Prints a table of barriers (three definitions) for loss and error, and the reduction.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _mnist1d import evaluate, make_data, make_model, train  # noqa: E402

from pymerge import interpolate  # noqa: E402
from pymerge.align import align_to_anchor, merge_many, weight_matching  # noqa: E402
from pymerge.landscape import (  # noqa: E402
    BARRIER_KINDS,
    error_barrier,
    interpolation_curve,
    loss_barrier,
)
from pymerge.spec import apply_permutation  # noqa: E402


def run(
    width=512,
    depth=3,
    samples=20_000,
    epochs=20,
    lr=0.05,
    points=25,
    seeds=(0, 1),
    optimizer="sgd",
    three=False,
    verbose=True,
):
    """Train two models (three with ``three=True``), weight-match, and return a dict of
    barriers and timings."""
    if three and len(seeds) < 3:
        seeds = (*seeds, max(seeds) + 1)
    t0 = time.perf_counter()
    data = make_data(samples)
    states = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = make_model(width, depth)
        states.append(train(model, data, epochs=epochs, lr=lr, optimizer=optimizer, seed=seed))
    t_train = time.perf_counter() - t0
    spec = make_model(width, depth).spec()
    a, b = states[:2]
    res = weight_matching(spec, a, b, seed=0)
    model = make_model(width, depth)

    def eval_fn(m):
        return evaluate(m, data.x_test, data.y_test)

    out = {
        "train_seconds": t_train,
        "wm_seconds": res.history.total_seconds,
        "wm_iterations": res.history.iterations,
    }
    for name, perm in (("naive", None), ("weight matching", res.perm)):
        # the aligned curve runs on the fused permuted path: π(B) is never built
        curve = interpolation_curve(model, a, b, eval_fn, points, spec=spec, perm=perm)
        out[name] = {
            "endpoint_loss": (float(curve["loss"][0]), float(curve["loss"][-1])),
            "endpoint_acc": (float(curve["accuracy"][0]), float(curve["accuracy"][-1])),
            **{f"loss_{k}": loss_barrier(curve, k) for k in BARRIER_KINDS},
            **{f"error_{k}": error_barrier(curve, k) for k in BARRIER_KINDS},
        }
    naive, matched = out["naive"]["loss_rebasin"], out["weight matching"]["loss_rebasin"]
    out["loss_reduction"] = 1.0 - matched / naive
    if three:
        out["three"] = _three_models(spec, states[:3], model, eval_fn, points)
    if verbose:
        print(
            f"MNIST-1D, {samples} samples, MLP {depth}x{width}, {optimizer} lr={lr}, "
            f"{epochs} epochs "
            f"(training {t_train:.1f}s, weight matching {out['wm_seconds']:.2f}s, "
            f"{out['wm_iterations']} sweeps)"
        )
        acc = out["naive"]["endpoint_acc"]
        loss = out["naive"]["endpoint_loss"]
        print(
            f"endpoints: test loss {loss[0]:.4f} / {loss[1]:.4f}, "
            f"accuracy {acc[0]:.4f} / {acc[1]:.4f}"
        )
        print(
            f"{'path':<16}"
            + "".join(f"{'loss ' + k:>16}" for k in BARRIER_KINDS)
            + "".join(f"{'error ' + k:>16}" for k in BARRIER_KINDS)
        )
        for name in ("naive", "weight matching"):
            row = out[name]
            print(
                f"{name:<16}"
                + "".join(f"{row['loss_' + k]:>16.4f}" for k in BARRIER_KINDS)
                + "".join(f"{row['error_' + k]:>16.4f}" for k in BARRIER_KINDS)
            )
        print(
            f"test-loss barrier (Git Re-Basin definition) reduced by "
            f"{100 * out['loss_reduction']:.1f}%"
        )
        if three:
            _print_three(out["three"])
    return out


def _three_models(spec, states, model, eval_fn, points):
    """Ito et al.'s setting: B and C matched to anchor A only; then the barrier between the
    aligned B and C (never matched to each other), and merges of all three."""
    perms = align_to_anchor(spec, states, anchor=0).perms
    b_al, c_al = (apply_permutation(spec, p, s) for p, s in zip(perms[1:], states[1:], strict=True))
    out = {}
    for name, (x, y) in (("B-C naive", (states[1], states[2])), ("B-C via anchor", (b_al, c_al))):
        curve = interpolation_curve(model, x, y, eval_fn, points)
        out[name] = {"loss_rebasin": loss_barrier(curve), "error_rebasin": error_barrier(curve)}
    mm = merge_many(spec, states, seed=0)
    thirds = [1 / 3] * 3
    anchored = [apply_permutation(spec, p, s) for p, s in zip(perms, states, strict=True)]
    for name, merged in (
        ("average, unaligned", interpolate(states, thirds)),
        ("average, anchored WM", interpolate(anchored, thirds)),
        ("MergeMany", mm.extras["merged_state"]),
    ):
        model.load_state_dict(merged)
        out[name] = eval_fn(model)
    return out


def _print_three(res):
    print("three models (B, C matched to anchor A only):")
    for name in ("B-C naive", "B-C via anchor"):
        r = res[name]
        print(f"  barrier {name:<16} loss {r['loss_rebasin']:.4f}  error {r['error_rebasin']:.4f}")
    for name in ("average, unaligned", "average, anchored WM", "MergeMany"):
        r = res[name]
        print(f"  merged {name:<22} test loss {r['loss']:.4f}  accuracy {r['accuracy']:.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--samples", type=int, default=20_000)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    p.add_argument("--points", type=int, default=25)
    p.add_argument(
        "--three",
        action="store_true",
        help="also train a third model: transitive alignment through an anchor, "
        "and merges of all three (averaging, MergeMany)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: these small matrices gain little from more, "
        "and a shared machine makes extra threads much slower)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    run(
        args.width,
        args.depth,
        args.samples,
        args.epochs,
        args.lr,
        args.points,
        optimizer=args.optimizer,
        three=args.three,
    )


if __name__ == "__main__":
    main()
