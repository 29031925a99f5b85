"""Minima-manifold size (Malviya et al. estimator): Cayley–Menger volumes, the simplex
estimate, expansions of an MLP and their ranking."""

from __future__ import annotations

import copy
import functools
import math

import numpy as np
import pytest
import torch

from pymerge.landscape import (
    cayley_menger_log_volume,
    expand_mlp,
    minima_manifold_size,
    rank_expansions,
)
from pymerge.testing.models import MLP


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Small matrices: one torch thread (a second one only waits on this busy machine)."""


def test_cayley_menger_volume_of_known_simplices():
    tri = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert float(cayley_menger_log_volume(tri)) == pytest.approx(math.log(0.5))
    tet = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    assert float(cayley_menger_log_volume(tet)) == pytest.approx(math.log(1 / 6))
    seg = torch.tensor([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0]])
    assert float(cayley_menger_log_volume(seg)) == pytest.approx(math.log(5.0))
    # a k-simplex in D dims: sqrt(det Gram) / k!; state dicts give the same as flat rows
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(4, 50, generator=g, dtype=torch.float64)
    e = pts[1:] - pts[0]
    want = 0.5 * math.log(float(torch.linalg.det(e @ e.T))) - math.log(6)
    assert float(cayley_menger_log_volume(pts)) == pytest.approx(want, rel=1e-9)
    dicts = [{"w": p[:30].reshape(5, 6), "b": p[30:]} for p in pts]
    assert float(cayley_menger_log_volume(dicts)) == pytest.approx(want, rel=1e-9)
    # degenerate: collinear points
    line = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])
    assert cayley_menger_log_volume(line) == -math.inf
    # differentiable: d logV / d x for the unit segment points along the segment
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0]], requires_grad=True)
    cayley_menger_log_volume(x).backward()
    torch.testing.assert_close(x.grad, torch.tensor([[-0.5, 0.0], [0.5, 0.0]]).double().float())


@functools.lru_cache(maxsize=1)
def _trained():
    torch.manual_seed(0)
    x = torch.randn(256, 6)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    m = MLP(6, (8, 8), 3)
    opt = torch.optim.Adam(m.parameters(), lr=3e-2)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval(), {k: v.detach().clone() for k, v in m.state_dict().items()}, x, y


def _trained_mlp():
    m, st, x, y = _trained()
    return copy.deepcopy(m), {k: v.clone() for k, v in st.items()}, x, y


@pytest.mark.parametrize(
    "kw",
    [
        {"widths": [12, 16]},
        {"widths": [12, 8], "method": "zero"},
        {"depth": 4},
        {"widths": [10, 10], "depth": 3},
    ],
)
def test_expansions_preserve_the_function(kw):
    m, st, x, _ = _trained_mlp()
    before = {k: v.clone() for k, v in st.items()}
    big, bst = expand_mlp(m, st, **kw)
    with torch.no_grad():
        torch.testing.assert_close(big(x), m(x), rtol=1e-5, atol=1e-5)
    if "widths" in kw:
        assert bst["fc0.weight"].shape[0] == kw["widths"][0]
    if "depth" in kw:
        assert big.num_hidden == kw["depth"]
    assert all(torch.equal(st[k], before[k]) for k in st)  # input untouched


def test_expansion_errors():
    m, st, _, _ = _trained_mlp()
    with pytest.raises(ValueError, match="smaller than the current width 8"):
        expand_mlp(m, st, widths=[4, 8])
    with pytest.raises(ValueError, match="2 hidden layers"):
        expand_mlp(m, st, widths=[8])
    with pytest.raises(ValueError, match="depth 1 is smaller"):
        expand_mlp(m, st, depth=1)
    with pytest.raises(ValueError, match="method must be one of"):
        expand_mlp(m, st, widths=[9, 9], method="copy")
    with pytest.raises(TypeError, match="MLP"):
        expand_mlp(torch.nn.Linear(2, 2), {}, depth=2)
    gelu = MLP(6, (8, 8), 3, act="gelu")
    with pytest.raises(ValueError, match="ReLU"):
        expand_mlp(gelu, gelu.state_dict(), depth=3)


def test_manifold_size_grows_a_low_loss_simplex():
    m, st, x, y = _trained_mlp()
    batches = [(x[:128], y[:128]), (x[128:], y[128:])]
    before = {k: v.clone() for k, v in st.items()}
    res = minima_manifold_size(m, st, batches, steps=20, eval_every=5, tolerance=0.1, seed=1)
    assert res.vertices == 2 and res.num_params == sum(v.numel() for v in st.values())
    assert res.threshold == pytest.approx(res.base_loss + 0.1)
    assert np.isfinite(res.log_volume) and res.log_volume > res.history[0]["log_volume"]
    ok = [h for h in res.history if h["max_loss"] <= res.threshold]
    assert res.log_volume == max(h["log_volume"] for h in ok)
    assert all(torch.equal(st[k], before[k]) for k in st)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    # the same seed gives the same estimate
    again = minima_manifold_size(m, st, batches, steps=20, eval_every=5, tolerance=0.1, seed=1)
    assert again.log_volume == res.log_volume
    # a sharper loss (the same model, loss x 20) leaves a smaller simplex under its bound
    sharp = minima_manifold_size(
        m,
        st,
        batches,
        lambda o, t: 20 * torch.nn.functional.cross_entropy(o, t),
        steps=20,
        eval_every=5,
        tolerance=0.1 * 20,
        seed=1,
    )
    assert sharp.log_volume < res.log_volume
    # a threshold below L(theta0): no simplex qualifies
    none = minima_manifold_size(m, st, batches, steps=10, threshold=res.base_loss - 1.0)
    assert none.log_volume == -math.inf


def test_manifold_bad_inputs():
    m, st, x, y = _trained_mlp()
    with pytest.raises(ValueError, match="batches is empty"):
        minima_manifold_size(m, st, [])
    with pytest.raises(ValueError, match="vertices must be an int >= 1"):
        minima_manifold_size(m, st, (x, y), vertices=0)
    with pytest.raises(ValueError, match="init_scale must be > 0"):
        minima_manifold_size(m, st, (x, y), init_scale=0.0)
    with pytest.raises(TypeError, match="0-d tensor"):
        minima_manifold_size(
            m, st, (x, y), lambda o, t: torch.nn.functional.cross_entropy(o, t, reduction="none")
        )
    nan = {**st, "out.bias": torch.full_like(st["out.bias"], float("nan"))}
    with pytest.raises(ValueError, match="loss of θ₀ is nan"):
        minima_manifold_size(m, nan, (x, y))


def test_rank_expansions_orders_by_log_volume():
    m, st, x, y = _trained_mlp()
    cands = {"same": (m, st), "wider": expand_mlp(m, st, widths=[16, 16], method="zero")}
    ranks = rank_expansions(cands, (x, y), steps=10, eval_every=5)
    assert [r.rank for r in ranks] == [1, 2]
    assert ranks[0].log_volume >= ranks[1].log_volume
    assert {r.name for r in ranks} == set(cands)
    with pytest.raises(ValueError, match="non-empty mapping"):
        rank_expansions({}, (x, y))
    with pytest.raises(TypeError, match="pair"):
        rank_expansions({"x": m}, (x, y))
