"""Multi-tensor weighted sum ``out_i = sum_k w_k * x_{k,i}`` in one Triton launch.

Many tensors of one dtype (e.g. every floating tensor of a state dict) are summed
by a single kernel launch: the host builds a small table (per tensor: its numel,
its offset in one flat output buffer, and the element offset of each input
relative to a base input) and a 1-D grid runs over fixed-size chunks of all
tensors. A chunk that lies entirely inside its tensor takes an unmasked,
vectorised path; only the last chunk of a tensor is masked.

Bytes moved: K reads + 1 write per element, nothing else (the tables are tiny), so
the kernel is bandwidth bound; arithmetic is fp32 whatever the storage dtype.

Tables depend only on data pointers, sizes and dtypes, so a caller may keep them in a
cache it passes in (``cache=``: any object with ``get(key)`` and ``put(key, value)``; the
front passes its LRU cache, this module keeps none and imports nothing of pymerge), and
repeated calls on the same tensors (e.g. a sweep over weights) then only pay for the
launch.

Nothing here knows about state dicts: the front ``pymerge.ops.interpolate``
groups tensors and validates input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl

#: elements per program (one chunk); tests lower it to exercise tails
DEFAULT_BLOCK = 4096
DEFAULT_NUM_WARPS = 8
#: required alignment of every input/output start, in bytes (vector width)
ALIGN_BYTES = 16


@triton.jit
def _weighted_sum_kernel(
    base_ptr,  # any input of the input dtype; every input = base + delta
    out_ptr,  # flat output buffer
    w_ptr,  # fp32 [K]
    delta_ptr,  # int64 [T, K] element offsets of inputs relative to base_ptr
    numel_ptr,  # int64 [T]
    outoff_ptr,  # int64 [T] element offset of tensor t in out_ptr
    first_ptr,  # int64 [T] first chunk id of tensor t
    chunk_ptr,  # int64 [C] tensor id of chunk c
    K: tl.constexpr,
    BLOCK: tl.constexpr,
    VEC: tl.constexpr,  # alignment (elements) of every input delta: 16 bytes
    VO: tl.constexpr,  # alignment (elements) of every out offset: 16 bytes
):
    pid = tl.program_id(0)
    t = tl.load(chunk_ptr + pid).to(tl.int64)
    first = tl.load(first_ptr + t)
    start = (pid - first) * BLOCK
    n = tl.load(numel_ptr + t)
    oo = tl.multiple_of(tl.load(outoff_ptr + t), VO)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    if start + BLOCK <= n:
        for k in tl.static_range(K):
            d = tl.multiple_of(tl.load(delta_ptr + t * K + k), VEC)
            w = tl.load(w_ptr + k).to(tl.float32)
            x = tl.load(base_ptr + (d + start) + offs)
            acc += w * x.to(tl.float32)
        tl.store(out_ptr + (oo + start) + offs, acc.to(out_ptr.dtype.element_ty))
    else:
        mask = offs < n - start
        for k in tl.static_range(K):
            d = tl.load(delta_ptr + t * K + k)
            w = tl.load(w_ptr + k).to(tl.float32)
            x = tl.load(base_ptr + (d + start) + offs, mask=mask, other=0.0)
            acc += w * x.to(tl.float32)
        tl.store(out_ptr + (oo + start) + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def aligned(t: torch.Tensor) -> bool:
    """Whether ``t`` starts on an ``ALIGN_BYTES`` boundary (kernel requirement)."""
    return t.data_ptr() % ALIGN_BYTES == 0


def _tables_for(
    ptrs: list[list[int]],
    numels: list[int],
    out_offsets: list[int],
    elsize: int,
    block: int,
    device: torch.device,
    cache: Any,
) -> tuple[torch.Tensor, ...]:
    key = None
    if cache is not None:
        key = (device, elsize, block, tuple(numels), tuple(out_offsets), tuple(map(tuple, ptrs)))
        hit = cache.get(key)
        if hit is not None:
            return hit
    T = len(numels)
    K = len(ptrs[0])
    base = ptrs[0][0]
    deltas = torch.tensor(ptrs, dtype=torch.int64).sub_(base)
    if bool((deltas % elsize).ne(0).any()):  # cannot happen for aligned tensors
        raise ValueError("input tensors are not aligned to their element size")
    deltas = deltas.div_(elsize, rounding_mode="floor").reshape(T * K)
    numel_t = torch.tensor(numels, dtype=torch.int64)
    nchunks = (numel_t + (block - 1)) // block
    first = torch.cumsum(nchunks, 0) - nchunks
    chunk = torch.repeat_interleave(torch.arange(T, dtype=torch.int64), nchunks)
    outoff = torch.tensor(out_offsets, dtype=torch.int64)
    packed = torch.cat([deltas, numel_t, outoff, first, chunk])
    if device.type == "cuda":
        packed = packed.pin_memory()  # async copy; a pageable one would wait for the stream
    packed = packed.to(device, non_blocking=True)
    value = (
        packed[: T * K],
        packed[T * K : T * K + T],
        packed[T * K + T : T * K + 2 * T],
        packed[T * K + 2 * T : T * K + 3 * T],
        packed[T * K + 3 * T :],
    )
    if cache is not None:
        cache.put(key, value)
    return value


def weighted_sum_(
    inputs: Sequence[Sequence[torch.Tensor]],
    weights: torch.Tensor,
    out_flat: torch.Tensor,
    out_offsets: Sequence[int],
    *,
    block: int | None = None,
    num_warps: int | None = None,
    cache: Any = None,
) -> torch.Tensor:
    """Write ``sum_k weights[k] * inputs[i][k]`` into ``out_flat`` for every tensor ``i``.

    Args:
        inputs: ``T`` lists of ``K`` contiguous tensors; ``inputs[i][k]`` all have the
            numel of tensor ``i``; one input dtype (fp32/fp16/bf16) for all, one device,
            every start aligned to ``ALIGN_BYTES``.
        weights: fp32 tensor ``[K]`` on the device.
        out_flat: 1-D contiguous output buffer (fp32/fp16/bf16); tensor ``i`` is written
            to ``out_flat[out_offsets[i] : out_offsets[i] + numel_i]``; offsets must be
            multiples of ``ALIGN_BYTES / out_flat.element_size()`` elements.
        cache: where to keep the launch tables between calls (``get``/``put``); ``None``
            builds them for this call only.
    Returns:
        ``out_flat``. One kernel launch whatever ``T``.
    """
    block = block or DEFAULT_BLOCK
    num_warps = num_warps or DEFAULT_NUM_WARPS
    T = len(inputs)
    if T == 0:
        return out_flat
    K = len(inputs[0])
    dtype = inputs[0][0].dtype
    device = out_flat.device
    elsize = inputs[0][0].element_size()
    vo = max(1, ALIGN_BYTES // out_flat.element_size())
    if (
        any(x.data_ptr() % ALIGN_BYTES for row in inputs for x in row)
        or any(o % vo for o in out_offsets)
        or out_flat.data_ptr() % ALIGN_BYTES
    ):
        raise ValueError(f"inputs, output and out offsets must be {ALIGN_BYTES}-byte aligned")
    numels = [row[0].numel() for row in inputs]
    ptrs = [[x.data_ptr() for x in row] for row in inputs]
    deltas, numel_t, outoff, first, chunk = _tables_for(
        ptrs, numels, list(out_offsets), elsize, block, device, cache
    )
    grid = (chunk.numel(),)
    if grid[0] == 0:
        return out_flat
    assert all(x.dtype == dtype for row in inputs for x in row)
    _weighted_sum_kernel[grid](
        inputs[0][0],
        out_flat,
        weights,
        deltas,
        numel_t,
        outoff,
        first,
        chunk,
        K=K,
        BLOCK=block,
        VEC=max(1, ALIGN_BYTES // elsize),
        VO=vo,
        num_warps=num_warps,
    )
    return out_flat
