"""CPU benchmarks: state-dict interpolation against peers.

``pymerge`` is the automatic choice (the C++ multi-tensor loops of ``pymerge._multi_tensor``
for CPU tensors); ``pymerge-torch`` forces the torch fallback.
Peers: a ``torch._foreach_*`` implementation (``_foreach_mul`` + ``_foreach_add_``), a naive
per-key loop, and for permuted interpolation gather-then-lerp (``index_select`` per permuted
axis, then ``torch.lerp`` per key and alpha).

    pytest bench/bench_interpolate.py --benchmark-only      # pytest-benchmark
    python bench/bench_interpolate.py                       # table of medians and ratios
    python bench/bench_interpolate.py --threads=1 resnet    # one thread, cases matching 'resnet'
    python bench/bench_interpolate.py --threads=1 --cold    # one call per turn (cold caches)
    python bench/bench_interpolate.py --budget=4 interp     # 4 s per case: steadier medians
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from collections.abc import Callable

import pytest
import torch

from pymerge.ops import interpolate, permuted_interpolate

# ----------------------------------------------------------------------------- models


def resnet_like(seed: int, dtype=torch.float32) -> tuple[dict, dict]:
    """CIFAR ResNet-20-like state dict (~100 tensors, 0.27M params) and its permuted axes."""
    g = torch.Generator().manual_seed(seed)
    sd, spec = {}, {}
    widths = [16] * 7 + [32] * 6 + [64] * 6
    cin, prev = 3, None
    for i, c in enumerate(widths):
        perm = torch.randperm(c, generator=g)
        sd[f"l{i}.conv.weight"] = torch.randn(c, cin, 3, 3, generator=g).to(dtype)
        spec[f"l{i}.conv.weight"] = ((0, perm),) + (((1, prev),) if prev is not None else ())
        for n in ("weight", "bias", "running_mean", "running_var"):
            sd[f"l{i}.bn.{n}"] = torch.randn(c, generator=g).to(dtype)
            spec[f"l{i}.bn.{n}"] = ((0, perm),)
        sd[f"l{i}.bn.num_batches_tracked"] = torch.tensor(100)
        cin, prev = c, perm
    sd["fc.weight"] = torch.randn(10, 64, generator=g).to(dtype)
    spec["fc.weight"] = ((1, prev),)
    sd["fc.bias"] = torch.randn(10, generator=g).to(dtype)
    return sd, spec


def transformer_like(seed: int, dtype=torch.float32, d: int = 256, layers: int = 4):
    """GPT-like state dict (~50 tensors, 3.4M params) with the residual stream permuted."""
    g = torch.Generator().manual_seed(seed)
    res = torch.randperm(d, generator=g)
    sd = {"emb.weight": torch.randn(1000, d, generator=g).to(dtype)}
    spec = {"emb.weight": ((1, res),)}
    for layer in range(layers):
        hid = torch.randperm(4 * d, generator=g)
        shapes = {
            "ln1.weight": ((d,), ((0, res),)),
            "ln1.bias": ((d,), ((0, res),)),
            "attn.in_proj_weight": ((3 * d, d), ((1, res),)),
            "attn.in_proj_bias": ((3 * d,), ()),
            "attn.out_proj.weight": ((d, d), ((0, res),)),
            "attn.out_proj.bias": ((d,), ((0, res),)),
            "ln2.weight": ((d,), ((0, res),)),
            "ln2.bias": ((d,), ((0, res),)),
            "fc1.weight": ((4 * d, d), ((0, hid), (1, res))),
            "fc1.bias": ((4 * d,), ((0, hid),)),
            "fc2.weight": ((d, 4 * d), ((0, res), (1, hid))),
            "fc2.bias": ((d,), ((0, res),)),
        }
        for name, (shape, axes) in shapes.items():
            key = f"blk{layer}.{name}"
            sd[key] = torch.randn(shape, generator=g).to(dtype)
            if axes:
                spec[key] = axes
    return sd, spec


MODELS = {"resnet20": resnet_like, "transformer": transformer_like}

# ----------------------------------------------------------------------------- peers


def foreach_weighted_sum(states, weights):
    keys = [k for k, v in states[0].items() if v.is_floating_point()]
    lists = [[s[k] for k in keys] for s in states]
    acc = torch._foreach_mul(lists[0], weights[0])
    for lst, w in zip(lists[1:], weights[1:], strict=True):
        torch._foreach_add_(acc, lst, alpha=w)
    out = {k: v.clone() for k, v in states[0].items() if not v.is_floating_point()}
    out.update(zip(keys, acc, strict=True))
    return out


def naive_weighted_sum(states, weights):
    out = {}
    for k, v in states[0].items():
        if v.is_floating_point():
            out[k] = sum(w * s[k] for w, s in zip(weights, states, strict=True))
        else:
            out[k] = v.clone()
    return out


def gather_then_lerp(a, b, alphas, spec):
    """Materialise pi(B) per key, then torch.lerp per alpha (gather once for all alphas)."""
    bp = {}
    for k, v in b.items():
        for axis, idx in spec.get(k, ()):
            v = v.index_select(axis, idx)
        bp[k] = v
    return [
        {k: torch.lerp(a[k], bp[k], al) if a[k].is_floating_point() else a[k].clone() for k in a}
        for al in alphas
    ]


# ----------------------------------------------------------------------------- cases


def cases() -> dict[str, dict[str, Callable[[], object]]]:
    """name -> {implementation -> thunk}; 'pymerge' first."""
    out = {}
    for mname, make in MODELS.items():
        for dtype in (torch.float32, torch.bfloat16):
            dn = str(dtype).removeprefix("torch.")
            s = [make(i, dtype)[0] for i in range(3)]
            for wname, states, w in (
                ("lerp K=2", s[:2], [0.4, 0.6]),
                ("general K=3", s, [0.2, -0.7, 1.3]),
                ("task-arith K=3", s, [1.0, 0.5, 0.5]),
            ):
                out[f"interp {mname} {dn} {wname}"] = {
                    "pymerge": lambda st=states, w=w: interpolate(st, w),
                    "pymerge-torch": lambda st=states, w=w: interpolate(st, w, backend="torch"),
                    "foreach": lambda st=states, w=w: foreach_weighted_sum(st, w),
                    "naive": lambda st=states, w=w: naive_weighted_sum(st, w),
                }
            a, _ = make(0, dtype)
            b, spec = make(1, dtype)
            for alphas in ([0.5], [i / 24 for i in range(25)]):
                out[f"permuted {mname} {dn} {len(alphas)} alpha"] = {
                    "pymerge": lambda a=a, b=b, al=alphas, sp=spec: permuted_interpolate(
                        a, b, al, sp
                    ),
                    "pymerge-torch": lambda a=a, b=b, al=alphas, sp=spec: permuted_interpolate(
                        a, b, al, sp, backend="torch"
                    ),
                    "gather-then-lerp": lambda a=a, b=b, al=alphas, sp=spec: gather_then_lerp(
                        a, b, al, sp
                    ),
                }
    return out


_CASES = cases()
_PARAMS = [(c, impl) for c, impls in _CASES.items() for impl in impls]


@pytest.mark.parametrize(("case", "impl"), _PARAMS, ids=[f"{c}-{i}" for c, i in _PARAMS])
def test_bench_interpolate(benchmark, case, impl):
    benchmark.group = case
    benchmark(_CASES[case][impl])


def _interleaved(
    impls: dict[str, Callable[[], object]],
    budget_s: float = 1.5,
    max_rounds: int = 301,
    block: int = 5,
):
    """Per-implementation (median, min) per-call time in microseconds.

    Round-robin over the implementations (shuffled each round) so that load changes on a
    shared machine hit every implementation alike. ``block`` > 1: each turn makes one
    untimed call and then ``block`` timed ones (steady state: caches and allocator warm
    for the implementation being timed); ``block=1``: one timed call per turn, right after
    another implementation ran (cold caches: every call pays for what the previous
    implementation evicted)."""
    for fn in impls.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in impls}
    start = time.perf_counter()
    rounds = 0
    order = list(impls.items())
    rng = random.Random(0)
    while rounds < max_rounds and (time.perf_counter() - start < budget_s or rounds < 5):
        rng.shuffle(order)  # no implementation always runs right after the same other one
        for name, fn in order:
            if block > 1:
                fn()
            for _ in range(block):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {n: (statistics.median(t) * 1e6, min(t) * 1e6) for n, t in times.items()}


def main() -> None:
    args = sys.argv[1:]
    if args and args[0].startswith("--threads="):
        # on a shared, oversubscribed machine OpenMP barriers wait for descheduled threads;
        # --threads=1 gives steadier figures
        torch.set_num_threads(int(args.pop(0).split("=", 1)[1]))
    cold = "--cold" in args
    budget = 1.5
    for a in [a for a in args if a.startswith("--budget=")]:
        budget = float(a.split("=", 1)[1])  # seconds per case (more: steadier medians)
    only = [a for a in args if not a.startswith("--")]  # optional substrings selecting cases
    mode = "cold (one call per turn)" if cold else "steady state (blocks of 5 calls)"
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {mode}")
    print(
        f"{'case':44s} {'impl':17s} {'median us':>10s} {'min us':>9s} {'peer/pymerge':>13s}"
        f" {'(of mins)':>10s}"
    )
    for case, impls in _CASES.items():
        if only and not any(o in case for o in only):
            continue
        res = _interleaved(impls, budget, block=1) if cold else _interleaved(impls, budget)
        base, base_min = res["pymerge"]
        for impl, (med, mn) in res.items():
            ratio = "" if impl == "pymerge" else f"{med / base:13.2f} {mn / base_min:10.2f}"
            print(f"{case:44s} {impl:17s} {med:10.0f} {mn:9.0f} {ratio}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
