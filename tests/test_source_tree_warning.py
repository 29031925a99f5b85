"""Importing pymerge from a source checkout without the compiled modules warns once, naming
the fix; an installed package (or a built checkout) imports silently."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pymerge

PACKAGE = Path(pymerge.__file__).resolve().parent


def _import_from(root: Path, *, drop_editable: bool = False) -> subprocess.CompletedProcess:
    code = "import warnings; warnings.simplefilter('always'); import pymerge"
    if drop_editable:  # a development install redirects pymerge's imports: take it away
        code = (
            "import sys; sys.meta_path[:] = [f for f in sys.meta_path "
            "if 'editable' not in type(f).__module__]; " + code
        )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120
    )


def test_source_tree_without_compiled_modules_warns(tmp_path):
    # a checkout: the package's Python files next to csrc/, no compiled modules
    shutil.copytree(PACKAGE, tmp_path / "pymerge", ignore=shutil.ignore_patterns("*.so", "*.pyd"))
    (tmp_path / "csrc").mkdir()
    res = _import_from(tmp_path, drop_editable=True)
    assert res.returncode == 0, res.stderr
    assert "source tree" in res.stderr and "pip install ." in res.stderr
    assert res.stderr.count("RuntimeWarning") == 1


def test_installed_package_imports_silently(tmp_path):
    res = _import_from(tmp_path)  # the installed pymerge (cwd has no pymerge/)
    assert res.returncode == 0, res.stderr
    assert "source tree" not in res.stderr
