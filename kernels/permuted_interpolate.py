"""Multi-tensor permuted lerp ``out_m = (1 - alpha_m) * a + alpha_m * pi(b)`` in one launch.

``pi(b)`` gathers ``b`` along some axes (``b.index_select(ax0, i0).index_select(ax1, i1)...``)
while reading; it is never materialised. Every tensor is viewed as a matrix
``[R, C]`` (``R = shape[0]``, ``C = prod(shape[1:])``; 1-D tensors are ``[1, n]``,
0-d ones ``[1, 1]``), so any set of permuted axes splits into a *row map* (source
row offset of each row, from axis 0) and a *column map* (source column of each
column, from the other axes). ``src(r, c) = rowmap[r] + colmap[c]``: no integer
division per element, and the maps cost ``R + C`` integers per tensor.

A program owns ``BR`` rows and a segment of up to ``SEG`` columns of one tensor and
walks it in ``[BR, BC]`` tiles, so a column-permuted row is fetched into L1/L2
once and reused, not once per tile. It reads ``a`` and ``b`` once per tile and writes
all ``M`` outputs (loss-barrier curves use many alphas). Arithmetic is fp32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl

DEFAULT_BR = 4
DEFAULT_BC = 512
DEFAULT_SEG = 8192
DEFAULT_NUM_WARPS = 4
#: every input and output start must be aligned to this many bytes (the front ensures it)
ALIGN_BYTES = 16
_NF = 8  # fields per tensor: da, db, out offset, R, C, rowmap off, colmap off, flags


@triton.jit
def _perm_lerp_kernel(
    a_base,  # input A dtype; each A tensor = a_base + da
    b_base,  # input B dtype; each B tensor = b_base + db
    out_ptr,  # [M, out_stride] flat outputs
    alpha_ptr,  # fp32 [M]
    M,
    out_stride,
    tab_ptr,  # int64 [T, NF]
    tile_ptr,  # int64 [n_tiles, 3]: tensor id, first row, first column
    map_ptr,  # int64 maps: rowmap (source row * C) and colmap (source column)
    NF: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
    SEG: tl.constexpr,
    VA: tl.constexpr,  # alignment (elements) of da and db: 16 bytes
    VO: tl.constexpr,  # alignment (elements) of out offsets: 16 bytes
):
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(tile_ptr + 3 * pid)
    r0 = tl.load(tile_ptr + 3 * pid + 1)
    c0 = tl.multiple_of(tl.load(tile_ptr + 3 * pid + 2), 8)  # a multiple of SEG
    row = tab_ptr + t * NF
    da = tl.multiple_of(tl.load(row), VA)
    db = tl.multiple_of(tl.load(row + 1), VA)
    oo = tl.multiple_of(tl.load(row + 2), VO)
    R = tl.load(row + 3)
    C = tl.load(row + 4)
    rmo = tl.load(row + 5)
    cmo = tl.load(row + 6)
    flags = tl.load(row + 7)
    aligned = (flags & 1) != 0  # C % 8 == 0: every row starts 16-byte aligned
    col_identity = (flags & 2) != 0  # no permuted column axis: B rows are contiguous
    rows = r0 + tl.arange(0, BR).to(tl.int64)
    rmask = rows < R
    rsrc = tl.load(map_ptr + rmo + rows, mask=rmask, other=0)
    rdst = rows * C
    rows_full = r0 + BR <= R
    c_end = tl.minimum(c0 + SEG, C)
    # (cc derived from c0, not a loop variable, so that its divisibility is known)
    for k in range(0, tl.cdiv(c_end - c0, BC)):
        cc = c0 + k * BC
        if aligned & rows_full & (cc + BC <= c_end):
            # full, aligned tile: unmasked loads/stores the compiler can vectorise
            cols = cc + tl.arange(0, BC).to(tl.int64)
            dst = tl.multiple_of(rdst, 8)[:, None] + cols[None, :]
            a = tl.load(a_base + da + dst).to(tl.float32)
            if col_identity:
                b = tl.load(b_base + db + (tl.multiple_of(rsrc, 8)[:, None] + cols[None, :]))
            else:
                csrc = tl.load(map_ptr + cmo + cols)
                b = tl.load(b_base + db + (rsrc[:, None] + csrc[None, :]))
            b = b.to(tl.float32)
            for m in range(M):
                al = tl.load(alpha_ptr + m).to(tl.float32)
                y = (1.0 - al) * a + al * b
                tl.store(out_ptr + m * out_stride + oo + dst, y.to(out_ptr.dtype.element_ty))
        else:
            cols = cc + tl.arange(0, BC).to(tl.int64)
            cmask = cols < c_end
            csrc = tl.load(map_ptr + cmo + cols, mask=cmask, other=0)
            mask = rmask[:, None] & cmask[None, :]
            dst = rdst[:, None] + cols[None, :]
            a = tl.load(a_base + da + dst, mask=mask, other=0.0).to(tl.float32)
            b = tl.load(b_base + db + (rsrc[:, None] + csrc[None, :]), mask=mask, other=0.0)
            b = b.to(tl.float32)
            for m in range(M):
                al = tl.load(alpha_ptr + m).to(tl.float32)
                y = (1.0 - al) * a + al * b
                tl.store(
                    out_ptr + m * out_stride + oo + dst,
                    y.to(out_ptr.dtype.element_ty),
                    mask=mask,
                )


def _build_tables(a_list, b_list, maps, out_offsets, br, seg, device):
    """Per-tensor table, tile table and concatenated maps, on ``device``."""
    T = len(a_list)
    a_base, b_base = a_list[0], b_list[0]
    a_es, b_es = a_base.element_size(), b_base.element_size()
    pieces: list[torch.Tensor] = []
    offset = 0
    seen: dict[int, int] = {}

    def place(m: torch.Tensor) -> int:
        nonlocal offset
        key = id(m)
        if key in seen:
            return seen[key]
        seen[key] = offset
        pieces.append(m)
        offset += m.numel()
        return seen[key]

    table = []
    n_rt = []
    n_ct = []
    for a, b, (rmap, cmap), oo in zip(a_list, b_list, maps, out_offsets, strict=True):
        R, C = rmap.numel(), cmap.numel()  # the matrix view [R, C] of the tensor
        if R * C != a.numel() or b.numel() != a.numel():
            raise ValueError(
                f"maps for a [{R}, {C}] matrix, tensors of {a.numel()} and {b.numel()} elements"
            )
        da = a.data_ptr() - a_base.data_ptr()
        db = b.data_ptr() - b_base.data_ptr()
        if da % a_es or db % b_es:
            raise ValueError("input tensors are not aligned to their element size")
        flags = int(C % 8 == 0) | (2 * int(torch.equal(cmap, torch.arange(C))))
        table.append([da // a_es, db // b_es, int(oo), R, C, place(rmap), place(cmap), flags])
        n_rt.append(-(-R // br) if R * C else 0)
        n_ct.append(-(-C // seg))
    tab = torch.tensor(table, dtype=torch.int64).reshape(-1)
    n_rt_t = torch.tensor(n_rt, dtype=torch.int64)
    n_ct_t = torch.tensor(n_ct, dtype=torch.int64)
    per = n_rt_t * n_ct_t
    total = int(per.sum())
    tid = torch.repeat_interleave(torch.arange(T, dtype=torch.int64), per)
    j = torch.arange(total, dtype=torch.int64) - (torch.cumsum(per, 0) - per)[tid]
    nct = n_ct_t[tid]
    tiles = torch.stack([tid, (j // nct) * br, (j % nct) * seg], 1).reshape(-1)
    packed = torch.cat([tab, tiles, *pieces])
    if device.type == "cuda":
        packed = packed.pin_memory()  # async copy; a pageable one would wait for the stream
    packed = packed.to(device, non_blocking=True)
    n_tab = tab.numel()
    return (
        packed[:n_tab],
        packed[n_tab : n_tab + tiles.numel()],
        packed[n_tab + tiles.numel() :],
        total,
    )


def permuted_lerp_(
    a_list: Sequence[torch.Tensor],
    b_list: Sequence[torch.Tensor],
    maps: Sequence[tuple[torch.Tensor, torch.Tensor]],
    alphas: torch.Tensor,
    out: torch.Tensor,
    out_offsets: Sequence[int],
    *,
    br: int | None = None,
    bc: int | None = None,
    seg: int | None = None,
    num_warps: int | None = None,
    cache: Any = None,
) -> torch.Tensor:
    """``out[m, off_i : off_i + numel_i] = (1 - alphas[m]) * a_i + alphas[m] * pi_i(b_i)``.

    Args:
        a_list, b_list: ``T`` contiguous tensors each (one dtype per list, one device);
            ``a_i`` and ``b_i`` have the same shape.
        maps: per tensor ``(rowmap [R], colmap [C])`` int64 CPU tensors of its matrix view
            ``[R, C]`` (``R * C`` elements; rowmap entries are source row * C, colmap entries
            source columns, all in range: the caller validates them). Equal map objects are
            stored once.
        alphas: fp32 ``[M]`` on the device.
        out: ``[M, L]`` contiguous output buffer; tensor ``i`` goes to
            ``out[:, off_i : off_i + numel_i]``.
        cache: where to keep the launch tables between calls (any object with ``get(key)``
            and ``put(key, value)``), keyed by pointers, shapes and map objects (each entry
            holds its maps, so their ids cannot be reused while it lives); ``None`` builds
            them for this call only.
    Returns:
        ``out``. One kernel launch whatever ``T`` and ``M``.
    """
    br = br or DEFAULT_BR
    bc = bc or DEFAULT_BC
    seg = seg or DEFAULT_SEG
    num_warps = num_warps or DEFAULT_NUM_WARPS
    if seg % bc:
        raise ValueError(f"seg={seg} must be a multiple of bc={bc}")
    T = len(a_list)
    if T == 0 or out.numel() == 0:
        return out
    device = out.device
    if device.type == "cuda" and bc % 8:
        raise ValueError(f"bc={bc} must be a multiple of 8 (alignment hints)")
    vo = max(1, ALIGN_BYTES // out.element_size())
    if (
        any(t.data_ptr() % ALIGN_BYTES for t in (*a_list, *b_list, out))
        or any(o % vo for o in out_offsets)
        or (out.dim() == 2 and out.stride(0) % vo)
    ):
        raise ValueError(f"inputs, outputs and out offsets must be {ALIGN_BYTES}-byte aligned")
    a_base, b_base = a_list[0], b_list[0]
    key = hit = None
    if cache is not None:
        key = (
            device,
            br,
            bc,
            seg,
            a_base.element_size(),
            b_base.element_size(),
            tuple(t.data_ptr() for t in a_list),
            tuple(t.data_ptr() for t in b_list),
            tuple(tuple(t.shape) for t in a_list),
            tuple(out_offsets),
            tuple((id(r), id(c)) for r, c in maps),
        )
        hit = cache.get(key)
    if hit is None:
        hit = (list(maps), *_build_tables(a_list, b_list, maps, out_offsets, br, seg, device))
        if cache is not None:
            cache.put(key, hit)
    _, tab_d, tiles_d, maps_d, total = hit
    if total == 0:
        return out
    M = alphas.numel()
    _perm_lerp_kernel[(total,)](
        a_base,
        b_base,
        out,
        alphas,
        M,
        out.stride(0) if out.dim() == 2 else out.numel(),
        tab_d,
        tiles_d,
        maps_d,
        NF=_NF,
        BR=br,
        BC=bc,
        SEG=seg,
        VA=max(1, ALIGN_BYTES // a_base.element_size()),
        VO=max(1, ALIGN_BYTES // out.element_size()),
        num_warps=num_warps,
    )
    return out
