"""GPU benchmark of the fused correlation update (Triton) with its own correctness checks.

Run on a CUDA machine::

    python bench/gpu_correlation.py             # N=65536, d=4096 bf16 (the issue's shape)
    python bench/gpu_correlation.py --quick     # N=16384, d=2048

Bars (issue 3): the fused update within 1.15x of a bare ``torch.matmul`` of the same shape
(``x_a^T x_b``, bf16 in, cuBLAS) and at least 1.5x faster than the unfused torch reference.

First it checks the Triton path against float64 statistics on awkward small shapes
(fp32/fp16/bf16, self and joint modes, TF32 on and off) and against the torch backend on
the benchmark shape; any failure exits with status 1 before timing. Timings are medians of
``triton.testing.do_bench``.

Rows:
* ``matmul``: ``torch.matmul(x_a.T, x_b)``, bf16 output (cuBLAS; the bar's reference).
* ``matmul fp32-out``: the same GEMM with a float32 result, when torch offers ``out_dtype``.
* ``kernel``: ``pymerge.kernels.correlation.correlation_update`` accumulating into float32.
* ``update``: ``CorrelationAccumulator.update`` with ``check_finite=False`` (kernel + the
  O(d^2) rank-2 merge), warm accumulator.
* ``update+check``: the default ``check_finite=True`` (one extra read of both inputs and a
  device sync per batch).
* ``unfused``: the plain torch reference: column means, centred bf16 copies of both inputs,
  bf16 GEMM, float32 sums of squares, merge.
* ``self`` rows: ``CorrelationAccumulator(d)`` (Gram / self-correlation, symmetric kernel)
  against ``torch.matmul(x.T, x)``.
"""

from __future__ import annotations

import argparse
import sys

import torch

# (N, d_a, d_b) of the float64 checks: not multiples of any tile, 3-row, very tall, square
CHECK_SHAPES = [(1000, 130, 77), (3, 300, 5), (4099, 257, 1), (129, 64, 64)]
TF32_SHAPE = (2048, 300, 200)


def _fail(msg: str) -> None:
    print(f"CHECK FAILED: {msg}")
    sys.exit(1)


def _ref_corr(xa: torch.Tensor, xb: torch.Tensor | None) -> torch.Tensor:
    a = xa.double()
    b = a if xb is None else xb.double()
    ca, cb = a - a.mean(0), b - b.mean(0)
    na, nb = ca.norm(dim=0), cb.norm(dim=0)
    ia = torch.where(na > 0, 1 / na, torch.zeros_like(na))
    ib = torch.where(nb > 0, 1 / nb, torch.zeros_like(nb))
    corr = (ca.T @ cb) * ia[:, None] * ib[None, :]
    if xb is None:
        corr.diagonal().copy_((na > 0).double())
    return corr


def self_check(dev: torch.device) -> list[str]:
    from pymerge.ops import CorrelationAccumulator

    lines = []
    tol = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
    g = torch.Generator(device="cpu").manual_seed(0)
    shapes = CHECK_SHAPES
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for n, d_a, d_b in shapes:
            xa = (torch.randn(n, d_a, generator=g) + 50).to(dtype).to(dev)
            xb = (torch.randn(n, d_b, generator=g) - 3 + 0.1 * xa[:, :1].float().cpu()).to(dtype)
            xb = xb.to(dev)
            xa_nc = xa.T.contiguous().T  # column-major copy: non-contiguous strides
            for mode in ("cross", "self", "joint"):
                acc = CorrelationAccumulator(
                    d_a, None if mode == "self" else d_b, backend="triton", joint=mode == "joint"
                )
                cuts = [0, n // 3, n // 3 + 1, n]
                for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
                    if mode == "self":
                        acc.update(xa_nc[lo:hi])
                    else:
                        acc.update(xa_nc[lo:hi], xb[lo:hi])
                if mode == "joint":
                    got = acc.joint_correlation()
                    ref = _ref_corr(torch.cat([xa, xb], 1).cpu(), None)
                else:
                    got = acc.correlation()
                    ref = _ref_corr(xa.cpu(), None if mode == "self" else xb.cpu())
                err = float((got.double().cpu() - ref).abs().max())
                if not err < tol[dtype] or acc.last_backend != "triton":
                    _fail(f"{dtype} {mode} N={n} d=({d_a},{d_b}): max error {err:.2e}")
            lines.append(f"ok  {str(dtype):15s} N={n:5d} d_a={d_a:4d} d_b={d_b:4d}")
    n, d_a, d_b = TF32_SHAPE
    xa = torch.randn(n, d_a, generator=g).to(dev)
    xb = torch.randn(n, d_b, generator=g).to(dev) + xa[:, :d_b]
    acc = CorrelationAccumulator(d_a, d_b, backend="triton", allow_tf32=True)
    acc.update(xa, xb)
    err = float((acc.correlation().double().cpu() - _ref_corr(xa.cpu(), xb.cpu())).abs().max())
    if not err < 5e-3:
        _fail(f"tf32 max error {err:.2e}")
    lines.append(f"ok  tf32 float32 max error {err:.1e}")
    return lines


class Unfused:
    """The straightforward torch version of the same streaming update (bf16 GEMM)."""

    def __init__(self, d_a: int, d_b: int, dev: torch.device) -> None:
        z = dict(device=dev, dtype=torch.float32)
        self.n = 0
        self.mean_a, self.mean_b = torch.zeros(d_a, **z), torch.zeros(d_b, **z)
        self.m2_a, self.m2_b = torch.zeros(d_a, **z), torch.zeros(d_b, **z)
        self.m2 = torch.zeros(d_a, d_b, **z)

    def update(self, xa: torch.Tensor, xb: torch.Tensor) -> None:
        nb = xa.shape[0]
        ma, mb = xa.mean(0, dtype=torch.float32), xb.mean(0, dtype=torch.float32)
        ca, cb = (xa - ma).to(xa.dtype), (xb - mb).to(xb.dtype)
        n = self.n + nb
        da, db = ma - self.mean_a, mb - self.mean_b
        c = self.n * nb / n
        self.m2 += torch.matmul(ca.T, cb).float() + c * torch.outer(da, db)
        self.m2_a += ca.float().square().sum(0) + c * da * da
        self.m2_b += cb.float().square().sum(0) + c * db * db
        self.mean_a += da * nb / n
        self.mean_b += db * nb / n
        self.n = n


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--d", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU (the CPU one is bench_correlation.py)")
        sys.exit(0)
    import triton
    from pymerge.kernels.correlation import correlation_update
    from triton.testing import do_bench

    from pymerge.ops import CorrelationAccumulator

    dev = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    n = args.n or (16384 if args.quick else 65536)
    d = args.d or (2048 if args.quick else 4096)
    print(f"# {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, triton "
          f"{triton.__version__}; N={n}, d_a=d_b={d}, {args.dtype}")  # fmt: skip

    for line in self_check(dev):
        print(line)

    g = torch.Generator(device=dev).manual_seed(1)
    xa = torch.randn(n, d, device=dev, generator=g).to(dtype) + 2.0
    xb = (torch.randn(n, d, device=dev, generator=g) + 0.3 * xa.float() - 1.0).to(dtype)

    # the benchmark shape: Triton against the torch backend (float32 GEMM on upcast inputs)
    fused = CorrelationAccumulator(d, d, backend="triton", check_finite=False)
    fused.update(xa, xb)
    plain = CorrelationAccumulator(d, d, backend="torch")
    plain.update(xa, xb)
    err = float((fused.correlation() - plain.correlation()).abs().max())
    if not err < {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-4}[dtype]:
        _fail(f"benchmark shape: Triton vs torch backend max |dcorr| = {err:.2e}")
    print(f"ok  benchmark shape: Triton vs torch backend max |dcorr| = {err:.1e}")
    del plain
    torch.cuda.empty_cache()

    flops = 2.0 * n * d * d
    rows: list[tuple[str, float]] = []

    def bench(name: str, fn) -> float:
        fn()
        torch.cuda.synchronize()
        ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
        rows.append((name, ms))
        return ms

    t_mm = bench("matmul", lambda: torch.matmul(xa.T, xb))
    try:
        torch.mm(xa.T, xb, out_dtype=torch.float32)
        bench("matmul fp32-out", lambda: torch.mm(xa.T, xb, out_dtype=torch.float32))
    except (TypeError, RuntimeError):
        pass
    out = torch.zeros(d, d, device=dev)
    ka = xa[:1].float().reshape(-1)
    kb = xb[:1].float().reshape(-1)
    t_kernel = bench("kernel", lambda: correlation_update(xa, xb, ka, kb, out=out))
    t_update = bench("update", lambda: fused.update(xa, xb))
    checked = CorrelationAccumulator(d, d, backend="triton")
    checked.update(xa, xb)
    bench("update+check", lambda: checked.update(xa, xb))
    ref = Unfused(d, d, dev)
    ref.update(xa, xb)
    t_unfused = bench("unfused", lambda: ref.update(xa, xb))

    torch.cuda.empty_cache()
    t_self_mm = bench("self: matmul x^T x", lambda: torch.matmul(xa.T, xa))
    gram = CorrelationAccumulator(d, backend="triton", check_finite=False)
    gram.update(xa)
    t_self = bench("self: update (symmetric)", lambda: gram.update(xa))

    print()
    print("| case | median ms | TFLOP/s (2Nd^2) | vs matmul |")
    print("|---|---|---|---|")
    for name, ms in rows:
        base = t_self_mm if name.startswith("self") else t_mm
        print(f"| {name} | {ms:.3f} | {flops / ms / 1e9:.0f} | {ms / base:.2f}x |")
    print()
    ok1 = t_update <= 1.15 * t_mm
    ok2 = t_unfused >= 1.5 * t_update
    print(f"bar 1: update / matmul = {t_update / t_mm:.3f} (<= 1.15: {'PASS' if ok1 else 'FAIL'});"
          f" kernel alone {t_kernel / t_mm:.3f}")  # fmt: skip
    print(f"bar 2: unfused / update = {t_unfused / t_update:.2f} (>= 1.5: "
          f"{'PASS' if ok2 else 'FAIL'})")  # fmt: skip
    print(f"self (Gram) update / matmul = {t_self / t_self_mm:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
