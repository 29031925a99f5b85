"""Malviya et al. (2024) on MNIST-1D: the size of the manifold of linearly connected minima
around an expanded model predicts how much the expansion gains.

A small MLP (2 hidden layers of 32) is pre-trained briefly; several function-preserving
expansions of it are made (:func:`pymerge.landscape.expand_mlp`: Net2Net widening with a
little noise, zero-initialised new units, identity layers for depth, and combinations); for
each, the manifold size is estimated at the expanded starting point
(:func:`pymerge.landscape.minima_manifold_size`: a 2-simplex grown from θ₀, its
Cayley–Menger log-volume under a loss bound: **an estimator of the paper's quantity, not its
exact metric**), then every candidate, and the unexpanded model, are fine-tuned with the same
budget. The gain is the candidate's test accuracy minus that of the unexpanded model after
the same fine-tuning. Reported: Spearman's rank correlation between log-volume and gain,
with its p-value (scipy), and, as a check on the obvious confound, between the number of
parameters and gain.

    python examples/model_expansion.py [--samples 6000] [--pretrain 6] [--finetune 6]
                                       [--steps 150] [--png model_expansion.png]

A few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _mnist1d import batches_of, evaluate, make_data, make_model, train  # noqa: E402

from pymerge.landscape import expand_mlp, rank_expansions  # noqa: E402

CANDIDATES = {
    "net2net 48": {"widths": [48, 48]},
    "net2net 64": {"widths": [64, 64]},
    "net2net 128": {"widths": [128, 128]},
    "zero 64": {"widths": [64, 64], "method": "zero"},
    "zero 128": {"widths": [128, 128], "method": "zero"},
    "deeper 3": {"depth": 3},
    "deeper 4": {"depth": 4},
    "net2net 64 + deeper 3": {"widths": [64, 64], "depth": 3},
}


def run(samples=6000, pretrain=6, finetune=6, steps=150, lr=0.05, verbose=True):
    from scipy.stats import spearmanr

    t0 = time.perf_counter()
    data = make_data(samples)
    torch.manual_seed(0)
    base = make_model(32, 2)
    base_state = train(base, data, epochs=pretrain, lr=lr, optimizer="sgd", seed=0)
    base_acc = evaluate(base, data.x_test, data.y_test)["accuracy"]
    cands = {}
    for name, kw in CANDIDATES.items():
        noise = 0.01 if kw.get("method", "net2net") == "net2net" and "widths" in kw else 0.0
        cands[name] = expand_mlp(base, base_state, noise=noise, seed=1, **kw)
    train_batches = batches_of(data.x_train, data.y_train, 256)
    eval_batches = batches_of(data.x_train[:2000], data.y_train[:2000], 1000)
    ranks = rank_expansions(
        cands, train_batches, steps=steps, eval_batches=eval_batches, eval_every=10, seed=0
    )
    # the same fine-tuning budget for every candidate and for the unexpanded model
    tuned = copy.deepcopy(base)
    train(tuned, data, epochs=finetune, lr=lr, optimizer="sgd", seed=5)
    ref = evaluate(tuned, data.x_test, data.y_test)["accuracy"]
    rows = []
    for r in ranks:
        model, state = cands[r.name]
        m = copy.deepcopy(model)
        m.load_state_dict(state)
        train(m, data, epochs=finetune, lr=lr, optimizer="sgd", seed=5)
        acc = evaluate(m, data.x_test, data.y_test)["accuracy"]
        params = sum(v.numel() for v in state.values())
        rows.append(
            {"name": r.name, "rank": r.rank, "log_volume": r.log_volume, "params": params,
             "accuracy": acc, "gain": acc - ref}
        )  # fmt: skip
    rho, p = spearmanr([r["log_volume"] for r in rows], [r["gain"] for r in rows])
    rho_n, p_n = spearmanr([r["params"] for r in rows], [r["gain"] for r in rows])
    out = {
        "rows": rows,
        "base_accuracy": base_acc,
        "reference_accuracy": ref,
        "spearman": (float(rho), float(p)),
        "spearman_params": (float(rho_n), float(p_n)),
        "seconds": time.perf_counter() - t0,
    }
    if verbose:
        _print(out, samples, pretrain, finetune, steps)
    return out


def _print(out, samples, pretrain, finetune, steps):
    print(
        f"MNIST-1D ({samples} signals): MLP 2x32 pre-trained {pretrain} epochs "
        f"(test acc {out['base_accuracy']:.3f}); every model fine-tuned {finetune} epochs "
        f"(unexpanded: {out['reference_accuracy']:.3f}); simplex {steps} steps; "
        f"{out['seconds']:.0f}s"
    )
    print(f"{'candidate':<24}{'rank':>5}{'log V':>9}{'params':>9}{'test acc':>10}{'gain':>9}")
    for r in out["rows"]:
        print(
            f"{r['name']:<24}{r['rank']:>5}{r['log_volume']:>9.3f}{r['params']:>9}"
            f"{r['accuracy']:>10.4f}{r['gain']:>+9.4f}"
        )
    rho, p = out["spearman"]
    rn, pn = out["spearman_params"]
    print(f"Spearman(log V, gain) = {rho:+.3f} (p = {p:.3g}); "
          f"Spearman(#params, gain) = {rn:+.3f} (p = {pn:.3g})")  # fmt: skip


def plot(out, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for r in out["rows"]:
        ax.plot(r["log_volume"], r["gain"], "o")
        ax.annotate(r["name"], (r["log_volume"], r["gain"]), fontsize=7,
                    textcoords="offset points", xytext=(4, 3))  # fmt: skip
    rho, p = out["spearman"]
    ax.set_xlabel("manifold size estimate (simplex log-volume)")
    ax.set_ylabel("test-accuracy gain after fine-tuning")
    ax.set_title(f"expansions of an MLP: Spearman ρ = {rho:.2f} (p = {p:.2g})")
    ax.grid(alpha=0.3)
    fig.savefig(path, format="png", bbox_inches="tight")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=6000)
    p.add_argument("--pretrain", type=int, default=6)
    p.add_argument("--finetune", type=int, default=6)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--png", default=os.path.join(os.path.dirname(__file__), "model_expansion.png"))
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = run(args.samples, args.pretrain, args.finetune, args.steps)
    plot(out, args.png)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
