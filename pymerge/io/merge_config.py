"""mergekit's merge configuration, read and checked in full before any tensor is merged.

:func:`load_merge_config` reads a YAML (or JSON) file in mergekit's format and
:func:`build_job` turns it into a :class:`MergeJob`: every model opened (headers only), every
key, shape and parameter checked, the per-key parameters resolved, the output planned. Any
problem raises one ``ValueError`` (or ``FileNotFoundError``) naming the config entry, the
model, the tensor and the parameter. Only then does :func:`pymerge.io.merge_files.run_job`
read a tensor.

Accepted keys (mergekit's): ``merge_method``; ``models`` (``- model: PATH`` with optional
``parameters``); ``base_model``; ``parameters`` (global); ``dtype`` (what inputs are cast to
before merging, as mergekit does) and ``out_dtype`` (the output's; default ``dtype``);
``slices`` (``- sources: [{model, layer_range: [start, end], parameters}]`` with optional
slice ``parameters`` and ``base_model``); ``tokenizer_source`` (``base``, or a model:
its tokenizer files are copied; ``union`` is refused, see below); ``name``;
``chat_template`` (only ``null``/``auto``). pymerge's own keys: ``align`` (permute every
model onto the base, or the first model, before merging: ``{method: weight_matching, spec:
auto | PATH.json, max_iter, seed}``), ``shard_size`` (``5GB``), ``data`` (for the
data-aware methods: ``{batches: PATH, batch_size, num_batches}``).

Semantics follow mergekit where it defines them:

* parameter precedence for each model: its own ``parameters`` (a slice source's), then the
  slice's ``parameters``, then the global ``parameters``, then the method's default; a
  filter list that matches no key falls through to the next level;
* a ``base_model`` listed among ``models`` is the base, not one of the merged models
  (mergekit skips it in task arithmetic); for a method that takes no base (``linear``...), a
  ``base_model`` missing from ``models`` is merged as one more model, as mergekit does, and
  for ``slerp`` the base is the ``t = 0`` end whatever its place in the list;
* gradients run over the layers of each slice (``t = i / (n - 1)``); keys outside the layer
  stack (embeddings, final norm, head) get ``t = 0`` and, with slices, are merged from the
  first slice's sources (embeddings) or the last slice's (the rest);
* ``int8_mask`` (a mergekit memory option) is accepted and has no effect.

Model references are local folders or files (relative to the working folder, then to the
config's folder); a Hugging Face hub id is looked up in the local hub cache
(``HF_HUB_CACHE`` / ``HF_HOME``), never downloaded. ``model+lora`` references are refused
with a message.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pymerge.io.checkpoint import TOKENIZER_FILES, Checkpoint, describe_config, open_checkpoint

__all__ = ["load_merge_config", "build_job", "MergeJob", "ModelInput", "parse_dtype"]

TOP_KEYS = (
    "merge_method",
    "models",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "slices",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "name",
    "modules",
    # pymerge's own
    "align",
    "shard_size",
    "data",
)
_NO_EFFECT = ("int8_mask",)  # mergekit options with no meaning here (memory tricks)
_DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
}
_PRE_MARKERS = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type")
_LAYER = re.compile(r"^(.*?)\.(\d+)\.(.+)$")
_BASE_FIRST = ("slerp",)  # methods without a base whose first model is mergekit's base_model


def parse_dtype(value: Any, where: str) -> torch.dtype | None:
    if value is None:
        return None
    name = str(value).strip().lower().removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(
            f"{where}: unknown dtype {value!r}; use one of float16, bfloat16, float32, float64"
        )
    return _DTYPES[name]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------- reading


def load_merge_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The config file as a dict (YAML, or JSON, which YAML reads too), with errors that
    name the file and the line."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no merge config at {str(p)!r}")
    if p.is_dir():
        raise ValueError(f"{str(p)!r} is a folder; give the merge config file (YAML)")
    text = p.read_text(encoding="utf-8")
    try:
        import yaml
    except ImportError:  # pragma: no cover (PyYAML is a dependency)
        import json

        try:
            data = json.loads(text)
        except ValueError:
            raise ValueError(
                f"{str(p)!r}: reading YAML needs PyYAML (pip install pyyaml); without it only "
                f"JSON configs are read"
            ) from None
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ValueError(f"{str(p)!r} is not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{str(p)!r} holds a YAML {type(data).__name__}, not a mapping with merge_method, "
            f"models, ..."
        )
    return data


# --------------------------------------------------------------------------- models


def _hub_cache_dirs() -> list[Path]:
    out = []
    if os.environ.get("HF_HUB_CACHE"):
        out.append(Path(os.environ["HF_HUB_CACHE"]))
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    out.append(home / "hub")
    return out


def _from_hub_cache(name: str) -> Path | None:
    if name.count("/") != 1 or name.startswith((".", "/")):
        return None
    folder = "models--" + name.replace("/", "--")
    for cache in _hub_cache_dirs():
        repo = cache / folder
        ref = repo / "refs" / "main"
        if ref.is_file():
            snap = repo / "snapshots" / ref.read_text().strip()
            if snap.is_dir():
                return snap
    return None


def resolve_model(ref: Any, where: str, config_dir: Path | None) -> Path:
    """The local path of a model reference (see the module docstring)."""
    if isinstance(ref, Mapping) and "model" in ref:  # mergekit's {model: {path: ...}} form
        ref = ref["model"]
    if isinstance(ref, Mapping) and "path" in ref:
        ref = ref["path"]
    if not isinstance(ref, str) or not ref.strip():
        raise ValueError(f"{where}: a model must be a path (a string), got {ref!r}")
    if "+" in ref and not Path(ref).exists():
        raise ValueError(
            f"{where}: {ref!r} applies a LoRA adapter (model+lora), which pymerge does not do; "
            f"merge the adapter into the model first (peft's merge_and_unload) and name that"
        )
    candidates = [Path(ref).expanduser()]
    if config_dir is not None and not Path(ref).is_absolute():
        candidates.append(config_dir / ref)
    for c in candidates:
        if c.exists():
            return c
    cached = _from_hub_cache(ref)
    if cached is not None:
        return cached
    hub = (
        f"; if it is a Hugging Face hub id, download it first (huggingface-cli download {ref} "
        f"--local-dir DIR) and name DIR: pymerge reads local checkpoints only"
        if ref.count("/") == 1
        else ""
    )
    raise FileNotFoundError(f"{where}: model {ref!r} not found{hub}")


@dataclass(eq=False)
class ModelInput:
    """One distinct checkpoint of the config (opened lazily; only headers read)."""

    name: str  # as written in the config
    path: Path
    ckpt: Checkpoint
    index: int  # position in MergeJob.states

    @property
    def label(self) -> str:
        return f"model {self.name!r}"


# --------------------------------------------------------------------------- the job


@dataclass
class MergeJob:
    """A checked merge, ready to run (:func:`pymerge.io.merge_files.run_job`)."""

    config: dict[str, Any]
    method: Any  # MethodInfo
    inputs: list[ModelInput]  # distinct checkpoints; states[i] = inputs[i].ckpt
    items: list[Any]  # OutputKey, in output order
    dtype: torch.dtype | None
    out_dtype: torch.dtype | None
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]]
    config_source: ModelInput | None
    tokenizer_source: ModelInput | None
    out_config: dict[str, Any] | None
    align: dict[str, Any] | None = None
    anchor: ModelInput | None = None
    aligned: list[ModelInput] = field(default_factory=list)
    spec: Any = None
    shard_size: Any = None
    notes: list[str] = field(default_factory=list)
    slices: int = 0
    data: dict[str, Any] | None = None
    merged_models: list[ModelInput] = field(default_factory=list)
    base: ModelInput | None = None

    @property
    def states(self) -> list[Checkpoint]:
        return [m.ckpt for m in self.inputs]

    def protected(self) -> dict[str, Path]:
        """Every input path, labelled for messages (what the output must stay clear of)."""
        out: dict[str, Path] = {}
        for m in self.inputs:
            out[m.label] = m.ckpt.folder or m.path
        return out

    def close(self) -> None:
        for m in self.inputs:
            m.ckpt.close()


class _Inputs:
    """Distinct checkpoints by resolved path, opened once each."""

    def __init__(self, config_dir: Path | None) -> None:
        self.config_dir = config_dir
        self.by_path: dict[Path, ModelInput] = {}
        self.order: list[ModelInput] = []

    def get(self, ref: Any, where: str) -> ModelInput:
        path = resolve_model(ref, where, self.config_dir)
        key = path.resolve()
        hit = self.by_path.get(key)
        if hit is not None:
            return hit
        name = ref["model"] if isinstance(ref, Mapping) else ref
        name = name.get("path", str(name)) if isinstance(name, Mapping) else str(name)
        try:
            ckpt = open_checkpoint(path, what=f"{where} ({name!r})")
        except (ValueError, FileNotFoundError) as exc:
            raise type(exc)(f"{where}: {exc}") from None
        m = ModelInput(name, path, ckpt, len(self.order))
        self.by_path[key] = m
        self.order.append(m)
        return m


def _closest(name: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(names), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_top(config: Mapping[str, Any]) -> None:
    for k in config:
        if k not in TOP_KEYS:
            raise ValueError(
                f"unknown config key {k!r}{_closest(str(k), TOP_KEYS)}; the keys are: "
                + ", ".join(TOP_KEYS)
            )
    if "merge_method" not in config:
        raise ValueError("the config has no merge_method (e.g. merge_method: ties)")
    if config.get("modules"):
        raise ValueError("modules: (multi-module configs) is not supported; use models or slices")
    if bool(config.get("models")) == bool(config.get("slices")):
        raise ValueError(
            "the config needs exactly one of models: (a list of - model: PATH) or slices:"
        )
    if config.get("tokenizer") is not None:
        raise ValueError(
            "tokenizer: (vocabulary surgery) is not supported; use tokenizer_source: base or "
            "a model's name"
        )
    tpl = config.get("chat_template")
    if tpl not in (None, "auto"):
        raise ValueError("chat_template: only auto (copy the tokenizer source's) is supported")


def _params(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: parameters must be a mapping name: value, got {value!r}")
    return {str(k): v for k, v in value.items() if str(k) not in _NO_EFFECT}


def _entries_of(setting: Any) -> list[dict[str, Any]]:
    """A setting as filter entries (for chaining: a later level catches what an earlier
    filter list leaves unmatched)."""
    if isinstance(setting, Mapping):
        return [dict(setting)]
    if isinstance(setting, list) and setting and all(isinstance(e, Mapping) for e in setting):
        return [dict(e) for e in setting]
    return [{"filter": None, "value": setting}]


def _chain(levels: Sequence[Any]) -> Any:
    """The first level's setting, falling through to the next where its filters match
    nothing (mergekit's precedence)."""
    present = [s for s in levels if s is not None]
    if not present:
        return None
    first = present[0]
    is_filter = isinstance(first, Mapping) or (
        isinstance(first, list) and first and all(isinstance(e, Mapping) for e in first)
    )
    if not is_filter or len(present) == 1:
        return first
    out: list[dict[str, Any]] = []
    for s in present:
        out += _entries_of(s)
        if not (
            isinstance(s, Mapping)
            or (isinstance(s, list) and s and all(isinstance(e, Mapping) for e in s))
        ):
            break  # a scalar or gradient always matches
    return out


def _method_settings(
    info: Any,
    model_params: Sequence[dict[str, Any]],
    shared_levels: Sequence[dict[str, Any]],
    labels: Sequence[str],
    where: str,
) -> dict[str, Any]:
    """The ``plan_merge`` keyword settings of one slice (or the whole model list)."""
    by_name = {p.name: p for p in info.params}
    names = list(by_name)
    for label, mp in zip(labels, model_params, strict=True):
        for pname in mp:
            p = by_name.get(pname)
            if p is None:
                raise ValueError(
                    f"{where}: {label} sets parameter {pname!r}, which {info.name} does not "
                    f"take{_closest(pname, names)}; its parameters: {', '.join(names) or '(none)'}"
                )
            if not p.per_model:
                raise ValueError(
                    f"{where}: {label} sets {pname!r}, a global parameter of {info.name}; set it "
                    f"under the top-level parameters:"
                )
    for level in shared_levels:
        for pname in level:
            if pname not in by_name:
                raise ValueError(
                    f"{where}: parameter {pname!r} is not one of {info.name}'s"
                    f"{_closest(pname, names)}; its parameters: {', '.join(names) or '(none)'}"
                )
    settings: dict[str, Any] = {}
    for p in info.params:
        shared = [lvl.get(p.name) for lvl in shared_levels]
        if p.per_model:
            per = [_chain([mp.get(p.name), *shared]) for mp in model_params]
            if all(v is None for v in per):
                continue
            if any(v is None for v in per):
                if p.required:
                    i = per.index(None)
                    raise ValueError(
                        f"{where}: {labels[i]} needs parameter {p.name!r} ({info.name} requires "
                        f"it for every model); set it in the model's parameters or globally"
                    )
                per = [p.default if v is None else v for v in per]
            settings[p.name] = per
        else:
            v = _chain(shared)
            if v is not None:
                settings[p.name] = v
    return settings


def _relabel(exc: BaseException, labels: Sequence[str]) -> str:
    """The registry's "model i" in a message, named."""
    text = str(exc)

    def name(m: re.Match) -> str:
        i = int(m.group(1))
        return f"{labels[i]}" if 0 <= i < len(labels) else m.group(0)

    return re.sub(r"\bmodel (\d+)\b", name, text)


def _plan(info: Any, n: int, has_base: bool, settings: dict[str, Any], labels, where: str):
    from pymerge.merge.registry import plan_merge

    try:
        return plan_merge(info, n, has_base=has_base, **settings)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: {_relabel(exc, labels)}") from None


def _check_same(models: Sequence[ModelInput], where: str) -> tuple[list[str], list[Any]]:
    """Keys and shapes agree (dtypes may differ: inputs are cast to ``dtype``), and the
    architectures in config.json agree; errors name both models and the tensor."""
    from pymerge._util.checks import check_states

    first = models[0]
    for m in models[1:]:
        _check_arch(first, m, where)
    metas = [m.ckpt.meta_state() for m in models]
    try:
        keys, lists, _, _ = check_states(
            metas, [m.label for m in models], same_dtype=False, same_device=False
        )
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: the models do not line up: {exc}") from None
    return keys, lists[0]


_ARCH_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "n_embd",
    "n_layer",
    "n_head",
)


def _check_arch(a: ModelInput, b: ModelInput, where: str) -> None:
    ca, cb = a.ckpt.config, b.ckpt.config
    if not ca or not cb:
        return
    for f in _ARCH_FIELDS:
        if f in ca and f in cb and ca[f] != cb[f]:
            raise ValueError(
                f"{where}: mismatched architectures: {b.label} has {f}={cb[f]!r} "
                f"({describe_config(cb)}) but {a.label} has {f}={ca[f]!r} "
                f"({describe_config(ca)})"
            )


def _layer_split(keys: Sequence[str]) -> tuple[str | None, dict[int, list[str]], list[str]]:
    """The layer stack: its prefix (``model.layers``), keys by layer index, and the keys
    outside it. The stack is the prefix with the most numbered keys."""
    counts: dict[str, int] = {}
    for k in keys:
        m = _LAYER.match(k)
        if m:
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    if not counts:
        return None, {}, list(keys)
    prefix = max(counts, key=lambda p: (counts[p], -len(p)))
    layers: dict[int, list[str]] = {}
    rest = []
    for k in keys:
        m = _LAYER.match(k)
        if m and m.group(1) == prefix:
            layers.setdefault(int(m.group(2)), []).append(m.group(3))
        else:
            rest.append(k)
    return prefix, layers, rest


def _is_pre(key: str) -> bool:
    return any(s in key for s in _PRE_MARKERS)


def build_job(
    config: Mapping[str, Any], *, config_path: str | os.PathLike[str] | None = None
) -> MergeJob:
    """Check a mergekit-style config completely and plan the merge (module docstring)."""
    from pymerge.merge.registry import get_method

    config = dict(config)
    _check_top(config)
    config_dir = Path(config_path).resolve().parent if config_path is not None else None
    try:
        info = get_method(config["merge_method"])
    except (ValueError, TypeError) as exc:
        raise ValueError(f"merge_method: {exc}") from None
    dtype = parse_dtype(config.get("dtype"), "dtype")
    out_dtype = parse_dtype(config.get("out_dtype"), "out_dtype") or dtype
    global_params = _params(config.get("parameters"), "parameters")
    inputs = _Inputs(config_dir)
    base = inputs.get(config["base_model"], "base_model") if config.get("base_model") else None
    if info.base == "required" and base is None:
        raise ValueError(f"{info.name} needs a base model: add base_model: PATH to the config")
    job_notes: list[str] = []
    if config.get("slices"):
        items, keys_meta, sources_all, merged = _plan_slices(
            config, info, inputs, base, global_params
        )
        n_slices = len(config["slices"])
    else:
        items, keys_meta, sources_all, merged = _plan_models(
            config, info, inputs, base, global_params, job_notes
        )
        n_slices = 0
    if base is not None and info.base == "none":
        job_notes.append(
            f"{info.name} takes no base: base_model {base.name!r} gives the config and tokenizer"
        )
    entries = [(key, out_dtype or dt, shape) for key, (dt, shape) in keys_meta.items()]
    entries = [(k, d if d.is_floating_point else keys_meta[k][0], s) for k, d, s in entries]
    config_source = base or (sources_all[0] if sources_all else None)
    tok = _tokenizer_source(config, inputs, base, config_source)
    out_config = _out_config(config_source, out_dtype, n_layers=_out_layers(keys_meta))
    job = MergeJob(
        config=config,
        method=info,
        inputs=inputs.order,
        items=items,
        dtype=dtype,
        out_dtype=out_dtype,
        entries=entries,
        config_source=config_source,
        tokenizer_source=tok,
        out_config=out_config,
        shard_size=config.get("shard_size"),
        notes=job_notes,
        slices=n_slices,
        merged_models=merged,
        base=base,
    )
    if config.get("shard_size") is not None:
        from pymerge.io.output import parse_size

        try:
            parse_size(config["shard_size"])
        except ValueError as exc:
            raise ValueError(f"shard_size: {exc}") from None
    _check_align(job, config.get("align"))
    _check_data(job, config.get("data"), config_dir)
    return job


def _plan_models(config, info, inputs: _Inputs, base, global_params, notes):
    from pymerge.merge.registry import layer_positions
    from pymerge.merge.stream import OutputKey, Source

    raw = config["models"]
    if not isinstance(raw, list):
        raise ValueError("models: must be a list of entries - model: PATH")
    merged: list[ModelInput] = []
    model_params: list[dict[str, Any]] = []
    for i, entry in enumerate(raw):
        where = f"models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, Mapping) or "model" not in entry:
            raise ValueError(f"{where}: expected a mapping with model: PATH, got {entry!r}")
        extra = set(entry) - {"model", "parameters"}
        if extra:
            raise ValueError(f"{where}: unknown key {sorted(extra)[0]!r} (use model, parameters)")
        m = inputs.get(entry["model"], where)
        if base is not None and m is base and info.base != "none":
            continue  # the base listed among the models: it is the base (as in mergekit)
        if m in merged:
            raise ValueError(f"{where}: model {m.name!r} is listed twice")
        merged.append(m)
        model_params.append(_params(entry.get("parameters"), f"{where} parameters"))
    if base is not None and info.base == "none" and base not in merged:
        merged.append(base)  # mergekit adds the base as one more input
        model_params.append({})
        notes.append(f"base_model {base.name!r} is merged as one more model (as mergekit does)")
    if base is not None and info.name in _BASE_FIRST and base in merged:
        i = merged.index(base)  # mergekit's slerp runs from the base (t = 0) to the other
        merged.insert(0, merged.pop(i))
        model_params.insert(0, model_params.pop(i))
    if not merged:
        raise ValueError("models: no model to merge besides the base")
    labels = [m.label for m in merged]
    settings = _method_settings(info, model_params, [global_params], labels, "parameters")
    has_base = base is not None and info.base != "none"
    plan = _plan(info, len(merged), has_base, settings, labels, "config")
    everyone = merged + ([base] if has_base else [])
    keys, metas = _check_same(everyone, "models")
    positions = layer_positions(keys)
    items = []
    keys_meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for key, meta in zip(keys, metas, strict=True):
        params = _resolve(plan, key, positions[key], labels)
        nbytes = meta.numel() * meta.element_size()
        items.append(
            OutputKey(
                key=key,
                sources=tuple(Source(m.index, key) for m in merged),
                base=Source(base.index, key) if has_base else None,
                plan=plan,
                params=params,
                t=positions[key],
                nbytes=nbytes,
            )
        )
        keys_meta[key] = (meta.dtype, tuple(meta.shape))
    return items, keys_meta, merged, merged


def _resolve(plan, key: str, t: float, labels) -> dict[str, Any]:
    try:
        return plan.resolve(key, t)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"tensor {key!r}: {_relabel(exc, labels)}") from None


def _plan_slices(config, info, inputs: _Inputs, base, global_params):
    from pymerge.merge.stream import OutputKey, Source

    raw = config["slices"]
    if not isinstance(raw, list) or not raw:
        raise ValueError("slices: must be a non-empty list of - sources: [...]")
    items: list[Any] = []
    keys_meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    out_layer = 0
    prefix_seen: str | None = None
    plans = []
    all_sources: list[ModelInput] = []
    for si, sl in enumerate(raw):
        where = f"slices[{si}]"
        if not isinstance(sl, Mapping) or not isinstance(sl.get("sources"), list):
            raise ValueError(f"{where}: expected sources: [- model: PATH, layer_range: [a, b]]")
        extra = set(sl) - {"sources", "parameters", "base_model"}
        if extra:
            raise ValueError(f"{where}: unknown key {sorted(extra)[0]!r}")
        sbase = (
            inputs.get(sl["base_model"], f"{where}.base_model") if sl.get("base_model") else base
        )
        has_base = sbase is not None and info.base != "none"
        srcs: list[tuple[ModelInput, tuple[int, int]]] = []
        model_params = []
        for j, src in enumerate(sl["sources"]):
            w = f"{where}.sources[{j}]"
            if not isinstance(src, Mapping) or "model" not in src:
                raise ValueError(f"{w}: expected model: PATH and layer_range: [start, end]")
            bad = set(src) - {"model", "layer_range", "parameters"}
            if bad:
                raise ValueError(f"{w}: unknown key {sorted(bad)[0]!r}")
            m = inputs.get(src["model"], w)
            lr = src.get("layer_range")
            if (
                not isinstance(lr, (list, tuple))
                or len(lr) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr)
                or not 0 <= lr[0] < lr[1]
            ):
                raise ValueError(f"{w}: layer_range must be [start, end] with 0 <= start < end")
            if has_base and m is sbase:
                continue  # the base among the sources is the base
            srcs.append((m, (int(lr[0]), int(lr[1]))))
            model_params.append(_params(src.get("parameters"), f"{w} parameters"))
        if not srcs:
            raise ValueError(f"{where}: no source to merge besides the base")
        lengths = {b - a for _, (a, b) in srcs}
        if len(lengths) != 1:
            raise ValueError(
                f"{where}: every source of a slice must span the same number of layers, got "
                f"{sorted(lengths)}"
            )
        labels = [m.label for m, _ in srcs]
        slice_params = _params(sl.get("parameters"), f"{where} parameters")
        settings = _method_settings(
            info, model_params, [slice_params, global_params], labels, where
        )
        plan = _plan(info, len(srcs), has_base, settings, labels, where)
        plans.append((plan, srcs, sbase if has_base else None, labels))
        everyone = [m for m, _ in srcs] + ([sbase] if has_base else [])
        for m in everyone:
            if m not in all_sources:
                all_sources.append(m)
        ref_keys = list(everyone[0].ckpt)
        prefix, layers, _rest = _layer_split(ref_keys)
        if prefix is None:
            raise ValueError(f"{where}: {everyone[0].label} has no numbered layer stack to slice")
        if prefix_seen is not None and prefix != prefix_seen:
            raise ValueError(f"{where}: the layer stack is {prefix!r}, not {prefix_seen!r}")
        prefix_seen = prefix
        n = next(iter(lengths))
        for m, (a, b) in srcs:
            have = _layer_split(list(m.ckpt))[1]
            if b > len(have):
                raise ValueError(
                    f"{where}: {m.label} has {len(have)} layers but layer_range asks for [{a}, {b}]"
                )
        for off in range(n):
            t = off / (n - 1) if n > 1 else 1.0
            suffixes = layers.get(srcs[0][1][0] + off)
            if suffixes is None:
                raise ValueError(f"{where}: layer {srcs[0][1][0] + off} is missing")
            for suffix in suffixes:
                out_key = f"{prefix}.{out_layer}.{suffix}"
                in_keys = [f"{prefix}.{a + off}.{suffix}" for _, (a, _b) in srcs]
                base_key = f"{prefix}.{srcs[0][1][0] + off}.{suffix}" if has_base else None
                meta = _meta_checked(
                    [(m, k) for (m, _), k in zip(srcs, in_keys, strict=True)]
                    + ([(sbase, base_key)] if has_base else []),
                    f"{where}, output tensor {out_key!r}",
                )
                params = _resolve(plan, out_key, t, labels)
                items.append(
                    OutputKey(
                        key=out_key,
                        sources=tuple(
                            Source(m.index, k) for (m, _), k in zip(srcs, in_keys, strict=True)
                        ),
                        base=Source(sbase.index, base_key) if has_base else None,
                        plan=plan,
                        params=params,
                        t=t,
                        nbytes=meta.numel() * meta.element_size(),
                    )
                )
                keys_meta[out_key] = (meta.dtype, tuple(meta.shape))
            out_layer += 1
    # keys outside the layer stack: from the first slice's sources (embeddings) or the last's
    first_ref = plans[0][1][0][0]
    _prefix, _layers, rest = _layer_split(list(first_ref.ckpt))
    pre_items, post_items = [], []
    for key in rest:
        plan, srcs, sbase, labels = plans[0] if _is_pre(key) else plans[-1]
        pairs = [(m, key) for m, _ in srcs] + ([(sbase, key)] if sbase is not None else [])
        meta = _meta_checked(pairs, f"tensor {key!r}")
        item = OutputKey(
            key=key,
            sources=tuple(Source(m.index, key) for m, _ in srcs),
            base=Source(sbase.index, key) if sbase is not None else None,
            plan=plan,
            params=_resolve(plan, key, 0.0, labels),
            t=0.0,
            nbytes=meta.numel() * meta.element_size(),
        )
        (pre_items if _is_pre(key) else post_items).append(item)
        keys_meta[key] = (meta.dtype, tuple(meta.shape))
    ordered = {i.key: i for i in pre_items + items + post_items}
    keys_meta = {k: keys_meta[k] for k in ordered}
    merged = [m for _, srcs, _, _ in plans for m, _ in srcs]
    return list(ordered.values()), keys_meta, all_sources, list(dict.fromkeys(merged))


def _meta_checked(pairs: Sequence[tuple[ModelInput, str]], where: str):
    first_m, first_k = pairs[0]
    if first_k not in first_m.ckpt:
        raise ValueError(f"{where}: {first_m.label} has no tensor {first_k!r}")
    info0 = first_m.ckpt.info(first_k)
    for m, k in pairs[1:]:
        if k not in m.ckpt:
            raise ValueError(f"{where}: {m.label} has no tensor {k!r}")
        i = m.ckpt.info(k)
        if i.shape != info0.shape:
            raise ValueError(
                f"{where}: {m.label} {k!r} has shape {list(i.shape)} but {first_m.label} "
                f"{first_k!r} has {list(info0.shape)}"
            )
    return torch.empty(info0.shape, dtype=info0.dtype, device="meta")


def _out_layers(keys_meta: Mapping[str, Any]) -> int | None:
    _prefix, layers, _ = _layer_split(list(keys_meta))
    return len(layers) or None


def _tokenizer_source(config, inputs: _Inputs, base, default) -> ModelInput | None:
    src = config.get("tokenizer_source")
    if src is None or src == "base":
        if src == "base" and base is None:
            raise ValueError("tokenizer_source: base needs a base_model")
        return base or default
    if src == "union":
        raise ValueError(
            "tokenizer_source: union builds a merged vocabulary (and resizes embeddings), which "
            "pymerge does not do; use base or a model's path"
        )
    if isinstance(src, str) and src.startswith("model:"):
        src = src.removeprefix("model:")
    return inputs.get(src, "tokenizer_source")


def _out_config(
    source: ModelInput | None, out_dtype: torch.dtype | None, *, n_layers: int | None
) -> dict[str, Any] | None:
    if source is None or source.ckpt.config is None:
        return None
    cfg = dict(source.ckpt.config)
    if out_dtype is not None:
        for k in ("torch_dtype", "dtype"):
            if k in cfg or k == "torch_dtype":
                cfg[k] = _dtype_name(out_dtype)
    if n_layers is not None:
        for k in ("num_hidden_layers", "n_layer", "num_layers"):
            if k in cfg:
                cfg[k] = n_layers
    return cfg


def tokenizer_files(source: ModelInput | None) -> dict[str, Path]:
    """The tokenizer (and generation config) files to copy from ``source``."""
    if source is None or source.ckpt.folder is None:
        return {}
    folder = source.ckpt.folder
    names = (*TOKENIZER_FILES, "generation_config.json")
    return {n: folder / n for n in names if (folder / n).is_file()}


# --------------------------------------------------------------------------- align / data


def _check_align(job: MergeJob, align: Any) -> None:
    if align is None:
        return
    if isinstance(align, str):
        align = {"method": align}
    if not isinstance(align, Mapping):
        raise ValueError("align: must be a mapping like {method: weight_matching, spec: auto}")
    align = dict(align)
    allowed = {"method", "spec", "max_iter", "seed", "greedy"}
    bad = set(align) - allowed
    if bad:
        raise ValueError(f"align: unknown key {sorted(bad)[0]!r}; the keys: {sorted(allowed)}")
    method = align.get("method", "weight_matching")
    if method != "weight_matching":
        raise ValueError(
            f"align: method {method!r} is not available from files; use weight_matching "
            "(activation matching needs a model and data: use pymerge.merge in Python)"
        )
    if job.slices:
        raise ValueError("align: does not combine with slices; use models:")
    max_iter = align.get("max_iter", 100)
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
        raise ValueError(f"align: max_iter must be an integer >= 1, got {max_iter!r}")
    seed = align.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"align: seed must be an integer >= 0, got {seed!r}")
    anchor = job.base if job.base is not None else job.merged_models[0]
    others = [m for m in job.merged_models if m is not anchor]
    if not others:
        raise ValueError("align: there is no model to permute onto the anchor")
    spec = _align_spec(align.get("spec", "auto"), anchor)
    for m in [anchor, *others]:
        try:
            spec.validate(m.ckpt.meta_state())
        except (ValueError, TypeError) as exc:
            raise ValueError(f"align: the spec does not fit {m.label}: {exc}") from None
    job.align = {
        "method": method,
        "max_iter": max_iter,
        "seed": seed,
        "greedy": bool(align.get("greedy", False)),
    }
    job.anchor, job.aligned, job.spec = anchor, others, spec


def _align_spec(spec: Any, anchor: ModelInput):
    if spec in (None, "auto", "hf"):
        from pymerge.spec.hf import hf_spec

        if anchor.ckpt.config is None:
            raise ValueError(
                f"align: {anchor.label} has no config.json to derive a spec from; give "
                f"spec: PATH.json (json.dump(spec.to_dict(), f))"
            )
        try:
            return hf_spec(anchor.ckpt.config, keys=anchor.ckpt.meta_state())
        except (ValueError, TypeError) as exc:
            raise ValueError(f"align: {exc}") from None
    from pymerge.io.files import load_spec

    try:
        return load_spec(spec)
    except (ValueError, FileNotFoundError) as exc:
        raise ValueError(f"align: {exc}") from None


def _check_data(job: MergeJob, data: Any, config_dir: Path | None) -> None:
    info = job.method
    if not info.needs_data:
        if data is not None:
            raise ValueError(f"data: {info.name} is not data-aware; remove data:")
        return
    if not isinstance(data, Mapping) or "batches" not in data:
        raise ValueError(
            f"{info.name} is data-aware: add data: {{batches: PATH}} (a .pt or .safetensors file "
            f"holding input_ids [N, T]), optionally batch_size and num_batches"
        )
    bad = set(data) - {"batches", "batch_size", "num_batches"}
    if bad:
        raise ValueError(f"data: unknown key {sorted(bad)[0]!r}")
    path = Path(str(data["batches"]))
    if not path.exists() and config_dir is not None:
        path = config_dir / path
    if not path.is_file():
        raise FileNotFoundError(f"data: no batches file at {str(data['batches'])!r}")
    bs = data.get("batch_size", 8)
    if not isinstance(bs, int) or bs < 1:
        raise ValueError(f"data: batch_size must be an integer >= 1, got {bs!r}")
    if job.slices:
        raise ValueError("data-aware methods do not combine with slices")
    job.data = {"batches": path, "batch_size": bs, "num_batches": data.get("num_batches")}


def estimate_peak_bytes(job: MergeJob, prefetch: int = 2, prefetch_bytes: int = 256 << 20) -> int:
    """A rough bound on the memory the streaming merge holds at once: the inputs of the
    largest key in flight (itself plus what is read ahead), its float32 working copies (about
    three per input for the task-vector methods), and the output being written."""
    if not job.items:
        return 0
    big = max(job.items, key=lambda i: i.nbytes * (len(i.sources) + (i.base is not None)))
    k = len(big.sources) + (big.base is not None)
    el = big.nbytes
    numel = el // max(1, _elsize(job, big))
    work = numel * 4 * (3 * k + 1)
    ahead = min(prefetch_bytes, prefetch * el * k)
    return el * k + work + ahead + 2 * el


def _elsize(job: MergeJob, item: Any) -> int:
    src = item.sources[0]
    return job.inputs[src.model].ckpt.dtype(src.key).itemsize


def total_read_bytes(job: MergeJob) -> int:
    return sum(i.nbytes * (len(i.sources) + (i.base is not None)) for i in job.items)


def output_bytes(job: MergeJob) -> int:
    return sum(math.prod(s) * d.itemsize for _, d, s in job.entries)
