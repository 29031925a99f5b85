"""`pymerge landscape`: slices, surfaces, the plane and the Hessian summary from files, and the
ways a user can get it wrong (each a one-line error, exit status 2, nothing written)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from pymerge.cli import main
from pymerge.io import save_state_dict
from pymerge.testing.models import MLP

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread (a second one only adds hand-off overhead, and on a
    busy machine OpenMP's waits dominate)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


MODELS_PY = """
import torch
from pymerge.testing.models import MLP

def make_net():
    return MLP(6, (8,), 3)

def not_a_module():
    return 42

def broken():
    raise RuntimeError("no weights here")
"""


@pytest.fixture
def files(tmp_path):
    (tmp_path / "models.py").write_text(MODELS_PY)
    paths = {}
    for name, seed in (("a", 0), ("b", 1), ("c", 2)):
        torch.manual_seed(seed)
        paths[name] = tmp_path / f"{name}.safetensors"
        save_state_dict(MLP(6, (8,), 3).state_dict(), paths[name])
    g = torch.Generator().manual_seed(0)
    paths["data"] = tmp_path / "data.pt"
    torch.save(
        {"x": torch.randn(40, 6, generator=g), "y": torch.randint(0, 3, (40,))}, paths["data"]
    )
    paths["dir"] = tmp_path
    paths["model"] = f"{tmp_path / 'models.py'}:make_net"
    return paths


def _run(files, view, *args, model=None, data=None):
    argv = ["landscape", view, *map(str, args), "--model", model or files["model"]]
    argv += ["--data", str(data or files["data"]), "--quiet", "--batch-size", "16"]
    return main(argv)


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_surface_slice_plane_and_hessian(files, capsys):
    d = files["dir"]
    a_bytes = files["a"].read_bytes()
    assert (
        _run(
            files,
            "surface",
            files["a"],
            "--out",
            d / "s.png",
            "--steps",
            "3",
            "--json",
            d / "s.json",
        )
        == 0
    )
    assert (d / "s.png").read_bytes()[:8] == PNG
    rec = json.loads((d / "s.json").read_text())
    assert len(rec["loss"]) == 3 and len(rec["loss"][0]) == 3 and rec["min"] <= rec["max"]
    assert files["a"].read_bytes() == a_bytes
    assert (
        _run(
            files,
            "slice",
            files["a"],
            "--out",
            d / "l.png",
            "--steps",
            "5",
            "--direction",
            "hessian",
        )
        == 0
    )
    assert (d / "l.png").read_bytes()[:8] == PNG
    assert (
        _run(
            files,
            "plane",
            files["a"],
            files["b"],
            files["c"],
            "--out",
            d / "p.png",
            "--steps",
            "4",
            "--json",
            d / "p.json",
        )
        == 0
    )
    rec = json.loads((d / "p.json").read_text())
    assert rec["points"]["A"] == [0.0, 0.0] and rec["points"]["B"] == [1.0, 0.0]
    capsys.readouterr()
    argv = [
        "landscape",
        "hessian",
        str(files["a"]),
        "--model",
        files["model"],
        "--data",
        str(files["data"]),
        "--top-k",
        "2",
        "--trace",
        "--per-layer",
        "--out",
        str(d / "h.png"),
        "--json",
        str(d / "h.json"),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "(model)" in out and "fc0" in out and "±" in out
    rec = json.loads((d / "h.json").read_text())
    assert len(rec["rows"][0]["eigenvalues"]) == 2 and rec["rows"][0]["trace"] is not None
    assert (d / "h.png").read_bytes()[:8] == PNG


def test_model_from_an_import_path(files, monkeypatch):
    monkeypatch.chdir(files["dir"])
    monkeypatch.delitem(sys.modules, "models", raising=False)
    try:
        rc = _run(
            files, "slice", files["a"], "--out", "x.png", "--steps", "3", model="models:make_net"
        )
    finally:
        sys.modules.pop("models", None)
    assert rc == 0 and (files["dir"] / "x.png").exists()


def _fails(files, capsys, view, *args, match, **kw):
    before = _listing(files["dir"])
    capsys.readouterr()
    assert _run(files, view, *args, **kw) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pymerge landscape: error:") and "\n" not in err, err
    assert match in err, err
    assert _listing(files["dir"]) == before  # nothing written


def test_errors_are_one_line(files, capsys, tmp_path):
    d, a = files["dir"], files["a"]
    out = ("--out", d / "o.png")
    m = str(d / "models.py")
    _fails(files, capsys, "surface", a, *out, model="models.py", match="MODULE:FACTORY")
    _fails(files, capsys, "surface", a, *out, model="no_such_mod:f", match="cannot import")
    _fails(files, capsys, "surface", a, *out, model=f"{m}:missing", match="has no 'missing'")
    _fails(files, capsys, "surface", a, *out, model=f"{m}:not_a_module", match="not an nn.Module")
    _fails(files, capsys, "surface", a, *out, model=f"{m}:broken", match="no weights here")
    torch.save({"x": torch.zeros(4, 6)}, tmp_path / "nox.pt")
    _fails(files, capsys, "surface", a, *out, data=tmp_path / "nox.pt", match="no tensor 'y'")
    torch.save({"x": torch.zeros(4, 6), "y": torch.zeros(3)}, tmp_path / "len.pt")
    _fails(files, capsys, "surface", a, *out, data=tmp_path / "len.pt", match="same first")
    torch.save({"x": torch.zeros(4, 5), "y": torch.zeros(4).long()}, tmp_path / "dim.pt")
    _fails(files, capsys, "surface", a, *out, data=tmp_path / "dim.pt", match="cannot run")
    torch.manual_seed(0)
    save_state_dict(MLP(6, (9,), 3).state_dict(), tmp_path / "wide.safetensors")
    _fails(files, capsys, "surface", tmp_path / "wide.safetensors", *out, match="fc0.weight")
    _fails(files, capsys, "surface", a, "--out", a, match="one of the inputs")
    _fails(files, capsys, "surface", a, "--out", d / "nodir" / "o.png", match="does not exist")
    _fails(files, capsys, "plane", a, files["b"], a, *out, match="collinear")
    _fails(files, capsys, "hessian", a, "--top-k", "1000", match="larger than")


def test_matplotlib_missing(files, capsys, monkeypatch):
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    _fails(
        files,
        capsys,
        "surface",
        files["a"],
        "--out",
        files["dir"] / "o.png",
        match='pip install "pymerge[plot]"',
    )


def test_help(capsys):
    for argv in (["landscape", "--help"], ["landscape", "surface", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
    assert "MODULE:FACTORY" in capsys.readouterr().out
