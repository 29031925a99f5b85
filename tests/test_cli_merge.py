"""`pymerge merge CONFIG.yaml OUT_DIR` (mergekit's YAML, streamed from disk), `pymerge align`
on model folders, and the bad inputs of issue 11: each a clear one-line message, a non-zero
exit, no partial output and the inputs untouched."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import pymerge
from pymerge.cli import main
from pymerge.io import open_checkpoint

D, I, V, L = 16, 24, 37, 3


def llama_state(seed, *, base=None, scale=0.05, layers=L, dtype=torch.float32):
    """A Llama-shaped state dict (names as transformers saves them), a fine-tune of ``base``
    when given."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    shapes = {
        "model.embed_tokens.weight": (V, D),
        "model.norm.weight": (D,),
        "lm_head.weight": (V, D),
    }
    for i in range(layers):
        m = f"model.layers.{i}"
        shapes.update(
            {
                f"{m}.input_layernorm.weight": (D,),
                f"{m}.post_attention_layernorm.weight": (D,),
                f"{m}.self_attn.q_proj.weight": (D, D),
                f"{m}.self_attn.k_proj.weight": (D // 2, D),
                f"{m}.self_attn.v_proj.weight": (D // 2, D),
                f"{m}.self_attn.o_proj.weight": (D, D),
                f"{m}.mlp.gate_proj.weight": (I, D),
                f"{m}.mlp.up_proj.weight": (I, D),
                f"{m}.mlp.down_proj.weight": (D, I),
            }
        )
    if base is None:
        return {k: rnd(*s).to(dtype) for k, s in shapes.items()}
    return {k: (base[k].float() + scale * rnd(*s)).to(dtype) for k, s in shapes.items()}


def llama_config(layers=L, **extra):
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": D,
        "intermediate_size": I,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": V,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        **extra,
    }


def save_folder(path, state, config=None, shards=1, tokenizer=True):
    path.mkdir(parents=True)
    keys = sorted(state)
    if shards == 1:
        save_file(state, path / "model.safetensors")
    else:
        per = -(-len(keys) // shards)
        wm = {}
        for i in range(shards):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: state[k] for k in keys[i * per : (i + 1) * per]}
            save_file(part, path / name)
            wm.update(dict.fromkeys(part, name))
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    (path / "config.json").write_text(json.dumps(config or llama_config()))
    if tokenizer:
        (path / "tokenizer.json").write_text(json.dumps({"model": str(path.name)}))
        (path / "tokenizer_config.json").write_text("{}")
    return path


@pytest.fixture
def models(tmp_path):
    base = llama_state(0)
    fts = [llama_state(10 + i, base=base) for i in range(3)]
    paths = {"base": save_folder(tmp_path / "base", base)}
    for i, ft in enumerate(fts):
        paths[f"ft{i}"] = save_folder(tmp_path / f"ft{i}", ft, shards=2 if i == 1 else 1)
    return {"dir": tmp_path, "paths": paths, "base": base, "fts": fts}


def write_config(tmp_path, text, name="merge.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def run(config, out, *extra):
    return main(["merge", str(config), str(out), "--quiet", *map(str, extra)])


def digest(folder):
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def one_line_error(capsys, needle):
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("pymerge merge: error: "), err
    assert needle in err, err
    return err


def read_out(out):
    ck = open_checkpoint(out)
    return {k: ck[k] for k in ck}


LINEAR = """
merge_method: linear
models:
  - model: {d}/ft0
    parameters:
      weight: 1.0
  - model: {d}/ft1
    parameters:
      weight: [0.2, 0.8]
  - model: {d}/ft2
    parameters:
      weight:
        - filter: mlp
          value: 3.0
parameters:
  weight: 0.5
  normalize: true
dtype: float32
"""


# --------------------------------------------------------------------------- merging


def test_linear_merge_streams_to_the_in_memory_result(models):
    d = models["dir"]
    cfg = write_config(d, LINEAR.format(d=d))
    assert run(cfg, d / "out") == 0
    got = read_out(d / "out")
    # mergekit's precedence: ft2's filter falls through to the global weight off the mlp keys
    want = pymerge.merge(
        "linear",
        models["fts"],
        weight=[1.0, [0.2, 0.8], [{"filter": "mlp", "value": 3.0}, {"value": 0.5}]],
    )
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)
    names = sorted(os.listdir(d / "out"))
    assert names == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    meta = open_checkpoint(d / "out").metadata
    assert meta["merge_method"] == "linear" and meta["pymerge_version"] == pymerge.__version__
    assert json.loads(meta["merge_config"])["merge_method"] == "linear"


def test_threads_off_gives_the_same_bytes(models):
    d = models["dir"]
    cfg = write_config(d, LINEAR.format(d=d))
    assert run(cfg, d / "a") == 0
    assert run(cfg, d / "b", "--no-threads") == 0
    assert (d / "a" / "model.safetensors").read_bytes() == (
        d / "b" / "model.safetensors"
    ).read_bytes()


def test_sharded_output_dtype_and_tokenizer_source(models):
    d = models["dir"]
    cfg = write_config(
        d,
        f"""
merge_method: linear
base_model: {d}/base
models:
  - model: {d}/ft0
  - model: {d}/ft1
dtype: float32
out_dtype: bfloat16
tokenizer_source: {d}/ft1
shard_size: 2KB
""",
    )
    assert run(cfg, d / "out") == 0
    names = os.listdir(d / "out")
    assert (
        "model.safetensors.index.json" in names
        and len([n for n in names if n.endswith("safetensors")]) > 2
    )
    got = read_out(d / "out")
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    # linear takes no base: mergekit merges base_model as one more model
    want = pymerge.merge("linear", [models["fts"][0], models["fts"][1], models["base"]])
    for k in want:
        torch.testing.assert_close(got[k], want[k].bfloat16(), rtol=0, atol=0)
    assert json.loads((d / "out" / "tokenizer.json").read_text()) == {"model": "ft1"}
    config = json.loads((d / "out" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["hidden_size"] == D


def test_slices_stack_layers(models):
    d = models["dir"]
    cfg = write_config(
        d,
        f"""
merge_method: linear
slices:
  - sources:
      - model: {d}/ft0
        layer_range: [0, 2]
  - sources:
      - model: {d}/ft1
        layer_range: [1, 3]
      - model: {d}/ft2
        layer_range: [1, 3]
""",
    )
    assert run(cfg, d / "out") == 0
    got = read_out(d / "out")
    ft0, ft1, ft2 = models["fts"]
    k = "self_attn.q_proj.weight"
    assert torch.equal(got[f"model.layers.1.{k}"], ft0[f"model.layers.1.{k}"])
    torch.testing.assert_close(
        got[f"model.layers.3.{k}"], (ft1[f"model.layers.2.{k}"] + ft2[f"model.layers.2.{k}"]) / 2
    )
    assert torch.equal(got["model.embed_tokens.weight"], ft0["model.embed_tokens.weight"])
    torch.testing.assert_close(
        got["lm_head.weight"], (ft1["lm_head.weight"] + ft2["lm_head.weight"]) / 2
    )
    assert sum(1 for key in got if key.endswith(k)) == 4
    assert json.loads((d / "out" / "config.json").read_text())["num_hidden_layers"] == 4


def test_dry_run_prints_the_plan_and_writes_nothing(models, capsys):
    d = models["dir"]
    cfg = write_config(d, LINEAR.format(d=d))
    before = sorted(os.listdir(d))
    assert main(["merge", str(cfg), str(d / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "plan: linear" in out and "model.layers.2.mlp.down_proj.weight" in out
    assert "estimated peak memory" in out and "estimated time" in out
    assert "weight=[1, 0.2, 3]" in out  # the mlp keys' resolved weights, per model
    assert sorted(os.listdir(d)) == before


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (
            lambda d: (d / "ft0" / "model.safetensors").write_bytes(
                (d / "ft0" / "model.safetensors").read_bytes()[:-100]
            ),
            "truncated",
        ),
        (
            lambda d: (d / "ft0" / "model.safetensors").write_bytes(
                b"\x40\x00\x00\x00\x00\x00\x00\x00{garbage" + b" " * 100
            ),
            "not valid JSON",
        ),
        (
            lambda d: (d / "ft1" / "model-00002-of-00002.safetensors").unlink(),
            "shard 'model-00002-of-00002.safetensors'",
        ),
        (lambda d: _index_ghost(d / "ft1"), "'ghost.weight' is in shard"),
        (
            lambda d: (d / "ft2" / "config.json").write_text(
                json.dumps(llama_config(hidden_size=32))
            ),
            "mismatched architectures",
        ),
        (lambda d: _drop_key(d / "ft2", "model.norm.weight"), "model.norm.weight"),
        (lambda d: _reshape_key(d / "ft2", "lm_head.weight"), "lm_head.weight"),
    ],
    ids=[
        "truncated",
        "corrupt",
        "missing-shard",
        "index-ghost",
        "architecture",
        "missing-key",
        "shape",
    ],
)
def test_bad_inputs_fail_before_any_work(models, capsys, mutate, needle):
    d = models["dir"]
    mutate(d)
    cfg = write_config(d, LINEAR.format(d=d))
    before = {n: digest(p) for n, p in models["paths"].items()}
    assert run(cfg, d / "out") == 2
    one_line_error(capsys, needle)
    assert not (d / "out").exists()
    assert not [n for n in os.listdir(d) if "pymerge-tmp" in n]
    assert {n: digest(p) for n, p in models["paths"].items()} == before


def _index_ghost(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _drop_key(folder, key):
    state = load_file(folder / "model.safetensors")
    del state[key]
    save_file(state, folder / "model.safetensors")


def _reshape_key(folder, key):
    state = load_file(folder / "model.safetensors")
    state[key] = torch.zeros(V + 1, D)
    save_file(state, folder / "model.safetensors")


@pytest.mark.parametrize(
    "text, needle",
    [
        ("merge_method: linaer\nmodels: [{{model: {d}/ft0}}]", "did you mean 'linear'"),
        (
            "merge_method: linear\nmodels: [{{model: {d}/ft0, parameters: {{wieght: 1}}}}]",
            "model '{d}/ft0' sets parameter 'wieght'",
        ),
        (
            "merge_method: linear\nmodels: [{{model: {d}/ft0}}]\nparameters: {{normalise: true}}",
            "parameter 'normalise' is not one of linear's (did you mean 'normalize'?)",
        ),
        (
            "merge_method: linear\nmodels: [{{model: {d}/ft0}}]\ndtyp: float16",
            "unknown config key 'dtyp'",
        ),
        (
            "merge_method: linear\nmodels: [{{model: {d}/nowhere}}]",
            "models[0]: model '{d}/nowhere' not found",
        ),
        (
            "merge_method: linear\nmodels: [{{model: org/name}}]",
            "huggingface-cli download org/name",
        ),
        (
            "merge_method: linear\nmodels: [{{model: {d}/ft0}},"
            " {{model: {d}/ft1, parameters: {{weight: .nan}}}}]",
            "must be finite",
        ),
        (
            "merge_method: linear\nmodels: [{{model: {d}/ft0,"
            " parameters: {{weight: [{{filter: mlp, value: 0}}]}}}}]\nparameters: {{weight: 0}}",
            "sum to zero at key",
        ),
        (
            "merge_method: linear\nmodels: [{{model: {d}/ft0}}]\ndtype: float8",
            "unknown dtype 'float8'",
        ),
        ("merge_method: linear\nmodels: [{{model: '{d}/ft0+lora'}}]", "LoRA"),
        ("merge_method: linear\nmodels: [{{model: {d}/ft0}}]\ntokenizer_source: union", "union"),
        ("merge_method: linear\nmodels: [{{model: {d}/ft0]", "not valid YAML at line"),
    ],
)
def test_config_errors_name_the_entry(models, capsys, text, needle):
    d = models["dir"]
    cfg = write_config(d, text.format(d=d))
    assert run(cfg, d / "out") == 2
    one_line_error(capsys, needle.format(d=d))
    assert not (d / "out").exists()


def test_output_inside_an_input_or_unwritable(models, capsys, monkeypatch):
    d = models["dir"]
    cfg = write_config(d, LINEAR.format(d=d))
    before = digest(d / "ft0")
    assert run(cfg, d / "ft0" / "merged") == 2
    one_line_error(capsys, "inside the input model")
    assert run(cfg, d / "ft0") == 2
    one_line_error(capsys, "it is the input model")
    assert run(cfg, d) == 2
    one_line_error(capsys, "contains the input")
    assert digest(d / "ft0") == before

    import pymerge.io.output as output

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(output.tempfile, "mkdtemp", refuse)
    assert run(cfg, d / "out") == 2
    one_line_error(capsys, "Permission denied")
    assert not (d / "out").exists()


def test_existing_output_needs_overwrite(models, capsys):
    d = models["dir"]
    cfg = write_config(d, LINEAR.format(d=d))
    (d / "out").mkdir()
    (d / "out" / "keep.txt").write_text("x")
    assert run(cfg, d / "out") == 2
    one_line_error(capsys, "--overwrite")
    assert run(cfg, d / "out", "--overwrite") == 0
    assert "keep.txt" not in os.listdir(d / "out")


def test_interrupt_mid_write_leaves_nothing(models, capsys, monkeypatch):
    d = models["dir"]
    cfg = write_config(d, LINEAR.format(d=d))
    from pymerge.io.output import CheckpointWriter

    real = CheckpointWriter.write
    calls = []

    def write(self, key, tensor):
        calls.append(key)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(self, key, tensor)

    monkeypatch.setattr(CheckpointWriter, "write", write)
    assert run(cfg, d / "out") == 130
    assert "interrupted" in capsys.readouterr().err
    assert not (d / "out").exists()
    assert not [n for n in os.listdir(d) if n.startswith(".out.")]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_write_leaves_nothing(models, sig):
    """A real signal to a running ``pymerge merge`` (its writes slowed so it is caught
    mid-write): exit status 130, no output folder, no staging folder, inputs untouched."""
    d = models["dir"]
    cfg = write_config(d, LINEAR.format(d=d))
    before = {n: digest(p) for n, p in models["paths"].items()}
    script = (
        "import sys, time\n"
        "from pymerge.io.output import CheckpointWriter\n"
        "real = CheckpointWriter.write\n"
        "def slow(self, k, t):\n"
        "    time.sleep(0.2); return real(self, k, t)\n"
        "CheckpointWriter.write = slow\n"
        "from pymerge.cli import main\n"
        f"sys.exit(main(['merge', {str(cfg)!r}, {str(d / 'out')!r}, '--quiet']))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not [n for n in os.listdir(d) if "pymerge-tmp" in n]:
        time.sleep(0.02)
    assert [n for n in os.listdir(d) if "pymerge-tmp" in n], "the merge never started writing"
    time.sleep(0.3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert not (d / "out").exists()
    assert not [n for n in os.listdir(d) if "pymerge-tmp" in n]
    assert {n: digest(p) for n, p in models["paths"].items()} == before


# --------------------------------------------------------------------------- align


def test_align_then_merge_undoes_a_permutation(models):
    """align: weight matching (streamed from disk, spec from config.json) permutes each model
    onto the base before merging: a permuted copy of a fine-tune merges as the fine-tune."""
    from pymerge.spec import apply_permutation, random_permutation
    from pymerge.spec.hf import hf_spec

    d = models["dir"]
    spec = hf_spec(llama_config(), keys=models["base"])
    perm = random_permutation(spec, models["base"], seed=5)
    save_folder(d / "ft0p", apply_permutation(spec, perm, models["fts"][0]))
    text = f"""
merge_method: linear
base_model: {d}/base
models:
  - model: {d}/ft0p
align:
  method: weight_matching
  max_iter: 20
"""
    cfg = write_config(d, text.replace("linear", "linear"))
    # linear takes no base, so base is merged as a model too: (base + unpermuted ft0) / 2
    assert run(cfg, d / "out") == 0
    got = read_out(d / "out")
    want = pymerge.merge("linear", [models["fts"][0], models["base"]])
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)


def test_align_hf_folders_from_the_cli(tmp_path, capsys):
    """`pymerge align A_DIR B_DIR --out OUT_DIR`: the spec from A's config.json, B permuted
    back onto A, config and tokenizer files carried over."""
    from pymerge.spec import apply_permutation, random_permutation
    from pymerge.spec.hf import hf_spec

    base = llama_state(0)
    spec = hf_spec(llama_config(), keys=base)
    perm = random_permutation(spec, base, seed=2)
    save_folder(tmp_path / "a", base)
    save_folder(tmp_path / "b", apply_permutation(spec, perm, base))
    code = main(
        [
            "align",
            str(tmp_path / "a"),
            str(tmp_path / "b"),
            "--out",
            str(tmp_path / "b_aligned"),
            "--merge",
            str(tmp_path / "mid"),
            "--perm-out",
            str(tmp_path / "perm.json"),
            "--quiet",
        ]
    )
    assert code == 0, capsys.readouterr().err
    back = read_out(tmp_path / "b_aligned")
    for k in base:
        assert torch.equal(back[k], base[k]), k
    assert "config.json" in os.listdir(tmp_path / "b_aligned")
    assert json.loads((tmp_path / "perm.json").read_text()).keys() == set(spec.perm_to_axes)
    mid = read_out(tmp_path / "mid")
    torch.testing.assert_close(mid["lm_head.weight"], base["lm_head.weight"])


# --------------------------------------------------------------------------- info


def test_info_checkpoint_lists_tensors_architecture_and_groups(models, capsys):
    assert main(["info", str(models["paths"]["ft1"])]) == 0
    out = capsys.readouterr().out
    assert "llama (LlamaForCausalLM)" in out and "model.layers.2.mlp.up_proj.weight" in out
    assert "layers.0.attn" in out and "res" in out
    assert main(["info", str(models["paths"]["ft1"]), "--json", "--no-keys"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tensors"] == 3 + 9 * L and len(info["files"]) == 2
    assert {g["group"]: g["size"] for g in info["permutation_groups"]}["layers.0.attn"] == 2
    assert main(["info", str(models["dir"] / "nowhere")]) == 2
    one_line_error_cmd(capsys, "info", "no checkpoint at")


def test_info_reports_the_simd_level_picked(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "simd" in info and "cpu_simd" in info


def one_line_error_cmd(capsys, cmd, needle):
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"pymerge {cmd}: error: ") and needle in err, err


# --------------------------------------------------------------------------- barrier


def test_barrier_reads_checkpoint_folders(tmp_path, capsys):
    """`pymerge barrier` loads through pymerge.io: model folders (sharded here) work."""
    pytest.importorskip("matplotlib")
    from pymerge.testing.models import MLP

    (tmp_path / "net.py").write_text(
        "from pymerge.testing.models import MLP\n\ndef make():\n    return MLP(6, (8,), 3)\n"
    )
    for i, name in enumerate(("a", "b")):
        torch.manual_seed(i)
        state = {k: v.clone() for k, v in MLP(6, (8,), 3).state_dict().items()}
        save_folder(tmp_path / name, state, config={"model_type": "mlp"}, shards=2)
    torch.save({"x": torch.randn(32, 6), "y": torch.randint(0, 3, (32,))}, tmp_path / "d.pt")
    code = main(
        [
            "barrier",
            str(tmp_path / "a"),
            str(tmp_path / "b"),
            "--model",
            f"{tmp_path / 'net.py'}:make",
            "--data",
            str(tmp_path / "d.pt"),
            "--out",
            str(tmp_path / "c.png"),
            "--points",
            "3",
            "--quiet",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "c.png").stat().st_size > 0


# --------------------------------------------------------------------------- mergekit


MERGEKIT_CASES = {
    "linear": """
merge_method: linear
base_model: {d}/base
models:
  - model: {d}/ft0
    parameters: {{weight: 1.0}}
  - model: {d}/ft1
    parameters:
      weight: [{{filter: mlp, value: 2.0}}]
parameters: {{weight: 0.5}}
dtype: float32
""",
    "slerp": """
merge_method: slerp
base_model: {d}/ft1
models:
  - model: {d}/ft0
  - model: {d}/ft1
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 1]
    - value: 0.3
dtype: float32
""",
    "ties": """
merge_method: ties
base_model: {d}/base
models:
  - model: {d}/base
  - model: {d}/ft0
    parameters: {{density: 0.5, weight: 1.0}}
  - model: {d}/ft1
    parameters: {{density: 0.3, weight: [0.5, 1.0]}}
  - model: {d}/ft2
    parameters: {{density: 0.7, weight: 0.8}}
parameters: {{normalize: true}}
dtype: float32
""",
}


@pytest.fixture(scope="module")
def mergekit_outputs(tmp_path_factory):
    """The MERGEKIT_CASES merged by mergekit itself (one process, imported once)."""
    pytest.importorskip("mergekit", reason="mergekit (test-only) compares the YAML semantics")
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    import pymerge.merge as pm

    d = tmp_path_factory.mktemp("mk")
    base = llama_state(0)
    save_folder(d / "base", base, tokenizer=False)
    for i in range(3):
        save_folder(d / f"ft{i}", llama_state(10 + i, base=base, scale=0.2), tokenizer=False)
    outs = {}
    for name, text in MERGEKIT_CASES.items():
        if name not in pm.method_names():
            continue
        text = text.format(d=d)
        (d / f"{name}.yaml").write_text(text)
        cfg = MergeConfiguration.model_validate(yaml.safe_load(text))
        run_merge(cfg, str(d / f"mk-{name}"), MergeOptions(copy_tokenizer=False, quiet=True))
        outs[name] = d
    return outs


@pytest.mark.parametrize("name", sorted(MERGEKIT_CASES))
def test_same_tensors_as_mergekit(mergekit_outputs, name):
    if name not in mergekit_outputs:
        pytest.skip(f"pymerge has no {name!r} method registered yet")
    d = mergekit_outputs[name]
    assert run(d / f"{name}.yaml", d / f"pm-{name}") == 0
    ours, theirs = read_out(d / f"pm-{name}"), read_out(d / f"mk-{name}")
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-6, msg=k)


# --------------------------------------------------------------------------- data


@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_data_aware_methods_from_the_config(models, method):
    """data: {batches: ids.pt}: the network built from config.json (transformers), the
    models loaded whole, pymerge.merge(method, ..., model=, batches=)."""
    pytest.importorskip("transformers")
    import pymerge.merge as pm

    if method not in pm.method_names():
        pytest.skip(f"{method} is not registered")
    d = models["dir"]
    torch.save({"input_ids": torch.randint(0, V, (6, 7))}, d / "ids.pt")
    cfg = write_config(
        d,
        f"merge_method: {method}\nmodels: [{{model: {d}/ft0}}, {{model: {d}/ft1}}]\n"
        "data: {batches: ids.pt, batch_size: 3}\n",
    )
    assert run(cfg, d / "out") == 0
    got = read_out(d / "out")
    assert sorted(got) == sorted(models["fts"][0])
    k = "model.layers.0.mlp.up_proj.weight"
    avg = (models["fts"][0][k] + models["fts"][1][k]) / 2
    assert torch.isfinite(got[k]).all() and not torch.equal(got[k], avg)
    cfg2 = write_config(d, f"merge_method: {method}\nmodels: [{{model: {d}/ft0}}]\n", "no.yaml")
    assert run(cfg2, d / "out2") == 2  # no data: says what to add
