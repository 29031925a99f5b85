"""A quick, self-contained assignment benchmark for ``pymerge bench`` and ``pymerge demo``.

Times pymerge (native C++ and the NumPy fallback) against the peers importable here (scipy,
lapx: optional, pymerge itself never needs them) on this machine, and prints a markdown table
of medians with ratios against pymerge; every row names the backend that ran. The thorough
benchmarks live in ``bench/``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pymerge._backend import native_lap, native_multi_tensor
from pymerge.ops.assignment import (
    linear_sum_assignment_batch,
    resolve_backend,
    solve_assignment,
)

__all__ = [
    "Timing",
    "PEERS",
    "peers",
    "peers_line",
    "backend_line",
    "missing_native_warning",
    "package_dir",
    "quick_comparison",
    "format_table",
    "single_solvers",
    "table_note",
]

Solver = Callable[[np.ndarray, bool], float]  # returns the total cost

# the NumPy fallback's name for the ``backend=`` argument ("numpy"; "torch" is its alias)
_FALLBACK = "numpy"

# peer -> (module it installs, distribution name, the command that adds it)
PEERS: dict[str, tuple[str, str, str]] = {
    "scipy": ("scipy", "scipy", "pip install scipy"),
    "lapx": ("lap", "lapx", "pip install lapx"),
}


def table_note(rows: Sequence[Timing]) -> str:
    """The line printed under :func:`format_table`: what the columns mean."""
    note = (
        "Medians of wall-clock time; 't / t(pymerge)' = time over pymerge's native time "
        "(above 1: pymerge faster)."
    )
    if any(r.solver.startswith("lapx") for r in rows):
        note += " lapx only minimises: maximised costs are negated before timing it."
    return note


@dataclass
class Timing:
    case: str
    solver: str
    median_s: float
    total: float | None = None
    note: str = ""
    ok: bool = True  # False when the solver's optimum disagrees with pymerge's
    backend: str = ""  # what ran: "native C++ (avx2)", "NumPy fallback", "C++ (lapjvr)", ...


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def peers() -> dict[str, str | None]:
    """Peer name -> installed version, or ``None`` when it does not import."""
    found: dict[str, str | None] = {}
    for name, (module, dist, _) in PEERS.items():
        try:
            importlib.import_module(module)
        except ImportError:
            found[name] = None
        else:
            found[name] = _version(dist)
    return found


def peers_line() -> str:
    """``peers: scipy 1.17.1, lapx 0.11.1`` plus, for missing ones, how to add them."""
    found = peers()
    have = [f"{n} {v}" for n, v in found.items() if v is not None]
    line = "peers compared: " + (", ".join(have) if have else "none")
    missing = [n for n, v in found.items() if v is None]
    if missing:
        dists = " ".join(PEERS[n][1] for n in missing)
        line += f"; not installed: {', '.join(missing)} (add with: pip install {dists})"
    return line


def native_label() -> str:
    lap = native_lap()
    simd = getattr(lap, "__simd__", None)
    return f"native C++ ({simd})" if simd else "native C++"


def multi_tensor_label() -> str:
    simd = getattr(native_multi_tensor(), "__simd__", None)
    return f"native C++ ({simd})" if simd else "native C++"


def backend_line() -> str:
    """One line naming the backend of each primitive in this installation."""
    lap, mt = native_lap(), native_multi_tensor()
    asg = native_label() if lap is not None else "NumPy fallback (pymerge._lap missing)"
    cpu = multi_tensor_label() if mt is not None else "torch (pymerge._multi_tensor missing)"
    import torch

    from pymerge._backend import triton_error

    if torch.cuda.is_available():
        gpu = "Triton" if triton_error() is None else "torch (triton does not import)"
        gpu += f" on {torch.cuda.get_device_name(0)}"
    else:
        gpu = "no CUDA device"
    return f"backends: assignment {asg} · CPU interpolation {cpu} · GPU kernels {gpu}"


def package_dir() -> str:
    """The folder of the imported ``pymerge`` package (the parent of this one)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _in_source_tree(package_dir: str) -> bool:
    """True when ``package_dir`` is the ``pymerge/`` folder of a source checkout."""
    return os.path.exists(os.path.join(package_dir, os.pardir, "CMakeLists.txt"))


def missing_native_warning() -> str | None:
    """A warning when the compiled modules are missing, naming the fix."""
    from pymerge import _backend

    modules = (("_lap", _backend.native_lap()), ("_multi_tensor", _backend.native_multi_tensor()))
    missing = [name for name, module in modules if module is None]
    if not missing:
        return None
    where = package_dir()
    text = (
        f"warning: the compiled modules {', '.join('pymerge.' + m for m in missing)} are "
        f"missing, so the slow fallbacks run"
    )
    if _in_source_tree(where):
        return text + (
            f" (pymerge was imported from the source tree {where}: install it with "
            f"`pip install .` and run the `pymerge` command, not `python -m pymerge` here)"
        )
    return text + (
        " (reinstall pymerge where a C++17 compiler is available: `pip install --force-reinstall "
        "--no-deps .` from its source folder)"
    )


def _median_time(fn: Callable[[], float], repeat: int) -> tuple[float, float]:
    """Median wall time of ``repeat`` calls after one untimed warm-up call, and the value."""
    value = fn()
    times = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), value


def single_solvers(include_fallback: bool = True) -> dict[tuple[str, str], Solver]:
    """``(solver, backend) -> solve(cost, maximize) -> total`` for every solver here."""
    solvers: dict[tuple[str, str], Solver] = {}
    if resolve_backend() == "native":
        solvers["pymerge", native_label()] = lambda c, mx: (
            solve_assignment(c, mx, backend="native").total
        )
    if include_fallback or not solvers:
        solvers["pymerge", "NumPy fallback"] = lambda c, mx: (
            solve_assignment(c, mx, backend=_FALLBACK).total
        )
    versions = peers()
    if versions["scipy"] is not None:
        from scipy.optimize import linear_sum_assignment as scipy_lsa

        def _scipy(c: np.ndarray, mx: bool) -> float:
            r, k = scipy_lsa(c, maximize=mx)
            return float(c[r, k].sum(dtype=np.float64))

        solvers[f"scipy {versions['scipy']}", "C++ (linear_sum_assignment)"] = _scipy
    if versions["lapx"] is not None:
        import lap  # lapx installs the module ``lap``

        for name in ("lapjvr", "lapjvh"):
            fn = getattr(lap, name, None)
            if fn is None:
                continue

            # lapx only minimises: maximise problems are handed in pre-negated (untimed)
            def _lapx(c: np.ndarray, mx: bool, _fn=fn) -> float:
                total = _fn(c, extend_cost=c.shape[0] != c.shape[1])[0]
                return -float(total) if mx else float(total)

            solvers[f"lapx {versions['lapx']}", f"C++ ({name})"] = _lapx
    return solvers


def _problems(sizes: Sequence[int], rng: np.random.Generator, kinds: Sequence[str]):
    for n in sizes:
        if "uniform" in kinds:
            yield f"uniform f64 n={n}", rng.random((n, n)), False
        wa, wb = rng.normal(size=(n, 512)), rng.normal(size=(n, 512))
        wm = wa @ wb.T
        if "wm64" in kinds:
            yield f"weight-matching f64 n={n} (max)", wm, True
        if "wm32" in kinds:
            yield f"weight-matching f32 n={n} (max)", wm.astype(np.float32), True


def _bench_batch(
    shape: tuple[int, int, int], repeat: int, rng, threads: int | None, fallback: bool
):
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
        label = native_label() + (f", {threads} threads" if threads else ", threaded")
        out.append(Timing(case, "pymerge", t, v, backend=label))
    if fallback or not out:
        few = min(shape[0], 100)  # the fallback is slow: time a slice, scale to the batch
        t, _ = _median_time(lambda: linear_sum_assignment_batch(costs[:few], backend=_FALLBACK), 1)
        note = f"timed on {few} problems, scaled" if few < shape[0] else ""
        out.append(
            Timing(case, "pymerge", t * shape[0] / few, None, note, backend="NumPy fallback")
        )
    versions = peers()
    if versions["scipy"] is not None:
        from scipy.optimize import linear_sum_assignment as scipy_lsa

        def loop() -> float:
            return sum(float(c[scipy_lsa(c)].sum()) for c in costs)

        t, v = _median_time(loop, repeat)
        out.append(Timing(case, f"scipy {versions['scipy']}", t, v, backend="C++, a Python loop"))
    if versions["lapx"] is not None:
        import lap

        if hasattr(lap, "lapjvr_batch"):
            t, v = _median_time(
                lambda: float(np.sum(lap.lapjvr_batch(costs, n_threads=threads or 0)[0])), repeat
            )
            out.append(Timing(case, f"lapx {versions['lapx']}", t, v, backend="C++ (lapjvr_batch)"))
    return out


def _bench_warm(n: int, steps: int, rng, fallback: bool) -> list[Timing]:
    """Cold vs warm-started solves on a sequence of slowly drifting weight-matching costs."""
    wa, wb = rng.normal(size=(n, 512)), rng.normal(size=(n, 512))
    costs = [wa @ wb.T]
    for _ in range(steps):
        wa = wa + 0.02 * rng.normal(size=wa.shape)
        costs.append(wa @ wb.T)
    case = f"warm start, {steps} drifting weight-matching f64 n={n} (per solve)"
    backends = ["native"] if resolve_backend() == "native" else []
    if fallback or not backends:
        backends.append(_FALLBACK)
    out = []
    for be in backends:
        label = native_label() if be == "native" else "NumPy fallback"
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
        med_c, med_w = statistics.median(cold), statistics.median(warm)
        out.append(Timing(case, "pymerge cold", med_c, None, note, ok, backend=label))
        out.append(Timing(case, "pymerge warm", med_w, None, note, ok, backend=label))
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
    kinds: Sequence[str] = ("uniform", "wm64", "wm32"),
    threads: int | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[Timing]:
    """Time every importable solver on uniform and weight-matching costs, a batch, a warm start.

    ``kinds``: which single-problem cases per size (``"uniform"`` f64, ``"wm64"`` and
    ``"wm32"`` weight-matching costs). Returns one :class:`Timing` per (case, solver,
    backend); totals are checked against pymerge's.
    """
    rng = np.random.default_rng(seed)
    solvers = single_solvers(include_fallback)
    rows: list[Timing] = []
    for case, cost, mx in _problems(sizes, rng, kinds):
        if progress:
            progress(case)
        for (name, backend), fn in solvers.items():
            fallback = backend == "NumPy fallback"
            if fallback and cost.shape[0] > fallback_max_n:
                continue
            c = -cost if (mx and name.startswith("lapx")) else cost
            reps = 1 if fallback and cost.shape[0] >= 1024 else repeat
            t, total = _median_time(lambda fn=fn, c=c, mx=mx: fn(c, mx), reps)
            rows.append(Timing(case, name, t, total, backend=backend))
    if batch is not None:
        if progress:
            progress("batch")
        rows.extend(_bench_batch(batch, repeat, rng, threads, include_fallback))
    if warm_n:
        if progress:
            progress("warm start")
        rows.extend(_bench_warm(warm_n, warm_steps, rng, include_fallback))
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


def _reference(rows: list[Timing]) -> dict[str, float]:
    """Case -> pymerge's time: native (cold for warm starts), else the fallback."""
    refs: dict[str, float] = {}
    for native in (True, False):
        for r in rows:
            if r.solver in ("pymerge", "pymerge cold") and native == r.backend.startswith("native"):
                refs.setdefault(r.case, r.median_s)
    return refs


def format_table(rows: list[Timing]) -> str:
    """Markdown table: case, solver, backend, median ms, time over pymerge's, note."""
    lines = [
        "| case | solver | backend | median ms | t / t(pymerge) | note |",
        "| --- | --- | --- | ---: | ---: | --- |",
    ]
    refs = _reference(rows)
    for r in rows:
        ref = refs.get(r.case)
        ratio = f"{r.median_s / ref:.2f}" if ref else ""
        lines.append(
            f"| {r.case} | {r.solver} | {r.backend} | {r.median_s * 1e3:.2f} | {ratio} | {r.note} |"
        )
    return "\n".join(lines)
