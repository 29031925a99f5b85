"""``pymerge align``: weight-match checkpoint B to checkpoint A from the command line.

    pymerge align A.safetensors B.safetensors --spec spec.json --out B_aligned.safetensors \
        [--perm-out perm.json] [--max-iter 100] [--seed 0] [--merge merged.safetensors --alpha 0.5]

The spec is the JSON of :meth:`PermutationSpec.to_dict` (e.g.
``json.dump(pymerge.spec_from_model(model, x).to_dict(), f)``). Inputs are never
modified; outputs are written atomically and never over an input.
"""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_align(args: argparse.Namespace) -> int:
    from pymerge.align import weight_matching
    from pymerge.io import load_state_dict, save_permutation, save_state_dict
    from pymerge.ops import interpolate
    from pymerge.spec import PermutationSpec, apply_permutation

    inputs = [args.a, args.b, args.spec]
    with open(args.spec) as fh:
        spec = PermutationSpec.from_dict(json.load(fh))
    state_a, state_b = load_state_dict(args.a), load_state_dict(args.b)
    result = weight_matching(
        spec, state_a, state_b, max_iter=args.max_iter, seed=args.seed, progress=not args.quiet
    )
    aligned = apply_permutation(spec, result.perm, state_b)
    save_state_dict(aligned, args.out, protect=inputs)
    if args.perm_out:
        save_permutation(result.perm, args.perm_out, protect=inputs)
    if args.merge:
        merged = interpolate([state_a, aligned], [1.0 - args.alpha, args.alpha])
        save_state_dict(merged, args.merge, protect=inputs)
    if not args.quiet:
        hist = result.history
        print(
            f"objective {hist.initial_objective:.6g} -> {hist.objective[-1]:.6g} "
            f"in {hist.iterations} sweeps; wrote {args.out}",
            file=sys.stderr,
        )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("align", help="weight-match checkpoint B to checkpoint A (Git Re-Basin)")
    p.add_argument("a", help="reference checkpoint (.safetensors or torch state dict)")
    p.add_argument("b", help="checkpoint to permute towards A")
    p.add_argument("--spec", required=True, help="PermutationSpec JSON (PermutationSpec.to_dict)")
    p.add_argument("--out", required=True, help="where to write permuted B")
    p.add_argument("--perm-out", help="also write the permutation as JSON")
    p.add_argument("--merge", help="also write (1-alpha)*A + alpha*aligned B here")
    p.add_argument("--alpha", type=float, default=0.5, help="interpolation weight for --merge")
    p.add_argument("--max-iter", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=_cmd_align)
