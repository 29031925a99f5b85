"""``pymerge align``: weight-match checkpoint B to checkpoint A from the command line.

    pymerge align A.safetensors B.safetensors --spec spec.json --out B_aligned.safetensors \
        [--perm-out perm.json] [--merge merged.safetensors [--alpha 0.5]] [--max-iter 100]
    pymerge align model_a/ model_b/ --out b_aligned/ [--merge merged/]

The spec is the JSON of :meth:`PermutationSpec.to_dict` (e.g.
``json.dump(pymerge.spec_from_model(model, x).to_dict(), f)``); for Hugging Face folders of a
supported architecture it may be left out (:func:`pymerge.spec.hf_spec` derives it from A's
config.json). A and B are files (``.safetensors``, torch), shard indexes or model folders.
An ``--out``/``--merge`` without a file suffix is a folder: the weights stream from disk into
it tensor by tensor (sharded, with B's config and tokenizer files), and weight matching
streams its costs from disk too, so neither needs the models in memory. Every output path is
checked before any work (distinct from each other and from the inputs, never inside an
input folder, in a folder that accepts new files); inputs are never modified; outputs are
written all or none, each atomically.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pymerge.cli._args import fraction, int_at_least, seed

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "align",
        help="weight-match checkpoint B to checkpoint A (Git Re-Basin)",
        description="Permute the hidden units of checkpoint B so that it matches checkpoint A "
        "(weight matching, Ainsworth et al. 2022) and write the permuted B; optionally the "
        "permutation and the merge (1-alpha)*A + alpha*permuted B. Checkpoints: .safetensors "
        "(any case) or torch state dicts (loaded with weights_only=True).",
        epilog="example: pymerge align a.safetensors b.safetensors --spec spec.json "
        "--out b_aligned.safetensors --merge merged.safetensors",
    )
    p.add_argument(
        "a", help="reference checkpoint (.safetensors, torch state dict, shard index or folder)"
    )
    p.add_argument("b", help="checkpoint to permute towards A")
    p.add_argument(
        "--spec",
        help="PermutationSpec JSON (json.dump(spec.to_dict(), f)); default for Hugging Face "
        "folders: derived from A's config.json (GPT-2, Llama/Mistral/Qwen2/Qwen3, BERT/RoBERTa)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="where to write the permuted B: a file (.safetensors, .pt) or, without a "
        "suffix, a folder",
    )
    p.add_argument("--perm-out", help="also write the permutation as JSON {group: [indices]}")
    p.add_argument("--merge", help="also write (1-alpha)*A + alpha*(permuted B) here")
    p.add_argument(
        "--alpha",
        type=fraction,
        default=None,
        help="interpolation weight in [0, 1] for --merge (default 0.5)",
    )
    p.add_argument(
        "--max-iter",
        type=int_at_least(1),
        default=100,
        help="most coordinate-descent sweeps (default 100)",
    )
    p.add_argument(
        "--seed", type=seed, default=0, help="seed of the sweeps' group order (default 0)"
    )
    p.add_argument(
        "--shard-size", default="5GB", help="largest shard of a folder output (default 5GB)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace folder outputs that exist and are not empty",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def _is_folder_output(path: str | None) -> bool:
    import os

    if not path:
        return False
    return os.path.isdir(path) or not path.lower().endswith(_FILE_SUFFIXES)


def _is_model_folder(path: str) -> bool:
    """A Hugging Face style folder or a shard index (folder outputs are for these)."""
    from pymerge.io import is_checkpoint_folder

    return path.endswith(".index.json") or is_checkpoint_folder(path)


def _spec_for(args: argparse.Namespace, ckpt_a):
    """--spec, else the Hugging Face spec of A's config.json."""
    from pymerge.io import load_spec

    if args.spec:
        return load_spec(args.spec)
    if ckpt_a.config is None:
        raise ValueError(
            f"no --spec given and A {args.a!r} has no config.json to derive one from; pass "
            "--spec spec.json (json.dump(spec.to_dict(), f))"
        )
    from pymerge.spec.hf import hf_spec

    return hf_spec(ckpt_a.config, keys=list(ckpt_a))


def run(args: argparse.Namespace) -> int:
    if args.alpha is not None and not args.merge:
        raise ValueError("--alpha sets the weight of --merge; give --merge PATH too")
    if _is_model_folder(args.a) and (_is_folder_output(args.out) or _is_folder_output(args.merge)):
        return _run_folders(args)
    return _run_files(args)


def _run_files(args: argparse.Namespace) -> int:
    from pymerge._util.checks import check_state_pair
    from pymerge.align import weight_matching
    from pymerge.io import (
        check_output_paths,
        load_spec,
        permutation_writer,
        state_dict_writer,
        write_all,
    )
    from pymerge.ops import interpolate
    from pymerge.spec import apply_permutation

    alpha = 0.5 if args.alpha is None else args.alpha
    inputs = {"A": args.a, "B": args.b, "--spec": args.spec}
    outputs = {"--out": args.out, "--perm-out": args.perm_out, "--merge": args.merge}
    outputs = {k: v for k, v in outputs.items() if v is not None}
    check_output_paths(outputs, inputs=inputs)  # before any work

    if args.spec is None:
        raise ValueError("--spec is required for checkpoint files (a folder's spec can be derived)")
    spec = load_spec(args.spec)
    state_a, state_b = _load(args.a), _load(args.b)
    # keys and shapes must agree; dtypes too when merging (checked before any work)
    check_state_pair(
        state_a, state_b, f"A {args.a!r}", f"B {args.b!r}", same_dtype=bool(args.merge)
    )
    for name, path, state in (("A", args.a, state_a), ("B", args.b, state_b)):
        try:
            spec.validate(state)
        except (ValueError, TypeError) as exc:
            msg = f"the spec {args.spec!r} does not fit {name} {path!r}: {exc}"
            raise ValueError(msg) from None
    result = weight_matching(
        spec,
        state_a,
        state_b,
        max_iter=args.max_iter,
        seed=args.seed,
        progress=not args.quiet and sys.stderr.isatty(),
    )
    aligned = apply_permutation(spec, result.perm, state_b)
    writers = {args.out: state_dict_writer(aligned, args.out)}
    if args.perm_out:
        writers[args.perm_out] = permutation_writer(result.perm)
    if args.merge:
        merged = interpolate([state_a, aligned], [1.0 - alpha, alpha])
        writers[args.merge] = state_dict_writer(merged, args.merge)
    write_all(writers, protect=inputs, labels={v: k for k, v in outputs.items()})

    _summary(args, result, outputs.values())
    return 0


def _load(path: str):
    """A state dict in memory: files through the checked loader, folders and shard indexes
    through :func:`pymerge.io.open_checkpoint`."""

    from pymerge.io import load_state_dict, open_checkpoint

    if _is_model_folder(path):
        with open_checkpoint(path) as ck:
            return dict(ck)
    return load_state_dict(path)


def _summary(args: argparse.Namespace, result, wrote) -> None:
    if args.quiet:
        return
    objective = result.history.objective
    sweeps = len(objective)
    summary = (
        f"objective {objective[-1]:.6g} after {sweeps} sweep{'s' * (sweeps != 1)}"
        if objective
        else "no sweep run"
    )
    print(f"{summary}; wrote {', '.join(map(str, wrote))}", file=sys.stderr)


def _run_folders(args: argparse.Namespace) -> int:
    """Folder outputs: everything streamed from disk (see the module docstring)."""
    from pymerge._util.checks import check_state_pair
    from pymerge.io import check_output_folder, check_output_paths, open_checkpoint
    from pymerge.io.checkpoint import HF_SIDE_FILES
    from pymerge.io.merge_files import align_files
    from pymerge.io.output import parse_size

    for flag, path in (("--out", args.out), ("--merge", args.merge)):
        if path is not None and not _is_folder_output(path):
            raise ValueError(
                f"{flag} {path!r} is a file but the other output is a folder; give both as "
                "folders (no suffix) or both as files"
            )
    parse_size(args.shard_size)
    ckpt_a = open_checkpoint(args.a, what="A")
    ckpt_b = open_checkpoint(args.b, what="B")
    inputs = {"A": ckpt_a.folder or args.a, "B": ckpt_b.folder or args.b, "--spec": args.spec}
    for path in (args.out, args.merge):
        if path is not None:
            check_output_folder(path, inputs=inputs, overwrite=args.overwrite)
    if args.merge is not None and Path(args.merge).absolute() == Path(args.out).absolute():
        raise ValueError("--out and --merge name the same folder; give each its own")
    if args.perm_out:
        check_output_paths({"--perm-out": args.perm_out}, inputs=inputs)
    meta_a, meta_b = ckpt_a.meta_state(), ckpt_b.meta_state()
    check_state_pair(meta_a, meta_b, f"A {args.a!r}", f"B {args.b!r}", same_dtype=bool(args.merge))
    spec = _spec_for(args, ckpt_a)
    for name, path, meta in (("A", args.a, meta_a), ("B", args.b, meta_b)):
        try:
            spec.validate(meta)
        except (ValueError, TypeError) as exc:
            where = args.spec or "derived from A's config.json"
            raise ValueError(f"the spec ({where}) does not fit {name} {path!r}: {exc}") from None
    side = {}
    if ckpt_b.folder is not None:
        side = {n: ckpt_b.folder / n for n in HF_SIDE_FILES if (ckpt_b.folder / n).is_file()}
    result = align_files(
        spec,
        ckpt_a,
        ckpt_b,
        out=args.out,
        merge_out=args.merge,
        alpha=0.5 if args.alpha is None else args.alpha,
        max_iter=args.max_iter,
        seed=args.seed,
        progress=not args.quiet and sys.stderr.isatty(),
        overwrite=args.overwrite,
        shard_size=args.shard_size,
        side_files=side,
        protect=inputs,
        metadata={"a": str(args.a), "b": str(args.b)},
    )
    if args.perm_out:
        from pymerge.io import permutation_writer, write_all

        write_all({args.perm_out: permutation_writer(result.perm)}, protect=inputs)
    _summary(args, result, [p for p in (args.out, args.perm_out, args.merge) if p])
    return 0
