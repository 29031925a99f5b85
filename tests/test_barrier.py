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


# --------------------------------------------------------------------------- fast curves


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Small matrices: one torch thread (a second one only waits on this busy machine)."""


def _mlp_case(seed=0, width=8):
    from pymerge.spec import random_permutation
    from pymerge.testing.models import MLP

    torch.manual_seed(seed)
    model = MLP(5, (width, width), 3)
    a = {k: v.detach().clone() for k, v in model.state_dict().items()}
    b = {k: v.detach().clone() for k, v in MLP(5, (width, width), 3).state_dict().items()}
    spec = model.spec()
    perm = random_permutation(spec, b, seed=seed + 1)
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    return model, a, b, spec, perm, x, y


def test_permuted_interpolate_out_writes_in_place_on_every_path():
    """ops.permuted_interpolate(out=) fills given tensors (a model's own parameters, tensors
    of another dtype, strided ones, tied ones) with what it would have returned."""
    from pymerge.ops import permuted_interpolate
    from pymerge.spec import permutation_index_map

    model, a, b, spec, perm, _, _ = _mlp_case()
    axes = permutation_index_map(spec, perm, b)
    ref = permuted_interpolate(a, b, [0.25, 0.5], axes)
    for backend in ("native", "torch"):
        outs = [{k: torch.full_like(v, float("nan")) for k, v in a.items()} for _ in range(2)]
        got = permuted_interpolate(a, b, [0.25, 0.5], axes, out=outs, backend=backend)
        assert got is outs
        for r, o in zip(ref, outs, strict=True):
            for k in a:
                torch.testing.assert_close(o[k], r[k], rtol=1e-6, atol=1e-6)
    # straight into a model: parameters (requires_grad) are written, not replaced
    target = model.state_dict(keep_vars=True)
    ids = {k: id(v) for k, v in target.items()}
    permuted_interpolate(a, b, 0.25, axes, out=target)
    for k, v in model.state_dict(keep_vars=True).items():
        assert id(v) == ids[k]
        torch.testing.assert_close(v.detach(), ref[0][k], rtol=1e-6, atol=1e-6)
    # another dtype, a transposed (strided) view, two keys on one tensor: copied in
    odd = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in a.items()}
    w = torch.zeros(a["fc0.weight"].shape[::-1]).t()
    odd["fc0.weight"] = w
    odd["fc1.bias"] = odd["fc0.bias"]  # aliasing outputs (same shape)
    permuted_interpolate(a, b, 0.5, axes, out=odd)
    torch.testing.assert_close(w, ref[1]["fc0.weight"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(odd["out.bias"].float(), ref[1]["out.bias"])
    with pytest.raises(ValueError, match="lacks key 'out.bias'"):
        permuted_interpolate(a, b, 0.5, axes, out={k: v for k, v in a.items() if k != "out.bias"})
    with pytest.raises(ValueError, match="2 state dicts for 3 alphas"):
        permuted_interpolate(a, b, [0, 0.5, 1], axes, out=outs)
    with pytest.raises(TypeError, match="list of state dicts"):
        permuted_interpolate(a, b, [0, 0.5], axes, out=outs[0])
    with pytest.raises(ValueError, match=r"out\['fc0.bias'\] has shape"):
        permuted_interpolate(a, b, 0.5, axes, out={**outs[0], "fc0.bias": torch.zeros(2)})


@pytest.mark.parametrize("one_buffer", [True, False])
def test_new_outputs_in_one_buffer_or_one_per_alpha(monkeypatch, one_buffer):
    """Small results share one [M, total] buffer; large ones get a buffer per alpha (a
    single large one faults on every page each call): the same values either way."""
    import importlib

    from pymerge.ops import permuted_interpolate
    from pymerge.spec import permutation_index_map

    front = importlib.import_module("pymerge.ops.interpolate")
    monkeypatch.setattr(front, "_ONE_BUFFER_BYTES", 1 << 30 if one_buffer else 0)
    _, a, b, spec, perm, _, _ = _mlp_case()
    axes = permutation_index_map(spec, perm, b)
    alphas = [0.0, 0.3, 1.0]
    got = permuted_interpolate(a, b, alphas, axes, backend="native")
    ref = permuted_interpolate(a, b, alphas, axes, backend="torch")
    bases = {r["fc1.weight"].untyped_storage().data_ptr() for r in got}
    assert len(bases) == (1 if one_buffer else 3)
    for g, r in zip(got, ref, strict=True):
        for k in a:
            torch.testing.assert_close(g[k], r[k], rtol=1e-6, atol=1e-6)


def test_native_permuted_lerp_outputs_per_alpha_and_per_tensor():
    """The C++ loop writes one flat buffer per alpha or one buffer per (alpha, tensor), and
    rejects outputs that overlap an input or each other."""
    from torch.utils.dlpack import to_dlpack as dl

    from pymerge._backend import native_multi_tensor

    mt = native_multi_tensor()
    if mt is None:
        pytest.skip("compiled module not built")
    a = [torch.randn(3, 4), torch.randn(5)]
    b = [torch.randn(3, 4), torch.randn(5)]
    plan = mt.GatherPlan(3, 4, rowmap=np.array([8, 0, 4]), colmap=np.array([3, 2, 1, 0]))
    pb0 = b[0].index_select(0, torch.tensor([2, 0, 1])).flip(1)
    want = [[torch.lerp(a[0], pb0, al), torch.lerp(a[1], b[1], al)] for al in (0.25, 1.0)]
    flat = [torch.empty(17), torch.empty(17)]
    mt.permuted_lerp([dl(t) for t in a], [dl(t) for t in b], [plan, None], [dl(f) for f in flat],
                     [0.25, 1.0], "float32", "float32", 1)  # fmt: skip
    per = [torch.empty(3, 4), torch.empty(5), torch.empty(3, 4), torch.empty(5)]
    mt.permuted_lerp([dl(t) for t in a], [dl(t) for t in b], [plan, None], [dl(t) for t in per],
                     [0.25, 1.0], "float32", "float32", 1)  # fmt: skip
    for m in range(2):
        torch.testing.assert_close(flat[m][:12].view(3, 4), want[m][0])
        torch.testing.assert_close(flat[m][12:], want[m][1])
        torch.testing.assert_close(per[2 * m], want[m][0])
        torch.testing.assert_close(per[2 * m + 1], want[m][1])

    def call(out, alphas=(0.5,)):
        mt.permuted_lerp([dl(t) for t in a], [dl(t) for t in b], [plan, None],
                         [dl(t) for t in out], list(alphas), "float32", "float32", 1)  # fmt: skip

    big = torch.empty(20)
    with pytest.raises(ValueError, match=r"out\[1\] overlaps out\[0\]"):
        call([big[:12], big[8:13]])
    with pytest.raises(ValueError, match=r"out\[1\] overlaps a\[1\]"):
        call([torch.empty(12), a[1]])
    with pytest.raises(ValueError, match="3 buffers; 1 alphas and 2 tensors need 1"):
        call([torch.empty(12), torch.empty(5), torch.empty(5)])
    with pytest.raises(ValueError, match=r"out\[0\] has 16 elements, the 2 tensors of a have 17"):
        call([torch.empty(16)])


@pytest.mark.parametrize("once", [True, False])
def test_curve_gathers_once_or_per_point_with_the_same_values(monkeypatch, once):
    import importlib

    bm = importlib.import_module("pymerge.landscape.barrier")  # the name `barrier` is a function
    monkeypatch.setattr(bm, "_GATHER_ONCE_MAX_BYTES", 1 << 30 if once else 0)
    from pymerge.spec import apply_permutation

    model, a, b, spec, perm, x, _ = _mlp_case()
    b_inf = dict(b)
    pb = apply_permutation(spec, perm, b)
    curve = interpolation_curve(model, a, b, _eval_loss(x), 9, spec=spec, perm=perm)
    assert curve.info["gather_once"] is once and curve.info["mode"] == "loop"
    ref = copy_model(model)
    for lam, val in zip(curve.lambdas, curve["loss"], strict=True):
        ref.load_state_dict(_lerp_ref(a, pb, float(lam)))
        assert val == pytest.approx(_eval_loss(x)(ref), rel=1e-5)
    ref.load_state_dict(pb)
    assert curve["loss"][-1] == _eval_loss(x)(ref)
    ref.load_state_dict(a)
    assert curve["loss"][0] == _eval_loss(x)(ref)
    # an inf weight in B: the curve keeps the non-finite values and flags them
    b_inf["fc1.weight"] = b["fc1.weight"].clone()
    b_inf["fc1.weight"][0, 0] = float("inf")
    c2 = interpolation_curve(model, a, b_inf, _eval_loss(x), 5, spec=spec, perm=perm)
    assert not np.isfinite(c2["loss"][1:]).any()
    assert c2.flags["nonfinite"]["loss"] == [0.25, 0.5, 0.75, 1.0]


def copy_model(model):
    import copy

    return copy.deepcopy(model)


def test_curve_prepare_runs_per_point_and_may_replace_tensors():
    """prepare(model) sees θ(λ) every time, even when it replaces a parameter (the next
    point is written into the module's current tensors)."""
    model, a, b, spec, perm, x, _ = _mlp_case()
    seen = []

    def prepare(m):
        seen.append(m.fc0.bias.detach().clone())
        m.fc0.bias = nn.Parameter(torch.zeros_like(m.fc0.bias))  # replaced, not copied into

    curve = interpolation_curve(model, a, b, _eval_loss(x), 5, prepare=prepare)
    for lam, got in zip(curve.lambdas, seen, strict=True):
        torch.testing.assert_close(got, torch.lerp(a["fc0.bias"], b["fc0.bias"], float(lam)))
    assert len(seen) == 5 and np.isfinite(curve["loss"]).all()
    with pytest.raises(ValueError, match="prepare_batches"):
        interpolation_curve(model, a, b, _eval_loss(x), 3, prepare="reset_bn")
    with pytest.raises(ValueError, match="prepare must be a callable or one of"):
        interpolation_curve(model, a, b, _eval_loss(x), 3, prepare="bn", prepare_batches=[x])
    with pytest.raises(ValueError, match="lacks the model's key 'out.bias'"):
        interpolation_curve(
            model,
            {k: v for k, v in a.items() if k != "out.bias"},
            {k: v for k, v in b.items() if k != "out.bias"},
            _eval_loss(x),
            3,
        )


def _bn_cnn_case():
    from pymerge.testing.models import CNN

    torch.manual_seed(0)
    model = CNN(1, (4, 8), 3, norm="bn", image_size=8)
    x = torch.randn(32, 1, 8, 8)
    y = torch.randint(0, 3, (32,))
    model.train()
    with torch.no_grad():
        model(x)  # running statistics that differ from the defaults
    a = {k: v.clone() for k, v in model.state_dict().items()}
    b = {k: (v + 0.3 * torch.randn_like(v)) if v.is_floating_point() else v for k, v in a.items()}
    b = {k: v.abs() if "running_var" in k else v for k, v in b.items()}
    return model.eval(), a, b, x, y


def test_curve_reset_bn_and_repair_per_point():
    from pymerge.align import repair, reset_bn_stats
    from pymerge.landscape import Evaluator

    model, a, b, x, y = _bn_cnn_case()
    ev = Evaluator((x, y))
    batches = [(x[:16], y[:16]), (x[16:], y[16:])]
    c_bn = interpolation_curve(model, a, b, ev, 3, prepare="reset_bn", prepare_batches=batches)
    c_rep = interpolation_curve(model, a, b, ev, 3, prepare="repair", prepare_batches=batches)
    ref = copy_model(model)
    ref_b = copy_model(model)
    ref_b.load_state_dict(b)
    end_a = copy_model(model)
    end_a.load_state_dict(a)
    for i, lam in enumerate((0.0, 0.5, 1.0)):
        ref.load_state_dict(_lerp_ref(a, b, lam))
        want = ev(reset_bn_stats(ref, batches))
        assert c_bn["loss"][i] == pytest.approx(want["loss"], rel=1e-5)
        want_r = ev(repair(end_a, ref_b, ref, batches, alpha=lam))
        assert c_rep["loss"][i] == pytest.approx(want_r["loss"], rel=1e-5)
    assert c_bn["loss"][1] != pytest.approx(interpolation_curve(model, a, b, ev, 3)["loss"][1])


def test_batched_lambdas_match_one_at_a_time():
    """lambda_batch=M evaluates M λ per vmapped forward with the values of the loop (also
    through BatchNorm in eval mode), on the permuted path."""
    from pymerge.landscape import Evaluator

    model, a, b, spec, perm, x, y = _mlp_case()
    ev = Evaluator([(x[:25], y[:25]), (x[25:], y[25:])])
    loop = interpolation_curve(model, a, b, ev, 11, spec=spec, perm=perm, lambda_batch=None)
    assert loop.info["mode"] == "loop"
    for m in (4, 11, "measure"):
        c = interpolation_curve(model, a, b, ev, 11, spec=spec, perm=perm, lambda_batch=m)
        for name in ("loss", "accuracy"):
            np.testing.assert_allclose(c[name], loop[name], rtol=1e-5, atol=1e-6)
        if m != "measure":
            assert c.info["mode"] == "batched" and c.info["lambda_batch"] == m
        else:
            assert set(c.info["seconds_per_point"]) == {"loop", "batched"}
    cnn, ca, cb, cx, cy = _bn_cnn_case()
    cev = Evaluator((cx, cy))
    c1 = interpolation_curve(cnn, ca, cb, cev, 5, lambda_batch=None)
    c2 = interpolation_curve(cnn, ca, cb, cev, 5, lambda_batch=5)
    assert c2.info["mode"] == "batched"
    np.testing.assert_allclose(c2["loss"], c1["loss"], rtol=1e-5)
    # auto on CPU: one at a time
    assert interpolation_curve(model, a, b, ev, 3).info["mode"] == "loop"
    with pytest.raises(ValueError, match="needs eval_fn to be a pymerge.landscape.Evaluator"):
        interpolation_curve(model, a, b, _eval_loss(x), 3, lambda_batch=4)
    with pytest.raises(ValueError, match="lambda_batch must be >= 1"):
        interpolation_curve(model, a, b, ev, 3, lambda_batch=0)
    with pytest.raises(ValueError, match="lambda_batch must be 'auto'"):
        interpolation_curve(model, a, b, ev, 3, lambda_batch="fast")


def test_batched_lambdas_fall_back_when_vmap_cannot_batch():
    from pymerge.landscape import Evaluator

    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 3)

        def forward(self, x):
            h = self.fc(x)
            return h if float(h.sum()) > -1e30 else -h  # data-dependent control flow

    torch.manual_seed(0)
    m = DataDependent()
    a = {k: v.clone() for k, v in m.state_dict().items()}
    b = {k: v + 1 for k, v in a.items()}
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    c = interpolation_curve(m, a, b, Evaluator((x, y)), 5, lambda_batch=4)
    assert c.info["mode"] == "loop" and "vmap" in c.info["fallback"]
    ref = interpolation_curve(m, a, b, Evaluator((x, y)), 5, lambda_batch=None)
    np.testing.assert_allclose(c["loss"], ref["loss"], rtol=1e-6)


def test_evaluator_metrics_and_errors():
    from pymerge.landscape import Evaluator

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    ev = Evaluator([(x[:3], y[:3]), (x[3:], y[3:])])
    with torch.no_grad():
        out = model(x)
    got = ev(model)
    assert got["loss"] == pytest.approx(float(nn.functional.cross_entropy(out, y)), rel=1e-6)
    assert got["accuracy"] == pytest.approx(float((out.argmax(1) == y).float().mean()))
    assert Evaluator((x, y), accuracy=False)(model).keys() == {"loss"}
    model.train()
    ev(model)
    assert model.training  # flags restored
    with pytest.raises(ValueError, match="batches is empty"):
        Evaluator([])
    with pytest.raises(TypeError, match=r"batches\[0\] must be an \(inputs, targets\) pair"):
        Evaluator([x])
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        Evaluator((x, y), loss_fn=3)
    with pytest.raises(TypeError, match=r"loss_fn returned a tensor of shape \(10,\)"):
        Evaluator((x, y), lambda o, t: nn.functional.cross_entropy(o, t, reduction="none"))(model)
    needs_grad = torch.ones((), requires_grad=True)
    with pytest.raises(TypeError, match="requires grad"):
        Evaluator((x, y), lambda o, t: needs_grad)(model)
    nan = Evaluator((x, y), lambda o, t: torch.tensor(float("nan")))(model)
    assert np.isnan(nan["loss"])


def test_multi_model_barrier_of_the_mean():
    from pymerge.landscape import multi_model_barrier
    from pymerge.ops import interpolate
    from pymerge.spec import apply_permutation, invert_permutation

    model, a, b, spec, perm, x, y = _mlp_case()
    c = {k: v + 0.1 for k, v in a.items()}
    from pymerge.landscape import Evaluator

    ev = Evaluator((x, y))
    res = multi_model_barrier(model, [a, b, c], ev)
    ref = copy_model(model)
    ref.load_state_dict(interpolate([a, b, c], [1 / 3] * 3))
    assert res.merged["loss"] == pytest.approx(ev(ref)["loss"])
    ends = [ev((ref.load_state_dict(s), ref)[1]) for s in (a, b, c)]
    assert res.barriers["loss"] == pytest.approx(
        res.merged["loss"] - np.mean([e["loss"] for e in ends])
    )
    assert res.barriers["error"] == pytest.approx(
        np.mean([e["accuracy"] for e in ends]) - res.merged["accuracy"]
    )
    # K = 2 with equal weights: the midpoint barrier of the curve
    curve = interpolation_curve(model, a, b, ev, 3)
    two = multi_model_barrier(model, [a, b], ev)
    assert two.barriers["loss"] == pytest.approx(loss_barrier(curve, "midpoint"), abs=1e-5)
    # aligned: B permuted by pi, then aligned back with pi^-1 gives the mean of A and B
    pb = apply_permutation(spec, perm, b)
    al = multi_model_barrier(model, [a, pb], ev, spec=spec, perms=[None, invert_permutation(perm)])
    assert al.merged["loss"] == pytest.approx(two.merged["loss"], rel=1e-5)
    with pytest.raises(ValueError, match="K >= 2"):
        multi_model_barrier(model, [a], ev)
    with pytest.raises(ValueError, match="sum to 1"):
        multi_model_barrier(model, [a, b], ev, weights=[0.5, 0.6])
    with pytest.raises(TypeError, match="perms needs spec"):
        multi_model_barrier(model, [a, b], ev, perms=[None, perm])
    with pytest.raises(ValueError, match="states\\[1\\]"):
        multi_model_barrier(model, [a, {**b, "fc0.bias": torch.zeros(3)}], ev)
