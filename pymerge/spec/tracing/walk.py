"""One step of the walk over the graph: the value of a node, from the rule that handles it."""

from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch import nn

from pymerge.spec.tracing.call import Call, _flat_node_vals
from pymerge.spec.tracing.registry import function_rule_for, module_rule_for
from pymerge.spec.tracing.state import NodeValues, TraceState
from pymerge.spec.tracing.values import Value, meta_shape

__all__ = ["process_node"]


def process_node(
    node: fx.Node,
    info: NodeValues,
    st: TraceState,
    modules: dict[str, nn.Module],
    state: dict[str, Any],
    lifted: dict[str, str] | None = None,
) -> Any:
    """The value of ``node`` given its inputs' values in ``info``; ``lifted`` maps the
    placeholders of an exported graph that stand for parameters and buffers to their
    state-dict keys (they are views of those entries, like ``get_attr`` nodes)."""
    shape = meta_shape(node)
    if node.op == "placeholder":
        if not isinstance(shape, tuple):
            return None
        key = (lifted or {}).get(node.name)
        if key is not None and key in state:
            return Value(shape, params=[(key, {d: d for d in range(len(shape))})])
        return Value(shape)
    if node.op == "get_attr":
        if not isinstance(shape, tuple):
            return None
        if node.target in state:
            return Value(shape, params=[(node.target, {d: d for d in range(len(shape))})])
        return Value(shape)
    if node.op == "output":
        st.freeze_val(_flat_node_vals(node.args, info), "reaches the model output")
        return None
    if node.op == "call_module":
        return _call_module(Call(node, modules[node.target], shape, st, info))
    if node.op in ("call_function", "call_method"):
        return _call_function(Call(node, None, shape, st, info))
    return None


def _call_module(call: Call) -> Any:
    entry = module_rule_for(type(call.module))
    if entry is not None and not entry.checked_inputs:
        return entry.rule(call)
    if not _one_tensor_input(call):
        return call.output()
    if entry is None:  # a user-declared leaf (``leaf_modules=``) without a rule: opaque
        return call.unsupported(f"no rule for module type {type(call.module).__name__}")
    return entry.rule(call)


def _one_tensor_input(call: Call) -> bool:
    """Checked module inputs: one traced tensor, no features elsewhere; parameters used as
    the input are frozen and stripped."""
    x, node, kind = call.x, call.node, type(call.module).__name__
    if not isinstance(x, Value) or not isinstance(call.shape, tuple):
        call.unsupported(f"unexpected inputs to {kind}")
        return False
    if len(node.args) + len(node.kwargs) > 1 and any(v.active() for v in call.extra_values()):
        call.unsupported(f"extra inputs to {kind}")
        return False
    if x.params:
        call.freeze(Value(x.shape, params=x.params), f"parameter used as input to {call.name}")
        call.x = Value(x.shape, dict(x.tags))
    return True


def _call_function(call: Call) -> Any:
    entry = function_rule_for(call.node.op, call.node.target)
    if entry is None or (entry.checked_inputs and not isinstance(call.x, Value)):
        # an op the tracer does not know, or one on no traced tensor (shape arithmetic...)
        return call.unsupported("unknown op on permuted features")
    return entry.rule(call)
