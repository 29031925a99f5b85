"""The C++ multi-tensor loops (pymerge._multi_tensor) against torch and float64.

Low-level checks of the module the ``native`` backend of ``pymerge.ops.interpolate`` calls:
binary16/bfloat16 conversions against torch's on every (or many) values, the scalar and
AVX2 loops bit-identical for every dtype pair and input count, threaded ranges identical to
one thread, the checked buffers (wrong sizes, dtypes, layouts, maps and scalars passed
straight to the module are errors that name the buffer, and nothing is written), the GIL
released during the loops. The front is tested with the other backends in
test_interpolate.py.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from torch.utils.dlpack import to_dlpack

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
        [[to_dlpack(x) for x in row] for row in xs],
        to_dlpack(flat),
        w,
        NAMES[xs[0][0].dtype],
        NAMES[out_dtype],
        threads,
    )
    return list(flat.split(numels))


def _np16(t: torch.Tensor) -> np.ndarray:
    """A zero-copy NumPy view of a tensor; fp16/bf16 as the 16-bit integers of their bits."""
    return t.view(torch.int16).numpy() if t.element_size() == 2 else t.numpy()


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


def test_numpy_views_give_the_same_bits_as_dlpack_capsules():
    """Zero-copy NumPy views (16-bit integer views for fp16/bf16) are read like capsules."""
    for in_dtype in (F32, F16, BF16):
        xs = _random_lists(3, [0, 5, 1025], in_dtype, seed=3)
        w = [0.5, -1.25, 3.0]
        for out_dtype in (F32, F16, BF16):
            ref = torch.cat(_weighted(xs, w, out_dtype))
            flat = torch.full((ref.numel(),), float("nan"), dtype=out_dtype)
            mt.weighted_sum(
                [[_np16(x) for x in row] for row in xs],
                _np16(flat),
                w,
                NAMES[in_dtype],
                NAMES[out_dtype],
            )
            assert _same(flat.float(), ref.float()), (in_dtype, out_dtype)
    x = torch.randn(6, dtype=F16)
    out = torch.empty(6, dtype=F16)
    mt.weighted_sum([[x.numpy()]], out.numpy(), [1.0], "float16", "float16")  # numpy float16
    assert torch.equal(out, x)


def _guarded(n: int, dtype=F32, guard: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """A NaN-poisoned buffer of n elements inside a bigger one whose guard elements around
    it must stay untouched: (whole, the n elements)."""
    whole = torch.full((n + 2 * guard,), 7.0, dtype=dtype)
    inner = whole[guard : guard + n]
    inner.fill_(float("nan"))
    return whole, inner


def _untouched(whole: torch.Tensor, guard: int = 8) -> bool:
    inner = whole[guard:-guard]
    return bool((whole[:guard] == 7).all() and (whole[-guard:] == 7).all() and inner.isnan().all())


def test_wrong_sizes_are_errors_naming_the_buffer_and_nothing_is_written():
    x, y = torch.randn(2, 5), torch.randn(10)
    D = to_dlpack
    for n in (9, 11, 0):  # out one too small, one too large, empty
        whole, out = _guarded(n)
        with pytest.raises(
            ValueError, match=rf"out has {n} elements, the 1 tensors of inputs\[0\] have 10"
        ):
            mt.weighted_sum([[D(x)]], D(out), [1.0], "float32", "float32")
        assert _untouched(whole)
    whole, out = _guarded(10)
    with pytest.raises(
        ValueError, match=r"inputs\[1\]\[0\] has 9 elements, inputs\[0\]\[0\] has 10"
    ):
        mt.weighted_sum([[D(x)], [D(y[:9])]], D(out), [1.0, 1.0], "float32", "float32")
    with pytest.raises(ValueError, match=r"inputs\[1\] has 2 buffers, inputs\[0\] has 1"):
        mt.weighted_sum([[D(x)], [D(y), D(y)]], D(out), [1.0, 1.0], "float32", "float32")
    assert _untouched(whole)
    # the same through NumPy views
    with pytest.raises(ValueError, match=r"out has 9 elements"):
        mt.weighted_sum([[x.numpy()]], np.empty(9, np.float32), [1.0], "float32", "float32")
    # permuted_lerp: b of another size, out not M rows of the total, a plan of another size
    whole, out = _guarded(2 * 10)
    call = lambda **kw: mt.permuted_lerp(  # noqa: E731
        **{
            "a": [D(x)],
            "b": [D(y)],
            "plans": [None],
            "out": D(out),
            "alphas": [0.25, 0.5],
            "in_dtype": "float32",
            "out_dtype": "float32",
            **kw,
        }
    )
    with pytest.raises(ValueError, match=r"b\[0\] has 9 elements, a\[0\] has 10"):
        call(b=[D(y[:9])])
    with pytest.raises(
        ValueError, match=r"out has 20 elements, 3 alphas x 10 elements of a need 30"
    ):
        call(alphas=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"plans\[0\] gathers a \[3, 3\] matrix, a\[0\] has 10"):
        call(plans=[mt.GatherPlan(3, 3, colmap=np.arange(3))])
    with pytest.raises(TypeError, match=r"plans\[0\] must be None or a GatherPlan, got tuple"):
        call(plans=[(2, 5, 0, 0, 0, 0)])
    with pytest.raises(ValueError, match="plans has 2 entries for 1 tensors"):
        call(plans=[None, None])
    assert _untouched(whole)
    call()  # the same arguments with the right sizes work
    assert torch.equal(
        out.view(2, 10),
        torch.stack([0.75 * x.reshape(-1) + 0.25 * y, 0.5 * x.reshape(-1) + 0.5 * y]),
    )


def test_each_module_raises_its_own_not_contiguous_error():
    """The two compiled modules share the checked-buffer code (one C++ exception type): each
    must still raise its own NotContiguousError, whichever was imported last."""
    tv = pytest.importorskip("pymerge._task_vectors", reason="pymerge._task_vectors is not built")
    assert tv.NotContiguousError is not mt.NotContiguousError
    x = torch.randn(4, 6)
    with pytest.raises(mt.NotContiguousError, match="not contiguous"):
        mt.weighted_sum(
            [[to_dlpack(x.t())]], to_dlpack(torch.empty(24)), [1.0], "float32", "float32"
        )


def test_wrong_dtypes_layouts_and_kinds_are_errors():
    D = to_dlpack
    x = torch.randn(4, 6)
    out = torch.empty(24)
    ws = lambda inp, o=None, i="float32", od="float32": mt.weighted_sum(  # noqa: E731
        [[inp]], D(out) if o is None else o, [1.0], i, od
    )
    with pytest.raises(TypeError, match=r"inputs\[0\]\[0\] has dtype float16, expected bfloat16"):
        ws(D(x.half()), i="bfloat16")
    with pytest.raises(TypeError, match=r"inputs\[0\]\[0\] has dtype bfloat16, expected float16"):
        ws(D(x.bfloat16()), i="float16")
    with pytest.raises(TypeError, match=r"inputs\[0\]\[0\] has dtype float64, expected float32"):
        ws(D(x.double()))
    with pytest.raises(TypeError, match=r"inputs\[0\]\[0\] has dtype int32, expected float32"):
        ws(np.zeros(24, np.int32))
    with pytest.raises(TypeError, match=r"has dtype float16, expected int16 or uint16"):
        ws(np.zeros(24, np.float16), i="bfloat16")  # numpy float16 bits are not bf16
    with pytest.raises(TypeError, match=r"has dtype >f4, expected float32"):
        ws(np.zeros(24, ">f4"))  # byte-swapped
    with pytest.raises(TypeError, match=r"out has dtype float32, expected bfloat16"):
        ws(D(x), od="bfloat16")
    assert issubclass(mt.NotContiguousError, ValueError)  # the front retries on it
    with pytest.raises(
        mt.NotContiguousError,
        match=r"inputs\[0\]\[0\] is not contiguous \(shape \(6, 4\), strides \(1, 6\)\)",
    ):
        ws(D(x.t()))
    with pytest.raises(mt.NotContiguousError, match=r"inputs\[0\]\[0\] is not C-contiguous"):
        ws(np.zeros(48, np.float32)[::2])
    with pytest.raises(ValueError, match=r"inputs\[0\]\[0\] is not aligned"):
        ws(np.frombuffer(bytearray(100), np.uint8)[1:97].view(np.float32))
    ro = np.zeros(24, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        ws(D(x), o=ro)
    with pytest.raises(
        TypeError, match=r"inputs\[0\]\[0\] must be a NumPy array or a DLPack capsule.*got Tensor"
    ):
        ws(x)
    with pytest.raises(TypeError, match=r"inputs\[0\] must be a list or tuple, got generator"):
        mt.weighted_sum([(D(x) for _ in range(1))], D(out), [1.0], "float32", "float32")
    cap = D(x)
    torch.utils.dlpack.from_dlpack(cap)  # consumes the capsule
    with pytest.raises(TypeError, match="'used_dltensor' is not an unconsumed DLPack tensor"):
        ws(cap)
    with pytest.raises(ValueError, match=r"out overlaps inputs\[0\]\[0\]"):
        ws(D(x), o=D(x.view(-1)))  # in place
    with pytest.raises(TypeError, match=r"weights\[0\] = 'x' is not a number"):
        mt.weighted_sum([[D(x)]], D(out), ["x"], "float32", "float32")
    with pytest.raises(TypeError, match="in_dtype must be"):
        mt.weighted_sum([[D(x)]], D(out), [1.0], "float64", "float32")
    with pytest.raises(TypeError, match="out_dtype must be"):
        mt.weighted_sum([[D(x)]], D(out), [1.0], "float32", torch.float32)


def test_errors_name_the_problem():
    x = torch.zeros(4)
    D = to_dlpack
    with pytest.raises(ValueError, match="2 weights for 1 input lists"):
        mt.weighted_sum([[D(x)]], D(torch.zeros(4)), [1.0, 2.0], "float32", "float32")
    with pytest.raises(ValueError, match="empty"):
        mt.weighted_sum([], D(x), [], "float32", "float32")
    with pytest.raises(ValueError, match="not available"):
        mt._set_simd("avx9000")
    # zero-length buffers and no tensors at all are fine
    mt.weighted_sum([[D(torch.zeros(0))]], D(torch.zeros(0)), [1.0], "float32", "float32")
    mt.weighted_sum([[]], D(torch.zeros(0)), [1.0], "float32", "float32")


@pytest.mark.parametrize("bad", [0, -1, 2**40, 2**70, True, 1.5, "2", None])
def test_threads_out_of_range_is_a_clear_error(bad):
    D = to_dlpack
    x = torch.zeros(4)
    kind = ValueError if isinstance(bad, int) and not isinstance(bad, bool) else TypeError
    with pytest.raises(kind, match=r"threads.*\[1, 1024\]") as info:
        mt.weighted_sum([[D(x)]], D(torch.zeros(4)), [1.0], "float32", "float32", bad)
    assert "Invoked with" not in str(info.value)  # not pybind's signature dump
    with pytest.raises(kind, match=r"threads.*\[1, 1024\]"):
        mt.permuted_lerp(
            [D(x)], [D(x)], [None], D(torch.zeros(4)), [0.5], "float32", "float32", bad
        )
    mt.weighted_sum([[D(x)]], D(torch.zeros(4)), [1.0], "float32", "float32", 1024)


def test_gather_plans_are_validated_when_made():
    with pytest.raises(
        ValueError,
        match=r"rowmap\[1\] = 4 is not a row offset \(source row \* 3, source row in \[0, 2\)\)",
    ):
        mt.GatherPlan(2, 3, rowmap=np.array([3, 4]))
    with pytest.raises(ValueError, match=r"rowmap\[0\] = 6 is not a row offset"):
        mt.GatherPlan(2, 3, rowmap=np.array([6, 0]))  # row 2 of a 2-row matrix
    with pytest.raises(ValueError, match=r"rowmap\[0\] = -3 is not a row offset"):
        mt.GatherPlan(2, 3, rowmap=np.array([-3, 0]))
    with pytest.raises(ValueError, match="rowmap has 3 entries, expected 2"):
        mt.GatherPlan(2, 3, rowmap=np.array([0, 3, 0]))
    with pytest.raises(ValueError, match=r"colmap\[2\] = 3 is out of range \[0, 3\)"):
        mt.GatherPlan(2, 3, colmap=np.array([0, 1, 3]))
    with pytest.raises(ValueError, match=r"colmap\[0\] = -1 is out of range"):
        mt.GatherPlan(2, 3, colmap=np.array([-1, 1, 2]))
    with pytest.raises(TypeError, match="colmap has dtype int32, expected int64"):
        mt.GatherPlan(2, 3, colmap=np.array([0, 1, 2], np.int32))
    with pytest.raises(ValueError, match="give colmap or runs, not both"):
        mt.GatherPlan(1, 3, colmap=np.arange(3), runs=np.array([[0, 0, 3]]))
    bad_runs = {
        "gap": [[0, 0, 2], [3, 3, 3]],
        "overlap": [[0, 0, 4], [3, 3, 3]],
        "source past the end": [[0, 0, 3], [3, 4, 3]],
        "zero length": [[0, 0, 0], [0, 0, 6]],
        "negative source": [[0, -1, 3], [3, 3, 3]],
    }
    for why, runs in bad_runs.items():
        with pytest.raises(ValueError, match="does not continue the runs"):
            mt.GatherPlan(1, 6, runs=np.array(runs))
            pytest.fail(why)
    with pytest.raises(ValueError, match=r"runs cover columns \[0, 3\), not \[0, 6\)"):
        mt.GatherPlan(1, 6, runs=np.array([[0, 3, 3]]))
    with pytest.raises(ValueError, match="not a multiple of 3"):
        mt.GatherPlan(1, 6, runs=np.arange(4))
    with pytest.raises(ValueError, match="rows=-1 is out of range"):
        mt.GatherPlan(-1, 3)
    with pytest.raises(ValueError, match="overflows"):
        mt.GatherPlan(2**40, 2**40)
    plan = mt.GatherPlan(2, 3, rowmap=np.array([3, 0]), colmap=torch.tensor([2, 0, 1]).numpy())
    assert (plan.rows, plan.cols, plan.nbytes) == (2, 3, 40)
    # the plan owns a copy: changing the arrays afterwards changes nothing
    src = np.array([2, 0, 1])
    plan = mt.GatherPlan(1, 3, colmap=src)
    src[:] = 10**9
    a, b = torch.zeros(3), torch.tensor([1.0, 2.0, 3.0])
    out = torch.empty(3)
    mt.permuted_lerp(
        [to_dlpack(a)], [to_dlpack(b)], [plan], to_dlpack(out), [1.0], "float32", "float32"
    )
    assert out.tolist() == [3.0, 1.0, 2.0]


def test_the_gil_is_released_during_the_loops():
    """Python code on another thread runs while the C++ loops do."""
    n = 1 << 22
    xs = [[torch.randn(n)] for _ in range(6)]
    out = torch.empty(n)
    args = (
        [[to_dlpack(x) for x in row] for row in xs],
        to_dlpack(out),
        [0.1] * 6,
        "float32",
        "float32",
    )
    mt.weighted_sum(*args)  # warm (first touch of out)
    window = []
    started = threading.Event()

    def work():
        started.set()
        for _ in range(5):
            t0 = time.perf_counter()
            mt.weighted_sum(*args)
            window.append((t0, time.perf_counter()))

    ticks = []
    th = threading.Thread(target=work)
    th.start()
    started.wait()
    while th.is_alive():
        ticks.append(time.perf_counter())
    th.join()
    inside = sum(1 for t in ticks for lo, hi in window if lo < t < hi)
    assert inside > 0, "no Python code ran on another thread during the calls"


def test_backend_choice_for_ops_with_and_without_native_loops(monkeypatch):
    x = torch.zeros(3)
    monkeypatch.delenv("PYMERGE_BACKEND", raising=False)
    assert choose_kernels(None, x, native=True) == "native"
    assert choose_kernels(None, x) == "torch"  # an op without C++ loops
    assert choose_kernels("native", x) == "torch"
    assert choose_kernels("native", x, native=True) == "native"
    assert choose_kernels("torch", x, native=True) == "torch"
    assert choose_kernels("numpy", x, native=True) == "torch"  # numpy: every fallback
    monkeypatch.setenv("PYMERGE_BACKEND", "torch")
    assert choose_kernels(None, x, native=True) == "torch"
    meta = torch.zeros(3, device="meta")
    with pytest.raises(RuntimeError, match="CPU tensors only"):
        choose_kernels("native", meta, native=True)


def _permuted_call(a, b, rmap, cmap, runs, alphas, out_dtype, threads):
    """permuted_lerp on one list of 2-D tensors (rmap/cmap/runs: tensors or None each; runs
    replace the column map when given)."""
    np_or_none = lambda t: None if t is None else t.numpy()  # noqa: E731
    plans = [
        mt.GatherPlan(
            x.shape[0],
            x.shape[1],
            rowmap=np_or_none(r),
            colmap=np_or_none(c) if ru is None else None,
            runs=np_or_none(ru),
        )
        for x, r, c, ru in zip(a, rmap, cmap, runs, strict=True)
    ]
    numels = [x.numel() for x in a]
    out = torch.full((len(alphas), sum(numels)), float("nan"), dtype=out_dtype)
    mt.permuted_lerp(
        [to_dlpack(x) for x in a],
        [to_dlpack(x) for x in b],
        plans,
        to_dlpack(out),
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
    D = to_dlpack
    call = lambda **kw: mt.permuted_lerp(  # noqa: E731
        **{
            "a": [D(x)],
            "b": [D(x)],
            "plans": [None],
            "out": D(torch.zeros(2, 3)),
            "alphas": [0.5],
            "in_dtype": "float32",
            "out_dtype": "float32",
            **kw,
        }
    )
    with pytest.raises(ValueError, match="b has 2 entries for 1 tensors"):
        call(b=[D(x), D(x)])
    with pytest.raises(ValueError, match="alphas is empty"):
        call(alphas=[])
    with pytest.raises(ValueError, match="out has 6 elements, 2 alphas x 6 elements of a need 12"):
        call(alphas=[0.1, 0.2])
    with pytest.raises(TypeError, match=r"b\[0\] has dtype bfloat16, expected float32"):
        call(b=[D(x.bfloat16())])
    with pytest.raises(ValueError, match=r"b\[0\] is not contiguous"):
        call(b=[D(torch.zeros(3, 2).t())])
    with pytest.raises(ValueError, match=r"out overlaps a\[0\]"):
        call(out=D(x))
    with pytest.raises(ValueError, match=r"out overlaps b\[0\]"):
        call(a=[D(torch.zeros(2, 3))], out=D(x))
    with pytest.raises(TypeError, match="out_dtype must be"):
        call(out_dtype="int8")
    out = torch.full((2, 3), float("nan"))
    ones = torch.ones(2, 3)
    call(out=D(out), b=[D(ones)])
    assert torch.equal(out, torch.full((2, 3), 0.5))
