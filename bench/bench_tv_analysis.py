"""Task-vector analysis on a 156M-parameter bf16 Llama-style state dict, K = 3 fine-tunes.

``pymerge.task_vector_similarity`` (one streaming pass per tensor, K x K Grams accumulated
in float64) against a straightforward torch implementation: flatten every task vector of the
whole model into one float32 row (``torch.cat``), cosines by one matmul, sign agreement by
comparing the sign vectors pair by pair; the per-layer matrices the same way on each layer's
concatenation. Both give the whole-model and per-layer cosine and sign-agreement matrices;
they are checked to agree, then timed in the same run (median wall time), with the peak
resident memory each adds (Linux: VmHWM after resetting it through /proc/self/clear_refs).

    python bench/bench_tv_analysis.py           # 156M parameters (hidden 1024, 8 layers, 32k)
    python bench/bench_tv_analysis.py --threads 2   # both on torch's two threads
    python bench/bench_tv_analysis.py --quick   # a 22M-parameter dict, for a smoke run

The whole-model cosines of both are also compared with a float64 reference (per-tensor
float64 Grams, summed).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import time
from collections import defaultdict
from pathlib import Path

import torch

import pymerge

_LAYER = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def llama_like(hidden=1024, layers=8, vocab=32000, inter=2304, seed=0) -> dict:
    """Random bf16 tensors with a Llama's keys and shapes (std 0.02, norms near 1)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (0.02 * torch.randn(*shape, generator=g)).to(torch.bfloat16)

    def norm():
        return (1 + 0.02 * torch.randn(hidden, generator=g)).to(torch.bfloat16)

    sd = {"model.embed_tokens.weight": rnd(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{n}.weight"] = rnd(hidden, hidden)
        sd[p + "mlp.gate_proj.weight"] = rnd(inter, hidden)
        sd[p + "mlp.up_proj.weight"] = rnd(inter, hidden)
        sd[p + "mlp.down_proj.weight"] = rnd(hidden, inter)
        sd[p + "input_layernorm.weight"] = norm()
        sd[p + "post_attention_layernorm.weight"] = norm()
    sd["model.norm.weight"] = norm()
    sd["lm_head.weight"] = rnd(vocab, hidden)
    return sd


def fine_tunes(base: dict, k: int, scale: float = 1e-3, seed: int = 1) -> list[dict]:
    """Base plus N(0, scale^2) noise, in bf16 (a shared direction makes the cosines
    nonzero: fine-tune i adds (i+1)/k of one common offset)."""
    g = torch.Generator().manual_seed(seed)
    common = {n: scale * torch.randn(t.shape, generator=g) for n, t in base.items()}
    out = []
    for i in range(k):
        sd = {}
        for n, t in base.items():
            noise = scale * torch.randn(t.shape, generator=g)
            sd[n] = (t.float() + noise + (i + 1) / k * common[n]).to(torch.bfloat16)
        out.append(sd)
    return out


def straightforward(states, base):
    """Flatten + matmul: the whole model, then every layer group."""

    def analyse(keys):
        t = torch.stack(
            [
                torch.cat([(s[k].float() - base[k].float()).reshape(-1) for k in keys])
                for s in states
            ]
        )
        unit = t / t.norm(dim=1, keepdim=True)
        cos = (unit @ unit.T).double()
        s = torch.sign(t)
        k = len(states)
        sign = torch.empty(k, k, dtype=torch.float64)
        for i in range(k):
            for j in range(k):
                both = (s[i] != 0) & (s[j] != 0)
                sign[i, j] = ((s[i] == s[j]) & both).sum() / both.sum()
        return cos, sign

    groups = defaultdict(list)
    for k in base:
        m = _LAYER.match(k)
        groups[m.group(1) if m else k].append(k)
    whole = analyse(list(base))
    per = {g: analyse(keys) for g, keys in groups.items()}
    return whole, per


def reference64(states, base) -> torch.Tensor:
    """Whole-model cosines from float64 Grams summed over the tensors (accuracy check)."""
    k = len(states)
    gram = torch.zeros(k, k, dtype=torch.float64)
    for key in base:
        t = torch.stack([(s[key].double() - base[key].double()).reshape(-1) for s in states])
        gram += t @ t.T
    d = gram.diagonal().sqrt()
    return gram / (d[:, None] * d[None, :])


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def measure(fn, repeats: int):
    """(median seconds, peak extra resident MiB, result of the last call)."""
    times, peaks, out = [], [], None
    for _ in range(repeats):
        ok = _reset_peak()
        before = _rss_kib("VmRSS")
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
        peaks.append((_rss_kib("VmHWM") - before) / 1024 if ok else float("nan"))
        del out
        out = None
    out = fn()
    times.sort()
    return times[len(times) // 2], max(peaks), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        base = llama_like(hidden=512, layers=4, vocab=8000, inter=1536)
    else:
        base = llama_like()
    states = fine_tunes(base, args.k)
    n = sum(t.numel() for t in base.values())
    print(f"{n / 1e6:.1f}M parameters, bf16, K={args.k}, torch threads={torch.get_num_threads()}")

    ours_s, ours_mib, ours = measure(
        lambda: pymerge.task_vector_similarity(states, base=base, threads=None), args.repeats
    )
    ref_s, ref_mib, (whole, per) = measure(lambda: straightforward(states, base), args.repeats)

    exact = reference64(states, base)
    err_ours = float((ours.cosine - exact).abs().max())
    err_ref = float((whole[0] - exact).abs().max())
    err_sign = float((ours.sign_agreement - whole[1]).abs().max())
    err_layer = 0.0
    for g, (c, sg) in per.items():
        lc, ls = ours.layer(g)
        err_layer = max(err_layer, float((lc - c).abs().max()))
        err_sign = max(err_sign, float((ls - sg).abs().max()))
    assert err_ours < 1e-9 and err_sign < 1e-6 and err_layer < 1e-2, (err_ours, err_sign, err_layer)

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores")
    print(
        f"whole-model cosine vs float64: pymerge {err_ours:.1e}, straightforward {err_ref:.1e}; "
        f"per-layer cosines differ by <= {err_layer:.1e}, sign agreement by <= {err_sign:.1e}"
    )
    print(f"| implementation | time (median of {args.repeats}) | peak extra memory |")
    print("| --- | --- | --- |")
    print(
        f"| pymerge.task_vector_similarity (streaming, per tensor) | {ours_s:.2f} s | "
        f"{ours_mib:.0f} MiB |"
    )
    print(
        f"| straightforward torch (flatten + matmul, per layer too) | {ref_s:.2f} s | "
        f"{ref_mib:.0f} MiB |"
    )
    print(f"speed-up: {ref_s / ours_s:.1f}x")
    print("whole-model cosine:\n", ours.cosine.numpy().round(4))


if __name__ == "__main__":
    main()
