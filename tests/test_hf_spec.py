"""hf_spec: specs of Hugging Face architectures from config.json and tensor names, checked on
tiny random models built locally with transformers (a test-only dependency): a random
permutation of every group leaves the logits unchanged in float64."""

import json
import types

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers builds the test models")

from pymerge.spec import apply_permutation, random_permutation  # noqa: E402
from pymerge.spec.hf import hf_architectures, hf_spec  # noqa: E402

V, T = 61, 9


def _llama_like(cls_name, **extra):
    cfg_cls = getattr(transformers, cls_name + "Config")
    model_cls = getattr(transformers, cls_name + "ForCausalLM")
    kw = dict(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return model_cls(cfg_cls(**{**kw, **extra}))


def _rms_norm_f64(self, x):
    """RMSNorm in the input's dtype: transformers' computes in float32 whatever the input,
    whose round-off (1e-8 here) would hide a wrong permutation's float64 error."""
    eps = getattr(self, "variance_epsilon", getattr(self, "eps", 1e-6))
    return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg)


def _bert(kind="bert", head="MaskedLM"):
    prefix = {"bert": "Bert", "roberta": "Roberta"}[kind]
    cfg = getattr(transformers, prefix + "Config")(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=40,
        max_position_embeddings=40,
        num_labels=3,
    )
    return getattr(transformers, prefix + "For" + head)(cfg)


MODELS = {
    "gpt2": _gpt2,
    "llama-gqa": lambda: _llama_like("Llama"),
    "llama-tied": lambda: _llama_like("Llama", tie_word_embeddings=True),
    "llama-mha": lambda: _llama_like("Llama", num_key_value_heads=4),
    "mistral": lambda: _llama_like("Mistral"),
    "qwen2": lambda: _llama_like("Qwen2"),
    "qwen3": lambda: _llama_like("Qwen3", head_dim=8),
    "bert-mlm": lambda: _bert("bert"),
    "bert-cls": lambda: _bert("bert", "SequenceClassification"),
    "roberta-mlm": lambda: _bert("roberta"),
    "roberta-cls": lambda: _bert("roberta", "SequenceClassification"),
}


def _build(name, seed=0):
    torch.manual_seed(seed)
    model = MODELS[name]().double().eval()
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm"):
            m.forward = types.MethodType(_rms_norm_f64, m)
    with torch.no_grad():  # norms and biases away from 1 and 0, so a wrong axis shows
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in n.lower() else 0.0))
    return model


def _logits(model, state, ids):
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model(input_ids=ids).logits


def _config(model):
    return json.loads(model.config.to_json_string())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_random_permutation_leaves_the_logits_unchanged(name):
    model = _build(name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    spec = hf_spec(_config(model), keys=state)
    spec.validate(state)
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))
    before = _logits(model, state, ids)
    perm = random_permutation(spec, state, seed=3)
    assert any(not torch.equal(p, torch.arange(p.numel())) for p in perm.values())
    permuted = apply_permutation(spec, perm, state)
    changed = [k for k in state if not torch.equal(state[k], permuted[k])]
    assert len(changed) > len(state) // 2  # the permutation really moved the weights
    after = _logits(model, permuted, ids)
    torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-10)


def test_llama_groups_keep_whole_kv_heads_with_their_query_groups():
    model = _build("llama-gqa")
    spec = hf_spec(_config(model), keys=model.state_dict())
    sizes = spec.group_sizes(model.state_dict())
    assert sizes["layers.0.attn"] == 2  # kv heads
    assert sizes["layers.0.mlp"] == 40 and sizes["res"] == 32
    refs = {r.param.rsplit(".", 2)[-2]: r.inner for r in spec.perm_to_axes["layers.0.attn"]}
    assert refs == {"q_proj": 16, "k_proj": 8, "v_proj": 8, "o_proj": 16}


def test_moving_rope_pairs_jointly_would_change_the_logits():
    """Why hf_spec permutes whole heads only under rotary embeddings: swapping two pairs
    (i, i + d/2) and (j, j + d/2) of q and k together moves them to other frequencies."""
    model = _build("llama-mha")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))
    before = _logits(model, state, ids)
    hd, h = 8, 4
    within = torch.arange(hd)
    within[[0, 1]] = within[[1, 0]]
    within[[4, 5]] = within[[5, 4]]  # the partners move with them (rotate_half layout)
    idx = torch.cat([within + i * hd for i in range(h)])
    for proj in ("q_proj", "k_proj"):
        key = f"model.layers.0.self_attn.{proj}.weight"
        state[key] = state[key][idx]
    assert not torch.allclose(_logits(model, state, ids), before, rtol=1e-6, atol=1e-6)


def test_spec_from_a_saved_folder_matches_the_config_and_keys(tmp_path):
    for name in ("gpt2", "llama-gqa", "bert-mlm"):
        model = _build(name)
        folder = tmp_path / name
        model.save_pretrained(folder)
        from_folder = hf_spec(folder)
        from pymerge.io import open_checkpoint

        ckpt = open_checkpoint(folder)
        assert from_folder == hf_spec(_config(model), keys=list(ckpt))
        from_folder.validate(ckpt.meta_state())


def test_config_only_assumes_the_saved_names():
    model = _build("llama-gqa")
    assert hf_spec(_config(model)) == hf_spec(_config(model), keys=model.state_dict())
    assert hf_spec(model.config) == hf_spec(_config(model))  # a transformers config object


def test_unknown_architecture_lists_what_is_supported():
    with pytest.raises(ValueError) as err:
        hf_spec({"model_type": "mamba", "architectures": ["MambaForCausalLM"]})
    text = str(err.value)
    assert "mamba" in text and "MambaForCausalLM" in text
    for name in hf_architectures():
        assert name in text
    assert "PermutationSpec" in text and "spec_from_model" in text


def test_keys_that_do_not_fit_are_named():
    model = _build("llama-gqa")
    state = dict(model.state_dict())
    state["extra_head.weight"] = torch.zeros(3, 32)
    with pytest.raises(ValueError, match=r"does not cover 1 tensor.*'extra_head.weight'"):
        hf_spec(_config(model), keys=state)
    cfg = _config(model)
    cfg["num_hidden_layers"] = 3
    with pytest.raises(ValueError, match="expects tensor 'model.layers.2"):
        hf_spec(cfg, keys=model.state_dict())
    cfg = _config(model)
    del cfg["hidden_size"]
    with pytest.raises(ValueError, match="no 'hidden_size'"):
        hf_spec(cfg)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "bert-mlm"])
def test_weight_matching_of_two_saved_models_from_the_cli(tmp_path, name):
    """`pymerge align A_DIR B_DIR --out OUT_DIR` on transformers folders: the spec from A's
    config.json, B (a permuted, slightly perturbed A) matched back onto A, the aligned B
    computing the same logits as B."""
    from pymerge.cli import main
    from pymerge.io import open_checkpoint

    model = _build(name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    spec = hf_spec(_config(model), keys=state)
    perm = random_permutation(spec, state, seed=7)
    g = torch.Generator().manual_seed(0)
    noisy = {
        k: v + 1e-3 * torch.randn(v.shape, generator=g, dtype=v.dtype)
        if v.is_floating_point()
        else v
        for k, v in state.items()
    }
    model.save_pretrained(tmp_path / "a")
    model.load_state_dict(apply_permutation(spec, perm, noisy))
    model.save_pretrained(tmp_path / "b")
    code = main(
        [
            "align",
            str(tmp_path / "a"),
            str(tmp_path / "b"),
            "--out",
            str(tmp_path / "out"),
            "--quiet",
        ]
    )
    assert code == 0
    aligned = open_checkpoint(tmp_path / "out")
    a = open_checkpoint(tmp_path / "a")
    b = open_checkpoint(tmp_path / "b")
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))

    def logits(ckpt):  # the saved tensors only: tied weights follow the one saved
        missing, _ = model.load_state_dict({k: ckpt[k] for k in ckpt}, strict=False)
        assert all(k in ("lm_head.weight",) or "decoder" in k for k in missing), missing
        with torch.no_grad():
            return model(input_ids=ids).logits

    torch.testing.assert_close(logits(aligned), logits(b), rtol=1e-9, atol=1e-9)
    gap = max(float((aligned[k] - a[k]).abs().max()) for k in a if a[k].is_floating_point())
    assert gap < 1e-2  # B is back on A, up to the noise


def _partition(spec):
    """The spec as a set of groups, each the set of axis segments it acts on (group names
    differ between builders), and its head structures by the segments of their groups."""
    groups = {g: frozenset((r.param, r.axis, r.start, r.stop, r.inner) for r in refs)
              for g, refs in spec.perm_to_axes.items()}  # fmt: skip
    heads = {(h.num_heads, h.head_dim, frozenset(groups[g] for g in h.groups))
             for h in spec.heads.values()}  # fmt: skip
    return set(groups.values()), heads


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "bert-mlm"])
def test_hf_spec_agrees_with_the_tracer(name):
    """The generic tracer (torch.export / torch.fx over the model) and hf_spec (config and
    names only) find the same groups, segments and head structures."""
    import warnings

    from pymerge.spec import spec_from_model

    model = _build(name)
    model.config.use_cache = False  # a DynamicCache output is not a traceable value
    ids = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = spec_from_model(model, (ids,), warn=False)
    assert _partition(traced) == _partition(hf_spec(_config(model), keys=model.state_dict()))
