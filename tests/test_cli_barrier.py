"""`pymerge barrier`: the curves, the PNG, the three barriers, --align; and bad input (one
line, exit status 2, nothing written)."""

from __future__ import annotations

import json

import pytest
import torch

import pymerge
from pymerge.cli import main
from pymerge.io import load_permutation, save_state_dict
from pymerge.testing.models import MLP

MODELS_PY = """
from pymerge.testing.models import MLP

def make():
    return MLP(6, (8, 8), 3)

def broken():
    raise RuntimeError("no such model")

def not_a_module():
    return 3
"""


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Small matrices: one torch thread."""


@pytest.fixture
def files(tmp_path):
    """A, B (= a permuted copy of A), models.py, data.pt; returns a dict of paths."""
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)
    model = MLP(6, (8, 8), 3)
    spec = model.spec()
    a = {k: v.detach().clone() for k, v in model.state_dict().items()}
    b = pymerge.apply_permutation(spec, pymerge.random_permutation(spec, a, seed=3), a)
    save_state_dict(a, tmp_path / "a.safetensors")
    save_state_dict(b, tmp_path / "b.pt")
    (tmp_path / "models.py").write_text(MODELS_PY)
    x, y = torch.randn(50, 6), torch.randint(0, 3, (50,))
    torch.save({"x": x, "y": y}, tmp_path / "data.pt")
    (tmp_path / "spec.json").write_text(json.dumps(spec.to_dict()))
    return tmp_path


def _run(d, *extra, model="make"):
    argv = [
        "barrier",
        str(d / "a.safetensors"),
        str(d / "b.pt"),
        "--model",
        f"{d}/models.py:{model}",
    ]
    argv += ["--data", str(d / "data.pt"), *map(str, extra)]
    return main(argv)


def test_barrier_writes_the_curves_and_prints_the_barriers(files, capsys):
    d = files
    before = (d / "b.pt").read_bytes()
    rc = _run(d, "--out", d / "c.png", "--json", d / "c.json", "--points", 5, "--align",
              "--perm-out", d / "perm.json")  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "loss rebasin" in out and "error midpoint" in out and "aligned" in out
    assert (d / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((d / "c.json").read_text())
    assert data["lambdas"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert set(data["curves"]) == {"naive", "aligned"}
    # B is a permuted copy of A: after alignment the path is flat, the barrier zero
    aligned = data["barriers"]["aligned"]["loss"]
    assert abs(aligned["rebasin"]) < 1e-5 and abs(aligned["midpoint"]) < 1e-5
    assert data["barriers"]["naive"]["loss"]["rebasin"] > aligned["rebasin"]
    assert set(load_permutation(d / "perm.json")) == {"fc0", "fc1"}
    assert (d / "b.pt").read_bytes() == before
    # a given spec, an even number of points (no midpoint), mse loss on one-hot targets
    rc = _run(d, "--out", d / "d.png", "--points", 4, "--align", "--spec", d / "spec.json",
              "--quiet")  # fmt: skip
    assert rc == 0
    x = torch.load(d / "data.pt")
    torch.save({"x": x["x"], "y": torch.nn.functional.one_hot(x["y"], 3).float()}, d / "reg.pt")
    argv = ["barrier", str(d / "a.safetensors"), str(d / "b.pt"), "--model",
            f"{d}/models.py:make", "--data", str(d / "reg.pt"), "--loss", "mse",
            "--out", str(d / "e.png"), "--json", str(d / "e.json"), "--points", "3"]  # fmt: skip
    assert main(argv) == 0
    assert set(json.loads((d / "e.json").read_text())["barriers"]["naive"]) == {"loss"}


@pytest.mark.parametrize(
    ("extra", "model", "message"),
    [
        (["--spec", "spec.json"], "make", "give --align too"),
        (["--perm-out", "p.json"], "make", "give --align too"),
        ([], "missing", "has no 'missing'"),
        ([], "broken", "make\\(\\) failed|broken\\(\\) failed: no such model"),
        ([], "not_a_module", "not an nn.Module"),
        (["--out", "a.safetensors"], "make", "A"),
        (["--loss", "mse"], "make", "--loss mse"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(files, capsys, extra, model, message):
    d = files
    extra = [str(d / e) if e.endswith((".json", ".safetensors")) else e for e in extra]
    if "--out" not in extra:
        extra = ["--out", str(d / "c.png"), *extra]
    rc = _run(d, *extra, "--points", 3, model=model)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("pymerge barrier: error:") and "\n" not in err
    import re

    assert re.search(message, err), err
    assert not (d / "c.png").exists()


def test_mismatched_checkpoints_and_data_are_named(files, capsys):
    d = files
    other = MLP(6, (9, 8), 3)
    save_state_dict(other.state_dict(), d / "b.pt")
    assert _run(d, "--out", d / "c.png") == 2
    assert "fc0.bias" in capsys.readouterr().err
    torch.save({"x": torch.randn(4, 7), "y": torch.zeros(4, dtype=torch.long)}, d / "data.pt")
    save_state_dict(MLP(6, (8, 8), 3).state_dict(), d / "b.pt")
    assert _run(d, "--out", d / "c.png") == 2
    assert "cannot run on --data" in capsys.readouterr().err
    torch.save({"x": torch.randn(4, 6)}, d / "data.pt")
    assert _run(d, "--out", d / "c.png") == 2
    assert "no tensor 'y'" in capsys.readouterr().err
    assert not (d / "c.png").exists()
