"""Per-node rules of the spec tracer: how each op moves, joins or freezes feature groups.

A tensor node carries *tags*: for each dimension holding permutable features, the pieces of
union-find elements (feature groups) laid out along it (``start``, size ``n``, ``inner`` block).
See :mod:`pymerge.spec.trace` for the overview.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from pymerge.spec.spec import AxisRef

__all__ = ["DEFAULT_LEAF_MODULES"]


@dataclass(frozen=True)
class _Piece:
    """``n`` features of element ``elem`` at ``start + c*inner + j`` along one dimension.

    ``role`` is ``"full"`` for ordinary features; a dimension split into attention heads
    carries a ``"head"`` piece (``n`` = number of heads, ``hd`` = head size) and a ``"unit"``
    piece (``n`` = head size, ``hd`` = number of heads) of the same element."""

    elem: int
    start: int
    n: int
    inner: int = 1
    role: str = "full"
    hd: int = 1

    def scaled(self, m: int) -> _Piece:
        return _Piece(self.elem, self.start * m, self.n, self.inner * m)

    def shifted(self, off: int) -> _Piece:
        return _Piece(self.elem, self.start + off, self.n, self.inner)


Pieces = tuple[_Piece, ...]


@dataclass
class _Val:
    """What a tensor node carries: tagged dims and parameter views."""

    shape: tuple[int, ...]
    tags: dict[int, Pieces] = field(default_factory=dict)
    # (state key, node dim -> param axis or None when the dim was sliced)
    params: list[tuple[str, dict[int, int | None]]] = field(default_factory=list)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def active(self) -> bool:
        return bool(self.tags or self.params)


_ACT_MODULES = (
    nn.ReLU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.ReLU6,
    nn.Softplus,
    nn.CELU,
    nn.SELU,
    nn.Hardtanh,
    nn.Softsign,
    nn.Tanhshrink,
    nn.LogSigmoid,
    nn.Softshrink,
    nn.Hardshrink,
)
_PASS_MODULES = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    *_ACT_MODULES,
)
_POOL_MODULES = {
    nn.MaxPool1d: 1,
    nn.MaxPool2d: 2,
    nn.MaxPool3d: 3,
    nn.AvgPool1d: 1,
    nn.AvgPool2d: 2,
    nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1,
    nn.AdaptiveAvgPool2d: 2,
    nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2,
    nn.AdaptiveMaxPool3d: 3,
    nn.LPPool1d: 1,
    nn.LPPool2d: 2,
}
_NORM_CH = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

#: modules the tracer treats as leaves (it has a rule for each)
DEFAULT_LEAF_MODULES: tuple[type, ...] = (
    nn.Linear,
    *_CONVS,
    *_CONVT,
    *_NORM_CH,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.Embedding,
    nn.MultiheadAttention,
    nn.Flatten,
    nn.Unflatten,
    nn.Softmax,
    nn.LogSoftmax,
    nn.PReLU,
    nn.Upsample,
    *_PASS_MODULES,
    *_POOL_MODULES,
)

_UNARY_FUNCS = {
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
    torch.nn.functional.hardtanh,
    torch.erf,
    torch.nn.functional.selu,
    torch.nn.functional.celu,
    F.logsigmoid,
}
_BINARY_FUNCS = {
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
}
_ELEMENTWISE_METHODS = {
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
}
_REDUCE_FUNCS = {
    torch.sum,
    torch.mean,
    torch.amax,
    torch.amin,
    torch.var,
    torch.std,
    torch.logsumexp,
    torch.prod,
    torch.norm,
}
_REDUCE_METHODS = {"sum", "mean", "amax", "amin", "var", "std", "logsumexp", "prod", "norm"}
# equivariant along any dim (softmax over features, p-normalisation of features)
_SOFTMAX_FUNCS = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, F.normalize}
_RESHAPE_METHODS = {
    "view",
    "reshape",
    "flatten",
    "unflatten",
    "squeeze",
    "unsqueeze",
    "view_as",
    "reshape_as",
}
_RESHAPE_FUNCS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.unflatten}
_POOL_FUNCS = {
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


class _State:
    """Union-find over feature elements plus the references collected for each."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.names: list[str] = []
        self.refs: list[list[AxisRef]] = []
        self.frozen: dict[int, str] = {}
        self.heads: list[tuple[int, int, list[int], str]] = []  # (H, d, elems, name)
        self.poisoned: dict[str, str] = {}
        self.report: list[str] = []
        self.no_cost: set[str] = set()
        self.refined: dict[int, list[tuple[int, int, int]]] = {}
        self._name_count: dict[str, int] = {}

    def new(self, n: int, name: str) -> int:
        k = self._name_count.get(name, 0)
        self._name_count[name] = k + 1
        self.parent.append(len(self.parent))
        self.size.append(n)
        self.names.append(name if k == 0 else f"{name}@{k}")
        self.refs.append([])
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            self.freeze(ra, f"size mismatch with {self.names[rb]!r}")
            self.freeze(rb, f"size mismatch with {self.names[ra]!r}")
        if rb < ra:
            ra, rb = rb, ra
        self.parent[rb] = ra

    def freeze(self, e: int, reason: str) -> None:
        self.frozen.setdefault(e, reason)

    def join(self, pieces: Pieces, key: str, axis: int) -> None:
        for p in pieces:
            if p.role != "full":
                self.freeze(p.elem, f"head-split features used by {key!r}")
                continue
            self.refs[p.elem].append(AxisRef(key, axis, p.start, p.start + p.n * p.inner, p.inner))

    def link_heads(self, a: int, b: int, num_heads: int, head_dim: int, name: str) -> None:
        """Elements ``a`` and ``b`` must move their heads together."""
        self.heads.append((num_heads, head_dim, [a, b], name))

    def linked(self, a: int, b: int) -> bool:
        """Whether elements ``a`` and ``b`` share a head permutation (same group or linked)."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return True
        seen, todo = {ra}, [ra]
        while todo:
            r = todo.pop()
            for _, _, els, _ in self.heads:
                roots = {self.find(x) for x in els}
                if r in roots:
                    for x in roots - seen:
                        if x == rb:
                            return True
                        seen.add(x)
                        todo.append(x)
        return False

    def refine(self, e: int, sizes: list[int], reason_name: str) -> list[int] | None:
        """Split element ``e`` (and every element unioned with it) into consecutive chunks of
        ``sizes``; their references become segment references. Returns the chunk elements of
        ``e`` or None (refused: the group has a head structure)."""
        root = self.find(e)
        if any(self.find(x) == root for _, _, els, _ in self.heads for x in els):
            return None
        members = [x for x in range(len(self.parent)) if self.find(x) == root]
        chunks: dict[int, list[int]] = {}
        if sum(sizes) != self.size[e]:
            return None
        for m in members:
            new = [self.new(k, f"{self.names[m]}[{i}]") for i, k in enumerate(sizes)]
            if m in self.frozen:
                for x in new:
                    self.freeze(x, self.frozen[m])
            offs = [sum(sizes[:i]) for i in range(len(sizes))]
            for r in self.refs[m]:
                for x, off, k in zip(new, offs, sizes, strict=True):
                    self.refs[x].append(
                        AxisRef(
                            r.param,
                            r.axis,
                            r.start + off * r.inner,
                            r.start + (off + k) * r.inner,
                            r.inner,
                        )
                    )
            self.refs[m] = []
            self.refined[m] = list(zip(new, offs, sizes, strict=True))
            chunks[m] = new
        for m in members:
            for a, b in zip(chunks[e], chunks[m], strict=True):
                self.union(a, b)
        return chunks[e]

    def resolve(self, pieces: Pieces) -> Pieces:
        """Pieces with refined (split) elements replaced by their chunks."""
        if not self.refined or not any(p.elem in self.refined for p in pieces):
            return pieces
        out: list[_Piece] = []
        stack = list(reversed(pieces))
        while stack:
            p = stack.pop()
            if p.elem in self.refined and p.role == "full":
                stack.extend(
                    reversed(
                        [
                            _Piece(x, p.start + off * p.inner, k, p.inner)
                            for x, off, k in self.refined[p.elem]
                        ]
                    )
                )
            elif p.elem in self.refined:  # a split of a head-split element: cannot happen
                self.freeze(p.elem, "split after head split")
                out.append(p)
            else:
                out.append(p)
        return tuple(out)

    def resolve_val(self, v: Any) -> Any:
        if isinstance(v, _Val) and self.refined and v.tags:
            return _Val(v.shape, {d: self.resolve(p) for d, p in v.tags.items()}, v.params)
        if isinstance(v, list):
            return [self.resolve_val(x) for x in v]
        return v

    def freeze_val(self, v: Any, reason: str) -> None:
        for x in _iter_vals(v):
            for pieces in x.tags.values():
                for p in pieces:
                    self.freeze(p.elem, reason)
            for key, _ in x.params:
                self.poisoned.setdefault(key, reason)


class _Info(dict):
    """node -> value, reading through element refinements (splits) recorded in ``st``."""

    def __init__(self, st: _State) -> None:
        super().__init__()
        self.st = st

    def get(self, key: Any, default: Any = None) -> Any:
        return self.st.resolve_val(dict.get(self, key, default))


def _iter_vals(v: Any) -> Iterable[_Val]:
    stack = [v]
    while stack:
        x = stack.pop()
        if isinstance(x, _Val):
            yield x
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif isinstance(x, dict):
            stack.extend(x.values())


def _meta_shape(node: Any) -> Any:
    """Shape tuple (tensor), list of shapes (tuple output) or None."""
    if not isinstance(node, fx.Node):
        return None
    tm = node.meta.get("tensor_meta")
    if tm is None:
        return None

    def conv(t: Any) -> Any:
        if hasattr(t, "shape") and hasattr(t, "dtype"):
            return tuple(int(s) for s in t.shape)
        if isinstance(t, (list, tuple)):
            return [conv(u) for u in t]
        return None

    return conv(tm)


def _prod(xs: Iterable[int]) -> int:
    return math.prod(xs)


# ---------------------------------------------------------------------------- node rules
def _arg_val(a: Any, info: Mapping[fx.Node, Any]) -> Any:
    return info.get(a) if isinstance(a, fx.Node) else None


def _process(node: fx.Node, info: dict, st: _State, modules: dict, state: dict) -> Any:
    shape = _meta_shape(node)
    if node.op == "placeholder":
        return _Val(shape) if isinstance(shape, tuple) else None
    if node.op == "get_attr":
        if not isinstance(shape, tuple):
            return None
        if node.target in state:
            return _Val(shape, params=[(node.target, {d: d for d in range(len(shape))})])
        return _Val(shape)
    if node.op == "output":
        st.freeze_val(_flat_node_vals(node.args, info), "reaches the model output")
        return None
    if node.op == "call_module":
        mod = modules[node.target]
        return _module_rule(node, mod, info, st, shape)
    if node.op in ("call_function", "call_method"):
        return _function_rule(node, info, st, shape)
    return None


def _flat_node_vals(args: Any, info: Mapping[fx.Node, Any]) -> list[Any]:
    out: list[Any] = []
    fx.node.map_arg(args, lambda n: out.append(info.get(n)) or n)
    return out


def _unsupported(node: fx.Node, info: Mapping[fx.Node, Any], st: _State, why: str) -> None:
    vals = [v for v in _iter_vals(_flat_node_vals((node.args, node.kwargs), info))]
    if any(v.active() for v in vals):
        _report(node, st, why)
        st.freeze_val(vals, f"flows into {node.name}")


def _report(node: fx.Node, st: _State, why: str) -> None:
    target = (
        node.target
        if isinstance(node.target, str)
        else getattr(node.target, "__name__", str(node.target))
    )
    st.report.append(f"unsupported op {node.name} ({node.op} {target}): {why}")


def _out_val(shape: Any) -> _Val | None:
    return _Val(shape) if isinstance(shape, tuple) else None


def _broadcast(node: fx.Node, vals: list[Any], st: _State, shape: Any) -> _Val | None:
    """Elementwise op with broadcasting over ``vals`` (None = scalar/constant)."""
    if not isinstance(shape, tuple):
        if any(isinstance(v, _Val) and v.active() for v in vals):
            _report(node, st, "no tensor output")
        for v in vals:
            if isinstance(v, _Val):
                st.freeze_val(v, f"flows into {node.name}")
        return None
    out = _Val(shape)
    nd = len(shape)
    tensors = [v for v in vals if isinstance(v, _Val)]
    any_tag = False
    mixed: set[int] = set()
    for d in range(nd):
        tagged: list[Pieces] = []
        params: list[tuple[str, int | None]] = []
        plain = False
        for v in tensors:
            dd = d - (nd - v.ndim)
            if dd < 0:
                continue
            if v.shape[dd] == 1 and shape[d] != 1:
                if dd in v.tags:
                    st.freeze_val(_Val(v.shape, {dd: v.tags[dd]}), f"broadcast in {node.name}")
                continue
            if dd in v.tags:
                tagged.append(v.tags[dd])
            elif v.params:
                for key, mp in v.params:
                    params.append((key, mp.get(dd)))
            else:
                plain = True
        if plain and not tagged:  # params mixed with an unpermuted tensor on this dim: the
            mixed.add(d)  # result may not be permuted along it later
        if tagged:
            any_tag = True
            pieces = _unify(tagged, st, node)
            out.tags[d] = pieces
            if plain or any(ax is None for _, ax in params):
                for p in pieces:
                    st.freeze(p.elem, f"meets an unpermuted tensor in {node.name}")
            for key, ax in params:
                if ax is not None:
                    st.join(pieces, key, ax)
    if not any_tag:
        for v in tensors:
            off = nd - v.ndim
            for key, mp in v.params:
                out.params.append(
                    (key, {d + off: (None if d + off in mixed else ax) for d, ax in mp.items()})
                )
    return out


def _unify(tagged: list[Pieces], st: _State, node: fx.Node) -> Pieces:
    first = tagged[0]
    for other in tagged[1:]:
        same = len(other) == len(first) and all(
            (a.start, a.n, a.inner, a.role, a.hd) == (b.start, b.n, b.inner, b.role, b.hd)
            for a, b in zip(first, other, strict=True)
        )
        if same:
            for a, b in zip(first, other, strict=True):
                if a.role == "head":  # same head permutation, own units
                    st.link_heads(a.elem, b.elem, a.n, a.hd, "")
                else:
                    st.union(a.elem, b.elem)
        else:
            for p in (*first, *other):
                st.freeze(p.elem, f"incompatible feature layouts meet in {node.name}")
    return first


def _passthrough(v: Any, shape: Any) -> _Val | None:
    if not isinstance(v, _Val) or not isinstance(shape, tuple) or tuple(shape) != v.shape:
        return _out_val(shape) if v is None else None
    return _Val(v.shape, dict(v.tags), list(v.params))


def _keep_dims(
    node: fx.Node, v: _Val, st: _State, shape: tuple[int, ...], mixed: Iterable[int]
) -> _Val:
    """Output with the same dims as ``v`` where ``mixed`` dims are transformed (spatial)."""
    out = _Val(shape)
    mixed = set(mixed)
    for d, pieces in v.tags.items():
        if d in mixed or shape[d] != v.shape[d]:
            st.freeze_val(_Val(v.shape, {d: pieces}), f"spatially mixed in {node.name}")
        else:
            out.tags[d] = pieces
    if v.params:
        st.freeze_val(_Val(v.shape, params=v.params), f"used in {node.name}")
    return out


def _module_rule(node: fx.Node, mod: nn.Module, info: dict, st: _State, shape: Any) -> Any:
    name = node.target
    x = _arg_val(node.args[0], info) if node.args else None

    def key(p: str) -> str:
        return f"{name}.{p}"

    if isinstance(mod, nn.MultiheadAttention):
        return _mha_rule(node, mod, info, st, shape)
    if not isinstance(x, _Val) or not isinstance(shape, tuple):
        if any(v.active() for v in _iter_vals(_flat_node_vals((node.args, node.kwargs), info))):
            _unsupported(node, info, st, f"unexpected inputs to {type(mod).__name__}")
        return _out_val(shape)
    if len(node.args) + len(node.kwargs) > 1 and any(
        v.active() for v in _iter_vals(_flat_node_vals((node.args[1:], node.kwargs), info))
    ):
        _unsupported(node, info, st, f"extra inputs to {type(mod).__name__}")
        return _out_val(shape)
    if x.params:
        st.freeze_val(_Val(x.shape, params=x.params), f"parameter used as input to {name}")
        x = _Val(x.shape, dict(x.tags))
    if isinstance(mod, nn.Linear):
        last = x.ndim - 1
        if last in x.tags:
            st.join(x.tags[last], key("weight"), 1)
        out = _Val(shape, {d: p for d, p in x.tags.items() if d != last})
        e = st.new(mod.out_features, name)
        st.refs[e].append(AxisRef(key("weight"), 0))
        if mod.bias is not None:
            st.refs[e].append(AxisRef(key("bias"), 0))
        out.tags[len(shape) - 1] = (_Piece(e, 0, mod.out_features),)
        return out
    if isinstance(mod, (*_CONVS, *_CONVT)):
        nsp = {
            nn.Conv1d: 1,
            nn.Conv2d: 2,
            nn.Conv3d: 3,
            nn.ConvTranspose1d: 1,
            nn.ConvTranspose2d: 2,
            nn.ConvTranspose3d: 3,
        }[type(mod)]
        ch = x.ndim - nsp - 1
        transposed = isinstance(mod, _CONVT)
        in_ax, out_ax = (0, 1) if transposed else (1, 0)
        out = _keep_dims(
            node,
            _Val(x.shape, {d: p for d, p in x.tags.items() if d != ch}),
            st,
            shape,
            range(ch + 1, x.ndim),
        )
        depthwise = not transposed and mod.groups == mod.in_channels == mod.out_channels
        if mod.groups != 1 and not depthwise:
            if ch in x.tags:
                st.freeze_val(_Val(x.shape, {ch: x.tags[ch]}), f"grouped conv {name}")
                _report(node, st, "grouped convolution")
            return out
        if depthwise:
            if ch in x.tags:
                st.join(x.tags[ch], key("weight"), 0)
                if mod.bias is not None:
                    st.join(x.tags[ch], key("bias"), 0)
                out.tags[ch] = x.tags[ch]
            return out
        if ch in x.tags:
            st.join(x.tags[ch], key("weight"), in_ax)
        e = st.new(mod.out_channels, name)
        st.refs[e].append(AxisRef(key("weight"), out_ax))
        if mod.bias is not None:
            st.refs[e].append(AxisRef(key("bias"), 0))
        out.tags[ch] = (_Piece(e, 0, mod.out_channels),)
        return out
    if isinstance(mod, _NORM_CH):
        ch = 1 if x.ndim > 1 else 0
        if isinstance(mod, (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)):
            ch = (
                0
                if x.ndim
                == {nn.InstanceNorm1d: 2, nn.InstanceNorm2d: 3, nn.InstanceNorm3d: 4}[type(mod)]
                else 1
            )
        for p in ("running_mean", "running_var", "num_batches_tracked"):
            if getattr(mod, p, None) is not None:
                st.no_cost.add(key(p))
        if ch in x.tags:
            for p in ("weight", "bias", "running_mean", "running_var"):
                if getattr(mod, p, None) is not None:
                    st.join(x.tags[ch], key(p), 0)
        return _passthrough(x, shape)
    if isinstance(mod, nn.LayerNorm):
        k = len(mod.normalized_shape)
        for d, pieces in x.tags.items():
            if d >= x.ndim - k and mod.elementwise_affine:
                ax = d - (x.ndim - k)
                st.join(pieces, key("weight"), ax)
                if mod.bias is not None:
                    st.join(pieces, key("bias"), ax)
        return _passthrough(x, shape)
    if isinstance(mod, nn.GroupNorm):
        ch = 1
        for d, pieces in x.tags.items():
            if d != ch:
                st.freeze_val(_Val(x.shape, {d: pieces}), f"normalised in {name}")
        if ch in x.tags:
            pieces = x.tags[ch]
            g, c = mod.num_groups, mod.num_channels
            if 1 < g < c:
                if len(pieces) == 1 and pieces[0].inner == 1 and pieces[0].n == c:
                    st.heads.append((g, c // g, [pieces[0].elem], f"{name}"))
                else:
                    st.freeze_val(
                        _Val(x.shape, {ch: pieces}), f"GroupNorm {name} on a segmented feature axis"
                    )
            if mod.affine:
                st.join(pieces, key("weight"), 0)
                st.join(pieces, key("bias"), 0)
        return _passthrough(x, shape)
    if isinstance(mod, nn.PReLU):
        if mod.num_parameters > 1 and 1 in x.tags:
            st.join(x.tags[1], key("weight"), 0)
        return _passthrough(x, shape)
    if isinstance(mod, nn.Embedding):
        if x.tags:
            st.freeze_val(x, f"used as indices in {name}")
        e = st.new(mod.embedding_dim, name)
        st.refs[e].append(AxisRef(key("weight"), 1))
        return _Val(shape, {len(shape) - 1: (_Piece(e, 0, mod.embedding_dim),)})
    if isinstance(mod, _PASS_MODULES):
        return _passthrough(x, shape)
    if isinstance(mod, (nn.Softmax, nn.LogSoftmax)):
        return _passthrough(x, shape)
    if isinstance(mod, tuple(_POOL_MODULES)):
        nsp = _POOL_MODULES[type(mod)]
        return _keep_dims(node, x, st, shape, range(x.ndim - nsp, x.ndim))
    if isinstance(mod, nn.Upsample):
        return _keep_dims(node, x, st, shape, range(2, x.ndim))
    if isinstance(mod, (nn.Flatten, nn.Unflatten)):
        return _reshape(node, x, st, shape)
    _unsupported(node, info, st, f"no rule for module type {type(mod).__name__}")
    return _out_val(shape)


def _mha_rule(node: fx.Node, mod: nn.MultiheadAttention, info: dict, st: _State, shape: Any) -> Any:
    name = node.target
    sig = ["query", "key", "value", "key_padding_mask", "need_weights", "attn_mask"]
    args = dict(zip(sig, node.args, strict=False))
    args.update(node.kwargs)
    q, k, v = (_arg_val(args.get(n), info) for n in ("query", "key", "value"))
    out_shapes = shape if isinstance(shape, list) else [shape]
    others = [_arg_val(a, info) for n, a in args.items() if n not in ("query", "key", "value")]
    if any(isinstance(o, _Val) and o.active() for o in others):
        _unsupported(node, info, st, "permuted tensor used as attention mask")
        return [_out_val(s) for s in out_shapes]
    E = mod.embed_dim
    H = mod.num_heads
    ins = [x for x in (q, k, v) if isinstance(x, _Val)]
    for x in ins:
        bad = {d: p for d, p in x.tags.items() if d != x.ndim - 1}
        if bad or x.params:
            st.freeze_val(_Val(x.shape, bad, x.params), f"non-feature dims into {name}")
    last = [x.tags.get(x.ndim - 1) for x in ins]

    def key(p: str) -> str:
        return f"{name}.{p}"

    if mod._qkv_same_embed_dim:
        tagged = [p for p in last if p is not None]
        if tagged:
            pieces = _unify(tagged, st, node)
            if len(tagged) < len(ins):
                for p in pieces:
                    st.freeze(p.elem, f"attention {name} mixes permuted and fixed inputs")
            st.join(pieces, key("in_proj_weight"), 1)
    else:
        for x, p in zip(ins, ("q_proj_weight", "k_proj_weight", "v_proj_weight"), strict=False):
            t = x.tags.get(x.ndim - 1)
            if t is not None:
                st.join(t, key(p), 1)
    qk = st.new(E, f"{name}.qk")
    vo = st.new(E, f"{name}.vo")
    if mod._qkv_same_embed_dim:
        st.refs[qk] += [
            AxisRef(key("in_proj_weight"), 0, 0, E),
            AxisRef(key("in_proj_weight"), 0, E, 2 * E),
        ]
        st.refs[vo].append(AxisRef(key("in_proj_weight"), 0, 2 * E, 3 * E))
    else:
        st.refs[qk] += [AxisRef(key("q_proj_weight"), 0), AxisRef(key("k_proj_weight"), 0)]
        st.refs[vo].append(AxisRef(key("v_proj_weight"), 0))
    if mod.in_proj_bias is not None:
        st.refs[qk] += [
            AxisRef(key("in_proj_bias"), 0, 0, E),
            AxisRef(key("in_proj_bias"), 0, E, 2 * E),
        ]
        st.refs[vo].append(AxisRef(key("in_proj_bias"), 0, 2 * E, 3 * E))
    if mod.bias_k is not None:
        st.refs[qk].append(AxisRef(key("bias_k"), 2))
        st.refs[vo].append(AxisRef(key("bias_v"), 2))
    st.refs[vo].append(AxisRef(key("out_proj.weight"), 1))
    st.heads.append((H, E // H, [qk, vo], name))
    o = st.new(E, f"{name}.out_proj")
    st.refs[o].append(AxisRef(key("out_proj.weight"), 0))
    if mod.out_proj.bias is not None:
        st.refs[o].append(AxisRef(key("out_proj.bias"), 0))
    res: list[Any] = []
    for i, s in enumerate(out_shapes):
        if not isinstance(s, tuple):
            res.append(None)
        elif i == 0:
            res.append(_Val(s, {len(s) - 1: (_Piece(o, 0, E),)}))
        else:
            res.append(_Val(s))
    return res if isinstance(shape, list) else res[0]


def _dims_arg(a: Any, ndim: int) -> list[int] | None:
    if a is None:
        return None
    if isinstance(a, int):
        a = [a]
    return [d % ndim for d in a]


def _function_rule(node: fx.Node, info: dict, st: _State, shape: Any) -> Any:
    t = node.target
    args = list(node.args)
    vals = [_arg_val(a, info) for a in args]
    x = vals[0] if vals else None
    is_m = node.op == "call_method"
    if t is operator.getitem:
        return _getitem(node, x, node.args[1], st, shape)
    if not isinstance(x, _Val) and not (t in (torch.cat, torch.stack, torch.concat) and args):
        # ops not on a tensor (shape arithmetic, ...) or constant-only expressions
        if any(v.active() for v in _iter_vals(_flat_node_vals((node.args, node.kwargs), info))):
            if (not is_m and t in _BINARY_FUNCS) or (is_m and t in _ELEMENTWISE_METHODS):
                return _broadcast(node, [_arg_val(a, info) for a in args], st, shape)
            _unsupported(node, info, st, "unknown op on permuted features")
        return _out_val(shape) if isinstance(shape, tuple) else None
    if is_m and t in ("size", "dim", "numel", "__len__") or t in (getattr, len):
        return None
    extra = [v for v in _iter_vals(_flat_node_vals((node.args[1:], node.kwargs), info))]
    if (
        (not is_m and t in _UNARY_FUNCS) or (is_m and t in _ELEMENTWISE_METHODS and len(args) == 1)
    ) and not extra:
        return _passthrough(x, shape) if _same(x, shape) else _broadcast(node, [x], st, shape)
    if not is_m and t in _UNARY_FUNCS:  # e.g. clamp(x, min=tensor): elementwise in all args
        return _broadcast(node, [x, *extra], st, shape)
    if (not is_m and t in _BINARY_FUNCS) or (is_m and t in _ELEMENTWISE_METHODS):
        tens = [_arg_val(a, info) for a in (*args, *node.kwargs.values())]
        return _broadcast(node, tens, st, shape)
    if (not is_m and t in _SOFTMAX_FUNCS) or (is_m and t in ("softmax", "log_softmax")):
        return _passthrough(x, shape)
    if (not is_m and t in _REDUCE_FUNCS) or (is_m and t in _REDUCE_METHODS):
        return _reduce(node, x, st, shape)
    if (not is_m and t in _RESHAPE_FUNCS) or (is_m and t in _RESHAPE_METHODS):
        return _reshape(node, x, st, shape)
    if (is_m and t in ("permute", "transpose", "t")) or t in (
        torch.permute,
        torch.transpose,
        torch.t,
    ):
        return _permute(node, x, st, shape)
    if t in (torch.cat, torch.concat, torch.stack):
        return _cat(node, info, st, shape)
    if t in (torch.matmul, operator.matmul, torch.bmm) or (is_m and t in ("matmul", "bmm")):
        return _matmul(node, x, vals[1] if len(vals) > 1 else None, st, shape)
    if t is F.linear:
        return _linear_fn(node, info, st, shape)
    if t is F.scaled_dot_product_attention:
        return _sdpa(node, info, st, shape)
    if t in (torch.split, torch.chunk) or (is_m and t in ("split", "chunk")):
        return _split(node, x, st, shape)
    if not is_m and t is F.pad and isinstance(shape, tuple):
        pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad", ())
        k = len(pad) // 2 if isinstance(pad, (list, tuple)) else x.ndim
        return _keep_dims(node, x, st, shape, range(x.ndim - k, x.ndim))
    if not is_m and t in _POOL_FUNCS:
        nsp = _POOL_FUNCS[t]
        if nsp == -1:
            nsp = x.ndim - 2
        return _keep_dims(node, x, st, shape, range(x.ndim - nsp, x.ndim))
    if is_m and t in ("expand", "expand_as", "repeat") and isinstance(shape, tuple):
        return _expand(node, x, st, shape)
    _unsupported(node, info, st, "unknown op on permuted features")
    return _out_val(shape) if isinstance(shape, tuple) else None


def _same(x: _Val, shape: Any) -> bool:
    return isinstance(shape, tuple) and tuple(shape) == x.shape


def _expand(node: fx.Node, x: _Val, st: _State, shape: tuple[int, ...]) -> _Val:
    off = len(shape) - x.ndim
    out = _Val(shape)
    for d, p in x.tags.items():
        if shape[d + off] == x.shape[d]:
            out.tags[d + off] = p
        else:
            st.freeze_val(_Val(x.shape, {d: p}), f"repeated in {node.name}")
    for key, mp in x.params:
        out.params.append(
            (key, {d + off: (ax if shape[d + off] == x.shape[d] else None) for d, ax in mp.items()})
        )
    return out


def _reduce(node: fx.Node, x: _Val, st: _State, shape: Any) -> Any:
    if not isinstance(shape, tuple):
        return None
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if node.target in ("norm", torch.norm):
        dims = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else None)
    if dims is not None and not isinstance(dims, (int, list, tuple)):
        _report(node, st, "reduction with non-constant dims")
        st.freeze_val(x, f"reduced in {node.name}")
        return _out_val(shape)
    red = set(range(x.ndim)) if dims is None else set(_dims_arg(dims, x.ndim) or [])
    keep = len(shape) == x.ndim
    out = _Val(shape)
    for d, p in x.tags.items():
        if d in red:
            if any(q.role == "head" for q in p):  # units would mix across heads
                st.freeze_val(_Val(x.shape, {d: p}), f"heads reduced in {node.name}")
            continue  # symmetric reduction over features: invariant
        nd = d if keep else d - sum(1 for r in red if r < d)
        out.tags[nd] = p
    if x.params:
        for key, mp in x.params:
            nm = {}
            for d, ax in mp.items():
                if d in red:
                    continue
                nm[d if keep else d - sum(1 for r in red if r < d)] = ax
            out.params.append((key, nm))
    return out


def _getitem(node: fx.Node, x: Any, idx: Any, st: _State, shape: Any) -> Any:
    if isinstance(x, list):
        return x[idx] if isinstance(idx, int) and idx < len(x) else None
    if not isinstance(x, _Val):
        return _out_val(shape) if isinstance(shape, tuple) else None
    if not isinstance(shape, tuple):
        if x.active():
            _report(node, st, "indexing to a non-tensor")
        return None
    items = idx if isinstance(idx, tuple) else (idx,)
    n_real = sum(1 for i in items if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for i in items:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (x.ndim - n_real))
        else:
            expanded.append(i)
    while sum(1 for i in expanded if i is not None) < x.ndim:
        expanded.append(slice(None))
    mapping: dict[int, int | None] = {}  # in dim -> out dim (None: removed)
    sliced: set[int] = set()
    d_in = d_out = 0
    for i in expanded:
        if i is None:
            d_out += 1
            continue
        if isinstance(i, slice):
            full = i.start is None and i.stop is None and i.step is None
            if not full:
                sliced.add(d_in)
            mapping[d_in] = d_out
            d_in += 1
            d_out += 1
        elif isinstance(i, (int, fx.Node)) and not (
            isinstance(i, fx.Node) and isinstance(_meta_shape(i), tuple)
        ):
            mapping[d_in] = None
            sliced.add(d_in)
            d_in += 1
        else:  # advanced indexing
            if x.active():
                _report(node, st, "advanced indexing")
            return _out_val(shape)
    out = _Val(shape)
    for d, p in x.tags.items():
        if d in sliced or mapping.get(d) is None:
            st.freeze_val(_Val(x.shape, {d: p}), f"indexed in {node.name}")
            _report(node, st, "indexing along a feature axis")
        else:
            out.tags[mapping[d]] = p
    for key, mp in x.params:
        nm: dict[int, int | None] = {}
        for d, ax in mp.items():
            if mapping.get(d) is not None:
                nm[mapping[d]] = None if d in sliced else ax
        out.params.append((key, nm))
    return out


def _reshape(node: fx.Node, x: Any, st: _State, shape: Any) -> Any:
    if not isinstance(x, _Val) or not isinstance(shape, tuple):
        return _out_val(shape) if isinstance(shape, tuple) else None
    ins = x.shape
    out = _Val(shape)
    prefix_out = [_prod(shape[:j]) for j in range(len(shape))]
    done: set[int] = set()
    for d, pieces in sorted(x.tags.items()):
        if d in done:
            continue
        p_in = _prod(ins[:d])
        if any(p.role != "full" for p in pieces):
            if not _merge_heads(x, d, pieces, shape, prefix_out, p_in, out, st):
                st.freeze_val(
                    _Val(ins, {d: pieces}), f"head-split features reshaped in {node.name}"
                )
                _report(node, st, "reshape of attention heads")
            done.add(d + 1)
            continue
        s_k = ins[d]
        rest = _prod(ins[d + 1 :])
        cands = [j for j in range(len(shape)) if prefix_out[j] == p_in and shape[j] != 1]
        ok = False
        for j in cands:
            o = shape[j]
            if o % s_k == 0 and rest % (o // s_k) == 0:
                m = o // s_k
                new = tuple(p.scaled(m) for p in pieces)
            elif s_k % o == 0:
                q = s_k // o
                if not all(p.start % q == 0 and p.inner % q == 0 for p in pieces):
                    continue
                new = tuple(_Piece(p.elem, p.start // q, p.n, p.inner // q) for p in pieces)
            else:
                continue
            if j in out.tags:
                break
            out.tags[j] = new
            ok = True
            break
        if not ok and not _split_heads(pieces, s_k, shape, prefix_out, p_in, out, st):
            st.freeze_val(_Val(ins, {d: pieces}), f"reshaped in {node.name}")
            _report(node, st, "reshape that splits or interleaves a feature axis")
    for key, mp in x.params:
        nm: dict[int, int | None] = {}
        for d, ax in mp.items():
            p_in = _prod(ins[:d])
            for j in range(len(shape)):
                if prefix_out[j] == p_in and shape[j] == ins[d] and shape[j] != 1:
                    nm[j] = ax
                    break
        out.params.append((key, nm))
    return out


def _batch_dims(node: fx.Node, xs: list[_Val], out_nd: int, st: _State, out: _Val) -> None:
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
            pieces = _unify(tagged, st, node)
            if plain:
                st.freeze_val(_Val((), {0: pieces}), f"meets an unpermuted tensor in {node.name}")
            out.tags[d] = pieces


def _contract(node: fx.Node, a: Pieces | None, b: Pieces | None, st: _State) -> None:
    """A summed-over dim: invariant when both sides carry the same group."""
    if a is None and b is None:
        return
    if a is None or b is None or any(p.role == "head" for p in (*a, *b)):
        for p in (*(a or ()), *(b or ())):
            st.freeze(p.elem, f"contracted with unpermuted features in {node.name}")
        return
    _unify([a, b], st, node)


def _matmul(node: fx.Node, a: Any, b: Any, st: _State, shape: Any) -> Any:
    """``[..., m, k] @ [..., k, n]``: k contracted, m and n carried, batch dims unified."""
    w = _weight_view(b)
    if w is not None and isinstance(a, _Val) and not a.params and isinstance(shape, tuple):
        key, (ax_in, ax_out) = w  # x @ W with a parameter W [k, n]: a Linear layer
        return _param_linear(node, a, key, ax_in, ax_out, None, st, shape)
    if (
        not isinstance(shape, tuple)
        or not isinstance(a, _Val)
        or not isinstance(b, _Val)
        or a.ndim < 2
        or b.ndim < 2
        or a.params
        or b.params
    ):
        if any(isinstance(v, _Val) and v.active() for v in (a, b)):
            _report(node, st, "matmul on features")
        for v in (a, b):
            if isinstance(v, _Val):
                st.freeze_val(v, f"flows into {node.name}")
        return _out_val(shape)
    out = _Val(shape)
    nd = len(shape)
    _batch_dims(node, [a, b], nd, st, out)
    _contract(node, a.tags.get(a.ndim - 1), b.tags.get(b.ndim - 2), st)
    if a.ndim - 2 in a.tags:
        out.tags[nd - 2] = a.tags[a.ndim - 2]
    if b.ndim - 1 in b.tags:
        out.tags[nd - 1] = b.tags[b.ndim - 1]
    return out


def _weight_view(v: Any) -> tuple[str, tuple[int, int]] | None:
    """``(key, (axis of dim -2, axis of dim -1))`` when ``v`` is exactly one whole 2-D
    parameter (possibly transposed), else None."""
    if not isinstance(v, _Val) or v.tags or len(v.params) != 1 or v.ndim != 2:
        return None
    key, mp = v.params[0]
    if mp.get(0) is None or mp.get(1) is None:
        return None
    return key, (mp[0], mp[1])


def _param_linear(
    node: fx.Node,
    x: _Val,
    key: str,
    ax_in: int,
    ax_out: int,
    bias: tuple[str, int] | None,
    st: _State,
    shape: tuple[int, ...],
) -> _Val:
    """``y = x W (+ b)`` with parameters: x's last dim joins W's ``ax_in``; the output's last
    dim is a new group on W's ``ax_out`` (and the bias)."""
    last = x.ndim - 1
    if last in x.tags:
        st.join(x.tags[last], key, ax_in)
    out = _Val(shape, {d: p for d, p in x.tags.items() if d != last})
    n = shape[-1]
    e = st.new(n, key.rsplit(".", 1)[0] if "." in key else key)
    st.refs[e].append(AxisRef(key, ax_out))
    if bias is not None:
        st.refs[e].append(AxisRef(*bias))
    out.tags[len(shape) - 1] = (_Piece(e, 0, n),)
    return out


def _linear_fn(node: fx.Node, info: Mapping[fx.Node, Any], st: _State, shape: Any) -> Any:
    """``F.linear(x, weight, bias)`` with parameter weight/bias."""
    names = ["input", "weight", "bias"]
    args = dict(zip(names, node.args, strict=False))
    args.update(node.kwargs)
    x, w, b = (_arg_val(args.get(n), info) for n in names)
    wv = _weight_view(w)
    bias = None
    if isinstance(b, _Val):
        if len(b.params) == 1 and not b.tags and b.ndim == 1 and b.params[0][1].get(0) is not None:
            bias = (b.params[0][0], b.params[0][1][0])
        else:
            wv = None
    if wv is None or not isinstance(x, _Val) or x.params or not isinstance(shape, tuple):
        _unsupported(node, info, st, "linear with non-parameter weights")
        return _out_val(shape)
    key, (ax_out, ax_in) = wv  # weight is [out, in]
    return _param_linear(node, x, key, ax_in, ax_out, bias, st, shape)


def _sdpa(node: fx.Node, info: Mapping[fx.Node, Any], st: _State, shape: Any) -> Any:
    """``scaled_dot_product_attention(q, k, v, attn_mask, ...)``: q/k contracted over their
    last dim, k/v over positions, heads (batch dims) unified, v's last dim carried."""
    names = ["query", "key", "value", "attn_mask"]
    args = dict(zip(names, node.args, strict=False))
    args.update(node.kwargs)
    q, k, v = (_arg_val(args.get(n), info) for n in names[:3])
    mask = _arg_val(args.get("attn_mask"), info)
    if isinstance(mask, _Val) and mask.active():
        st.freeze_val(mask, f"attention mask in {node.name}")
    if not all(
        isinstance(x, _Val) and x.ndim >= 2 and not x.params for x in (q, k, v)
    ) or not isinstance(shape, tuple):
        _unsupported(node, info, st, "attention on unexpected inputs")
        return _out_val(shape)
    out = _Val(shape)
    nd = len(shape)
    _batch_dims(node, [q, k, v], nd, st, out)
    _contract(node, q.tags.get(q.ndim - 1), k.tags.get(k.ndim - 1), st)
    _contract(node, k.tags.get(k.ndim - 2), v.tags.get(v.ndim - 2), st)
    if q.ndim - 2 in q.tags:
        out.tags[nd - 2] = q.tags[q.ndim - 2]
    if v.ndim - 1 in v.tags:
        out.tags[nd - 1] = v.tags[v.ndim - 1]
    return out


def _split(node: fx.Node, x: _Val, st: _State, shape: Any) -> Any:
    """``split`` / ``chunk``: along a feature dim the element is refined into chunks."""
    if not isinstance(shape, list) or not all(isinstance(s, tuple) for s in shape):
        if x.active():
            _report(node, st, "split into non-tensors")
        st.freeze_val(x, f"split in {node.name}")
        return None
    dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
    if not isinstance(dim, int):
        if x.active():
            _report(node, st, "split along a non-constant dim")
        st.freeze_val(x, f"split in {node.name}")
        return [_Val(s) for s in shape]
    dim %= x.ndim
    sizes = [s[dim] for s in shape]
    outs = [_Val(s, {d: p for d, p in x.tags.items() if d != dim}) for s in shape]
    for key, _ in x.params:
        st.poisoned.setdefault(key, f"split in {node.name}")
    pieces = x.tags.get(dim)
    if pieces is None or len(sizes) == 1:
        if pieces is not None:
            outs[0].tags[dim] = pieces
        return outs
    offs = [sum(sizes[:i]) for i in range(len(sizes))]
    p0 = pieces[0]
    if (
        len(pieces) == 1
        and p0.role == "full"
        and p0.start == 0
        and p0.inner == 1
        and p0.n == x.shape[dim]
    ):
        chunks = st.refine(p0.elem, sizes, node.name)
        if chunks is not None:
            for o, c, k in zip(outs, chunks, sizes, strict=True):
                o.tags[dim] = (_Piece(c, 0, k),)
            return outs
    # pieces that each fall inside one chunk are distributed; anything else freezes
    for p in pieces:
        lo, hi = p.start, p.start + p.n * p.inner
        for o, off, k in zip(outs, offs, sizes, strict=True):
            if off <= lo and hi <= off + k and p.role == "full":
                o.tags[dim] = (*o.tags.get(dim, ()), p.shifted(-off))
                break
        else:
            st.freeze(p.elem, f"split across features in {node.name}")
    return outs


def _split_heads(
    pieces: Pieces,
    s_k: int,
    shape: tuple[int, ...],
    prefix_out: list[int],
    p_in: int,
    out: _Val,
    st: _State,
) -> bool:
    """``[..., E] -> [..., H, D]`` on one whole element: a head piece and a unit piece."""
    if len(pieces) != 1 or pieces[0].start or pieces[0].inner != 1 or pieces[0].n != s_k:
        return False
    e = pieces[0].elem
    for j in range(len(shape) - 1):
        h, dh = shape[j], shape[j + 1]
        if prefix_out[j] == p_in and h * dh == s_k and h > 1 and dh > 1:
            if j in out.tags or j + 1 in out.tags:
                return False
            out.tags[j] = (_Piece(e, 0, h, 1, "head", dh),)
            out.tags[j + 1] = (_Piece(e, 0, dh, 1, "unit", h),)
            st.heads.append((h, dh, [e], ""))
            return True
    return False


def _merge_heads(
    x: _Val,
    d: int,
    pieces: Pieces,
    shape: tuple[int, ...],
    prefix_out: list[int],
    p_in: int,
    out: _Val,
    st: _State,
) -> bool:
    """``[..., H, D] -> [..., E]``: a head piece followed by a unit piece of a linked element."""
    nxt = x.tags.get(d + 1)
    if len(pieces) != 1 or nxt is None or len(nxt) != 1:
        return False
    hp, up = pieces[0], nxt[0]
    if hp.role != "head" or up.role != "unit" or (hp.n, hp.hd) != (up.hd, up.n):
        return False
    if not st.linked(hp.elem, up.elem):
        return False
    for j in range(len(shape)):
        if prefix_out[j] == p_in and shape[j] == hp.n * up.n and j not in out.tags:
            out.tags[j] = (_Piece(up.elem, 0, hp.n * up.n),)
            return True
    return False


def _permute(node: fx.Node, x: Any, st: _State, shape: Any) -> Any:
    if not isinstance(x, _Val) or not isinstance(shape, tuple):
        return _out_val(shape) if isinstance(shape, tuple) else None
    t = node.target
    rest = list(node.args[1:])
    if t in ("permute", torch.permute):
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        order = [d % x.ndim for d in dims]
    else:
        order = list(range(x.ndim))
        if t in ("t", torch.t):
            if x.ndim == 2:
                order = [1, 0]
        else:
            a, b = (int(r) % x.ndim for r in rest[:2])
            order[a], order[b] = order[b], order[a]
    inv = {src: dst for dst, src in enumerate(order)}
    out = _Val(shape, {inv[d]: p for d, p in x.tags.items()})
    for key, mp in x.params:
        out.params.append((key, {inv[d]: ax for d, ax in mp.items()}))
    return out


def _cat(node: fx.Node, info: dict, st: _State, shape: Any) -> Any:
    tensors = node.args[0]
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    if not isinstance(tensors, (list, tuple)) or not isinstance(shape, tuple):
        _unsupported(node, info, st, "cat of a non-list")
        return _out_val(shape) if isinstance(shape, tuple) else None
    vals = [_arg_val(a, info) for a in tensors]
    if any(not isinstance(v, _Val) for v in vals):
        _unsupported(node, info, st, "cat of non-tensors")
        return _out_val(shape)
    stack = node.target is torch.stack
    nd = vals[0].ndim
    dim = dim % (nd + 1 if stack else nd)
    out = _Val(shape)
    for v in vals:
        if v.params:
            st.freeze_val(_Val(v.shape, params=v.params), f"concatenated in {node.name}")
    # dims other than the cat dim behave like an elementwise op
    for d in range(nd):
        if not stack and d == dim:
            continue
        od = d + 1 if stack and d >= dim else d
        tagged = [v.tags[d] for v in vals if d in v.tags]
        if tagged:
            pieces = _unify(tagged, st, node)
            if len(tagged) < len(vals):
                for p in pieces:
                    st.freeze(p.elem, f"concatenated with unpermuted tensors in {node.name}")
            out.tags[od] = pieces
    if not stack:
        off = 0
        cat_pieces: list[_Piece] = []
        for v in vals:
            if dim in v.tags:
                if any(p.role != "full" for p in v.tags[dim]):
                    st.freeze_val(
                        _Val(v.shape, {dim: v.tags[dim]}), f"heads concatenated in {node.name}"
                    )
                else:
                    cat_pieces.extend(p.shifted(off) for p in v.tags[dim])
            off += v.shape[dim]
        if cat_pieces:
            out.tags[dim] = tuple(cat_pieces)
    return out
