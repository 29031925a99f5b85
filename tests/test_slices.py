"""Slices, surfaces and the plane of three models: filter normalisation, values against a
direct evaluation, Hessian directions, flags, bad input, plots; nothing given is modified."""

from __future__ import annotations

import copy
import sys

import numpy as np
import pytest
import torch
from torch import nn

from pymerge.landscape import (
    Surface,
    hessian_eigenvalues,
    loss_plane,
    loss_slice,
    loss_surface,
    random_direction,
)
from pymerge.testing.models import CNN, MLP

CRIT = nn.CrossEntropyLoss()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread (a second one only adds hand-off overhead, and on a
    busy machine OpenMP's waits dominate)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cnn(seed=0):
    torch.manual_seed(seed)
    return CNN(in_channels=1, widths=(4, 8), num_classes=3, norm="bn", image_size=6).eval()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 1, 6, 6, generator=g)
    y = torch.randint(0, 3, (48,), generator=g)
    return [(x[:20], y[:20]), (x[20:], y[20:])]


def _direct_loss(model, state, batches):
    m = copy.deepcopy(model)
    m.load_state_dict(state)
    m.eval()
    with torch.no_grad():
        n = sum(len(x) for x, _ in batches)
        return sum(float(CRIT(m(x), y)) * len(x) for x, y in batches) / n


def test_filter_normalisation():
    model = _cnn()
    d = random_direction(model, seed=3)
    for name, p in model.named_parameters():
        if p.dim() <= 1:
            assert torch.count_nonzero(d[name]) == 0  # ignore="biasbn"
        else:
            got = d[name].reshape(p.shape[0], -1).norm(dim=1)
            want = p.detach().reshape(p.shape[0], -1).norm(dim=1)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    keep = random_direction(model, seed=3, ignore=None)
    assert torch.equal(keep["conv0.bias"], model.conv0.bias.detach())
    layer = random_direction(model, seed=3, norm="layer")
    assert float(layer["out.weight"].norm()) == pytest.approx(
        float(model.out.weight.detach().norm())
    )
    assert torch.equal(random_direction(model, seed=3)["out.weight"], d["out.weight"])
    assert not torch.equal(random_direction(model, seed=4)["out.weight"], d["out.weight"])
    assert set(d) == {n for n, _ in model.named_parameters()}  # no buffers


def test_slice_values_match_direct_evaluation(data):
    model = _cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d = random_direction(model, seed=0)
    s = loss_slice(model, data, CRIT, d, steps=5, span=(-0.5, 0.5))
    assert (
        isinstance(s, Surface)
        and s.ndim == 1
        and s.coords[0].tolist() == [-0.5, -0.25, 0.0, 0.25, 0.5]
    )
    base = model.state_dict()
    for a, loss in zip(s.coords[0], s["loss"], strict=True):
        state = {k: v + a * d[k] if k in d else v for k, v in base.items()}
        assert loss == pytest.approx(_direct_loss(model, state, data), rel=1e-5)
    # the same as "random" with the same seed
    r = loss_slice(model, data, CRIT, steps=5, span=(-0.5, 0.5), seed=0)
    np.testing.assert_allclose(r["loss"], s["loss"], rtol=1e-6)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_surface_grid_metrics_and_state(data):
    model, other = _cnn(), _cnn(5)
    acc = {"accuracy": lambda out, y: (out.argmax(1) == y).float().mean()}
    s = loss_surface(model, data, CRIT, steps=(5, 3), span=((-1, 1), (-2, 2)), metrics=acc)
    assert s["loss"].shape == s["accuracy"].shape == (5, 3)
    assert s.coords[1].tolist() == [-2.0, 0.0, 2.0]
    assert s["loss"][2, 1] == pytest.approx(_direct_loss(model, model.state_dict(), data))
    assert s.extras["evaluations"] == 15 and s.points == {"center": (0.0, 0.0)}
    around = loss_surface(model, data, CRIT, steps=3, state=other.state_dict())
    assert around["loss"][1, 1] == pytest.approx(_direct_loss(model, other.state_dict(), data))


def test_hessian_directions_have_the_eigenvalue_as_curvature(data):
    torch.manual_seed(0)
    model = MLP(36, (6,), 3).double().eval()
    batches = [(x.double(), y) for x, y in data]
    h = 1e-3
    s = loss_slice(
        model, batches, CRIT, "hessian", steps=3, span=(-h, h), hessian_options={"tol": 1e-10}
    )
    lam = hessian_eigenvalues(model, batches, CRIT, tol=1e-10).value
    curvature = (s["loss"][0] - 2 * s["loss"][1] + s["loss"][2]) / h**2
    assert curvature == pytest.approx(lam, rel=1e-3)
    assert s.extras["eigenvalues"][0] == pytest.approx(lam)
    surf = loss_surface(model, batches, CRIT, "hessian", steps=3)
    assert "Hessian eigenvector 2" in surf.directions[1]


def test_plane_through_three_models(data):
    a, b, c = (_cnn(s).state_dict() for s in (0, 1, 2))
    model = _cnn(0)
    copies = [{k: v.clone() for k, v in s.items()} for s in (a, b, c)]
    p = loss_plane(model, a, b, c, data, CRIT, steps=(5, 4), margin=0.0)
    c1, c2 = p.points["C"]
    assert p.points["A"] == (0.0, 0.0) and p.points["B"] == (1.0, 0.0) and c2 > 0
    assert p.coords[1][0] == 0.0 and p.coords[1][-1] == pytest.approx(c2)
    assert p.coords[0][0] == pytest.approx(min(0.0, c1))
    i_a = int(np.argmin(np.abs(p.coords[0])))
    assert p.coords[0][i_a] == pytest.approx(0.0, abs=1e-12)
    assert p["loss"][i_a, 0] == pytest.approx(_direct_loss(model, a, data), rel=1e-5)
    if c1 <= 1.0:
        assert p["loss"][-1, 0] == pytest.approx(_direct_loss(model, b, data), rel=1e-5)
    # C sits at (c1, c2): a 1x1 grid there is C
    for s, cp in zip((a, b, c), copies, strict=True):
        for k in s:
            assert torch.equal(s[k], cp[k])
    dist = p.extras["distances"]
    assert dist["A-B"] > 0 and dist["A-C"] > 0
    with pytest.raises(ValueError, match="collinear"):
        mid = {k: (v + b[k]) / 2 if v.is_floating_point() else v for k, v in a.items()}
        loss_plane(model, a, b, mid, data, CRIT, steps=3)
    with pytest.raises(ValueError, match="equal"):
        loss_plane(model, a, a, c, data, CRIT, steps=3)


def test_nonfinite_losses_are_flagged_not_dropped(data):
    model = _cnn()
    with torch.no_grad():
        center_max = max(float(model(x).abs().max()) for x, _ in data)

    def loss_fn(out, y):  # NaN far from the center
        loss = CRIT(out, y)
        return loss if float(out.abs().max()) < 2 * center_max else loss * float("nan")

    s = loss_slice(model, data, loss_fn, steps=7, span=(-20, 20))
    bad = s.flags["nonfinite"]["loss"]
    assert bad and (0.0,) not in bad
    assert np.isnan(s["loss"]).sum() == len(bad)


def test_bad_input(data):
    model = _cnn()
    d = random_direction(model)
    with pytest.raises(ValueError, match=r"'conv0.weight'.*shape \(4, 1, 3, 3\)"):
        loss_slice(model, data, CRIT, {**d, "conv0.weight": torch.zeros(4, 1, 3)})
    with pytest.raises(ValueError, match="'nope', which is not a parameter"):
        loss_slice(model, data, CRIT, {"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="buffer"):
        loss_slice(model, data, CRIT, {"norm0.running_mean": torch.zeros(4)})
    with pytest.raises(ValueError, match="zero everywhere"):
        loss_slice(model, data, CRIT, {k: torch.zeros_like(v) for k, v in d.items()})
    with pytest.raises(ValueError, match="NaN"):
        loss_slice(model, data, CRIT, {"out.weight": torch.full_like(d["out.weight"], np.nan)})
    with pytest.raises(TypeError, match="two directions"):
        loss_surface(model, data, CRIT, d)
    with pytest.raises(ValueError, match="expected 2"):
        loss_surface(model, data, CRIT, [d])
    with pytest.raises(ValueError, match="empty"):
        loss_surface(model, [], CRIT)
    with pytest.raises(TypeError, match="scalar"):
        loss_slice(model, data, nn.CrossEntropyLoss(reduction="none"), steps=3)
    with pytest.raises(TypeError, match="metric 'acc'"):
        loss_slice(model, data, CRIT, steps=3, metrics={"acc": lambda o, y: o})
    with pytest.raises(ValueError, match="span"):
        loss_slice(model, data, CRIT, span=(1, -1))
    with pytest.raises(ValueError, match="'directions'|random"):
        loss_surface(model, data, CRIT, "sideways")
    wrong = _cnn().state_dict()
    wrong["out.weight"] = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="out.weight"):
        loss_surface(model, data, CRIT, state=wrong)
    with pytest.raises(ValueError, match="out.weight"):
        loss_plane(model, model.state_dict(), wrong, _cnn(2).state_dict(), data, CRIT)


def test_plots_write_png(tmp_path, data):
    pytest.importorskip("matplotlib")
    model = _cnn()
    surf = loss_surface(model, data, CRIT, steps=3)
    sl = loss_slice(model, data, CRIT, steps=3)
    plane = loss_plane(model, *(_cnn(s).state_dict() for s in (0, 1, 2)), data, CRIT, steps=3)
    from pymerge.landscape import hessian_density
    from pymerge.landscape.plots import plot_density, plot_path_curves

    dens = hessian_density(model, data, CRIT, steps=8)
    paths = {
        "surface.png": lambda p: surf.plot(p),
        "slice.png": lambda p: sl.plot(p),
        "plane.png": lambda p: plane.plot(p),
        "density.png": lambda p: plot_density(dens, p),
        "curves.png": lambda p: plot_path_curves({"a": ([0, 1], [1.0, 2.0])}, p),
    }
    for name, draw in paths.items():
        draw(tmp_path / name)
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no metric"):
        surf.plot(tmp_path / "x.png", metric="accuracy")


def test_matplotlib_missing_names_the_extra(monkeypatch, data):
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    surf = loss_slice(_cnn(), data, CRIT, steps=3)
    with pytest.raises(ImportError, match=r'pip install "pymerge\[plot\]"'):
        surf.plot()
