"""Function and tensor-method rules: elementwise ops with broadcasting, reductions, softmax,
matmul and ``F.linear`` with parameters, functional pooling / padding, expand, size queries.

Shape ops (view, permute, cat, split, indexing) live in :mod:`~pymerge.spec.tracing.shapes`,
attention in :mod:`~pymerge.spec.tracing.attention`, ``F.layer_norm`` with the norms."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F

from pymerge.spec.spec import AxisRef
from pymerge.spec.tracing.call import Call
from pymerge.spec.tracing.primitives import broadcast, keep_dims, passthrough, pointwise, unify
from pymerge.spec.tracing.registry import register_function_rule
from pymerge.spec.tracing.values import Pieces, Value

__all__ = ["batch_dims", "contract", "layer_name", "param_linear", "whole_param"]

#: one-tensor elementwise functions (other tensor arguments broadcast with it)
UNARY_FUNCTIONS = (
    torch.relu,
    F.relu,
    F.gelu,
    F.silu,
    torch.sigmoid,
    torch.tanh,
    F.leaky_relu,
    F.elu,
    F.mish,
    F.hardswish,
    F.softplus,
    F.relu6,
    F.dropout,
    torch.exp,
    torch.log,
    torch.sqrt,
    torch.rsqrt,
    torch.abs,
    torch.neg,
    operator.neg,
    torch.square,
    torch.sin,
    torch.cos,
    F.sigmoid,
    F.tanh,
    torch.clamp,
    F.hardtanh,
    torch.erf,
    F.selu,
    F.celu,
    F.logsigmoid,
    F.hardsigmoid,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    F.feature_alpha_dropout,
    torch.reciprocal,
    torch.sign,
)
#: elementwise functions of several tensors (broadcasting)
ELEMENTWISE_FUNCTIONS = (
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.pow,
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.pow,
    torch.where,
    torch.maximum,
    torch.minimum,
    torch.lerp,
    torch.addcmul,
    torch.masked_fill,
    operator.gt,
    operator.lt,
    operator.ge,
    operator.le,
    operator.eq,
    operator.ne,
    torch.gt,
    torch.lt,
    torch.ge,
    torch.le,
    torch.eq,
    torch.ne,
    operator.and_,
    operator.or_,
    torch.logical_and,
    torch.logical_or,
)
#: elementwise tensor methods (and dtype / device / copy methods, which keep features)
ELEMENTWISE_METHODS = (
    "add",
    "sub",
    "mul",
    "div",
    "pow",
    "add_",
    "sub_",
    "mul_",
    "div_",
    "relu",
    "relu_",
    "sigmoid",
    "tanh",
    "exp",
    "log",
    "sqrt",
    "rsqrt",
    "abs",
    "neg",
    "clamp",
    "clamp_",
    "square",
    "contiguous",
    "clone",
    "float",
    "double",
    "half",
    "bfloat16",
    "to",
    "type_as",
    "detach",
    "masked_fill",
    "masked_fill_",
    "where",
    "sin",
    "cos",
    "erf",
    "requires_grad_",
    "maximum",
    "minimum",
    "lerp",
    "type",
    "cpu",
    "cuda",
    "sigmoid_",
    "tanh_",
    "exp_",
    "gt",
    "lt",
    "ge",
    "le",
    "eq",
    "ne",
    "logical_not",
    "sign",
    "reciprocal",
    "pow_",
)
_REDUCTIONS = ("sum", "mean", "amax", "amin", "var", "std", "logsumexp", "prod", "norm")
#: functional pooling -> number of trailing dims mixed (-1: all but batch and channels)
POOL_FUNCTIONS = {
    F.max_pool1d: 1,
    F.max_pool2d: 2,
    F.max_pool3d: 3,
    F.avg_pool1d: 1,
    F.avg_pool2d: 2,
    F.avg_pool3d: 3,
    F.adaptive_avg_pool1d: 1,
    F.adaptive_avg_pool2d: 2,
    F.adaptive_avg_pool3d: 3,
    F.adaptive_max_pool1d: 1,
    F.adaptive_max_pool2d: 2,
    F.interpolate: -1,
}


# ---------------------------------------------------------------------------- elementwise
@register_function_rule(UNARY_FUNCTIONS)
def unary(call: Call) -> Value | None:
    """Elementwise in its tensor; tensor keyword arguments (``clamp(x, min=t)``) broadcast."""
    extra = call.extra_values()
    if not extra:
        return pointwise(call)
    return broadcast(call, [call.x, *extra])


@register_function_rule((*ELEMENTWISE_FUNCTIONS, *ELEMENTWISE_METHODS), checked_inputs=False)
def elementwise(call: Call) -> Value | None:
    """Broadcasting elementwise op: groups meeting on a dim unify (see
    :func:`~pymerge.spec.tracing.primitives.broadcast`)."""
    node = call.node
    if not isinstance(call.x, Value):  # e.g. ``2 * x``, ``n - x.size(1)``, ``add(1, other=x)``
        return broadcast(call, [call.value(a) for a in (*node.args, *node.kwargs.values())])
    if node.op == "call_method" and len(node.args) == 1 and not call.extra_values():
        return pointwise(call)
    return broadcast(call, [call.value(a) for a in (*node.args, *node.kwargs.values())])


@register_function_rule(
    (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, F.normalize)
    + ("softmax", "log_softmax")
)
def softmax(call: Call) -> Value | None:
    """Equivariant along any dim (softmax or p-normalisation over features too)."""
    return passthrough(call)


# ---------------------------------------------------------------------------- reductions
def _reduced_dim(d: int, red: set[int], keep: bool) -> int:
    return d if keep else d - sum(1 for r in red if r < d)


@register_function_rule(tuple(getattr(torch, n) for n in _REDUCTIONS) + _REDUCTIONS)
def reduce(call: Call) -> Value | None:
    """A symmetric reduction: over features it is invariant (the group is dropped; heads
    would mix units and freeze); other dims keep their groups (``keepdim`` or not)."""
    x, node, shape = call.x, call.node, call.shape
    if not isinstance(shape, tuple):
        return None
    dims = call.arg(2 if node.target in ("norm", torch.norm) else 1, "dim")
    if dims is not None and not isinstance(dims, (int, list, tuple)):
        call.report("reduction with non-constant dims")
        call.freeze(x, f"reduced in {node.name}")
        return call.output()
    if dims is None:
        red = set(range(x.ndim))
    else:
        red = {d % x.ndim for d in ([dims] if isinstance(dims, int) else dims)}
    keep = len(shape) == x.ndim
    out = Value(shape)
    for d, p in x.tags.items():
        if d not in red:
            out.tags[_reduced_dim(d, red, keep)] = p
        elif any(q.role == "head" for q in p):  # units would mix across heads
            call.freeze(Value(x.shape, {d: p}), f"heads reduced in {node.name}")
    for key, mp in x.params:
        out.params.append(
            (key, {_reduced_dim(d, red, keep): ax for d, ax in mp.items() if d not in red})
        )
    return out


# ---------------------------------------------------------------------------- matmul, linear
def batch_dims(call: Call, xs: list[Value], out_nd: int, out: Value) -> None:
    """Unify the leading (batch) dims of ``xs`` (all but their last two) into ``out``."""
    for d in range(out_nd - 2):
        tagged, plain = [], False
        for v in xs:
            dd = d - (out_nd - v.ndim)
            if dd < 0 or dd >= v.ndim - 2:
                continue
            if dd in v.tags:
                tagged.append(v.tags[dd])
            elif v.shape[dd] != 1:
                plain = True
        if tagged:
            pieces = unify(call, tagged)
            if plain:
                call.freeze_pieces(pieces, f"meets an unpermuted tensor in {call.node.name}")
            out.tags[d] = pieces


def contract(call: Call, a: Pieces | None, b: Pieces | None) -> None:
    """A summed-over dim: invariant when both sides carry the same group."""
    if a is None and b is None:
        return
    one = a if b is None else b if a is None else None
    if one is not None and all(p.role == "unit" for p in one):
        call.state.to_heads(one, f"contracted with fixed units in {call.node.name}")
        return
    if a is None or b is None or any(p.role == "head" for p in (*a, *b)):
        call.freeze_pieces(
            (*(a or ()), *(b or ())), f"contracted with unpermuted features in {call.node.name}"
        )
        return
    unify(call, [a, b])


def _weight_view(v: Any) -> tuple[str, tuple[int, int]] | None:
    """``(key, (axis of dim -2, axis of dim -1))`` when ``v`` is exactly one whole 2-D
    parameter (possibly transposed), else None."""
    if not isinstance(v, Value) or v.tags or len(v.params) != 1 or v.ndim != 2:
        return None
    key, mp = v.params[0]
    if mp.get(0) is None or mp.get(1) is None:
        return None
    return key, (mp[0], mp[1])


def param_linear(
    call: Call, x: Value, key: str, ax_in: int, ax_out: int, bias: tuple[str, int] | None
) -> Value:
    """``y = x W (+ b)`` with parameters: x's last dim joins W's ``ax_in``; the output's last
    dim is a new group on W's ``ax_out`` (and the bias)."""
    shape = call.shape
    last = x.ndim - 1
    if last in x.tags:
        call.join(x.tags[last], key, ax_in)
    out = Value(shape, {d: p for d, p in x.tags.items() if d != last})
    refs = [AxisRef(key, ax_out)] + ([AxisRef(*bias)] if bias is not None else [])
    out.tags[len(shape) - 1] = call.new_group(shape[-1], refs, name=layer_name(call, key))
    return out


def layer_name(call: Call, key: str) -> str:
    """A group started by an op on parameter ``key``: named after the module it ran in
    (exported graphs), else after the parameter's owner."""
    return call.scope or (key.rsplit(".", 1)[0] if "." in key else key)


def _plain_matmul_inputs(a: Any, b: Any, shape: Any) -> bool:
    return (
        isinstance(shape, tuple)
        and isinstance(a, Value)
        and isinstance(b, Value)
        and min(a.ndim, b.ndim) >= 2
        and not (a.params or b.params)
    )


@register_function_rule((torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm"))
def matmul(call: Call) -> Value | None:
    """``[..., m, k] @ [..., k, n]``: k contracted, m and n carried, batch dims unified;
    ``x @ W`` with a whole 2-D parameter ``W`` is a linear layer."""
    a, b, shape = call.x, call.input(1), call.shape
    w = _weight_view(b)
    if w is not None and isinstance(a, Value) and not a.params and isinstance(shape, tuple):
        key, (ax_in, ax_out) = w
        return param_linear(call, a, key, ax_in, ax_out, None)
    if not _plain_matmul_inputs(a, b, shape):
        if any(isinstance(v, Value) and v.active() for v in (a, b)):
            call.report("matmul on features")
        for v in (a, b):
            if isinstance(v, Value):
                call.freeze(v, f"flows into {call.node.name}")
        return call.output()
    out = Value(shape)
    nd = len(shape)
    batch_dims(call, [a, b], nd, out)
    contract(call, a.tags.get(a.ndim - 1), b.tags.get(b.ndim - 2))
    if a.ndim - 2 in a.tags:
        out.tags[nd - 2] = a.tags[a.ndim - 2]
    if b.ndim - 1 in b.tags:
        out.tags[nd - 1] = b.tags[b.ndim - 1]
    return out


def _bias_view(b: Any) -> tuple[str, int] | None | bool:
    """``(key, axis)`` for a whole 1-D parameter, None for no bias, False for anything else."""
    if not isinstance(b, Value):
        return None
    if len(b.params) == 1 and not b.tags and b.ndim == 1 and b.params[0][1].get(0) is not None:
        return b.params[0][0], b.params[0][1][0]
    return False


@register_function_rule(torch.addmm)
def addmm(call: Call) -> Value | None:
    """``addmm(bias, x, W)`` with parameters: a linear layer with weight ``[in, out]``
    (GPT-2's ``Conv1D`` traced through)."""
    x, shape = call.input(1, "mat1"), call.shape
    wv = _weight_view(call.input(2, "mat2"))
    bias = _bias_view(call.x)
    if wv is None or bias is False or bias is None or not isinstance(x, Value) or x.params:
        return call.unsupported("addmm with non-parameter weights")
    if not isinstance(shape, tuple):
        return call.unsupported("addmm with non-parameter weights")
    key, (ax_in, ax_out) = wv
    return param_linear(call, x, key, ax_in, ax_out, bias)


def whole_param(v: Any, ndim: int | None = None) -> str | None:
    """The key when ``v`` is exactly one whole parameter (every dim its own axis, in order,
    no features), else None."""
    if not isinstance(v, Value) or v.tags or len(v.params) != 1:
        return None
    key, mp = v.params[0]
    if ndim is not None and v.ndim != ndim:
        return None
    return key if all(mp.get(d) == d for d in range(v.ndim)) else None


@register_function_rule(F.embedding, checked_inputs=False)
def embedding(call: Call) -> Value | None:
    """``F.embedding(indices, weight)``: a new group on ``weight`` axis 1; features used as
    indices freeze."""
    idx, key = call.input(0, "input"), whole_param(call.input(1, "weight"), 2)
    if key is None or not isinstance(call.shape, tuple):
        return call.unsupported("embedding with a non-parameter table")
    if isinstance(idx, Value) and idx.active():
        call.freeze(idx, f"used as indices in {call.node.name}")
    pieces = call.new_group(call.shape[-1], [(key, 1)], name=layer_name(call, key))
    return Value(call.shape, {len(call.shape) - 1: pieces})


_LIKE = ("zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like")


@register_function_rule(
    tuple(getattr(torch, n) for n in _LIKE)
    + ("new_zeros", "new_ones", "new_empty", "new_full", "new_tensor")
)
def new_tensor(call: Call) -> Value | None:
    """A new tensor shaped like (or with the dtype of) the input: it carries nothing."""
    return call.output()


@register_function_rule(F.linear)
def linear(call: Call) -> Value | None:
    """``F.linear(x, weight, bias)`` with parameter weight (``[out, in]``) and bias."""
    x, shape = call.input(0, "input"), call.shape
    wv = _weight_view(call.input(1, "weight"))
    bias = _bias_view(call.input(2, "bias"))
    if wv is None or bias is False or not isinstance(x, Value) or x.params:
        return call.unsupported("linear with non-parameter weights")
    if not isinstance(shape, tuple):
        return call.unsupported("linear with non-parameter weights")
    key, (ax_out, ax_in) = wv
    return param_linear(call, x, key, ax_in, ax_out, bias)


# ---------------------------------------------------------------------------- spatial
@register_function_rule(F.pad)
def pad(call: Call) -> Value | None:
    """Padding mixes the padded trailing dims (a dim padded by ``(0, 0)`` is kept)."""
    x = call.x
    if not isinstance(call.shape, tuple):
        return call.unsupported("unknown op on permuted features")
    p = call.arg(1, "pad", ())
    if not isinstance(p, (list, tuple)):
        return keep_dims(call, x, range(x.ndim))
    pairs = [p[i : i + 2] for i in range(0, len(p) - 1, 2)]  # last dim first
    mixed = [x.ndim - 1 - i for i, pr in enumerate(pairs) if tuple(pr) != (0, 0)]
    return keep_dims(call, x, mixed)


def _pool_fn(nsp: int) -> Any:
    def pool(call: Call) -> Value:
        x = call.x
        n = x.ndim - 2 if nsp == -1 else nsp
        return keep_dims(call, x, range(x.ndim - n, x.ndim))

    return pool


for _fn, _nsp in POOL_FUNCTIONS.items():
    register_function_rule(_fn, _pool_fn(_nsp))


@register_function_rule(("expand", "expand_as", "repeat"))
def expand(call: Call) -> Value | None:
    """New leading dims are plain; a tagged dim that is repeated freezes."""
    x, shape = call.x, call.shape
    if not isinstance(shape, tuple):
        return call.unsupported("unknown op on permuted features")
    off = len(shape) - x.ndim
    out = Value(shape)
    for d, p in x.tags.items():
        if shape[d + off] == x.shape[d]:
            out.tags[d + off] = p
        else:
            call.freeze(Value(x.shape, {d: p}), f"repeated in {call.node.name}")
    for key, mp in x.params:
        out.params.append(
            (key, {d + off: (ax if shape[d + off] == x.shape[d] else None) for d, ax in mp.items()})
        )
    return out


@register_function_rule(("size", "dim", "numel", "__len__", getattr, len))
def size_query(call: Call) -> None:
    """Shape arithmetic: no tensor, nothing to track."""
    return None
