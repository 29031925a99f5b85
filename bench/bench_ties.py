"""The TIES bar of issue 10: TIES (density 0.2) on K = 3 fine-tunes of a 156M-parameter bf16
Llama-style state dict, in memory on the CPU.

Rows, measured in one run and taking turns (one call of each per round, ``--rounds`` rounds):

* ``straightforward``: a per-tensor torch TIES as one would write it: task vectors, a
  ``kthvalue`` threshold per model, sign election, disjoint mean.
* ``floor``: ``pymerge.interpolate`` of the K + 1 state dicts (one read of every input, one
  write of the output): what any merge of these inputs must at least cost.
* ``pymerge``: ``pymerge.ops.merge_task_vectors(..., sparsify="magnitude", consensus=True)``
  (the fused path the ``ties`` method takes; ``--backend`` picks it, default auto).

Bar: pymerge at least 10x faster than straightforward and within 2.5x of the floor. The
machine may be shared: the load average is printed before and after, and minima beside the
medians. pymerge's result is checked against the straightforward one (they differ only where
``kthvalue`` keeps all the ties at the threshold and pymerge keeps exactly k; the fraction of
differing entries is printed).

    python bench/bench_ties.py                  # the bar: 156M params, 3 rounds
    python bench/bench_ties.py --quick          # a 20M-parameter dict, for a smoke run
    python bench/bench_ties.py --rounds=5 --backend=torch
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

import torch

from pymerge.ops import TaskVectorParams, interpolate, merge_task_vectors


def llama_like(
    hidden: int = 1024, layers: int = 8, vocab: int = 32000, inter: int = 2304, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A Llama-style bf16 state dict (random values): embeddings, per layer attention (q, k,
    v, o), MLP (gate, up, down) and two RMSNorm weights, a final norm and the LM head. The
    defaults give 155.7M parameters."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    sd = {"model.embed_tokens.weight": rnd(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{n}.weight"] = rnd(hidden, hidden)
        sd[p + "mlp.gate_proj.weight"] = rnd(inter, hidden)
        sd[p + "mlp.up_proj.weight"] = rnd(inter, hidden)
        sd[p + "mlp.down_proj.weight"] = rnd(hidden, inter)
        sd[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    sd["model.norm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    sd["lm_head.weight"] = rnd(vocab, hidden)
    return sd


def fine_tunes(base: dict, k: int, scale: float = 1e-3, seed: int = 1) -> list[dict]:
    """``k`` fine-tunes: base + small noise, in bf16."""
    g = torch.Generator().manual_seed(seed)
    return [
        {
            key: (v.float() + scale * torch.randn(v.shape, generator=g)).to(torch.bfloat16)
            for key, v in base.items()
        }
        for _ in range(k)
    ]


def straightforward_ties(states, base, density: float = 0.2) -> dict[str, torch.Tensor]:
    """Per tensor: trim each task vector to its top-k magnitudes (kthvalue threshold), elect
    the sign, average the agreeing entries."""
    out = {}
    for key, b in base.items():
        taus = []
        for s in states:
            tau = s[key] - b
            mag = tau.abs().float().reshape(-1)
            n = mag.numel()
            k = max(1, int(density * n))
            thr = torch.kthvalue(mag, n - k + 1).values
            taus.append(tau * (tau.abs().float() >= thr).to(tau.dtype))
        t = torch.stack(taus)
        sign = torch.sign(t.sum(0))
        agree = (torch.sign(t) == sign) & (t != 0)
        num = (t * agree).sum(0)
        cnt = agree.sum(0).clamp(min=1)
        out[key] = b + (num / cnt).to(b.dtype)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a 20M-parameter dict")
    ap.add_argument("--backend", default=None)
    ap.add_argument("--density", type=float, default=0.2)
    args = ap.parse_args()
    if args.quick:
        base = llama_like(hidden=512, layers=4, vocab=16000, inter=1536)
    else:
        base = llama_like()
    states = fine_tunes(base, 3)
    n_params = sum(v.numel() for v in base.values())
    params = TaskVectorParams.make(3, density=args.density, normalize=True)

    def ours():
        return merge_task_vectors(
            states, base, params, sparsify="magnitude", consensus=True, backend=args.backend
        )

    rows = {
        "straightforward": lambda: straightforward_ties(states, base, args.density),
        "floor": lambda: interpolate([base, *states], [1.0, 1.0, 1.0, 1.0]),
        "pymerge": ours,
    }
    print(
        f"# TIES density {args.density}, K = 3, {n_params / 1e6:.1f}M bf16 parameters, "
        f"{len(base)} tensors; {torch.get_num_threads()} torch threads; "
        f"load average {os.getloadavg()[0]:.2f} at start"
    )
    # warm-up (first-touch page faults, caches), and the check
    ref = rows["straightforward"]()
    got = ours()
    rows["floor"]()
    diff = sum(int((ref[k] != got[k]).sum()) for k in ref)
    print(
        f"# pymerge vs straightforward: {diff / n_params:.2e} of entries differ (ties at the "
        "threshold: kthvalue keeps them all, pymerge exactly k)"
    )
    del ref, got
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(args.rounds):
        for name, fn in rows.items():
            gc.collect()
            t0 = time.perf_counter()
            res = fn()
            times[name].append(time.perf_counter() - t0)
            del res
    print(f"# load average {os.getloadavg()[0]:.2f} at end")
    print(f"{'row':<16} {'median ms':>10} {'min ms':>10}")
    for name, ts in times.items():
        print(f"{name:<16} {1e3 * statistics.median(ts):>10.1f} {1e3 * min(ts):>10.1f}")
    med = {k: statistics.median(v) for k, v in times.items()}
    mins = {k: min(v) for k, v in times.items()}
    for label, t in (("median", med), ("min", mins)):
        print(
            f"# {label}: straightforward / pymerge = {t['straightforward'] / t['pymerge']:.1f}x "
            f"(bar >= 10x); pymerge / floor = {t['pymerge'] / t['floor']:.2f}x (bar <= 2.5x)"
        )


if __name__ == "__main__":
    main()
