"""Hypothesis property tests for pymerge.linear_sum_assignment on both backends."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.optimize import linear_sum_assignment as scipy_lsa

from pymerge import _backend
from pymerge.ops.assignment import linear_sum_assignment, solve_assignment

BACKENDS = [
    "numpy",
    pytest.param(
        "native",
        marks=pytest.mark.skipif(
            not hasattr(_backend.native_lap(), "solve"),
            reason="pymerge._lap is not built or has no solve() yet",
        ),
    ),
]

shapes = st.tuples(st.integers(0, 9), st.integers(0, 9))
finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=64)
small_ints = st.integers(-3, 3).map(float)


@st.composite
def cost_matrices(draw, with_inf: bool = False):
    shape = draw(shapes)
    elements = draw(st.sampled_from([finite, small_ints]))
    if with_inf:
        elements = st.one_of(elements, st.just(np.inf))
    return draw(hnp.arrays(np.float64, shape, elements=elements))


def _total(c, rows, cols) -> float:
    return float(c[np.asarray(rows), np.asarray(cols)].sum())


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=300, deadline=None)
@given(c=cost_matrices(with_inf=True), maximize=st.booleans())
def test_same_optimum_as_scipy(backend, c, maximize):
    if maximize:
        c = -c
    try:
        ref = scipy_lsa(c, maximize=maximize)
    except ValueError:
        with pytest.raises(ValueError, match="infeasible"):
            linear_sum_assignment(c, maximize, backend=backend)
        return
    rows, cols = linear_sum_assignment(c, maximize, backend=backend)
    k = min(c.shape)
    assert rows.shape == cols.shape == (k,)
    assert np.array_equal(rows, np.sort(rows)) and np.unique(rows).size == k
    assert np.unique(cols).size == k
    expected = _total(c, *ref)
    assert _total(c, rows, cols) == pytest.approx(expected, rel=1e-9, abs=1e-6)
    if c.shape[0] <= c.shape[1]:
        np.testing.assert_array_equal(rows, np.arange(k))


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=150, deadline=None)
@given(c=cost_matrices())
def test_maximize_is_minimize_of_negation(backend, c):
    a = solve_assignment(c, True, backend=backend)
    b = solve_assignment(-c, False, backend=backend)
    assert a.total == pytest.approx(-b.total, rel=1e-9, abs=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=150, deadline=None)
@given(c=cost_matrices(), shift=finite, data=st.data())
def test_row_shift_keeps_the_optimum_and_warm_start_agrees(backend, c, shift, data):
    """Adding a constant to one row of a wide matrix moves the optimum by that constant."""
    n, m = c.shape
    if n == 0 or n > m:
        return
    i = data.draw(st.integers(0, n - 1))
    shifted = c.copy()
    shifted[i] += shift
    base = solve_assignment(c, backend=backend)
    moved = solve_assignment(shifted, init=base, backend=backend)
    assert moved.total == pytest.approx(base.total + shift, rel=1e-9, abs=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=150, deadline=None)
@given(
    c=hnp.arrays(
        np.float32,
        shapes,
        elements=st.one_of(
            st.floats(-1e4, 1e4, width=32), st.integers(-2, 2).map(float), st.just(np.inf)
        ),
    ),
    maximize=st.booleans(),
)
def test_float32_same_optimum_as_scipy_on_float64(backend, c, maximize):
    """float32 costs are solved exactly: the optimum of the float32 values, as float64."""
    if maximize:
        c = -c
    c64 = c.astype(np.float64)
    try:
        ref = scipy_lsa(c64, maximize=maximize)
    except ValueError:
        with pytest.raises(ValueError, match="infeasible"):
            solve_assignment(c, maximize, backend=backend)
        return
    res = solve_assignment(c, maximize, backend=backend)
    assert res.total == pytest.approx(_total(c64, *ref), rel=1e-6, abs=1e-3)
