"""pytest-benchmark: pymerge's native assignment solver against its peers, same run.

    pytest bench/bench_assignment.py --benchmark-enable --benchmark-only

(``--benchmark-enable`` overrides the ``--benchmark-disable`` in the project's pytest addopts.)

One benchmark group per case (distribution, n, dtype; batch; warm start); each group holds
pymerge native, scipy, ``lap.lapjv`` and lapx's JV solvers (``lapjvr``, ``lapjvh``,
``lapjvs``), and the pure-NumPy fallback at n = 256.  Sizes come from
``$PYMERGE_BENCH_SIZES`` (default ``256,1024,2048,4096``).  For a table of medians and
ratios run ``python bench/assignment_table.py``.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import assignment_table as at  # noqa: E402

SIZES = [int(s) for s in os.environ.get("PYMERGE_BENCH_SIZES", "256,1024,2048,4096").split(",")]
CASES = [
    (kind, n, dtype)
    for n in SIZES
    for kind in ("uniform", "wm", "int")
    for dtype in ("float64", "float32")
    if not (kind == "uniform" and dtype == "float32")
]
PEERS = ["pymerge", "scipy", "lap.lapjv", "lapx.lapjvr", "lapx.lapjvh", "lapx.lapjvs", "fallback"]


def _rounds(n: int) -> dict[str, int]:
    big = n >= 4096
    return {"rounds": 3 if big else 5, "iterations": 1, "warmup_rounds": 0 if big else 1}


@pytest.mark.parametrize("solver", PEERS)
@pytest.mark.parametrize(("kind", "n", "dtype"), CASES, ids=[f"{k}-{n}-{d}" for k, n, d in CASES])
def test_single(benchmark, kind, n, dtype, solver):
    c, mx = at.make_cost(kind, n, np.dtype(dtype))
    benchmark.group = f"{kind} n={n} {dtype}"
    if solver == "pymerge":
        fn = at.pymerge_solver(c, mx)
    elif solver == "fallback":
        if n > 256:
            pytest.skip("fallback is benchmarked at n = 256 only (it is O(n^3) in NumPy)")
        from pymerge.ops import _lap_fallback as fb

        def fn():
            return fb.solve(c, mx, None, None)
    else:
        peers = at.peer_solvers(c, mx, n)
        if solver not in peers:
            pytest.skip(f"{solver} not installed or not run at n={n}")
        fn = peers[solver]
    benchmark.pedantic(fn, **_rounds(n))


BATCH = ["pymerge", "pymerge-1thread", "lapx.lapjvr_batch", "lapx.lapjvh_batch", "scipy-loop"]


@pytest.mark.parametrize("solver", BATCH)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_batch(benchmark, dtype, solver):
    costs = at.make_batch(1000, 64, np.dtype(dtype))
    benchmark.group = f"batch 1000x64x64 {dtype}"
    if solver == "pymerge":

        def fn():
            return at.native.solve_batch(costs)
    elif solver == "pymerge-1thread":

        def fn():
            return at.native.solve_batch(costs, threads=1)
    elif solver == "scipy-loop":
        if at._scipy_lsa is None:
            pytest.skip("scipy missing")

        def fn():
            return [at._scipy_lsa(x) for x in costs]
    else:
        name = solver.split(".", 1)[1]
        if at._lapx is None or not hasattr(at._lapx, name):
            pytest.skip(f"{solver} not installed")
        f = getattr(at._lapx, name)

        def fn():
            return f(costs)

    benchmark.pedantic(fn, rounds=7, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("mode", ["warm", "cold"])
@pytest.mark.parametrize("n", [1024, 2048])
def test_warm_start(benchmark, n, mode):
    """Solve C_1..C_8 of a drifting weight-matching sequence, warm (previous duals) or cold."""
    seq = at.make_warm_sequence(n, 8)
    col0, _, v0 = at.native.solve(seq[0], True)
    benchmark.group = f"warm start n={n} float64 (8 solves)"

    def run():
        col, v = col0, v0
        out = []
        for c in seq[1:]:
            if mode == "warm":
                col, _, v = at.native.solve(c, True, col, v)
            else:
                col = at.native.solve(c, True)[0]
            out.append(col)
        return out

    cols = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
    for c, col in zip(seq[1:], cols, strict=True):
        ref = at.native.solve(c, True)[0]
        assert np.isclose(at._total(c, col), at._total(c, ref), rtol=1e-12)
