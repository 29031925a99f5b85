"""The pymerge command line and the ``python -m pymerge`` demo (tiny sizes)."""

from __future__ import annotations

import json

import pytest

import pymerge.__main__ as demo_main
from pymerge import _demo, cli


def test_info_json(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["assignment"] in ("native", "torch")
    assert "version" in info and "triton" in info


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "bench" in capsys.readouterr().out


def test_bench_small_table(capsys):
    status = cli.main(
        ["bench", "--sizes", "12", "20", "--repeat", "1", "--batch", "4", "--no-warm"]
    )
    out = capsys.readouterr().out
    assert status == 0, out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| case | solver | median ms")
    cases = {line.split("|")[1].strip() for line in table[2:]}
    assert {"uniform f64 n=12", "weight-matching f64 n=20 (max)", "batch 4x64x64"} <= cases
    assert any("pymerge" in line for line in table[2:])


def test_bench_rejects_bad_sizes():
    with pytest.raises(SystemExit):
        cli.main(["bench", "--sizes", "0"])


def test_quick_comparison_totals_agree():
    rows = _demo.quick_comparison((9,), repeat=1, batch=(3, 5, 5), warm_n=16, warm_steps=2)
    assert rows and all(r.ok for r in rows), _demo.format_table(rows)
    solvers = {r.solver for r in rows}
    assert "pymerge fallback" in solvers
    assert {"pymerge fallback cold", "pymerge fallback warm"} <= solvers


def test_register_adds_a_command(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_REGISTRY", dict(cli._REGISTRY))

    @cli.register("hello")
    def _add(sub):
        p = sub.add_parser("hello")
        p.add_argument("name")
        p.set_defaults(func=lambda args: print(f"hi {args.name}") or 0)

    assert cli.main(["hello", "there"]) == 0
    assert capsys.readouterr().out.strip() == "hi there"


def test_module_demo_runs(monkeypatch, capsys):
    monkeypatch.setattr(demo_main, "DEMO_SIZES", (10,))
    monkeypatch.setattr(demo_main, "DEMO_BATCH", (3, 6, 6))
    monkeypatch.setattr(demo_main, "DEMO_WARM_N", 12)
    assert demo_main.demo([]) == 0
    out = capsys.readouterr().out
    assert "col_ind [1, 0, 2]" in out and "| case | solver" in out
    assert demo_main.demo(["info"]) == 0
