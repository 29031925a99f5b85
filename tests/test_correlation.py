"""Streaming correlation: both backends against a float64 reference.

The Triton kernel runs in the CPU interpreter here (tests/conftest.py sets
TRITON_INTERPRET=1 without a GPU), on tiny shapes; on a GPU machine the same tests run it
on CUDA tensors. Tolerances (max abs error of correlations, which lie in [-1, 1]) are the
documented ones: float32 1e-5, float16 5e-3, bfloat16 3e-2, float64 1e-12.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pymerge.ops as ops
from pymerge._backend import triton_error
from pymerge.ops.correlation import CorrelationAccumulator, correlation

# subprocesses run from here so `python -c` imports the installed pymerge, not the
# source tree of the checkout (which has no compiled _lap and no pymerge.kernels)
_HERE = os.path.dirname(os.path.abspath(__file__))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = triton_error() is None
BACKENDS = [
    "torch",
    pytest.param(
        "triton", marks=pytest.mark.skipif(not HAS_TRITON, reason=f"triton: {triton_error()}")
    ),
]
CORR_TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _features(n: int, d_a: int, d_b: int, seed: int, dtype=torch.float32, offset: float = 0.0):
    """Correlated random features: x_b mixes x_a's features with noise."""
    g = _gen(seed)
    xa = torch.randn(n, d_a, generator=g, dtype=torch.float64) * (
        1 + torch.rand(d_a, generator=g, dtype=torch.float64)
    )
    mix = torch.randn(d_a, d_b, generator=g, dtype=torch.float64) / max(d_a, 1) ** 0.5
    xb = xa @ mix + 0.5 * torch.randn(n, d_b, generator=g, dtype=torch.float64)
    xa = xa + offset + torch.randn(d_a, generator=g, dtype=torch.float64)
    xb = xb - offset + torch.randn(d_b, generator=g, dtype=torch.float64)
    return xa.to(dtype).to(DEVICE), xb.to(dtype).to(DEVICE)


def _ref(xa: torch.Tensor, xb: torch.Tensor | None = None, ddof: int = 1) -> dict:
    """float64 reference statistics; zero-variance features get correlation 0."""
    a = xa.detach().to("cpu", torch.float64)
    b = a if xb is None else xb.detach().to("cpu", torch.float64)
    n = a.shape[0]
    ma, mb = a.mean(0), b.mean(0)
    ca, cb = a - ma, b - mb
    cov = ca.T @ cb / max(n - ddof, 1)
    va, vb = (ca * ca).sum(0), (cb * cb).sum(0)
    sa = torch.where(va > 0, va.rsqrt(), torch.zeros_like(va))
    sb = torch.where(vb > 0, vb.rsqrt(), torch.zeros_like(vb))
    corr = (ca.T @ cb) * sa[:, None] * sb[None, :]
    if xb is None:
        corr.diagonal().copy_((va > 0).to(corr.dtype))
    std_a = (va / max(n - ddof, 1)).sqrt()
    std_b = (vb / max(n - ddof, 1)).sqrt()
    return {"corr": corr, "cov": cov, "mean_a": ma, "mean_b": mb, "std_a": std_a, "std_b": std_b}


def _err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.detach().to("cpu", torch.float64) - ref).abs().max()) if ref.numel() else 0.0


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    scale = float(ref.abs().max()) if ref.numel() else 1.0
    return _err(x, ref) / max(scale, 1e-30)


def _stream(acc: CorrelationAccumulator, xa, xb, cuts) -> CorrelationAccumulator:
    edges = [0, *cuts, xa.shape[0]]
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        if xb is None:
            acc.update(xa[lo:hi])
        else:
            acc.update(xa[lo:hi], xb[lo:hi])
    return acc


# --------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "n,d_a,d_b,cuts",
    [
        (37, 19, 23, [13, 14]),  # not multiples of any block size, a 1-row batch
        (6, 2, 40, [1]),  # very wide
        (301, 3, 2, [100, 250]),  # very tall
    ],
)
def test_matches_float64_reference(backend, dtype, n, d_a, d_b, cuts):
    xa, xb = _features(n, d_a, d_b, seed=n + d_a, dtype=dtype)
    xa0, xb0 = xa.clone(), xb.clone()
    acc = _stream(CorrelationAccumulator(d_a, d_b, backend=backend), xa, xb, cuts)
    assert acc.last_backend == backend
    ref = _ref(xa, xb)
    tol = CORR_TOL[dtype] if backend == "triton" else CORR_TOL[torch.float32]
    assert acc.count == n
    assert _err(acc.correlation(), ref["corr"]) < tol
    assert _rel(acc.covariance(), ref["cov"]) < tol
    assert _rel(acc.mean_a, ref["mean_a"]) < 1e-5
    assert _rel(acc.mean_b, ref["mean_b"]) < 1e-5
    assert _rel(acc.std_a(), ref["std_a"]) < 1e-5
    assert _rel(acc.std_b(), ref["std_b"]) < 1e-5
    assert acc.correlation().dtype == torch.float32
    # inputs never modified
    assert torch.equal(xa, xa0) and torch.equal(xb, xb0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_accumulator(backend):
    xa, xb = _features(40, 5, 7, seed=3, dtype=torch.float32)
    acc = _stream(CorrelationAccumulator(5, 7, backend=backend, dtype=torch.float64), xa, xb, [9])
    tol = 1e-12 if backend == "torch" else CORR_TOL[torch.float32]
    assert acc.correlation().dtype == torch.float64
    assert _err(acc.correlation(), _ref(xa, xb)["corr"]) < tol
    # float64 inputs: the torch path runs in float64 end to end (Triton falls back to it)
    xa64, xb64 = xa.double(), xb.double()
    acc = _stream(
        CorrelationAccumulator(5, 7, backend=backend, dtype=torch.float64), xa64, xb64, [9]
    )
    assert acc.last_backend == "torch"
    assert _err(acc.correlation(), _ref(xa64, xb64)["corr"]) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    g = _gen(5)
    base_a = torch.randn(9, 60, generator=g).to(DEVICE)
    base_b = torch.randn(50, 13, generator=g).to(DEVICE)
    xa = base_a.T[::2][:25]  # transposed, every other row: [25, 9], strides (2, 60)
    xb = base_b[1::2, 1::2]  # sliced: [25, 6], strides (26, 2)
    assert not xa.is_contiguous() and not xb.is_contiguous()
    acc = _stream(CorrelationAccumulator(9, 6, backend=backend), xa, xb, [7])
    assert _err(acc.correlation(), _ref(xa, xb)["corr"]) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_conv_features(backend, memory_format):
    g = _gen(11)
    xa = torch.randn(3, 5, 4, 3, generator=g).to(DEVICE).to(memory_format=memory_format)
    xb = (xa[:, :4] * 2 + torch.randn(3, 4, 4, 3, generator=g).to(DEVICE)).contiguous(
        memory_format=memory_format
    )
    acc = CorrelationAccumulator(5, 4, backend=backend)
    acc.update(xa[:2], xb[:2])
    acc.update(xa[2:], xb[2:])
    flat_a = xa.permute(0, 2, 3, 1).reshape(-1, 5)  # every spatial position is a sample
    flat_b = xb.permute(0, 2, 3, 1).reshape(-1, 4)
    assert acc.count == 3 * 4 * 3
    assert _err(acc.correlation(), _ref(flat_a, flat_b)["corr"]) < 1e-5


def test_sequence_features_and_feature_dim():
    g = _gen(12)
    xa = torch.randn(4, 6, 5, generator=g)  # [N, T, d]
    xb = torch.randn(4, 6, 3, generator=g) + xa[..., :3]
    got = correlation(xa, xb)
    ref = _ref(xa.reshape(-1, 5), xb.reshape(-1, 3))["corr"]
    assert _err(got, ref) < 1e-5
    # conv1d [N, C, L]: features in dim 1
    got1 = correlation(xa.transpose(1, 2), xb.transpose(1, 2), feature_dim=1)
    assert _err(got1, ref) < 1e-5


# --------------------------------------------------------------------------- modes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_self_correlation_and_gram(backend, dtype):
    xa, _ = _features(45, 21, 1, seed=21, dtype=dtype)
    acc = _stream(CorrelationAccumulator(21, backend=backend), xa, None, [20, 21])
    ref = _ref(xa)
    tol = CORR_TOL[dtype] if backend == "triton" else CORR_TOL[torch.float32]
    corr = acc.correlation()
    assert corr.shape == (21, 21)
    assert torch.equal(corr, corr.T)
    assert _err(corr, ref["corr"]) < tol
    assert _rel(acc.covariance(ddof=0), _ref(xa, ddof=0)["cov"]) < tol
    x64 = xa.double().cpu()
    assert _rel(acc.gram(), x64.T @ x64 / 45) < tol
    assert torch.equal(acc.mean_a, acc.mean_b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_joint_statistics(backend):
    xa, xb = _features(33, 6, 5, seed=31)
    acc = _stream(CorrelationAccumulator(6, 5, backend=backend, joint=True), xa, xb, [10])
    cat = torch.cat([xa, xb], 1)
    joint = _ref(cat)
    assert acc.joint_correlation().shape == (11, 11)
    assert _err(acc.joint_correlation(), joint["corr"]) < 1e-5
    assert _rel(acc.joint_covariance(), joint["cov"]) < 1e-5
    assert _err(acc.correlation(), _ref(xa, xb)["corr"]) < 1e-5
    assert _rel(acc.mean_b, xb.double().mean(0).cpu()) < 1e-6
    assert _rel(acc.std_b(), _ref(xb)["std_a"]) < 1e-5
    x64 = cat.double().cpu()
    assert _rel(acc.gram(joint=True), x64.T @ x64 / 33) < 1e-5
    with pytest.raises(ValueError, match="joint=True"):
        CorrelationAccumulator(6, 5).joint_correlation()


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_variance_features_give_zero(backend):
    xa, xb = _features(29, 5, 4, seed=41)
    xa[:, 1] = 0.1  # constant, not a power of two: its mean rounds in float32
    xa[:, 3] = 0.0
    xb[:, 2] = -7.3
    acc = _stream(CorrelationAccumulator(5, 4, backend=backend), xa, xb, [8, 9])
    corr = acc.correlation()
    assert torch.isfinite(corr).all()
    assert (corr[[1, 3]] == 0).all() and (corr[:, 2] == 0).all()
    assert _err(corr, _ref(xa, xb)["corr"]) < 1e-5
    self_acc = _stream(CorrelationAccumulator(5, backend=backend), xa, None, [8])
    sc = self_acc.correlation()
    assert sc[1, 1] == 0 and sc[3, 3] == 0 and sc[0, 0] == 1
    # a single sample: every variance is zero
    one = CorrelationAccumulator(5, 4, backend=backend)
    one.update(xa[:1], xb[:1])
    assert torch.equal(one.correlation(), torch.zeros(5, 4, device=one.device))


# --------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("backend", BACKENDS)
def test_streaming_equals_one_shot(backend):
    xa, xb = _features(64, 7, 9, seed=51, offset=20.0)
    cuts = [1, 2, 11, 11, 30, 31, 63]  # uneven, includes 1-row and empty batches
    streamed = _stream(CorrelationAccumulator(7, 9, backend=backend), xa, xb, cuts)
    one = CorrelationAccumulator(7, 9, backend=backend)
    one.update(xa, xb)
    assert streamed.count == one.count == 64
    assert _err(streamed.correlation(), one.correlation().double().cpu()) < 1e-5
    assert _rel(streamed.covariance(), one.covariance().double().cpu()) < 1e-5
    assert _err(correlation(xa, xb, backend=backend), _ref(xa, xb)["corr"]) < 1e-5


def test_merge_equals_single_accumulator():
    xa, xb = _features(50, 4, 6, seed=61, offset=5.0)
    left = _stream(CorrelationAccumulator(4, 6), xa[:17], xb[:17], [5])
    right = _stream(CorrelationAccumulator(4, 6), xa[17:], xb[17:], [20])
    left.merge(right)
    ref = _ref(xa, xb)
    assert left.count == 50
    assert _err(left.correlation(), ref["corr"]) < 1e-5
    assert _rel(left.mean_b, ref["mean_b"]) < 1e-6
    s1 = _stream(CorrelationAccumulator(4), xa[:10], None, [])
    s1.merge(_stream(CorrelationAccumulator(4), xa[10:], None, []))
    assert _err(s1.correlation(), _ref(xa)["corr"]) < 1e-5
    with pytest.raises(ValueError, match="cannot merge"):
        left.merge(CorrelationAccumulator(4, 5))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(2, 40),
    d_a=st.integers(1, 6),
    d_b=st.integers(1, 6),
    cuts=st.lists(st.integers(0, 40), max_size=5),
    seed=st.integers(0, 2**16),
)
def test_property_any_split_matches_reference(n, d_a, d_b, cuts, seed):
    xa, xb = _features(n, d_a, d_b, seed=seed, offset=3.0)
    cuts = sorted(min(c, n) for c in cuts)
    acc = _stream(CorrelationAccumulator(d_a, d_b, backend="torch"), xa, xb, cuts)
    corr = acc.correlation()
    assert corr.abs().max() <= 1
    assert _err(corr, _ref(xa, xb)["corr"]) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_mean_offset_stable_merge_beats_naive(backend, dtype):
    """|mean| / std = 1e3: the naive E[xy] - E[x]E[y] in float32 collapses, ours does not.

    The reference is float64 statistics of the (already rounded) inputs.
    """
    n = 2048 if backend == "torch" else 256
    xa, xb = _features(n, 3, 2, seed=71, dtype=dtype, offset=1e3)
    ref = _ref(xa, xb)
    acc = _stream(CorrelationAccumulator(3, 2, backend=backend), xa, xb, [n // 3, n // 2])
    ours = _err(acc.correlation(), ref["corr"])
    # naive single-pass formula in float32
    a, b = xa.float(), xb.float()
    ma, mb = a.mean(0), b.mean(0)
    cov = a.T @ b / n - ma[:, None] * mb[None, :]
    va = (a * a).mean(0) - ma * ma
    vb = (b * b).mean(0) - mb * mb
    naive = cov / (va.clamp_min(1e-30).sqrt()[:, None] * vb.clamp_min(1e-30).sqrt()[None, :])
    naive_err = _err(torch.nan_to_num(naive, nan=10.0), ref["corr"])
    assert ours < 3e-5
    assert naive_err > 100 * ours


# --------------------------------------------------------------------------- kernel


@pytest.mark.skipif(not HAS_TRITON, reason=f"triton: {triton_error()}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("center_b", [False, True])
def test_kernel_against_reference_with_poisoned_outputs(monkeypatch, dtype, split_k, center_b):
    import pymerge.kernels.correlation as kc

    def poisoned(shape, device, zero):
        buf = torch.full(shape, float("nan"), device=device, dtype=torch.float32)
        return buf.zero_() if zero else buf

    monkeypatch.setattr(kc, "_alloc", poisoned)
    g = _gen(81)
    xa = torch.randn(35, 18, generator=g).to(dtype).to(DEVICE)
    xb = torch.randn(35, 21, generator=g).to(dtype).to(DEVICE)
    ka = torch.randn(18, generator=g).to(DEVICE)
    kb = torch.randn(21, generator=g).to(DEVICE)
    cross, sa, qa, sb, qb = kc.correlation_update(
        xa, xb, ka, kb, split_k=split_k, center_b=center_b, block=(16, 16, 16)
    )
    a = xa.double().cpu() - ka.double().cpu()
    b = xb.double().cpu() - kb.double().cpu()
    ref = a.T @ (b if center_b else xb.double().cpu())
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert _rel(cross, ref) < tol
    for got, want in ((sa, a.sum(0)), (qa, (a * a).sum(0)), (sb, b.sum(0)), (qb, (b * b).sum(0))):
        assert _rel(got, want) < 1e-5
    # accumulate mode adds into a prefilled output
    prefill = torch.randn(18, 21, generator=g).to(DEVICE)
    out = prefill.clone()
    kc.correlation_update(xa, xb, ka, kb, out=out, split_k=split_k, center_b=center_b)
    assert _rel(out, ref + prefill.double().cpu()) < tol


@pytest.mark.skipif(not HAS_TRITON, reason=f"triton: {triton_error()}")
def test_kernel_symmetric_mode_touches_upper_tiles_only():
    import pymerge.kernels.correlation as kc

    g = _gen(91)
    x = torch.randn(20, 40, generator=g).to(DEVICE)
    k = torch.randn(40, generator=g).to(DEVICE)
    out = torch.full((40, 40), 7.0, device=DEVICE)
    _, sa, qa, sb, qb = kc.correlation_update(
        x, x, k, k, out=out, symmetric=True, center_b=False, split_k=1, block=(16, 16, 16)
    )
    c = x.double().cpu() - k.double().cpu()
    ref = c.T @ x.double().cpu() + 7.0
    upper = torch.triu(torch.ones(40, 40, dtype=torch.bool))
    assert _rel(out.cpu()[upper], ref[upper]) < 1e-5
    assert (out.cpu()[32:, :16] == 7.0).all()  # tile (2, 0) lies below the diagonal
    assert sa is sb and _rel(sb, c.sum(0)) < 1e-5 and _rel(qb, (c * c).sum(0)) < 1e-5


# --------------------------------------------------------------------------- errors


def test_bad_input_errors():
    acc = CorrelationAccumulator(3, 2)
    x3, x2 = torch.randn(5, 3), torch.randn(5, 2)
    with pytest.raises(ValueError, match=r"5 samples.*\(4, 2\)"):
        acc.update(x3, torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"\(5, 4\).*d_a=3"):
        acc.update(torch.randn(5, 4), x2)
    with pytest.raises(ValueError, match="d_b=2"):
        acc.update(x3, torch.randn(5, 3))
    with pytest.raises(TypeError, match="torch.int64"):
        acc.update(torch.ones(5, 3, dtype=torch.int64), x2)
    with pytest.raises(TypeError, match="complex64"):
        acc.update(x3, torch.ones(5, 2, dtype=torch.complex64))
    with pytest.raises(TypeError, match="list"):
        acc.update([[1.0, 2.0, 3.0]], x2)
    with pytest.raises(ValueError, match="meta"):
        acc.update(x3, torch.empty(5, 2, device="meta"))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        acc.update(torch.randn(3), x2)
    with pytest.raises(ValueError, match="x_b"):
        acc.update(x3)
    with pytest.raises(ValueError, match="at least 1 sample"):
        acc.correlation()
    with pytest.raises(ValueError, match="one input"):
        CorrelationAccumulator(3).update(x3, x3)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="d_a"):
            CorrelationAccumulator(bad, 2)
    with pytest.raises(TypeError, match="float16"):
        CorrelationAccumulator(3, 2, dtype=torch.float16)
    with pytest.raises(ValueError, match="joint"):
        CorrelationAccumulator(3, joint=True)
    on_meta = CorrelationAccumulator(3, 2, device="meta")
    with pytest.raises(ValueError, match="meta"):
        on_meta.update(x3, x2)
    with pytest.raises(ValueError, match="PYMERGE|backend"):
        CorrelationAccumulator(3, 2, backend="cuda-please").update(x3, x2)
    one = CorrelationAccumulator(3, 2)
    one.update(x3[:1], x2[:1])
    with pytest.raises(ValueError, match="at least 2"):
        one.covariance()
    assert one.covariance(ddof=0).shape == (3, 2)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs(backend, bad):
    xa, xb = _features(20, 4, 3, seed=101)
    acc = CorrelationAccumulator(4, 3, backend=backend)
    acc.update(xa[:10], xb[:10])
    before = (acc.correlation(), acc.mean_a, acc.std_b(), acc.count)
    poisoned = xb[10:].clone()
    poisoned[3, 1] = bad
    with pytest.raises(ValueError, match=r"x_b \(10, 3\) contains 1 NaN/inf"):
        acc.update(xa[10:], poisoned)
    after = (acc.correlation(), acc.mean_a, acc.std_b(), acc.count)
    assert before[3] == after[3] == 10
    for u, v in zip(before[:3], after[:3], strict=True):
        assert torch.equal(u, v)  # unchanged
    # check_finite=False: the non-finite value spreads only to the features it touches
    loose = CorrelationAccumulator(4, 3, backend=backend, check_finite=False)
    loose.update(xa, torch.cat([xb[:10], poisoned]))
    corr = loose.correlation()
    assert not torch.isfinite(corr[:, 1]).any()
    keep = [0, 2]
    assert _err(corr[:, keep], _ref(xa, xb[:, keep])["corr"]) < 1e-5


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["cross", "self", "joint"])
def test_overflowing_squares_raise_instead_of_nan(backend, mode):
    """Finite float32 features whose squares overflow: a clear error suggesting float64,
    not all-NaN correlations (the finite check of the sums cannot see it)."""
    xa, xb = _features(64, 4, 3, seed=131)
    d_b = None if mode == "self" else 3
    acc = CorrelationAccumulator(4, d_b, backend=backend, joint=mode == "joint")
    second = None if mode == "self" else xb
    acc.update(xa[:32], None if second is None else second[:32])
    before = (acc.mean_a.clone(), acc.var_a().clone(), acc.covariance().clone(), acc.count)
    huge = xa[32:].clone()
    huge[:, 2] *= 3e19  # squares ~1e39: past float32's 3.4e38; the sums stay finite
    assert bool(torch.isfinite(huge.sum(0)).all())
    name = "x_a/x_b" if mode == "joint" else "x_a"
    msg = rf"{name} \(32, 4\): its sums of squared deviations overflow torch.float32"
    msg += r".*dtype=torch\.float64"
    with pytest.raises(ValueError, match=msg) as info:
        acc.update(huge, None if second is None else second[32:])
    if backend == "torch":
        assert "not updated" in str(info.value)
        after = (acc.mean_a, acc.var_a(), acc.covariance(), acc.count)
        assert after[3] == before[3]
        for u, v in zip(before[:3], after[:3], strict=True):
            assert torch.equal(u, v)
    else:  # float32 statistics: the kernel added the cross products already
        assert "reset()" in str(info.value)
        with pytest.raises(ValueError, match="reset"):
            acc.correlation()
        with pytest.raises(ValueError, match="reset"):
            acc.update(xa[:32], None if second is None else second[:32])
        acc.reset()
        acc.update(xa[:32], None if second is None else second[:32])
        assert torch.isfinite(acc.correlation()).all()
    # float64 statistics on the torch path: the same batch is fine and correct
    wide = CorrelationAccumulator(
        4, d_b, backend="torch", dtype=torch.float64, joint=mode == "joint"
    )
    wide.update(xa[:32], None if second is None else second[:32])
    wide.update(huge, None if second is None else second[32:])
    full = torch.cat([xa[:32], huge])
    corr = wide.correlation()
    assert torch.isfinite(corr).all()
    ref = _ref(full, full if mode == "self" else xb)["corr"]
    assert _err(corr, ref) < 1e-9


def test_overflow_over_many_batches_and_in_the_co_moment():
    """Each batch's sums fit, the running sums of squares do not: the batch that would
    overflow is refused and the statistics of the earlier ones stay."""
    g = torch.Generator().manual_seed(5)
    acc = CorrelationAccumulator(2, 2, backend="torch")
    seen = 0
    with pytest.raises(ValueError, match=r"x_b \(16, 2\): its sums of squared deviations overflow"):
        for _ in range(10):
            xa = torch.randn(16, 2, generator=g)
            xb = torch.randn(16, 2, generator=g) * 2e18  # one batch: sum of squares ~6e37
            acc.update(xa, xb)
            seen += 16
    assert acc.count == seen and 0 < seen < 160
    assert torch.isfinite(acc.correlation()).all()
    # the co-moment is checked where results are read
    acc._m2[0, 1] = float("inf")
    with pytest.raises(ValueError, match=r"the co-moment \(2, 2\): its sums of products overflow"):
        acc.correlation()
    # check_finite=False: no checks, the overflow propagates as in IEEE arithmetic
    loose = CorrelationAccumulator(2, backend="torch", check_finite=False)
    loose.update(torch.tensor([[1e30, 1.0], [-1e30, 2.0]]))
    assert not torch.isfinite(loose.var_a()).all()


def test_mixed_dtypes_promote_and_numpy_inputs():
    xa, xb = _features(30, 4, 3, seed=111)
    got = correlation(xa.half(), xb.float(), backend="torch")
    assert _err(got, _ref(xa.half(), xb)["corr"]) < 1e-5
    got64 = correlation(xa.double(), xb.double(), backend="torch")  # into float32 statistics
    assert got64.dtype == torch.float32 and _err(got64, _ref(xa, xb)["corr"]) < 1e-5
    got_np = correlation(xa.cpu().numpy(), xb.cpu().numpy())
    assert _err(got_np, _ref(xa, xb)["corr"]) < 1e-5
    # `pymerge.ops.correlation` names the function even after the submodule was imported
    assert ops.CorrelationAccumulator is CorrelationAccumulator
    assert torch.equal(ops.correlation(xa, xb), correlation(xa, xb))


def test_reset_and_repr():
    xa, xb = _features(10, 2, 2, seed=121)
    acc = CorrelationAccumulator(2, 2)
    acc.update(xa, xb)
    acc.reset()
    assert acc.count == 0
    acc.update(xa[:5], xb[:5])
    assert _err(acc.correlation(), _ref(xa[:5], xb[:5])["corr"]) < 1e-5
    assert "count=5" in repr(acc)


def test_requires_grad_inputs_are_detached():
    xa = torch.randn(12, 3, requires_grad=True)
    xb = torch.randn(12, 2)
    acc = CorrelationAccumulator(3, 2)
    acc.update(xa * 2, xb)
    assert not acc.correlation().requires_grad
    assert xa.grad is None
    assert np.isfinite(acc.correlation().numpy()).all()


def test_works_without_triton():
    """The torch path never imports Triton (a machine without it still works)."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from pymerge.ops import CorrelationAccumulator\n"
        "acc = CorrelationAccumulator(3, 2)\n"
        "acc.update(torch.randn(9, 3), torch.randn(9, 2))\n"
        "assert acc.last_backend == 'torch' and acc.correlation().shape == (3, 2)\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYMERGE_BACKEND"}
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=_HERE
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


_COMPILE_SM90 = r"""
import os, subprocess, sys, tempfile
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import pymerge.kernels.correlation as kc

fn = kc._corr_update_kernel
names = fn.arg_names
out = []
for dt, sym, atomic, prec, (bm, bn, bk, warps, stages) in (
    ("bf16", False, False, "ieee", (128, 128, 64, 8, 3)),
    ("fp32", True, True, "tf32", (64, 64, 32, 4, 3)),
):
    ptr = "*" + dt
    ints = ("N", "DA", "DB", "stride_an", "stride_bn", "stride_om", "SPLIT_K")
    sig = {n: "*fp32" for n in names if n.endswith("_ptr")}
    sig.update(xa_ptr=ptr, xb_ptr=ptr, **{n: "i32" for n in ints})
    consts = dict(
        stride_ad=1, stride_bd=1, stride_on=1,  # Triton specialises unit strides
        DOT_DTYPE={"bf16": tl.bfloat16, "fp32": tl.float32}[dt], INPUT_PRECISION=prec,
        CENTER_B=dt == "fp32", ACCUMULATE=True, SYMMETRIC=sym, ATOMIC=atomic, EMULATE_DOT=0,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
    )
    sig.update({n: "constexpr" for n in consts})
    div16 = [n for n in names if n.endswith("_ptr")] + list(ints[:-1])
    src = ASTSource(
        fn=fn, signature={n: sig[n] for n in names},
        constexprs={(names.index(k),): v for k, v in consts.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in div16},
    )
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps, "num_stages": stages})
    ptx = k.asm["ptx"]
    spill = "?"
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(tool):
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(k.asm["cubin"])
        usage = subprocess.run([tool, "--dump-resource-usage", f.name],
                               capture_output=True, text=True).stdout
        os.unlink(f.name)
        spill = "0" if "STACK:0 " in usage else "spills"
    out.append(f"{dt} wgmma={ptx.count('wgmma.mma_async')} stack={spill}")
print(";".join(out))
"""


@pytest.mark.skipif(not HAS_TRITON, reason=f"triton: {triton_error()}")
def test_kernel_compiles_for_sm90():
    """CPU twin of the GPU runs: the kernel must compile for an H100 (sm_90), bf16 through
    the tensor cores (wgmma) without register spills; the interpreter cannot catch this."""
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception as exc:  # pragma: no cover - triton without its NVIDIA backend
        pytest.skip(f"triton's NVIDIA backend is unavailable: {exc}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run(
        [sys.executable, "-c", _COMPILE_SM90], capture_output=True, text=True, env=env, cwd=_HERE
    )
    assert res.returncode == 0, res.stderr[-3000:]
    bf16, fp32 = res.stdout.strip().splitlines()[-1].split(";")
    assert bf16.startswith("bf16 wgmma=") and not bf16.startswith("bf16 wgmma=0 ")
    assert "spills" not in bf16 and "spills" not in fp32
    assert fp32.startswith("fp32 wgmma=")  # tf32 also runs on the tensor cores
    assert not fp32.startswith("fp32 wgmma=0 ")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plain_sums_when_torch_lacks_batch_norm_update_stats(monkeypatch, dtype):
    """The torch path's fused column statistics have a plain fallback; both agree."""
    g = torch.Generator().manual_seed(7)
    xa = torch.randn(300, 37, generator=g) * 3 + 50
    xb = torch.randn(300, 21, generator=g) - 4
    fast = CorrelationAccumulator(37, 21, dtype=dtype, backend="torch")
    for i in range(0, 300, 70):
        fast.update(xa[i : i + 70], xb[i : i + 70])
    monkeypatch.delattr(torch, "batch_norm_update_stats")
    plain = CorrelationAccumulator(37, 21, dtype=dtype, backend="torch")
    for i in range(0, 300, 70):
        plain.update(xa[i : i + 70], xb[i : i + 70])
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(plain.correlation(), fast.correlation(), atol=tol, rtol=tol)
    torch.testing.assert_close(plain.std_a(), fast.std_a(), atol=tol, rtol=tol)
    ref = torch.corrcoef(torch.cat([xa, xb], 1).double().T)[:37, 37:]
    assert (plain.correlation().double() - ref).abs().max() < 10 * tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_lazily_negated_inputs_read_as_their_values(backend):
    """torch._neg_view inputs (memory holds -x): the kernel must not read -x."""
    g = torch.Generator().manual_seed(77)
    x, y = torch.randn(40, 6, generator=g), torch.randn(40, 5, generator=g)
    lazy = torch._neg_view(-x)
    assert lazy.is_neg() and torch.equal(lazy, x)
    got = correlation(lazy, y, backend=backend)
    ref = correlation(x, y, backend=backend)
    assert torch.allclose(got, ref, atol=1e-6)


# --------------------------------------------------------------------------- moments


def test_one_chan_merge_for_channel_stats_and_the_accumulator():
    """pymerge.ops.moments holds the library's one per-feature Chan merge: ChannelStats
    (REPAIR) and CorrelationAccumulator agree with each other and with float64 two-pass
    statistics over uneven batches, |mean| >> std included."""
    import sys

    from pymerge.align import _hooks
    from pymerge.ops.moments import ChannelStats, chan_merge

    assert ops.ChannelStats is ChannelStats is sys.modules["pymerge.align.repair"].ChannelStats
    assert not hasattr(_hooks, "ChannelStats")  # one implementation, no twin left behind
    g = torch.Generator().manual_seed(17)
    x = torch.randn(301, 5, generator=g, dtype=torch.float64) * 0.01 + 1e4
    cuts = [0, 1, 2, 50, 173, 301]
    st = ChannelStats(5)
    acc = CorrelationAccumulator(5, dtype=torch.float64, backend="torch")
    n, mean, m2 = 0, torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    for lo, hi in zip(cuts, cuts[1:], strict=False):
        xb = x[lo:hi]
        st.update(xb)
        acc.update(xb)
        mean, m2, _ = chan_merge(n, mean, m2, hi - lo, xb.mean(0), ((xb - xb.mean(0)) ** 2).sum(0))
        n += hi - lo
    ref_var = x.var(0, correction=0)
    assert st.count == acc.count == n == 301
    for var in (st.var(), acc.var_a(ddof=0), m2 / n):
        assert torch.allclose(var, ref_var, rtol=1e-9, atol=0)
    assert torch.allclose(st.mean, x.mean(0), rtol=1e-15)
    assert torch.allclose(mean, st.mean, rtol=1e-15)
    assert torch.allclose(st.std(), ref_var.sqrt(), rtol=1e-9)
    assert torch.allclose(st.var(unbiased=True), x.var(0), rtol=1e-9)


def test_channel_stats_layouts_and_errors():
    from pymerge.ops import ChannelStats

    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 5, 6, generator=g).half()  # [N, C, H, W], channels along dim 1
    st = ChannelStats(3)
    st.update(x[:1], dim=1)
    st.update(x[1:], dim=1)
    flat = x.float().double().movedim(1, -1).reshape(-1, 3)
    assert torch.allclose(st.mean, flat.mean(0), rtol=1e-6)
    assert torch.allclose(st.var(), flat.var(0, correction=0), rtol=1e-5)
    st.update(torch.zeros(0, 3))  # no samples: nothing changes
    assert st.count == 4 * 5 * 6
    with pytest.raises(ValueError, match=r"expected 3 channels along dim -1, got shape \(2, 4\)"):
        st.update(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="no samples"):
        ChannelStats(2).var()
    one = ChannelStats(2)
    one.update(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="two samples"):
        one.var(unbiased=True)
    assert "ChannelStats(d=2, count=1" in repr(one)
