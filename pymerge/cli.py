"""The ``pymerge`` command line: ``pymerge <command> [options]``.

Built-in commands: ``info`` (what this installation runs) and ``bench`` (a quick assignment
comparison on this machine). Further commands plug in without editing this file: a module
named in :data:`PLUGINS` that exposes ``add_parser(subparsers)`` is imported when present;
``add_parser`` adds its sub-parser and sets ``func=handler`` (``handler(args) -> int``) with
``parser.set_defaults``. :func:`register` does the same for code that imports this module.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence

__all__ = ["main", "register", "build_parser", "PLUGINS"]

AddParser = Callable[["argparse._SubParsersAction"], None]

# command modules owned by other parts of pymerge; each exposes ``add_parser(subparsers)``
PLUGINS: tuple[str, ...] = (
    "pymerge.align.cli",  # pymerge align
    "pymerge.merge.cli",  # pymerge merge
    "pymerge.landscape.cli",  # pymerge barrier
)

_REGISTRY: dict[str, AddParser] = {}


def register(name: str) -> Callable[[AddParser], AddParser]:
    """Decorator: ``@register("name")`` on ``add_parser(subparsers)`` adds a command."""

    def deco(fn: AddParser) -> AddParser:
        _REGISTRY[name] = fn
        return fn

    return deco


# --------------------------------------------------------------------------- info


def _cmd_info(args: argparse.Namespace) -> int:
    from pymerge import __version__, backends

    info = {"version": __version__, **backends()}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0


@register("info")
def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show the version and the backends in use")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_info)


# --------------------------------------------------------------------------- bench


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _cmd_bench(args: argparse.Namespace) -> int:
    from pymerge import _demo, backends

    sizes = args.sizes or ([256, 1024, 2048] if args.full else [256, 1024])
    print(f"backends: {backends()}", flush=True)
    rows = _demo.quick_comparison(
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
    print(_demo.format_table(rows))
    print(
        "\nmedians of wall-clock time; 't / t(pymerge)' = time over pymerge's (above 1: pymerge "
        "faster). lapx only minimises: maximised costs are negated before timing it."
    )
    return 0 if all(r.ok for r in rows) else 1


@register("bench")
def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time the assignment solvers on this machine")
    p.add_argument("--full", action="store_true", help="add n=2048 and a larger warm start")
    p.add_argument("--sizes", type=_positive_int, nargs="+", help="square sizes to time")
    p.add_argument("--repeat", type=_positive_int, default=3, help="repeats per median")
    p.add_argument("--batch", type=_positive_int, default=1000, help="problems in the batch")
    p.add_argument("--threads", type=int, default=None, help="batch threads (default: all)")
    p.add_argument("--no-batch", action="store_true", help="skip the batch comparison")
    p.add_argument("--no-warm", action="store_true", help="skip the warm-start comparison")
    p.add_argument("--no-fallback", action="store_true", help="skip the NumPy fallback")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true", help="report progress on stderr")
    p.set_defaults(func=_cmd_bench)


# --------------------------------------------------------------------------- parser


def _warn_plugin(name: str, exc: BaseException) -> None:
    print(
        f"pymerge: commands from {name} unavailable ({type(exc).__name__}: {exc})", file=sys.stderr
    )


def _load_plugins() -> None:
    for name in PLUGINS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):
                continue  # that part of pymerge is not there: no command
            _warn_plugin(name, exc)
            continue
        except Exception as exc:  # a broken command module must not take the CLI down
            _warn_plugin(name, exc)
            continue
        add = getattr(module, "add_parser", None)
        if add is not None:
            _REGISTRY.setdefault(name, add)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered command."""
    _load_plugins()
    parser = argparse.ArgumentParser(
        prog="pymerge",
        description="Merge neural networks and study the loss landscape between them.",
    )
    from pymerge import __version__

    parser.add_argument("--version", action="version", version=f"pymerge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _REGISTRY.values():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pymerge`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        # bad input: one clear line, no traceback
        print(f"pymerge {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
