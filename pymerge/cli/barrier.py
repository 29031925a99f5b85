"""``pymerge barrier A B``: the loss and error along the linear path between two checkpoints,
with the three barriers, before and (``--align``) after weight matching.

    pymerge barrier a.safetensors b.safetensors --model models.py:make_net --data data.pt \
        --out curve.png [--align [--spec spec.json]] [--points 25] [--json curve.json]

The model and the data are given as for ``pymerge landscape``: ``--model MODULE:FACTORY`` (an
import path or a ``.py`` file, and a function taking no arguments that returns the
``nn.Module`` the checkpoints fit) and ``--data`` (a ``.pt``/``.safetensors`` file holding
tensors ``x`` and ``y``). ``--align`` weight-matches B to A first (Git Re-Basin) with the spec
of ``--spec`` (the JSON of ``PermutationSpec.to_dict()``) or one traced from the model on the
first two samples. ``--reset-bn TRAIN.pt`` recomputes BatchNorm statistics at every point.
Every output path is checked before any work; outputs (the PNG, ``--json``, ``--perm-out``)
are written all or none, each atomically; inputs are never modified. Prints the barriers:
Git Re-Basin's max_λ L − ½(L_A + L_B), Entezari et al.'s max_λ [L − ((1−λ)L_A + λL_B)] and
the midpoint's L(½) − ½(L_A + L_B), for the loss and (with ``--loss ce``) the error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from pymerge.cli._args import int_at_least

__all__ = ["add_parser", "run"]

_LOSSES = ("ce", "mse")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "barrier",
        help="loss and error along the linear path between two checkpoints, and the barriers",
        description="Evaluate the model along θ(λ) = (1−λ)A + λB (and, with --align, "
        "(1−λ)A + λ·π(B) after weight matching) on --data, write the curves as a PNG, and "
        "print the Git Re-Basin, Entezari and midpoint barriers of the loss and the error. "
        "The model comes from --model MODULE:FACTORY (a function returning the nn.Module; "
        "MODULE may be a .py file), the data from --data (.pt or .safetensors with tensors "
        "x and y).",
        epilog="example: pymerge barrier a.safetensors b.safetensors --model models.py:make_net "
        "--data test.pt --out curve.png --align",
    )
    p.add_argument("a", help="checkpoint A (λ = 0; .safetensors or torch state dict)")
    p.add_argument("b", help="checkpoint B (λ = 1)")
    p.add_argument(
        "--model",
        required=True,
        metavar="MODULE:FACTORY",
        help="import path (or .py file) and the name of a function returning the nn.Module",
    )
    p.add_argument(
        "--data", required=True, help=".pt or .safetensors file with tensors x (inputs), y"
    )
    p.add_argument("--out", required=True, help="the PNG of the curves to write")
    p.add_argument("--json", dest="json_out", help="also write the curves and barriers as JSON")
    p.add_argument(
        "--align", action="store_true", help="also the path after weight matching B to A"
    )
    p.add_argument("--spec", help="PermutationSpec JSON for --align (default: traced)")
    p.add_argument("--perm-out", help="with --align, also write the permutation as JSON")
    p.add_argument(
        "--points", type=int_at_least(2), default=25, help="λ values, endpoints included (25)"
    )
    p.add_argument("--loss", choices=_LOSSES, default="ce", help="cross-entropy (default) or mse")
    p.add_argument(
        "--batch-size", type=int_at_least(1), default=1024, help="samples per forward (1024)"
    )
    p.add_argument(
        "--max-samples", type=int_at_least(1), default=None, help="use the first N samples only"
    )
    p.add_argument(
        "--reset-bn",
        metavar="TRAIN",
        help="recompute BatchNorm statistics at every point on this data (x, y file)",
    )
    p.add_argument(
        "--max-iter", type=int_at_least(1), default=100, help="weight-matching sweeps (100)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or table")
    return p


def _barriers(curve, metric: str, error: bool) -> dict[str, float | None]:
    import numpy as np

    from pymerge.landscape.barrier import BARRIER_KINDS, barrier

    v = np.asarray(curve.metrics[metric], dtype=np.float64)
    v = 1.0 - v if error else v
    out: dict[str, float | None] = {}
    for kind in BARRIER_KINDS:
        if not np.all(np.isfinite(v)):
            out[kind] = math.nan
            continue
        try:
            out[kind] = barrier(v, curve.lambdas, kind)
        except ValueError:  # midpoint without λ = ½ on the grid
            out[kind] = None
    return out


def _plain(x: Any) -> Any:
    """JSON-ready: NaN/inf become null."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _table(rows: dict[str, dict[str, dict[str, float | None]]]) -> str:
    from pymerge.landscape.barrier import BARRIER_KINDS

    cols = [(m, k) for m in next(iter(rows.values())) for k in BARRIER_KINDS]
    head = f"{'path':<10}" + "".join(f"{m + ' ' + k:>17}" for m, k in cols)
    lines = [head]
    for name, r in rows.items():
        cells = []
        for m, k in cols:
            v = r[m][k]
            cells.append(f"{'—' if v is None else f'{v:.5g}':>17}")
        lines.append(f"{name:<10}" + "".join(cells))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    from pymerge._util.checks import check_state_pair
    from pymerge.cli.landscape import load_data, load_factory, loss_from_name
    from pymerge.io import (
        check_output_paths,
        load_spec,
        load_state_dict,
        permutation_writer,
        write_all,
    )
    from pymerge.landscape.barrier import interpolation_curve
    from pymerge.landscape.curve_plot import plot_curves
    from pymerge.landscape.evaluate import Evaluator
    from pymerge.landscape.plots import require_matplotlib

    if args.spec and not args.align:
        raise ValueError("--spec is the spec of --align; give --align too")
    if args.perm_out and not args.align:
        raise ValueError("--perm-out writes the permutation of --align; give --align too")
    inputs = {"A": args.a, "B": args.b, "--data": args.data, "--spec": args.spec}
    inputs["--reset-bn"] = args.reset_bn
    outputs = {"--out": args.out, "--json": args.json_out, "--perm-out": args.perm_out}
    outputs = {k: v for k, v in outputs.items() if v is not None}
    check_output_paths(outputs, inputs={k: v for k, v in inputs.items() if v})  # before work
    require_matplotlib()  # the PNG is the output: say so before any work

    model = load_factory(args.model)
    state_a, state_b = load_state_dict(args.a), load_state_dict(args.b)
    check_state_pair(state_a, state_b, f"A {args.a!r}", f"B {args.b!r}", same_dtype=True)
    check_state_pair(
        model.state_dict(), state_a, f"the model of --model {args.model}", f"A {args.a!r}"
    )
    x, y = load_data(args.data, args.max_samples)
    batches = [(x[i : i + args.batch_size], y[i : i + args.batch_size])
               for i in range(0, x.shape[0], args.batch_size)]  # fmt: skip
    loss_fn = loss_from_name(args.loss)
    evaluator = Evaluator(batches, loss_fn, accuracy=args.loss == "ce")
    model.load_state_dict(state_a)
    try:
        evaluator(model)  # one pass: a model/data mismatch is one clear line
    except ValueError:
        raise
    except Exception as exc:
        first = " ".join(str(exc).split())[:200]
        raise ValueError(f"the model cannot run on --data: {type(exc).__name__}: {first}") from None
    prepare, prepare_batches = None, None
    if args.reset_bn:
        tx, ty = load_data(args.reset_bn)
        prepare = "reset_bn"
        prepare_batches = [(tx[i : i + args.batch_size], ty[i : i + args.batch_size])
                           for i in range(0, tx.shape[0], args.batch_size)]  # fmt: skip
    progress = not args.quiet and sys.stderr.isatty()
    options = dict(prepare=prepare, prepare_batches=prepare_batches, progress=progress)
    curves = {
        "naive": interpolation_curve(model, state_a, state_b, evaluator, args.points, **options)
    }
    perm = None
    if args.align:
        from pymerge.align import weight_matching

        if args.spec:
            spec = load_spec(args.spec)
            try:
                spec.validate(state_a)
            except (ValueError, TypeError) as exc:
                raise ValueError(
                    f"the spec {args.spec!r} does not fit A {args.a!r}: {exc}"
                ) from None
        else:
            from pymerge.spec import spec_from_model

            with torch.no_grad():
                spec = spec_from_model(model, x[:2], warn=False)
        perm = weight_matching(
            spec, state_a, state_b, max_iter=args.max_iter, progress=progress
        ).perm
        curves["aligned"] = interpolation_curve(
            model, state_a, state_b, evaluator, args.points, spec=spec, perm=perm, **options
        )
    metrics = [("loss", "loss", False)]
    if args.loss == "ce":
        metrics.append(("error", "accuracy", True))
    table = {
        name: {label: _barriers(c, m, err) for label, m, err in metrics}
        for name, c in curves.items()
    }
    fig = plot_curves(curves, title=f"{args.a} → {args.b}")
    writers = {args.out: lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight")}
    if args.json_out:
        data = _plain(
            {
                "lambdas": curves["naive"].lambdas.tolist(),
                "curves": {
                    n: {k: v.tolist() for k, v in c.metrics.items()} for n, c in curves.items()
                },
                "barriers": table,
                "flags": {n: c.flags for n, c in curves.items()},
            }
        )

        def write_json(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=1, allow_nan=False)

        writers[args.json_out] = write_json
    if args.perm_out:
        writers[args.perm_out] = permutation_writer(perm)
    write_all(
        writers,
        protect={k: v for k, v in inputs.items() if v},
        labels={v: k for k, v in outputs.items()},
    )
    if not args.quiet:
        print(_table(table))
        for name, c in curves.items():
            bad = c.flags.get("nonfinite")
            if bad:
                print(f"{name}: non-finite values at λ = {bad}", file=sys.stderr)
        print(f"wrote {', '.join(outputs.values())}", file=sys.stderr)
    return 0
