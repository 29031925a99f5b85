"""The house rules: imports only point down, and every lazy export is visible to type checkers.

The layers, bottom up (``docs/api.md``, ``../shared/ARCHITECTURE.md``)::

    0  pymerge._util, pymerge._backend, the compiled modules, pymerge.kernels
    1  pymerge.ops          (plain tensors and index maps; knows nothing of specs)
    2  pymerge.spec
    3  pymerge.align, pymerge.wsa
    4  pymerge.merge
    5  pymerge.landscape
    6  pymerge.io, pymerge.testing
    7  pymerge.cli
    8  pymerge (the package's lazy front door), pymerge.__main__

A module may import from its own package and from lower layers only; siblings of one layer
do not import each other (``pymerge.__version__`` may be read from anywhere). Function-level
(lazy) imports count too: they are dependencies all the same. ``pymerge.kernels`` imports
nothing of pymerge at all.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pymerge

PACKAGE = Path(pymerge.__file__).resolve().parent

LAYERS: dict[str, int] = {
    "pymerge._util": 0,
    "pymerge._backend": 0,
    "pymerge._lap": 0,
    "pymerge._multi_tensor": 0,
    "pymerge.kernels": 0,
    "pymerge.ops": 1,
    "pymerge.spec": 2,
    "pymerge.align": 3,
    "pymerge.wsa": 3,
    "pymerge.merge": 4,
    "pymerge.landscape": 5,
    "pymerge.io": 6,
    "pymerge.testing": 6,
    "pymerge.cli": 7,
    "pymerge.__main__": 8,
    "pymerge": 8,
}


def unit_of(module: str) -> str:
    """The layer entry a dotted module name belongs to (its longest listed prefix)."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        if name in LAYERS:
            return name
    raise KeyError(module)


def module_name(path: Path, package: Path = PACKAGE) -> str:
    rel = path.relative_to(package.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, module: str, package: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, absolute module) of every pymerge import in the file, lazy ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parent = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("pymerge")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = parent.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("pymerge"):
                continue
            if target == "pymerge":  # ``from pymerge import x``: the front door, or a module
                for a in node.names:
                    sub = f"pymerge.{a.name}"
                    if a.name == "__version__":
                        continue  # a constant of the front door, no dependency
                    out.append((node.lineno, sub if _is_module(sub, package) else "pymerge"))
            else:
                out.append((node.lineno, target))
    return out


def _is_module(name: str, package: Path) -> bool:
    rel = Path(*name.split(".")[1:])
    return (package / rel).is_dir() or (package / rel).with_suffix(".py").exists()


def violations(package: Path) -> list[str]:
    """Every import under ``package`` that points up or sideways, as ``module:line``."""
    found = []
    for path in sorted(package.rglob("*.py")):
        module = module_name(path, package)
        here = unit_of(module)
        for line, target in imported_modules(path, module, package):
            there = unit_of(target)
            if there == here:
                continue
            if here == "pymerge.kernels":
                found.append(f"{module}:{line} imports {target} (kernels import no pymerge)")
            elif LAYERS[there] > LAYERS[here]:
                found.append(
                    f"{module}:{line} imports {target} (layer {LAYERS[there]} > {LAYERS[here]})"
                )
            elif LAYERS[there] == LAYERS[here]:
                found.append(f"{module}:{line} imports its sibling {target}")
    return found


def test_the_walk_sees_the_package():
    names = {module_name(p) for p in PACKAGE.rglob("*.py")}
    for needed in ("pymerge.ops", "pymerge.spec", "pymerge.align", "pymerge.landscape"):
        assert needed in names
    assert all(unit_of(n) for n in names)  # every module has a layer


def test_imports_only_point_down():
    found = violations(PACKAGE)
    assert not found, "imports that point up or sideways:\n" + "\n".join(found)


def test_the_walk_catches_upward_and_sideways_imports(tmp_path):
    """The checker itself can fail: a lazy upward import, a sibling import, a relative one."""
    pkg = tmp_path / "pymerge"
    files = {
        "__init__.py": "",
        "ops/__init__.py": "",
        "ops/fine.py": "from pymerge._util.checks import check_states\n",
        "ops/up.py": "def f():\n    from pymerge.spec import PermutationSpec\n",
        "spec/__init__.py": "from ..align import weight_matching\n",
        "align/__init__.py": "import pymerge.wsa\n",
        "kernels/k.py": "from pymerge._util import cache\n",
    }
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    found = violations(pkg)
    assert found == [
        "pymerge.align:1 imports its sibling pymerge.wsa",
        "pymerge.kernels.k:1 imports pymerge._util (kernels import no pymerge)",
        "pymerge.ops.up:2 imports pymerge.spec (layer 2 > 1)",
        "pymerge.spec:1 imports pymerge.align (layer 3 > 2)",
    ]


@pytest.mark.parametrize("name", sorted(pymerge._EXPORTS))
def test_every_lazy_export_resolves(name):
    value = getattr(pymerge, name)
    assert value is not None
    assert name in dir(pymerge)


def test_type_checkers_see_every_lazy_export():
    """``pymerge/__init__.py`` imports every lazy export under ``TYPE_CHECKING``, from the
    module ``_EXPORTS`` names, so IDEs and type checkers resolve ``pymerge.<name>``."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    seen: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for sub in ast.walk(node):
                if isinstance(sub, ast.ImportFrom):
                    for a in sub.names:
                        seen[a.asname or a.name] = sub.module or ""
    missing = sorted(set(pymerge._EXPORTS) - set(seen))
    assert not missing, f"lazy exports missing from the TYPE_CHECKING block: {missing}"
    wrong = {n: (seen[n], m) for n, m in pymerge._EXPORTS.items() if seen[n] != m}
    assert not wrong, f"TYPE_CHECKING imports from another module than _EXPORTS: {wrong}"


def test_api_reference_names_every_public_name():
    """docs/api.md, the one page that documents the API, mentions every top-level export."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()
    missing = sorted(n for n in pymerge._EXPORTS if f"`{n}" not in text)
    assert not missing, f"public names missing from docs/api.md: {missing}"
