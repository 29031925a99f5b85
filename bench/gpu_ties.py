"""GPU check of the fused TIES path (Triton): self-check against torch, and % of copy bandwidth.

On a CUDA device: TIES (density 0.2) of K = 3 fine-tunes of the 156M-parameter bf16
Llama-style dict of ``bench_ties.py``, through ``merge_task_vectors(..., backend="triton")``.

* self-check: the Triton result equals the torch path's (``backend="torch"``, on the GPU too)
  on every tensor (same masks; values bit-equal or within 1 bf16 ulp), before any timing;
* bandwidth: bytes a one-pass merge must move, ``(K + 1) * read + 1 * write`` of the dict,
  divided by the time, against a device-to-device copy of the same byte count
  (``torch.Tensor.copy_``); the bar of issue 10 is 60% of copy bandwidth. The fused path
  makes 2 passes over the inputs for bf16 TIES (radix-select histograms, then the merge;
  plus per-block tie counts), so the figure also prints the passes' own bandwidth.

    python bench/gpu_ties.py                # the bar's dict
    python bench/gpu_ties.py --quick        # 30M parameters
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_ties import fine_tunes, llama_like  # noqa: E402

from pymerge.ops import TaskVectorParams, merge_task_vectors  # noqa: E402


def _time(fn, repeats: int) -> list[float]:
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 2
    dev = torch.device("cuda")
    base = llama_like(hidden=512, layers=4, vocab=16000, inter=1536) if args.quick else llama_like()
    states = fine_tunes(base, 3)
    base = {k: v.to(dev) for k, v in base.items()}
    states = [{k: v.to(dev) for k, v in s.items()} for s in states]
    p = TaskVectorParams.make(3, density=0.2, normalize=True)

    def run(backend):
        return merge_task_vectors(
            states, base, p, sparsify="magnitude", consensus=True, backend=backend
        )

    ours, ref = run("triton"), run("torch")
    worst = 0
    for k in ref:
        diff = (ours[k].float() - ref[k].float()).abs()
        ulp = torch.finfo(torch.bfloat16).eps * ref[k].float().abs().clamp(min=1e-30)
        worst = max(worst, int((diff > ulp).sum()))
    print(f"self-check against torch: {worst} entries beyond 1 ulp (want 0)")
    if worst:
        return 1
    n = sum(v.numel() for v in base.values())
    nbytes = n * 2 * (3 + 1 + 1)
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev)
    dst = torch.empty_like(src)
    t_copy = min(_time(lambda: dst.copy_(src), args.repeats))
    t_ties = _time(lambda: run("triton"), args.repeats)
    copy_bw = 2 * nbytes / t_copy  # a copy reads and writes nbytes
    ties_bw = nbytes / min(t_ties)
    print(f"{torch.cuda.get_device_name(0)}; {n / 1e6:.1f}M bf16 params, K = 3")
    print(f"copy {2 * nbytes / 1e9:.2f} GB: {1e3 * t_copy:.2f} ms, {copy_bw / 1e9:.0f} GB/s")
    print(
        f"TIES: median {1e3 * statistics.median(t_ties):.2f} ms, min {1e3 * min(t_ties):.2f} ms; "
        f"one-pass bytes / time = {ties_bw / 1e9:.0f} GB/s = {100 * ties_bw / copy_bw:.0f}% of "
        "copy bandwidth (bar: 60%)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
