"""Interpolation over whole state dicts: weighted sums and permuted lerps.

``interpolate(states, weights)`` returns ``sum_k w_k * theta_k`` for every tensor of K
state dicts; ``permuted_interpolate(a, b, alpha, spec_axes)`` returns
``(1 - alpha) * theta_A + alpha * pi(theta_B)`` where ``pi`` gathers B along permuted axes
while reading (``pi(theta_B)`` is never materialised by the Triton path), for one alpha or
many at once (one read of A and B per tile, every alpha written).

Backends (``pymerge._backend.choose_kernels``): Triton for CUDA tensors (one launch per
dtype group, however many tensors); for CPU tensors ``interpolate`` runs the C++ loops of
``pymerge._multi_tensor`` ("native": one call per dtype group, each element read once per
state and written once) where torch would need several ops per tensor (see
``_native_wins``), and the C++ permuted lerp for
``permuted_interpolate`` (B gathered while reading, every alpha written per read); torch
(``torch._foreach_*`` ops) is the fallback everywhere, and ``backend=`` forces any of them.

Rules shared by both functions:

* **Floating entries** (fp16/bf16/fp32; fp64 and other floating dtypes always take the torch
  path) are combined, **accumulating in fp32 on every path**: no partial sum is rounded to
  fp16/bf16, so a sum whose value fits the output dtype is finite whichever path runs (an
  fp16 ``40000 + 40000 - 40000`` is ``40000``, not ``inf``). Triton and native compute
  ``acc = 0; acc += w_k * x_k`` in fp32 in k order and round once to the output dtype. The
  torch path computes each op in fp32 (torch's "opmath") and rounds once for K=1, for K=2
  with ``w_0 + w_1 == 1`` (``torch.lerp``) and for ``permuted_interpolate`` (``lerp``); for
  other weights it accumulates fp16/bf16 inputs in fp32 tensors (upcast once) and rounds
  once at the end, and fp32 inputs in fp32 (up to K fp32 roundings, as native). Paths may
  differ in the last bits (op order, FMA, and ``lerp``'s ``a + w (b - a)`` against
  ``(1 - w) a + w b``, which also overflows fp32 where ``|b - a|`` exceeds its range, i.e.
  only for fp32/bf16 values beyond 1.7e38), never in range otherwise.
* **Weights and alphas** are applied as fp32 values (rounded to fp32 first) on both paths
  (fp64 tensors, which always take the torch path: as fp64 values).
* **Non-floating entries** (e.g. BatchNorm's ``num_batches_tracked``) are copied (cloned)
  from the first state dict (``state_a``); their shape and dtype must match across state
  dicts but their values may differ. Complex tensors are rejected.
* **NaN/inf** propagate as in IEEE arithmetic (as torch does): an output element is
  non-finite wherever a contributing input element is non-finite, even when its weight is
  0 (``0 * inf = nan``); other elements are unaffected.
* Inputs are never modified and outputs never alias inputs.
* Not differentiable: both backends compute under ``torch.no_grad()`` and return tensors
  that do not require grad (for gradients through an interpolation, e.g. straight-through
  estimators, use torch ops directly).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from itertools import compress
from typing import Any

import torch
from torch.utils.dlpack import to_dlpack

from pymerge._backend import _requested, choose_kernels, native_multi_tensor
from pymerge._util.cache import LRUCache
from pymerge._util.checks import StateDict, check_states
from pymerge.ops._groups import as_floats, check_out_dtype, copies, group
from pymerge.ops._perm_axes import clear_cache as clear_index_cache
from pymerge.ops._perm_axes import normalise_axes
from pymerge.ops._perm_maps import build_maps, matrix_view

IndexLike = torch.Tensor | Sequence[int]
AxisSpec = Sequence[tuple[int, Any]]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ALIGN_BYTES = 16

__all__ = ["interpolate", "permuted_interpolate"]


# ----------------------------------------------------------------------------- helpers

# unbound methods, mapped over whole lists (no per-call attribute lookup)
_NUMEL = torch.Tensor.numel
_DIM = torch.Tensor.dim
# checked buffers for the C++ loops: a DLPack capsule costs ~0.16 us per tensor, a NumPy
# view 0.5-1 us (the module takes both and checks each one's size, dtype and layout)
_DLPACK = to_dlpack
_NO_BUFFER = (RuntimeError, BufferError, TypeError)
_IS_CONTIGUOUS = torch.Tensor.is_contiguous
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation (tests replace it with a NaN-filled one to poison outputs)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _map_entries(value: tuple) -> int:
    """int64 entries held by a ``_MAPS`` value ``(indices, (rowmap, colmap), runs, plan)``."""
    _, (r, c), runs, plan = value
    n = r.numel() + c.numel() + (0 if runs is None else runs.numel())
    return n + (0 if plan is None else plan.nbytes // 8)


# (device, values) -> fp32 device tensor: repeated calls with the same weights/alphas
_FLOATS = LRUCache(64)
# (shape, ((axis, id(cpu index)), ...)) -> (cpu indices kept alive, (rowmap, colmap), runs,
# native plan); at most 2**25 int64 entries (256 MiB) of maps
_MAPS = LRUCache(1 << 16, max_cost=1 << 25, cost=_map_entries)
# the Triton kernels' launch tables (the kernels keep no cache of their own)
_KERNEL_TABLES = {"weighted": LRUCache(16), "permuted": LRUCache(8)}


def clear_caches() -> None:
    """Forget cached weights, validated indices, gather maps and kernel launch tables."""
    for cache in (_FLOATS, _MAPS, *_KERNEL_TABLES.values()):
        cache.clear()
    clear_index_cache()


def _device_floats(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """fp32 tensor of ``values`` on ``device``; cached, and copied asynchronously from pinned
    memory on CUDA (a pageable host-to-device copy would wait for the stream)."""
    key = (device, tuple(values))
    hit = _FLOATS.get(key)
    if hit is None:
        host = torch.tensor(values, dtype=torch.float32)
        if device.type == "cuda":
            host = host.pin_memory()
        hit = host.to(device, non_blocking=True)
        _FLOATS.put(key, hit)
    return hit


def _on(device: torch.device):
    """Launch context: Triton launches on the current CUDA device, so make it ``device``."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _kernel_ready(t: torch.Tensor) -> torch.Tensor:
    """Contiguous, 16-byte aligned, no lazy negation (copy only when it is not)."""
    if t.is_neg():  # torch._neg_view: the memory holds -t
        t = t.resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.data_ptr() % _ALIGN_BYTES:
        t = t.clone()
    return t


def _flat_layout(numels: Sequence[int], dtype: torch.dtype) -> tuple[list[int], int]:
    """Aligned offsets of each tensor in one flat buffer, and the buffer length."""
    step = max(1, _ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())
    offsets, total = [], 0
    for n in numels:
        offsets.append(total)
        total += -(-n // step) * step
    return offsets, -(-total // 16) * 16  # row stride of [M, total] divisible by 16


# ----------------------------------------------------------------------------- interpolate


def _factor(w: float, tensors: Sequence[torch.Tensor]) -> float | torch.Tensor:
    """Multiplier for ``torch._foreach_mul``: on CPU a 0-d tensor is faster than a Python
    scalar (no per-tensor scalar wrapping) and gives the same results (fp32/fp64: same dtype;
    fp16/bf16: an fp32 factor, which torch reads in fp32, but only when no input is 0-d, as
    two 0-d tensors would promote to fp32); otherwise the Python scalar."""
    like = tensors[0]
    if not like.is_cpu:
        return w
    if like.dtype in (torch.float32, torch.float64):
        return torch.tensor(w, dtype=like.dtype)
    if like.dtype in (torch.float16, torch.bfloat16) and all(map(torch.Tensor.dim, tensors)):
        return torch.tensor(w, dtype=torch.float32)
    return w


_HALF = (torch.float16, torch.bfloat16)


def _interp_torch(lists: list[list[torch.Tensor]], w: list[float], out_dtype) -> list[torch.Tensor]:
    in_dtype = lists[0][0].dtype
    K = len(lists)
    lerp = K == 2 and w[0] == 1.0 - w[1]
    cdt = torch.promote_types(in_dtype, out_dtype)
    if K == 1 or lerp:  # one op, computed in fp32 (opmath) and rounded once
        if cdt != in_dtype:
            lists = [[t.to(cdt) for t in lst] for lst in lists]
        if K == 1:
            res = torch._foreach_mul(lists[0], _factor(w[0], lists[0]))
        else:
            res = torch._foreach_lerp(*lists, w[1])
    else:
        if cdt in _HALF:
            cdt = torch.float32  # several terms: accumulate in fp32, round once at the end
        # the first term: a plain state when some weight is 1 (task arithmetic: base + sum of
        # scaled vectors, no multiply); then the other terms in order
        j = w.index(1.0) if 1.0 in w else 0
        rest = [k for k in range(K) if k != j]
        if cdt != in_dtype:  # fresh accumulators of the compute dtype, updated in place
            res = [t.to(cdt) for t in lists[j]]
            if w[j] != 1.0:
                torch._foreach_mul_(res, w[j])
        elif w[j] == 1.0:
            m = rest.pop(0)
            res = torch._foreach_add(lists[j], lists[m], alpha=w[m])
        else:
            res = torch._foreach_mul(lists[j], _factor(w[j], lists[j]))
        for k in rest:
            torch._foreach_add_(res, lists[k], alpha=w[k])
    if out_dtype != cdt:
        res = [t.to(out_dtype) for t in res]
    return list(res)


def _native_dtypes_fast(in_dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """False for float16 without the AVX2/F16C loops: the portable binary16 conversion is
    integer code, ~20x slower than torch's (and False when the loops are not built)."""
    mt = native_multi_tensor()
    if mt is None:
        return False
    return torch.float16 not in (in_dtype, out_dtype) or mt.__simd__ != "scalar"


# Two torch ops per tensor (task arithmetic with K = 3) cost less than the C++ path's fixed
# cost on dicts of small tensors (measured on a ResNet-20 dict, mean 2.8k elements) and
# more on larger ones (a transformer dict, mean 68k): the break-even lies between.
_NATIVE_MIN_MEAN_NUMEL_2OPS = 8192


def _native_wins(
    w: list[float], in_dtype: torch.dtype, out_dtype: torch.dtype, tensors: list[torch.Tensor]
) -> bool:
    """Whether auto should take the C++ loops for ``interpolate`` (a cost model measured with
    ``bench/bench_interpolate.py``, figures in ``bench/RESULTS.md``).

    Torch needs one op per tensor for K = 1 or a two-state lerp (``w0 + w1 == 1``), K - 1
    when a weight is 1 (task arithmetic), K otherwise. One op: torch (its per-tensor ops
    beat the C++ path's fixed cost: pointers, one flat output split into views). Three or
    more: the C++ loops (1.2-1.6x faster). Two: the C++ loops for dicts of larger tensors.
    A dtype conversion (``out_dtype``) adds an op per tensor on the torch path, and so do
    the upcast and the final rounding of fp16/bf16 sums of several terms (fp32 accumulators).
    """
    if not _native_dtypes_fast(in_dtype, out_dtype):
        return False
    K = len(w)
    if K == 1 or (K == 2 and w[0] == 1.0 - w[1]):
        ops = 1
    else:
        ops = K - (1.0 in w)
        if in_dtype in _HALF:
            ops += 2  # fp32 accumulators: an upcast and a final rounding per tensor
    ops += in_dtype != out_dtype
    if ops >= 3:
        return True
    if ops == 2:
        mean = sum(map(_NUMEL, tensors)) / max(1, len(tensors))
        return mean >= _NATIVE_MIN_MEAN_NUMEL_2OPS
    return False


def _permuted_native_wins(
    in_dtype: torch.dtype, out_dtype: torch.dtype, tensors: list[torch.Tensor]
) -> bool:
    """Auto's choice for ``permuted_interpolate``: the C++ loops whenever their dtypes are
    fast (they read A and B once for all alphas and gather while reading; no torch path
    makes fewer passes)."""
    return _native_dtypes_fast(in_dtype, out_dtype)


def _choose(
    backend: str | None,
    in_dtype: torch.dtype,
    out_dtype: torch.dtype,
    tensors: list[torch.Tensor],
    native_wins: Callable[[torch.dtype, torch.dtype, list[torch.Tensor]], bool],
) -> str:
    """Backend for one dtype group: torch for dtypes the fast paths do not handle; else
    ``choose_kernels``, offering the C++ loops when forced or when auto's cost model
    (``native_wins(in_dtype, out_dtype, tensors)``, only evaluated then) expects a win."""
    if in_dtype not in _KERNEL_DTYPES or out_dtype not in _KERNEL_DTYPES:
        return "torch"
    req = _requested(backend)
    native = req == "native" or (req == "auto" and native_wins(in_dtype, out_dtype, tensors))
    return choose_kernels(backend, *tensors, native=native)


_IS_NEG = torch.Tensor.is_neg


def _plain(lst: list[torch.Tensor]) -> list[torch.Tensor]:
    """``lst`` when every tensor's memory holds its values in order (contiguous, no lazy
    negation bit), else copies where needed: what raw-pointer loops may read."""
    if all(map(_IS_CONTIGUOUS, lst)) and not any(map(_IS_NEG, lst)):
        return lst
    return [t.resolve_neg().contiguous() for t in lst]


def _buffers(lst: list[torch.Tensor]) -> list:
    """DLPack capsules of CPU tensors for the C++ loops, lazily negated views resolved first
    (DLPack carries no negation bit: the capsule would expose the memory, ``-t``). The
    module checks everything else (size, dtype, contiguity, alignment, device) and raises
    ``NotContiguousError`` for strided tensors: see ``_native_call``."""
    if any(map(_IS_NEG, lst)):
        lst = [t.resolve_neg() for t in lst]
    return list(map(_DLPACK, lst))


def _threads(mt) -> int:
    """torch's intra-op thread count, within what the C++ loops accept."""
    return min(torch.get_num_threads(), mt._max_threads)


def _native_call(fn: Callable[[list], Any], lists: list[list[torch.Tensor]]) -> bool:
    """``fn(capsules of each list)``; False when a tensor has no plain storage to export (the
    caller then takes the torch path). Strided tensors (channels_last, transposes) are found
    by the C++ checks, and only then copied contiguous: checking contiguity here as well
    would cost a pass over every tensor of every call."""
    try:
        bufs = list(map(_buffers, lists))
    except _NO_BUFFER:  # no plain storage (functorch / fake tensors)
        return False
    try:
        fn(bufs)
    except native_multi_tensor().NotContiguousError:
        fn(list(map(_buffers, map(_plain, lists))))
    return True


def _views_like(flat: torch.Tensor, numels: list[int], like: list[torch.Tensor]) -> list:
    """Consecutive parts of the 1-D ``flat`` shaped as ``like`` (``view_as`` parses no size
    argument: ~3x cheaper than ``view(t.shape)``; 1-D parts need no view at all)."""
    return [
        part if nd == 1 else part.view_as(t)
        for part, nd, t in zip(flat.split(numels), map(_DIM, like), like, strict=True)
    ]


def _by_alpha(per_key: list, M: int) -> list[list[torch.Tensor]]:
    """``per_key[t][m]`` (M views per key) regrouped as one list of tensors per alpha."""
    return [list(col) for col in zip(*per_key, strict=True)] if per_key else [[] for _ in range(M)]


def _interp_native(
    lists: list[list[torch.Tensor]], w: list[float], out_dtype: torch.dtype
) -> list[torch.Tensor] | None:
    """C++ weighted sum of CPU tensors into one flat buffer (outputs are views of it);
    ``None`` when a tensor has no plain storage to read (e.g. a tensor subclass)."""
    first = lists[0]
    numels = list(map(_NUMEL, first))
    out = _empty((sum(numels),), out_dtype, torch.device("cpu"))
    mt = native_multi_tensor()
    ok = _native_call(
        lambda bufs: mt.weighted_sum(
            bufs,
            _DLPACK(out),
            w,
            _DTYPE_NAMES[first[0].dtype],
            _DTYPE_NAMES[out_dtype],
            _threads(mt),
        ),
        lists,
    )
    if not ok:
        return None
    return _views_like(out, numels, first)


def _interp_triton(
    lists: list[list[torch.Tensor]], w: list[float], out_dtype, device
) -> list[torch.Tensor]:
    from pymerge.kernels import interpolate as kern

    T = len(lists[0])
    rows = [[_kernel_ready(lst[i]) for lst in lists] for i in range(T)]
    numels = [r[0].numel() for r in rows]
    offsets, total = _flat_layout(numels, out_dtype)
    out = _empty((total,), out_dtype, device)
    wt = _device_floats(w, device)
    with _on(device):
        kern.weighted_sum_(rows, wt, out, offsets, cache=_KERNEL_TABLES["weighted"])
    return [out[o : o + n].view(r[0].shape) for o, n, r in zip(offsets, numels, rows, strict=True)]


@torch.no_grad()
def interpolate(
    states: Sequence[StateDict],
    weights: Sequence[float] | torch.Tensor,
    *,
    backend: str | None = None,
    out_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Weighted sum ``sum_k weights[k] * states[k][key]`` for every key of K state dicts.

    Args:
        states: K >= 1 state dicts with the same keys, shapes, dtypes and devices.
        weights: K floats (or a 1-D tensor); they need not sum to 1 (task arithmetic).
        backend: ``None``/``"auto"``, ``"torch"``, ``"native"`` (CPU tensors) or
            ``"triton"`` (see ``pymerge._backend``).
        out_dtype: dtype of the floating outputs (default: each tensor's own dtype).
    Returns:
        A new state dict (same key order as ``states[0]``). Floating entries have the same
        shape as the inputs (the Triton and native paths return contiguous views of one
        flat buffer per dtype); non-floating entries are clones of ``states[0]``'s.
    Raises:
        ValueError: empty ``states``, mismatched keys/shapes/dtypes/devices (naming the
            key), ``len(weights) != len(states)``.
        TypeError: non-tensor values, complex tensors, non-numeric weights, bad out_dtype.
    """
    if isinstance(states, Mapping):
        raise TypeError("states must be a sequence of state dicts, not a single state dict")
    states = list(states)
    names = [f"states[{i}]" for i in range(len(states))]
    keys, lists_all, dtypes, devices = check_states(states, names)
    w = as_floats(weights, "weights")
    if len(w) != len(states):
        raise ValueError(f"got {len(w)} weights for {len(states)} state dicts")
    check_out_dtype(out_dtype)
    first = lists_all[0]
    groups, others = group(dtypes, devices, first, out_dtype)
    out = dict.fromkeys(keys)  # key order of states[0]; every value is replaced below
    for mask in others:
        out.update(zip(compress(keys, mask), copies(list(compress(first, mask))), strict=True))
    for (device, in_dtype, od), mask in groups:
        if mask is None:
            lists, group_keys = lists_all, keys
        else:
            lists = [list(compress(lst, mask)) for lst in lists_all]
            group_keys = compress(keys, mask)
        use = _choose(backend, in_dtype, od, lists[0], partial(_native_wins, w))
        res = None
        if use == "triton":
            res = _interp_triton(lists, w, od, device)
        elif use == "native":
            res = _interp_native(lists, w, od)
        if res is None:
            res = _interp_torch(lists, w, od)
        out.update(zip(group_keys, res, strict=True))
    return out


# ----------------------------------------------------------------------------- permuted


def _perm_torch(
    a_list, b_list, axes_list, alphas: list[float], out_dtype
) -> list[list[torch.Tensor]]:
    in_dtype = a_list[0].dtype
    cdt = torch.promote_types(in_dtype, out_dtype)
    bp = []
    for b, axes in zip(b_list, axes_list, strict=True):
        for axis, idx in axes:
            b = b.index_select(axis, idx.to(b.device))
        bp.append(b)
    if cdt != in_dtype:
        a_list = [t.to(cdt) for t in a_list]
        bp = [t.to(cdt) for t in bp]
    res = []
    for al in alphas:
        r = torch._foreach_lerp(a_list, bp, al)
        if out_dtype != cdt:
            r = [t.to(out_dtype) for t in r]
        res.append(list(r))
    return res


def _gather_entry(shape: torch.Size, axes) -> tuple:
    """Cached ``(indices, (rowmap, colmap), column runs or None, native plan or None)`` for
    ``b.index_select(ax, idx)...`` (``build_maps``; the entry keeps the indices alive, so
    their ids stay unique while it lives). The plan is the ``_multi_tensor.GatherPlan`` that
    ``permuted_lerp`` takes for the tensor (maps validated and copied by the C++ module once,
    here), ``None`` when the module is not built."""
    mk = (tuple(shape), tuple((ax, id(i)) for ax, i in axes))
    hit = _MAPS.get(mk)
    if hit is None:
        rmap, cmap = build_maps(shape, axes)
        runs = _column_runs(cmap)
        plan = None
        mt = native_multi_tensor()
        if mt is not None:
            R, C = matrix_view(shape)
            permuted = {ax for ax, _ in axes}
            col_permuted = bool(permuted - {0}) or len(shape) <= 1
            use_runs = col_permuted and runs is not None
            plan = mt.GatherPlan(
                R,
                C,
                rowmap=rmap.numpy() if 0 in permuted and len(shape) > 1 else None,
                colmap=cmap.numpy() if col_permuted and not use_runs else None,
                runs=runs.numpy() if use_runs else None,
            )
        hit = (tuple(i for _, i in axes), (rmap, cmap), runs, plan)
        _MAPS.put(mk, hit)
    return hit


_MIN_MEAN_RUN = 4  # shorter runs: a plain per-element gather is cheaper
# new outputs of permuted_lerp in one [M, total] buffer up to this size (glibc's largest
# mmap threshold: a freed block this size is reused from the heap), else one per alpha
_ONE_BUFFER_BYTES = 32 << 20
_ITEMSIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


def _column_runs(colmap: torch.Tensor) -> torch.Tensor | None:
    """``int64 [n, 3]`` (first column, source column, length) of the maximal runs where
    ``colmap`` steps by +1 (e.g. the 3x3 kernels of a conv whose input channels are
    permuted), or ``None`` when runs are too short on average to be worth it."""
    C = colmap.numel()
    if C == 0:
        return None
    starts = torch.nonzero(torch.diff(colmap) != 1).reshape(-1).add_(1)
    n = starts.numel() + 1
    if C < _MIN_MEAN_RUN * n:
        return None
    first = torch.cat([torch.zeros(1, dtype=torch.int64), starts])
    length = torch.diff(first, append=torch.tensor([C]))
    return torch.stack([first, colmap[first], length], 1).contiguous()


def _perm_native(
    a_list, b_list, axes_list, alphas: list[float], out_dtype, outs=None
) -> list[list[torch.Tensor]] | None:
    """C++ permuted lerp of CPU tensors; ``None`` when a tensor has no plain storage to read.

    ``outs=None``: new outputs, views of one ``[M, total]`` buffer when it holds at most
    ``_ONE_BUFFER_BYTES`` (one split and one unbind per key make all M views), else of one
    flat buffer per alpha: a single allocation above glibc's largest mmap threshold (32 MiB)
    is mapped afresh on every call and faults on each of its pages (measured: 25 alphas of a
    2.1M-parameter dict, 155 ms in one buffer against 11 ms in 25). ``outs``: M lists of T
    writable tensors (CPU, ``out_dtype``, contiguous) written in place; ``None`` also when
    they overlap an input or each other (the caller then computes new outputs)."""
    numels = list(map(_NUMEL, a_list))
    plans = [
        _gather_entry(a.shape, axes)[3] if axes else None
        for a, axes in zip(a_list, axes_list, strict=True)
    ]
    mt = native_multi_tensor()
    M, total = len(alphas), sum(numels)
    one = outs is None and M * total * _ITEMSIZE[out_dtype] <= _ONE_BUFFER_BYTES
    if outs is not None:
        bufs = None
        targets: Any = [_DLPACK(t.detach()) for row in outs for t in row]
    elif one:
        bufs = [_empty((M, total), out_dtype, torch.device("cpu"))]
        targets = _DLPACK(bufs[0])
    else:
        bufs = [_empty((total,), out_dtype, torch.device("cpu")) for _ in alphas]
        targets = list(map(_DLPACK, bufs))

    def call(ab):
        mt.permuted_lerp(
            *ab,
            plans,
            targets,
            alphas,
            _DTYPE_NAMES[a_list[0].dtype],
            _DTYPE_NAMES[out_dtype],
            _threads(mt),
        )

    try:
        ok = _native_call(call, [a_list, b_list])
    except ValueError as e:
        if outs is not None and " overlaps " in str(e):
            return None
        raise
    if not ok:
        return None
    if bufs is None:
        return outs
    if not one:
        return [_views_like(buf, numels, a_list) for buf in bufs]
    out = bufs[0]
    if M == 1:
        return [_views_like(out[0], numels, a_list)]
    # one split and one unbind per key (M views each), not M * T slices
    per_key = [
        part.view(M, *a.shape).unbind(0)
        for part, a in zip(out.split(numels, dim=1), a_list, strict=True)
    ]
    return _by_alpha(per_key, M)


def _writable_outs(outs, out_dtype) -> bool:
    """Whether the C++ loops may write ``outs`` (M lists of tensors) directly."""
    return all(
        t.device.type == "cpu" and t.dtype == out_dtype and t.is_contiguous() and not t.is_neg()
        for row in outs
        for t in row
    )


def _perm_triton(
    a_list, b_list, axes_list, alphas: list[float], out_dtype, device
) -> list[list[torch.Tensor]]:
    from pymerge.kernels import permuted_interpolate as kern

    a_list = [_kernel_ready(t) for t in a_list]
    b_list = [_kernel_ready(t) for t in b_list]
    maps = [_gather_entry(a.shape, axes)[1] for a, axes in zip(a_list, axes_list, strict=True)]
    numels = [t.numel() for t in a_list]
    offsets, total = _flat_layout(numels, out_dtype)
    M = len(alphas)
    out = _empty((M, total), out_dtype, device)
    at = _device_floats(alphas, device)
    with _on(device):
        kern.permuted_lerp_(
            a_list, b_list, maps, at, out, offsets, cache=_KERNEL_TABLES["permuted"]
        )
    # one unbind per key (M views in one call) instead of M * T Python-level slices
    per_key = [
        out[:, o : o + n].view(M, *a.shape).unbind(0)
        for o, n, a in zip(offsets, numels, a_list, strict=True)
    ]
    return _by_alpha(per_key, M)


@torch.no_grad()
def permuted_interpolate(
    state_a: StateDict,
    state_b: StateDict,
    alpha: float | Sequence[float] | torch.Tensor,
    spec_axes: Mapping[str, AxisSpec] | Any,
    perm: Mapping[str, torch.Tensor] | None = None,
    *,
    backend: str | None = None,
    out_dtype: torch.dtype | None = None,
    out: Any = None,
) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
    """``(1 - alpha) * state_a + alpha * pi(state_b)``, gathering B's permuted axes on the fly.

    ``pi(B)[key] = B[key].index_select(ax0, idx0).index_select(ax1, idx1)...`` for the
    ``(axis, index)`` pairs of ``spec_axes[key]`` (applied in order); keys not in
    ``spec_axes`` are plain lerps. Endpoints are exact: ``alpha=0`` gives A and ``alpha=1``
    gives ``pi(B)`` (for finite inputs).

    Args:
        state_a, state_b: state dicts with the same keys, shapes, dtypes and devices.
        alpha: a float, or a sequence / 1-D tensor of floats (many alphas in one pass).
        spec_axes: mapping ``param -> ((axis, index), ...)`` with full-length integer
            index tensors (permutations of ``range(shape[axis])``); with ``perm`` given,
            ``param -> ((axis, group), ...)`` and indices come from ``perm[group]``. (For a
            ``PermutationSpec`` use ``pymerge.spec.aligned_interpolate``: this layer knows
            nothing of specs.)
        perm: group name -> index tensor, see ``spec_axes``.
        backend: ``None``/``"auto"``, ``"torch"``, ``"native"`` (CPU tensors) or
            ``"triton"`` (see ``pymerge._backend``).
        out_dtype: dtype of the floating outputs (default: each tensor's dtype).
        out: write the results into existing tensors instead of new ones: a mapping with
            the keys of ``state_a`` (a float ``alpha``) or a list of such mappings (one per
            alpha), e.g. ``model.state_dict(keep_vars=True)`` to load θ(α) straight into a
            model's parameters and buffers (no allocation, no ``load_state_dict`` copy).
            Each value receives its result as by ``copy_`` (any dtype and device); the C++
            loops write CPU tensors of the output dtype in place, without a temporary.
            Non-floating entries receive ``state_a``'s values.
    Returns:
        A state dict for a float ``alpha``; a list of state dicts (one per alpha) for a
        sequence. Non-floating entries are clones of ``state_a``'s. With ``out``: ``out``.
    Raises:
        ValueError: mismatched keys/shapes/dtypes (naming the key), unknown keys in
            ``spec_axes``, axis out of range, index of the wrong length / out of range /
            not a permutation (naming the key and axis), unknown group, empty alpha list.
        TypeError: non-integer indices, non-floating permuted params, bad argument types.
    """
    keys, (la, lb), dtypes, devices = check_states([state_a, state_b], ["state_a", "state_b"])
    many = not isinstance(alpha, (int, float)) and not (
        isinstance(alpha, torch.Tensor) and alpha.dim() == 0
    )
    if many:
        alphas = as_floats(alpha, "alpha")
        if not alphas:
            raise ValueError("alpha is an empty sequence")
    else:
        alphas = [float(alpha)]
    check_out_dtype(out_dtype)
    axes = normalise_axes(spec_axes, perm, state_a)
    M = len(alphas)
    out_rows = None if out is None else _out_rows(out, many, M, keys, la)
    outs: list[list[torch.Tensor | None]] = [[None] * len(keys) for _ in range(M)]
    groups, _ = group(dtypes, devices, la, out_dtype)
    for (device, in_dtype, od), mask in groups:
        idx = range(len(keys)) if mask is None else list(compress(range(len(keys)), mask))
        a_list = [la[i] for i in idx]
        b_list = [lb[i] for i in idx]
        axes_list = [axes.get(keys[i], ()) for i in idx]
        targets = None if out_rows is None else [[row[i] for i in idx] for row in out_rows]
        use = _choose(backend, in_dtype, od, a_list, _permuted_native_wins)
        res = None
        if use == "triton":
            res = _perm_triton(a_list, b_list, axes_list, alphas, od, device)
        elif use == "native":
            if targets is not None and _writable_outs(targets, od):
                res = _perm_native(a_list, b_list, axes_list, alphas, od, targets)
            if res is None:  # no direct write (or outputs that overlap): new tensors
                res = _perm_native(a_list, b_list, axes_list, alphas, od)
        if res is None:
            res = _perm_torch(a_list, b_list, axes_list, alphas, od)
        if targets is not None and res is not targets:
            for row, got in zip(targets, res, strict=True):
                torch._foreach_copy_(row, got)
        for m in range(M):
            for i, r in zip(idx, res[m], strict=True):
                outs[m][i] = r
    if out_rows is not None:
        for row in out_rows:
            for i, o in enumerate(outs[0]):
                if o is None:  # non-floating: state_a's values
                    row[i].copy_(la[i])
        return out
    result = [
        {
            k: la[i].clone() if o is None else o
            for i, (k, o) in enumerate(zip(keys, row, strict=True))
        }
        for row in outs
    ]
    return result if many else result[0]


def _out_rows(out: Any, many: bool, M: int, keys: list[str], la: list) -> list[list]:
    """``out`` of ``permuted_interpolate`` as M lists of tensors in key order, checked."""
    rows = out if many else [out]
    if isinstance(rows, Mapping) or not isinstance(rows, Sequence):
        raise TypeError(
            "out must be a list of state dicts (one per alpha) when alpha is a sequence"
            if many
            else f"out must be a state dict, got {type(out).__name__}"
        )
    if len(rows) != M:
        raise ValueError(f"out has {len(rows)} state dicts for {M} alphas")
    got = []
    for m, row in enumerate(rows):
        where = f"out[{m}]" if many else "out"
        if not isinstance(row, Mapping):
            raise TypeError(f"{where} must be a state dict, got {type(row).__name__}")
        missing = [k for k in keys if k not in row]
        if missing:
            raise ValueError(f"{where} lacks key {missing[0]!r} of state_a")
        tensors = []
        for k, a in zip(keys, la, strict=True):
            t = row[k]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{where}[{k!r}] must be a tensor, got {type(t).__name__}")
            if t.shape != a.shape:
                raise ValueError(
                    f"{where}[{k!r}] has shape {tuple(t.shape)}, state_a's {tuple(a.shape)}"
                )
            tensors.append(t)
        got.append(tensors)
    return got
