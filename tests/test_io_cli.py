"""pymerge.io (atomic, input-protecting writes) and the `pymerge align` command."""

import json

import pytest
import torch

import pymerge
from pymerge.cli import main
from pymerge.io import load_permutation, load_state_dict, save_permutation, save_state_dict
from pymerge.testing.models import MLP


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_state_dict_round_trip(tmp_path, suffix):
    state = {"w": torch.randn(3, 4), "b": torch.arange(5), "h": torch.randn(2).half()}
    path = tmp_path / f"s{suffix}"
    save_state_dict(state, path)
    back = load_state_dict(path)
    assert back.keys() == state.keys()
    for k in state:
        assert back[k].dtype == state[k].dtype and torch.equal(back[k], state[k])
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind


def test_refuses_to_overwrite_an_input(tmp_path):
    path = tmp_path / "a.safetensors"
    save_state_dict({"w": torch.ones(2)}, path)
    with pytest.raises(ValueError, match="one of the inputs"):
        save_state_dict({"w": torch.zeros(2)}, path, protect=[path])
    assert torch.equal(load_state_dict(path)["w"], torch.ones(2))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no state-dict file"):
        load_state_dict(tmp_path / "missing.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_state_dict(tmp_path / "list.pt")


def test_permutation_round_trip(tmp_path):
    perm = {"g0": torch.randperm(7), "g1": torch.randperm(3)}
    save_permutation(perm, tmp_path / "p.json")
    back = load_permutation(tmp_path / "p.json")
    assert all(torch.equal(back[g], perm[g]) for g in perm)


def test_align_command_recovers_a_permuted_copy(tmp_path):
    torch.manual_seed(0)
    model = MLP(12, hidden=(16, 16), out_dim=5)
    spec = model.spec()
    state_a = {k: v.detach().clone() for k, v in model.state_dict().items()}
    true_perm = pymerge.random_permutation(spec, state_a, seed=3)
    state_b = pymerge.apply_permutation(spec, true_perm, state_a)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_state_dict(state_a, a)
    save_state_dict(state_b, b)
    (tmp_path / "spec.json").write_text(json.dumps(spec.to_dict()))
    b_bytes = b.read_bytes()
    out, merged = tmp_path / "aligned.safetensors", tmp_path / "merged.safetensors"
    rc = main(
        [
            "align",
            str(a),
            str(b),
            "--spec",
            str(tmp_path / "spec.json"),
            "--out",
            str(out),
            "--perm-out",
            str(tmp_path / "perm.json"),
            "--merge",
            str(merged),
            "--quiet",
        ]
    )
    assert rc == 0
    assert b.read_bytes() == b_bytes  # input untouched
    aligned = load_state_dict(out)
    for k in state_a:
        torch.testing.assert_close(aligned[k], state_a[k])
    # aligned B equals A, so the midpoint merge equals A too
    for k, v in load_state_dict(merged).items():
        torch.testing.assert_close(v, state_a[k])
    assert set(load_permutation(tmp_path / "perm.json")) == set(spec.groups())


def test_align_command_will_not_write_over_its_input(tmp_path, capsys):
    model = MLP(6, hidden=(8,), out_dim=3)
    a = tmp_path / "a.pt"
    save_state_dict(model.state_dict(), a)
    (tmp_path / "spec.json").write_text(json.dumps(model.spec().to_dict()))
    before = a.read_bytes()
    rc = main(
        ["align", str(a), str(a), "--spec", str(tmp_path / "spec.json"), "--out", str(a), "--quiet"]
    )
    assert rc == 2 and "one of the inputs" in capsys.readouterr().err
    assert a.read_bytes() == before
