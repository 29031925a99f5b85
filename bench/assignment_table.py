"""Benchmark table: pymerge's native assignment solver against scipy and lapx, same run.

Usage::

    python bench/assignment_table.py            # n = 256, 1024, 2048, 4096 + batch + warm start
    python bench/assignment_table.py --quick    # n = 256, 1024 and smaller batch / warm runs

Importable: ``run_table(sizes=..., repeats=..., quick=False) -> str`` returns the markdown
table (``python -m pymerge`` shows a quick version).  Cells are median wall times in ms;
``xN`` columns are the peer's time divided by pymerge's (above 1: pymerge is faster).

Cases (issue 2):
  * ``uniform``: uniform random [0, 1) costs, minimised.
  * ``wm``: weight-matching costs ``W_a @ W_b.T`` with Gaussian ``W`` of shape (n, 512),
    maximised (lapx gets a negated copy made outside the timed region; scipy and pymerge
    maximise natively).
  * ``int``: integers in [0, 100) (many ties), minimised.
  * ``batch``: ``[B, 64, 64]`` uniform costs: ``solve_batch`` (all cores and one thread)
    against ``lap.lapjvr_batch`` / ``lap.lapjvh_batch`` and a Python loop over scipy.
  * ``warm``: a weight-matching-like sequence ``C_t = C_{t-1} + 0.02 std(C_0) N(0, 1)``;
    each solve is warm-started with the previous solve's column duals (and assignment),
    against a cold solve of the same matrix; the optimum must be identical.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

try:  # lapx installs the module ``lap``
    import lap as _lapx
except ImportError:  # pragma: no cover - optional peer
    _lapx = None
try:
    from scipy.optimize import linear_sum_assignment as _scipy_lsa
except ImportError:  # pragma: no cover - optional peer
    _scipy_lsa = None

from pymerge import _lap as native

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import median_ms  # noqa: E402

DEFAULT_SIZES = (256, 1024, 2048, 4096)
QUICK_SIZES = (256, 1024)
WM_WIDTH = 512


# ---------------------------------------------------------------------------- problems


def make_cost(kind: str, n: int, dtype=np.float64, seed: int = 0) -> tuple[np.ndarray, bool]:
    """One benchmark problem: ``(cost [n, n] C-contiguous, maximize)``."""
    rng = np.random.default_rng(seed + 7919 * n)
    if kind == "uniform":
        c, mx = rng.random((n, n)), False
    elif kind == "wm":
        c, mx = rng.standard_normal((n, WM_WIDTH)) @ rng.standard_normal((n, WM_WIDTH)).T, True
    elif kind == "int":
        c, mx = rng.integers(0, 100, (n, n)).astype(np.float64), False
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return np.ascontiguousarray(c, dtype=dtype), mx


def make_batch(b: int = 1000, n: int = 64, dtype=np.float64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((b, n, n)).astype(dtype)


def make_warm_sequence(n: int, steps: int, seed: int = 0, rel: float = 0.02) -> list[np.ndarray]:
    """Weight-matching-like drifting costs (maximised)."""
    c0, _ = make_cost("wm", n, seed=seed)
    rng = np.random.default_rng(seed + 1)
    sigma = rel * float(c0.std())
    seq = [c0]
    for _ in range(steps):
        seq.append(seq[-1] + sigma * rng.standard_normal(c0.shape))
    return seq


# ---------------------------------------------------------------------------- solvers


def _total(c: np.ndarray, col4row: np.ndarray) -> float:
    return float(np.asarray(c, np.float64)[np.arange(c.shape[0]), col4row].sum())


def pymerge_solver(c: np.ndarray, maximize: bool) -> Callable[[], np.ndarray]:
    return lambda: native.solve(c, maximize)[0]


def peer_solvers(c: np.ndarray, maximize: bool, n: int) -> dict[str, Callable[[], object]]:
    """Peers for one problem (lapx gets a pre-negated copy when maximising)."""
    out: dict[str, Callable[[], object]] = {}
    if _scipy_lsa is not None:
        out["scipy"] = lambda: _scipy_lsa(c, maximize=maximize)
    if _lapx is not None:
        cm = np.ascontiguousarray(-c) if maximize else c
        if n <= 2048:  # the classic Cython JV takes seconds at n = 4096
            out["lap.lapjv"] = lambda: _lapx.lapjv(cm)
        for name in ("lapjvr", "lapjvh", "lapjvs"):
            if hasattr(_lapx, name):
                fn = getattr(_lapx, name)
                out[f"lapx.{name}"] = lambda fn=fn: fn(cm)
    return out


def interleaved_ms(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median ms of each function, timed round-robin (a load spike hits every solver)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


# ---------------------------------------------------------------------------- table


def _fmt(ms: float) -> str:
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _row(case: str, ours: float, peers: dict[str, float], ok: bool) -> dict[str, object]:
    return {"case": case, "ours": ours, "peers": peers, "ok": ok}


def single_rows(sizes, repeats: int) -> list[dict[str, object]]:
    rows = []
    for n in sizes:
        for kind in ("uniform", "wm", "int"):
            for dtype in (np.float64, np.float32):
                if kind == "uniform" and dtype == np.float32:
                    continue
                c, mx = make_cost(kind, n, dtype)
                # more repeats where a solve is short: medians stay stable on a busy machine
                reps = max(
                    1, repeats * 3 if n <= 1024 else repeats if n <= 2048 else (repeats + 1) // 2
                )
                fns = {"pymerge": pymerge_solver(c, mx), **peer_solvers(c, mx, n)}
                peers = interleaved_ms(fns, reps, warmup=0 if n >= 4096 else 1)
                ours = peers.pop("pymerge")
                col = native.solve(c, mx)[0]
                ok = True
                if _scipy_lsa is not None:
                    r, cc = _scipy_lsa(c, maximize=mx)
                    ok = np.isclose(_total(c, col), _total(c[r], cc), rtol=1e-9, atol=1e-6)
                if n <= 256:
                    peers.update(_fallback_peer(c, mx, reps))
                rows.append(_row(f"{kind} n={n} {np.dtype(dtype).name}", ours, peers, ok))
    return rows


def _fallback_peer(c, mx, reps) -> dict[str, float]:
    try:
        from pymerge.ops import _lap_fallback as fb
    except Exception:  # pragma: no cover - the front helper's module may be absent
        return {}
    if not hasattr(fb, "solve"):
        return {}
    return {"pymerge fallback": median_ms(lambda: fb.solve(c, mx, None, None), reps)}


def _bind(fn: Callable[..., object], *args: object) -> Callable[[], object]:
    return lambda: fn(*args)


def batch_rows(b: int, repeats: int) -> list[dict[str, object]]:
    rows = []
    for dtype in (np.float64, np.float32):
        costs = make_batch(b, 64, dtype)
        fns: dict[str, Callable[[], object]] = {
            "pymerge": lambda costs=costs: native.solve_batch(costs),
            "pymerge 1 thread": lambda costs=costs: native.solve_batch(costs, threads=1),
        }
        if _lapx is not None:
            for name in ("lapjvr_batch", "lapjvh_batch"):
                if hasattr(_lapx, name):
                    fns[f"lapx.{name}"] = _bind(getattr(_lapx, name), costs)
        if _scipy_lsa is not None and dtype == np.float64:
            fns["scipy loop"] = lambda costs=costs: [_scipy_lsa(x) for x in costs]
        peers = interleaved_ms(fns, max(3, repeats))
        ours = peers.pop("pymerge")
        out = native.solve_batch(costs)
        ok = all(
            np.isclose(_total(costs[k], out[k]), _total(costs[k], native.solve(costs[k])[0]))
            for k in range(0, b, max(1, b // 50))
        )
        rows.append(_row(f"batch {b}x64x64 {np.dtype(dtype).name}", ours, peers, ok))
    return rows


def warm_rows(sizes, steps: int) -> list[dict[str, object]]:
    rows = []
    for n in sizes:
        for dtype in (np.float64, np.float32):
            seq = [np.ascontiguousarray(c, dtype=dtype) for c in make_warm_sequence(n, steps)]
            col, _, v = native.solve(seq[0], True)
            warm_t, cold_t, ok = [], [], True
            for c in seq[1:]:
                # each step: warm (from the previous step's duals) and cold, interleaved
                t = interleaved_ms(
                    {
                        "warm": lambda c=c, col=col, v=v: native.solve(c, True, col, v),
                        "cold": lambda c=c: native.solve(c, True),
                    },
                    3 if n <= 1024 else 1,
                    warmup=0,
                )
                warm_t.append(t["warm"] / 1e3)
                cold_t.append(t["cold"] / 1e3)
                wcol, _, wv = native.solve(c, True, col, v)
                ccol = native.solve(c, True)[0]
                ok &= bool(np.isclose(_total(c, wcol), _total(c, ccol), rtol=1e-12, atol=1e-9))
                col, v = wcol, wv
            rows.append(
                _row(
                    f"warm n={n} {np.dtype(dtype).name} ({steps} steps)",
                    1e3 * statistics.median(warm_t),
                    {"pymerge cold": 1e3 * statistics.median(cold_t)},
                    ok,
                )
            )
    return rows


def render(rows: list[dict[str, object]]) -> str:
    lines = [
        "| case | pymerge ms | peers: ms (xN = peer / pymerge) | best peer | x best | ok |",
        "| --- | ---: | --- | --- | ---: | :-: |",
    ]
    for r in rows:
        ours = float(r["ours"])
        peers = dict(r["peers"])  # type: ignore[arg-type]
        cells = ", ".join(f"{k} {_fmt(v)} (x{v / ours:.2f})" for k, v in peers.items())
        real = {k: v for k, v in peers.items() if not k.startswith("pymerge")}
        if real:
            best = min(real, key=real.get)
            best_cell, ratio = best, f"{real[best] / ours:.2f}"
        else:
            best_cell, ratio = "-", "-"
        lines.append(
            f"| {r['case']} | {_fmt(ours)} | {cells} | {best_cell} | {ratio} | "
            f"{'yes' if r['ok'] else 'NO'} |"
        )
    return "\n".join(lines)


def machine_line() -> str:
    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        load = "?"
    return (
        f"machine: {platform.machine()} {os.cpu_count()} cores, {platform.python_version()}, "
        f"pymerge._lap SIMD={native.__simd__}, load average {load}"
    )


def run_table(sizes=DEFAULT_SIZES, repeats: int = 5, quick: bool = False) -> str:
    """Run every case and return a markdown table (``quick``: small sizes, fewer repeats)."""
    if quick:
        sizes = tuple(s for s in sizes if s <= 1024) or QUICK_SIZES
        repeats = min(repeats, 3)
    rows = single_rows(sizes, repeats)
    rows += batch_rows(200 if quick else 1000, repeats)
    rows += warm_rows(
        (min(sizes[-1], 1024),) if quick else (1024, 4096 if 4096 in sizes else 2048),
        4 if quick else 8,
    )
    return machine_line() + "\n\n" + render(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    ap.add_argument("--sizes", type=int, nargs="*", default=None, help="square sizes n")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    sizes = tuple(args.sizes) if args.sizes else (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    print(run_table(sizes=sizes, repeats=args.repeats, quick=args.quick))


if __name__ == "__main__":
    main()
