"""The ``pymerge`` command line: ``pymerge <command> [options]`` (``pymerge <command> --help``).

One module per command, listed in :data:`COMMANDS`: ``pymerge.cli.<name>`` defines
``add_parser(subparsers) -> ArgumentParser`` (which adds the command's sub-parser) and
``run(args) -> int`` (the exit status). Adding a command is adding its module and its name
here. Code that imports this package can add one more with :func:`register`.

Errors in what the user gave (a missing or unreadable file, a bad option value, an output
that would overwrite an input) print one line ``pymerge <command>: error: ...`` and exit with
status 2; ``PYMERGE_TRACEBACK=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Callable, Sequence

__all__ = ["main", "build_parser", "register", "COMMANDS"]

AddParser = Callable[["argparse._SubParsersAction"], argparse.ArgumentParser]

# the command modules of this package, in the order ``pymerge --help`` lists them
COMMANDS: tuple[str, ...] = ("demo", "info", "bench", "align", "merge", "barrier", "landscape")

_EXTRA: dict[str, tuple[AddParser, Callable[[argparse.Namespace], int]]] = {}

# errors that come from what the user gave: one line, exit status 2
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, RuntimeError)


def register(name: str, add_parser: AddParser, run: Callable[[argparse.Namespace], int]) -> None:
    """Add the command ``name``: ``add_parser(subparsers)`` adds its sub-parser,
    ``run(args)`` runs it and returns the exit status."""
    if name in COMMANDS:
        raise ValueError(f"pymerge {name} is a built-in command")
    _EXTRA[name] = (add_parser, run)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every command."""
    from pymerge import __version__

    parser = argparse.ArgumentParser(
        prog="pymerge",
        description="Merge neural networks and study the loss landscape between them.",
        epilog="Start with `pymerge demo`; `pymerge COMMAND --help` describes each command.",
    )
    parser.add_argument("--version", action="version", version=f"pymerge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = [importlib.import_module(f"{__name__}.{name}") for name in COMMANDS]
    commands = [(m.add_parser, m.run) for m in modules] + list(_EXTRA.values())
    for add, run in commands:
        add(sub).set_defaults(func=run)
    return parser


def _error_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename!r}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return str(exc) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pymerge`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # the reader went away (`pymerge demo | head`): stop quietly
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 141
    except USER_ERRORS as exc:
        if os.environ.get("PYMERGE_TRACEBACK", "") not in ("", "0"):
            raise
        print(f"pymerge {args.command}: error: {_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pymerge {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
