"""A quick, self-contained assignment benchmark for ``python -m pymerge`` and ``pymerge bench``.

Times pymerge (native and NumPy fallback) against scipy and lapx when they are importable (they
are optional: pymerge itself never needs them) on this machine, and prints a markdown table
of medians with ratios against pymerge. The thorough benchmarks live in ``bench/``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pymerge.ops.assignment import (
    linear_sum_assignment_batch,
    resolve_backend,
    solve_assignment,
)

__all__ = ["Timing", "quick_comparison", "format_table", "single_solvers"]

Solver = Callable[[np.ndarray, bool], float]  # returns the total cost


@dataclass
class Timing:
    case: str
    solver: str
    median_s: float
    total: float | None = None
    note: str = ""
    ok: bool = True  # False when the solver's optimum disagrees with pymerge's


def _median_time(fn: Callable[[], float], repeat: int) -> tuple[float, float]:
    times, value = [], float("nan")
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), value


def single_solvers(include_fallback: bool = True) -> dict[str, Solver]:
    """Name -> ``solve(cost, maximize) -> total`` for every solver importable here."""
    solvers: dict[str, Solver] = {}
    if resolve_backend() == "native":
        solvers["pymerge"] = lambda c, mx: solve_assignment(c, mx, backend="native").total
    if include_fallback or not solvers:
        solvers["pymerge fallback"] = lambda c, mx: solve_assignment(c, mx, backend="torch").total
    try:
        from scipy.optimize import linear_sum_assignment as scipy_lsa

        def _scipy(c: np.ndarray, mx: bool) -> float:
            r, k = scipy_lsa(c, maximize=mx)
            return float(c[r, k].sum(dtype=np.float64))

        solvers["scipy"] = _scipy
    except ImportError:
        pass
    try:
        import lap  # lapx installs the module ``lap``

        for name in ("lapjvr", "lapjvh"):
            fn = getattr(lap, name, None)
            if fn is None:
                continue

            # lapx only minimises: maximise problems are handed in pre-negated (untimed)
            def _lapx(c: np.ndarray, mx: bool, _fn=fn) -> float:
                total = _fn(c, extend_cost=c.shape[0] != c.shape[1])[0]
                return -float(total) if mx else float(total)

            solvers[f"lapx.{name}"] = _lapx
    except ImportError:
        pass
    return solvers


def _problems(sizes: Sequence[int], rng: np.random.Generator):
    for n in sizes:
        yield f"uniform f64 n={n}", rng.random((n, n)), False
        wa, wb = rng.normal(size=(n, 512)), rng.normal(size=(n, 512))
        wm = wa @ wb.T
        yield f"weight-matching f64 n={n} (max)", wm, True
        yield f"weight-matching f32 n={n} (max)", wm.astype(np.float32), True


def _bench_batch(shape: tuple[int, int, int], repeat: int, rng, threads: int | None):
    costs = rng.random(shape)
    case = f"batch {shape[0]}x{shape[1]}x{shape[2]}"
    out: list[Timing] = []

    def total(rows, cols) -> float:
        return float(costs[np.arange(shape[0])[:, None], rows, cols].sum())

    if resolve_backend() == "native":
        t, v = _median_time(
            lambda: total(*linear_sum_assignment_batch(costs, backend="native", threads=threads)),
            repeat,
        )
        out.append(Timing(case, "pymerge", t, v))
    few = min(shape[0], 100)  # the fallback is slow: time a slice, scale to the batch
    t, _ = _median_time(lambda: linear_sum_assignment_batch(costs[:few], backend="torch"), 1)
    note = f"timed on {few} problems, scaled" if few < shape[0] else ""
    out.append(Timing(case, "pymerge fallback", t * shape[0] / few, None, note))
    try:
        from scipy.optimize import linear_sum_assignment as scipy_lsa

        def loop() -> float:
            return sum(float(c[scipy_lsa(c)].sum()) for c in costs)

        t, v = _median_time(loop, repeat)
        out.append(Timing(case, "scipy (Python loop)", t, v))
    except ImportError:
        pass
    try:
        import lap

        if hasattr(lap, "lapjvr_batch"):
            t, v = _median_time(
                lambda: float(np.sum(lap.lapjvr_batch(costs, n_threads=threads or 0)[0])), repeat
            )
            out.append(Timing(case, "lapx.lapjvr_batch", t, v))
    except ImportError:
        pass
    return out


def _bench_warm(n: int, steps: int, rng) -> list[Timing]:
    """Cold vs warm-started solves on a sequence of slowly drifting weight-matching costs."""
    wa, wb = rng.normal(size=(n, 512)), rng.normal(size=(n, 512))
    costs = [wa @ wb.T]
    for _ in range(steps):
        wa = wa + 0.02 * rng.normal(size=wa.shape)
        costs.append(wa @ wb.T)
    case = f"warm start, {steps} drifting weight-matching f64 n={n} (per solve)"
    backends = ["native"] if resolve_backend() == "native" else []
    backends.append("torch")
    out = []
    for be in backends:
        name = "pymerge" if be == "native" else "pymerge fallback"
        cold, warm, totals = [], [], []
        prev = solve_assignment(costs[0], True, backend=be)
        for c in costs[1:]:
            t0 = time.perf_counter()
            ref = solve_assignment(c, True, backend=be)
            t1 = time.perf_counter()
            prev = solve_assignment(c, True, init=prev, backend=be)
            t2 = time.perf_counter()
            cold.append(t1 - t0)
            warm.append(t2 - t1)
            same = abs(prev.total - ref.total) <= 1e-9 * max(1.0, abs(ref.total))
            totals.append(same)
        ok = all(totals)
        note = "" if ok else "warm optimum differs!"
        out.append(Timing(case, f"{name} cold", statistics.median(cold), None, note, ok))
        out.append(Timing(case, f"{name} warm", statistics.median(warm), None, note, ok))
    return out


def quick_comparison(
    sizes: Sequence[int] = (256, 1024),
    *,
    repeat: int = 3,
    batch: tuple[int, int, int] | None = (1000, 64, 64),
    warm_n: int | None = 512,
    warm_steps: int = 4,
    include_fallback: bool = True,
    fallback_max_n: int = 2048,
    threads: int | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[Timing]:
    """Time every importable solver on uniform and weight-matching costs, a batch, a warm start.

    Returns one :class:`Timing` per (case, solver); totals are checked against pymerge's.
    """
    rng = np.random.default_rng(seed)
    solvers = single_solvers(include_fallback)
    rows: list[Timing] = []
    for case, cost, mx in _problems(sizes, rng):
        if progress:
            progress(case)
        for name, fn in solvers.items():
            if name == "pymerge fallback" and cost.shape[0] > fallback_max_n:
                continue
            c = -cost if (mx and name.startswith("lapx")) else cost
            reps = 1 if name == "pymerge fallback" and cost.shape[0] >= 1024 else repeat
            t, total = _median_time(lambda fn=fn, c=c, mx=mx: fn(c, mx), reps)
            rows.append(Timing(case, name, t, total))
    if batch is not None:
        if progress:
            progress("batch")
        rows.extend(_bench_batch(batch, repeat, rng, threads))
    if warm_n:
        if progress:
            progress("warm start")
        rows.extend(_bench_warm(warm_n, warm_steps, rng))
    _check_totals(rows)
    return rows


def _check_totals(rows: list[Timing]) -> None:
    by_case: dict[str, float] = {}
    for r in rows:
        if r.total is None:
            continue
        ref = by_case.setdefault(r.case, r.total)
        if abs(r.total - ref) > 1e-6 * max(1.0, abs(ref)):
            r.note, r.ok = f"total {r.total:.6g} differs from {ref:.6g}", False


def format_table(rows: list[Timing]) -> str:
    """Markdown table: case, solver, median ms, time over pymerge's (above 1: pymerge faster)."""
    lines = [
        "| case | solver | median ms | t / t(pymerge) | note |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    refs: dict[str, float] = {}
    for r in rows:
        if r.solver in ("pymerge", "pymerge cold"):
            refs.setdefault(r.case, r.median_s)
    for r in rows:
        if r.case not in refs and r.solver.startswith("pymerge fallback"):
            refs.setdefault(r.case, r.median_s)
    for r in rows:
        ref = refs.get(r.case)
        ratio = f"{r.median_s / ref:.2f}" if ref else ""
        lines.append(f"| {r.case} | {r.solver} | {r.median_s * 1e3:.2f} | {ratio} | {r.note} |")
    return "\n".join(lines)
