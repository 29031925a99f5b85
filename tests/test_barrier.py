"""Interpolation curves and the three barrier definitions; a small MNIST-1D LMC check."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pymerge.landscape import (
    BARRIER_KINDS,
    Curve,
    barrier,
    error_barrier,
    interpolation_curve,
    loss_barrier,
)

# --------------------------------------------------------------------------- definitions


def test_barrier_definitions_by_hand():
    lam = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    v = np.array([1.0, 2.0, 2.5, 1.5, 0.5])
    # Git Re-Basin: max v - (v0 + v1)/2 = 2.5 - 0.75
    assert barrier(v, lam, "rebasin") == pytest.approx(1.75)
    # Entezari: max_l v(l) - ((1-l) v0 + l v1); line = 1, .875, .75, .625, .5
    assert barrier(v, lam, "entezari") == pytest.approx(max(2 - 0.875, 2.5 - 0.75, 1.5 - 0.625))
    assert barrier(v, lam, "midpoint") == pytest.approx(2.5 - 0.75)
    # convex curve: negative midpoint barrier, zero Entezari barrier (endpoints)
    w = np.array([1.0, 0.5, 0.2, 0.5, 1.0])
    assert barrier(w, lam, "midpoint") == pytest.approx(-0.8)
    assert barrier(w, lam, "entezari") == pytest.approx(0.0)
    assert barrier(w, lam, "rebasin") == pytest.approx(0.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=3, max_size=3), st.integers(1, 20))
def test_barrier_properties(vals, half):
    k = 2 * half + 1
    lam = np.linspace(0, 1, k)
    rng = np.random.default_rng(abs(int(vals[0] * 1000)) % 2**32)
    v = rng.normal(size=k) * (abs(vals[1]) + 1)
    v[0], v[-1] = vals[0], vals[2]
    reb, ent, mid = (barrier(v, lam, kd) for kd in BARRIER_KINDS)
    assert ent >= -1e-9  # endpoints contribute 0
    assert reb >= mid - 1e-9  # the midpoint is one of the points
    assert reb >= max(v[0], v[-1]) - 0.5 * (v[0] + v[-1]) - 1e-9
    if v[0] == v[-1]:
        assert reb == pytest.approx(ent)


def test_barrier_errors():
    lam = np.linspace(0, 1, 4)
    with pytest.raises(ValueError, match="midpoint"):
        barrier(np.zeros(4), lam, "midpoint")
    with pytest.raises(ValueError, match="kind"):
        barrier(np.zeros(4), lam, "max")
    with pytest.raises(ValueError, match="points"):
        barrier(np.zeros(3), lam)
    with pytest.raises(ValueError, match="start at 0"):
        barrier(np.zeros(3), np.array([0.1, 0.5, 1.0]))
    with pytest.raises(ValueError, match="increasing.*0.75 then 0.5"):
        barrier(np.zeros(4), np.array([0.0, 0.75, 0.5, 1.0]))
    curve = Curve(lambdas=np.linspace(0, 1, 3), metrics={"loss": np.zeros(3)})
    with pytest.raises(ValueError, match="accuracy"):
        error_barrier(curve)


# --------------------------------------------------------------------------- curves


def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    a = {k: v.clone() for k, v in model.state_dict().items()}
    b = {k: (v + torch.randn(v.shape)) if v.is_floating_point() else v + 5 for k, v in a.items()}
    return model, a, b


def _lerp_ref(a, b, lam):
    """Plain float64 reference of θ(λ), cast back (non-floating entries from A)."""
    return {
        k: ((1 - lam) * a[k].double() + lam * b[k].double()).to(a[k].dtype)
        if a[k].is_floating_point()
        else a[k]
        for k in a
    }


def _eval_loss(x):
    def eval_fn(m):
        m.eval()
        with torch.no_grad():
            return float(m(x).double().pow(2).mean())

    return eval_fn


def test_curve_along_permuted_path_equals_materialised_reference():
    """The fused path (π(B) never built) gives the losses of materialise-then-interpolate,
    for every λ in several passes, with exact endpoints."""
    from pymerge.spec import apply_permutation, random_permutation, spec_from_model

    model, a, b = _tiny()
    x = torch.randn(16, 3)
    spec = spec_from_model(model, x[:2])
    perm = random_permutation(spec, b, seed=3)
    pb = apply_permutation(spec, perm, b)
    lambdas = np.linspace(0, 1, 19)  # more than one pass of the fused path
    curve = interpolation_curve(model, a, b, _eval_loss(x), lambdas, spec=spec, perm=perm)
    ref = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    for lam, val in zip(lambdas, curve["loss"], strict=True):
        ref.load_state_dict(_lerp_ref(a, pb, float(lam)))
        assert val == pytest.approx(_eval_loss(x)(ref), rel=1e-5), lam
    ref.load_state_dict(pb)
    assert curve["loss"][-1] == _eval_loss(x)(ref)  # exact endpoint
    assert curve.flags == {}
    with pytest.raises(TypeError, match="spec"):
        interpolation_curve(model, a, b, _eval_loss(x), 3, perm=perm)


def test_nan_losses_are_kept_and_flagged():
    model, a, b = _tiny()
    calls = iter([1.0, float("nan"), 2.0, float("inf"), 1.5])
    curve = interpolation_curve(model, a, b, lambda m: next(calls), 5)
    assert np.isnan(curve["loss"][1]) and np.isinf(curve["loss"][3])
    assert curve.flags["nonfinite"] == {"loss": [0.25, 0.75]}
    with pytest.warns(RuntimeWarning, match="non-finite values at λ = 0.25, 0.75"):
        assert np.isnan(loss_barrier(curve))


def test_eval_fn_errors_name_eval_fn():
    model, a, b = _tiny()
    with pytest.raises(TypeError, match=r"eval_fn returned a tensor of shape \(2,\) at λ=0"):
        interpolation_curve(model, a, b, lambda m: torch.ones(2), 3)
    with pytest.raises(TypeError, match=r"eval_fn returned \['acc'\] a str"):
        interpolation_curve(model, a, b, lambda m: {"acc": "x"}, 3)
    with pytest.raises(TypeError, match="eval_fn must be callable"):
        interpolation_curve(model, a, b, 3.0, 3)
    # a one-element tensor is a number
    c = interpolation_curve(model, a, b, lambda m: torch.tensor([2.0]), 3)
    assert c["loss"].tolist() == [2.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="0.weight"):
        interpolation_curve(model, a, {**b, "0.weight": torch.zeros(2, 2)}, lambda m: 1.0, 3)


def test_interpolation_curve_evaluates_each_lambda():
    model, a, b = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a0 = {k: v.clone() for k, v in a.items()}
    x = torch.randn(8, 3)
    calls = []

    def eval_fn(m):
        m.eval()
        with torch.no_grad():
            out = m(x)
        calls.append(m)
        return {"loss": float(out.pow(2).mean()), "accuracy": float((out[:, 0] > 0).float().mean())}

    prepared = []
    curve = interpolation_curve(model, a, b, eval_fn, 7, prepare=prepared.append)
    assert curve.lambdas.tolist() == pytest.approx(np.linspace(0, 1, 7).tolist())
    assert len(calls) == len(prepared) == 7
    assert set(curve.metrics) == {"loss", "accuracy"}
    # values equal a direct evaluation of theta(lambda)
    ref = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    for lam, val in zip(curve.lambdas, curve["loss"], strict=True):
        ref.load_state_dict(_lerp_ref(a, b, float(lam)))
        ref.eval()
        with torch.no_grad():
            assert val == pytest.approx(float(ref(x).pow(2).mean()), rel=1e-6)
    # the caller's model and states are untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    for k in a:
        assert torch.equal(a[k], a0[k])
    # a plain number becomes "loss"; explicit lambdas
    c2 = interpolation_curve(model, a, b, lambda m: 1.0, [0.0, 0.5, 1.0])
    assert list(c2.metrics) == ["loss"] and loss_barrier(c2, "midpoint") == 0.0
    with pytest.raises(ValueError, match="increasing"):
        interpolation_curve(model, a, b, lambda m: 1.0, [0.0, 0.7, 0.5, 1.0])
    with pytest.raises(ValueError, match=">= 2"):
        interpolation_curve(model, a, b, lambda m: 1.0, 1)
    with pytest.raises(TypeError, match="eval_fn"):
        interpolation_curve(model, a, b, lambda m: "bad", 3)


# --------------------------------------------------------------------------- MNIST-1D


def test_mnist1d_weight_matching_removes_most_of_the_barrier(one_thread):
    """Small twin of examples/mnist1d_barrier.py (width 128, fewer samples and epochs)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    try:
        from mnist1d_barrier import run
    finally:
        sys.path.pop(0)
    out = run(width=128, samples=8000, epochs=15, points=11, verbose=False)
    naive, matched = out["naive"], out["weight matching"]
    assert min(naive["endpoint_acc"]) > 0.5  # the endpoints did learn
    assert naive["loss_rebasin"] > 0.3  # a real barrier to remove
    assert out["loss_reduction"] >= 0.7, out
    assert matched["error_rebasin"] < naive["error_rebasin"]
