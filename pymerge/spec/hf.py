"""Permutation specs of Hugging Face architectures from ``config.json`` and tensor names.

:func:`hf_spec` builds the :class:`~pymerge.spec.PermutationSpec` of a checkpoint of a
supported architecture without importing ``transformers``: the sizes come from the config,
which optional tensors exist (biases, an untied ``lm_head``, the model's key prefix) from
the tensor names. Supported (``config["model_type"]``): ``gpt2``; ``llama``, ``mistral``,
``qwen2``, ``qwen3``; ``bert``, ``roberta``. Each is tested on tiny random models built
with ``transformers``: a random permutation of every group leaves the logits unchanged
(float64). What is permuted, per architecture:

**GPT-2** (``Conv1D`` weights are ``[in, out]``, so the axes are the transpose of
``nn.Linear``'s; ``c_attn`` fuses q, k and v along its output axis). Groups: ``res`` (the
residual stream: ``wte``/``wpe`` columns, every LayerNorm, ``c_attn``/``c_fc`` inputs,
``c_proj`` outputs, ``lm_head`` columns); ``h.{i}.mlp`` (the MLP's hidden units);
``h.{i}.attn.qk`` (q and k within heads, one permutation for both) and ``h.{i}.attn.vo``
(v within heads and ``c_proj``'s input), sharing the head permutation of the head structure
``h.{i}.attn``. Positions are learned and added, so any within-head permutation is allowed.

**Llama / Mistral / Qwen2 / Qwen3** (RMSNorm, rotary embeddings, grouped-query attention,
gated MLP). Groups: ``res`` (embeddings, every RMSNorm weight, q/k/v/gate/up inputs, o/down
outputs, ``lm_head`` columns unless tied: RMSNorm divides by a norm that permuting does not
change); ``layers.{i}.mlp`` (``gate_proj`` and ``up_proj`` rows share one permutation, since
``silu(gate) * up`` is taken unit by unit, and ``down_proj``'s columns); ``layers.{i}.attn``:
whole key/value heads, each moving with its group of query heads (``q_proj`` rows and
``o_proj`` columns in blocks of ``n_rep * head_dim``, ``k_proj``/``v_proj`` rows in blocks
of ``head_dim``). No permutation inside a head: rotary embeddings rotate each pair of dims
``(i, i + d/2)`` by its own frequency ``theta_i``, so moving a pair (even jointly with its
partner, in HF's ``rotate_half`` layout) to another frequency changes the scores (tested),
and with grouped-query attention a within-head permutation of v would have to act on
``o_proj`` columns spread over several query heads, which a spec's contiguous segments
cannot state; whole heads keep both exact. Qwen3's per-head ``q_norm``/``k_norm`` act
within heads and stay unpermuted.

**BERT / RoBERTa** (post-LN encoder). Groups: ``res`` (word/position/token-type embeddings'
columns, every LayerNorm, attention and FFN inputs and outputs, the pooler's and the MLM
head's inputs, the MLM transform's outputs, tied decoder columns, RoBERTa's classifier
input); ``layer.{i}.ffn`` (intermediate units); ``layer.{i}.attn.qk`` / ``.vo`` under the
head structure ``layer.{i}.attn``. The pooler's outputs and the heads reading them stay
unpermuted.

Anything else: a ``ValueError`` listing the supported ``model_type`` values and how to
declare a spec by hand (``PermutationSpec(...)``, ``spec_from_model(model, inputs)``, or
``hf_spec(...).override(...)``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from pymerge.spec.builders import _Builder
from pymerge.spec.spec import HeadStructure, PermutationSpec

__all__ = ["hf_spec", "hf_architectures"]

_HOW_TO_DECLARE = (
    "declare a spec yourself: pymerge.PermutationSpec({group: [(param, axis), ...]}, free=[...]) "
    "(see docs/api.md), trace one with pymerge.spec_from_model(model, example_inputs), or "
    "start from a supported architecture's spec and adjust it with spec.override({...})"
)


def hf_architectures() -> list[str]:
    """The ``model_type`` values :func:`hf_spec` supports."""
    return sorted(_BUILDERS)


def hf_spec(
    path_or_config: str | os.PathLike[str] | Mapping[str, Any] | Any,
    *,
    keys: Iterable[str] | Mapping[str, Any] | None = None,
) -> PermutationSpec:
    """The :class:`PermutationSpec` of a Hugging Face checkpoint (module docstring).

    Args:
        path_or_config: a model folder (its ``config.json`` and tensor names are read), a
            path to a ``config.json``, a config dict, or an object with ``to_dict()`` (a
            ``transformers`` config).
        keys: the checkpoint's tensor names (or a state dict): which optional tensors exist
            and the key prefix. Read from the folder when a folder is given; without them the
            names ``transformers``' ``*ForCausalLM`` / ``*ForMaskedLM`` classes save are
            assumed.

    Raises:
        ValueError naming the problem: an unsupported ``model_type`` (listing the supported
        ones and how to declare a spec), a config missing a size, tensor names that do not
        fit the architecture (listing the keys the spec does not cover).
    """
    config, found = _read(path_or_config)
    if keys is None:
        keys = found
    elif isinstance(keys, Mapping):
        keys = list(keys)
    mt = str(config.get("model_type", "")).lower()
    builder = _BUILDERS.get(mt)
    if builder is None:
        archs = config.get("architectures") or []
        what = f"model_type {mt!r}" if mt else "a config without model_type"
        if archs:
            what += f" ({', '.join(map(str, archs))})"
        raise ValueError(
            f"hf_spec does not know {what}; it supports {', '.join(hf_architectures())}. To "
            f"align another architecture, {_HOW_TO_DECLARE}"
        )
    key_list = None if keys is None else list(keys)
    spec = builder(config, key_list)
    if key_list is not None:
        _check_covers(spec, key_list, mt)
    return spec


# --------------------------------------------------------------------------- reading


def _read(src: Any) -> tuple[dict[str, Any], list[str] | None]:
    if isinstance(src, Mapping):
        return dict(src), None
    if hasattr(src, "to_dict") and not isinstance(src, (str, os.PathLike)):
        return dict(src.to_dict()), None
    p = Path(src)
    if p.is_dir():
        cfg = p / "config.json"
        if not cfg.is_file():
            raise ValueError(f"{str(p)!r} has no config.json to build a spec from")
        return _load_config(cfg), _tensor_names(p)
    if p.is_file():
        return _load_config(p), None
    raise FileNotFoundError(f"no model folder or config.json at {str(p)!r}")


def _load_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{str(path)!r} is not a readable config.json ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} holds a JSON {type(data).__name__}, not a config object")
    return data


def _tensor_names(folder: Path) -> list[str] | None:
    """Tensor names from the folder's index or its single weights file (headers only)."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            data = _load_config(folder / index)
            return list(data.get("weight_map", {}))
    st = sorted(folder.glob("*.safetensors"))
    if len(st) == 1:
        from safetensors import safe_open

        with safe_open(str(st[0]), framework="pt") as f:
            return list(f.keys())
    if (folder / "pytorch_model.bin").is_file():
        import torch

        obj = torch.load(
            str(folder / "pytorch_model.bin"), map_location="meta", weights_only=True, mmap=True
        )
        return list(obj)
    return None


def _need(config: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    for n in names:
        if config.get(n) is not None:
            return config[n]
    if default is not None:
        return default
    raise ValueError(
        f"config.json of model_type {config.get('model_type')!r} has no {names[0]!r}; the "
        f"spec needs it"
    )


def _prefix(keys: list[str] | None, marker: str, default: str) -> str:
    """The key prefix before ``marker`` (``model.`` in ``model.embed_tokens.weight``)."""
    if keys is None:
        return default
    for k in keys:
        if k.endswith(marker):
            return k[: -len(marker)]
    raise ValueError(
        f"no tensor ending in {marker!r} among the checkpoint's {len(keys)} tensors (first: "
        f"{', '.join(keys[:3])}): the tensor names do not fit this architecture"
    )


def _has(keys: list[str] | None, key: str, default: bool) -> bool:
    return default if keys is None else key in keys


_IGNORABLE = re.compile(
    r"(^|\.)(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias|position_ids|"
    r"embeddings\.position_ids|token_type_ids)$"
)


def _check_covers(spec: PermutationSpec, keys: list[str], mt: str) -> None:
    covered = set(spec.axes_to_perm) | set(spec.free) | set(spec.no_cost)
    missing = [k for k in spec.axes_to_perm if k not in set(keys)]
    if missing:
        raise ValueError(
            f"the {mt} spec expects tensor {missing[0]!r}, which the checkpoint lacks "
            f"({len(missing)} such); is config.json the config of these weights?"
        )
    extra = [k for k in keys if k not in covered]
    if extra:
        shown = ", ".join(repr(k) for k in extra[:5]) + (", ..." if len(extra) > 5 else "")
        raise ValueError(
            f"the {mt} spec does not cover {len(extra)} tensor(s) of the checkpoint: {shown}. "
            f"If they are heads or buffers no permutation should touch, declare them free: "
            f"hf_spec(...).override({{'__free__': [...]}}); otherwise {_HOW_TO_DECLARE}"
        )


# --------------------------------------------------------------------------- builders


def _free_ignorable(b: _Builder, keys: list[str] | None) -> None:
    for k in keys or ():
        if _IGNORABLE.search(k):
            b.free.add(k)


def _llama(config: Mapping[str, Any], keys: list[str] | None) -> PermutationSpec:
    n_layers = int(_need(config, "num_hidden_layers"))
    d = int(_need(config, "hidden_size"))
    h = int(_need(config, "num_attention_heads"))
    kv = int(_need(config, "num_key_value_heads", default=h))
    hd = int(config.get("head_dim") or d // h)
    if h % kv:
        raise ValueError(f"num_attention_heads={h} is not a multiple of num_key_value_heads={kv}")
    rep = h // kv
    p = _prefix(keys, "embed_tokens.weight", "model.")
    b = _Builder()
    b.add("res", f"{p}embed_tokens.weight", 1)
    for i in range(n_layers):
        m = f"{p}layers.{i}"
        b.add("res", f"{m}.input_layernorm.weight", 0)
        b.add("res", f"{m}.post_attention_layernorm.weight", 0)
        att, g = f"{m}.self_attn", f"layers.{i}.attn"
        for proj in ("q_proj", "k_proj", "v_proj"):
            b.add("res", f"{att}.{proj}.weight", 1)
        b.add("res", f"{att}.o_proj.weight", 0)
        if _has(keys, f"{att}.o_proj.bias", False):
            b.add("res", f"{att}.o_proj.bias", 0)
        # whole kv heads, each with its group of query heads (see the module docstring)
        b.add(g, f"{att}.q_proj.weight", 0, inner=rep * hd)
        b.add(g, f"{att}.k_proj.weight", 0, inner=hd)
        b.add(g, f"{att}.v_proj.weight", 0, inner=hd)
        b.add(g, f"{att}.o_proj.weight", 1, inner=rep * hd)
        default_bias = str(config.get("model_type")) == "qwen2"
        for proj, inner in (("q_proj", rep * hd), ("k_proj", hd), ("v_proj", hd)):
            if _has(keys, f"{att}.{proj}.bias", default_bias or bool(config.get("attention_bias"))):
                b.add(g, f"{att}.{proj}.bias", 0, inner=inner)
        for norm in ("q_norm", "k_norm"):  # qwen3: per-head RMSNorm over head_dim
            if _has(keys, f"{att}.{norm}.weight", str(config.get("model_type")) == "qwen3"):
                b.free.add(f"{att}.{norm}.weight")
        mlp, gm = f"{m}.mlp", f"layers.{i}.mlp"
        for proj in ("gate_proj", "up_proj"):
            b.add("res", f"{mlp}.{proj}.weight", 1)
            b.add(gm, f"{mlp}.{proj}.weight", 0)
        b.add("res", f"{mlp}.down_proj.weight", 0)
        b.add(gm, f"{mlp}.down_proj.weight", 1)
        b.ap(gm, f"{mlp}.act_fn", -1)
    b.add("res", f"{p}norm.weight", 0)
    tied = bool(config.get("tie_word_embeddings", False))
    if _has(keys, "lm_head.weight", not tied):
        b.add("res", "lm_head.weight", 1)
    b.ap("res", f"{p}norm", -1)
    _free_ignorable(b, keys)
    return b.build()


def _gpt2(config: Mapping[str, Any], keys: list[str] | None) -> PermutationSpec:
    n_layers = int(_need(config, "n_layer", "num_hidden_layers"))
    d = int(_need(config, "n_embd", "hidden_size"))
    h = int(_need(config, "n_head", "num_attention_heads"))
    if d % h:
        raise ValueError(f"n_embd={d} is not divisible by n_head={h}")
    p = _prefix(keys, "wte.weight", "transformer.")
    b = _Builder()
    b.add("res", f"{p}wte.weight", 1)
    b.add("res", f"{p}wpe.weight", 1)
    for i in range(n_layers):
        m = f"{p}h.{i}"
        for ln in ("ln_1", "ln_2"):
            b.add("res", f"{m}.{ln}.weight", 0)
            b.add("res", f"{m}.{ln}.bias", 0)
        att = f"{m}.attn"
        # Conv1D: weight [in, out]; c_attn's output is [q | k | v]
        b.add("res", f"{att}.c_attn.weight", 0)
        b.add("res", f"{att}.c_proj.weight", 1)
        b.add("res", f"{att}.c_proj.bias", 0)
        qk, vo = f"h.{i}.attn.qk", f"h.{i}.attn.vo"
        b.add(qk, f"{att}.c_attn.weight", 1, 0, d)
        b.add(qk, f"{att}.c_attn.weight", 1, d, 2 * d)
        b.add(qk, f"{att}.c_attn.bias", 0, 0, d)
        b.add(qk, f"{att}.c_attn.bias", 0, d, 2 * d)
        b.add(vo, f"{att}.c_attn.weight", 1, 2 * d, 3 * d)
        b.add(vo, f"{att}.c_attn.bias", 0, 2 * d, 3 * d)
        b.add(vo, f"{att}.c_proj.weight", 0)
        b.heads[f"h.{i}.attn"] = HeadStructure(h, d // h, (qk, vo))
        mlp, gm = f"{m}.mlp", f"h.{i}.mlp"
        b.add("res", f"{mlp}.c_fc.weight", 0)
        b.add("res", f"{mlp}.c_proj.weight", 1)
        b.add("res", f"{mlp}.c_proj.bias", 0)
        b.add(gm, f"{mlp}.c_fc.weight", 1)
        b.add(gm, f"{mlp}.c_fc.bias", 0)
        b.add(gm, f"{mlp}.c_proj.weight", 0)
        b.ap(gm, f"{mlp}.act", -1)
    b.add("res", f"{p}ln_f.weight", 0)
    b.add("res", f"{p}ln_f.bias", 0)
    tied = bool(config.get("tie_word_embeddings", True))
    if _has(keys, "lm_head.weight", not tied):
        b.add("res", "lm_head.weight", 1)
    b.ap("res", f"{p}ln_f", -1)
    _free_ignorable(b, keys)
    return b.build()


def _bert(config: Mapping[str, Any], keys: list[str] | None) -> PermutationSpec:
    n_layers = int(_need(config, "num_hidden_layers"))
    d = int(_need(config, "hidden_size"))
    h = int(_need(config, "num_attention_heads"))
    if d % h:
        raise ValueError(f"hidden_size={d} is not divisible by num_attention_heads={h}")
    mt = str(config.get("model_type"))
    p = _prefix(keys, "embeddings.word_embeddings.weight", f"{mt}.")
    b = _Builder()
    emb = f"{p}embeddings"
    for e in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        if _has(keys, f"{emb}.{e}.weight", True):
            b.add("res", f"{emb}.{e}.weight", 1)
    for x in ("weight", "bias"):
        b.add("res", f"{emb}.LayerNorm.{x}", 0)
    for i in range(n_layers):
        m = f"{p}encoder.layer.{i}"
        sa, ao = f"{m}.attention.self", f"{m}.attention.output"
        qk, vo = f"layer.{i}.attn.qk", f"layer.{i}.attn.vo"
        for proj in ("query", "key", "value"):
            b.add("res", f"{sa}.{proj}.weight", 1)
        for proj in ("query", "key"):
            b.add(qk, f"{sa}.{proj}.weight", 0)
            b.add(qk, f"{sa}.{proj}.bias", 0)
        b.add(vo, f"{sa}.value.weight", 0)
        b.add(vo, f"{sa}.value.bias", 0)
        b.add(vo, f"{ao}.dense.weight", 1)
        b.heads[f"layer.{i}.attn"] = HeadStructure(h, d // h, (qk, vo))
        b.add("res", f"{ao}.dense.weight", 0)
        b.add("res", f"{ao}.dense.bias", 0)
        for x in ("weight", "bias"):
            b.add("res", f"{ao}.LayerNorm.{x}", 0)
            b.add("res", f"{m}.output.LayerNorm.{x}", 0)
        ffn = f"layer.{i}.ffn"
        b.add("res", f"{m}.intermediate.dense.weight", 1)
        b.add(ffn, f"{m}.intermediate.dense.weight", 0)
        b.add(ffn, f"{m}.intermediate.dense.bias", 0)
        b.add(ffn, f"{m}.output.dense.weight", 1)
        b.add("res", f"{m}.output.dense.weight", 0)
        b.add("res", f"{m}.output.dense.bias", 0)
        b.ap(ffn, f"{m}.intermediate.intermediate_act_fn", -1)
    if _has(keys, f"{p}pooler.dense.weight", False):
        b.add("res", f"{p}pooler.dense.weight", 1)
        b.free.add(f"{p}pooler.dense.bias")
    _bert_heads(b, config, keys, mt)
    _free_ignorable(b, keys)
    return b.build()


def _bert_heads(b: _Builder, config: Mapping[str, Any], keys: list[str] | None, mt: str) -> None:
    """The MLM head: its transform lives in the residual space (its decoder is tied to the
    word embeddings); classifier outputs stay unpermuted."""
    if mt == "roberta":
        head, dense, norm, dec, bias = (
            "lm_head",
            "lm_head.dense",
            "lm_head.layer_norm",
            "lm_head.decoder",
            "lm_head.bias",
        )
    else:
        head = "cls.predictions"
        dense, norm = f"{head}.transform.dense", f"{head}.transform.LayerNorm"
        dec, bias = f"{head}.decoder", f"{head}.bias"
    if _has(keys, f"{dense}.weight", keys is None):
        b.add("res", f"{dense}.weight", 0)
        b.add("res", f"{dense}.weight", 1)
        b.add("res", f"{dense}.bias", 0)
        b.add("res", f"{norm}.weight", 0)
        b.add("res", f"{norm}.bias", 0)
        if _has(keys, f"{dec}.weight", not config.get("tie_word_embeddings", True)):
            b.add("res", f"{dec}.weight", 1)
        for k in (bias, f"{dec}.bias"):
            if _has(keys, k, k == bias):
                b.free.add(k)
    for k in keys or ():
        if mt == "roberta" and k == "classifier.dense.weight":
            b.add("res", k, 1)  # RoBERTa's classifier reads the first token's hidden state
        elif k.startswith(("classifier.", "qa_outputs.", "cls.seq_relationship.")):
            b.free.add(k)  # reads the pooler's (unpermuted) output, or writes labels


_BUILDERS: dict[str, Callable[[Mapping[str, Any], list[str] | None], PermutationSpec]] = {
    "gpt2": _gpt2,
    "llama": _llama,
    "mistral": _llama,
    "qwen2": _llama,
    "qwen3": _llama,
    "bert": _bert,
    "roberta": _bert,
}
