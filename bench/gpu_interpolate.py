"""GPU benchmark: state-dict interpolation and permuted interpolation (Triton) vs peers.

Bars (issue 3):
* ``interpolate`` of a ~1B-parameter bf16 state dict (K=2) at >= 80% of the measured
  device-to-device copy bandwidth, counting bytes read and written
  (copy: 2 x bytes; interpolate: (K + 1) x bytes).
* ``permuted_interpolate`` at least 1.5x faster than torch gather-then-lerp
  (``index_select`` per permuted axis, then ``torch.lerp``).

Every pymerge result is checked against its torch peer before it is timed (the script
exits with status 1 on a mismatch). Times are ``triton.testing.do_bench`` medians.

    python bench/gpu_interpolate.py                 # ~1B params
    python bench/gpu_interpolate.py --params 2e8    # smaller card / quicker
    python bench/gpu_interpolate.py --sweep         # also sweep kernel block sizes
    python bench/gpu_interpolate.py --cpu-dry-run   # no GPU: tiny sizes, Triton interpreter
                                                    # (checks the script, times are meaningless)
"""

from __future__ import annotations

import argparse
import sys

import torch

DT = torch.bfloat16
DEVICE = "cuda"
DRY = False  # --cpu-dry-run: tiny sizes on CPU under TRITON_INTERPRET=1 (checks the script)


def transformer_state(params: float, seed: int, d: int = 2048, vocab: int = 32000):
    """GPT-like bf16 state dict of about ``params`` parameters + the permuted-axes map."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    gc = torch.Generator().manual_seed(1234)  # same perms for every seed
    per_layer = 12 * d * d + 13 * d
    layers = max(1, int((params - vocab * d) // per_layer))
    res = torch.randperm(d, generator=gc).to(DEVICE)

    def rnd(*shape):
        return (torch.randn(shape, generator=g, device=DEVICE) * 0.02).to(DT)

    sd = {"emb.weight": rnd(vocab, d)}
    spec = {"emb.weight": ((1, res),)}
    for i in range(layers):
        hid = torch.randperm(4 * d, generator=gc).to(DEVICE)
        qkv = torch.randperm(3 * d, generator=gc).to(DEVICE)
        p = f"blk{i}."
        items = {
            "ln1.weight": ((d,), ((0, res),)),
            "ln1.bias": ((d,), ((0, res),)),
            "attn.in_proj_weight": ((3 * d, d), ((0, qkv), (1, res))),
            "attn.in_proj_bias": ((3 * d,), ((0, qkv),)),
            "attn.out_proj.weight": ((d, d), ((0, res),)),
            "attn.out_proj.bias": ((d,), ((0, res),)),
            "ln2.weight": ((d,), ((0, res),)),
            "ln2.bias": ((d,), ((0, res),)),
            "fc1.weight": ((4 * d, d), ((0, hid), (1, res))),
            "fc1.bias": ((4 * d,), ((0, hid),)),
            "fc2.weight": ((d, 4 * d), ((0, res), (1, hid))),
            "fc2.bias": ((d,), ((0, res),)),
        }
        for name, (shape, axes) in items.items():
            sd[p + name] = rnd(*shape)
            spec[p + name] = axes
    sd["ln_f.weight"] = rnd(d)
    spec["ln_f.weight"] = ((0, res),)
    return sd, spec


def small_state(seed: int):
    """ResNet-20-like fp32 state dict on the GPU: ~100 small tensors (per-call overhead)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    sd = {}
    cin = 3
    for i, c in enumerate([16] * 7 + [32] * 6 + [64] * 6):
        sd[f"l{i}.conv.weight"] = torch.randn(c, cin, 3, 3, generator=g, device=DEVICE)
        for n in ("weight", "bias", "running_mean", "running_var"):
            sd[f"l{i}.bn.{n}"] = torch.randn(c, generator=g, device=DEVICE)
        cin = c
    sd["fc.weight"] = torch.randn(10, 64, generator=g, device=DEVICE)
    return sd


# ----------------------------------------------------------------------------- peers


def foreach_sum(states, w):
    keys = list(states[0])
    acc = torch._foreach_mul([states[0][k] for k in keys], w[0])
    for s, wk in zip(states[1:], w[1:], strict=True):
        torch._foreach_add_(acc, [s[k] for k in keys], alpha=wk)
    return dict(zip(keys, acc, strict=True))


def foreach_lerp(states, t):
    keys = list(states[0])
    out = torch._foreach_lerp([states[0][k] for k in keys], [states[1][k] for k in keys], t)
    return dict(zip(keys, out, strict=True))


def gather_then_lerp(a, b, alphas, spec):
    bp = {}
    for k, v in b.items():
        for axis, idx in spec.get(k, ()):
            v = v.index_select(axis, idx)
        bp[k] = v
    return [{k: torch.lerp(a[k], bp[k], al) for k in a} for al in alphas]


# ----------------------------------------------------------------------------- helpers

ROWS: list[tuple] = []
FAILED: list[str] = []


def bench(fn) -> float:
    import triton.testing

    if DRY:
        import time

        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")


def row(case, impl, ms, nbytes=None, ratio=None):
    gbs = nbytes / ms / 1e6 if nbytes else None
    ROWS.append((case, impl, ms, gbs, ratio))
    g = f"{gbs:9.0f}" if gbs else " " * 9
    r = f"{ratio:8.2f}" if ratio is not None else ""
    print(f"{case:34s} {impl:28s} {ms:9.3f} {g} {r}", flush=True)


def check(name, got: dict, ref: dict, rtol=1e-2, atol=1e-3):
    for k in ref:
        if not torch.allclose(got[k].float(), ref[k].float(), rtol=rtol, atol=atol):
            err = (got[k].float() - ref[k].float()).abs().max().item()
            FAILED.append(f"{name}: key {k} max err {err:.3g}")
            print(f"  CHECK FAILED {name} {k}: max err {err:.3g}", flush=True)
            return
    print(f"  check ok: {name}", flush=True)


def nbytes(sd) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


def copy_time(n: int) -> float:
    src = torch.empty(n, dtype=DT, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    return bench(lambda: dst.copy_(src))


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=1e9)
    ap.add_argument("--alphas-params", type=float, default=2e8, help="model size for 25 alphas")
    ap.add_argument("--sweep", action="store_true", help="sweep kernel block sizes")
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny CPU run (interpreter)")
    args = ap.parse_args()
    global DEVICE, DRY
    dims = {}
    if args.cpu_dry_run:
        import os

        os.environ["TRITON_INTERPRET"] = "1"
        DEVICE, DRY = "cpu", True
        args.params, args.alphas_params = 3e4, 2e4
        dims = {"d": 32, "vocab": 50}
    elif not torch.cuda.is_available():
        print("no CUDA device: this script needs a GPU", file=sys.stderr)
        return 2
    from pymerge.kernels import interpolate as ki
    from pymerge.kernels import permuted_interpolate as kp

    from pymerge._util.cache import LRUCache
    from pymerge.ops import interpolate, permuted_interpolate

    name = "cpu (dry run)" if DRY else torch.cuda.get_device_name(0)
    print(f"device: {name}, torch {torch.__version__}")
    be = "triton"  # forced, so a dry run exercises the kernels too
    print(f"{'case':34s} {'impl':28s} {'ms':>9s} {'GB/s':>9s} {'ratio':>8s}")

    # --- copy bandwidth
    a, spec = transformer_state(args.params, 0, **dims)
    b, _ = transformer_state(args.params, 1, **dims)
    n_par = sum(t.numel() for t in a.values())
    size = nbytes(a)
    print(f"state dict: {len(a)} tensors, {n_par / 1e9:.3f} B params, {size / 2**30:.2f} GiB bf16")
    t_copy = copy_time(n_par)
    copy_bw = 2 * size / t_copy / 1e6
    row("copy (D2D)", "tensor.copy_", t_copy, 2 * size)

    # --- interpolate, K=2
    case = f"interpolate K=2 {n_par / 1e9:.2f}B bf16"
    w = [0.3, 0.7]
    got = interpolate([a, b], w, backend=be)
    check(case, got, foreach_lerp([a, b], 0.7))
    del got
    t = bench(lambda: interpolate([a, b], w, backend=be))
    row(case, "pymerge (triton)", t, 3 * size, (3 * size / t / 1e6) / copy_bw)
    t_fe = bench(lambda: foreach_sum([a, b], w))
    row(case, "torch foreach mul+add_", t_fe, 3 * size, t_fe / t)
    t_le = bench(lambda: foreach_lerp([a, b], 0.7))
    row(case, "torch foreach lerp", t_le, 3 * size, t_le / t)
    print(f"  bar: bandwidth / copy bandwidth = {(3 * size / t / 1e6) / copy_bw:.2f} (>= 0.80)")

    if args.sweep:
        keys = list(a)
        rows = [[a[k], b[k]] for k in keys]
        numels = [a[k].numel() for k in keys]
        offs, total = [], 0
        for n in numels:
            offs.append(total)
            total += -(-n // 8) * 8
        out = torch.empty(total, dtype=DT, device=DEVICE)
        wt = torch.tensor(w, device=DEVICE)
        tables = LRUCache(4)  # launch tables kept between calls, as the front keeps them
        for block in (1024, 2048, 4096, 8192):
            for nw in (4, 8):
                t_k = bench(
                    lambda bl=block, nw=nw: ki.weighted_sum_(
                        rows, wt, out, offs, block=bl, num_warps=nw, cache=tables
                    )
                )
                row(
                    case,
                    f"kernel BLOCK={block} warps={nw}",
                    t_k,
                    3 * size,
                    (3 * size / t_k / 1e6) / copy_bw,
                )
        del out

    # --- interpolate, many small tensors (host overhead)
    s = [small_state(i) for i in range(2)]
    case = "interpolate K=2 resnet20 fp32"
    check(case, interpolate(s, w, backend=be), foreach_sum(s, w), rtol=1e-5, atol=1e-6)
    t = bench(lambda: interpolate(s, w, backend=be))
    row(case, "pymerge (triton)", t)
    t_fe = bench(lambda: foreach_sum(s, w))
    row(case, "torch foreach mul+add_", t_fe, None, t_fe / t)
    t_tb = bench(lambda: interpolate(s, w, backend="torch"))
    row(case, "pymerge (torch backend)", t_tb, None, t_tb / t)

    # --- permuted interpolate, one alpha
    case = f"permuted alpha=0.5 {n_par / 1e9:.2f}B bf16"
    got = permuted_interpolate(a, b, 0.5, spec, backend=be)
    check(case, got, gather_then_lerp(a, b, [0.5], spec)[0])
    del got
    t = bench(lambda: permuted_interpolate(a, b, 0.5, spec, backend=be))
    row(case, "pymerge (triton)", t, 3 * size, (3 * size / t / 1e6) / copy_bw)
    t_g = bench(lambda: gather_then_lerp(a, b, [0.5], spec))
    row(case, "torch gather-then-lerp", t_g, 3 * size, t_g / t)
    print(f"  bar: gather-then-lerp / pymerge = {t_g / t:.2f} (>= 1.5)")
    if args.sweep:
        saved = (kp.DEFAULT_BR, kp.DEFAULT_BC, kp.DEFAULT_SEG, kp.DEFAULT_NUM_WARPS)
        for br, bc in ((1, 1024), (2, 512), (4, 512), (4, 256), (8, 256), (16, 128)):
            for nw in (4, 8):
                kp.DEFAULT_BR, kp.DEFAULT_BC, kp.DEFAULT_NUM_WARPS = br, bc, nw
                kp.DEFAULT_SEG = max(bc, 8192 // bc * bc)
                t_k = bench(lambda: permuted_interpolate(a, b, 0.5, spec, backend=be))
                row(case, f"BR={br} BC={bc} warps={nw}", t_k, 3 * size, t_g / t_k)
        kp.DEFAULT_BR, kp.DEFAULT_BC, kp.DEFAULT_SEG, kp.DEFAULT_NUM_WARPS = saved
    del a, b

    # --- permuted interpolate, 25 alphas (loss-barrier curve)
    a, spec = transformer_state(args.alphas_params, 0, **dims)
    b, _ = transformer_state(args.alphas_params, 1, **dims)
    size = nbytes(a)
    alphas = [i / 24 for i in range(25)]
    case = f"permuted 25 alphas {sum(t.numel() for t in a.values()) / 1e9:.2f}B bf16"
    got = permuted_interpolate(a, b, alphas, spec, backend=be)
    ref = gather_then_lerp(a, b, alphas, spec)
    for i in (0, 7, 24):
        check(f"{case} alpha[{i}]", got[i], ref[i])
    del got, ref
    moved = (2 + 25) * size
    t = bench(lambda: permuted_interpolate(a, b, alphas, spec, backend=be))
    row(case, "pymerge (triton)", t, moved, (moved / t / 1e6) / copy_bw)
    t_g = bench(lambda: gather_then_lerp(a, b, alphas, spec))
    row(case, "torch gather-once-then-lerp", t_g, moved, t_g / t)
    t_1 = bench(lambda: [permuted_interpolate(a, b, al, spec, backend=be) for al in alphas])
    row(case, "pymerge, one call per alpha", t_1, moved, t_1 / t)

    print("\nratio column: for pymerge rows, achieved bandwidth / copy bandwidth;")
    print("for peers, peer time / pymerge time (> 1: pymerge faster).")
    if FAILED:
        print("SELF-CHECK FAILURES:\n  " + "\n  ".join(FAILED))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
