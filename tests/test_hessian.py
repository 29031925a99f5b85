"""Hessian spectra against the exact Hessian of a small network (float64), per-group blocks,
the HVP paths (streamed forward-over-reverse, cached, double backward, the fallback), and bad
input; the user's model is never modified."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from pymerge.landscape import (
    HessianResult,
    hessian_density,
    hessian_eigenvalues,
    hessian_trace,
    hessian_vector_product,
    layer_groups,
)
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


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=g)
    return x, y


def _batches(x, y):  # unequal sizes: the weighting by batch size matters
    return [(x[:20], y[:20]), (x[20:], y[20:])]


def _exact(model, x, y, names=None):
    named = dict(model.named_parameters())
    names = names or list(named)
    shapes = [named[n].shape for n in names]
    numels = [named[n].numel() for n in names]
    fixed = {k: v.detach() for k, v in named.items() if k not in names}

    def f(flat):
        parts = [t.view(s) for t, s in zip(torch.split(flat, numels), shapes, strict=True)]
        return CRIT(
            torch.func.functional_call(
                model, {**fixed, **dict(zip(names, parts, strict=True))}, (x,)
            ),
            y,
        )

    flat = torch.cat([named[n].detach().reshape(-1) for n in names])
    return torch.autograd.functional.hessian(f, flat)


@pytest.fixture(scope="module")
def setup():
    model = _model()
    x, y = _data()
    H = _exact(model, x, y)
    return model, x, y, H, torch.linalg.eigvalsh(H).numpy()


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_top_eigenvalue_within_one_percent(setup, method):
    model, x, y, _, ev = setup
    res = hessian_eigenvalues(model, _batches(x, y), CRIT, k=1, method=method)
    assert isinstance(res, HessianResult) and res.method == method and res.converged
    assert abs(res.value - ev[-1]) / abs(ev[-1]) < 0.01
    v = torch.cat([t.reshape(-1) for t in res.vectors[0].values()])
    assert abs(float(v.norm()) - 1.0) < 1e-9


def test_lanczos_top_k_and_vectors(setup):
    model, x, y, H, ev = setup
    res = hessian_eigenvalues(model, _batches(x, y), CRIT, k=3, tol=1e-8)
    np.testing.assert_allclose(res.values, ev[::-1][:3], rtol=1e-6)
    for lam, vec in zip(res.values, res.vectors, strict=True):
        v = torch.cat([t.reshape(-1) for t in vec.values()])
        assert float((H @ v - lam * v).norm()) < 1e-4
    assert res.std_err.shape == (3,) and np.all(res.std_err < 1e-3)


def test_smallest_and_magnitude(setup):
    model, x, y, _, ev = setup
    res = hessian_eigenvalues(model, _batches(x, y), CRIT, which="smallest", tol=1e-8)
    assert res.value == pytest.approx(ev[0], rel=1e-6)
    mag = hessian_eigenvalues(model, _batches(x, y), CRIT, which="magnitude", tol=1e-8)
    assert abs(abs(mag.value) - abs(ev).max()) < 1e-6


def test_trace_within_three_standard_errors(setup):
    model, x, y, H, _ = setup
    res = hessian_trace(model, _batches(x, y), CRIT, max_iter=160, tol=1e-3, seed=3)
    exact = float(torch.trace(H))
    assert res.samples.size == res.iterations and res.std_err[0] > 0
    assert abs(res.value - exact) <= 3 * res.std_err[0]
    # a loose tolerance stops early, and says so
    quick = hessian_trace(model, _batches(x, y), CRIT, max_iter=160, tol=0.5, seed=3)
    assert quick.converged and quick.iterations < 160


def test_density_quadrature(setup):
    model, x, y, _, ev = setup
    res = hessian_density(model, _batches(x, y), CRIT, steps=200, probes=2, grid=400)
    # at most the number of parameters (fewer: the softmax's null directions are one
    # repeated eigenvalue, which a Krylov space holds once)
    assert res.nodes.shape[0] == 2 and res.nodes.shape[1] <= ev.size
    np.testing.assert_allclose(res.weights.sum(axis=1), 1.0, atol=1e-10)
    assert np.nanmax(res.nodes) == pytest.approx(ev[-1], rel=1e-6)
    assert np.nanmin(res.nodes) == pytest.approx(ev[0], abs=1e-6)
    assert res.grid.shape == res.density.shape == (400,)
    assert np.trapezoid(res.density, res.grid) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("mode", ["stream", "cached", "double"])
def test_hvp_matches_exact(setup, mode):
    model, x, y, H, _ = setup
    g = torch.Generator().manual_seed(5)
    vec = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()}
    opts = {"stream": {"hvp": "forward"}, "cached": {}, "double": {"hvp": "double"}}[mode]
    out = hessian_vector_product(model, _batches(x, y), CRIT, vec, **opts)
    v = torch.cat([t.reshape(-1) for t in vec.values()])
    got = torch.cat([t.reshape(-1) for t in out.values()])
    torch.testing.assert_close(got, H @ v, rtol=1e-9, atol=1e-10)


def test_modes_reported(setup):
    model, x, y, _, _ = setup
    b = _batches(x, y)
    assert "cached" in hessian_eigenvalues(model, b, CRIT).extras["hvp"]
    assert hessian_eigenvalues(model, b, CRIT, cache=False).extras["hvp"] == (
        "forward-over-reverse"
    )
    assert hessian_eigenvalues(model, b, CRIT, hvp="double").extras["hvp"] == "double backward"
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    res = hessian_eigenvalues(model, loader, CRIT)
    assert res.extras["hvp"] == "forward-over-reverse" and res.extras["samples_seen"] == 64
    # a one-shot generator is drawn into a list once
    gen = hessian_eigenvalues(model, (b_ for b_ in b), CRIT)
    assert gen.value == pytest.approx(res.value, rel=1e-3)


class _Square(torch.autograd.Function):
    """x**2 with a backward and no jvp, old style: forward-mode AD and torch.func fail."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class _SquareNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        return self.b(_Square.apply(self.a(x)))


def test_double_backward_fallback():
    torch.manual_seed(0)
    model = _SquareNet().double()
    x, y = _data()
    ev = torch.linalg.eigvalsh(_exact(model, x, y)).numpy()
    # the cached graph is plain autograd, which old-style Functions support
    res = hessian_eigenvalues(model, [(x, y)], CRIT, tol=1e-8)
    assert res.extras["hvp"].startswith("cached")
    assert res.value == pytest.approx(ev[-1], rel=1e-6)
    # streamed, forward-mode AD fails on it: double backward, with a warning
    with pytest.warns(RuntimeWarning, match="double backward"):
        res = hessian_eigenvalues(model, [(x, y)], CRIT, tol=1e-8, cache=False)
    assert res.extras["hvp"] == "double backward"
    assert res.value == pytest.approx(ev[-1], rel=1e-6)
    with pytest.raises(RuntimeError):
        hessian_eigenvalues(model, [(x, y)], CRIT, hvp="forward", cache=False)


def test_blocks_by_name_module_glob_regex_and_dict(setup):
    model, x, y, _, _ = setup
    b = _batches(x, y)
    for sel, names in [
        ("0", ["0.weight", "0.bias"]),
        ("2.weight", ["2.weight"]),
        ("*.bias", ["0.bias", "2.bias"]),
        (r"[02]\.weight", ["0.weight", "2.weight"]),
        (["0.bias", "2"], ["0.bias", "2.weight", "2.bias"]),
    ]:
        res = hessian_eigenvalues(model, b, CRIT, params=sel, tol=1e-8)
        assert res.params == names
        ev = torch.linalg.eigvalsh(_exact(model, x, y, names)).numpy()
        assert res.value == pytest.approx(ev[-1], rel=1e-6)
        assert set(res.vectors[0]) == set(names)
    per = hessian_trace(model, b, CRIT, params=layer_groups(model), max_iter=20)
    assert list(per.per_group) == ["0", "2"] and per.values.size == 0
    assert per["0"].params == ["0.weight", "0.bias"]
    with pytest.raises(ValueError, match="per group"):
        _ = per.value


def test_spec_group():
    torch.manual_seed(0)
    model = MLP(4, (6,), 3).double()
    x = torch.randn(32, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (32,))
    spec = model.spec()
    keys = {r.param for r in spec.perm_to_axes["fc0"]}  # fc0's rows and out's columns
    assert "out.weight" in keys
    res = hessian_eigenvalues(
        model, [(x, y)], CRIT, params={"g": "fc0", "all": None}, spec=spec, tol=1e-8
    )
    assert set(res["g"].params) == keys
    assert len(res["all"].params) == len(list(model.parameters()))
    # without the spec, "fc0" is the module of that name
    assert hessian_trace(model, [(x, y)], CRIT, params="fc0", max_iter=8).params == [
        "fc0.weight",
        "fc0.bias",
    ]


def test_model_untouched(setup):
    model, x, y, _, _ = setup
    model.train()
    model[2].eval()  # a mixed state must come back as it was
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hessian_eigenvalues(model, _batches(x, y), CRIT, k=2)
    hessian_trace(model, _batches(x, y), CRIT, max_iter=8, hvp="double")
    hessian_density(model, _batches(x, y), CRIT, steps=5, probes=2)
    assert model.training and model[0].training and not model[2].training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    for p in model.parameters():
        assert torch.equal(p.grad, torch.full_like(p, 7.0))
        p.grad = None
    model.eval()


def test_bad_input(setup):
    model, x, y, _, _ = setup
    b = _batches(x, y)
    n = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match=f"k={n + 1} is larger than the number of parameters"):
        hessian_eigenvalues(model, b, CRIT, k=n + 1)
    with pytest.raises(ValueError, match="empty"):
        hessian_eigenvalues(model, [], CRIT)
    with pytest.raises(ValueError, match="batch 0 is empty"):
        hessian_eigenvalues(model, [(x[:0], y[:0])], CRIT)
    with pytest.raises(TypeError, match="scalar"):
        hessian_eigenvalues(model, b, nn.CrossEntropyLoss(reduction="none"))
    with pytest.raises(TypeError, match="item"):
        hessian_eigenvalues(model, b, lambda o, t: CRIT(o, t).item())
    with pytest.raises(ValueError, match="does not require grad"):
        hessian_eigenvalues(model, b, lambda o, t: CRIT(o, t).detach())
    bad = x.clone()
    bad[30, 0] = math.nan
    for cache in (None, False):
        with pytest.raises(ValueError, match="nan on batch 1"):
            hessian_eigenvalues(model, _batches(bad, y), CRIT, cache=cache)
    with pytest.raises(ValueError, match="matches no parameter"):
        hessian_eigenvalues(model, b, CRIT, params="nope")
    with pytest.raises(ValueError, match="method"):
        hessian_eigenvalues(model, b, CRIT, method="arnoldi")
    with pytest.raises(ValueError, match="which"):
        hessian_eigenvalues(model, b, CRIT, which="biggest")
    with pytest.raises(ValueError, match="tol"):
        hessian_eigenvalues(model, b, CRIT, tol=0)
    with pytest.raises(TypeError, match="pair"):
        hessian_eigenvalues(model, [x], CRIT)
    with pytest.raises(TypeError, match="nn.Module"):
        hessian_trace(model.state_dict(), b, CRIT)
    with pytest.raises(ValueError, match="vector"):
        hessian_vector_product(model, b, CRIT, {"0.weight": torch.zeros(3)})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_matches_cpu(setup):
    model, x, y, _, ev = setup
    gpu = _model().cuda()
    res = hessian_eigenvalues(gpu, _batches(x, y), CRIT, tol=1e-8)
    assert res.vectors[0]["0.weight"].is_cuda
    assert res.value == pytest.approx(ev[-1], rel=1e-6)
    tr = hessian_trace(gpu, _batches(x, y), CRIT, max_iter=16, seed=1)
    ref = hessian_trace(model, _batches(x, y), CRIT, max_iter=16, seed=1)
    assert tr.value == pytest.approx(ref.value, rel=1e-9)
