"""``pymerge info``: the version, where pymerge is imported from, and the backends in use."""

from __future__ import annotations

import argparse
import json

__all__ = ["add_parser", "run", "installation"]


def installation() -> dict[str, str]:
    """``version``, ``location`` (the imported package's folder) and :func:`pymerge.backends`."""
    from pymerge import __version__
    from pymerge._backend import backends
    from pymerge.cli._compare import package_dir

    return {"version": __version__, "location": package_dir(), **backends()}


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "info",
        help="show the version and the backends in use",
        description="Show pymerge's version, where it is imported from, and which backend each "
        "primitive uses (native C++ / NumPy fallback for assignment; Triton, native or torch "
        "for the tensor kernels).",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def run(args: argparse.Namespace) -> int:
    import sys

    from pymerge.cli._compare import missing_native_warning

    info = installation()
    warning = missing_native_warning()
    if warning:
        print(warning, file=sys.stderr)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0
