"""`pymerge align`: the job it does, and the defects found by probing it as a careless or
hostile user would (each a one-line error, exit status 2, and nothing written)."""

import json
import os
import stat

import pytest
import torch

import pymerge
from pymerge.cli import main
from pymerge.io import load_permutation, load_state_dict, save_state_dict
from pymerge.testing.models import MLP


@pytest.fixture
def files(tmp_path):
    """A, B (= a permuted copy of A), the spec JSON; returns a dict of paths."""
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
    return {
        "dir": tmp_path,
        "a": a,
        "b": b,
        "spec": tmp_path / "spec.json",
        "state_a": state_a,
        "groups": set(spec.groups()),
    }


def _align(files, *extra, a=None, b=None, spec=None):
    argv = ["align", str(a or files["a"]), str(b or files["b"])]
    argv += ["--spec", str(spec or files["spec"]), "--quiet", *map(str, extra)]
    return main(argv)


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_align_recovers_a_permuted_copy(files):
    d = files["dir"]
    b_bytes = files["b"].read_bytes()
    out, merged, perm = d / "aligned.safetensors", d / "merged.safetensors", d / "perm.json"
    rc = _align(files, "--out", out, "--perm-out", perm, "--merge", merged)
    assert rc == 0
    assert files["b"].read_bytes() == b_bytes  # input untouched
    for k, v in load_state_dict(out).items():
        torch.testing.assert_close(v, files["state_a"][k])
    # aligned B equals A, so the midpoint merge equals A too
    for k, v in load_state_dict(merged).items():
        torch.testing.assert_close(v, files["state_a"][k])
    assert set(load_permutation(perm)) == files["groups"]


def test_align_summary_names_the_outputs(files, capsys):
    out = files["dir"] / "o.pt"
    assert main(["align", str(files["a"]), str(files["b"]), "--spec", str(files["spec"]),
                 "--out", str(out)]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "objective" in err and "sweep" in err and str(out) in err


def test_alpha_weights_the_merge(files):
    d = files["dir"]
    rc = _align(files, "--out", d / "o.pt", "--merge", d / "m.pt", "--alpha", "0")
    assert rc == 0
    for k, v in load_state_dict(d / "m.pt").items():
        torch.testing.assert_close(v, files["state_a"][k])


def test_will_not_write_over_its_input(files, capsys):
    before = files["a"].read_bytes()
    assert _align(files, "--out", files["a"]) == 2
    assert "one of the inputs" in capsys.readouterr().err
    assert files["a"].read_bytes() == before


@pytest.mark.parametrize("other", ["--perm-out", "--merge"])
def test_two_outputs_on_one_path_are_refused(files, capsys, other):
    d = files["dir"]
    before = _listing(d)
    assert _align(files, "--out", d / "x.safetensors", other, d / "x.safetensors") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "same file" in err and other in err and "--out" in err
    assert _listing(d) == before


def _one_line_error(capsys, *needles):
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("pymerge align: error: "), lines[0]
    assert "Traceback" not in captured.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _write_bad_inputs(d, files):
    raw = files["b"].read_bytes()
    torch.save({"w": torch.ones(2)}, d / "good.pt")
    pt = (d / "good.pt").read_bytes()
    (d / "empty.safetensors").write_bytes(b"")
    (d / "truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    (d / "corrupt.safetensors").write_bytes(b"\xff" * 64)
    (d / "garbage.pt").write_bytes(b"not a checkpoint " * 10)
    (d / "truncated.pt").write_bytes(pt[:100])
    torch.save([1, 2, 3], d / "list.pt")
    torch.save({"w": "text"}, d / "strings.pt")
    os.mkdir(d / "folder.pt")


@pytest.mark.parametrize(
    "name, needle",
    [
        ("empty.safetensors", "empty"),
        ("truncated.safetensors", "not a readable safetensors file"),
        ("corrupt.safetensors", "not a readable safetensors file"),
        ("garbage.pt", "not a readable torch checkpoint"),
        ("truncated.pt", "not a readable torch checkpoint"),
        ("list.pt", "not a state dict"),
        ("strings.pt", "not a state dict of tensors"),
        ("folder.pt", "is a folder"),
        ("missing.pt", "no state-dict file"),
    ],
)
def test_bad_checkpoint_is_one_line_exit_2(files, capsys, name, needle):
    d = files["dir"]
    _write_bad_inputs(d, files)
    before = _listing(d)
    assert _align(files, "--out", d / "out.pt", b=d / name) == 2
    _one_line_error(capsys, needle, name)
    assert _listing(d) == before  # nothing written


@pytest.mark.parametrize(
    "content, needle",
    [
        ("[1, 2]", "holds a JSON list"),
        ('"text"', "holds a JSON str"),
        ("{}", "no 'perm_to_axes'"),
        ("{not json", "not valid JSON"),
        ('{"perm_to_axes": {"g": [["fc0.weight"]]}}', "not a valid permutation spec"),
    ],
)
def test_bad_spec_is_one_line_exit_2(files, capsys, content, needle):
    spec = files["dir"] / "bad.json"
    spec.write_text(content)
    assert _align(files, "--out", files["dir"] / "o.pt", spec=spec) == 2
    _one_line_error(capsys, needle)
    assert not (files["dir"] / "o.pt").exists()


def test_spec_that_is_a_folder(files, capsys):
    assert _align(files, "--out", files["dir"] / "o.pt", spec=files["dir"]) == 2
    _one_line_error(capsys, "is a folder")


def test_spec_that_does_not_fit_the_checkpoints(files, capsys):
    other = MLP(3, hidden=(4,), out_dim=2).spec()
    (files["dir"] / "other.json").write_text(json.dumps(other.to_dict()))
    rc = _align(files, "--out", files["dir"] / "o.pt", spec=files["dir"] / "other.json")
    assert rc == 2
    _one_line_error(capsys)
    assert not (files["dir"] / "o.pt").exists()


@pytest.mark.parametrize(
    "out, needle",
    [
        ("", "--out: empty path"),
        ("{dir}", "is an existing folder"),
        ("{dir}/newdir/", "names a folder"),
        ("{dir}/missing/o.pt", "does not exist"),
    ],
)
def test_bad_out_path(files, capsys, out, needle):
    d = files["dir"]
    before = _listing(d)
    assert _align(files, "--out", out.replace("{dir}", str(d))) == 2
    _one_line_error(capsys, needle)
    assert _listing(d) == before


def test_unwritable_folder(files, capsys, monkeypatch):
    from pymerge import io

    def refuse(*args, **kwargs):  # a chmod does not stop root: refuse the probe file
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(io.tempfile, "mkstemp", refuse)
    assert _align(files, "--out", files["dir"] / "o.pt") == 2
    _one_line_error(capsys, "cannot create a file in folder", "Permission denied")


def test_upper_case_suffix(files):
    d = files["dir"]
    a, b = d / "A.SAFETENSORS", d / "B.SafeTensors"
    a.write_bytes(files["a"].read_bytes())
    b.write_bytes(files["b"].read_bytes())
    out = d / "OUT.SAFETENSORS"
    assert _align(files, "--out", out, a=a, b=b) == 0
    assert out.read_bytes()[8:9] == b"{"  # written as safetensors
    for k, v in load_state_dict(out).items():
        torch.testing.assert_close(v, files["state_a"][k])


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "x"])
def test_max_iter_below_one_is_a_usage_error(files, capsys, value):
    out = files["dir"] / "o.pt"
    with pytest.raises(SystemExit) as exc:
        _align(files, "--out", out, "--max-iter", value)
    assert exc.value.code == 2
    assert "--max-iter" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-0.1", "1.5", "half"])
def test_alpha_outside_0_1_is_a_usage_error(files, capsys, value):
    d = files["dir"]
    with pytest.raises(SystemExit) as exc:
        _align(files, "--out", d / "o.pt", "--merge", d / "m.pt", "--alpha", value)
    assert exc.value.code == 2
    assert "--alpha" in capsys.readouterr().err
    assert not (d / "o.pt").exists() and not (d / "m.pt").exists()


def test_alpha_without_merge(files, capsys):
    assert _align(files, "--out", files["dir"] / "o.pt", "--alpha", "0.3") == 2
    _one_line_error(capsys, "--merge")
    assert not (files["dir"] / "o.pt").exists()


@pytest.mark.parametrize("value", ["-1", str(2**70), "1.5"])
def test_bad_seed_is_a_usage_error(files, capsys, value):
    with pytest.raises(SystemExit) as exc:
        _align(files, "--out", files["dir"] / "o.pt", "--seed", value)
    assert exc.value.code == 2 and "--seed" in capsys.readouterr().err


def test_a_failed_run_writes_no_output(files, capsys, monkeypatch):
    """The last output failing to write leaves none of the outputs behind."""
    from pymerge import io

    real = io.permutation_writer

    def failing(perm):
        real(perm)

        def write(tmp):
            raise OSError(28, "No space left on device")

        return write

    monkeypatch.setattr(io, "permutation_writer", failing)
    d = files["dir"]
    before = _listing(d)
    rc = _align(files, "--out", d / "o.pt", "--merge", d / "m.pt", "--perm-out", d / "p.json")
    assert rc == 2
    _one_line_error(capsys, "No space left on device")
    assert _listing(d) == before


def test_outputs_honour_the_umask(files):
    d = files["dir"]
    old = os.umask(0o027)
    try:
        assert _align(files, "--out", d / "o.pt", "--perm-out", d / "p.json") == 0
    finally:
        os.umask(old)
    for name in ("o.pt", "p.json"):
        assert stat.S_IMODE(os.stat(d / name).st_mode) == 0o640, name


def test_traceback_on_request(files, monkeypatch):
    monkeypatch.setenv("PYMERGE_TRACEBACK", "1")
    with pytest.raises(ValueError, match="one of the inputs"):
        _align(files, "--out", files["a"])


def test_mismatched_checkpoints_are_named_before_any_work(files, capsys):
    d = files["dir"]
    half = {k: v.half() for k, v in files["state_a"].items()}
    save_state_dict(half, d / "half.safetensors")
    assert _align(files, "--out", d / "o.pt", "--merge", d / "m.pt", b=d / "half.safetensors") == 2
    _one_line_error(capsys, "dtype", "A ", "B ", "half.safetensors")
    assert not (d / "o.pt").exists() and not (d / "m.pt").exists()
    other = MLP(12, hidden=(16, 8), out_dim=5).state_dict()
    save_state_dict(other, d / "other.safetensors")
    assert _align(files, "--out", d / "o.pt", b=d / "other.safetensors") == 2
    _one_line_error(capsys, "shape", "other.safetensors")
