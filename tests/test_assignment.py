"""pymerge.linear_sum_assignment and friends, on both backends, against brute force and scipy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment as scipy_lsa

from pymerge import _backend
from pymerge.ops import _lap_fallback as fallback
from pymerge.ops.assignment import (
    AssignmentResult,
    linear_sum_assignment,
    linear_sum_assignment_batch,
    resolve_backend,
    solve_assignment,
)

NATIVE_READY = hasattr(_backend.native_lap(), "solve")
BACKENDS = [
    "numpy",
    pytest.param(
        "native",
        marks=pytest.mark.skipif(
            not NATIVE_READY, reason="pymerge._lap is not built or has no solve() yet"
        ),
    ),
]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


def _total(cost: np.ndarray, rows, cols) -> float:
    rows, cols = np.asarray(rows), np.asarray(cols)
    return float(np.asarray(cost, dtype=np.float64)[rows, cols].sum())


def _assert_valid(cost_shape, rows, cols) -> None:
    n, m = cost_shape
    rows, cols = np.asarray(rows), np.asarray(cols)
    k = min(n, m)
    assert rows.dtype == np.int64 and cols.dtype == np.int64
    assert rows.shape == (k,) and cols.shape == (k,)
    assert np.all(np.diff(rows) > 0), "row_ind must be strictly increasing like scipy's"
    assert np.unique(cols).size == k
    if k:
        assert rows.min() >= 0 and rows.max() < n and cols.min() >= 0 and cols.max() < m


def _brute(cost: np.ndarray, maximize: bool) -> float:
    """Best total over every injective map of the shorter side; inf when infeasible."""
    c = cost if cost.shape[0] <= cost.shape[1] else cost.T
    n, m = c.shape
    perms = np.array(list(itertools.permutations(range(m), n)), dtype=np.int64).reshape(-1, n)
    sums = c[np.arange(n), perms].sum(axis=1)
    return float(sums.max() if maximize else sums.min())


def _random_problem(rng: np.random.Generator, n: int, m: int, kind: str) -> np.ndarray:
    if kind == "uniform":
        return rng.random((n, m))
    if kind == "normal":
        return rng.normal(size=(n, m)) * 10.0
    if kind == "ties":
        return rng.integers(0, 4, (n, m)).astype(np.float64)
    if kind == "int100":
        return rng.integers(0, 100, (n, m)).astype(np.float64)
    if kind == "inf":
        c = rng.random((n, m))
        c[rng.random((n, m)) < 0.35] = np.inf
        return c
    raise AssertionError(kind)


# --------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("maximize", [False, True])
def test_brute_force_every_shape_up_to_7(backend, maximize):
    rng = np.random.default_rng(7 + maximize)
    for n in range(1, 8):
        for m in range(n, 8):
            for kind in ("uniform", "ties", "inf"):
                for tall in (False, True):
                    c = _random_problem(rng, n, m, kind)
                    if tall:
                        c = np.ascontiguousarray(c.T)
                    if maximize:
                        c = -c  # forbidden pairs are -inf when maximising
                    best = _brute(c, maximize)
                    if not np.isfinite(best):
                        with pytest.raises(ValueError, match="infeasible"):
                            linear_sum_assignment(c, maximize, backend=backend)
                        continue
                    rows, cols = linear_sum_assignment(c, maximize, backend=backend)
                    _assert_valid(c.shape, rows, cols)
                    assert _total(c, rows, cols) == pytest.approx(best, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("kind", ["uniform", "normal", "ties", "int100", "inf"])
def test_matches_scipy_on_many_small_problems(backend, kind):
    rng = np.random.default_rng(hash(kind) % 2**32)
    for t in range(400):
        n, m = int(rng.integers(1, 13)), int(rng.integers(1, 13))
        c = _random_problem(rng, n, m, kind)
        maximize = bool(t % 2)
        if maximize:
            c = -c
        try:
            ref = scipy_lsa(c, maximize=maximize)
        except ValueError:
            with pytest.raises(ValueError, match="infeasible"):
                linear_sum_assignment(c, maximize, backend=backend)
            continue
        rows, cols = linear_sum_assignment(c, maximize, backend=backend)
        _assert_valid(c.shape, rows, cols)
        assert _total(c, rows, cols) == pytest.approx(_total(c, *ref), rel=1e-12, abs=1e-12)
        if kind in ("uniform", "normal"):  # unique optimum: identical output, ordering included
            np.testing.assert_array_equal(rows, ref[0])
            np.testing.assert_array_equal(cols, ref[1])


@pytest.mark.parametrize("shape", [(37, 37), (64, 200), (200, 64), (129, 130), (150, 150)])
@pytest.mark.parametrize("kind", ["uniform", "int100", "inf"])
def test_matches_scipy_on_medium_problems(backend, shape, kind):
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    c = _random_problem(rng, *shape, kind)
    for maximize in (False, True):
        cc = -c if maximize else c
        ref = scipy_lsa(cc, maximize=maximize)
        rows, cols = linear_sum_assignment(cc, maximize, backend=backend)
        _assert_valid(cc.shape, rows, cols)
        assert _total(cc, rows, cols) == pytest.approx(_total(cc, *ref), rel=1e-12)


def test_weight_matching_costs(backend):
    rng = np.random.default_rng(3)
    wa, wb = rng.normal(size=(300, 128)), rng.normal(size=(300, 128))
    c = wa @ wb.T
    ref = scipy_lsa(c, maximize=True)
    res = solve_assignment(c, True, backend=backend)
    assert res.total == pytest.approx(_total(c, *ref), rel=1e-12)
    np.testing.assert_array_equal(res.col_ind, ref[1])
    # float32 input: exact optimum of the float32 values
    c32 = c.astype(np.float32)
    ref32 = scipy_lsa(c32.astype(np.float64), maximize=True)
    res32 = solve_assignment(c32, True, backend=backend)
    assert res32.total == pytest.approx(_total(c32, *ref32), rel=1e-7)


def test_constant_matrix_gives_identity_like_scipy(backend):
    for shape in [(1, 1), (5, 5), (3, 6), (6, 3), (40, 40)]:
        c = np.full(shape, 2.5)
        rows, cols = linear_sum_assignment(c, backend=backend)
        ref = scipy_lsa(c)
        np.testing.assert_array_equal(rows, ref[0])
        np.testing.assert_array_equal(cols, ref[1])
        k = min(shape)
        np.testing.assert_array_equal(rows, np.arange(k))
        np.testing.assert_array_equal(cols, np.arange(k))


@pytest.mark.parametrize("shape", [(0, 0), (0, 5), (5, 0)])
def test_empty_inputs(backend, shape):
    rows, cols = linear_sum_assignment(np.zeros(shape), backend=backend)
    ref = scipy_lsa(np.zeros(shape))
    assert rows.dtype == np.int64 and cols.dtype == np.int64
    assert rows.shape == ref[0].shape == (0,) and cols.shape == (0,)
    res = solve_assignment(torch.zeros(shape), backend=backend)
    assert isinstance(res.row_ind, torch.Tensor) and res.row_ind.shape == (0,)
    assert res.total == 0.0


def test_maximize_equals_minimize_negated(backend):
    rng = np.random.default_rng(11)
    for _ in range(50):
        c = rng.normal(size=(int(rng.integers(1, 20)), int(rng.integers(1, 20))))
        a = solve_assignment(c, True, backend=backend)
        b = solve_assignment(-c, False, backend=backend)
        assert a.total == pytest.approx(-b.total, rel=1e-12, abs=1e-12)


def test_forbidden_pairs_are_avoided(backend):
    c = np.array([[np.inf, 1.0, 5.0], [2.0, np.inf, 1.0], [1.0, 3.0, np.inf]])
    rows, cols = linear_sum_assignment(c, backend=backend)
    assert np.isfinite(c[rows, cols]).all()
    assert _total(c, rows, cols) == 3.0
    rows, cols = linear_sum_assignment(-c, True, backend=backend)
    assert _total(-c, rows, cols) == -3.0


# --------------------------------------------------------------------------- dtypes / inputs


@pytest.mark.parametrize(
    "dtype", [np.float64, np.float32, np.float16, np.int64, np.int32, np.uint8, np.bool_]
)
def test_numpy_dtypes(backend, dtype):
    rng = np.random.default_rng(5)
    c = (rng.random((9, 13)) * 50).astype(dtype)
    ref = scipy_lsa(c.astype(np.float64))
    rows, cols = linear_sum_assignment(c, backend=backend)
    _assert_valid(c.shape, rows, cols)
    assert _total(c, rows, cols) == pytest.approx(_total(c, *ref), rel=1e-6)


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool]
)
def test_torch_dtypes(backend, dtype):
    gen = torch.Generator().manual_seed(0)
    c = (torch.rand(11, 7, generator=gen, dtype=torch.float64) * 20).to(dtype)
    ref_cost = c.to(torch.float64).numpy()
    ref = scipy_lsa(ref_cost)
    rows, cols = linear_sum_assignment(c, backend=backend)
    assert isinstance(rows, torch.Tensor) and isinstance(cols, torch.Tensor)
    assert rows.dtype == torch.int64 and cols.dtype == torch.int64
    assert rows.device == c.device
    _assert_valid(c.shape, rows.numpy(), cols.numpy())
    assert _total(ref_cost, rows, cols) == pytest.approx(_total(ref_cost, *ref), rel=1e-6)


def test_lazily_negated_torch_cost_reads_its_values(backend):
    """A torch._neg_view cost (memory holds -c) is solved as c, not rejected or negated."""
    gen = torch.Generator().manual_seed(3)
    c = torch.rand(8, 10, generator=gen, dtype=torch.float64)
    lazy = torch._neg_view(-c)
    assert lazy.is_neg()
    rows, cols = linear_sum_assignment(lazy, backend=backend)
    ref = scipy_lsa(c.numpy())
    assert np.array_equal(rows.numpy(), ref[0]) and np.array_equal(cols.numpy(), ref[1])


def test_float32_is_passed_as_float32_and_float64_never_downcast(backend, monkeypatch):
    seen: list[np.dtype] = []
    if backend == "native":
        lap = _backend.native_lap()

        class Spy:
            def solve(self, c, *args):
                seen.append(c.dtype)
                return lap.solve(c, *args)

        monkeypatch.setattr(_backend, "native_lap", lambda: Spy())
    else:
        real = fallback.solve

        def spy(c, *args):
            seen.append(np.asarray(c).dtype)
            return real(c, *args)

        monkeypatch.setattr(fallback, "solve", spy)
    rng = np.random.default_rng(0)
    linear_sum_assignment(rng.random((4, 4)).astype(np.float32), backend=backend)
    linear_sum_assignment(rng.random((4, 4)), backend=backend)
    linear_sum_assignment(torch.rand(4, 4, dtype=torch.bfloat16), backend=backend)
    linear_sum_assignment(rng.integers(0, 9, (4, 4)), backend=backend)
    assert seen == [np.float32, np.float64, np.float32, np.float64]


def test_non_contiguous_and_transposed_inputs(backend):
    rng = np.random.default_rng(2)
    base = rng.random((40, 60))
    views = [base[::2, ::3], base.T, base[5:25, 10:50].T, np.asfortranarray(base)]
    for v in views:
        ref = scipy_lsa(np.ascontiguousarray(v))
        rows, cols = linear_sum_assignment(v, backend=backend)
        np.testing.assert_array_equal(rows, ref[0])
        np.testing.assert_array_equal(cols, ref[1])
    t = torch.from_numpy(base)
    for v in [t.T, t[::3, 1::2], t[:, :30].T]:
        ref = scipy_lsa(v.contiguous().numpy())
        rows, cols = linear_sum_assignment(v, backend=backend)
        np.testing.assert_array_equal(rows.numpy(), ref[0])
        np.testing.assert_array_equal(cols.numpy(), ref[1])


def test_read_only_broadcast_and_big_endian_inputs(backend):
    rng = np.random.default_rng(17)
    c = rng.random((7, 9))
    ref = scipy_lsa(c)
    ro = c.copy()
    ro.setflags(write=False)
    for v in [ro, c.astype(">f8")]:
        rows, cols = linear_sum_assignment(v, backend=backend)
        np.testing.assert_array_equal(cols, ref[1])
    rows, cols = linear_sum_assignment(c.astype(">f4"), backend=backend)
    ref32 = scipy_lsa(c.astype(np.float32))
    np.testing.assert_array_equal(cols, ref32[1])
    stack = np.broadcast_to(c, (3, 7, 9))  # zero stride, read-only
    rows, cols = linear_sum_assignment_batch(stack, backend=backend)
    for b in range(3):
        np.testing.assert_array_equal(cols[b], ref[1])


def test_array_like_inputs(backend):
    rows, cols = linear_sum_assignment([[4, 1, 3], [2, 0, 5], [3, 2, 2]], backend=backend)
    np.testing.assert_array_equal(rows, [0, 1, 2])
    np.testing.assert_array_equal(cols, [1, 0, 2])
    rows, cols = linear_sum_assignment(((1.0, 2.0), (3.0, 0.0)), backend=backend)
    np.testing.assert_array_equal(cols, [0, 1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensor_in_cuda_tensor_out(backend):
    c = torch.rand(20, 30, device="cuda")
    rows, cols = linear_sum_assignment(c, backend=backend)
    assert rows.device == c.device and cols.device == c.device
    ref = scipy_lsa(c.cpu().numpy())
    np.testing.assert_array_equal(cols.cpu().numpy(), ref[1])


def test_inputs_not_mutated(backend):
    rng = np.random.default_rng(9)
    for c in [rng.random((8, 8)), rng.random((5, 9)), rng.random((9, 5)).astype(np.float32)]:
        before = c.copy()
        solve_assignment(c, True, backend=backend)
        solve_assignment(c, False, backend=backend)
        np.testing.assert_array_equal(c, before)
    t = torch.rand(7, 4)
    tb = t.clone()
    linear_sum_assignment(t, True, backend=backend)
    assert torch.equal(t, tb)
    stack = rng.random((4, 6, 3))
    sb = stack.copy()
    linear_sum_assignment_batch(stack, True, backend=backend)
    np.testing.assert_array_equal(stack, sb)
    res = solve_assignment(rng.random((6, 6)), backend=backend)
    duals = res.col_duals.copy()
    nxt = rng.random((6, 6))
    nb = nxt.copy()
    solve_assignment(nxt, init=res, backend=backend)
    np.testing.assert_array_equal(res.col_duals, duals)
    np.testing.assert_array_equal(nxt, nb)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("maximize", [False, True])
def test_nan_rejected(backend, maximize):
    c = np.ones((3, 4))
    c[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"invalid numeric entries: NaN at index \(1, 2\)"):
        linear_sum_assignment(c, maximize, backend=backend)
    with pytest.raises(ValueError, match="NaN"):
        linear_sum_assignment(np.ascontiguousarray(c.T), maximize, backend=backend)


def test_wrong_infinity_rejected(backend):
    c = np.ones((3, 3))
    c[0, 1] = -np.inf
    with pytest.raises(ValueError, match=r"-inf at index \(0, 1\).*minimising"):
        linear_sum_assignment(c, backend=backend)
    c[0, 1] = np.inf
    with pytest.raises(ValueError, match=r"\+inf at index \(0, 1\).*maximising"):
        linear_sum_assignment(c, True, backend=backend)
    # and the allowed infinity of each sense is fine
    linear_sum_assignment(c, False, backend=backend)
    linear_sum_assignment(-c, True, backend=backend)


def test_infeasible_rejected(backend):
    cases = [
        np.full((2, 2), np.inf),
        np.array([[1.0, np.inf], [1.0, np.inf]]),
        np.array([[1.0, np.inf, np.inf], [2.0, np.inf, np.inf]]),
        np.array([[1.0, 2.0], [np.inf, np.inf], [np.inf, np.inf]]).T,
    ]
    for c in cases:
        with pytest.raises(ValueError, match="cost matrix is infeasible"):
            linear_sum_assignment(c, backend=backend)
        with pytest.raises(ValueError, match="cost matrix is infeasible"):
            linear_sum_assignment(-c, True, backend=backend)


@pytest.mark.parametrize("shape", [(3,), (), (2, 2, 2)])
def test_single_api_needs_2d(backend, shape):
    with pytest.raises(ValueError, match=r"2-D"):
        linear_sum_assignment(np.ones(shape), backend=backend)


@pytest.mark.parametrize("shape", [(3, 3), (3,), (1, 2, 2, 2)])
def test_batch_api_needs_3d(backend, shape):
    with pytest.raises(ValueError, match=r"3-D"):
        linear_sum_assignment_batch(np.ones(shape), backend=backend)


@pytest.mark.parametrize(
    "bad",
    [
        np.array([["a", "b"], ["c", "d"]]),
        np.array([[1, 2], [3, 4]], dtype=object),
        np.array([[1 + 1j, 2], [3, 4]]),
        np.array([[np.datetime64("2020-01-01")]]),
        torch.ones(2, 2, dtype=torch.complex64),
    ],
    ids=["str", "object", "complex", "datetime", "torch-complex"],
)
def test_non_numeric_dtypes_rejected(backend, bad):
    with pytest.raises(TypeError, match="dtype"):
        linear_sum_assignment(bad, backend=backend)
    if isinstance(bad, np.ndarray):
        with pytest.raises(TypeError, match="dtype"):
            linear_sum_assignment_batch(bad[None], backend=backend)


def test_ragged_input_rejected(backend):
    with pytest.raises(ValueError, match="could not be converted"):
        linear_sum_assignment([[1.0, 2.0], [3.0]], backend=backend)


def test_bad_backend_argument():
    with pytest.raises(ValueError, match="backend"):
        linear_sum_assignment(np.ones((2, 2)), backend="cuda-magic")


@pytest.mark.parametrize("name", ["numpy", "torch", " NumPy "])
def test_env_forces_fallback(monkeypatch, name):
    """The fallback is named "numpy"; "torch" (its former name) stays an accepted alias."""
    monkeypatch.setenv("PYMERGE_BACKEND", name)
    assert resolve_backend() == "numpy"
    assert solve_assignment(np.ones((2, 2))).backend == "numpy"
    monkeypatch.delenv("PYMERGE_BACKEND")
    assert solve_assignment(np.ones((2, 2)), backend=name).backend == "numpy"
    rows, cols = linear_sum_assignment_batch(np.ones((2, 2, 2)), backend=name)
    assert rows.shape == (2, 2)


def test_backends_report_names_the_numpy_fallback(monkeypatch):
    import pymerge

    for name in ("numpy", "torch"):
        monkeypatch.setenv("PYMERGE_BACKEND", name)
        info = pymerge.backends()
        assert info["assignment"] == "numpy"
        assert info["kernels"] == info["kernels_cpu"] == "torch"  # the ops' fallback: torch
        assert info["forced"] == name
    monkeypatch.delenv("PYMERGE_BACKEND")
    assert pymerge.backends()["assignment"] == ("native" if NATIVE_READY else "numpy")


def test_backend_choice_without_native_solver(monkeypatch):
    class Placeholder:  # what the skeleton build provides: a module without solve()
        __version__ = "0"

    monkeypatch.setattr(_backend, "native_lap", lambda: Placeholder())
    monkeypatch.delenv("PYMERGE_BACKEND", raising=False)
    assert resolve_backend() == "numpy"
    assert solve_assignment(np.ones((2, 2))).backend == "numpy"
    with pytest.raises(RuntimeError, match="native"):
        resolve_backend("native")


def test_auto_picks_native_when_built(monkeypatch):
    monkeypatch.delenv("PYMERGE_BACKEND", raising=False)
    assert resolve_backend() == ("native" if NATIVE_READY else "numpy")


def test_batch_errors_name_the_problem(backend):
    stack = np.ones((4, 3, 3))
    stack[2, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"NaN.*problem 2 of the batch"):
        linear_sum_assignment_batch(stack, backend=backend)
    stack = np.ones((4, 3, 3))
    stack[3, :, 1:] = np.inf
    with pytest.raises(ValueError, match=r"infeasible.*problem 3 of the batch"):
        linear_sum_assignment_batch(stack, backend=backend)
    with pytest.raises(ValueError, match="threads"):
        linear_sum_assignment_batch(np.ones((1, 2, 2)), backend=backend, threads=-1)


@pytest.mark.parametrize("bad", [-1, 1025, 2**40, 2**70, np.int64(2**40)])
def test_batch_threads_out_of_range_is_one_clear_line(backend, bad):
    """threads=2**40 used to reach pybind's overload error, which prints the signature and
    the whole cost array; now the value and the valid range, from both backends."""
    stack = np.random.default_rng(0).random((3, 64, 64))
    with pytest.raises(ValueError) as info:
        linear_sum_assignment_batch(stack, backend=backend, threads=bad)
    msg = str(info.value)
    assert msg == f"threads={int(bad)} is out of range [0, 1024] (0 or None: all cores)"
    for bad_type in (True, 1.5, "2"):
        with pytest.raises(TypeError, match=r"threads must be an int in \[0, 1024\] or None"):
            linear_sum_assignment_batch(stack, backend=backend, threads=bad_type)
    for ok in (None, 0, 1, 1024, np.int32(2)):
        rows, cols = linear_sum_assignment_batch(stack, backend=backend, threads=ok)
        assert cols.shape == (3, 64)


# --------------------------------------------------------------------------- warm start


def _perturbed_sequence(rng, n, steps, scale=0.05):
    wa, wb = rng.normal(size=(n, 64)), rng.normal(size=(n, 64))
    c = wa @ wb.T
    out = [c]
    for _ in range(steps):
        c = c + scale * rng.normal(size=c.shape) * np.abs(c).mean()
        out.append(c)
    return out


@pytest.mark.parametrize("shape", [(60, 60), (30, 45), (45, 30)])
def test_warm_start_gives_the_same_optimum(backend, shape):
    rng = np.random.default_rng(shape[0] + shape[1])
    prev = None
    c = rng.normal(size=shape)
    for t in range(8):
        if t:
            c = c + 0.1 * rng.normal(size=shape)
        res = solve_assignment(c, True, init=prev, backend=backend)
        ref = scipy_lsa(c, maximize=True)
        assert res.total == pytest.approx(_total(c, *ref), rel=1e-12)
        np.testing.assert_array_equal(res.col_ind, ref[1])
        np.testing.assert_array_equal(res.row_ind, ref[0])
        prev = res


def test_warm_start_weight_matching_sequence(backend):
    rng = np.random.default_rng(4)
    prev = None
    for c in _perturbed_sequence(rng, 100, 6):
        res = solve_assignment(c, True, init=prev, backend=backend)
        ref = scipy_lsa(c, maximize=True)
        assert res.total == pytest.approx(_total(c, *ref), rel=1e-12)
        # plain assignment hints give the same optimum too
        rows, cols = linear_sum_assignment(c, True, init=ref[1], backend=backend)
        assert _total(c, rows, cols) == pytest.approx(res.total, rel=1e-12)
        rows, cols = linear_sum_assignment(c, True, init=(ref[0], ref[1]), backend=backend)
        assert _total(c, rows, cols) == pytest.approx(res.total, rel=1e-12)
        prev = res


def test_warm_start_with_a_stale_or_adversarial_hint(backend):
    rng = np.random.default_rng(8)
    for n, m in [(20, 20), (10, 25), (25, 10)]:
        c = rng.random((n, m))
        ref = scipy_lsa(c)
        k = min(n, m)
        worst = scipy_lsa(c, maximize=True)  # the worst assignment as a hint
        for hint in [worst, (np.arange(k), rng.permutation(max(n, m))[:k])]:
            rows_h, cols_h = hint
            if n > m:  # rows for a tall matrix: keep the pair sorted by row
                rows_h, cols_h = np.sort(rng.permutation(n)[:k]), rng.permutation(m)
            rows, cols = linear_sum_assignment(c, init=(rows_h, cols_h), backend=backend)
            np.testing.assert_array_equal(cols, ref[1])
            np.testing.assert_array_equal(rows, ref[0])
        # duals of an unrelated problem of the same shape
        other = solve_assignment(rng.normal(size=(n, m)) * 100, backend=backend)
        res = solve_assignment(c, init=other, backend=backend)
        np.testing.assert_array_equal(res.col_ind, ref[1])


def test_warm_start_torch_result(backend):
    c = torch.rand(12, 12, dtype=torch.float32)
    res = solve_assignment(c, backend=backend)
    c2 = c + 0.01 * torch.rand(12, 12)
    res2 = solve_assignment(c2, init=res, backend=backend)
    ref = scipy_lsa(c2.double().numpy())
    assert res2.total == pytest.approx(_total(c2.double().numpy(), *ref), rel=1e-6)
    assert isinstance(res2.col_ind, torch.Tensor)


@pytest.mark.skipif(not NATIVE_READY, reason="needs both backends: pymerge._lap has no solve()")
def test_warm_start_crosses_backends():
    rng = np.random.default_rng(19)
    for shape in [(40, 40), (20, 31), (31, 20)]:
        c = rng.normal(size=shape)
        nxt = c + 0.05 * rng.normal(size=shape)
        ref = scipy_lsa(nxt, maximize=True)
        for first, second in [("native", "numpy"), ("numpy", "native"), ("torch", "native")]:
            prev = solve_assignment(c, True, backend=first)
            res = solve_assignment(nxt, True, init=prev, backend=second)
            np.testing.assert_array_equal(res.col_ind, ref[1])
            np.testing.assert_array_equal(res.row_ind, ref[0])


def test_malformed_warm_starts(backend):
    rng = np.random.default_rng(0)
    c = rng.random((5, 5))
    res = solve_assignment(c, backend=backend)
    cases = [
        (np.array([0, 1, 2, 3]), "length 5"),
        (np.array([0, 1, 2, 3, 5]), r"col_ind entries must lie in \[0, 5\)"),
        (np.array([0, 1, 2, 3, -1]), r"col_ind entries must lie in \[0, 5\)"),
        (np.array([0, 1, 2, 3, 3]), "more than one row"),
        (np.array([0.0, 1, 2, 3, 4]), "integers"),
        (np.zeros((5, 1), dtype=np.int64), "1-D"),
        ((np.array([0, 1, 2, 3, 3]), np.arange(5)), "repeats a row"),
        ((np.arange(5), np.arange(4)), "length 5"),
        (solve_assignment(rng.random((5, 6)), backend=backend), r"shape \(5, 6\)"),
        (solve_assignment(c, True, backend=backend), "maximize=True"),
        (
            AssignmentResult(
                res.row_ind,
                res.col_ind,
                0.0,
                (5, 5),
                False,
                "numpy",
                np.array([0.0, np.nan, 0, 0, 0]),
            ),
            "col_duals must be finite",
        ),
        (
            AssignmentResult(res.row_ind, res.col_ind, 0.0, (5, 5), False, "numpy", np.zeros(4)),
            r"col_duals must have shape \(5,\)",
        ),
        ("abc", "col_ind must be 1-D"),
    ]
    for init, msg in cases:
        with pytest.raises(ValueError, match=msg):
            solve_assignment(c, init=init, backend=backend)
    with pytest.raises(ValueError, match="ambiguous for a tall"):
        linear_sum_assignment(rng.random((6, 3)), init=np.arange(3), backend=backend)


# --------------------------------------------------------------------------- batch


@pytest.mark.parametrize("shape", [(30, 8, 8), (10, 5, 9), (10, 9, 5), (0, 4, 4), (3, 0, 4)])
def test_batch_equals_loop(backend, shape):
    rng = np.random.default_rng(sum(shape))
    stack = rng.random(shape)
    for maximize in (False, True):
        rows, cols = linear_sum_assignment_batch(stack, maximize, backend=backend)
        k = min(shape[1:])
        assert rows.shape == cols.shape == (shape[0], k)
        assert rows.dtype == np.int64 and cols.dtype == np.int64
        for b in range(shape[0]):
            r, c = scipy_lsa(stack[b], maximize=maximize)
            np.testing.assert_array_equal(rows[b], r)
            np.testing.assert_array_equal(cols[b], c)


def test_batch_torch_float32_and_threads(backend):
    gen = torch.Generator().manual_seed(1)
    stack = torch.rand(50, 16, 16, generator=gen)
    rows, cols = linear_sum_assignment_batch(
        stack.transpose(1, 2), True, backend=backend, threads=1
    )
    assert isinstance(rows, torch.Tensor) and rows.dtype == torch.int64
    for b in range(50):
        c = stack[b].T.double().numpy()
        ref = scipy_lsa(c, maximize=True)
        assert _total(c, rows[b], cols[b]) == pytest.approx(_total(c, *ref), rel=1e-6)


def test_batch_integer_ties_and_inf(backend):
    rng = np.random.default_rng(12)
    stack = rng.integers(0, 5, (40, 7, 7)).astype(np.float64)
    stack[:, np.arange(7), np.arange(7)] = np.inf  # forbid the diagonal: still feasible
    rows, cols = linear_sum_assignment_batch(stack, backend=backend)
    for b in range(40):
        ref = scipy_lsa(stack[b])
        assert _total(stack[b], rows[b], cols[b]) == _total(stack[b], *ref)


def test_batch_with_warm_starts(backend):
    rng = np.random.default_rng(13)
    stack = rng.random((5, 6, 6))
    prev = [solve_assignment(s, backend=backend) for s in stack]
    nxt = stack + 0.05 * rng.random(stack.shape)
    rows, cols = linear_sum_assignment_batch(nxt, init=prev, backend=backend)
    for b in range(5):
        ref = scipy_lsa(nxt[b])
        np.testing.assert_array_equal(cols[b], ref[1])
    with pytest.raises(ValueError, match="expected 5 warm starts"):
        linear_sum_assignment_batch(nxt, init=prev[:3], backend=backend)


# --------------------------------------------------------------------------- fallback contract


def test_fallback_duals_certify_optimality():
    """u, v from the fallback are a feasible dual with tight assigned pairs (LP certificate)."""
    rng = np.random.default_rng(21)
    for n, m in [(6, 6), (5, 9), (30, 30), (20, 33)]:
        c = rng.normal(size=(n, m))
        c[rng.random((n, m)) < 0.2] = np.inf
        try:
            col4row, u, v = fallback.solve(c)
        except ValueError:
            continue
        reduced = c - u[:, None] - v[None, :]
        assert (reduced[np.isfinite(reduced)] >= -1e-9).all()
        np.testing.assert_allclose(reduced[np.arange(n), col4row], 0.0, atol=1e-9)
        assert (v <= 1e-12).all()
        free = np.setdiff1d(np.arange(m), col4row)
        np.testing.assert_allclose(v[free], 0.0)


@pytest.mark.parametrize("chunk", [1 << 22, 150])
def test_fallback_lockstep_batch_equals_single_solves(monkeypatch, chunk):
    monkeypatch.setattr(fallback, "_BATCH_CHUNK", chunk)
    rng = np.random.default_rng(23)
    for shape in [(40, 6, 6), (30, 4, 9), (25, 12, 12), (10, 1, 5)]:
        for kind in ("uniform", "ties", "inf"):
            stack = np.stack([_random_problem(rng, *shape[1:], kind) for _ in range(shape[0])])
            for maximize in (False, True):
                st = -stack if maximize else stack
                singles = []
                for b in range(shape[0]):
                    try:
                        singles.append(fallback.solve(st[b], maximize)[0])
                    except ValueError:
                        singles.append(None)
                bad = [b for b, s in enumerate(singles) if s is None]
                if bad:
                    with pytest.raises(ValueError, match=rf"infeasible.*problem {bad[0]} of"):
                        fallback.solve_batch(st, maximize)
                    continue
                np.testing.assert_array_equal(fallback.solve_batch(st, maximize), singles)


def test_fallback_contract_errors():
    with pytest.raises(ValueError, match="n_rows <= n_cols"):
        fallback.solve(np.ones((3, 2)))
    with pytest.raises(ValueError, match="init_col4row"):
        fallback.solve(np.ones((2, 2)), init_col4row=np.array([0, 0]))
    with pytest.raises(ValueError, match="init_v"):
        fallback.solve(np.ones((2, 2)), init_v=np.array([0.0, np.inf]))
    with pytest.raises(ValueError, match="problem 1 of the batch"):
        fallback.solve_batch(np.stack([np.ones((2, 2)), np.full((2, 2), np.inf)]))


# --------------------------------------------------------------------------- native contract


class _FakeLap:
    """Stands in for pymerge._lap: checks what the front passes, words errors differently."""

    def __init__(self):
        self.calls: list[tuple] = []

    def _check(self, c, ndim):
        assert isinstance(c, np.ndarray) and c.ndim == ndim
        assert c.flags.c_contiguous and c.dtype in (np.float32, np.float64)
        assert c.shape[-2] <= c.shape[-1]

    def solve(self, cost, maximize=False, init_col4row=None, init_v=None):
        self._check(cost, 2)
        self.calls.append(("solve", cost.dtype, init_col4row is not None, init_v is not None))
        if init_col4row is not None:
            assert init_col4row.dtype == np.int64 and init_col4row.shape == (cost.shape[0],)
        if init_v is not None:
            assert init_v.dtype == np.float64 and init_v.shape == (cost.shape[1],)
        try:
            return fallback.solve(cost, maximize, init_col4row, init_v)
        except ValueError as exc:
            if "infeasible" in str(exc):
                raise ValueError("cost matrix is infeasible") from None
            raise ValueError("native: bad entry") from None

    def solve_batch(self, costs, maximize=False, threads=0):
        self._check(costs, 3)
        self.calls.append(("solve_batch", costs.dtype, threads))
        try:
            return fallback.solve_batch(costs, maximize)
        except ValueError as exc:
            if "infeasible" in str(exc):
                raise ValueError("cost matrix is infeasible") from None
            raise ValueError("native: bad entry") from None


@pytest.fixture
def fake_native(monkeypatch):
    fake = _FakeLap()
    monkeypatch.setattr(_backend, "native_lap", lambda: fake)
    monkeypatch.delenv("PYMERGE_BACKEND", raising=False)
    return fake


def test_native_path_inputs_and_outputs(fake_native):
    rng = np.random.default_rng(30)
    c = rng.random((9, 5)).astype(np.float32)  # tall: transposed, made C-contiguous
    res = solve_assignment(c)
    assert res.backend == "native"
    ref = scipy_lsa(c)
    np.testing.assert_array_equal(res.row_ind, ref[0])
    np.testing.assert_array_equal(res.col_ind, ref[1])
    solve_assignment(c + 0.01, init=res)
    linear_sum_assignment(c[:5].T, init=np.arange(5))  # plain hint, no duals
    assert fake_native.calls == [
        ("solve", np.float32, False, False),
        ("solve", np.float32, True, True),
        ("solve", np.float32, True, False),
    ]
    stack = rng.random((6, 7, 4))
    rows, cols = linear_sum_assignment_batch(stack, True, threads=2)
    assert fake_native.calls[-1] == ("solve_batch", np.float64, 2)
    for b in range(6):
        ref = scipy_lsa(stack[b], maximize=True)
        np.testing.assert_array_equal(rows[b], ref[0])
        np.testing.assert_array_equal(cols[b], ref[1])


def test_native_errors_are_reworded_like_the_fallback(fake_native):
    c = np.ones((3, 3))
    c[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"invalid numeric entries: NaN at index \(2, 1\)"):
        linear_sum_assignment(c)
    c[2, 1] = -np.inf
    with pytest.raises(ValueError, match=r"-inf at index \(2, 1\)"):
        linear_sum_assignment(c)
    with pytest.raises(ValueError, match=fallback.INFEASIBLE):
        linear_sum_assignment(np.full((2, 3), np.inf))
    stack = np.ones((3, 2, 2))
    stack[1, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"NaN at index \(0, 0\) \(problem 1 of the batch\)"):
        linear_sum_assignment_batch(stack)
    stack = np.ones((3, 2, 2))
    stack[2] = np.inf
    with pytest.raises(ValueError, match=r"infeasible.*\(problem 2 of the batch\)"):
        linear_sum_assignment_batch(stack)
