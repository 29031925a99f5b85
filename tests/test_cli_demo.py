"""`pymerge demo --quick`: every step of the story runs, at toy sizes, in a few seconds."""

from __future__ import annotations

import re

import pytest

from pymerge.cli import _compare, demo, main


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick demo run (module-scoped: the steps are checked by several tests)."""
    png = tmp_path_factory.mktemp("demo") / "curves.png"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        status = main(["demo", "--quick", "--png", str(png)])
    return status, buf.getvalue(), png


def test_quick_demo_runs_every_step(quick_run):
    status, out, _ = quick_run
    assert status == 0, out
    assert out.startswith("pymerge ")
    assert re.search(r"^backends: assignment .+ · CPU interpolation .+ · GPU kernels", out, re.M)
    assert "peers compared:" in out
    for step in range(1, 7):
        assert f"[{step}/6]" in out
    for call in (
        "pymerge.weight_matching(spec, A, B)",
        "pymerge.apply_permutation",
        "pymerge.interpolation_curve",
        "pymerge.loss_barrier",
        "pymerge.interpolate([A, π(B)], [0.5, 0.5])",
    ):
        assert call in out, call
    assert re.search(r"naive loss\s+(\d+\.\d+\s+){5}", out)
    assert re.search(r"aligned acc %\s+(\d+\.\d\s+){5}", out)
    assert re.search(r"loss barrier .*: naive \d+\.\d+, aligned \d+\.\d+", out)
    assert re.search(r"^done in \d+\.\d s$", out, re.M)


def test_quick_demo_labels_every_comparison_row(quick_run):
    _, out, _ = quick_run
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0] == "| case | solver | backend | median ms | t / t(pymerge) | note |"
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in table[2:]]
    assert rows and all(row[2] for row in rows)
    assert any(row[1] == "pymerge" for row in rows)


def test_quick_demo_writes_the_png(quick_run):
    pytest.importorskip("matplotlib")
    _, out, png = quick_run
    assert f"plot: wrote {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_demo_says_how_to_add_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(demo, "_matplotlib_missing", lambda: True)
    png = tmp_path / "x.png"
    assert main(["demo", "--quick", "--no-bench", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "matplotlib is not installed" in out and "pip install matplotlib" in out
    assert ".[plot]" in out and not png.exists()
    assert "[5/5]" in out and "[6/" not in out  # --no-bench: five steps


def test_demo_checks_the_png_path_before_any_work(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    assert main(["demo", "--quick", "--png", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert "pymerge demo: error: --png" in captured.err and "folder" in captured.err
    assert "[1/" not in captured.out


@pytest.mark.parametrize("in_tree", [True, False])
def test_missing_compiled_modules_warning_names_the_fix(monkeypatch, in_tree):
    from pymerge import _backend

    monkeypatch.setattr(_backend, "native_lap", lambda: None)
    monkeypatch.setattr(_compare, "_in_source_tree", lambda where: in_tree)
    text = _compare.missing_native_warning()
    assert "pymerge._lap" in text and "fallback" in text and "pip install" in text
    assert ("source tree" in text) == in_tree


def test_no_warning_when_the_compiled_modules_are_there(monkeypatch):
    from pymerge import _backend

    monkeypatch.setattr(_backend, "native_lap", lambda: object())
    monkeypatch.setattr(_backend, "native_multi_tensor", lambda: object())
    assert _compare.missing_native_warning() is None


def test_full_demo_sizes_are_the_documented_ones():
    cfg = demo.FULL
    assert cfg.points % 2 == 1  # λ = 0.5 is on the grid: the merge is a point of the curve
    assert demo.QUICK.points % 2 == 1
    assert cfg.train_size * cfg.epochs <= 200_000  # keeps the full run well under a minute
