"""pymerge.io checkpoints: lazy reads of files, shards and model folders; atomic folder writes."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pymerge.io import (
    Checkpoint,
    CheckpointWriter,
    check_output_folder,
    is_checkpoint_folder,
    open_checkpoint,
    parse_size,
    plan_shards,
)
from pymerge.io.safetensors_format import SafetensorsShardWriter


def _state():
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(11, 8, generator=g),
        "layer.0.w": torch.randn(8, 8, generator=g).bfloat16(),
        "layer.0.b": torch.randn(8, generator=g).half(),
        "layer.1.w": torch.randn(8, 8, generator=g).double(),
        "steps": torch.arange(3),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
    }


def _same(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def _hf_folder(path, state, shards=2):
    """A Hugging Face style folder written with safetensors itself (not pymerge)."""
    path.mkdir()
    keys = list(state)
    per = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i * per : (i + 1) * per]}
        save_file(part, path / name)
        weight_map.update(dict.fromkeys(part, name))
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (path / "tokenizer.json").write_text("{}")
    return path


# --------------------------------------------------------------------------- reading


def test_single_file_reads_lazily_and_exactly(tmp_path):
    state = _state()
    save_file(state, tmp_path / "m.safetensors", metadata={"note": "x"})
    with open_checkpoint(tmp_path / "m.safetensors") as ck:
        assert isinstance(ck, Checkpoint) and len(ck) == len(state)
        assert ck.metadata == {"note": "x"}
        assert ck.shape("layer.0.w") == (8, 8) and ck.dtype("layer.0.w") == torch.bfloat16
        meta = ck.meta_state()
        assert all(t.is_meta for t in meta.values())
        assert ck.num_params() == sum(t.numel() for t in state.values())
        _same(dict(ck), state)
        assert ck["layer.0.w"] is not ck["layer.0.w"]  # a fresh tensor per read
        with pytest.raises(KeyError):
            ck["nope"]


def test_sharded_folder_with_index(tmp_path):
    state = _state()
    folder = _hf_folder(tmp_path / "hf", state, shards=3)
    assert is_checkpoint_folder(folder)
    for path in (folder, folder / "model.safetensors.index.json"):
        ck = open_checkpoint(path)
        assert ck.folder == folder and ck.config == {"model_type": "llama"}
        assert len(ck.files) == 3
        _same({k: ck[k] for k in state}, state)


@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_torch_files_and_bin_folders(tmp_path, suffix):
    state = _state()
    torch.save(state, tmp_path / f"m{suffix}")
    _same(dict(open_checkpoint(tmp_path / f"m{suffix}")), state)
    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    _same(dict(open_checkpoint(folder)), state)


def test_torch_file_never_unpickles_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"w": torch.ones(1), "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt"):
        open_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_truncated_file_is_named_when_opened(tmp_path):
    save_file(_state(), tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-10])
    with pytest.raises(ValueError, match=r"t\.safetensors.*truncated"):
        open_checkpoint(tmp_path / "t.safetensors")
    (tmp_path / "h.safetensors").write_bytes(data[:20])
    with pytest.raises(ValueError, match=r"h\.safetensors.*truncated"):
        open_checkpoint(tmp_path / "h.safetensors")


@pytest.mark.parametrize(
    "mangle, needle",
    [
        (lambda d: d[:8] + b"[" + d[9:], "not valid JSON"),
        (lambda d: b"\xff" * 8 + d[8:], "corrupt"),
        (lambda d: d.replace(b'"BF16"', b'"XX16"', 1), "dtype 'XX16'"),
        (lambda d: d.replace(b'"data_offsets":[0,', b'"data_offsets":[1,', 1), "needs"),
    ],
)
def test_corrupt_header_is_named(tmp_path, mangle, needle):
    save_file(_state(), tmp_path / "m.safetensors")
    (tmp_path / "c.safetensors").write_bytes(mangle((tmp_path / "m.safetensors").read_bytes()))
    with pytest.raises(ValueError, match=needle):
        open_checkpoint(tmp_path / "c.safetensors")


def test_missing_shard_is_named(tmp_path):
    folder = _hf_folder(tmp_path / "hf", _state(), shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"shard 'model-00002-of-00002.safetensors'"):
        open_checkpoint(folder)


def test_index_naming_a_missing_tensor(tmp_path):
    folder = _hf_folder(tmp_path / "hf", _state(), shards=2)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="'ghost.weight' is in shard 'model-00001-of-00002"):
        open_checkpoint(folder)


def test_folders_that_hold_no_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no checkpoint.*nothing"):
        open_checkpoint(tmp_path / "empty")
    two = tmp_path / "two"
    two.mkdir()
    save_file({"a": torch.ones(1)}, two / "x.safetensors")
    save_file({"a": torch.ones(1)}, two / "y.safetensors")
    with pytest.raises(ValueError, match="2 safetensors files.*no model.safetensors.index.json"):
        open_checkpoint(two)
    assert not is_checkpoint_folder(two)
    with pytest.raises(FileNotFoundError, match="no model 'a' at"):
        open_checkpoint(tmp_path / "missing", what="model 'a'")


# --------------------------------------------------------------------------- writing


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("500M") == 500 * 10**6 and parse_size(123) == 123
    assert parse_size("1.5kb") == 1500
    for bad in ("", "five", "0", "-1GB", "3XB"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_plan_shards_respects_the_size_and_min_shards():
    entries = [(f"t{i}", torch.float32, (10,)) for i in range(10)]  # 40 bytes each
    assert [len(s) for s in plan_shards(entries, 100)] == [2] * 5
    assert [len(s) for s in plan_shards(entries, 10)] == [1] * 10  # too big: own shard
    assert len(plan_shards(entries, 10**9)) == 1
    assert len(plan_shards(entries, 10**9, min_shards=2)) == 2
    assert sum(len(s) for s in plan_shards(entries[:3], 10**9, min_shards=4)) == 3


def _entries(state):
    return [(k, v.dtype, tuple(v.shape)) for k, v in state.items()]


@pytest.mark.parametrize("shard_size", ["1GB", 100])
def test_writer_round_trip_with_metadata_and_side_files(tmp_path, shard_size):
    state = _state()
    src = _hf_folder(tmp_path / "src", state)
    out = tmp_path / "out"
    side = {"config.json": src / "config.json", "tokenizer.json": src / "tokenizer.json"}
    with CheckpointWriter(
        out,
        _entries(state),
        max_shard_size=shard_size,
        metadata={"merge_method": "ties", "options": {"density": 0.2}},
        side_files=side,
        inputs={"model 'a'": src},
    ) as w:
        for k in reversed(list(state)):  # any order
            w.write(k, state[k])
    names = sorted(os.listdir(out))
    assert "config.json" in names and "tokenizer.json" in names
    ck = open_checkpoint(out)
    _same({k: ck[k] for k in state}, state)
    shards = [n for n in names if n.endswith(".safetensors")]
    for name in shards:  # plain safetensors files, readable by safetensors itself
        header = load_file(out / name)
        assert header
    meta = ck.metadata
    assert meta["merge_method"] == "ties" and json.loads(meta["options"]) == {"density": 0.2}
    assert meta["pymerge_version"] and meta["format"] == "pt"
    if len(shards) > 1:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert index["metadata"]["merge_method"] == "ties"
        assert index["metadata"]["total_size"] == sum(
            v.numel() * v.element_size() for v in state.values()
        )
    else:
        assert names.count("model.safetensors") == 1
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]  # no staging folder left


def _leftovers(tmp_path, keep):
    return sorted(n for n in os.listdir(tmp_path) if n not in keep)


def test_error_mid_write_leaves_nothing(tmp_path):
    state = _state()
    with pytest.raises(RuntimeError, match="boom"):
        with CheckpointWriter(tmp_path / "out", _entries(state), max_shard_size=64) as w:
            w.write("embed.weight", state["embed.weight"])
            raise RuntimeError("boom")
    assert _leftovers(tmp_path, ()) == []


def test_ctrl_c_mid_write_leaves_nothing_and_keeps_the_old_output(tmp_path):
    state = _state()
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous merge")
    with pytest.raises(KeyboardInterrupt):
        with CheckpointWriter(out, _entries(state), overwrite=True) as w:
            w.write("embed.weight", state["embed.weight"])
            raise KeyboardInterrupt
    assert _leftovers(tmp_path, ()) == ["out"]
    assert os.listdir(out) == ["old.txt"]


def test_a_missing_tensor_fails_the_commit(tmp_path):
    state = _state()
    with pytest.raises(RuntimeError, match="never written"):
        with CheckpointWriter(tmp_path / "out", _entries(state)) as w:
            w.write("embed.weight", state["embed.weight"])
    assert _leftovers(tmp_path, ()) == []


def test_wrong_dtype_or_shape_is_refused(tmp_path):
    state = _state()
    with pytest.raises(ValueError, match="expected torch.bfloat16"):
        with CheckpointWriter(tmp_path / "out", _entries(state)) as w:
            w.write("layer.0.w", state["layer.0.w"].float())
    assert _leftovers(tmp_path, ()) == []


def test_overwrite_replaces_an_existing_output(tmp_path):
    state = _state()
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="not empty.*--overwrite"):
        CheckpointWriter(out, _entries(state))
    with CheckpointWriter(out, _entries(state), overwrite=True) as w:
        for k, v in state.items():
            w.write(k, v)
    assert "stale.safetensors" not in os.listdir(out)
    assert _leftovers(tmp_path, ()) == ["out"]


def test_output_folder_checks(tmp_path):
    src = _hf_folder(tmp_path / "src", _state())
    f = tmp_path / "file.pt"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="it is the input model 'a'"):
        check_output_folder(src, inputs={"model 'a'": src})
    with pytest.raises(ValueError, match="inside the input model 'a'"):
        check_output_folder(src / "merged", inputs={"model 'a'": src})
    with pytest.raises(ValueError, match="contains the input"):
        check_output_folder(tmp_path, inputs={"model 'a'": src}, overwrite=True)
    with pytest.raises(ValueError, match="is not a folder"):
        check_output_folder(f)
    with pytest.raises(ValueError, match="does not exist"):
        check_output_folder(tmp_path / "no" / "out")
    with pytest.raises(ValueError, match="GB free"):
        check_output_folder(tmp_path / "out", need_bytes=10**18)
    assert check_output_folder(tmp_path / "out") == tmp_path / "out"


def test_unwritable_parent_any_user(tmp_path, monkeypatch):
    import pymerge.io.output as output

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(output.tempfile, "mkdtemp", refuse)
    with pytest.raises(ValueError, match="cannot create a folder in .*Permission denied"):
        check_output_folder(tmp_path / "out")


def test_shard_writer_writes_what_safetensors_reads(tmp_path):
    state = _state()
    w = SafetensorsShardWriter(tmp_path / "s.safetensors", _entries(state), {"k": "v"})
    for k, v in state.items():
        w.write(k, v)
    w.close()
    _same(load_file(tmp_path / "s.safetensors"), state)
    shutil.rmtree(tmp_path)


def test_load_state_dict_reads_folders_and_indexes(tmp_path):
    """What `pymerge barrier` and the other file commands load with: folders work too."""
    from pymerge.io import load_state_dict

    state = _state()
    folder = _hf_folder(tmp_path / "hf", state, shards=2)
    _same(load_state_dict(folder), state)
    _same(load_state_dict(folder / "model.safetensors.index.json"), state)
    (tmp_path / "empty.pt").mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        load_state_dict(tmp_path / "empty.pt")
