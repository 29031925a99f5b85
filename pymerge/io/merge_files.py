"""Merging and aligning checkpoints from files to files, out of core.

:func:`run_job` runs a checked :class:`~pymerge.io.merge_config.MergeJob` (a mergekit-style
config): the optional alignment (weight matching streamed from disk), then the streaming
merge (:func:`pymerge.merge.stream.stream_merge`) into a :class:`CheckpointWriter`, which
writes the output folder atomically with the config and tokenizer files of the source.

:func:`align_files` weight-matches checkpoint B to checkpoint A from disk (files, shards or
folders) and writes the permuted B (a folder, or a single file), the permutation and
optionally the interpolation ``(1 - alpha) A + alpha pi(B)``, each streamed tensor by tensor.
"""

from __future__ import annotations

import json
import os
import time
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pymerge.io.merge_config import MergeJob, output_bytes, tokenizer_files
from pymerge.io.output import DEFAULT_SHARD_SIZE, CheckpointWriter, check_output_folder

__all__ = ["run_job", "MergeResult", "align_files", "job_metadata", "align_models"]


@dataclass
class MergeResult:
    out_dir: Path
    seconds: float
    stats: Any = None  # StreamStats
    perms: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    align_seconds: float = 0.0


def job_metadata(job: MergeJob) -> dict[str, Any]:
    """What the output records: the method, its options, the config (JSON)."""
    return {
        "merge_method": job.method.name,
        "merge_config": json.dumps(job.config, sort_keys=True, default=str),
    }


def _side_files(job: MergeJob) -> dict[str, Any]:
    out: dict[str, Any] = dict(tokenizer_files(job.tokenizer_source))
    if job.config_source is not None and job.config_source.ckpt.folder is not None:
        gen = job.config_source.ckpt.folder / "generation_config.json"
        if gen.is_file():
            out["generation_config.json"] = gen
    if job.out_config is not None:
        out["config.json"] = json.dumps(job.out_config, indent=2, sort_keys=True) + "\n"
    return out


def align_models(job: MergeJob, *, progress: bool = False) -> dict[int, dict[str, torch.Tensor]]:
    """The permutation of every aligned model onto the anchor (weight matching streamed from
    disk), by the model's index in ``job.states``."""
    from pymerge.align import weight_matching

    perms: dict[int, dict[str, torch.Tensor]] = {}
    if job.align is None:
        return perms
    assert job.anchor is not None and job.spec is not None
    for m in job.aligned:
        res = weight_matching(
            job.spec,
            job.anchor.ckpt,
            m.ckpt,
            max_iter=job.align["max_iter"],
            seed=job.align["seed"],
            greedy=job.align["greedy"],
            progress=progress,
        )
        perms[m.index] = res.perm
    return perms


def make_prepare(
    dtype: torch.dtype | None, spec: Any, perms: Mapping[int, Mapping[str, torch.Tensor]]
) -> Callable[[int, str, torch.Tensor], torch.Tensor] | None:
    """The per-input step of the stream: permute (``align:``), then cast to ``dtype``."""
    if dtype is None and not perms:
        return None
    from pymerge.spec.apply import permute_param

    def prepare(model: int, key: str, t: torch.Tensor) -> torch.Tensor:
        perm = perms.get(model)
        if perm is not None and key in spec.axes_to_perm:
            t = permute_param(spec, perm, key, t)
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        return t

    return prepare


def run_job(
    job: MergeJob,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    shard_size: Any = None,
    progress: bool = False,
    threads: bool = True,
    prefetch: int = 2,
) -> MergeResult:
    """Run a checked job into ``out_dir`` (see the module docstring). The output folder is
    checked first (never an input, inside one or containing one; writable; room on disk);
    nothing is left there unless every tensor was written."""
    from pymerge.merge.stream import stream_merge

    t0 = time.perf_counter()
    check_output_folder(
        out_dir, inputs=job.protected(), overwrite=overwrite, need_bytes=output_bytes(job)
    )
    if job.method.needs_data:
        return _run_data_aware(job, out_dir, overwrite=overwrite, shard_size=shard_size)
    t_align = time.perf_counter()
    perms = align_models(job, progress=progress)
    align_seconds = time.perf_counter() - t_align if perms else 0.0
    size = shard_size or job.shard_size or DEFAULT_SHARD_SIZE
    with CheckpointWriter(
        out_dir,
        job.entries,
        max_shard_size=size,
        metadata=job_metadata(job),
        side_files=_side_files(job),
        inputs=job.protected(),
        overwrite=overwrite,
    ) as writer:
        stats = stream_merge(
            job.items,
            job.states,
            writer.write,
            out_dtype=job.out_dtype,
            prepare=make_prepare(job.dtype, job.spec, perms),
            prefetch=prefetch,
            threads=threads,
            progress=progress,
        )
    names = {m.index: m.name for m in job.inputs}
    return MergeResult(
        Path(out_dir),
        time.perf_counter() - t0,
        stats,
        {names[i]: p for i, p in perms.items()},
        align_seconds,
    )


def _run_data_aware(job: MergeJob, out_dir, *, overwrite: bool, shard_size: Any) -> MergeResult:
    """Data-aware methods need the whole models and a forward pass: the models are loaded in
    memory, the network built from config.json with ``transformers`` (which must be
    installed), and ``pymerge.merge`` called with ``model=`` and ``batches=``."""
    from pymerge.merge.api import merge

    t0 = time.perf_counter()
    assert job.data is not None
    try:
        import transformers
    except ImportError:
        raise ValueError(
            f"{job.method.name} needs the network to run data through: install transformers "
            f"(pip install 'transformers>=5,<6') or merge in Python with pymerge.merge(model=...)"
        ) from None
    if job.config_source is None or job.config_source.ckpt.config is None:
        raise ValueError(f"{job.method.name}: the models need a config.json to build the network")
    cfg = transformers.AutoConfig.for_model(**job.config_source.ckpt.config)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.eval()
    # the methods read the network's output as a tensor: the logits (same state-dict keys);
    # a method bound to the instance, so that copies of the model (copy.deepcopy) keep it
    model.forward = types.MethodType(_logits_forward, model)
    batches = _batches(job.data)
    states = [dict(m.ckpt) for m in job.merged_models]
    base = dict(job.base.ckpt) if job.base is not None and job.method.base != "none" else None
    params = dict(job.items[0].plan._settings) if job.items else {}
    merged = merge(job.method.name, states, base=base, model=model, batches=batches, **params)
    entries = [(k, merged[k].dtype, tuple(merged[k].shape)) for k in merged]
    with CheckpointWriter(
        out_dir,
        entries,
        max_shard_size=shard_size or job.shard_size or DEFAULT_SHARD_SIZE,
        metadata=job_metadata(job),
        side_files=_side_files(job),
        inputs=job.protected(),
        overwrite=overwrite,
    ) as w:
        for k, v in merged.items():
            w.write(k, v.to(job.out_dtype) if job.out_dtype and v.is_floating_point() else v)
    return MergeResult(Path(out_dir), time.perf_counter() - t0)


def _logits_forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
    return type(self).forward(self, *args, **kwargs).logits


def _batches(data: Mapping[str, Any]) -> list[Any]:
    from pymerge.io.files import load_state_dict

    path = Path(data["batches"])
    if path.suffix.lower() == ".safetensors":
        obj = load_state_dict(path)
    else:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    ids = obj.get("input_ids") if isinstance(obj, Mapping) else obj
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
        raise ValueError(
            f"data: {str(path)!r} must hold an integer tensor input_ids [N, T] (or be one)"
        )
    bs = int(data.get("batch_size") or 8)
    out = [ids[i : i + bs] for i in range(0, ids.shape[0], bs)]
    n = data.get("num_batches")
    return out[: int(n)] if n else out


# --------------------------------------------------------------------------- align


def _entries(meta: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    return [(k, v.dtype, tuple(v.shape)) for k, v in meta.items()]


def align_files(
    spec: Any,
    ckpt_a: Any,
    ckpt_b: Any,
    *,
    out: str | os.PathLike[str],
    merge_out: str | os.PathLike[str] | None = None,
    alpha: float = 0.5,
    max_iter: int = 100,
    seed: int = 0,
    progress: bool = False,
    overwrite: bool = False,
    shard_size: Any = DEFAULT_SHARD_SIZE,
    side_files: Mapping[str, Any] | None = None,
    protect: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
):
    """Weight-match B onto A from lazy checkpoints and write the permuted B to the folder
    ``out`` (and the merge to ``merge_out``), both atomically and tensor by tensor. Returns
    the :class:`~pymerge.align.AlignmentResult`. The caller checks the output paths first."""
    from pymerge.align import weight_matching
    from pymerge.spec.apply import permute_param

    result = weight_matching(spec, ckpt_a, ckpt_b, max_iter=max_iter, seed=seed, progress=progress)
    entries = _entries(ckpt_b.meta_state())
    meta = {"pymerge_command": "align", **(metadata or {})}
    writers = []
    try:
        w_out = CheckpointWriter(
            out,
            entries,
            max_shard_size=shard_size,
            metadata=meta,
            side_files=side_files,
            inputs=protect or {},
            overwrite=overwrite,
        )
        writers.append(w_out)
        w_merge = None
        if merge_out is not None:
            w_merge = CheckpointWriter(
                merge_out,
                entries,
                max_shard_size=shard_size,
                metadata={**meta, "alpha": alpha},
                side_files=side_files,
                inputs=protect or {},
                overwrite=overwrite,
            )
            writers.append(w_merge)
        for key in ckpt_b:
            tb = ckpt_b[key]
            pb = permute_param(spec, result.perm, key, tb) if key in spec.axes_to_perm else tb
            w_out.write(key, pb)
            if w_merge is not None:
                w_merge.write(key, _lerp(ckpt_a[key], pb, alpha))
        for w in writers:
            w.finish_rank()
        for w in writers:
            w.commit()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    return result


def _lerp(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    if not a.is_floating_point():
        return a.clone()
    dt = torch.float64 if a.dtype == torch.float64 else torch.float32
    return ((1.0 - alpha) * a.to(dt) + alpha * b.to(dt)).to(a.dtype)
