"""Fast twins of the reproductions in examples/ (small sizes): each asserts the direction of
its paper's claim (the full runs and their figures are in examples/RESULTS.md)."""

from __future__ import annotations

import math
import os
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


@pytest.fixture(autouse=True)
def _examples_on_path(one_thread):
    sys.path.insert(0, EXAMPLES)
    yield
    sys.path.remove(EXAMPLES)


def test_rebasin_width_twin():
    """Git Re-Basin: weight matching removes most of the barrier, at every width."""
    from rebasin_width import run

    out = run(widths=(32, 128), samples=4000, epochs=8, points=7,
              methods=("naive", "weight matching"), verbose=False)  # fmt: skip
    for r in out["rows"]:
        assert r["naive"] > 0.2, r  # a real barrier to remove
        assert r["weight matching"] < 0.3 * r["naive"], r
    assert out["claim"]["holds_20pct"], out["claim"]


def test_ito_alignment_twin():
    """Ito et al.: WM (and AM) align singular vectors, no permutation does not; the
    three-model barrier through the anchor is far below the unaligned one."""
    from ito_alignment import GAMMAS, run

    out = run(width=32, samples=4000, epochs=8, ste_steps=40, points=5, verbose=False)
    for g in GAMMAS:
        r = {m: v.R for m, v in out["svd"][g].items()}
        assert r["weight matching"] > r["none"] + 0.1, (g, r)
        assert r["activation matching"] > r["none"], (g, r)
        assert abs(r["none"]) < 0.1, (g, r)
    three = out["three"]
    assert three["weight matching"] < 0.5 * three["unaligned"], three


def test_repair_twin():
    """REPAIR / BN reset raise the accuracy of the weight-matched midpoint."""
    from repair_cnn import run

    out = run(epochs=4, points=3, verbose=False, curves_too=False)
    bn = out["rows"]["BatchNorm CNN"]
    assert bn["WM + REPAIR (BN reset)"] > bn["WM average"] + 0.02, bn
    assert bn["WM average"] > bn["naive average"], bn
    plain = out["rows"]["plain CNN"]
    assert plain["WM + REPAIR"] >= plain["WM average"] - 0.01, plain


def test_model_expansion_runs_end_to_end():
    """Model expansion: the pipeline (expansions, manifold sizes, fine-tuning, Spearman with
    its p-value). Not the claim's direction: at this size the gains are noise."""
    pytest.importorskip("scipy")
    import model_expansion

    small = dict(list(model_expansion.CANDIDATES.items())[:3])
    old = model_expansion.CANDIDATES
    model_expansion.CANDIDATES = small
    try:
        out = model_expansion.run(samples=2000, pretrain=2, finetune=1, steps=10, verbose=False)
    finally:
        model_expansion.CANDIDATES = old
    assert [r["rank"] for r in out["rows"]] == [1, 2, 3]
    rho, p = out["spearman"]
    assert -1.0 <= rho <= 1.0 and 0.0 <= p <= 1.0 or math.isnan(rho)
