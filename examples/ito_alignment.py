"""Ito, Yamada, Kumagai (ICLR 2025) on MNIST-1D: weight matching aligns the singular vectors
with large singular values; activation matching behaves alike, the straight-through
estimator does not; and WM keeps models merged through an anchor connected, STE does not.

Three MLPs A, B, C are trained from different seeds. Part 1: the alignment score R
(:func:`pymerge.landscape.singular_vector_alignment`) of A and π(B) for no permutation, WM,
activation matching (AM) and STE (Adam 1e-3, the paper's alternative to SGD: with SGD 1e-2 the
permutation stays close to WM's over this budget), at γ = 0 and γ = 0.3 (γ relative to each
layer's σ_max; the paper's convention is unverified). Part 2, the three-model test: B → A and
C → A are matched (never B → C), then the test-loss barrier between π_B(B) and π_C(C) is
measured for WM and for STE, with the unaligned B-C barrier as reference.

    python examples/ito_alignment.py [--width 256] [--samples 10000] [--epochs 15]
                                     [--ste-steps 600] [--png ito_alignment.png]

Prints both tables, writes a PNG (R per layer and the singular-value spectra), checks the
claims. A few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _mnist1d import batches_of, make_data, make_model, match_all, train_pair  # noqa: E402

from pymerge.landscape import (  # noqa: E402
    Evaluator,
    interpolation_curve,
    loss_barrier,
    plot_svd_alignment,
    singular_vector_alignment,
)
from pymerge.spec import apply_permutation  # noqa: E402

GAMMAS = (0.0, 0.3)


def run(width=256, depth=3, samples=10_000, epochs=15, ste_steps=600, points=25, verbose=True):
    t0 = time.perf_counter()
    data = make_data(samples)
    a, b, c = train_pair(width, depth, data, epochs=epochs, seeds=(0, 1, 2))
    model = make_model(width, depth)
    spec = model.spec()
    test = Evaluator(batches_of(data.x_test, data.y_test))
    perms_b = {"none": None}
    ste = dict(ste_steps=ste_steps, ste_optimizer="adam", ste_lr=1e-3)
    perms_b.update(match_all(spec, model, a, b, data, **ste))
    svd = {
        g: {m: singular_vector_alignment(spec, a, b, perm=p, gamma=g) for m, p in perms_b.items()}
        for g in GAMMAS
    }
    # three models: B -> A and C -> A only
    perms_c = match_all(spec, model, a, c, data, methods=("weight matching", "STE"), **ste)
    three = {"unaligned": loss_barrier(interpolation_curve(model, b, c, test, points))}
    for m in ("weight matching", "STE"):
        pb = apply_permutation(spec, perms_b[m], b)
        pc = apply_permutation(spec, perms_c[m], c)
        three[m] = loss_barrier(interpolation_curve(model, pb, pc, test, points))
        # the pairs that were matched, for reference
        three[f"{m}: A-π(B)"] = loss_barrier(
            interpolation_curve(model, a, b, test, points, spec=spec, perm=perms_b[m])
        )
    claims = {
        "wm_beats_none_and_ste": all(
            svd[g]["weight matching"].R > svd[g]["none"].R
            and svd[g]["weight matching"].R > svd[g]["STE"].R
            for g in GAMMAS
        ),
        "three_model_wm_below_ste": three["weight matching"] < three["STE"],
    }
    out = {"svd": svd, "three": three, "claims": claims, "seconds": time.perf_counter() - t0}
    if verbose:
        _print(out, width, depth, samples, epochs, ste_steps)
    return out


def _print(out, width, depth, samples, epochs, ste_steps):
    svd = out["svd"]
    methods = list(svd[GAMMAS[0]])
    print(
        f"MNIST-1D ({samples} signals), MLP {depth}x{width}, SGD {epochs} epochs, "
        f"STE {ste_steps} steps; {out['seconds']:.0f}s"
    )
    print("alignment score R of A and π(B) (whole model)")
    print(f"{'gamma':>6}" + "".join(f"{m:>21}" for m in methods))
    for g in GAMMAS:
        print(f"{g:>6.1f}" + "".join(f"{svd[g][m].R:>21.4f}" for m in methods))
    print("per layer (γ = 0.3):")
    for layer in svd[0.3]["none"].layers:
        print(f"  {layer:<12}" + "".join(f"{svd[0.3][m].layers[layer].r:>21.4f}" for m in methods))
    print("three models, B -> A and C -> A only: test-loss barrier")
    for k, v in out["three"].items():
        print(f"  {k:<28} {v:.4f}")
    c = out["claims"]
    print(
        "claims: WM R > none and > STE at γ=0 and 0.3: "
        f"{'holds' if c['wm_beats_none_and_ste'] else 'FAILS'}; "
        f"barrier π_B(B)-π_C(C) lower with WM than STE: "
        f"{'holds' if c['three_model_wm_below_ste'] else 'FAILS'}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--samples", type=int, default=10_000)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--ste-steps", type=int, default=600)
    p.add_argument("--png", default=os.path.join(os.path.dirname(__file__), "ito_alignment.png"))
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = run(args.width, args.depth, args.samples, args.epochs, args.ste_steps)
    plot_svd_alignment(out["svd"][0.3], args.png, title="MNIST-1D MLP, A against π(B)")
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
