"""``pymerge info [CHECKPOINT]``: the installation, or what a checkpoint holds.

Without an argument: the version, where pymerge is imported from, the backend each
primitive uses, and the SIMD level each compiled module picked at run time on this CPU
(with the CPU's own vector extensions beside it).

With a checkpoint (a ``.safetensors``/``.pt`` file, a shard index or a model folder): its
tensors (key, shape, dtype), the parameter count and size, the architecture detected from
``config.json``, and the permutation groups ``pymerge align`` / ``align:`` would use
(:func:`pymerge.spec.hf_spec`), or why there are none. Only headers are read.
"""

from __future__ import annotations

import argparse
import json

__all__ = ["add_parser", "run", "installation", "checkpoint_info"]


def _cpu_flags() -> str:
    """The CPU's vector extensions pymerge's loops can use (from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    have = [f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f") if f in flags]
                    return " ".join(have) or "none of sse4_2/avx/avx2/avx512f"
    except OSError:
        pass
    import platform

    return f"unknown ({platform.machine()})"


def installation() -> dict[str, str]:
    """``version``, ``location`` (the imported package's folder), :func:`pymerge.backends`,
    ``simd`` (the loop set each compiled module picked at import, on this CPU) and
    ``cpu_simd`` (the CPU's vector extensions)."""
    from pymerge import __version__
    from pymerge._backend import backends
    from pymerge.cli._compare import package_dir

    info = {"version": __version__, "location": package_dir(), **backends()}
    picked = []
    for key, name in (
        ("assignment_native", "assignment"),
        ("multi_tensor_native", "multi_tensor"),
        ("task_vectors_native", "task_vectors"),
    ):
        value = info.get(key, "")
        if value.startswith("built (") and value.endswith(")"):
            picked.append(f"{name} {value[7:-1]}")
        elif value:
            picked.append(f"{name} {value}")
    info["simd"] = ", ".join(picked) or "no compiled modules"
    info["cpu_simd"] = _cpu_flags()
    return info


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "info",
        help="show the installation, or what a checkpoint holds",
        description="Without CHECKPOINT: pymerge's version, where it is imported from, which "
        "backend each primitive uses (native C++ / NumPy fallback for assignment; Triton, "
        "native or torch for the tensor kernels) and the SIMD level each compiled module picked "
        "at run time. With CHECKPOINT (a file, shard index or model folder): its tensors, "
        "parameter count, detected architecture and the permutation groups pymerge would use "
        "(headers only; nothing is loaded).",
        epilog="examples: pymerge info; pymerge info ./my-llama --json",
    )
    p.add_argument("checkpoint", nargs="?", help="a checkpoint file, shard index or model folder")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--no-keys", action="store_true", help="with CHECKPOINT: the summary only, no tensor list"
    )
    return p


def checkpoint_info(path: str) -> dict:
    """What ``pymerge info CHECKPOINT`` reports, as data."""
    from pymerge.io import open_checkpoint
    from pymerge.io.checkpoint import describe_config

    with open_checkpoint(path) as ck:
        dtypes: dict[str, int] = {}
        for k in ck:
            name = str(ck.dtype(k)).removeprefix("torch.")
            dtypes[name] = dtypes.get(name, 0) + ck.info(k).numel
        out = {
            "path": str(path),
            "files": [str(f) for f in ck.files],
            "tensors": len(ck),
            "parameters": ck.num_params(),
            "bytes": ck.nbytes(),
            "dtypes": dtypes,
            "architecture": describe_config(ck.config),
            "keys": [
                {
                    "key": k,
                    "shape": list(ck.shape(k)),
                    "dtype": str(ck.dtype(k)).removeprefix("torch."),
                }
                for k in ck
            ],
        }
        out["permutation_groups"], out["spec_note"] = _groups(ck)
    return out


def _groups(ck) -> tuple[list[dict], str]:
    if ck.config is None:
        return [], "no config.json: give pymerge align a spec (--spec spec.json)"
    from pymerge.spec.hf import hf_spec

    try:
        spec = hf_spec(ck.config, keys=list(ck))
        sizes = spec.validate(ck.meta_state())
    except (ValueError, TypeError) as exc:
        return [], str(exc)
    heads = {g: name for name, hs in spec.heads.items() for g in hs.groups}
    groups = [
        {
            "group": g,
            "size": sizes[g],
            "axes": len(spec.perm_to_axes[g]),
            **({"heads": heads[g]} if g in heads else {}),
        }
        for g in spec.groups()
    ]
    return groups, f"hf_spec: {len(groups)} groups, {len(spec.free)} free keys"


def _print_checkpoint(info: dict, keys: bool) -> None:
    gb = info["bytes"] / 1e9
    print(f"checkpoint    {info['path']} ({len(info['files'])} file(s))")
    print(f"architecture  {info['architecture']}")
    print(f"tensors       {info['tensors']}")
    print(f"parameters    {info['parameters']:,} ({gb:.3f} GB)")
    print("dtypes        " + ", ".join(f"{d} {n:,}" for d, n in info["dtypes"].items()))
    if keys:
        width = max(len(k["key"]) for k in info["keys"])
        print("keys:")
        for k in info["keys"]:
            print(f"  {k['key']:<{width}}  {str(k['shape']):<18} {k['dtype']}")
    groups = info["permutation_groups"]
    print(
        f"permutation groups ({info['spec_note']}):"
        if groups
        else f"permutation groups: none ({info['spec_note']})"
    )
    for g in groups:
        extra = f", heads of {g['heads']}" if "heads" in g else ""
        print(f"  {g['group']:<28} size {g['size']:<6} on {g['axes']} axes{extra}")


def run(args: argparse.Namespace) -> int:
    import sys

    if args.checkpoint is not None:
        info = checkpoint_info(args.checkpoint)
        if args.json:
            if args.no_keys:
                info.pop("keys")
            print(json.dumps(info, indent=2))
        else:
            _print_checkpoint(info, keys=not args.no_keys)
        return 0

    from pymerge.cli._compare import missing_native_warning

    info = installation()
    warning = missing_native_warning()
    if warning:
        print(warning, file=sys.stderr)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0
