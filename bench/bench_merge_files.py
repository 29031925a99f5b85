"""From files to files: ``pymerge merge`` against ``mergekit-yaml`` on real-size checkpoints.

Builds (in ``--root``, default ``/tmp/pymerge-bench``; ``df -h`` it first) a Llama-style
base model and fine-tunes of it, each one bf16 safetensors file with a transformers-style
``config.json``, then times both tools on mergekit's own YAML with ``/usr/bin/time -v``
(wall clock and peak RSS of the whole process, imports included), the runs taking turns,
and compares their output tensors.

    python bench/bench_merge_files.py compare --method ties          # the issue's bar
    python bench/bench_merge_files.py big                             # 3 x 1 GiB TIES, RSS
    python bench/bench_merge_files.py wm                              # weight matching, RSS
    python bench/bench_merge_files.py clean                           # delete the models

``compare``: three 150M-parameter fine-tunes (hidden 1024, 8 layers, vocab 32000, MLP 2048,
16 heads, untied head) of one base; TIES with density 0.2, weight 1, ``normalize: true``,
``dtype: bfloat16`` (``--method`` picks another method both tools have: its mergekit
parameters are filled in). ``big``: the same shape scaled to 1 GiB each (hidden 2048,
MLP 5632, 8 layers, vocab 32000); TIES through ``pymerge merge`` under ``/usr/bin/time``
(peak RSS) and the output compared with the in-memory ``pymerge.merge`` of the same
checkpoints. Results are printed as Markdown rows for ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

SMALL = dict(hidden=1024, layers=8, vocab=32000, inter=2048, heads=16)
BIG = dict(hidden=2048, layers=8, vocab=32000, inter=5632, heads=16)

PARAMS = {  # mergekit's parameters for each method (per model, global)
    "ties": ({"density": 0.2, "weight": 1.0}, {"normalize": True}),
    "task_arithmetic": ({"weight": 1.0}, {"normalize": True}),
    "dare_ties": ({"density": 0.2, "weight": 1.0}, {"normalize": True}),
    "linear": ({"weight": 1.0}, {"normalize": True}),
    "breadcrumbs_ties": ({"density": 0.2, "gamma": 0.01, "weight": 1.0}, {"normalize": True}),
    "model_stock": ({}, {}),
    "sce": ({"weight": 1.0}, {"select_topk": 0.2}),
}
NEEDS_BASE = {"ties", "task_arithmetic", "dare_ties", "breadcrumbs_ties", "model_stock", "sce"}


def shapes(hidden, layers, vocab, inter, heads):
    h = hidden
    out = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(layers):
        m = f"model.layers.{i}"
        out.update(
            {
                f"{m}.input_layernorm.weight": (h,),
                f"{m}.self_attn.q_proj.weight": (h, h),
                f"{m}.self_attn.k_proj.weight": (h, h),
                f"{m}.self_attn.v_proj.weight": (h, h),
                f"{m}.self_attn.o_proj.weight": (h, h),
                f"{m}.post_attention_layernorm.weight": (h,),
                f"{m}.mlp.gate_proj.weight": (inter, h),
                f"{m}.mlp.up_proj.weight": (inter, h),
                f"{m}.mlp.down_proj.weight": (h, inter),
            }
        )
    out["model.norm.weight"] = (h,)
    out["lm_head.weight"] = (vocab, h)
    return out


def config(hidden, layers, vocab, inter, heads):
    h = hidden
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": h,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def make_models(root: Path, size: dict, n_ft: int, tag: str) -> list[Path]:
    """base + n_ft fine-tunes (base + 0.1 * the base's scale of noise), bf16, one file each."""
    from safetensors.torch import save_file

    folders = [root / f"{tag}-base"] + [root / f"{tag}-ft{i}" for i in range(n_ft)]
    if all((f / "model.safetensors").is_file() for f in folders):
        return folders
    shp = shapes(**size)
    g = torch.Generator().manual_seed(0)
    base = {}
    for k, s in shp.items():
        t = torch.randn(*s, generator=g) * (0.02 if len(s) > 1 else 0.1)
        base[k] = (t + 1.0 if len(s) == 1 else t).bfloat16()
    for i, folder in enumerate(folders):
        folder.mkdir(parents=True, exist_ok=True)
        if i == 0:
            state = base
        else:
            gi = torch.Generator().manual_seed(100 + i)
            state = {
                k: (v.float() + 0.002 * torch.randn(v.shape, generator=gi)).bfloat16()
                for k, v in base.items()
            }
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(config(**size), indent=2))
        del state
    return folders


def yaml_config(method: str, folders: list[Path]) -> str:
    per, glob = PARAMS[method]
    base, fts = folders[0], folders[1:]
    lines = ["models:"]
    for f in fts:
        lines.append(f"  - model: {f}")
        if per:
            lines.append("    parameters:")
            lines += [f"      {k}: {json.dumps(v)}" for k, v in per.items()]
    lines.append(f"merge_method: {method}")
    if method in NEEDS_BASE:
        lines.append(f"base_model: {base}")
    if glob:
        lines.append("parameters:")
        lines += [f"  {k}: {json.dumps(v)}" for k, v in glob.items()]
    lines.append("dtype: bfloat16")
    return "\n".join(lines) + "\n"


def timed(cmd: list[str], env=None) -> dict:
    """Wall clock and peak RSS of ``cmd`` from GNU time."""
    full = ["/usr/bin/time", "-v", *cmd]
    t0 = time.perf_counter()
    proc = subprocess.run(full, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    el = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", proc.stderr)
    parts = [float(x) for x in el.group(1).split(":")]
    elapsed = parts[-1] + 60 * parts[-2] + (3600 * parts[-3] if len(parts) > 2 else 0)
    user = float(re.search(r"User time \(seconds\): ([\d.]+)", proc.stderr).group(1))
    sys_ = float(re.search(r"System time \(seconds\): ([\d.]+)", proc.stderr).group(1))
    return {"wall": elapsed, "wall_py": wall, "rss_mb": rss / 1024, "cpu": user + sys_}


def compare_outputs(a: Path, b: Path) -> dict:
    from pymerge.io import open_checkpoint

    ca, cb = open_checkpoint(a), open_checkpoint(b)
    if sorted(ca) != sorted(cb):
        missing = sorted(set(ca) ^ set(cb))[:5]
        return {"same_keys": False, "differ": missing}
    worst, n_diff, n_total, worst_rel = 0.0, 0, 0, 0.0
    for k in ca:
        x, y = ca[k].float(), cb[k].float()
        d = (x - y).abs()
        worst = max(worst, float(d.max()))
        scale = float(y.abs().max()) or 1.0
        worst_rel = max(worst_rel, float(d.max()) / scale)
        n_diff += int((d > 0).sum())
        n_total += d.numel()
    return {
        "same_keys": True,
        "max_abs": worst,
        "max_rel_to_tensor_max": worst_rel,
        "frac_elements_differ": n_diff / n_total,
    }


def tie_analysis(out_a: Path, out_b: Path, base_dir: Path, ft_dirs: list[Path], density: float):
    """For magnitude-sparsified merges (TIES): where two outputs differ, whether the element
    is tied at some model's top-k threshold (equal |tau|: which of them is kept is the
    implementation's choice; mergekit's argsort is unstable) and, elsewhere, the difference
    in bf16 ulps of max(|out|, |base|)."""
    from pymerge.io import open_checkpoint

    pa, pb, base = open_checkpoint(out_a), open_checkpoint(out_b), open_checkpoint(base_dir)
    fts = [open_checkpoint(f) for f in ft_dirs]
    same = tied = other = total = 0
    worst = 0.0
    for k in pa:
        a, b = pa[k], pb[k]
        total += a.numel()
        diff = a != b
        same += int((~diff).sum())
        if not diff.any():
            continue
        bt = base[k]
        tie = torch.zeros(a.shape, dtype=torch.bool)
        for f in fts:
            t = (f[k] - bt).float().abs()
            m = t.flatten()
            kk = max(1, int(density * m.numel()))
            tie |= t == m.kthvalue(m.numel() - kk + 1).values
        tied += int((diff & tie).sum())
        out = diff & ~tie
        other += int(out.sum())
        if out.any():
            scale = torch.maximum(torch.maximum(a.float().abs(), b.float().abs()), bt.float().abs())
            ulp = torch.exp2(torch.floor(torch.log2(scale[out])) - 7)
            worst = max(worst, float(((a.float() - b.float()).abs()[out] / ulp).max()))
    return {
        "identical": same / total,
        "differ_at_topk_ties": tied / total,
        "differ_elsewhere": other / total,
        "elsewhere_max_bf16_ulps": worst,
    }


def cmd_compare(args) -> None:
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    folders = make_models(root, SMALL, 3, "s150m")
    cfg = root / f"{args.method}.yaml"
    cfg.write_text(yaml_config(args.method, folders))
    print(cfg.read_text())
    outs = {
        "pymerge": root / f"out-pymerge-{args.method}",
        "mergekit": root / f"out-mk-{args.method}",
    }
    cmds = {
        "pymerge": [
            sys.executable,
            "-m",
            "pymerge",
            "merge",
            str(cfg),
            str(outs["pymerge"]),
            "--quiet",
            "--overwrite",
        ],
        "mergekit": [
            shutil.which("mergekit-yaml") or "mergekit-yaml",
            str(cfg),
            str(outs["mergekit"]),
            "--lazy-unpickle",
        ],
    }
    runs: dict[str, list[dict]] = {"pymerge": [], "mergekit": []}
    for r in range(args.repeats):
        for name in ("mergekit", "pymerge") if r % 2 == 0 else ("pymerge", "mergekit"):
            if outs[name].exists() and name == "mergekit":
                shutil.rmtree(outs[name])
            load = os.getloadavg()[0]
            res = timed(cmds[name])
            res["load"] = load
            runs[name].append(res)
            print(f"run {r} {name}: {res}", flush=True)
    diff = compare_outputs(outs["pymerge"], outs["mergekit"])
    med = {k: sorted(v, key=lambda x: x["wall"])[len(v) // 2] for k, v in runs.items()}
    print(f"\n| tool | wall s (median of {args.repeats}) | CPU s | peak RSS MB | load |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in ("mergekit", "pymerge"):
        m = med[name]
        cells = f"{m['wall']:.2f} | {m['cpu']:.2f} | {m['rss_mb']:.0f} | {m['load']:.1f}"
        print(f"| {name} | {cells} |")
    print(
        f"\nratio: {med['mergekit']['wall'] / med['pymerge']['wall']:.1f}x faster, "
        f"RSS {med['pymerge']['rss_mb'] / med['mergekit']['rss_mb']:.2f} of mergekit's"
    )
    print("all runs:", json.dumps(runs))
    print("output difference (pymerge vs mergekit):", json.dumps(diff))
    if args.method == "ties":
        ties = tie_analysis(outs["pymerge"], outs["mergekit"], folders[0], folders[1:], 0.2)
        print("where they differ (TIES):", json.dumps(ties))


def cmd_big(args) -> None:
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    folders = make_models(root, BIG, 3, "b1g")
    sizes = [(f / "model.safetensors").stat().st_size / 2**30 for f in folders]
    print("checkpoint sizes GiB:", [f"{s:.3f}" for s in sizes])
    cfg = root / f"big-{args.method}.yaml"
    cfg.write_text(yaml_config(args.method, folders))
    out = root / f"out-big-{args.method}"
    res = timed(
        [sys.executable, "-m", "pymerge", "merge", str(cfg), str(out), "--quiet", "--overwrite"]
    )
    print(f"pymerge merge {args.method} of 3 x {sizes[1]:.2f} GiB: {res}", flush=True)
    if args.no_check:
        return
    import pymerge
    from pymerge.io import open_checkpoint

    # the in-memory path, pymerge.merge on state dicts, a few keys at a time (the whole
    # 4 GiB in memory plus the fused path's float32 work would not fit beside the other
    # sessions on this machine); constant parameters, so the keys are independent
    per, glob = PARAMS[args.method]
    kw = {**per, **glob}
    inputs = [open_checkpoint(f) for f in folders]
    ck = open_checkpoint(out)
    worst, same, t_mem = 0.0, True, 0.0
    for k in ck:
        states = [{k: c[k]} for c in inputs[1:]]
        base = {k: inputs[0][k]} if args.method in NEEDS_BASE else None
        t0 = time.perf_counter()
        mem = pymerge.merge(args.method, states, base=base, **kw)[k]
        t_mem += time.perf_counter() - t0
        worst = max(worst, float((ck[k].float() - mem.float()).abs().max()))
        same &= bool(torch.equal(ck[k], mem))
    print(f"in-memory pymerge.merge, key by key: {t_mem:.1f} s")
    print(f"streamed output vs in-memory: identical={same}, max abs diff {worst:.3g}")


_WM_CHILD = """
import sys, time, torch
from pymerge.align import weight_matching
from pymerge.io import load_state_dict, open_checkpoint
from pymerge.spec import mlp_spec
load = open_checkpoint if sys.argv[1] == "stream" else load_state_dict
t = time.perf_counter()
a, b = load(sys.argv[2]), load(sys.argv[3])
r = weight_matching(mlp_spec(4), a, b, max_iter=int(sys.argv[4]))
print(f"J={r.history.objective[-1]:.6g} in {time.perf_counter() - t:.1f} s")
"""


def cmd_wm(args) -> None:
    """Weight matching of two 4-layer 4096-wide bf16 MLPs (109 MB each), streamed from the
    files or loaded in memory: peak RSS and time, the same objective."""
    from safetensors.torch import save_file

    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / f"mlp{s}.safetensors" for s in (0, 1)]
    for s, path in enumerate(paths):
        if path.is_file():
            continue
        g = torch.Generator().manual_seed(s)
        dims, st = [1024, 4096, 4096, 4096, 4096, 10], {}
        for i in range(5):
            name = f"fc{i}" if i < 4 else "out"
            st[f"{name}.weight"] = torch.randn(dims[i + 1], dims[i], generator=g).bfloat16()
            st[f"{name}.bias"] = torch.randn(dims[i + 1], generator=g).bfloat16()
        save_file(st, path)
    for mode in ("stream", "memory"):
        cmd = [sys.executable, "-c", _WM_CHILD, mode, *map(str, paths), str(args.sweeps)]
        print(mode, timed(cmd), flush=True)


def cmd_clean(args) -> None:
    shutil.rmtree(args.root, ignore_errors=True)
    print(f"removed {args.root}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("what", choices=["compare", "big", "wm", "clean", "make"])
    ap.add_argument("--sweeps", type=int, default=3, help="wm: weight-matching sweeps")
    ap.add_argument("--root", default="/tmp/pymerge-bench")
    ap.add_argument("--method", default="ties", choices=sorted(PARAMS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-check", action="store_true", help="big: skip the in-memory comparison")
    args = ap.parse_args()
    if args.what == "make":
        make_models(Path(args.root), SMALL, 3, "s150m")
        return
    {"compare": cmd_compare, "big": cmd_big, "wm": cmd_wm, "clean": cmd_clean}[args.what](args)


if __name__ == "__main__":
    main()
