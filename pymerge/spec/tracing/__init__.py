"""The spec tracer's rules, in a registry: how each op moves, joins or freezes feature groups.

:func:`pymerge.spec.spec_from_model` traces a model with ``torch.fx`` and walks the graph
once; each ``call_module`` / ``call_function`` / ``call_method`` node is handled by the rule
registered for the module's type (exact type, then bases whose ``forward`` it keeps) or for
the function / method name. The built-in rules are registered through the same API, by kind:

- :mod:`~pymerge.spec.tracing.modules`: Linear, convolutions, Embedding, PReLU, activations
  and pass-through modules, pooling, Upsample, Flatten;
- :mod:`~pymerge.spec.tracing.norms`: BatchNorm, InstanceNorm, LayerNorm, ``F.layer_norm``,
  GroupNorm;
- :mod:`~pymerge.spec.tracing.attention`: MultiheadAttention, scaled dot-product attention;
- :mod:`~pymerge.spec.tracing.functions`: elementwise ops, reductions, softmax, matmul,
  ``F.linear``, functional pooling and padding, expand, size queries;
- :mod:`~pymerge.spec.tracing.shapes`: view / reshape / flatten, permute / transpose, cat /
  stack, split / chunk, indexing.

Writing a rule: ``docs/tracing.md``.
"""

from pymerge.spec.tracing import aten, attention, functions, modules, norms, shapes  # noqa: F401
from pymerge.spec.tracing.call import Call
from pymerge.spec.tracing.primitives import broadcast, keep_dims, passthrough, pointwise, unify
from pymerge.spec.tracing.registry import (
    FunctionRule,
    ModuleRule,
    function_rule_for,
    module_rule_for,
    register_function_rule,
    register_module_rule,
    registered_module_types,
)
from pymerge.spec.tracing.shapes import reshape
from pymerge.spec.tracing.state import TraceState
from pymerge.spec.tracing.values import Piece, Pieces, Value

__all__ = [
    "Call",
    "FunctionRule",
    "ModuleRule",
    "Piece",
    "Pieces",
    "TraceState",
    "Value",
    "broadcast",
    "function_rule_for",
    "keep_dims",
    "module_rule_for",
    "passthrough",
    "pointwise",
    "register_function_rule",
    "register_module_rule",
    "registered_module_types",
    "reshape",
    "unify",
]
