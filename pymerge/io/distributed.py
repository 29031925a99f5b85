"""Merging over ``torch.distributed`` ranks: tensors sharded, each rank writing its shards.

:func:`run_job_distributed` runs a checked :class:`~pymerge.io.merge_config.MergeJob` on
every rank of a process group (``torchrun -m pymerge merge ...`` does this for you):

1. rank 0 checks the output folder and makes the staging folder beside it; its name is
   broadcast (the folder must be on storage every rank sees);
2. ``align:``: :func:`pymerge.align.distributed.distributed_weight_matching` per model,
   parameters sharded over the ranks, one all-reduce per unit solve;
3. the output's shards are planned once (at least one per rank); rank ``r`` merges the
   tensors of shards ``i`` with ``i % world_size == r`` and writes those shards;
4. every rank reports success; rank 0 writes the index, the config and tokenizer files,
   and moves the folder into place. A failure on any rank fails every rank, and rank 0
   removes the staging folder: all or nothing, as in one process.

The tensors are those of one process (the per-tensor functions are deterministic; tested
with the gloo backend and 2 processes); only the shard boundaries differ.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from pymerge.io.merge_config import MergeJob, output_bytes
from pymerge.io.merge_files import MergeResult, _side_files, job_metadata, make_prepare
from pymerge.io.output import DEFAULT_SHARD_SIZE, CheckpointWriter, check_output_folder

__all__ = ["run_job_distributed", "init_from_env"]


def init_from_env(backend: str = "gloo", timeout_s: float = 1800.0) -> bool:
    """Initialise the default process group from torchrun's environment (``WORLD_SIZE``,
    ``RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) when it says more than one process; returns
    whether this is a distributed run."""
    import datetime

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def _align(job: MergeJob, group: Any, progress: bool) -> dict[int, Any]:
    from pymerge.align.distributed import distributed_weight_matching

    perms = {}
    if job.align is None:
        return perms
    for m in job.aligned:
        res = distributed_weight_matching(
            job.spec,
            job.anchor.ckpt,
            m.ckpt,
            group=group,
            max_iter=job.align["max_iter"],
            seed=job.align["seed"],
            greedy=job.align["greedy"],
            progress=progress,
        )
        perms[m.index] = res.perm
    return perms


def run_job_distributed(
    job: MergeJob,
    out_dir: str | os.PathLike[str],
    *,
    group: Any = None,
    overwrite: bool = False,
    shard_size: Any = None,
    progress: bool = False,
    threads: bool = True,
) -> MergeResult:
    """Run ``job`` on every rank of ``group`` (see the module docstring); call on every rank
    with the same job. Returns each rank's :class:`MergeResult` (its own stats)."""
    import torch.distributed as dist

    from pymerge.align.distributed import collective_check
    from pymerge.merge.stream import stream_merge

    if job.method.needs_data:
        raise ValueError(f"{job.method.name} is data-aware; run it in one process")
    t0 = time.perf_counter()
    rank, world = dist.get_rank(group), dist.get_world_size(group)

    def prepare_out() -> str | None:
        if rank != 0:
            return None
        check_output_folder(
            out_dir, inputs=job.protected(), overwrite=overwrite, need_bytes=output_bytes(job)
        )
        return str(CheckpointWriter.create_staging(out_dir))

    made = collective_check(prepare_out, group=group)
    box = [made]
    dist.broadcast_object_list(box, src=0, group=group)
    staging = Path(box[0])
    writer = None
    try:
        t_align = time.perf_counter()
        perms = collective_check(lambda: _align(job, group, progress), group=group)
        align_seconds = time.perf_counter() - t_align if perms else 0.0

        def write_mine():
            nonlocal writer
            writer = CheckpointWriter(
                out_dir,
                job.entries,
                max_shard_size=shard_size or job.shard_size or DEFAULT_SHARD_SIZE,
                metadata=job_metadata(job),
                side_files=_side_files(job),
                inputs=job.protected(),
                overwrite=overwrite,
                rank=rank,
                world_size=world,
                staging=staging,
                check=False,
            )
            mine = set(writer.owned_keys())
            stats = stream_merge(
                [i for i in job.items if i.key in mine],
                job.states,
                writer.write,
                out_dtype=job.out_dtype,
                prepare=make_prepare(job.dtype, job.spec, perms),
                threads=threads,
                progress=progress and rank == 0,
            )
            writer.finish_rank()
            return stats

        stats = collective_check(write_mine, group=group)
        collective_check(lambda: writer.commit() if rank == 0 else None, group=group)
    except BaseException:
        if writer is not None:
            writer.abort()  # closes this rank's shard files (rank 0 also removes the folder)
        if rank == 0:
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
        raise
    names = {m.index: m.name for m in job.inputs}
    return MergeResult(
        Path(out_dir),
        time.perf_counter() - t0,
        stats,
        {names[i]: p for i, p in perms.items()},
        align_seconds,
    )
