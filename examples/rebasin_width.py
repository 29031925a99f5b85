"""Git Re-Basin (Ainsworth et al. 2022), Figure 2's claim on MNIST-1D: the loss barrier
between two independently trained MLPs falls with width and nearly vanishes after matching.

For each hidden width (32 → 1024 by default, 3 hidden layers), two MLPs are trained from
different seeds on locally generated MNIST-1D; B is aligned to A by weight matching (WM),
activation matching (AM) and the straight-through estimator (STE), and the test-loss barrier
(Git Re-Basin's definition, 25 points) of each linear path is measured, with the naive
(unaligned) path as reference.

    python examples/rebasin_width.py [--widths 32 64 128 256 512 1024] [--samples 10000]
                                     [--epochs 15] [--ste-steps 150] [--png rebasin_width.png]

Prints tables (test- and train-loss barrier per method and width, WM / naive), writes a PNG
of barrier against width, and checks the claim on both: at the largest width the WM barrier
is at most 20% of the naive one, and it decreases with width (exceptions are printed).
About 5 minutes on 2 idle cores (10 on a busy machine; width 1024 takes most of it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _mnist1d import batches_of, make_data, make_model, match_all, train_pair  # noqa: E402

from pymerge.landscape import Evaluator, interpolation_curve, loss_barrier  # noqa: E402

METHODS = ("naive", "weight matching", "activation matching", "STE")


def run(
    widths=(32, 64, 128, 256, 512, 1024),
    depth=3,
    samples=10_000,
    epochs=15,
    points=25,
    ste_steps=150,
    methods=METHODS,
    verbose=True,
):
    """Barriers per width and method; returns {"rows": [...], "claim": {...}}."""
    t0 = time.perf_counter()
    data = make_data(samples)
    test = Evaluator(batches_of(data.x_test, data.y_test))
    train_eval = Evaluator(batches_of(data.x_train[:2000], data.y_train[:2000]))
    rows = []
    for w in widths:
        t = time.perf_counter()
        a, b = train_pair(w, depth, data, epochs=epochs)
        model = make_model(w, depth)
        spec = model.spec()
        perms = {"naive": None}
        perms.update(match_all(spec, model, a, b, data, methods=methods, ste_steps=ste_steps))
        row = {"width": w, "train": {}}
        for name in methods:
            curve = interpolation_curve(model, a, b, test, points, spec=spec, perm=perms[name])
            row[name] = loss_barrier(curve)
            on_train = interpolation_curve(
                model, a, b, train_eval, points, spec=spec, perm=perms[name]
            )
            row["train"][name] = loss_barrier(on_train)
            if name == "naive":
                row["acc"] = (float(curve["accuracy"][0]), float(curve["accuracy"][-1]))
        row["seconds"] = time.perf_counter() - t
        rows.append(row)
        if verbose:
            print(
                f"width {w:5d}: "
                + "  ".join(f"{n} {row[n]:.4f}" for n in methods)
                + f"  ({row['seconds']:.0f}s)",
                flush=True,
            )
    claim = _claim(rows)
    claim_train = _claim([{"width": r["width"], **r["train"]} for r in rows])
    out = {
        "rows": rows,
        "claim": claim,
        "claim_train": claim_train,
        "seconds": time.perf_counter() - t0,
        "methods": methods,
    }
    if verbose:
        _print(out, samples, epochs, depth)
    return out


def _claim(rows):
    wm = [r["weight matching"] for r in rows]
    last = rows[-1]
    ratio = last["weight matching"] / last["naive"] if last["naive"] > 0 else float("nan")
    rises = [
        (rows[i]["width"], rows[i + 1]["width"]) for i in range(len(rows) - 1) if wm[i + 1] > wm[i]
    ]
    return {
        "largest_width": last["width"],
        "wm_over_naive": ratio,
        "holds_20pct": bool(ratio <= 0.2),
        "decreasing": not rises,
        "exceptions": rises,
    }


def _print(out, samples, epochs, depth):
    methods = out["methods"]
    print(
        f"\nMNIST-1D ({samples} signals), MLP {depth} hidden layers, SGD {epochs} epochs; "
        f"test-loss barrier (Git Re-Basin), {out['seconds']:.0f}s"
    )
    print(
        f"{'width':>6} {'acc A/B':>13}"
        + "".join(f"{m:>21}" for m in methods)
        + f"{'WM / naive':>12}"
    )
    for r in out["rows"]:
        ratio = r["weight matching"] / r["naive"] if r["naive"] > 0 else float("nan")
        print(
            f"{r['width']:>6} {r['acc'][0]:>6.3f}/{r['acc'][1]:.3f}"
            + "".join(f"{r[m]:>21.4f}" for m in methods)
            + f"{ratio:>12.3f}"
        )
    print("train-loss barrier (2000 training signals)")
    for r in out["rows"]:
        print(f"{r['width']:>6} {'':>13}" + "".join(f"{r['train'][m]:>21.4f}" for m in methods))
    for label, c in (("test", out["claim"]), ("train", out["claim_train"])):
        print(
            f"claim ({label} loss): WM barrier <= 20% of naive at width {c['largest_width']}: "
            f"{100 * c['wm_over_naive']:.1f}% -> {'holds' if c['holds_20pct'] else 'FAILS'}; "
            f"WM barrier decreasing with width: {'yes' if c['decreasing'] else 'no'}"
            + (f" (rises between widths {c['exceptions']})" if c["exceptions"] else "")
        )


def plot(out, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    widths = [r["width"] for r in out["rows"]]
    for i, (label, get) in enumerate(
        (("test", lambda r, m: r[m]), ("train", lambda r, m: r["train"][m]))
    ):
        ax = fig.add_subplot(1, 2, i + 1)
        for m in out["methods"]:
            ax.plot(widths, [get(r, m) for r in out["rows"]], "-o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("hidden width")
        ax.set_ylabel(f"{label}-loss barrier (Git Re-Basin)")
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.legend()
        ax.grid(alpha=0.3)
        ax.set_title(f"MNIST-1D MLP: {label}-loss barrier against width")
    fig.savefig(path, format="png", bbox_inches="tight")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024])
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--samples", type=int, default=10_000)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--points", type=int, default=25)
    p.add_argument("--ste-steps", type=int, default=150)
    p.add_argument("--png", default=os.path.join(os.path.dirname(__file__), "rebasin_width.png"))
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = run(args.widths, args.depth, args.samples, args.epochs, args.points, args.ste_steps)
    plot(out, args.png)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
