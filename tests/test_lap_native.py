"""Direct tests of the C++ solver ``pymerge._lap`` (solve / solve_batch / SIMD paths).

The public front (``pymerge.linear_sum_assignment``) is tested elsewhere; here the binding
contract is checked: optimal totals against brute force and scipy, the dual certificate,
warm starts, errors, the batch API, thread counts and every SIMD kernel set.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

# subprocesses run from here so `python -c` imports the installed pymerge, not the
# source tree of the checkout (which has no compiled _lap and no pymerge.kernels)
_HERE = os.path.dirname(os.path.abspath(__file__))

lap = pytest.importorskip("pymerge._lap", reason="native extension not built")
scipy_opt = pytest.importorskip("scipy.optimize")

SIMD = lap._simd_available()


@pytest.fixture(autouse=True)
def _restore_simd():
    before = lap.__simd__
    yield
    lap._set_simd(before)


def _total(cost: np.ndarray, col4row: np.ndarray) -> float:
    c = np.asarray(cost, dtype=np.float64)
    return float(c[np.arange(c.shape[0]), col4row].sum()) if c.shape[0] else 0.0


def _check_solution(cost, maximize, col4row, u, v, ref_total=None):
    n, m = cost.shape
    assert col4row.dtype == np.int64 and col4row.shape == (n,)
    assert u.dtype == np.float64 and u.shape == (n,)
    assert v.dtype == np.float64 and v.shape == (m,)
    assert len(set(col4row.tolist())) == n
    assert ((col4row >= 0) & (col4row < m)).all()
    c = np.asarray(cost, dtype=np.float64)
    cp = -c if maximize else c
    assert np.isfinite(cp[np.arange(n), col4row]).all()
    # dual certificate: u_i + v_j <= c'_ij, equality on the assignment
    scale = 1e-9 * (1 + np.abs(cp[np.isfinite(cp)]).max(initial=0)) * max(n, 1)
    slack = cp - u[:, None] - v[None, :]
    assert (slack[np.isfinite(slack)] >= -scale).all()
    assert np.allclose(slack[np.arange(n), col4row], 0, atol=scale)
    if n < m:  # rectangular: unassigned columns keep the largest dual
        free = np.setdiff1d(np.arange(m), col4row)
        assert (v <= v[free].min() + scale).all()
    if ref_total is not None:
        assert _total(c, col4row) == pytest.approx(ref_total, rel=1e-9, abs=1e-6)


def _scipy_total(cost, maximize):
    r, c = scipy_opt.linear_sum_assignment(np.asarray(cost, dtype=np.float64), maximize=maximize)
    return _total(np.asarray(cost, dtype=np.float64)[r], c) if len(r) else 0.0


def _random_problem(rng, kind, n, m, dtype):
    if kind == "uniform":
        c = rng.random((n, m))
    elif kind == "ties":
        c = rng.integers(0, 4, (n, m)).astype(float)
    elif kind == "int100":
        c = rng.integers(0, 100, (n, m)).astype(float)
    elif kind == "wide_range":
        c = rng.standard_normal((n, m)) * 10.0 ** rng.integers(-3, 6)
    elif kind == "inf":
        c = rng.random((n, m))
        c[rng.random((n, m)) < 0.4] = np.inf
    elif kind == "lowrank":
        k = max(1, min(n, m) // 3)
        c = rng.standard_normal((n, k)) @ rng.standard_normal((k, m))
    else:
        raise AssertionError(kind)
    return c.astype(dtype)


def _as_max(cost):
    """The same forbidden pattern for maximize: +inf (forbidden when minimising) -> -inf."""
    return np.where(np.isposinf(cost), -np.inf, cost).astype(cost.dtype)


# ---------------------------------------------------------------------------- brute force


@pytest.mark.parametrize("simd", SIMD)
def test_brute_force_small(simd):
    lap._set_simd(simd)
    rng = np.random.default_rng(0)
    for n in range(1, 8):
        for m in sorted({n, n + 1, n + 3}):
            if m > 7 and n > 4:
                continue
            for kind in ("uniform", "ties", "inf"):
                for maximize in (False, True):
                    c = _random_problem(rng, kind, n, m, np.float64)
                    if maximize:
                        c = _as_max(c)
                    sign = -1.0 if maximize else 1.0
                    best = np.inf
                    for cols in itertools.permutations(range(m), n):
                        best = min(best, sign * c[np.arange(n), list(cols)].sum())
                    if not np.isfinite(best):
                        with pytest.raises(ValueError, match="infeasible"):
                            lap.solve(c, maximize)
                        continue
                    col, u, v = lap.solve(c, maximize)
                    _check_solution(c, maximize, col, u, v, sign * best)


# ---------------------------------------------------------------------------- vs scipy


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", ["uniform", "ties", "int100", "wide_range", "inf", "lowrank"])
def test_against_scipy(kind, dtype):
    rng = np.random.default_rng(zlib.crc32(f"{kind}-{np.dtype(dtype).name}".encode()))
    for t in range(60):
        n = int(rng.integers(1, 70))
        m = n if t % 2 == 0 else int(rng.integers(n, n + 40))
        maximize = t % 3 == 0
        c = _random_problem(rng, kind, n, m, dtype)
        if maximize:
            c = _as_max(c)
        try:
            ref = _scipy_total(c, maximize)
        except ValueError:
            with pytest.raises(ValueError, match="infeasible"):
                lap.solve(c, maximize)
            continue
        col, u, v = lap.solve(c, maximize)
        _check_solution(c, maximize, col, u, v, ref)


@pytest.mark.parametrize("n", [100, 257, 300])
def test_against_scipy_larger(n):
    rng = np.random.default_rng(n)
    for kind, dtype, maximize in [
        ("lowrank", np.float64, True),
        ("int100", np.float32, False),
        ("uniform", np.float32, True),
    ]:
        c = _random_problem(rng, kind, n, n + (n % 7), dtype)
        col, u, v = lap.solve(c, maximize)
        _check_solution(c, maximize, col, u, v, _scipy_total(c, maximize))


def test_float32_is_exact_in_float32_values():
    """float32 input is solved on its own values (not a rounded float64 copy, nor vice versa)."""
    rng = np.random.default_rng(5)
    c64 = rng.random((80, 80)) * 1e3
    c32 = c64.astype(np.float32)
    col, _, _ = lap.solve(c32)
    assert _total(c32, col) == pytest.approx(_scipy_total(c32, False), rel=1e-12)
    col, _, _ = lap.solve(c64)
    assert _total(c64, col) == pytest.approx(_scipy_total(c64, False), rel=1e-12)


def test_constant_matrix_gives_identity():
    for shape in [(1, 1), (5, 5), (64, 64), (3, 8)]:
        for dtype in (np.float32, np.float64):
            for maximize in (False, True):
                col, _, _ = lap.solve(np.full(shape, 2.5, dtype), maximize)
                np.testing.assert_array_equal(col, np.arange(shape[0]))


def test_empty():
    for m in (0, 3):
        col, u, v = lap.solve(np.zeros((0, m)))
        assert col.shape == (0,) and col.dtype == np.int64
        assert u.shape == (0,) and v.shape == (m,)
    out = lap.solve_batch(np.zeros((0, 3, 4)))
    assert out.shape == (0, 3) and out.dtype == np.int64
    out = lap.solve_batch(np.zeros((2, 0, 4)))
    assert out.shape == (2, 0)


# ---------------------------------------------------------------------------- SIMD paths


def test_simd_paths_identical():
    rng = np.random.default_rng(11)
    problems = []
    for t in range(40):
        n = int(rng.integers(1, 90))
        m = n if t % 2 else n + int(rng.integers(0, 19))
        kind = ["uniform", "ties", "inf", "lowrank"][t % 4]
        dtype = np.float32 if t % 3 == 0 else np.float64
        problems.append((_random_problem(rng, kind, n, m, dtype), t % 5 == 0))
    results = {}
    for simd in SIMD:
        lap._set_simd(simd)
        assert lap.__simd__ == simd
        out = []
        for c, maximize in problems:
            c = _as_max(c) if maximize else c
            try:
                out.append(lap.solve(c, maximize))
            except ValueError as exc:
                out.append(str(exc))
        results[simd] = out
    base = results[SIMD[0]]
    for simd in SIMD[1:]:
        for a, b in zip(base, results[simd], strict=True):
            if isinstance(a, str):
                assert a == b
            else:
                for x, y in zip(a, b, strict=True):
                    np.testing.assert_array_equal(x, y)  # bit-identical duals too


def _simd_picked_with_env(value: str) -> str:
    """``pymerge._lap.__simd__`` in a fresh interpreter with ``PYMERGE_LAP_SIMD=value``."""
    out = subprocess.run(
        [sys.executable, "-c", "import pymerge._lap as l; print(l.__simd__)"],
        env={**os.environ, "PYMERGE_LAP_SIMD": value},
        capture_output=True,
        text=True,
        check=True,
        cwd=_HERE,
    )
    return out.stdout.strip()


def test_simd_env_override():
    for want in SIMD:
        assert _simd_picked_with_env(want) == want
    assert _simd_picked_with_env("bogus") == SIMD[-1]  # unknown value: the best supported path


def test_set_simd_rejects_unknown():
    with pytest.raises(ValueError, match="unknown SIMD"):
        lap._set_simd("neon9000")
    assert lap.__simd__ in ("scalar", "avx2", "avx512")


# ---------------------------------------------------------------------------- warm start


def _wm_like(rng, n, k=32):
    return rng.standard_normal((n, k)) @ rng.standard_normal((k, n))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_warm_start_same_optimum_on_perturbed_sequence(dtype):
    rng = np.random.default_rng(3)
    n = 120
    base = _wm_like(rng, n)
    col, u, v = lap.solve(base.astype(dtype), True)
    for step in range(6):
        c = (base + 0.05 * (step + 1) * rng.standard_normal((n, n))).astype(dtype)
        cold = lap.solve(c, True)
        warm = lap.solve(c, True, init_col4row=col, init_v=v)
        _check_solution(c, True, *warm, ref_total=_total(c, cold[0]))
        col, u, v = warm


def test_warm_start_with_garbage_duals_still_optimal():
    rng = np.random.default_rng(4)
    for t in range(30):
        n = int(rng.integers(1, 60))
        c = _random_problem(rng, ["uniform", "ties", "inf"][t % 3], n, n, np.float64)
        v0 = rng.standard_normal(n) * 10.0 ** rng.integers(-2, 4)
        hint = rng.permutation(n).astype(np.int64)
        hint[rng.random(n) < 0.3] = -1
        try:
            ref = _scipy_total(c, False)
        except ValueError:
            with pytest.raises(ValueError, match="infeasible"):
                lap.solve(c, False, hint, v0)
            continue
        _check_solution(c, False, *lap.solve(c, False, hint, v0), ref_total=ref)
        _check_solution(c, False, *lap.solve(c, False, None, v0), ref_total=ref)
        _check_solution(c, False, *lap.solve(c, False, hint, None), ref_total=ref)


def test_warm_start_rectangular_is_accepted_and_optimal():
    rng = np.random.default_rng(6)
    c = rng.random((20, 33))
    _, _, v = lap.solve(c)
    col, u, v2 = lap.solve(c + 0.01, False, None, v)
    _check_solution(c + 0.01, False, col, u, v2, _scipy_total(c + 0.01, False))


def test_malformed_warm_start():
    c = np.random.default_rng(0).random((4, 5))
    with pytest.raises(ValueError, match="init_v must have shape"):
        lap.solve(c, init_v=np.zeros(4))
    with pytest.raises(ValueError, match="non-finite"):
        lap.solve(c, init_v=np.array([0, 0, np.nan, 0, 0.0]))
    with pytest.raises(ValueError, match="non-finite"):
        lap.solve(c, init_v=np.array([0, 0, np.inf, 0, 0.0]))
    with pytest.raises(ValueError, match="init_col4row must have shape"):
        lap.solve(c, init_col4row=np.arange(5))
    with pytest.raises(ValueError, match="out of range"):
        lap.solve(c, init_col4row=np.array([0, 1, 2, 5]))
    with pytest.raises(ValueError, match="out of range"):
        lap.solve(c, init_col4row=np.array([0, 1, 2, -2]))
    with pytest.raises(ValueError, match="twice"):
        lap.solve(c, init_col4row=np.array([0, 1, 1, 3]))
    with pytest.raises(TypeError):
        lap.solve(c, init_v="abc")


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_invalid_entries(dtype):
    c = np.ones((3, 4), dtype)
    bad = c.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        lap.solve(bad)
    with pytest.raises(ValueError, match="NaN"):
        lap.solve(bad, True)
    bad = c.copy()
    bad[1, 3] = -np.inf
    with pytest.raises(ValueError, match="-inf"):
        lap.solve(bad)
    lap.solve(bad, True)  # forbidden pair when maximising: fine
    bad = c.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match=r"\+inf"):
        lap.solve(bad, True)
    lap.solve(bad)  # forbidden pair when minimising: fine


def test_nan_reported_before_infeasible():
    c = np.full((3, 3), np.inf)
    c[2, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        lap.solve(c)


def test_infeasible():
    for c in [
        np.full((2, 2), np.inf),
        np.array([[1.0, np.inf], [2.0, np.inf]]),  # a column nobody can take
        np.array([[1.0, np.inf, np.inf], [2.0, np.inf, np.inf]]),  # rectangular
        np.array([[np.inf, np.inf, np.inf], [1.0, 2.0, 3.0]]),  # a row with no option
    ]:
        with pytest.raises(ValueError, match="infeasible"):
            lap.solve(c)
        with pytest.raises(ValueError, match="infeasible"):
            lap.solve(np.where(np.isinf(c), -np.inf, c), True)
    with pytest.raises(ValueError, match="infeasible"):
        lap.solve(np.array([[1.0, np.inf], [2.0, np.inf]]), init_v=np.zeros(2))


def test_bad_layout_and_dtype():
    c = np.random.default_rng(0).random((5, 6))
    with pytest.raises(ValueError, match="more rows than columns"):
        lap.solve(c.T.copy())
    with pytest.raises(TypeError, match="C-contiguous"):
        lap.solve(c[:, ::2])
    with pytest.raises(TypeError, match="C-contiguous"):
        lap.solve(np.asfortranarray(np.random.default_rng(0).random((3, 3))))
    for dt in (np.int64, np.float16, np.complex128, bool):
        with pytest.raises(TypeError, match="float32 or float64"):
            lap.solve(c.astype(dt))
    with pytest.raises(ValueError, match="2-D"):
        lap.solve(np.zeros(3))
    with pytest.raises(ValueError, match="3-D"):
        lap.solve_batch(c)
    with pytest.raises(ValueError, match="more rows"):
        lap.solve_batch(np.zeros((2, 4, 3)))


def test_input_not_modified():
    rng = np.random.default_rng(8)
    for dtype in (np.float32, np.float64):
        c = rng.random((30, 41)).astype(dtype)
        c[3, 4] = np.inf
        keep = c.copy()
        v0 = rng.random(41)
        h0 = np.arange(30, dtype=np.int64)
        vk, hk = v0.copy(), h0.copy()
        lap.solve(c, False, h0, v0)
        lap.solve(c, True if not np.isposinf(c).any() else False)
        np.testing.assert_array_equal(c, keep)
        np.testing.assert_array_equal(v0, vk)
        np.testing.assert_array_equal(h0, hk)
        b = rng.random((7, 9, 12)).astype(dtype)
        bk = b.copy()
        lap.solve_batch(b, True)
        np.testing.assert_array_equal(b, bk)


# ---------------------------------------------------------------------------- batch


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(50, 64, 64), (33, 7, 13), (5, 1, 1), (20, 17, 17)])
def test_batch_matches_single(shape, dtype):
    rng = np.random.default_rng(shape[0])
    costs = rng.integers(0, 10, shape).astype(dtype) if shape[1] == 17 else rng.random(shape)
    costs = np.ascontiguousarray(costs, dtype=dtype)
    for maximize in (False, True):
        out = lap.solve_batch(costs, maximize)
        assert out.shape == shape[:2] and out.dtype == np.int64
        for b in range(shape[0]):
            np.testing.assert_array_equal(out[b], lap.solve(costs[b], maximize)[0])
        ref = [_scipy_total(costs[b], maximize) for b in range(shape[0])]
        got = [_total(costs[b], out[b]) for b in range(shape[0])]
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-6)


def test_batch_threads_identical():
    rng = np.random.default_rng(9)
    costs = rng.random((257, 24, 30))
    one = lap.solve_batch(costs, threads=1)
    for t in (2, 3, 8, 0):
        np.testing.assert_array_equal(lap.solve_batch(costs, threads=t), one)
    with pytest.raises(ValueError, match="threads"):
        lap.solve_batch(costs, threads=-1)
    assert lap._num_threads() >= 1


def test_batch_threads_checked_in_cpp_without_the_signature_dump():
    costs = np.random.default_rng(9).random((50, 30, 30))
    for bad in (-1, 1025, 2**40, 2**70, -(2**70)):
        with pytest.raises(ValueError) as info:
            lap.solve_batch(costs, threads=bad)
        assert str(info.value) == f"threads={bad} is out of range [0, 1024]"
    for bad in (True, 1.5, "2", None):
        with pytest.raises(
            TypeError, match=r"threads must be an integer in \[0, 1024\], got"
        ) as info:
            lap.solve_batch(costs, threads=bad)
        assert "Invoked with" not in str(info.value) and len(str(info.value)) < 100
    assert lap._max_threads == 1024
    np.testing.assert_array_equal(
        lap.solve_batch(costs, threads=np.int64(3)), lap.solve_batch(costs, threads=1024)
    )


def test_batch_errors_name_first_bad_problem():
    rng = np.random.default_rng(10)
    costs = rng.random((300, 8, 8))
    costs[211, 3, 3] = np.nan
    costs[250, :, 0] = np.inf  # infeasible, later index
    for t in (1, 4):
        with pytest.raises(ValueError, match=r"problem 211: cost matrix contains NaN"):
            lap.solve_batch(costs, threads=t)
    costs[211, 3, 3] = 0.5
    with pytest.raises(ValueError, match=r"problem 250: cost matrix is infeasible"):
        lap.solve_batch(costs, threads=2)
    costs[7, 0, 0] = -np.inf
    with pytest.raises(ValueError, match=r"problem 7: .*-inf"):
        lap.solve_batch(costs, threads=2)


def test_float32_batch_stays_float32_exact():
    rng = np.random.default_rng(12)
    costs = (rng.random((40, 16, 16)) * 1000).astype(np.float32)
    out = lap.solve_batch(costs)
    for b in range(40):
        assert _total(costs[b], out[b]) == pytest.approx(_scipy_total(costs[b], False), rel=1e-12)


# ---------------------------------------------------------------------------- property


def test_property_brute_force_hypothesis():
    hyp = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")
    hnp = pytest.importorskip("hypothesis.extra.numpy")

    @st.composite
    def problems(draw):
        n = draw(st.integers(1, 5))
        m = draw(st.integers(n, 6))
        values = st.sampled_from([0.0, 1.0, 2.0, 2.5, -3.0, 1e6, np.inf])
        c = draw(hnp.arrays(np.float64, (n, m), elements=values))
        dtype = draw(st.sampled_from([np.float32, np.float64]))
        return c.astype(dtype), draw(st.booleans())

    @hyp.settings(max_examples=150, deadline=None)
    @hyp.given(problems())
    def check(problem):
        c, maximize = problem
        if maximize:
            c = _as_max(c)
        n, m = c.shape
        sign = -1.0 if maximize else 1.0
        best = min(
            sign * c.astype(np.float64)[np.arange(n), list(cols)].sum()
            for cols in itertools.permutations(range(m), n)
        )
        if not np.isfinite(best):
            with pytest.raises(ValueError, match="infeasible"):
                lap.solve(c, maximize)
            return
        col, u, v = lap.solve(c, maximize)
        _check_solution(c, maximize, col, u, v, sign * best)

    check()
