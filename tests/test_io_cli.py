"""pymerge.io: loaders with clear errors, output-path checks, atomic all-or-nothing writes."""

import json
import os
import stat

import pytest
import torch

from pymerge import io
from pymerge.io import (
    check_output_paths,
    load_permutation,
    load_spec,
    load_state_dict,
    permutation_writer,
    save_permutation,
    save_state_dict,
    state_dict_writer,
    write_all,
)
from pymerge.testing.models import MLP


def _state():
    return {"w": torch.randn(3, 4), "b": torch.arange(5), "h": torch.randn(2).half()}


@pytest.mark.parametrize("suffix", [".safetensors", ".SAFETENSORS", ".SafeTensors", ".pt", ".bin"])
def test_state_dict_round_trip(tmp_path, suffix):
    state = _state()
    path = tmp_path / f"s{suffix}"
    save_state_dict(state, path)
    back = load_state_dict(path)
    assert back.keys() == state.keys()
    for k in state:
        assert back[k].dtype == state[k].dtype and torch.equal(back[k], state[k])
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind


def test_upper_case_suffix_is_safetensors(tmp_path):
    path = tmp_path / "s.SAFETENSORS"
    save_state_dict({"w": torch.ones(2)}, path)
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header, not a torch zip
    assert io.is_safetensors_path(path) and not io.is_safetensors_path(tmp_path / "s.pt")


def test_shared_memory_tensors_save_as_safetensors(tmp_path):
    w = torch.randn(4, 4)
    save_state_dict({"a": w, "tied": w}, tmp_path / "t.safetensors")
    back = load_state_dict(tmp_path / "t.safetensors")
    assert torch.equal(back["a"], back["tied"])


def test_refuses_to_overwrite_an_input(tmp_path):
    path = tmp_path / "a.safetensors"
    save_state_dict({"w": torch.ones(2)}, path)
    with pytest.raises(ValueError, match="one of the inputs"):
        save_state_dict({"w": torch.zeros(2)}, path, protect=[path])
    assert torch.equal(load_state_dict(path)["w"], torch.ones(2))


def test_refuses_an_input_through_a_link(tmp_path):
    src = tmp_path / "a.pt"
    save_state_dict({"w": torch.ones(2)}, src)
    os.symlink(src, tmp_path / "sym.pt")
    os.link(src, tmp_path / "hard.pt")
    for alias in ("sym.pt", "hard.pt"):
        with pytest.raises(ValueError, match="one of the inputs"):
            save_state_dict({"w": torch.zeros(2)}, tmp_path / alias, protect=[src])
    assert torch.equal(load_state_dict(src)["w"], torch.ones(2))


# --------------------------------------------------------------------------- bad input files


def _bad_files(tmp_path):
    good = tmp_path / "good.safetensors"
    save_state_dict({"w": torch.ones(100)}, good)
    raw = good.read_bytes()
    good_pt = tmp_path / "good.pt"
    save_state_dict({"w": torch.ones(100)}, good_pt)
    files = {
        "empty.safetensors": (b"", "empty"),
        "empty.pt": (b"", "empty"),
        "truncated.safetensors": (raw[: len(raw) - 16], "not a readable safetensors"),
        "header-only.safetensors": (raw[:20], "not a readable safetensors"),
        "garbage.safetensors": (os.urandom(512), "not a readable safetensors"),
        "truncated.pt": (good_pt.read_bytes()[:200], "not a readable torch checkpoint"),
        "garbage.pt": (b"hello, this is not a checkpoint at all" * 4, "not a readable torch"),
        "named-wrong.pt": (raw, "looks like a safetensors file"),
    }
    out = {}
    for name, (data, msg) in files.items():
        (tmp_path / name).write_bytes(data)
        out[name] = msg
    return out


def test_load_bad_files_name_the_file_and_the_problem(tmp_path):
    for name, msg in _bad_files(tmp_path).items():
        with pytest.raises(ValueError, match=msg) as err:
            load_state_dict(tmp_path / name)
        assert name in str(err.value), name


def test_load_non_tensor_checkpoints(tmp_path):
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        load_state_dict(tmp_path / "list.pt")
    torch.save({"model": {"w": torch.ones(1)}, "step": 3}, tmp_path / "nested.pt")
    with pytest.raises(ValueError, match="'model' holds a dict.*model.state_dict"):
        load_state_dict(tmp_path / "nested.pt")
    torch.save({}, tmp_path / "empty-dict.pt")
    with pytest.raises(ValueError, match="empty state dict"):
        load_state_dict(tmp_path / "empty-dict.pt")
    torch.save({"w": torch.ones(1), "opt": torch.optim.SGD}, tmp_path / "obj.pt")
    with pytest.raises(ValueError, match="holds objects other than tensors"):
        load_state_dict(tmp_path / "obj.pt")


def test_load_lightning_checkpoint_is_unwrapped(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 1}, tmp_path / "l.ckpt")
    assert torch.equal(load_state_dict(tmp_path / "l.ckpt")["w"], torch.ones(2))


def test_load_missing_folder_and_empty_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no state-dict file"):
        load_state_dict(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="is a folder"):
        load_state_dict(tmp_path)
    with pytest.raises(ValueError, match="empty path"):
        load_state_dict("")


def test_permutation_round_trip_and_errors(tmp_path):
    perm = {"g0": torch.randperm(7), "g1": torch.randperm(3)}
    save_permutation(perm, tmp_path / "p.json")
    back = load_permutation(tmp_path / "p.json")
    assert all(torch.equal(back[g], perm[g]) for g in perm)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds a JSON list"):
        load_permutation(tmp_path / "list.json")
    (tmp_path / "floats.json").write_text('{"g": [0.5, 1]}')
    with pytest.raises(ValueError, match="not a list of integer indices"):
        load_permutation(tmp_path / "floats.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ValueError, match="not valid JSON.*permutation"):
        load_permutation(tmp_path / "bad.json")


def test_load_spec(tmp_path):
    spec = MLP(6, hidden=(8,), out_dim=3).spec()
    (tmp_path / "spec.json").write_text(json.dumps(spec.to_dict()))
    assert load_spec(tmp_path / "spec.json").to_dict() == spec.to_dict()
    cases = {
        "list.json": ("[1, 2]", "holds a JSON list"),
        "other.json": ('{"a": 1}', "no 'perm_to_axes'"),
        "broken.json": ('{"perm_to_axes": {"g": [[1, 2, 3]]}}', "not a valid permutation spec"),
        "text.json": ("not json", "not valid JSON.*spec"),
    }
    for name, (text, msg) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=msg):
            load_spec(tmp_path / name)
    with pytest.raises(ValueError, match="is a folder"):
        load_spec(tmp_path)


# --------------------------------------------------------------------------- output checks


def test_check_output_paths_accepts_distinct_new_files(tmp_path):
    out = check_output_paths(
        {"--out": tmp_path / "a.pt", "--perm-out": tmp_path / "p.json", "--merge": None},
        inputs={"A": tmp_path / "in.pt"},
    )
    assert out == {"--out": tmp_path / "a.pt", "--perm-out": tmp_path / "p.json"}
    assert list(tmp_path.iterdir()) == []  # the writability probe leaves nothing behind


@pytest.mark.parametrize(
    "outputs, message",
    [
        ({"--out": ""}, "--out: empty path"),
        ({"--out": "{tmp}"}, "is an existing folder"),
        ({"--out": "{tmp}/sub/"}, "names a folder"),
        ({"--out": "{tmp}/missing/x.pt"}, "folder .* does not exist"),
        ({"--out": "{tmp}/file.txt/x.pt"}, "is not a folder"),
        ({"--out": "{tmp}/x.pt", "--perm-out": "{tmp}/x.pt"}, "--perm-out .* and --out .* same"),
        ({"--out": "{tmp}/x.pt", "--merge": "{tmp}/./x.pt"}, "--merge .* and --out .* same file"),
        ({"--out": "{tmp}/in.pt"}, "one of the inputs"),
    ],
)
def test_check_output_paths_refuses(tmp_path, outputs, message):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "in.pt").write_text("x")
    outputs = {k: v.replace("{tmp}", str(tmp_path)) for k, v in outputs.items()}
    with pytest.raises(ValueError, match=message):
        check_output_paths(outputs, inputs={"A": tmp_path / "in.pt"})


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_output_paths_unwritable_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="cannot create a file in folder"):
            check_output_paths({"--out": ro / "x.pt"})
    finally:
        ro.chmod(0o700)


def test_check_output_paths_unwritable_folder_any_user(tmp_path, monkeypatch):
    # as root a chmod does not stop writes: make creating the probe file fail instead
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(io.tempfile, "mkstemp", refuse)
    with pytest.raises(ValueError, match="cannot create a file in folder .*Permission denied"):
        check_output_paths({"--out": tmp_path / "x.pt"})


# --------------------------------------------------------------------------- writes


def test_write_all_writes_every_output(tmp_path):
    state, perm = _state(), {"g": torch.randperm(4)}
    a, p = tmp_path / "a.safetensors", tmp_path / "p.json"
    write_all({a: state_dict_writer(state, a), p: permutation_writer(perm)})
    assert torch.equal(load_state_dict(a)["w"], state["w"])
    assert torch.equal(load_permutation(p)["g"], perm["g"])
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.safetensors", "p.json"]


def test_write_all_writes_none_when_one_fails(tmp_path):
    old = tmp_path / "old.pt"
    save_state_dict({"w": torch.ones(2)}, old)
    before = old.read_bytes()

    def boom(tmp):
        raise OSError(28, "No space left on device")

    new = tmp_path / "new.pt"
    with pytest.raises(OSError, match="No space left"):
        write_all({old: state_dict_writer({"w": torch.zeros(2)}, old), new: boom})
    assert old.read_bytes() == before and not new.exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["old.pt"]


def test_write_all_puts_back_replaced_files_when_a_move_fails(tmp_path, monkeypatch):
    first, second = tmp_path / "first.pt", tmp_path / "second.pt"
    save_state_dict({"w": torch.ones(2)}, first)
    before = first.read_bytes()
    real_replace = os.replace
    calls = []

    def flaky(src, dst):
        calls.append(dst)
        if str(dst) == str(second):
            raise OSError(5, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", flaky)
    with pytest.raises(OSError, match="Input/output"):
        write_all(
            {
                first: state_dict_writer({"w": torch.zeros(2)}, first),
                second: state_dict_writer({"w": torch.zeros(2)}, second),
            }
        )
    monkeypatch.setattr(io.os, "replace", real_replace)
    assert first.read_bytes() == before and not second.exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["first.pt"]


def test_write_all_checks_before_writing(tmp_path):
    a = tmp_path / "a.pt"
    with pytest.raises(ValueError, match="same file"):
        write_all({a: permutation_writer({}), str(a): permutation_writer({})})
    assert not a.exists()


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_new_files_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        save_state_dict({"w": torch.ones(2)}, tmp_path / "a.safetensors")
        save_permutation({"g": torch.arange(3)}, tmp_path / "p.json")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.safetensors") == 0o666 & ~umask
    assert _mode(tmp_path / "p.json") == 0o666 & ~umask


def test_replaced_file_keeps_its_mode(tmp_path):
    path = tmp_path / "a.pt"
    save_state_dict({"w": torch.ones(2)}, path)
    path.chmod(0o640)
    save_state_dict({"w": torch.zeros(2)}, path)
    assert _mode(path) == 0o640
    assert torch.equal(load_state_dict(path)["w"], torch.zeros(2))
