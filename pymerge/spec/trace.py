"""Derive a PermutationSpec from an ``nn.Module`` by tracing it.

Two fronts read the model into a graph: ``torch.fx`` symbolic tracing with shape
propagation on the example inputs, and ``torch.export`` (dynamo), whose ATen graph is
rewritten into the same vocabulary (:mod:`pymerge.spec.tracing.aten`); ``tracer="auto"``
uses ``torch.fx`` and falls back to ``torch.export`` when ``torch.fx`` cannot trace the model
(Hugging Face models, data-dependent Python). Every tensor dimension that carries permutable
features gets *tags*: pieces of union-find elements (feature groups). Nodes are processed once
each in topological order (no recursion), so deep networks are fine. Each node is handled by
the rule registered for its module type, function or method (:mod:`pymerge.spec.tracing`;
:func:`pymerge.spec.register_module_rule` and :func:`pymerge.spec.register_function_rule` add
rules, ``docs/tracing.md`` says how). What the built-in rules do:

- Linear / Conv / ConvTranspose / Embedding / MultiheadAttention outputs start elements;
  their inputs' feature axes join the producer's element (weight axis 1, ...); grouped
  convolutions permute within channel blocks; the functional forms (``F.linear``,
  ``F.conv2d``, ``addmm``, ``F.embedding``, the norms) read their parameters from the graph.
- Norms (BatchNorm, LayerNorm, RMSNorm, GroupNorm as head-structured blocks, InstanceNorm),
  elementwise activations, dropout and drop path, pooling, softmax pass features through.
- Elementwise ops with broadcasting (residual ``add``, ``mul``...) union the groups meeting on a
  dimension; parameters (``get_attr``, e.g. positional embeddings) join the group they meet;
  so do tokens concatenated with the stream along the sequence (class / register tokens).
- ``flatten`` / ``view`` / ``reshape`` keep groups with an ``inner`` block size or repeated
  pieces; a dim of blocks (fused qkv ``[3, H, D]``, channel shuffle) shares one permutation
  across its blocks; ``cat`` on the feature axis gives segments; ``permute`` / ``transpose``
  move them; slicing refines groups at the bounds.
- Attention: ``split`` / ``chunk`` of a feature axis splits its group into segment groups;
  ``view(..., H, D)`` of a whole group gives head-structured features
  (:class:`HeadStructure`); ``matmul`` / ``scaled_dot_product_attention`` couple q with k
  (contracted) and the heads of q/k with v; viewing heads back to ``[..., H*D]`` rejoins them.
  Where units within a head cannot move (rotary embeddings pair unit i with i + D/2 at its
  own frequency, a per-head parameter), the group moves whole heads; key/value heads shared
  by a group of query heads (GQA) move with that group.
- Groups reaching the model output, meeting an unpermuted tensor, or entering an op the
  tracer does not understand (advanced indexing of a feature axis included) are frozen; the
  op is reported by node name (a warning and ``spec.report``).

A self-check (on by default) then permutes a float64 copy with perturbed norm parameters by a
random permutation and compares its outputs on the example inputs: a spec that would change
the model's function raises :class:`~pymerge.spec.tracing.check.SpecCheckError` naming the
first group at fault, never silently.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from pymerge.spec.spec import PermutationSpec
from pymerge.spec.tracing import module_rule_for, registered_module_types
from pymerge.spec.tracing.assemble import build_spec
from pymerge.spec.tracing.aten import lower_aten
from pymerge.spec.tracing.check import SpecCheckError, run_check, split_inputs
from pymerge.spec.tracing.state import NodeValues, TraceState
from pymerge.spec.tracing.walk import process_node

__all__ = ["spec_from_model", "DEFAULT_LEAF_MODULES", "TRACERS"]

#: the module types with a built-in rule (the tracer keeps them as leaves; so it does for
#: types registered later with :func:`pymerge.spec.register_module_rule`)
DEFAULT_LEAF_MODULES: tuple[type, ...] = registered_module_types()

#: the values of ``spec_from_model(..., tracer=)``
TRACERS = ("auto", "fx", "export")


class _Tracer(fx.Tracer):
    """Leaves: modules the registry has a rule for, and the user's ``leaf_modules``."""

    def __init__(self, leaves: tuple[type, ...]) -> None:
        super().__init__()
        self._leaves = leaves
        self.proxy_buffer_attributes = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return module_rule_for(type(m)) is not None or isinstance(m, self._leaves)


class _TraceError(ValueError):
    """``torch.fx`` could not trace or run the model (``auto`` then tries ``torch.export``)."""


class _ShapeError(_TraceError):
    """Shape propagation on the example inputs failed."""


@dataclass
class _Graph:
    """A traced graph ready for the walk: the graph module, the modules its nodes name, the
    ``call_module`` counts (None for an exported graph) and the lifted parameters
    (placeholder name -> state-dict key)."""

    gm: fx.GraphModule
    modules: dict[str, nn.Module]
    calls: dict[str, int] | None
    lifted: dict[str, str] | None = None


def spec_from_model(
    model: nn.Module,
    example_inputs: Any,
    *,
    overrides: Mapping[str, Any] | Callable[[PermutationSpec], PermutationSpec] | None = None,
    leaf_modules: Sequence[type] = (),
    warn: bool = True,
    tracer: str = "auto",
    check: bool = True,
) -> PermutationSpec:
    """Trace ``model`` and derive its :class:`PermutationSpec`.

    Args:
        model: the module (not modified: deep copies are traced and run).
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs
            (e.g. ``{"input_ids": ids}``), for shape propagation and the self-check.
        overrides: ``{group: None}`` freezes a group, ``{group: [axis refs]}`` adds/replaces
            one, ``{"__free__": keys, "__merge__": [[g1, g2], ...]}``; or a callable
            ``spec -> spec``. See :meth:`PermutationSpec.override`.
        leaf_modules: extra module types not to trace into (``torch.fx``); they are treated
            as opaque (inputs frozen, params unpermuted) unless the tracer has a rule for them.
        warn: emit a warning listing what could not be handled.
        tracer: ``"fx"`` (``torch.fx`` symbolic tracing: module rules apply to leaf modules),
            ``"export"`` (``torch.export``: ATen ops on lifted parameters; Hugging Face
            models trace as they are) or ``"auto"`` (``torch.fx``, falling back to
            ``torch.export`` when ``torch.fx`` fails; the spec's report then says so).
        check: run the self-check (default): permute a float64 copy whose 1-D state entries
            (norm scales and biases, running statistics, biases) are re-randomised by a
            random permutation of the spec and compare outputs on the example inputs (two
            forward passes). A spec that changes them raises
            :class:`~pymerge.spec.tracing.check.SpecCheckError` (a ``ValueError``) naming the
            first group at fault; its ``.groups`` lists them all and ``.spec`` is the spec.
            ``check=False`` skips it; :func:`pymerge.spec.check_spec` runs it on any spec.

    Returns:
        The spec; ``spec.report`` lists unsupported ops (by node name) and frozen groups.
        Groups are named after the first module producing them; attention groups are
        ``<mha>.qk`` / ``<mha>.vo`` with head structure ``<mha>``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if tracer not in TRACERS:
        raise ValueError(f"tracer must be one of {TRACERS}, got {tracer!r}")
    args, kwargs = split_inputs(example_inputs)
    name = type(model).__name__
    state = model.state_dict()
    graph, note = _graph(model, args, kwargs, tuple(leaf_modules), tracer, name)
    st = TraceState()
    info = NodeValues(st)
    for node in graph.gm.graph.nodes:
        info[node] = process_node(node, info, st, graph.modules, state, graph.lifted)
    ranked: dict = {}
    spec = build_spec(graph.gm, info, st, state, graph.modules, graph.calls, ranked)
    if note:
        spec.report.insert(0, note)
    if overrides is not None:
        spec = overrides(spec) if callable(overrides) else spec.override(overrides)
    if check:
        _self_check(model, spec, args, kwargs, name, ranked)
    if warn and any(r.startswith("unsupported") for r in spec.report):
        warnings.warn(
            "spec_from_model: " + "; ".join(r for r in spec.report if r.startswith("unsupported")),
            stacklevel=2,
        )
    return spec


def _self_check(
    model: nn.Module, spec: PermutationSpec, args: tuple, kwargs: dict, name: str, ranked: dict
) -> None:
    failing, what = run_check(model, spec, args, kwargs, points=ranked)
    if what.startswith("skipped"):
        spec.report.append(f"self-check {what}")
        warnings.warn(f"spec_from_model({name}): self-check {what}", stacklevel=3)
        return
    if not what:
        return
    more = f" ({len(failing) - 1} more groups fail: see .groups)" if len(failing) > 1 else ""
    raise SpecCheckError(
        f"spec_from_model({name}): the traced spec does not preserve the model's function: "
        f"{what}{more}. This is a tracer bug or an op it misreads; please report it. Pass "
        "check=False to get the spec anyway (freezing the failing groups, e.g. "
        "spec.without_groups(err.groups), makes it safe); pymerge.spec.check_spec(model, "
        "spec, inputs) lists the failing groups of any spec.",
        failing,
        spec,
    )


def _graph(
    model: nn.Module,
    args: tuple,
    kwargs: dict,
    leaf_modules: tuple[type, ...],
    tracer: str,
    name: str,
) -> tuple[_Graph, str]:
    """The graph of the chosen front, and a report note when ``auto`` fell back."""
    if tracer == "export":
        return _export_graph(
            model, args, kwargs, name
        ), "traced with torch.export (tracer='export')"
    try:
        return _fx_graph(model, args, kwargs, leaf_modules, name), ""
    except _TraceError as fx_error:
        if tracer == "fx":
            raise ValueError(
                f"{fx_error} (submodules torch.fx cannot trace can be passed as "
                "leaf_modules=(Type, ...): they are then treated as opaque; "
                "tracer='export' traces with torch.export instead)"
            ) from fx_error
        try:
            graph = _export_graph(model, args, kwargs, name)
        except ValueError as export_error:
            raise ValueError(
                f"{fx_error}; and {export_error} (submodules torch.fx cannot trace can be "
                "passed as leaf_modules=(Type, ...): they are then treated as opaque)"
            ) from export_error
        return graph, f"traced with torch.export: {_first_line(fx_error)}"


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:limit]


def _fx_graph(
    model: nn.Module, args: tuple, kwargs: dict, leaf_modules: tuple[type, ...], name: str
) -> _Graph:
    if kwargs:
        args = _positional(model, args, kwargs, name)
    # shapes only: propagate meta tensors (no compute), fall back to a real copy
    try:
        m = copy.deepcopy(model).to("meta").eval()
        inputs = tuple(x.to("meta") if isinstance(x, torch.Tensor) else x for x in args)
        gm = _trace_and_propagate(m, inputs, leaf_modules, name)
    except _ShapeError:  # some ops lack meta kernels (or call .item())
        m = copy.deepcopy(model).eval()
        gm = _trace_and_propagate(m, args, leaf_modules, name)
    except _TraceError:
        raise
    except Exception:  # noqa: BLE001 - the model may not move to the meta device
        m = copy.deepcopy(model).eval()
        gm = _trace_and_propagate(m, args, leaf_modules, name)
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return _Graph(gm, dict(gm.named_modules()), calls)


def _positional(model: nn.Module, args: tuple, kwargs: dict, name: str) -> tuple:
    """Keyword inputs as positional ones (``torch.fx`` placeholders follow ``forward``)."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except (TypeError, ValueError) as e:
        raise _TraceError(f"torch.fx could not bind the inputs of {name}: {e}") from e
    bound.apply_defaults()
    return tuple(bound.arguments.values())


def _trace_and_propagate(
    m: nn.Module, inputs: tuple, leaf_modules: Sequence[type], model_name: str
) -> fx.GraphModule:
    tracer = _Tracer(tuple(leaf_modules))
    try:
        graph = tracer.trace(m)
    except Exception as e:  # noqa: BLE001 - report any tracing failure clearly
        raise _TraceError(f"torch.fx could not trace {model_name}: {e}") from e
    gm = fx.GraphModule(tracer.root, graph)
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints
        try:
            ShapeProp(gm).propagate(*inputs)
        except Exception as e:  # noqa: BLE001
            raise _ShapeError(
                f"shape propagation of {model_name} on the example inputs failed: {e}"
            ) from e
    return gm


def _export_graph(model: nn.Module, args: tuple, kwargs: dict, name: str) -> _Graph:
    """``torch.export`` of a copy (non-strict), ATen nodes lowered for the rules."""
    from torch.export.graph_signature import InputKind

    m = copy.deepcopy(model).eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(m, args, kwargs or None, strict=False)
    except Exception as e:  # noqa: BLE001 - report any export failure clearly
        hint = ""
        if "Cache" in str(e):
            hint = (
                " (a Hugging Face cache object in the outputs: build the model with "
                "use_cache=False, or pass the inputs as a dict with 'use_cache': False)"
            )
        raise ValueError(f"torch.export could not export {name}: {_first_line(e)}{hint}") from e
    gm = ep.graph_module
    first: dict[tuple, str] = {}  # tied entries are lifted once: name them by the first key
    for k, t in model.state_dict().items():
        first.setdefault((t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype), k)
    state = model.state_dict()
    lifted = {}
    for spec in ep.graph_signature.input_specs:
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and spec.target is not None:
            t = state.get(spec.target)
            key = spec.target
            if t is not None and t.numel():
                key = first[(t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)]
            lifted[spec.arg.name] = key
    lower_aten(gm.graph)
    return _Graph(gm, dict(model.named_modules()), None, lifted)
