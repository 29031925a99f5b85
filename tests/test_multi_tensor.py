"""The C++ multi-tensor loops (pymerge._multi_tensor) against torch and float64.

Low-level checks of the module the ``native`` backend of ``pymerge.ops.interpolate`` calls:
binary16/bfloat16 conversions against torch's on every (or many) values, the scalar and
AVX2 loops bit-identical for every dtype pair and input count, threaded ranges identical to
one thread, errors. The front is tested with the other backends in test_interpolate.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pymerge._backend import choose_kernels, native_multi_tensor

mt = native_multi_tensor()
pytestmark = pytest.mark.skipif(mt is None, reason="pymerge._multi_tensor is not built")

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
NAMES = {F32: "float32", F16: "float16", BF16: "bfloat16"}


def _all_halves() -> torch.Tensor:
    return torch.from_numpy(np.arange(65536, dtype=np.uint16).view(np.int16)).view(F16)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN where the other is NaN (payloads may differ)."""
    na, nb = torch.isnan(a), torch.isnan(b)
    return torch.equal(na, nb) and torch.equal(a[~na], b[~nb])


def _weighted(xs, w, out_dtype, threads=1):
    """Run weighted_sum on K lists of tensors into one NaN-poisoned flat buffer; returns
    the per-tensor views of it."""
    numels = [x.numel() for x in xs[0]]
    flat = torch.full((sum(numels),), float("nan"), dtype=out_dtype)
    mt.weighted_sum(
        [[x.data_ptr() for x in row] for row in xs],
        flat.data_ptr(),
        numels,
        w,
        NAMES[xs[0][0].dtype],
        NAMES[out_dtype],
        threads,
    )
    return list(flat.split(numels))


@pytest.fixture
def simd():
    """Restore the module's loop set after a test switches it."""
    before = mt.__simd__
    yield
    mt._set_simd(before)


def test_portable_float16_conversions_match_torch_everywhere():
    halves = _all_halves()
    stored_from, loaded = mt._f16_soft([], np.arange(65536, dtype=np.uint16).tolist())
    assert stored_from == []
    assert _same(torch.tensor(loaded, dtype=F32), halves.float())
    g = torch.Generator().manual_seed(0)
    finite = halves.float()[torch.isfinite(halves)].double().unique()
    values = torch.cat(
        [
            halves.float(),  # every binary16 value round-trips
            ((finite[1:] + finite[:-1]) / 2).float(),  # ties: round to even
            torch.randn(20000, generator=g) * 3e4,  # near and past the largest finite (65504)
            torch.randn(20000, generator=g) * 1e-6,  # subnormals
            torch.tensor([65519.99, 65520.0, 1e30, -1e30, float("inf"), float("nan"), -0.0]),
        ]
    )
    stored, _ = mt._f16_soft(values.tolist(), [])
    got = torch.from_numpy(np.array(stored, dtype=np.uint16).view(np.int16)).view(F16)
    assert _same(got.float(), values.half().float())


@pytest.mark.parametrize("dtype", [BF16, F16, F32])
def test_one_input_weight_one_is_a_conversion_like_torch(dtype):
    """K = 1, w = 1: out = rnd(0 + x), i.e. torch's own conversion (-0 becomes +0)."""
    g = torch.Generator().manual_seed(1)
    x = torch.cat(
        [
            torch.randn(5000, generator=g) * 100,
            torch.randn(5000, generator=g) * 1e-30,
            torch.tensor([float("inf"), -float("inf"), float("nan"), 3.0e38, -0.0, 65520.0]),
        ]
    )
    for out_dtype in (BF16, F16, F32):
        (out,) = _weighted([[x]], [1.0], out_dtype)
        assert _same(out.float(), x.to(out_dtype).float()), out_dtype
    src = x.to(dtype)
    (widened,) = _weighted([[src]], [1.0], F32)
    assert _same(widened, src.float())


def _random_lists(K, lengths, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    xs = [[torch.randn(n, generator=g).to(dtype) for n in lengths] for _ in range(K)]
    xs[0][-1][:3] = torch.tensor([float("nan"), float("inf"), -float("inf")]).to(dtype)[
        : len(xs[0][-1][:3])
    ]
    return xs


LENGTHS = [0, 1, 7, 8, 9, 31, 1023, 1024, 1025, 3001]


@pytest.mark.parametrize("in_dtype", [F32, F16, BF16])
@pytest.mark.parametrize("out_dtype", [F32, F16, BF16])
def test_scalar_and_avx2_loops_are_bit_identical(simd, in_dtype, out_dtype):
    if "avx2" not in mt._simd_available():
        pytest.skip("this CPU has no AVX2/F16C: only the scalar loops exist here")
    for K in (1, 2, 3, 4, 5, 7):  # direct loops up to 4 inputs, blocked beyond
        xs = _random_lists(K, LENGTHS, in_dtype, seed=K)
        w = torch.randn(K, generator=torch.Generator().manual_seed(10 + K)).tolist()
        mt._set_simd("scalar")
        a = _weighted(xs, w, out_dtype)
        mt._set_simd("avx2")
        b = _weighted(xs, w, out_dtype)
        for i, (p, q) in enumerate(zip(a, b, strict=True)):
            assert _same(p, q), (K, LENGTHS[i])


@pytest.mark.parametrize("K", [1, 2, 3, 4, 6, 70])  # 70: past the 64 stack slots for inputs
def test_matches_float64_with_one_rounding(K):
    xs = _random_lists(K, LENGTHS, BF16, seed=20 + K)
    for row in xs:  # finite inputs: compare every element
        row[-1].nan_to_num_(0.0, 0.0, 0.0)
    w = torch.randn(K, generator=torch.Generator().manual_seed(K)).tolist()
    w32 = [float(torch.tensor(v, dtype=F32)) for v in w]
    out = _weighted(xs, w, F32)
    for i in range(len(LENGTHS)):
        ref = sum(wk * xs[k][i].double() for k, wk in enumerate(w32))
        scale = sum(abs(wk) * xs[k][i].double().abs() for k, wk in enumerate(w32))
        tol = K * torch.finfo(F32).eps * scale + 1e-30
        assert ((out[i].double() - ref).abs() <= tol).all(), (K, LENGTHS[i])


def test_threads_split_ranges_inside_tensors_identically():
    # uneven tensors, enough elements for 3 threads: ranges start and end inside tensors
    lengths = [270001, 5, 330000, 1, 99999, 200003]
    assert sum(lengths) >= 3 * mt._min_per_thread
    xs = _random_lists(3, lengths, F32, seed=5)
    w = [0.25, -1.5, 2.0]
    one = _weighted(xs, w, BF16, threads=1)
    many = _weighted(xs, w, BF16, threads=3)
    for p, q in zip(one, many, strict=True):
        assert _same(p.float(), q.float())


def test_errors_name_the_problem():
    x = torch.zeros(4)
    p = x.data_ptr()
    with pytest.raises(ValueError, match="2 weights for 1 input lists"):
        mt.weighted_sum([[p]], p, [4], [1.0, 2.0], "float32", "float32")
    with pytest.raises(ValueError, match=r"inputs\[0\] has 1 addresses for 2 numels"):
        mt.weighted_sum([[p]], p, [2, 2], [1.0], "float32", "float32")
    with pytest.raises(ValueError, match=r"inputs\[1\] has 2 addresses for 1 numels"):
        mt.weighted_sum([[p], [p, p]], p, [4], [1.0, 1.0], "float32", "float32")
    with pytest.raises(TypeError, match="in_dtype must be"):
        mt.weighted_sum([[p]], p, [4], [1.0], "float64", "float32")
    with pytest.raises(ValueError, match="null address for tensor 0"):
        mt.weighted_sum([[0]], p, [4], [1.0], "float32", "float32")
    with pytest.raises(ValueError, match=r"numels\[0\] < 0"):
        mt.weighted_sum([[p]], p, [-1], [1.0], "float32", "float32")
    with pytest.raises(ValueError, match="threads"):
        mt.weighted_sum([[p]], p, [4], [1.0], "float32", "float32", 0)
    with pytest.raises(ValueError, match="empty"):
        mt.weighted_sum([], p, [4], [], "float32", "float32")
    with pytest.raises(ValueError, match="not available"):
        mt._set_simd("avx9000")
    # zero-length tensors may have null addresses
    mt.weighted_sum([[0]], 0, [0], [1.0], "float32", "float32")


def test_backend_choice_for_ops_with_and_without_native_loops(monkeypatch):
    x = torch.zeros(3)
    monkeypatch.delenv("PYMERGE_BACKEND", raising=False)
    assert choose_kernels(None, x, native=True) == "native"
    assert choose_kernels(None, x) == "torch"  # an op without C++ loops
    assert choose_kernels("native", x) == "torch"
    assert choose_kernels("native", x, native=True) == "native"
    assert choose_kernels("torch", x, native=True) == "torch"
    monkeypatch.setenv("PYMERGE_BACKEND", "torch")
    assert choose_kernels(None, x, native=True) == "torch"
    meta = torch.zeros(3, device="meta")
    with pytest.raises(RuntimeError, match="CPU tensors only"):
        choose_kernels("native", meta, native=True)


def _permuted_call(a, b, rmap, cmap, runs, alphas, out_dtype, threads):
    """permuted_lerp on one list of 2-D tensors (rmap/cmap/runs: tensors or None each)."""
    ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    numels = [x.numel() for x in a]
    out = torch.full((len(alphas), sum(numels)), float("nan"), dtype=out_dtype)
    rows_out = list(out.unbind(0))
    mt.permuted_lerp(
        [x.data_ptr() for x in a],
        [x.data_ptr() for x in b],
        [x.shape[0] for x in a],
        [x.shape[1] for x in a],
        [ptr(r) for r in rmap],
        [ptr(c) for c in cmap],
        [ptr(r) for r in runs],
        [0 if r is None else r.shape[0] for r in runs],
        [o.data_ptr() for o in rows_out],
        alphas,
        NAMES[a[0].dtype],
        NAMES[out_dtype],
        threads,
    )
    return out


def test_permuted_lerp_gathers_rows_columns_and_runs_like_torch():
    """Row map, column map, column runs (3x3 kernels) and threads cutting rows: the same
    values as gather-then-lerp in fp32 on every path."""
    from pymerge.ops._perm_maps import build_maps
    from pymerge.ops.interpolate import _column_runs

    g = torch.Generator().manual_seed(9)
    shapes = [(300, 40, 3, 3), (1013, 700), (1000,)]
    a = [torch.randn(s, generator=g).to(BF16) for s in shapes]
    b = [torch.randn(s, generator=g).to(BF16) for s in shapes]
    axes = [
        [(0, torch.randperm(300, generator=g)), (1, torch.randperm(40, generator=g))],
        [(1, torch.randperm(700, generator=g))],
        [(0, torch.randperm(1000, generator=g))],
    ]
    maps = [build_maps(s, ax) for s, ax in zip(shapes, axes, strict=True)]
    runs = [_column_runs(c) for _, c in maps]
    assert runs[0] is not None and runs[1] is None  # conv kernels give runs of 9
    flat = [x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(1, -1) for x in a]
    flat_b = [x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(1, -1) for x in b]
    rmaps = [maps[0][0], None, None]  # the second and third permute columns only
    alphas = [0.0, 0.3, 1.0, 1.7]
    ref = []
    for x, y, ax in zip(a, b, axes, strict=True):
        for axis, idx in ax:
            y = y.index_select(axis, idx)
        terms = []
        for al in alphas:  # the C++ expression, op by op in fp32: (1 - al) * a + al * b
            al32 = torch.tensor(al, dtype=F32)
            terms.append((1.0 - al32) * x.float() + al32 * y.float())
        ref.append(torch.stack(terms))
    ref = torch.cat([r.reshape(len(alphas), -1) for r in ref], 1)
    cmaps = [c for _, c in maps]
    for threads in (1, 3):
        for use_runs in (True, False):
            out = _permuted_call(
                flat, flat_b, rmaps, cmaps, runs if use_runs else [None] * 3, alphas, F32, threads
            )
            assert torch.equal(out, ref), (threads, use_runs)
    assert sum(x.numel() for x in a) >= 3 * mt._min_per_thread


def test_permuted_lerp_errors():
    x = torch.zeros(2, 3)
    p = x.data_ptr()
    call = lambda **kw: mt.permuted_lerp(  # noqa: E731
        **{
            "a": [p],
            "b": [p],
            "rows": [2],
            "cols": [3],
            "rowmaps": [0],
            "colmaps": [0],
            "colruns": [0],
            "ncolruns": [0],
            "outs": [p],
            "alphas": [0.5],
            "in_dtype": "float32",
            "out_dtype": "float32",
            **kw,
        }
    )
    with pytest.raises(ValueError, match="rows has 2 entries for 1 tensors"):
        call(rows=[2, 2])
    with pytest.raises(ValueError, match="alphas is empty"):
        call(alphas=[], outs=[])
    with pytest.raises(ValueError, match="got 1 outputs for 2 alphas"):
        call(alphas=[0.1, 0.2])
    with pytest.raises(ValueError, match="null address for tensor 0"):
        call(b=[0])
    with pytest.raises(ValueError, match="negative shape"):
        call(cols=[-3])
    with pytest.raises(TypeError, match="out_dtype must be"):
        call(out_dtype="int8")
    out = torch.full((2, 3), float("nan"))
    ones = torch.ones(2, 3)
    call(outs=[out.data_ptr()], b=[ones.data_ptr()])
    assert torch.equal(out, torch.full((2, 3), 0.5))
