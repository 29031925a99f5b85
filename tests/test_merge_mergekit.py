"""pymerge against mergekit (PyPI; a test-only dependency) on tiny random Llama checkpoints.

Every case of ``CASES`` builds a mergekit configuration (``merge_method``, ``base_model``,
``models`` with per-model ``parameters``, global ``parameters``, ``dtype``/``out_dtype``),
runs mergekit's own entry point (``mergekit.merge.run_merge``) on checkpoints written to a
tmp dir, and compares every output tensor with ``pymerge.merge`` called with the same
parameters (converted mechanically: mergekit's per-model parameters become pymerge's
per-model lists; mergekit's setting forms, gradients and ``filter`` lists, pass through as
they are).

**Adding a method** (e.g. the task-vector family): append ``Case(...)`` rows to ``CASES``
(or extend it from another module with ``CASES += [...]``). Fields:

* ``method``: the name in both libraries; ``n``: how many fine-tunes go in ``states``;
* ``base``: ``"base"`` (a separate base checkpoint: mergekit's ``base_model``, pymerge's
  ``base=``), ``"first"`` (mergekit's ``base_model`` is ``states[0]``, pymerge takes no base:
  ``slerp``) or ``None``;
* ``params``: mergekit's global ``parameters`` (pymerge keywords of the same names);
  ``model_params``: one dict per model (mergekit's per-model ``parameters``; pymerge gets a
  list of K settings per name);
* ``dtype``: the checkpoints' dtype; ``mk_dtype``: mergekit's ``dtype:`` (the dtype it
  computes in; pymerge computes half inputs in float32, so half cases set ``"float32"`` and
  ``out_dtype`` is the checkpoint's dtype), None to leave it unset;
* ``rtol``/``atol``: the tolerance (half outputs: a few units in the last place).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import pymerge

pytest.importorskip(
    "mergekit",
    reason="mergekit is not installed (test-only dependency: pip install mergekit, or "
    "pip install -e '.[test]')",
)
pytest.importorskip("safetensors")

from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

# a tiny Llama: awkward sizes (head_dim 6, GQA 4/2 heads, vocab 37, intermediate 40)
HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 24, 40, 3, 4, 2, 37
N_FINETUNES = 3
_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True)
class Case:
    method: str
    n: int = 2
    base: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    model_params: tuple[dict[str, Any], ...] | None = None
    dtype: torch.dtype = torch.float32
    mk_dtype: str | None = "float32"
    rtol: float = 1e-5
    atol: float = 1e-6
    id: str = ""

    def label(self) -> str:
        return self.id or f"{self.method}-{_NAMES[self.dtype]}"


BF16, FP16 = torch.bfloat16, torch.float16
FILTER_T = [
    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
    {"value": 0.5},
]

CASES: list[Case] = [
    # linear: per-model weights, normalize on/off, per-filter weights, a gradient for all
    Case("linear", 3, model_params=({"weight": 0.2}, {"weight": 0.5}, {"weight": 0.3})),
    Case(
        "linear",
        3,
        params={"normalize": False},
        model_params=({"weight": 1.0}, {"weight": -0.5}, {"weight": 2.0}),
        dtype=BF16,
        mk_dtype=None,
        id="linear-bf16-unnormalised-native",
    ),
    Case(
        "linear",
        3,
        model_params=(
            {"weight": [{"filter": "mlp", "value": 2.0}, {"value": 1.0}]},
            {"weight": [{"filter": "self_attn", "value": 0.1}, {"value": 1.0}]},
            {"weight": 0.5},
        ),
        dtype=FP16,
        id="linear-fp16-filters",
    ),
    Case(
        "linear",
        3,
        params={"weight": [0.1, 1.0], "normalize": False},
        id="linear-global-gradient",
    ),
    # slerp: one t, a gradient, mergekit's per-filter t lists
    Case("slerp", 2, base="first", params={"t": 0.3}),
    Case(
        "slerp",
        2,
        base="first",
        params={"t": [0.0, 0.5, 1.0]},
        dtype=BF16,
        mk_dtype=None,
        id="slerp-bf16-gradient-native",
    ),
    Case("slerp", 2, base="first", params={"t": FILTER_T}, id="slerp-filter-lists"),
    Case("slerp", 2, base="first", params={"t": FILTER_T}, dtype=FP16, id="slerp-fp16-filters"),
    # nuslerp: flattened, row-wise, rows; with and without a base
    Case("nuslerp", 2, model_params=({"weight": 0.3}, {"weight": 0.7})),
    Case(
        "nuslerp",
        2,
        base="base",
        params={"nuslerp_flatten": False, "nuslerp_row_wise": True},
        model_params=({"weight": 1.0}, {"weight": 3.0}),
        id="nuslerp-base-rowwise",
    ),
    Case(
        "nuslerp",
        2,
        params={"nuslerp_flatten": False},
        model_params=({"weight": 2.0}, {"weight": 1.0}),
        dtype=BF16,
        id="nuslerp-bf16-rows",
    ),
    # multislerp
    Case("multislerp", 3, model_params=({"weight": 0.2}, {"weight": 0.5}, {"weight": 0.3})),
    Case(
        "multislerp",
        3,
        base="base",
        model_params=({"weight": 1.0}, {"weight": 2.0}, {"weight": 1.0}),
        dtype=BF16,
        id="multislerp-bf16-base",
    ),
    # karcher
    Case("karcher", 3, rtol=1e-4, atol=1e-5),
    Case("karcher", 3, params={"max_iter": 25, "tol": 1e-7}, dtype=FP16, id="karcher-fp16"),
    # model_stock
    Case("model_stock", 3, base="base"),
    Case(
        "model_stock",
        2,
        base="base",
        params={"filter_wise": True},
        dtype=BF16,
        id="model_stock-bf16-filterwise",
    ),
    # sce
    Case("sce", 3, base="base", params={"select_topk": 0.5}),
    Case("sce", 3, base="base", dtype=BF16, id="sce-bf16-no-selection"),
    Case("sce", 2, base="base", params={"select_topk": 0.3}, dtype=FP16, id="sce-fp16"),
    # nearswap
    Case("nearswap", 1, base="base", params={"t": 0.05}),
    Case("nearswap", 1, base="base", params={"t": [0.01, 0.2]}, dtype=BF16, id="nearswap-bf16"),
    # the task-vector family (pymerge/merge/_sparsify.py): random masks (DARE, DELLA) come
    # from pymerge's counter-based stream, so those compare exactly at density 1; their
    # statistical parity below density 1 and the bf16 cases (mergekit computing in bf16)
    # are in tests/test_merge_task_vectors_mergekit.py
    Case(
        "task_arithmetic",
        3,
        base="base",
        params={"lambda": 0.8},
        model_params=({"weight": 0.5}, {"weight": 1.0}, {"weight": -0.3}),
    ),
    Case(
        "ties",
        3,
        base="base",
        model_params=(
            {"weight": 1.0, "density": 0.3},
            {"weight": 0.5, "density": 0.7},
            {"weight": -0.4, "density": 0.2},
        ),
    ),
    Case(
        "ties",
        3,
        base="base",
        params={"rescale": True, "lambda": 1.5, "normalize": False},
        model_params=(
            {"weight": 1.0, "density": 0.5},
            {"weight": 0.5, "density": 0.2},
            {"weight": 0.8, "density": 0.9},
        ),
        id="ties-rescale-unnormalized",
    ),
    Case(
        "dare_linear",
        3,
        base="base",
        model_params=({"weight": 0.3}, {"weight": 0.6}, {"weight": 1.0}),
    ),
    Case(
        "dare_ties",
        3,
        base="base",
        params={"lambda": 0.7},
        model_params=({"weight": 1.0}, {"weight": 0.5}, {"weight": 0.8}),
    ),
    Case(
        "breadcrumbs",
        3,
        base="base",
        params={"lambda": 0.9},
        model_params=(
            {"weight": 1.0, "density": 0.6, "gamma": 0.05},
            {"weight": 0.5, "density": 0.3, "gamma": 0.1},
            {"weight": 0.2, "density": 0.9, "gamma": 0.3},
        ),
    ),
    Case(
        "breadcrumbs_ties",
        3,
        base="base",
        model_params=(
            {"weight": 1.0, "density": 0.5},
            {"weight": 0.7, "density": 0.4},
            {"weight": 0.4, "density": 0.8},
        ),
    ),
    Case(
        "della",
        3,
        base="base",
        params={"epsilon": 0.1},
        model_params=({"weight": 1.0}, {"weight": 0.5}, {"weight": 0.8}),
    ),
    Case("della_linear", 2, base="base", model_params=({"weight": 0.7}, {"weight": 0.4})),
    # passthrough
    Case("passthrough", 1),
    Case(
        "passthrough",
        1,
        model_params=({"scale": [{"filter": "o_proj", "value": 0.0}, {"value": 1.5}]},),
        dtype=BF16,
        mk_dtype=None,
        id="passthrough-bf16-scale",
    ),
]


def _llama_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    head = HIDDEN // HEADS

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    sd = {
        "model.embed_tokens.weight": r(VOCAB, HIDDEN),
        "model.norm.weight": 1 + 0.1 * r(HIDDEN),
        "lm_head.weight": r(VOCAB, HIDDEN),
    }
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        sd |= {
            p + "self_attn.q_proj.weight": r(HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": r(KV_HEADS * head, HIDDEN),
            p + "self_attn.v_proj.weight": r(KV_HEADS * head, HIDDEN),
            p + "self_attn.o_proj.weight": r(HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": r(INTER, HIDDEN),
            p + "mlp.up_proj.weight": r(INTER, HIDDEN),
            p + "mlp.down_proj.weight": r(HIDDEN, INTER),
            p + "input_layernorm.weight": 1 + 0.1 * r(HIDDEN),
            p + "post_attention_layernorm.weight": 1 + 0.1 * r(HIDDEN),
        }
    return sd


def _config(dtype: torch.dtype) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
        "dtype": _NAMES[dtype],
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Per dtype: (base dir, base state, [fine-tune dirs], [fine-tune states]); the
    fine-tunes are the base plus small noise (task vectors of ~5% of the weights)."""
    root = tmp_path_factory.mktemp("mergekit_ckpts")
    gen = torch.Generator().manual_seed(1234)
    base32 = _llama_state(gen)
    tunes32 = [
        {k: v + 0.05 * torch.randn_like(v) for k, v in base32.items()} for _ in range(N_FINETUNES)
    ]
    out = {}
    for dtype in _NAMES:
        dirs, states = [], []
        for j, sd32 in enumerate([base32, *tunes32]):
            sd = {k: v.to(dtype) for k, v in sd32.items()}
            d = root / f"{_NAMES[dtype]}_{j}"
            d.mkdir()
            save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
            (d / "config.json").write_text(json.dumps(_config(dtype)))
            dirs.append(str(d))
            states.append(sd)
        out[dtype] = (dirs[0], states[0], dirs[1:], states[1:])
    return out


def _pymerge_kwargs(case: Case) -> dict[str, Any]:
    """mergekit's settings as pymerge keywords: per-model parameters as lists of K settings;
    a global gradient of a per-model parameter as the broadcast filter form."""
    info = pymerge.merge.get_method(case.method)
    per_model = {p.name for p in info.params if p.per_model}
    kw: dict[str, Any] = {}
    for name, value in case.params.items():
        is_grad = isinstance(value, list) and all(not isinstance(v, dict) for v in value)
        kw[name] = [{"value": value}] if name in per_model and is_grad else value
    if case.model_params:
        for name in case.model_params[0]:
            kw[name] = [mp[name] for mp in case.model_params]
    return kw


def _run_mergekit(case: Case, ckpts, out_dir) -> dict[str, torch.Tensor]:
    base_dir, _, tune_dirs, _ = ckpts[case.dtype]
    tunes = tune_dirs[: case.n]
    models = []
    for i, d in enumerate(tunes):
        entry: dict[str, Any] = {"model": d}
        if case.model_params:
            entry["parameters"] = case.model_params[i]
        models.append(entry)
    conf: dict[str, Any] = {"merge_method": case.method, "models": models}
    if case.base == "base":
        conf["base_model"] = base_dir
    elif case.base == "first":
        conf["base_model"] = tunes[0]
    if case.params:
        conf["parameters"] = case.params
    if case.mk_dtype is not None:
        conf["dtype"] = case.mk_dtype
        conf["out_dtype"] = _NAMES[case.dtype]
    opts = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True)
    run_merge(MergeConfiguration.model_validate(conf), str(out_dir), opts)
    return load_file(str(out_dir / "model.safetensors"))


def _ulp(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


@pytest.mark.parametrize("case", CASES, ids=[c.label() for c in CASES])
def test_same_tensors_as_mergekit(case, checkpoints, tmp_path):
    ours_in = checkpoints[case.dtype]
    _, base, _, tunes = ours_in
    states = tunes[: case.n]
    kwargs = _pymerge_kwargs(case)
    if case.base == "base":
        kwargs["base"] = base
    ours = pymerge.merge(case.method, states, **kwargs)
    theirs = _run_mergekit(case, checkpoints, tmp_path / "out")
    assert set(theirs) == set(ours), (sorted(theirs), sorted(ours))
    for k, t in theirs.items():
        o = ours[k]
        assert o.dtype == case.dtype, (k, o.dtype)
        assert t.dtype == case.dtype, (k, t.dtype)
        if case.dtype == torch.float32:
            torch.testing.assert_close(o, t, rtol=case.rtol, atol=case.atol, msg=k)
        else:
            # rounding the same float32 value gives the same half value; values within
            # float32 noise of a rounding boundary may round apart: one unit in the last
            # place, on a few elements
            o32, t32 = o.float(), t.float()
            tol = 2 * _ulp(case.dtype) * t32.abs() + 1e-6
            far = (o32 - t32).abs() > tol
            assert not far.any(), (k, float((o32 - t32).abs().max()))
            differ = (o32 != t32).float().mean().item()
            limit = 0.02 if case.mk_dtype is not None else 0.05
            assert differ <= limit, (k, differ)


def test_every_mergekit_method_of_ours_has_a_case():
    """Each registered method that mergekit also has appears in CASES."""
    from mergekit.merge_methods import registry as mk_registry

    theirs = {m.spec.name for m in mk_registry.registered_methods()}
    ours = {m.name for m in pymerge.merge_methods()}
    covered = {c.method for c in CASES}
    missing = sorted((theirs & ours) - covered)
    assert not missing, f"methods in both libraries without a parity case: {missing}"
