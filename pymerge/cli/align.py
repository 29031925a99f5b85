"""``pymerge align``: weight-match checkpoint B to checkpoint A from the command line.

    pymerge align A.safetensors B.safetensors --spec spec.json --out B_aligned.safetensors \
        [--perm-out perm.json] [--merge merged.safetensors [--alpha 0.5]] [--max-iter 100]

The spec is the JSON of :meth:`PermutationSpec.to_dict` (e.g.
``json.dump(pymerge.spec_from_model(model, x).to_dict(), f)``). Every output path is checked
before any work (distinct from each other and from the inputs, in a folder that accepts a new
file); inputs are never modified; outputs are written all or none, each atomically.
"""

from __future__ import annotations

import argparse
import sys

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
    p.add_argument("a", help="reference checkpoint (.safetensors or torch state dict)")
    p.add_argument("b", help="checkpoint to permute towards A")
    p.add_argument(
        "--spec", required=True, help="PermutationSpec JSON (json.dump(spec.to_dict(), f))"
    )
    p.add_argument("--out", required=True, help="where to write the permuted B")
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
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def run(args: argparse.Namespace) -> int:
    from pymerge._util.checks import check_state_pair
    from pymerge.align import weight_matching
    from pymerge.io import (
        check_output_paths,
        load_spec,
        load_state_dict,
        permutation_writer,
        state_dict_writer,
        write_all,
    )
    from pymerge.ops import interpolate
    from pymerge.spec import apply_permutation

    if args.alpha is not None and not args.merge:
        raise ValueError("--alpha sets the weight of --merge; give --merge PATH too")
    alpha = 0.5 if args.alpha is None else args.alpha
    inputs = {"A": args.a, "B": args.b, "--spec": args.spec}
    outputs = {"--out": args.out, "--perm-out": args.perm_out, "--merge": args.merge}
    outputs = {k: v for k, v in outputs.items() if v is not None}
    check_output_paths(outputs, inputs=inputs)  # before any work

    spec = load_spec(args.spec)
    state_a, state_b = load_state_dict(args.a), load_state_dict(args.b)
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

    if not args.quiet:
        objective = result.history.objective
        sweeps = len(objective)
        summary = (
            f"objective {objective[-1]:.6g} after {sweeps} sweep{'s' * (sweeps != 1)}"
            if objective
            else "no sweep run"
        )
        wrote = ", ".join(outputs.values())
        print(f"{summary}; wrote {wrote}", file=sys.stderr)
    return 0
