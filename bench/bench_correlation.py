"""CPU benchmarks: one streaming-correlation update (torch fallback) against peers.

Bar (issue 3): the torch fallback of ``CorrelationAccumulator.update`` within 1.3x of a bare
``torch.matmul`` of the same shape (``x_a^T x_b`` for ``x_a [N, d_a]``, ``x_b [N, d_b]``).

Peers, all float32 on the same batch:

* ``matmul``: ``x_a.T @ x_b``, the GEMM alone (the floor).
* ``update``: ``CorrelationAccumulator.update`` on the torch backend, warm accumulator
  (``check_finite`` on, the default, and off).
* ``unfused``: the straightforward torch reference a user would write: centre each input,
  ``sum``/``sum of squares`` per feature, GEMM, merge (the same numerics, separate passes).
* ``corrcoef``: ``torch.corrcoef`` of the concatenated features (one-shot, computes the
  joint ``(d_a + d_b)^2`` matrix).

    pytest bench/bench_correlation.py --benchmark-enable --benchmark-only   # pytest-benchmark
    python bench/bench_correlation.py [--quick]             # table of medians and ratios
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
from collections.abc import Callable

import pytest
import torch

from pymerge.ops import CorrelationAccumulator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import median_ms  # noqa: E402

SHAPES = ((8192, 512, 512), (8192, 1024, 1024), (8192, 512, None))  # d_b None: self (Gram)
QUICK_SHAPES = ((8192, 512, 512),)


def make_batch(n: int, d_a: int, d_b: int | None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xa = torch.randn(n, d_a, generator=g) + 3.0
    xb = None if d_b is None else torch.randn(n, d_b, generator=g) - 1.0
    return xa, xb


def warm_accumulator(xa, xb, check_finite: bool = True) -> CorrelationAccumulator:
    acc = CorrelationAccumulator(
        xa.shape[1], None if xb is None else xb.shape[1], backend="torch", check_finite=check_finite
    )
    acc.update(xa, xb)
    return acc


class UnfusedReference:
    """Chan's streaming update written plainly in torch, one op per statistic."""

    def __init__(self, d_a: int, d_b: int) -> None:
        self.n = 0
        self.mean_a = torch.zeros(d_a)
        self.mean_b = torch.zeros(d_b)
        self.m2_a = torch.zeros(d_a)
        self.m2_b = torch.zeros(d_b)
        self.m2 = torch.zeros(d_a, d_b)

    def update(self, xa: torch.Tensor, xb: torch.Tensor) -> None:
        nb = xa.shape[0]
        ma, mb = xa.mean(0), xb.mean(0)
        ca, cb = xa - ma, xb - mb
        n = self.n + nb
        da, db = ma - self.mean_a, mb - self.mean_b
        c = self.n * nb / n
        self.m2 += ca.T @ cb + c * torch.outer(da, db)
        self.m2_a += (ca * ca).sum(0) + c * da * da
        self.m2_b += (cb * cb).sum(0) + c * db * db
        self.mean_a += da * nb / n
        self.mean_b += db * nb / n
        self.n = n


def cases(n: int, d_a: int, d_b: int | None) -> dict[str, Callable[[], object]]:
    xa, xb = make_batch(n, d_a, d_b)
    other = xa if xb is None else xb
    acc = warm_accumulator(xa, xb)
    acc_nocheck = warm_accumulator(xa, xb, check_finite=False)
    out = {
        "matmul": lambda: torch.matmul(xa.T, other),
        "update": lambda: acc.update(xa, xb),
        "update_nocheck": lambda: acc_nocheck.update(xa, xb),
    }
    if xb is not None:
        ref = UnfusedReference(d_a, d_b)
        ref.update(xa, xb)
        out["unfused"] = lambda: ref.update(xa, xb)
        cat = torch.cat([xa, xb], 1).T.contiguous()
        out["corrcoef"] = lambda: torch.corrcoef(cat)
    return out


def _id(shape) -> str:
    n, d_a, d_b = shape
    return f"N{n}-da{d_a}-" + ("self" if d_b is None else f"db{d_b}")


# ----------------------------------------------------------------------- pytest-benchmark


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("peer", ["matmul", "update", "update_nocheck", "unfused", "corrcoef"])
def test_correlation_update(benchmark, shape, peer):
    fns = cases(*shape)
    if peer not in fns:
        pytest.skip(f"{peer} has no self-correlation variant")
    benchmark.group = _id(shape)
    benchmark.pedantic(fns[peer], rounds=7, iterations=1, warmup_rounds=1)


# ----------------------------------------------------------------------------- table


def _cell(t: dict[str, float], k: str) -> str:
    return f"{t[k]:.1f}" if k in t else "-"


def run_table(shapes=SHAPES, repeats: int = 9) -> str:
    rows = [
        "| shape | matmul ms | update ms | update/matmul | nocheck ms | nocheck/matmul "
        "| unfused ms | unfused/update | corrcoef ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for shape in shapes:
        fns = cases(*shape)
        # interleave peers so drifting load hits each alike
        samples: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(3):
            for k, fn in fns.items():
                samples[k].append(median_ms(fn, max(1, repeats // 3)))
        t = {k: statistics.median(v) for k, v in samples.items()}

        unf = f"{t['unfused'] / t['update']:.2f}" if "unfused" in t else "-"
        rows.append(
            f"| {_id(shape)} | {t['matmul']:.1f} | {t['update']:.1f} | "
            f"{t['update'] / t['matmul']:.2f} | {t['update_nocheck']:.1f} | "
            f"{t['update_nocheck'] / t['matmul']:.2f} | {_cell(t, 'unfused')} | {unf} | "
            f"{_cell(t, 'corrcoef')} |"
        )
    return "\n".join(rows)


def main(argv: list[str]) -> None:
    quick = "--quick" in argv
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    print(
        f"# correlation update, float32, torch {torch.__version__}, {platform.processor() or '?'}"
        f", {torch.get_num_threads()} threads, loadavg {load[0]:.2f}"
    )
    print(run_table(QUICK_SHAPES if quick else SHAPES))


if __name__ == "__main__":
    main(sys.argv[1:])
