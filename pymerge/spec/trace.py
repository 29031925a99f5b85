"""Derive a PermutationSpec from an ``nn.Module`` with ``torch.fx``.

The model is symbolically traced, shapes are propagated on the example inputs, and every
tensor dimension that carries permutable features gets *tags*: pieces of union-find elements
(feature groups). Nodes are processed once each in topological order (no recursion), so deep
networks are fine. Each node is handled by the rule registered for its module type, function
or method (:mod:`pymerge.spec.tracing`; :func:`pymerge.spec.register_module_rule` and
:func:`pymerge.spec.register_function_rule` add rules, ``docs/tracing.md`` says how). What the
built-in rules do:

- Linear / Conv / ConvTranspose / Embedding / MultiheadAttention outputs start elements;
  their inputs' feature axes join the producer's element (weight axis 1, ...).
- Norms (BatchNorm, LayerNorm, GroupNorm as head-structured blocks, InstanceNorm),
  elementwise activations, dropout, pooling, softmax pass features through.
- Elementwise ops with broadcasting (residual ``add``, ``mul``...) union the groups meeting on a
  dimension; parameters (``get_attr``, e.g. positional embeddings) join the group they meet.
- ``flatten`` / ``view`` / ``reshape`` keep groups with an ``inner`` block size; ``cat`` on
  the feature axis gives segments; ``permute`` / ``transpose`` move them.
- Hand-written attention: ``split`` / ``chunk`` of a feature axis splits its group into
  segment groups; ``view(..., H, D)`` of a whole group gives head-structured features
  (:class:`HeadStructure`); ``matmul`` / ``scaled_dot_product_attention`` couple q with k
  (contracted) and the heads of q/k with v; viewing heads back to ``[..., H*D]`` rejoins them.
  SwiGLU-style ``a * silu(g)`` after a ``chunk`` ties both halves.
- Groups reaching the model output, meeting an unpermuted tensor, or entering an op the
  tracer does not understand are frozen; the op is reported by node name (a warning and
  ``spec.report``).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from pymerge.spec.spec import PermutationSpec
from pymerge.spec.tracing import module_rule_for, registered_module_types
from pymerge.spec.tracing.assemble import build_spec
from pymerge.spec.tracing.state import NodeValues, TraceState
from pymerge.spec.tracing.walk import process_node

__all__ = ["spec_from_model", "DEFAULT_LEAF_MODULES"]

#: the module types with a built-in rule (the tracer keeps them as leaves; so it does for
#: types registered later with :func:`pymerge.spec.register_module_rule`)
DEFAULT_LEAF_MODULES: tuple[type, ...] = registered_module_types()


class _Tracer(fx.Tracer):
    """Leaves: modules the registry has a rule for, and the user's ``leaf_modules``."""

    def __init__(self, leaves: tuple[type, ...]) -> None:
        super().__init__()
        self._leaves = leaves
        self.proxy_buffer_attributes = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return module_rule_for(type(m)) is not None or isinstance(m, self._leaves)


def spec_from_model(
    model: nn.Module,
    example_inputs: Any,
    *,
    overrides: Mapping[str, Any] | Callable[[PermutationSpec], PermutationSpec] | None = None,
    leaf_modules: Sequence[type] = (),
    warn: bool = True,
) -> PermutationSpec:
    """Trace ``model`` with ``torch.fx`` and derive its :class:`PermutationSpec`.

    Args:
        model: the module (not modified: a deep copy is traced and run).
        example_inputs: a tensor or a tuple of positional inputs for shape propagation.
        overrides: ``{group: None}`` freezes a group, ``{group: [axis refs]}`` adds/replaces
            one, ``{"__free__": keys, "__merge__": [[g1, g2], ...]}``; or a callable
            ``spec -> spec``. See :meth:`PermutationSpec.override`.
        leaf_modules: extra module types not to trace into; they are treated as opaque
            (inputs frozen, params unpermuted) unless the tracer has a rule for them.
        warn: emit a warning listing what could not be handled.

    Returns:
        The spec; ``spec.report`` lists unsupported ops (by node name) and frozen groups.
        Groups are named after the first module producing them; attention groups are
        ``<mha>.qk`` / ``<mha>.vo`` with head structure ``<mha>``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    state = model.state_dict()
    # shapes only: propagate meta tensors (no compute), fall back to a real copy
    try:
        m = copy.deepcopy(model).to("meta").eval()
        inputs = tuple(x.to("meta") if isinstance(x, torch.Tensor) else x for x in example_inputs)
        gm = _trace_and_propagate(m, inputs, leaf_modules, type(model).__name__)
    except _TraceError as e:
        raise ValueError(
            f"{e} (submodules torch.fx cannot trace can be passed as "
            "leaf_modules=(Type, ...): they are then treated as opaque)"
        ) from e
    except Exception:  # noqa: BLE001 - some ops lack meta kernels
        m = copy.deepcopy(model).eval()
        gm = _trace_and_propagate(m, example_inputs, leaf_modules, type(model).__name__)
    st = TraceState()
    modules = dict(gm.named_modules())
    info = NodeValues(st)
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in gm.graph.nodes:
        info[node] = process_node(node, info, st, modules, state)
    spec = build_spec(gm, info, st, state, modules, calls)
    if overrides is not None:
        spec = overrides(spec) if callable(overrides) else spec.override(overrides)
    if warn and any(r.startswith("unsupported") for r in spec.report):
        warnings.warn(
            "spec_from_model: " + "; ".join(r for r in spec.report if r.startswith("unsupported")),
            stacklevel=2,
        )
    return spec


class _TraceError(ValueError):
    pass


def _trace_and_propagate(
    m: nn.Module, inputs: tuple, leaf_modules: Sequence[type], model_name: str
) -> fx.GraphModule:
    tracer = _Tracer(tuple(leaf_modules))
    try:
        graph = tracer.trace(m)
    except Exception as e:  # noqa: BLE001 - report any tracing failure clearly
        raise _TraceError(f"torch.fx could not trace {model_name}: {e}") from e
    gm = fx.GraphModule(tracer.root, graph)
    with torch.no_grad():
        try:
            ShapeProp(gm).propagate(*inputs)
        except Exception as e:  # noqa: BLE001
            raise ValueError(
                f"shape propagation of {model_name} on the example inputs failed: {e}"
            ) from e
    return gm
