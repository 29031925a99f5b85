"""Triton kernels of the task-vector merges (TIES, DARE, breadcrumbs, DELLA, task arithmetic).

One tensor at a time (the front, ``pymerge.ops.task_vectors``, loops over a state dict):

* ``_hist_kernel``: a radix-select pass: task vectors ``tau = rnd(x - b)`` of one model, their
  magnitude bit patterns, and a 65536-bin histogram of one 16-bit digit of them (elements
  whose higher digits differ from the prefix found so far are skipped), by atomic adds.
  The front locates the boundary positions in the histograms (a cumulative sum on the
  device) and repeats for the next digit: one pass for fp16/bf16 task vectors (15-bit
  patterns), two for fp32.
* ``_ties_kernel``: per block, the count of keys equal to each boundary key (so the merge
  kernel knows each block's tie ordinals: ties go by flat position, as on every backend).
* ``_sums_kernel``: per block, ``sum |tau|`` and ``sum |tau keep|`` (the L1 rescale).
* ``_merge_kernel``: every model's task vector, its mask (range with tie ordinals, the
  counter-based random stream of ``pymerge.ops.rng``, or DELLA's rank probabilities), the
  weights, the sign election and disjoint mean, ``lambda`` and the write: K + 1 reads and
  one write per element.

The random stream is the definition of ``pymerge/ops/rng.py`` in 64-bit integer arithmetic
(uint64 wraps modulo 2**64): ``u = (splitmix64(stream + (i + 1) * GOLDEN) >> 40) * 2**-24``.

Nothing here knows about state dicts: the front validates and prepares everything.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

DEFAULT_BLOCK = 1024
_MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
M1 = 0xBF58476D1CE4E5B9
M2 = 0x94D049BB133111EB
_F16 = (torch.float16, torch.bfloat16)


def _signed(x: int) -> int:
    x &= _MASK
    return x - (1 << 64) if x >> 63 else x


@triton.jit
def _bf16_bits(v):
    """fp32 -> bf16 bit pattern (int32), round to nearest even, NaN made quiet: integer
    arithmetic, so the interpreter and every GPU give the C++ loops' bits."""
    u = v.to(tl.uint32, bitcast=True)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    quiet = (u >> 16) | 0x40
    return tl.where(v != v, quiet, rounded).to(tl.int32)


@triton.jit
def _tau_key(x_ptr, b_ptr, offs, mask, STORE: tl.constexpr, WIDE: tl.constexpr):
    """tau in fp32 (rounded to the storage dtype) and its magnitude bits as int64."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d = x - b
    if WIDE:
        tau = d
        key = (d.to(tl.int32, bitcast=True) & 0x7FFFFFFF).to(tl.int64)
    elif STORE == tl.bfloat16:
        r = _bf16_bits(d)
        tau = (r << 16).to(tl.float32, bitcast=True)
        key = (r & 0x7FFF).to(tl.int64)
    else:
        s = d.to(STORE)
        tau = s.to(tl.float32)
        key = (s.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF).to(tl.int64)
    return tau, key, b


@triton.jit
def _hist_kernel(
    x_ptr,
    b_ptr,
    hist_ptr,
    n,
    shift,
    prefix,
    FILTER: tl.constexpr,
    STORE: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    _, key, _ = _tau_key(x_ptr, b_ptr, offs, mask, STORE, WIDE)
    if FILTER:
        mask = mask & ((key >> (shift + 16)) == prefix)
    digit = (key >> shift) & 0xFFFF
    tl.atomic_add(hist_ptr + digit, tl.full([BLOCK], 1, tl.int32), mask=mask)


@triton.jit
def _ties_kernel(
    x_ptr,
    b_ptr,
    out_ptr,
    n,
    v0,
    v1,
    STORE: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    _, key, _ = _tau_key(x_ptr, b_ptr, offs, mask, STORE, WIDE)
    tl.store(out_ptr + 2 * pid, tl.sum(((key == v0) & mask).to(tl.int32), axis=0))
    tl.store(out_ptr + 2 * pid + 1, tl.sum(((key == v1) & mask).to(tl.int32), axis=0))


@triton.jit
def _uniform(stream, idx, golden, m1, m2):
    """The counter-based uniforms of pymerge.ops.rng for element indices ``idx``."""
    x = stream + (idx.to(tl.uint64) + 1) * golden
    x = (x ^ (x >> 30)) * m1
    x = (x ^ (x >> 27)) * m2
    x = x ^ (x >> 31)
    return (x >> 40).to(tl.int32).to(tl.float32) * 5.9604644775390625e-8


@triton.jit
def _keep(
    key,
    tau,
    offs,
    mask,
    n,
    k,
    mode,
    v0,
    v1,
    a0,
    b1,
    lo_open,
    c0,
    c1,
    d,
    lo,
    eps,
    rank_ptr,
    C,
    stream,
    golden,
    m1,
    m2,
):
    """The keep mask (fp32 1 / 0) of model k for one block (see the module docstring)."""
    keep = tl.full(tau.shape, 1.0, tl.float32)
    if mode == 1:  # range of (key, position) order, ties by position
        inside = ((key > v0) | (lo_open != 0)) & (key < v1)
        e0 = (key == v0) & (lo_open == 0) & mask
        e1 = (key == v1) & mask
        o0 = c0 + tl.cumsum(e0.to(tl.int64), axis=0) - e0.to(tl.int64)
        o1 = c1 + tl.cumsum(e1.to(tl.int64), axis=0) - e1.to(tl.int64)
        t0 = e0 & (o0 >= a0) & ((~e1) | (o0 < b1))
        t1 = e1 & (~e0) & (o1 < b1)
        keep = (inside | t0 | t1).to(tl.float32)
    elif mode == 2:  # DARE
        u = _uniform(stream, k * n + offs, golden, m1, m2)
        keep = (u < d).to(tl.float32)
    elif mode == 3:  # DELLA: rank-based probabilities
        u = _uniform(stream, k * n + offs, golden, m1, m2)
        r = tl.load(rank_ptr + k * n + offs, mask=mask, other=0).to(tl.float32)
        den = tl.maximum(C - 1, 1).to(tl.float32)
        p = lo + ((r / den) * 2.0) * eps
        p = tl.where(C > 1, p, d)
        keep = (u < p).to(tl.float32)
    elif mode == 4:
        keep = tl.zeros(tau.shape, tl.float32)
    return keep


@triton.jit
def _sums_kernel(
    x_ptr,
    b_ptr,
    out_ptr,
    n,
    k,
    mode,
    v0,
    v1,
    a0,
    b1,
    lo_open,
    ties_ptr,
    d,
    lo,
    eps,
    rank_ptr,
    C,
    stream,
    golden,
    m1,
    m2,
    STORE: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tau, key, _ = _tau_key(x_ptr, b_ptr, offs, mask, STORE, WIDE)
    c0 = tl.load(ties_ptr + 2 * pid)
    c1 = tl.load(ties_ptr + 2 * pid + 1)
    keep = _keep(
        key,
        tau,
        offs,
        mask,
        n,
        k,
        mode,
        v0,
        v1,
        a0,
        b1,
        lo_open,
        c0,
        c1,
        d,
        lo,
        eps,
        rank_ptr,
        C,
        stream,
        golden,
        m1,
        m2,
    )
    a = tl.where(mask, tl.abs(tau), 0.0).to(tl.float64)
    tl.store(out_ptr + 2 * pid, tl.sum(a, axis=0))
    tl.store(out_ptr + 2 * pid + 1, tl.sum(a * keep.to(tl.float64), axis=0))


@triton.jit
def _model_term(
    k,
    x0_ptr,
    delta_ptr,
    b_ptr,
    offs,
    mask,
    n,
    par_ptr,
    ipar_ptr,
    ties_ptr,
    nblocks,
    pid,
    rank_ptr,
    C,
    stream,
    golden,
    m1,
    m2,
    STORE: tl.constexpr,
    WIDE: tl.constexpr,
):
    """Model k's weighted, sparsified task vector d_k = ((tau * keep) * scale) * w on one
    block (recomputed from the inputs in each sweep, not kept), and its weight w."""
    x_ptr = x0_ptr + tl.load(delta_ptr + k)
    tau, key, _ = _tau_key(x_ptr, b_ptr, offs, mask, STORE, WIDE)
    w = tl.load(par_ptr + 6 * k)
    sc = tl.load(par_ptr + 6 * k + 1)
    keep = _keep(
        key,
        tau,
        offs,
        mask,
        n,
        k,
        tl.load(ipar_ptr + 6 * k),
        tl.load(ipar_ptr + 6 * k + 1),
        tl.load(ipar_ptr + 6 * k + 2),
        tl.load(ipar_ptr + 6 * k + 3),
        tl.load(ipar_ptr + 6 * k + 4),
        tl.load(ipar_ptr + 6 * k + 5),
        tl.load(ties_ptr + (k * nblocks + pid) * 2),
        tl.load(ties_ptr + (k * nblocks + pid) * 2 + 1),
        tl.load(par_ptr + 6 * k + 2),
        tl.load(par_ptr + 6 * k + 3),
        tl.load(par_ptr + 6 * k + 4),
        rank_ptr,
        C,
        stream,
        golden,
        m1,
        m2,
    )
    return ((tau * keep) * sc) * w, w


@triton.jit
def _merge_kernel(
    x0_ptr,
    delta_ptr,
    b_ptr,
    out_ptr,
    n,
    par_ptr,
    ipar_ptr,
    ties_ptr,
    rank_ptr,
    C,
    nblocks,
    stream,
    golden,
    m1,
    m2,
    lam,
    flat_div,
    K: tl.constexpr,
    CONSENSUS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    STORE: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tot = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK], tl.float32)
    dv = tl.zeros([BLOCK], tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # first sweep: the sum of the weighted task vectors (the elected sign); without
    # consensus it is the result
    for k in tl.static_range(K):
        dk, _ = _model_term(
            k,
            x0_ptr,
            delta_ptr,
            b_ptr,
            offs,
            mask,
            n,
            par_ptr,
            ipar_ptr,
            ties_ptr,
            nblocks,
            pid,
            rank_ptr,
            C,
            stream,
            golden,
            m1,
            m2,
            STORE,
            WIDE,
        )
        tot += dk
    if CONSENSUS:
        up = tot >= 0.0
        for k in tl.static_range(K):
            dk, w = _model_term(
                k,
                x0_ptr,
                delta_ptr,
                b_ptr,
                offs,
                mask,
                n,
                par_ptr,
                ipar_ptr,
                ties_ptr,
                nblocks,
                pid,
                rank_ptr,
                C,
                stream,
                golden,
                m1,
                m2,
                STORE,
                WIDE,
            )
            on = tl.where(up, (dk > 0.0).to(tl.float32), (dk < 0.0).to(tl.float32))
            acc += dk * on
            dv += w * on
        dv = tl.where(dv == 0.0, 1.0, dv)
        if NORMALIZE:
            acc = acc / dv
    else:
        acc = tot / flat_div
    res = b + acc * lam
    if out_ptr.dtype.element_ty == tl.bfloat16:
        bits = _bf16_bits(res).to(tl.int16)
        tl.store(out_ptr + offs, bits.to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(out_ptr + offs, res.to(out_ptr.dtype.element_ty), mask=mask)


_STORE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _locate(hist: torch.Tensor, pos: int) -> tuple[int, int]:
    """The bin holding ascending position ``pos`` and the count in the bins below it."""
    cum = hist.to(torch.int64).cumsum(0)
    b = int(torch.searchsorted(cum, torch.tensor([pos], device=cum.device), right=True)[0])
    return b, int(cum[b - 1]) if b > 0 else 0


def _select(x, b, n, pos, store, wide, block) -> tuple[int, int]:
    """Radix select: the key at ascending position ``pos`` of model x's task vector and the
    count of smaller keys (16-bit digits, most significant first)."""
    shifts = [16, 0] if wide else [0]
    prefix, below = 0, 0
    grid = (triton.cdiv(n, block),)
    for level, shift in enumerate(shifts):
        hist = torch.zeros(65536, dtype=torch.int32, device=b.device)
        _hist_kernel[grid](
            x, b, hist, n, shift, prefix, FILTER=level > 0, STORE=store, WIDE=wide, BLOCK=block
        )
        digit, under = _locate(hist, pos - below)
        below += under
        prefix = (prefix << 16) | digit
    return prefix, below


def merge_tensor(
    xs: list[torch.Tensor],
    b: torch.Tensor,
    p,
    *,
    sparsify: str,
    consensus: bool,
    stream: int,
    view: tuple[int, int, int],
    out_dtype: torch.dtype,
    block: int | None = None,
) -> torch.Tensor:
    """One tensor's task-vector merge (``p``: the front's ``TaskVectorParams``; ``xs`` and
    ``b`` contiguous, one dtype and device)."""
    block = block or DEFAULT_BLOCK
    dev = b.device
    n = b.numel()
    out = torch.empty(b.shape, dtype=out_dtype, device=dev)
    if n == 0:
        return out
    K = len(xs)
    store = _STORE[b.dtype]
    wide = b.dtype == torch.float32
    nblocks = triton.cdiv(n, block)
    grid = (nblocks,)
    modes, fpar, ipar = [], [], []
    ties = torch.zeros((K, nblocks, 2), dtype=torch.int64, device=dev)
    rank = torch.zeros(1, dtype=torch.int32, device=dev)
    A, C, B = view
    for k, x in enumerate(xs):
        d = p.densities[k]
        mode, v0, v1, a0, b1, lo_open = 0, 0, 0, 0, 0, 0
        if sparsify == "none" or d >= 1.0:
            pass
        elif sparsify in ("magnitude", "magnitude_outliers"):
            if sparsify == "magnitude":
                p0, p1 = n - min(max(1, int(d * n)), n), n
            else:
                target, top = int(d * n), int(p.gammas[k] * n)
                p0 = max(0, n - target - top)
                p1 = min(n, p0 + target)
            if p0 >= p1:
                mode = 4
            elif p0 > 0 or p1 < n:
                mode = 1
                lo_open = int(p0 == 0)
                if not lo_open:
                    v0, below = _select(x, b, n, p0, store, wide, block)
                    a0 = p0 - below
                if p1 == n:
                    v1, b1 = 0xFFFFFFFF, 0
                else:
                    v1, below = _select(x, b, n, p1 - 1, store, wide, block)
                    b1 = p1 - below
                counts = torch.empty((nblocks, 2), dtype=torch.int32, device=dev)
                _ties_kernel[grid](x, b, counts, n, v0, v1, STORE=store, WIDE=wide, BLOCK=block)
                c = counts.to(torch.int64)
                ties[k] = c.cumsum(0) - c
        elif sparsify == "random":
            mode = 2
        else:
            mode = 3
            if rank.numel() == 1:
                rank = torch.zeros((K, n), dtype=torch.int32, device=dev)
            keys = _keys_torch(x, b).view(A, C, B)
            order = torch.sort(keys, dim=1, stable=True).indices
            r = torch.empty_like(order)
            r.scatter_(1, order, torch.arange(C, device=dev).view(1, C, 1).expand_as(order))
            rank[k] = r.reshape(-1).to(torch.int32)
        modes.append(mode)
        eps = p.epsilons[k]
        fpar.append([p.weights[k], 1.0, d, d - eps, eps, 0.0])
        ipar.append([mode, v0, v1, a0, b1, lo_open])
    par = torch.tensor(fpar, dtype=torch.float32, device=dev)
    ipars = torch.tensor(ipar, dtype=torch.int64, device=dev)
    rng = (_signed(stream), _signed(GOLDEN), _signed(M1), _signed(M2))
    rng_u = [torch.tensor(v, dtype=torch.int64).view(torch.uint64).item() for v in rng]
    if p.rescale:
        for k, x in enumerate(xs):
            if modes[k] == 0:
                continue
            sums = torch.empty((nblocks, 2), dtype=torch.float64, device=dev)
            i = ipar[k]
            _sums_kernel[grid](
                x,
                b,
                sums,
                n,
                k,
                i[0],
                i[1],
                i[2],
                i[3],
                i[4],
                i[5],
                ties[k],
                fpar[k][2],
                fpar[k][3],
                fpar[k][4],
                rank,
                C,
                *rng_u,
                STORE=store,
                WIDE=wide,
                BLOCK=block,
            )
            tot = sums.sum(0)
            before, after = float(tot[0]), float(tot[1])
            if not (before < 1e-7 or after < 1e-7):
                par[k, 1] = before / after
    ws = torch.zeros((), dtype=torch.float32)
    for w in p.weights:
        ws = ws + torch.tensor(w, dtype=torch.float32)
    flat = float(ws) if p.normalize and abs(float(ws)) >= 1e-8 else 1.0
    base_ptr = xs[0]
    es = base_ptr.element_size()
    deltas = torch.tensor(
        [(x.data_ptr() - base_ptr.data_ptr()) // es for x in xs], dtype=torch.int64, device=dev
    )
    _merge_kernel[grid](
        base_ptr,
        deltas,
        b,
        out,
        n,
        par,
        ipars,
        ties,
        rank,
        C,
        nblocks,
        *rng_u,
        float(p.lam),
        flat,
        K=K,
        CONSENSUS=consensus,
        NORMALIZE=p.normalize,
        STORE=store,
        WIDE=wide,
        BLOCK=block,
    )
    return out


def _keys_torch(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Magnitude bit patterns (int64) of ``rnd(x - b)``, for DELLA's row ranks."""
    s = (x.float() - b.float()).to(b.dtype).reshape(-1)
    if b.dtype in _F16:
        return s.view(torch.int16).to(torch.int64) & 0x7FFF
    return s.view(torch.int32).to(torch.int64) & 0x7FFFFFFF
