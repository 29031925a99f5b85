"""``pymerge merge CONFIG.yaml OUT_DIR``: run a mergekit-style merge config, out of core.

    pymerge merge ties.yaml merged/ [--dry-run] [--overwrite] [--shard-size 5GB]

The config is mergekit's YAML (``merge_method``, ``models`` with per-model ``parameters``,
``base_model``, global ``parameters``, ``dtype``/``out_dtype``, ``slices``,
``tokenizer_source``) plus pymerge's ``align:`` (permute the models onto the base before
merging), ``shard_size`` and ``data:`` (data-aware methods); see
:mod:`pymerge.io.merge_config`. The whole config, every path, key, shape and parameter is
checked before any tensor is merged; errors are one line naming the model, tensor and
parameter, exit status 2. Tensors stream from disk one at a time (a reader thread reads
ahead, a writer thread writes behind); the output folder appears only when complete.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the merge runs on every rank with the gloo backend:
alignment costs all-reduced, each rank merging and writing its own shards, rank 0 the index
(:mod:`pymerge.io.distributed`; recipes in docs/distributed.md).

Exit status: 0 done (or a plan printed), 2 a problem with the config, the inputs or the
output folder (nothing written), 130 interrupted (Ctrl-C or SIGTERM; nothing written).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "merge",
        help="merge checkpoints with a mergekit-style YAML config, streaming from disk",
        description="Merge the checkpoints a mergekit-style YAML config names (merge_method, "
        "models with per-model parameters, base_model, parameters, dtype/out_dtype, slices, "
        "tokenizer_source; pymerge's align:, shard_size, data:) into OUT_DIR, tensor by tensor "
        "from disk, so memory holds a few tensors, not the models. "
        "Everything is checked before any tensor is merged; OUT_DIR appears only when complete.",
        epilog="example: pymerge merge ties.yaml merged/ --dry-run   (then without --dry-run). "
        "Exit status: 0 done, 2 a problem with the config, inputs or output (nothing written), "
        "130 interrupted (nothing written).",
    )
    p.add_argument("config", help="merge config (mergekit's YAML format, or JSON)")
    p.add_argument("out_dir", help="output folder (created; must not be inside an input)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything and print the plan (tensors, methods, estimated peak memory "
        "and time) without merging",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace OUT_DIR if it exists and is not empty"
    )
    p.add_argument(
        "--shard-size",
        default=None,
        help="largest output shard, e.g. 5GB (default), 500MB, 2GiB; overrides the config's",
    )
    p.add_argument(
        "--no-threads",
        action="store_true",
        help="read, merge and write in turn on one thread (no read-ahead, no write-behind)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM (a scheduler's kill) interrupts like Ctrl-C, so cleanup runs."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run(args: argparse.Namespace) -> int:
    from pymerge.io.merge_config import build_job, load_merge_config
    from pymerge.io.output import check_output_folder, parse_size

    if args.shard_size is not None:
        parse_size(args.shard_size)  # a bad value is a user error before any work
    config = load_merge_config(args.config)
    job = build_job(config, config_path=args.config)
    try:
        from pymerge.io.merge_config import output_bytes

        check_output_folder(
            args.out_dir,
            inputs={**job.protected(), "the config": args.config},
            overwrite=args.overwrite,
            need_bytes=output_bytes(job),
        )
        if args.dry_run:
            if int(os.environ.get("RANK", "0")) == 0:
                print(describe(job, args.out_dir, shard_size=args.shard_size))
            return 0
        return _merge(job, args)
    finally:
        job.close()


def _merge(job, args: argparse.Namespace) -> int:
    from pymerge.io.distributed import init_from_env, run_job_distributed
    from pymerge.io.merge_files import run_job

    show = not args.quiet and sys.stderr.isatty()
    distributed = init_from_env()  # under torchrun: tensors sharded over the ranks
    runner = run_job_distributed if distributed else run_job
    with _sigterm_interrupts():
        res = runner(
            job,
            args.out_dir,
            overwrite=args.overwrite,
            shard_size=args.shard_size,
            progress=show,
            threads=not args.no_threads,
        )
    where = ""
    if distributed:
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
        dist.destroy_process_group()
        if rank != 0:
            return 0
        where = f" on rank 0 of {world}"
    if not args.quiet:
        st = res.stats
        what = f"{st.keys} tensors{where}" if st is not None else "merged"
        gb = (st.bytes_read / 1e9) if st is not None else 0.0
        al = f", alignment {res.align_seconds:.1f} s" if res.align_seconds else ""
        print(
            f"pymerge merge: {job.method.name}: {what} ({gb:.2f} GB read) in "
            f"{res.seconds:.1f} s{al}; wrote {args.out_dir}",
            file=sys.stderr,
        )
    return 0


# --------------------------------------------------------------------------- the plan


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _fmt_params(params) -> str:
    parts = []
    for k, v in params.items():
        if isinstance(v, list):
            same = len(set(map(repr, v))) == 1
            shown = v[0] if same else "[" + ", ".join(map(_num, v)) + "]"
        else:
            shown = v
        parts.append(f"{k}={shown:g}" if isinstance(shown, float) else f"{k}={shown}")
    return ", ".join(parts)


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _calibrate(job) -> tuple[float, str] | None:
    """Seconds per input byte of read + merge, timed on one mid-sized tensor."""
    from pymerge.io.merge_files import make_prepare
    from pymerge.merge.stream import StreamStats, _read

    floats = [i for i in job.items if i.nbytes > 0]
    if not floats:
        return None
    floats.sort(key=lambda i: i.nbytes)
    item = floats[len(floats) // 2]
    prepare = make_prepare(job.dtype, None, {})
    t0 = time.perf_counter()
    tensors, base = _read(item, job.states, prepare, StreamStats())
    item.plan.merge_tensor(item.key, tensors, base, t=item.t, params=item.params)
    dt = time.perf_counter() - t0
    moved = item.nbytes * (len(item.sources) + (item.base is not None))
    return dt / max(1, moved), item.key


def describe(job, out_dir: str, *, shard_size=None) -> str:
    """The plan ``--dry-run`` prints."""
    from pymerge.io.checkpoint import describe_config
    from pymerge.io.merge_config import estimate_peak_bytes, output_bytes, total_read_bytes
    from pymerge.io.output import DEFAULT_SHARD_SIZE, parse_size, plan_shards

    info = job.method
    lines = [f"plan: {info.name}" + (f" ({info.reference})" if info.reference else "")]
    for m in job.inputs:
        roles = []
        if job.base is m:
            roles.append("base")
        if m in job.merged_models:
            roles.append("merged")
        if job.tokenizer_source is m:
            roles.append("tokenizer")
        if job.config_source is m:
            roles.append("config")
        ck = m.ckpt
        lines.append(
            f"  {m.label}: {m.path} [{', '.join(roles) or 'unused'}] "
            f"{describe_config(ck.config)}, {ck.num_params() / 1e6:.1f}M params, {_gb(ck.nbytes())}"
        )
    dt = lambda d: str(d).removeprefix("torch.") if d is not None else "as stored"  # noqa: E731
    lines.append(f"  dtype: inputs cast to {dt(job.dtype)}; output {dt(job.out_dtype)}")
    if job.align:
        lines.append(
            f"  align: weight_matching of {', '.join(m.label for m in job.aligned)} onto "
            f"{job.anchor.label} ({len(job.spec.perm_to_axes)} permutation groups, "
            f"max_iter {job.align['max_iter']}), streamed from disk"
        )
    for note in job.notes:
        lines.append(f"  note: {note}")
    lines.append(f"  tensors ({len(job.items)}):")
    for it in job.items:
        src = ", ".join(
            f"{job.inputs[s.model].name}:{s.key}" if s.key != it.key else job.inputs[s.model].name
            for s in it.sources
        )
        b = f"; base {job.inputs[it.base.model].name}" if it.base is not None else ""
        lines.append(
            f"    {it.key} {list(job.inputs[it.sources[0].model].ckpt.shape(it.sources[0].key))}"
            f" <- {it.plan.info.name}({src}{b}) {_fmt_params(it.params)}"
        )
    size = parse_size(shard_size or job.shard_size or DEFAULT_SHARD_SIZE)
    shards = plan_shards(job.entries, size)
    lines.append(
        f"  output: {out_dir}: {_gb(output_bytes(job))} in {len(shards)} shard(s) of at most "
        f"{_gb(size)}; config.json from "
        f"{job.config_source.label if job.config_source else '(none)'}, tokenizer from "
        f"{job.tokenizer_source.label if job.tokenizer_source else '(none)'}"
    )
    peak = estimate_peak_bytes(job)
    lines.append(f"  estimated peak memory: {_gb(peak)} above the interpreter's (~0.3 GB)")
    cal = _calibrate(job)
    read = total_read_bytes(job)
    if cal is not None:
        per_byte, key = cal
        lines.append(
            f"  estimated time: {per_byte * read:.1f} s to read {_gb(read)} and merge "
            f"(timed on {key!r}; alignment not included)"
        )
    return "\n".join(lines)
