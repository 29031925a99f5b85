"""The pymerge command line: the registry, --help everywhere, info, bench (tiny sizes)."""

from __future__ import annotations

import importlib
import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pymerge import cli
from pymerge.cli import _compare

ROOT = Path(__file__).resolve().parents[1]


def test_every_listed_command_is_a_module_of_the_package():
    """No plugin list naming modules that don't exist: each name is pymerge.cli.<name>."""
    assert set(cli.COMMANDS) >= {"demo", "info", "bench", "align"}
    for name in cli.COMMANDS:
        module = importlib.import_module(f"pymerge.cli.{name}")
        assert callable(module.add_parser) and callable(module.run), name


def test_a_broken_command_module_is_not_skipped(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", (*cli.COMMANDS, "no_such_command"))
    with pytest.raises(ModuleNotFoundError, match="no_such_command"):
        cli.build_parser()


@pytest.mark.parametrize("argv", [["--help"], *[[name, "--help"] for name in cli.COMMANDS]])
def test_help_everywhere(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: pymerge") and len(out.splitlines()) > 3


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    out = capsys.readouterr().out
    assert all(name in out for name in cli.COMMANDS)


def test_version(capsys):
    import pymerge

    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.strip() == f"pymerge {pymerge.__version__}"


def test_info_json(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["assignment"] in ("native", "numpy", "torch")
    assert {"version", "location", "triton", "multi_tensor_native"} <= set(info)


def test_info_text(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["version", __import__("pymerge").__version__]
    assert "assignment" in out


def test_register_adds_a_command(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_EXTRA", {})

    def add(sub):
        p = sub.add_parser("hello", help="say hello")
        p.add_argument("name")
        return p

    cli.register("hello", add, lambda args: print(f"hi {args.name}") or 0)
    assert cli.main(["hello", "there"]) == 0
    assert capsys.readouterr().out.strip() == "hi there"
    with pytest.raises(ValueError, match="built-in"):
        cli.register("info", add, lambda args: 0)


def test_user_errors_are_one_line(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_EXTRA", {})

    def add(sub):
        return sub.add_parser("fail")

    def fail(args):
        raise FileNotFoundError(2, "No such file or directory", "x.pt")

    cli.register("fail", add, fail)
    assert cli.main(["fail"]) == 2
    assert capsys.readouterr().err == "pymerge fail: error: No such file or directory: 'x.pt'\n"


def test_bench_small_table(capsys):
    status = cli.main(
        ["bench", "--sizes", "12", "20", "--repeat", "1", "--batch", "4", "--no-warm"]
    )
    out = capsys.readouterr().out
    assert status == 0, out
    assert out.startswith("backends: assignment ")
    assert "peers compared: " in out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| case | solver | backend | median ms")
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table[2:]]
    cases = {row[0] for row in rows}
    assert {"uniform f64 n=12", "weight-matching f64 n=20 (max)", "batch 4x64x64"} <= cases
    assert all(row[2] for row in rows), "every row names its backend"
    assert any(row[1] == "pymerge" and row[2] == "NumPy fallback" for row in rows)


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "--sizes", "0"],
        ["bench", "--threads", str(2**40)],
        ["bench", "--threads", "0"],
        ["bench", "--seed", "-1"],
        ["bench", "--repeat", "two"],
    ],
)
def test_bench_rejects_bad_values(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "argument --" in capsys.readouterr().err


def test_quick_comparison_totals_agree():
    rows = _compare.quick_comparison((9,), repeat=1, batch=(3, 5, 5), warm_n=16, warm_steps=2)
    assert rows and all(r.ok for r in rows), _compare.format_table(rows)
    assert all(r.backend for r in rows)
    assert any(r.backend == "NumPy fallback" for r in rows)
    warm = {(r.solver, r.backend) for r in rows if r.case.startswith("warm")}
    assert ("pymerge cold", "NumPy fallback") in warm and ("pymerge warm", "NumPy fallback") in warm


def test_peers_line_says_how_to_add_missing_peers(monkeypatch):
    monkeypatch.setattr(_compare, "peers", lambda: {"scipy": "1.0", "lapx": None})
    line = _compare.peers_line()
    assert "scipy 1.0" in line and "not installed: lapx" in line and "pip install lapx" in line


def test_python_m_pymerge(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["pymerge", "info", "--json"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("pymerge", run_name="__main__")
    assert exc.value.code == 0
    assert "assignment" in json.loads(capsys.readouterr().out)


@pytest.mark.skipif(shutil.which("pymerge") is None, reason="the pymerge script is not installed")
def test_console_script_from_the_checkout_imports_the_installed_package():
    """`pymerge` run from the checkout's root does not import the source tree first (a
    console script puts its own folder, not the current one, first on sys.path)."""
    proc = subprocess.run(["pymerge", "info", "--json"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    import pymerge

    assert info["location"] == os.path.dirname(os.path.abspath(pymerge.__file__))
    if _compare.native_lap() is not None:  # built here: the script finds the same build
        assert info["assignment_native"].startswith("built")


def test_info_warns_on_stderr_when_compiled_modules_are_missing(monkeypatch, capsys):
    from pymerge import _backend

    monkeypatch.setattr(_backend, "native_multi_tensor", lambda: None)
    assert cli.main(["info", "--json"]) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)  # stdout stays JSON
    assert "pymerge._multi_tensor" in captured.err and "pip install" in captured.err


def test_a_closed_pipe_ends_quietly(monkeypatch, capsys):
    """`pymerge demo | head`: no error line when the reader goes away."""
    monkeypatch.setattr(cli, "_EXTRA", {})

    def gone(args):
        raise BrokenPipeError(32, "Broken pipe")

    cli.register("gone", lambda sub: sub.add_parser("gone"), gone)
    assert cli.main(["gone"]) == 141
    assert capsys.readouterr().err == ""


def test_table_note_mentions_lapx_only_when_it_ran():
    rows = [_compare.Timing("c", "pymerge", 1e-3, backend="native C++")]
    assert "lapx" not in _compare.table_note(rows)
    rows.append(_compare.Timing("c", "lapx 0.11", 2e-3, backend="C++ (lapjvr)"))
    assert "negated" in _compare.table_note(rows)
