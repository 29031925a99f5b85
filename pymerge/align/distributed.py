"""Weight matching over ``torch.distributed`` ranks: parameters sharded, costs all-reduced.

Each rank builds the cost terms of only the parameters it owns (:func:`shard_keys`: a
greedy balance of their sizes, the same on every rank), from in-memory or lazy state dicts
(each rank may read its own parameters from shared storage: nothing else is read). Before
each unit's assignment the ranks sum its partial costs with **one all-reduce** (all the
unit's groups in one buffer) and every rank solves the same summed matrix, so every rank
takes the same steps and ends with the same permutation; the objective is all-reduced the
same way. Any backend that reduces CPU tensors works (``gloo``; tested with 2 processes).

The permutation equals the single-process one up to the order of floating-point sums
(each rank's partial sums, then the reduction): identical on the tested models, and for
costs built in float64 the sums differ by round-off only.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from pymerge._util.args import check_int, check_seed
from pymerge.align._costs import CostBuilder, is_lazy, meta_view
from pymerge.align.result import AlignmentResult
from pymerge.align.weight_matching import run_matching
from pymerge.spec.spec import PermutationSpec

__all__ = ["distributed_weight_matching", "shard_keys", "collective_check"]


def _dist():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group "
            "(e.g. backend='gloo') first, or run under torchrun"
        )
    return dist


def shard_keys(
    sizes: Mapping[str, int], world_size: int, rank: int | None = None
) -> list[str] | list[list[str]]:
    """Split keys over ``world_size`` ranks, balancing the summed ``sizes`` (largest first,
    each to the least loaded rank; ties by key, so every rank computes the same split).
    Returns rank ``rank``'s keys, or every rank's list when ``rank`` is None."""
    loads = [0] * world_size
    out: list[list[str]] = [[] for _ in range(world_size)]
    for key in sorted(sizes, key=lambda k: (-sizes[k], k)):
        r = min(range(world_size), key=lambda i: (loads[i], i))
        out[r].append(key)
        loads[r] += sizes[key]
    return out if rank is None else out[rank]


def collective_check(fn, *, group: Any = None):
    """Run ``fn()`` on every rank; if it raised on any rank, raise on every rank (the
    failing rank's own error there, the first failure's message elsewhere) so that no rank
    waits forever in a collective the others left."""
    dist = _dist()
    error: BaseException | None = None
    result = None
    try:
        result = fn()
    except Exception as exc:  # re-raised below, on every rank
        error = exc
    flags = [None] * dist.get_world_size(group)
    mine = None if error is None else f"{type(error).__name__}: {error}"
    dist.all_gather_object(flags, mine, group=group)
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(flags) if m is not None]
    if failed:
        r, m = failed[0]
        kind, _, text = m.partition(": ")
        exc_type = ValueError if kind == "ValueError" else RuntimeError
        raise exc_type(f"rank {r} failed: {text}")
    return result


def distributed_weight_matching(
    spec: PermutationSpec,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    *,
    group: Any = None,
    owned: Iterable[str] | None = None,
    max_iter: int = 100,
    init: Mapping[str, Tensor] | AlignmentResult | None = None,
    seed: int = 0,
    greedy: bool = False,
    groups: Iterable[str] | None = None,
    tol: float | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    backend: str | None = None,
) -> AlignmentResult:
    """:func:`~pymerge.align.weight_matching` with the cost terms sharded over the ranks of
    ``group`` (the default process group when None); call it on every rank with the same
    arguments. ``owned``: this rank's parameters (default :func:`shard_keys` by size).
    ``progress`` shows a bar on rank 0 only. Returns the same :class:`AlignmentResult` on
    every rank (``extras["owned"]``: this rank's parameters)."""
    dist = _dist()
    max_iter = check_int(max_iter, "max_iter", minimum=0)
    seed = check_seed(seed)
    if dtype not in (None, torch.float64, torch.float32):
        raise ValueError(f"dtype must be torch.float64, torch.float32 or None, got {dtype}")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    t0 = time.perf_counter()
    if owned is None:
        meta = meta_view(state_a) if is_lazy(state_a) else state_a
        sizes = {
            k: v.numel() for k, v in meta.items() if isinstance(v, Tensor) and k not in spec.no_cost
        }
        owned = shard_keys(sizes, world, rank)
    owned = list(owned)

    def reduce(t: Tensor) -> Tensor:
        out = t.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    costs = collective_check(
        lambda: CostBuilder(spec, state_a, state_b, dtype, owned=owned, reduce=reduce),
        group=group,
    )
    result = run_matching(
        costs,
        max_iter=max_iter,
        init=init,
        seed=seed,
        greedy=greedy,
        groups=groups,
        tol=tol,
        progress=progress and rank == 0,
        backend=backend,
        started=t0,
    )
    result.extras["owned"] = owned
    return result
