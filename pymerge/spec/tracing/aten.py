"""ATen ops of ``torch.export`` graphs, read with the same rules as ``torch.fx`` graphs.

An exported graph has no modules: a Linear is ``aten.linear(x, weight, bias)`` on lifted
parameter placeholders, a slice is ``aten.slice.Tensor``, a LayerNorm ``aten.layer_norm``.
:func:`lower_aten` rewrites each ATen node whose overload packet is listed here into the
``torch``-level call the registered rules read (``F.linear``, ``operator.getitem`` with a
slice, ``torch.reshape``, ...), arguments reordered where the ATen schema differs
(``aten.embedding(weight, indices)``, ``aten.batch_norm(x, weight, bias, mean, var, ...)``).
A node is left alone when a rule is registered for its ATen target or packet itself (a
user rule wins), and ops without an entry stay as they are: the walk reports them and
freezes what flows into them like any unknown op. Ops returning several tensors (the
``native_*`` norms) get rules here.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from pymerge.spec.tracing.call import Call
from pymerge.spec.tracing.functions import new_tensor, size_query
from pymerge.spec.tracing.norms import batch_norm_fn, group_norm_fn, layer_norm_fn
from pymerge.spec.tracing.primitives import keep_dims, passthrough
from pymerge.spec.tracing.registry import _FUNCTIONS, register_function_rule
from pymerge.spec.tracing.values import Value, meta_shape

__all__ = ["lower_aten", "same_values"]

aten = torch.ops.aten
_BIG = 2**62  # ``aten.slice`` writes an open end as a huge integer


def same_values(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """What copies, casts and aliases (``aten.to``, ``clone``, ``alias``, ``detach``...) are
    lowered to: the values (and features) of ``x``."""
    return x


register_function_rule(same_values, passthrough)

Lowering = Callable[[fx.Node], tuple[str, Any, tuple, dict]]


def _to(target: Any, op: str = "call_function") -> Lowering:
    """Same arguments, another target."""
    return lambda n: (op, target, tuple(n.args), dict(n.kwargs))


def _first(target: Any) -> Lowering:
    """Only the first argument (the tensor) matters."""
    return lambda n: ("call_function", target, (n.args[0],), {})


def _pick(target: Any, order: tuple[int | None, ...], names: tuple[str, ...] = ()) -> Lowering:
    """Positional arguments taken from the ATen positions ``order`` (None: the default);
    keywords of the ATen schema named ``names`` are read too."""

    def lower(n: fx.Node) -> tuple[str, Any, tuple, dict]:
        schema = _schema_args(n)
        args = [schema.get(i) for i in order]
        while args and args[-1] is None:
            args.pop()
        return "call_function", target, tuple(args), {}

    return lower


def _schema_args(n: fx.Node) -> dict[int, Any]:
    """Positional index -> value of every argument of an ATen node (keywords placed by the
    schema)."""
    out = dict(enumerate(n.args))
    schema = getattr(n.target, "_schema", None)
    if schema is not None:
        for i, a in enumerate(schema.arguments):
            if a.name in n.kwargs:
                out[i] = n.kwargs[a.name]
    return out


def _dim_index(n: fx.Node, dim: Any, item: Any) -> tuple:
    shp = meta_shape(n.args[0])
    nd = len(shp) if isinstance(shp, tuple) else None
    if isinstance(dim, int) and nd is not None:
        dim %= nd
    return (slice(None),) * dim + (item,)


def _slice(n: fx.Node) -> tuple[str, Any, tuple, dict]:
    a = _schema_args(n)
    dim, start, end, step = a.get(1, 0), a.get(2), a.get(3), a.get(4, 1)
    if isinstance(start, int) and start == 0:
        start = None
    if isinstance(end, int) and end >= _BIG:
        end = None
    if isinstance(step, int) and step == 1:
        step = None
    item = slice(start, end, step)
    return "call_function", operator.getitem, (n.args[0], _dim_index(n, dim, item)), {}


def _select(n: fx.Node) -> tuple[str, Any, tuple, dict]:
    a = _schema_args(n)
    return "call_function", operator.getitem, (n.args[0], _dim_index(n, a.get(1), a.get(2))), {}


def _narrow(n: fx.Node) -> tuple[str, Any, tuple, dict]:
    a = _schema_args(n)
    start, length = a.get(2), a.get(3)
    stop = start + length if isinstance(start, int) and isinstance(length, int) else None
    item = slice(start, stop) if stop is not None else slice(None)
    return "call_function", operator.getitem, (n.args[0], _dim_index(n, a.get(1), item)), {}


def _index(n: fx.Node) -> tuple[str, Any, tuple, dict]:
    idx = tuple(slice(None) if i is None else i for i in n.args[1])
    return "call_function", operator.getitem, (n.args[0], idx), {}


def _index_select(n: fx.Node) -> tuple[str, Any, tuple, dict]:
    a = _schema_args(n)
    return "call_function", operator.getitem, (n.args[0], _dim_index(n, a.get(1), a.get(2))), {}


def _convolution(n: fx.Node) -> tuple[str, Any, tuple, dict]:
    # aten.convolution(input, weight, bias, stride, padding, dilation, transposed,
    #                  output_padding, groups)
    a = _schema_args(n)
    w = meta_shape(a.get(1))
    nsp = len(w) - 2 if isinstance(w, tuple) else 2
    if a.get(6):
        fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[nsp]
        args = (a.get(0), a.get(1), a.get(2), a.get(3), a.get(4), a.get(7), a.get(8), a.get(5))
    else:
        fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nsp]
        args = (a.get(0), a.get(1), a.get(2), a.get(3), a.get(4), a.get(5), a.get(8))
    return "call_function", fn, args, {}


_COPIES = ("to", "_to_copy", "clone", "contiguous", "alias", "detach", "lift_fresh_copy")
_COPIES += ("type_as", "_to_dim_order_copy", "alias_copy", "detach_copy")
_RESHAPES = ("view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "flatten")
_RESHAPES += ("unflatten", "view_copy", "squeeze_copy", "unsqueeze_copy", "expand_copy")
_UNARY: dict[str, Any] = {
    "relu": torch.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "neg": torch.neg,
    "exp": torch.exp,
    "log": torch.log,
    "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt,
    "abs": torch.abs,
    "sin": torch.sin,
    "cos": torch.cos,
    "erf": torch.erf,
    "square": torch.square,
    "reciprocal": torch.reciprocal,
    "sign": torch.sign,
    "hardswish": F.hardswish,
    "hardsigmoid": F.hardsigmoid,
    "hardtanh": F.hardtanh,
    "leaky_relu": F.leaky_relu,
    "elu": F.elu,
    "selu": F.selu,
    "celu": F.celu,
    "softplus": F.softplus,
    "mish": F.mish,
    "relu6": F.relu6,
    "log_sigmoid": F.logsigmoid,
    "clamp": torch.clamp,
    "clamp_min": torch.clamp,
    "clamp_max": torch.clamp,
    "dropout": F.dropout,
    "feature_dropout": F.dropout,
    "alpha_dropout": F.dropout,
    "feature_alpha_dropout": F.dropout,
}
_ELEMENTWISE: dict[str, Any] = {
    "add": torch.add,
    "sub": torch.sub,
    "rsub": torch.sub,
    "mul": torch.mul,
    "div": torch.div,
    "pow": torch.pow,
    "where": torch.where,
    "maximum": torch.maximum,
    "minimum": torch.minimum,
    "lerp": torch.lerp,
    "addcmul": torch.addcmul,
    "masked_fill": torch.masked_fill,
    "eq": torch.eq,
    "ne": torch.ne,
    "gt": torch.gt,
    "lt": torch.lt,
    "ge": torch.ge,
    "le": torch.le,
    "logical_and": torch.logical_and,
    "logical_or": torch.logical_or,
    "bitwise_and": torch.logical_and,
    "bitwise_or": torch.logical_or,
    "__and__": torch.logical_and,
    "__or__": torch.logical_or,
}
_REDUCTIONS: dict[str, Any] = {
    "mean": torch.mean,
    "sum": torch.sum,
    "amax": torch.amax,
    "amin": torch.amin,
    "var": torch.var,
    "std": torch.std,
    "logsumexp": torch.logsumexp,
    "prod": torch.prod,
    "linalg_vector_norm": torch.norm,  # (x, ord, dim, keepdim): dims at position 2 too
}
_SPATIAL: dict[str, Any] = {
    "max_pool1d": F.max_pool1d,
    "max_pool2d": F.max_pool2d,
    "max_pool3d": F.max_pool3d,
    "avg_pool1d": F.avg_pool1d,
    "avg_pool2d": F.avg_pool2d,
    "avg_pool3d": F.avg_pool3d,
    "adaptive_avg_pool1d": F.adaptive_avg_pool1d,
    "adaptive_avg_pool2d": F.adaptive_avg_pool2d,
    "adaptive_avg_pool3d": F.adaptive_avg_pool3d,
    "_adaptive_avg_pool2d": F.adaptive_avg_pool2d,
    "_adaptive_avg_pool3d": F.adaptive_avg_pool3d,
    "upsample_nearest1d": F.interpolate,
    "upsample_nearest2d": F.interpolate,
    "upsample_nearest3d": F.interpolate,
    "upsample_bilinear2d": F.interpolate,
    "upsample_bicubic2d": F.interpolate,
    "upsample_linear1d": F.interpolate,
    "upsample_trilinear3d": F.interpolate,
    "_upsample_bicubic2d_aa": F.interpolate,
    "_upsample_bilinear2d_aa": F.interpolate,
    "_upsample_nearest_exact1d": F.interpolate,
    "_upsample_nearest_exact2d": F.interpolate,
    "_upsample_nearest_exact3d": F.interpolate,
}


def _table() -> dict[Any, Lowering]:
    t: dict[Any, Lowering] = {}

    def add(name: str, lowering: Lowering, inplace: bool = False) -> None:
        for n in (name, name + "_") if inplace else (name,):
            packet = getattr(aten, n, None)
            if packet is not None:
                t.setdefault(packet, lowering)

    for n in _COPIES:
        add(n, _first(same_values))
    for n in _RESHAPES:
        add(n, _to(torch.reshape))
    for n, fn in {**_UNARY, **_ELEMENTWISE}.items():  # in-place forms: the same values
        add(n, _to(fn), inplace=True)
    for n, fn in {**_REDUCTIONS, **_SPATIAL}.items():
        add(n, _to(fn))
    add("expand", _to("expand", "call_method"))
    add("repeat", _to("repeat", "call_method"))
    add("permute", _to(torch.permute))
    add("transpose", _to(torch.transpose))
    add("swapaxes", _to(torch.transpose))
    add("swapdims", _to(torch.transpose))
    add("t", _to(torch.t))
    add("slice", _slice)
    add("select", _select)
    add("narrow", _narrow)
    add("index", _index)
    add("index_select", _index_select)
    add("cat", _to(torch.cat))
    add("concat", _to(torch.cat))
    add("concatenate", _to(torch.cat))
    add("stack", _to(torch.stack))
    add("split", _to(torch.split))
    add("split_with_sizes", _to(torch.split))
    add("chunk", _to(torch.chunk))
    add("unbind", _to(torch.unbind))
    add("roll", _to(torch.roll))
    add("pad", _pick(F.pad, (0, 1)))
    add("constant_pad_nd", _pick(F.pad, (0, 1)))
    add("softmax", _first(F.softmax))
    add("_softmax", _first(F.softmax))
    add("log_softmax", _first(F.softmax))
    add("_log_softmax", _first(F.softmax))
    add("matmul", _to(torch.matmul))
    add("bmm", _to(torch.matmul))
    add("mm", _to(torch.matmul))
    add("addmm", _to(torch.addmm))
    add("linear", _to(F.linear))
    add("conv1d", _to(F.conv1d))
    add("conv2d", _to(F.conv2d))
    add("conv3d", _to(F.conv3d))
    add("conv_transpose1d", _to(F.conv_transpose1d))
    add("conv_transpose2d", _to(F.conv_transpose2d))
    add("conv_transpose3d", _to(F.conv_transpose3d))
    add("convolution", _convolution)
    add("prelu", _to(F.prelu))
    add("_prelu_kernel", _to(F.prelu))
    add("embedding", _pick(F.embedding, (1, 0)))
    add("layer_norm", _pick(F.layer_norm, (0, 1, 2, 3)))
    if hasattr(F, "rms_norm"):
        add("rms_norm", _pick(F.rms_norm, (0, 1, 2)))
    add("group_norm", _pick(F.group_norm, (0, 1, 2, 3)))
    add("batch_norm", _pick(F.batch_norm, (0, 3, 4, 1, 2)))
    add("instance_norm", _pick(F.instance_norm, (0, 3, 4, 1, 2)))
    add("scaled_dot_product_attention", _to(F.scaled_dot_product_attention))
    return t


_LOWER: dict[Any, Lowering] | None = None


def lower_aten(graph: fx.Graph) -> None:
    """Rewrite the ATen nodes of an exported ``graph`` in place (see the module docstring)."""
    global _LOWER
    if _LOWER is None:
        _LOWER = _table()
    for node in graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        packet = target.overloadpacket
        if target in _FUNCTIONS or packet in _FUNCTIONS:  # a rule for the ATen op itself
            continue
        lowering = _LOWER.get(packet)
        if lowering is None:
            continue
        node.meta["aten_target"] = target
        op, new_target, args, kwargs = lowering(node)
        node.op, node.target = op, new_target
        node.args, node.kwargs = args, kwargs


# ---------------------------------------------------------------------------- several outputs
def _first_of(rule: Callable[[Call], Any], *, order: tuple[int | None, ...]) -> Any:
    """A rule for an ATen op returning ``(out, stats...)``: ``rule`` on the arguments in
    ``order`` for ``out``, plain values for the statistics."""

    def several(call: Call) -> Any:
        shape = call.shape
        if not isinstance(shape, list) or not shape or not isinstance(shape[0], tuple):
            return call.unsupported("unexpected outputs")
        node = call.node
        schema = _schema_args(node)
        args = tuple(schema.get(i) for i in order)
        proxy = _Proxy(node, args, shape[0])
        sub = Call(proxy, None, shape[0], call.state, call.info)  # type: ignore[arg-type]
        first = rule(sub)
        return [first] + [Value(s) if isinstance(s, tuple) else None for s in shape[1:]]

    return several


class _Proxy:
    """A stand-in node with other arguments (for rules of multi-output ATen ops)."""

    op = "call_function"

    def __init__(self, node: fx.Node, args: tuple, shape: Any) -> None:
        self.name, self.target, self.args, self.kwargs = node.name, node.target, args, {}
        self.meta = node.meta
        self.users: dict = {}


register_function_rule(
    aten._native_batch_norm_legit_no_training,
    _first_of(batch_norm_fn, order=(0, 3, 4, 1, 2)),
)
register_function_rule(
    (aten._native_batch_norm_legit, aten.native_batch_norm),
    _first_of(batch_norm_fn, order=(0, 3, 4, 1, 2)),
)
register_function_rule(aten.native_layer_norm, _first_of(layer_norm_fn, order=(0, 1, 2, 3)))
register_function_rule(aten.native_group_norm, _first_of(group_norm_fn, order=(0, 6, 1, 2)))


def _pooled(call: Call) -> Any:
    """Pooling with indices: every dim after the channels is mixed."""
    x = call.x
    return keep_dims(call, x, range(2, x.ndim))


register_function_rule(
    (aten.max_pool2d_with_indices, aten.max_pool3d_with_indices, aten.adaptive_max_pool2d),
    _first_of(_pooled, order=(0,)),
)
register_function_rule(aten.native_dropout, _first_of(passthrough, order=(0,)))


def _no_output(call: Call) -> None:
    """Checks on metadata (``_assert_tensor_metadata``...): no value, nothing flows."""
    return None


register_function_rule(
    tuple(
        getattr(aten, n)
        for n in (
            "_assert_tensor_metadata",
            "_assert_scalar",
            "_assert_async",
            "_functional_assert_async",
            "sym_constrain_range",
            "sym_constrain_range_for_size",
        )
        if hasattr(aten, n)
    ),
    _no_output,
    checked_inputs=False,
)
register_function_rule(
    tuple(
        getattr(aten, n)
        for n in (
            "sym_size",
            "sym_numel",
            "sym_stride",
            "sym_storage_offset",
            "item",
            "_local_scalar_dense",
        )
        if hasattr(aten, n)
    ),
    size_query,
)
register_function_rule(
    tuple(
        getattr(aten, n)
        for n in (
            "new_zeros",
            "new_ones",
            "new_empty",
            "new_full",
            "zeros_like",
            "ones_like",
            "empty_like",
            "full_like",
            "rand_like",
            "randn_like",
        )
        if hasattr(aten, n)
    ),
    new_tensor,
)
