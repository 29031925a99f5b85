"""Fused Triton kernel for one streaming-correlation update.

For a batch ``x_a [N, d_a]``, ``x_b [N, d_b]`` and per-feature shifts ``k_a [d_a]``,
``k_b [d_b]`` (float32; the front passes the running means), one launch computes

* ``cross [d_a, d_b] (+)= (x_a - k_a)^T (x_b - c_b)``, where ``c_b = k_b`` when
  ``center_b`` is true and ``c_b = 0`` otherwise,
* ``sum_a = sum_rows(x_a - k_a)``, ``sumsq_a = sum_rows((x_a - k_a)^2)`` (and the
  same for ``b``, always centred on ``k_b``),

reading each input tile once. The statistics are produced by the programs on the
first tile row / column only, so they cost almost nothing next to the GEMM.

Why shift in the kernel: accumulating raw products ``sum x_a x_b`` in float32 and
subtracting ``N m_a m_b`` afterwards cancels catastrophically when ``|mean| >> std``.
Centring the ``a`` operand alone already removes the quadratic cancellation: the
products ``(x_a - k_a) x_b`` have zero mean over samples, so the float32 partial sums
stay ``O(sqrt(N))`` and the error relative to the covariance is about
``eps_fp32 * |mean_b| / std_b``. Centring ``b`` too (default for float32 inputs, and
needed with TF32, which rounds the raw operand) makes it independent of the means.
Leaving ``b`` raw for fp16/bf16 lets that operand go straight from memory to the
tensor cores. The front applies the remaining rank-1 correction ``- sum_a c_b^T``.

Arithmetic on loaded tiles is done in float32; the centred ``a`` tile is rounded back
to the input dtype for ``tl.dot`` (fp16/bf16) with float32 accumulation. For
float32 inputs ``allow_tf32`` picks ``input_precision="tf32"`` instead of ``"ieee"``.

Nothing here knows about models; tensors in, tensors out.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["correlation_update", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_EMULATE = {torch.float16: 1, torch.bfloat16: 2}
_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _round_to(x, KIND: tl.constexpr):
    """float32 ``x`` rounded to nearest-even fp16 (KIND=1) or bf16 (KIND=2), as float32."""
    if KIND == 2:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float16).to(tl.float32)


@triton.jit
def _mainloop(
    a_ptrs,
    b_ptrs,
    ka,
    kb,
    mask_m,
    mask_n,
    offs_k,
    row_start,
    row_stop,
    stride_an,
    stride_bn,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    CENTER_B: tl.constexpr,
    EMULATE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    STATS: tl.constexpr,
):
    """Loop over the rows of one split: returns (acc, sum_a, sumsq_a, sum_b, sumsq_b)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    sa = tl.zeros((BLOCK_M,), dtype=tl.float32)
    qa = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sb = tl.zeros((BLOCK_N,), dtype=tl.float32)
    qb = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(row_start, row_stop, BLOCK_K):
        rows = k0 + offs_k
        row_ok = rows < row_stop
        a_mask = mask_m[:, None] & row_ok[None, :]
        b_mask = row_ok[:, None] & mask_n[None, :]
        a_raw = tl.load(a_ptrs, mask=a_mask, other=0.0)
        b_raw = tl.load(b_ptrs, mask=b_mask, other=0.0)
        # [BLOCK_M, BLOCK_K]: padded rows must stay exactly zero after the shift
        a = tl.where(a_mask, a_raw.to(tl.float32) - ka[:, None], 0.0)
        if STATS:
            sa += tl.sum(a, axis=1)
            qa += tl.sum(a * a, axis=1)
        if CENTER_B:
            b = tl.where(b_mask, b_raw.to(tl.float32) - kb[None, :], 0.0)
            if STATS:
                sb += tl.sum(b, axis=0)
                qb += tl.sum(b * b, axis=0)
            b_op = b.to(DOT_DTYPE)
        else:
            if STATS:
                bc = tl.where(b_mask, b_raw.to(tl.float32) - kb[None, :], 0.0)
                sb += tl.sum(bc, axis=0)
                qb += tl.sum(bc * bc, axis=0)
            b_op = b_raw
        if EMULATE_DOT == 0:
            acc = tl.dot(a.to(DOT_DTYPE), b_op, acc, input_precision=INPUT_PRECISION)
        else:
            # CPU interpreter: its fp16/bf16 tl.dot is wrong and its fp32->bf16 cast
            # truncates, so round to the dot dtype to nearest-even as the GPU does and
            # multiply exactly in float32
            a_f = _round_to(a, EMULATE_DOT)
            if CENTER_B:
                b_f = _round_to(b, EMULATE_DOT)
            else:
                b_f = b_raw.to(tl.float32)
            acc = tl.dot(a_f, b_f, acc, input_precision="ieee")
        a_ptrs += BLOCK_K * stride_an
        b_ptrs += BLOCK_K * stride_bn
    return acc, sa, qa, sb, qb


@triton.jit
def _corr_update_kernel(
    xa_ptr,
    xb_ptr,
    ka_ptr,
    kb_ptr,
    out_ptr,
    sa_ptr,
    qa_ptr,
    sb_ptr,
    qb_ptr,
    N,
    DA,
    DB,
    stride_an,
    stride_ad,
    stride_bn,
    stride_bd,
    stride_om,
    stride_on,
    SPLIT_K,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    CENTER_B: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    ATOMIC: tl.constexpr,
    EMULATE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(DA, BLOCK_M)
    num_n = tl.cdiv(DB, BLOCK_N)
    # grouped ordering: neighbouring programs share a-tiles in L2
    group_size = GROUP_M * num_n
    group = pid // group_size
    first_m = group * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group
    if SYMMETRIC:
        # self-correlation: only tiles on or above the block diagonal
        if pid_m > pid_n:
            return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < DA
    mask_n = offs_n < DB
    ka = tl.load(ka_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)
    kb = tl.load(kb_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)

    # rows handled by this split (whole BLOCK_K chunks)
    rows_per_split = tl.cdiv(tl.cdiv(N, SPLIT_K), BLOCK_K) * BLOCK_K
    row_start = pid_k * rows_per_split
    row_stop = tl.minimum(row_start + rows_per_split, N)

    if SYMMETRIC:
        do_a_stats = pid_n < 0  # never: the b statistics serve both sides
    else:
        do_a_stats = pid_n == 0
    do_b_stats = pid_m == 0

    a_ptrs = xa_ptr + offs_m[:, None] * stride_ad + (row_start + offs_k)[None, :] * stride_an
    b_ptrs = xb_ptr + (row_start + offs_k)[:, None] * stride_bn + offs_n[None, :] * stride_bd
    # Only the first tile row/column needs the statistics: they get their own copy of the
    # loop, so the other programs run a branch-free GEMM loop.
    if do_a_stats | do_b_stats:
        acc, sa, qa, sb, qb = _mainloop(
            a_ptrs, b_ptrs, ka, kb, mask_m, mask_n, offs_k, row_start, row_stop,
            stride_an, stride_bn, DOT_DTYPE, INPUT_PRECISION, CENTER_B, EMULATE_DOT,
            BLOCK_M, BLOCK_N, BLOCK_K, True,
        )  # fmt: skip
    else:
        acc, sa, qa, sb, qb = _mainloop(
            a_ptrs, b_ptrs, ka, kb, mask_m, mask_n, offs_k, row_start, row_stop,
            stride_an, stride_bn, DOT_DTYPE, INPUT_PRECISION, CENTER_B, EMULATE_DOT,
            BLOCK_M, BLOCK_N, BLOCK_K, False,
        )  # fmt: skip

    o_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    o_mask = mask_m[:, None] & mask_n[None, :]
    if ATOMIC:
        tl.atomic_add(o_ptrs, acc, mask=o_mask)
        if do_a_stats:
            tl.atomic_add(sa_ptr + offs_m, sa, mask=mask_m)
            tl.atomic_add(qa_ptr + offs_m, qa, mask=mask_m)
        if do_b_stats:
            tl.atomic_add(sb_ptr + offs_n, sb, mask=mask_n)
            tl.atomic_add(qb_ptr + offs_n, qb, mask=mask_n)
    else:
        if ACCUMULATE:
            acc += tl.load(o_ptrs, mask=o_mask, other=0.0)
        tl.store(o_ptrs, acc, mask=o_mask)
        if do_a_stats:
            tl.store(sa_ptr + offs_m, sa, mask=mask_m)
            tl.store(qa_ptr + offs_m, qa, mask=mask_m)
        if do_b_stats:
            tl.store(sb_ptr + offs_n, sb, mask=mask_n)
            tl.store(qb_ptr + offs_n, qb, mask=mask_n)


def _gpu_configs() -> list[triton.Config]:
    # Checked by compiling for sm_90 (no GPU at hand): none of these spills registers for
    # bf16/fp16 inputs; (128, 128, 64) spills for float32 and is pruned there.
    cfgs = []
    for bm, bn, bk, warps, stages in (
        (128, 128, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 128, 32, 8, 3),
        (128, 128, 32, 8, 4),
        (64, 64, 64, 4, 4),
        (64, 64, 32, 4, 3),
        (32, 32, 64, 2, 3),
    ):
        cfgs.append(
            triton.Config(
                {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                num_warps=warps,
                num_stages=stages,
            )
        )
    return cfgs


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    if args.get("SYMMETRIC", False):  # the self-correlation mode needs square tiles
        configs = [c for c in configs if c.kwargs["BLOCK_M"] == c.kwargs["BLOCK_N"]]
    if args.get("DOT_DTYPE") == tl.float32:
        configs = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"] <= 128 * 32]
    return configs


_tuned_kernel = triton.autotune(
    configs=_gpu_configs(),
    key=["DA", "DB", "SPLIT_K", "CENTER_B", "ACCUMULATE", "SYMMETRIC", "ATOMIC"],
    prune_configs_by={"early_config_prune": _prune},
    reset_to_zero=["sa_ptr", "qa_ptr", "sb_ptr", "qb_ptr"],
    restore_value=["out_ptr"],
)(_corr_update_kernel)

# Small fixed tiles for the CPU interpreter (and `block` overrides in tests).
_INTERPRET_BLOCK = (16, 16, 16)


def _alloc(shape: tuple[int, ...], device: torch.device, zero: bool) -> torch.Tensor:
    """Output buffers (tests poison these to prove every element is written)."""
    if zero:
        return torch.zeros(shape, device=device, dtype=torch.float32)
    return torch.empty(shape, device=device, dtype=torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _choose_split_k(n: int, d_a: int, d_b: int, device: torch.device) -> int:
    """Split the sample axis when there are too few output tiles to fill the device."""
    tiles = triton.cdiv(d_a, 128) * triton.cdiv(d_b, 128)
    target = 2 * _num_sms(device)
    if device.type != "cuda" or tiles >= target:
        return 1
    # keep at least 1024 rows per split so the atomics stay negligible
    return int(max(1, min(target // tiles, n // 1024, 64)))


def correlation_update(
    x_a: torch.Tensor,
    x_b: torch.Tensor,
    shift_a: torch.Tensor,
    shift_b: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    center_b: bool | None = None,
    symmetric: bool = False,
    allow_tf32: bool = False,
    split_k: int | None = None,
    block: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One fused pass over a batch.

    Args:
        x_a: ``[N, d_a]`` fp16/bf16/fp32, any strides.
        x_b: ``[N, d_b]`` same dtype and device as ``x_a`` (may be ``x_a`` itself).
        shift_a, shift_b: ``[d_a]``, ``[d_b]`` float32 shifts (typically running means).
        out: optional float32 ``[d_a, d_b]``; when given the cross product is *added* to it
            in place, otherwise a fresh tensor is returned.
        center_b: centre the ``b`` operand of the GEMM too (default: only for float32 inputs).
        symmetric: ``x_b is x_a`` and ``shift_b is shift_a``: only tiles on or above the
            block diagonal of ``out`` are computed (the rest of ``out`` is left untouched),
            and ``sum_a``/``sumsq_a`` are copies of ``sum_b``/``sumsq_b``.
        allow_tf32: use TF32 tensor cores for float32 inputs (about 1e-3 relative error).
        split_k: split the sample axis over this many programs (float32 atomics); default
            picks one from the device size.
        block: ``(BLOCK_M, BLOCK_N, BLOCK_K)`` override (tests); default autotunes on GPU.

    Returns:
        ``(cross, sum_a, sumsq_a, sum_b, sumsq_b)``, all float32:
        ``cross = (x_a - shift_a)^T (x_b - c_b)`` (+ ``out``), with ``c_b = shift_b`` when
        ``center_b`` and 0 otherwise; ``sum_* = sum_rows(x - shift)``,
        ``sumsq_* = sum_rows((x - shift)^2)``.
    """
    if x_a.ndim != 2 or x_b.ndim != 2:
        raise ValueError(f"expected 2-D inputs, got x_a {tuple(x_a.shape)}, x_b {tuple(x_b.shape)}")
    n, d_a = x_a.shape
    n_b, d_b = x_b.shape
    if n != n_b:
        raise ValueError(f"x_a {tuple(x_a.shape)} and x_b {tuple(x_b.shape)} differ in rows")
    if x_a.dtype != x_b.dtype or x_a.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"x_a and x_b must share one of fp16/bf16/fp32, got {x_a.dtype} and {x_b.dtype}"
        )
    if x_a.device != x_b.device:
        raise ValueError(f"x_a on {x_a.device} but x_b on {x_b.device}")
    if symmetric and d_a != d_b:
        raise ValueError(f"symmetric=True needs d_a == d_b, got {d_a} and {d_b}")
    device = x_a.device
    shift_a = shift_a.to(device=device, dtype=torch.float32).contiguous()
    shift_b = shift_b.to(device=device, dtype=torch.float32).contiguous()
    if shift_a.shape != (d_a,) or shift_b.shape != (d_b,):
        raise ValueError(
            f"shifts must be [{d_a}] and [{d_b}], "
            f"got {tuple(shift_a.shape)}, {tuple(shift_b.shape)}"
        )
    accumulate = out is not None
    if out is None:
        out = _alloc((d_a, d_b), device, zero=False)
    elif out.shape != (d_a, d_b) or out.dtype != torch.float32 or out.device != device:
        raise ValueError(
            f"out must be float32 [{d_a}, {d_b}] on {device}, got {out.dtype} "
            f"{tuple(out.shape)} on {out.device}"
        )
    if center_b is None:
        center_b = x_a.dtype == torch.float32
    if split_k is None:
        split_k = _choose_split_k(n, d_a, d_b, device)
    split_k = max(1, int(split_k))
    atomic = split_k > 1
    if atomic and not accumulate:
        out.zero_()

    sum_b = _alloc((d_b,), device, zero=atomic)
    sumsq_b = _alloc((d_b,), device, zero=atomic)
    if symmetric:
        sum_a, sumsq_a = sum_b, sumsq_b
    else:
        sum_a = _alloc((d_a,), device, zero=atomic)
        sumsq_a = _alloc((d_a,), device, zero=atomic)

    if n == 0:
        if not accumulate:
            out.zero_()
        for t in (sum_a, sumsq_a, sum_b, sumsq_b):
            t.zero_()
        return out, sum_a, sumsq_a, sum_b, sumsq_b

    dot_dtype = _TL_DTYPE[x_a.dtype]
    precision = "tf32" if (allow_tf32 and x_a.dtype == torch.float32) else "ieee"
    args = (
        x_a, x_b, shift_a, shift_b, out, sum_a, sumsq_a, sum_b, sumsq_b,
        n, d_a, d_b,
        x_a.stride(0), x_a.stride(1), x_b.stride(0), x_b.stride(1),
        out.stride(0), out.stride(1),
        split_k,
    )  # fmt: skip
    flags = dict(
        DOT_DTYPE=dot_dtype,
        INPUT_PRECISION=precision,
        CENTER_B=bool(center_b),
        ACCUMULATE=accumulate,
        SYMMETRIC=bool(symmetric),
        ATOMIC=atomic,
        EMULATE_DOT=_EMULATE.get(x_a.dtype, 0) if _interpreting() else 0,
    )
    if block is None and _interpreting():
        block = _INTERPRET_BLOCK
    if block is not None:
        bm, bn, bk = block
        if symmetric and bm != bn:
            raise ValueError(f"symmetric=True needs BLOCK_M == BLOCK_N, got {block}")
        grid = (triton.cdiv(d_a, bm) * triton.cdiv(d_b, bn), split_k)
        _corr_update_kernel[grid](*args, **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=4)
    else:

        def grid(meta):
            tiles = triton.cdiv(d_a, meta["BLOCK_M"]) * triton.cdiv(d_b, meta["BLOCK_N"])
            return (tiles, split_k)

        _tuned_kernel[grid](*args, **flags)
    return out, sum_a, sumsq_a, sum_b, sumsq_b
