"""Full weight matching: pymerge against the ``rebasin`` package (PyPI), same machine, same run.

    pytest bench/bench_alignment.py --benchmark-enable --benchmark-only
    python bench/bench_alignment.py [--repeats 5] [--threads N]     # table of medians

Cases (random weights, two independently initialised models per case):

* ``mlp512``: :class:`pymerge.testing.models.MLP` 40 -> 512 -> 512 -> 512 -> 10 (the MNIST-1D
  model).
* ``resnet20x4``: :class:`pymerge.testing.models.ResNet20` with ``width_multiplier=4`` (widths
  64/128/256); BatchNorm affine parameters are randomised too (otherwise every BN weight is
  1 in both models and that constant dominates the objective).

Timed: ``pymerge.weight_matching(spec, a, b)`` end to end (validation, setup, all sweeps;
float32 weights, so float32 costs; the default is the paper's plain algorithm; rows for the
optional ``greedy=True`` first sweep and ``dtype=torch.float64`` too)
against ``rebasin.PermutationCoordinateDescent(...).calculate_permutations()`` (its graph
tracing in ``__init__`` is *not* timed, which favours rebasin; it is reported separately).
Both run to convergence (max 100 sweeps). The objective J = sum over weights (BN running
statistics excluded) of <A, pi(B)> is computed by the same function for both results, and
the permuted rebasin model is checked to compute the same function as model B.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable

import pytest
import torch
from torch import nn

CASES = ("mlp512", "resnet20x4")


def make_case(name: str) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """Two models of the case (seeds 0 and 1) and an example input."""
    from pymerge.testing.models import MLP, ResNet20

    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        if name == "mlp512":
            m = MLP(40, (512, 512, 512), 10)
        elif name == "resnet20x4":
            m = ResNet20(width_multiplier=4)
            with torch.no_grad():
                for mod in m.modules():
                    if isinstance(mod, nn.BatchNorm2d):
                        mod.weight.uniform_(0.5, 1.5)
                        mod.bias.normal_(0.0, 0.1)
        else:
            raise ValueError(f"unknown case {name!r}; use one of {CASES}")
        models.append(m.eval())
    x = torch.randn(2, 40) if name == "mlp512" else torch.randn(2, 3, 32, 32)
    return models[0], models[1], x


def run_pymerge(ma: nn.Module, mb: nn.Module, **kw) -> tuple[float, float]:
    """(seconds, objective) of one full pymerge weight matching."""
    from pymerge.align import weight_matching

    spec = ma.spec()
    a, b = ma.state_dict(), mb.state_dict()
    t0 = time.perf_counter()
    res = weight_matching(spec, a, b, **kw)
    return time.perf_counter() - t0, res.objective


def run_rebasin(ma: nn.Module, mb: nn.Module, x: torch.Tensor) -> tuple[float, float, float]:
    """(seconds of calculate_permutations, objective, seconds of the untimed tracing)."""
    import rebasin

    from pymerge.align import matching_objective

    mb2 = copy.deepcopy(mb)
    torch.manual_seed(0)  # rebasin draws its group order from the global generator
    t0 = time.perf_counter()
    pcd = rebasin.PermutationCoordinateDescent(ma, mb2, x)
    t1 = time.perf_counter()
    pcd.calculate_permutations(100)
    t2 = time.perf_counter()
    pcd.apply_permutations()
    with torch.no_grad():
        if not torch.allclose(mb2(x), mb(x), atol=1e-4, rtol=1e-4):
            raise AssertionError("rebasin's permuted model computes a different function")
    obj = matching_objective(ma.spec(), ma.state_dict(), mb2.state_dict())
    return t2 - t1, obj, t1 - t0


# --------------------------------------------------------------------------- pytest-benchmark


@pytest.fixture(scope="module", params=CASES)
def case(request):
    return request.param, make_case(request.param)


def test_pymerge(benchmark, case):
    name, (ma, mb, _) = case
    from pymerge.align import weight_matching

    spec, a, b = ma.spec(), ma.state_dict(), mb.state_dict()
    benchmark.group = f"weight matching {name}"
    benchmark.pedantic(lambda: weight_matching(spec, a, b), rounds=5, iterations=1, warmup_rounds=1)


def test_rebasin(benchmark, case):
    pytest.importorskip("rebasin")
    name, (ma, mb, x) = case
    import rebasin

    benchmark.group = f"weight matching {name}"

    def setup():
        torch.manual_seed(0)
        pcd = rebasin.PermutationCoordinateDescent(ma, copy.deepcopy(mb), x)
        return (pcd,), {}

    benchmark.pedantic(
        lambda pcd: pcd.calculate_permutations(100), setup=setup, rounds=3, iterations=1
    )


# --------------------------------------------------------------------------- script


def _median(fn: Callable[[], tuple], repeats: int) -> tuple[float, tuple]:
    times, last = [], ()
    for _ in range(repeats):
        out = fn()
        times.append(out[0])
        last = out
    return statistics.median(times), last


def main() -> None:
    p = argparse.ArgumentParser(description="pymerge vs rebasin weight matching")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rebasin-repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--cases", default=",".join(CASES))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    header = f"{'case':<12}{'implementation':<28}{'median s':>10}{'objective':>16}{'speed-up':>10}"
    print(header)
    print("-" * len(header))
    for name in args.cases.split(","):
        ma, mb, x = make_case(name)
        run_pymerge(ma, mb)  # warm-up (imports, allocator)
        t_pm, (_, obj_pm) = _median(lambda ma=ma, mb=mb: run_pymerge(ma, mb), args.repeats)
        t_pp, (_, obj_pp) = _median(
            lambda ma=ma, mb=mb: run_pymerge(ma, mb, greedy=True), args.repeats
        )
        t_64, (_, obj_64) = _median(
            lambda ma=ma, mb=mb: run_pymerge(ma, mb, dtype=torch.float64), args.repeats
        )
        t_rb, (_, obj_rb, t_trace) = _median(
            lambda ma=ma, mb=mb, x=x: run_rebasin(ma, mb, x), args.rebasin_repeats
        )
        rows = [
            ("pymerge (default)", t_pm, obj_pm),
            ("pymerge (greedy=True)", t_pp, obj_pp),
            ("pymerge (float64)", t_64, obj_64),
            (f"rebasin (+{t_trace:.2f}s trace)", t_rb, obj_rb),
        ]
        for impl, t, obj in rows:
            print(f"{name:<12}{impl:<28}{t:>10.3f}{obj:>16.4f}{t_rb / t:>9.1f}x")
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
