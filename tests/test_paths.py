"""Curved paths: the bar (a Bézier path between two unaligned MLPs has at most 25% of the
linear path's barrier) on a small fast case, the curve's algebra, flags and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from pymerge.landscape import CurvedPath, PathCurve, connect, path_curve
from pymerge.testing.models import MLP

CRIT = nn.CrossEntropyLoss()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread (a second one only adds hand-off overhead, and on a
    busy machine OpenMP's waits dominate)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _spirals(n=512, seed=0):
    """Three interleaved spirals in the plane: separable, but not linearly."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g) * 3 * math.pi
    cls = torch.randint(0, 3, (n,), generator=g)
    ang = t + cls * 2 * math.pi / 3
    r = t / (3 * math.pi)
    x = torch.stack([r * torch.cos(ang), r * torch.sin(ang)], 1)
    return x + 0.02 * torch.randn(n, 2, generator=g), cls


def _train(x, y, seed, steps=400):
    torch.manual_seed(seed)
    m = MLP(2, (32, 32), 3)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=g)
        opt.zero_grad()
        CRIT(m(x[idx]), y[idx]).backward()
        opt.step()
    return m


@pytest.fixture(scope="module")
def modes():
    x, y = _spirals()
    a, b = _train(x, y, 1), _train(x, y, 2)
    return a, b, x, y


def test_bezier_barrier_at_most_a_quarter_of_the_linear_one(modes):
    a, b, x, y = modes
    batches = [(x[i : i + 128], y[i : i + 128]) for i in range(0, len(x), 128)]
    sa, sb = a.state_dict(), b.state_dict()
    copies = [{k: v.clone() for k, v in s.items()} for s in (sa, sb)]
    path = connect(a, sa, sb, batches, CRIT, steps=300, lr=1e-2)
    assert isinstance(path, CurvedPath) and len(path.history) == 300
    curve = path_curve(a, path, [(x, y)], CRIT, points=17)
    assert isinstance(curve, PathCurve)
    lin, cur = curve.barriers["linear"], curve.barriers["curved"]
    assert lin > 0.3, f"the two modes should be separated by a barrier, got {lin}"
    assert cur <= 0.25 * lin, curve.table()
    assert "bezier" in curve.table() and curve.t.size == 17
    for s, c in zip((sa, sb), copies, strict=True):
        for k in s:
            assert torch.equal(s[k], c[k])


def test_curve_algebra(modes):
    a, b, x, y = modes
    sa, sb = a.state_dict(), b.state_dict()
    for kind in ("bezier", "polychain"):
        path = connect(a, sa, sb, [(x, y)], CRIT, kind=kind, steps=3, lr=1e-3)
        for k in sa:
            assert torch.equal(path.point(0.0)[k], sa[k])
            assert torch.equal(path.point(1.0)[k], sb[k])
        mid = path(0.5)
        c = path.bend
        for k in sa:
            want = 0.25 * sa[k] + 0.5 * c[k] + 0.25 * sb[k] if kind == "bezier" else c[k]
            torch.testing.assert_close(mid[k], want)
    curve = path_curve(a, path, [(x, y)], CRIT, points=[0.0, 0.3, 1.0], linear=False)
    assert "linear" not in curve.barriers and curve.linear == {}


def test_model_untouched_and_bn(modes):
    a, b, x, y = modes
    before = {k: v.clone() for k, v in a.state_dict().items()}
    a.eval()
    connect(a, a.state_dict(), b.state_dict(), [(x, y)], CRIT, steps=2)
    assert not a.training
    for k, v in a.state_dict().items():
        assert torch.equal(v, before[k])
    # BatchNorm buffers follow the linear path; num_batches_tracked stays A's
    from pymerge.testing.models import CNN

    torch.manual_seed(0)
    na, nb = (CNN(1, (4,), 3, norm="bn", image_size=4) for _ in range(2))
    nb.norm0.running_mean.fill_(1.0)
    xi = torch.randn(8, 1, 4, 4)
    yi = torch.randint(0, 3, (8,))
    p = connect(na, na.state_dict(), nb.state_dict(), [(xi, yi)], CRIT, steps=2)
    torch.testing.assert_close(p.bend["norm0.running_mean"], torch.full((4,), 0.5))
    assert torch.equal(na.norm0.running_mean, torch.zeros(4))


def test_nonfinite_flagged(modes):
    a, b, x, y = modes
    path = connect(a, a.state_dict(), b.state_dict(), [(x, y)], CRIT, steps=2)
    bad = x.clone()
    bad[0, 0] = float("nan")
    curve = path_curve(a, path, [(bad, y)], CRIT, points=5)
    assert curve.flags["nonfinite"]["curved"]["loss"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert math.isnan(curve.barriers["curved"]) and np.isnan(curve.metrics["loss"]).all()


def test_bad_input(modes):
    a, b, x, y = modes
    sa, sb = a.state_dict(), b.state_dict()
    wrong = dict(sb)
    wrong["fc0.weight"] = torch.zeros(31, 2)
    with pytest.raises(ValueError, match="fc0.weight"):
        connect(a, sa, wrong, [(x, y)], CRIT)
    missing = {k: v for k, v in sb.items() if k != "out.bias"}
    with pytest.raises(ValueError, match="out.bias"):
        connect(a, sa, missing, [(x, y)], CRIT)
    with pytest.raises(ValueError, match="empty"):
        connect(a, sa, sb, [], CRIT)
    with pytest.raises(ValueError, match="kind"):
        connect(a, sa, sb, [(x, y)], CRIT, kind="spline")
    with pytest.raises(TypeError, match="scalar"):
        connect(a, sa, sb, [(x, y)], nn.CrossEntropyLoss(reduction="none"), steps=1)
    with pytest.raises(ValueError, match="does not require grad"):
        connect(a, sa, sb, [(x, y)], lambda o, t: CRIT(o, t).detach(), steps=1)
    bad = x.clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="nan at step 0"):
        connect(a, sa, sb, [(bad, y)], CRIT, steps=2)
    with pytest.raises(ValueError, match="lr"):
        connect(a, sa, sb, [(x, y)], CRIT, lr=-1.0)
    path = connect(a, sa, sb, [(x, y)], CRIT, steps=1)
    with pytest.raises(ValueError, match="t must be in"):
        path.point(1.5)
    with pytest.raises(ValueError, match="points"):
        path_curve(a, path, [(x, y)], CRIT, points=[0.0, 0.7, 0.5, 1.0])
    with pytest.raises(TypeError, match="CurvedPath"):
        path_curve(a, sa, [(x, y)], CRIT)
