"""``python -m pymerge``: a short demo that solves a problem and times the solvers here."""

from __future__ import annotations

import sys
import time

import numpy as np

# what the demo times: square sizes, the batch shape, the warm-start size
DEMO_SIZES: tuple[int, ...] = (256, 1024)
DEMO_BATCH: tuple[int, int, int] = (1000, 64, 64)
DEMO_WARM_N = 512


def demo(argv: list[str] | None = None) -> int:
    """Print the backends, solve one small problem, print the quick comparison table.

    Arguments other than none are handed to the ``pymerge`` command line
    (``python -m pymerge bench --full``).
    """
    argv = sys.argv[1:] if argv is None else argv
    if argv:
        from pymerge.cli import main

        return main(argv)

    import pymerge
    from pymerge import _demo

    print(f"pymerge {pymerge.__version__}")
    for key, value in pymerge.backends().items():
        print(f"  {key:<18} {value}")

    cost = np.array([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
    rows, cols = pymerge.linear_sum_assignment(cost)
    print("\nlinear_sum_assignment of")
    print(cost)
    print(
        f"-> row_ind {rows.tolist()}, col_ind {cols.tolist()}, "
        f"total {cost[rows, cols].sum():g}  (same as scipy.optimize.linear_sum_assignment)"
    )

    print("\nQuick comparison on this machine (pymerge bench --full for more):", flush=True)
    t0 = time.perf_counter()
    rows_ = _demo.quick_comparison(DEMO_SIZES, repeat=3, batch=DEMO_BATCH, warm_n=DEMO_WARM_N)
    print(_demo.format_table(rows_))
    print(
        f"\n't / t(pymerge)' = time over pymerge's (above 1: pymerge faster); "
        f"lapx only minimises, so maximised costs are negated before timing it. "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    return 0 if all(r.ok for r in rows_) else 1


if __name__ == "__main__":
    sys.exit(demo())
