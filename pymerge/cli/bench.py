"""``pymerge bench``: time the assignment solvers of this installation against the peers found
(scipy, lapx) on this machine. The thorough benchmarks live in ``bench/``."""

from __future__ import annotations

import argparse
import sys

from pymerge.cli._args import int_at_least, seed

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    positive = int_at_least(1)
    p = sub.add_parser(
        "bench",
        help="time the assignment solvers on this machine, vs scipy and lapx",
        description="Time pymerge's assignment solver (native C++ and the NumPy fallback) and "
        "the peers importable here (scipy, lapx) on uniform and weight-matching costs, a batch "
        "and a warm-started sequence; prints a markdown table of medians.",
    )
    p.add_argument("--full", action="store_true", help="add n=2048 and a larger warm start")
    p.add_argument("--sizes", type=positive, nargs="+", metavar="N", help="square sizes to time")
    p.add_argument("--repeat", type=positive, default=3, help="repeats per median (default 3)")
    p.add_argument(
        "--batch", type=positive, default=1000, help="problems in the batch (default 1000)"
    )
    p.add_argument(
        "--threads", type=int_at_least(1, 4096), default=None, help="batch threads (default: all)"
    )
    p.add_argument("--no-batch", action="store_true", help="skip the batch comparison")
    p.add_argument("--no-warm", action="store_true", help="skip the warm-start comparison")
    p.add_argument("--no-fallback", action="store_true", help="skip the NumPy fallback")
    p.add_argument("--seed", type=seed, default=0, help="seed of the random costs (default 0)")
    p.add_argument("-v", "--verbose", action="store_true", help="report progress on stderr")
    return p


def run(args: argparse.Namespace) -> int:
    from pymerge.cli import _compare

    sizes = args.sizes or ([256, 1024, 2048] if args.full else [256, 1024])
    print(_compare.backend_line(), flush=True)
    warning = _compare.missing_native_warning()
    if warning:
        print(warning, flush=True)
    print(_compare.peers_line(), flush=True)
    rows = _compare.quick_comparison(
        sizes,
        repeat=args.repeat,
        batch=None if args.no_batch else (args.batch, 64, 64),
        warm_n=None if args.no_warm else (1024 if args.full else 512),
        include_fallback=not args.no_fallback,
        threads=args.threads,
        seed=args.seed,
        progress=(lambda s: print(f"  timing {s} ...", file=sys.stderr, flush=True))
        if args.verbose
        else None,
    )
    print(_compare.format_table(rows))
    print("\n" + _compare.table_note(rows))
    return 0 if all(r.ok for r in rows) else 1
