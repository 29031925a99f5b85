"""Shape-op rules: view / reshape / flatten (feature blocks, attention heads), permute /
transpose, cat / stack (segments), split / chunk (refined groups), getitem (indexing)."""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx

from pymerge.spec.tracing.call import Call
from pymerge.spec.tracing.primitives import unify
from pymerge.spec.tracing.registry import register_function_rule
from pymerge.spec.tracing.state import TraceState
from pymerge.spec.tracing.values import Piece, Pieces, Value, meta_shape

__all__ = ["reshape"]

_RESHAPE_METHODS = (
    "view",
    "reshape",
    "flatten",
    "unflatten",
    "squeeze",
    "unsqueeze",
    "view_as",
    "reshape_as",
)
_RESHAPE_FUNCTIONS = (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.unflatten)


# ---------------------------------------------------------------------------- reshape
@register_function_rule((*_RESHAPE_FUNCTIONS, *_RESHAPE_METHODS))
def reshape_rule(call: Call) -> Any:
    """``view`` / ``reshape`` / ``flatten`` / ``squeeze`` ...: see :func:`reshape`."""
    return reshape(call, call.x)


def reshape(call: Call, x: Any) -> Any:
    """Reshape ``x`` to the output shape: a feature dim merged with trailing dims keeps its
    group with an ``inner`` block size (conv channels flattened into a Linear's input), one
    split as ``[H, D]`` gives head structure, ``[H, D]`` merged back rejoins; anything that
    splits or interleaves a feature axis otherwise freezes."""
    shape = call.shape
    if not isinstance(x, Value) or not isinstance(shape, tuple):
        return call.output()
    out = Value(shape)
    prefix_out = [math.prod(shape[:j]) for j in range(len(shape))]
    done: set[int] = set()
    for d, pieces in sorted(x.tags.items()):
        if d in done:
            continue
        p_in = math.prod(x.shape[:d])
        if any(p.role != "full" for p in pieces):
            if not _merge_heads(x, d, pieces, shape, prefix_out, p_in, out, call.state):
                call.freeze(
                    Value(x.shape, {d: pieces}), f"head-split features reshaped in {call.node.name}"
                )
                call.report("reshape of attention heads")
            done.add(d + 1)
            continue
        s_k = x.shape[d]
        if not _place_full(x, d, pieces, shape, prefix_out, p_in, out) and not _split_heads(
            pieces, s_k, shape, prefix_out, p_in, out, call.state
        ):
            call.freeze(Value(x.shape, {d: pieces}), f"reshaped in {call.node.name}")
            call.report("reshape that splits or interleaves a feature axis")
    out.params.extend(_reshape_params(x, shape, prefix_out))
    return out


def _rescaled(pieces: Pieces, s_k: int, o: int, rest: int) -> Pieces | None:
    """The pieces of a dim of size ``s_k`` landing on an output dim of size ``o`` (merged
    with trailing dims, or cut from a merged dim), or None."""
    if o % s_k == 0 and rest % (o // s_k) == 0:
        return tuple(p.scaled(o // s_k) for p in pieces)
    if s_k % o == 0:
        q = s_k // o
        if all(p.start % q == 0 and p.inner % q == 0 for p in pieces):
            return tuple(Piece(p.elem, p.start // q, p.n, p.inner // q) for p in pieces)
    return None


def _place_full(
    x: Value,
    d: int,
    pieces: Pieces,
    shape: tuple[int, ...],
    prefix_out: list[int],
    p_in: int,
    out: Value,
) -> bool:
    """Put dim ``d``'s pieces on the output dim starting at the same flat offset."""
    s_k, rest = x.shape[d], math.prod(x.shape[d + 1 :])
    for j in range(len(shape)):
        if prefix_out[j] != p_in or shape[j] == 1:
            continue
        new = _rescaled(pieces, s_k, shape[j], rest)
        if new is None:
            continue
        if j in out.tags:
            return False
        out.tags[j] = new
        return True
    return False


def _reshape_params(x: Value, shape: tuple[int, ...], prefix_out: list[int]) -> list:
    """Parameter views follow the dims kept whole (same flat offset and size)."""
    res = []
    for key, mp in x.params:
        nm: dict[int, int | None] = {}
        for d, ax in mp.items():
            p_in = math.prod(x.shape[:d])
            for j in range(len(shape)):
                if prefix_out[j] == p_in and shape[j] == x.shape[d] and shape[j] != 1:
                    nm[j] = ax
                    break
        res.append((key, nm))
    return res


def _split_heads(
    pieces: Pieces,
    s_k: int,
    shape: tuple[int, ...],
    prefix_out: list[int],
    p_in: int,
    out: Value,
    st: TraceState,
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
            out.tags[j] = (Piece(e, 0, h, 1, "head", dh),)
            out.tags[j + 1] = (Piece(e, 0, dh, 1, "unit", h),)
            st.heads.append((h, dh, [e], ""))
            return True
    return False


def _merge_heads(
    x: Value,
    d: int,
    pieces: Pieces,
    shape: tuple[int, ...],
    prefix_out: list[int],
    p_in: int,
    out: Value,
    st: TraceState,
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
            out.tags[j] = (Piece(up.elem, 0, hp.n * up.n),)
            return True
    return False


# ---------------------------------------------------------------------------- permute
def _order(target: Any, rest: list, ndim: int) -> list[int]:
    """Source dim of each output dim for permute / transpose / t."""
    if target in ("permute", torch.permute):
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        return [d % ndim for d in dims]
    order = list(range(ndim))
    if target in ("t", torch.t):
        return [1, 0] if ndim == 2 else order
    a, b = (int(r) % ndim for r in rest[:2])
    order[a], order[b] = order[b], order[a]
    return order


@register_function_rule(("permute", "transpose", "t", torch.permute, torch.transpose, torch.t))
def permute(call: Call) -> Any:
    """Groups and parameter views move with their dims."""
    x, shape = call.x, call.shape
    if not isinstance(x, Value) or not isinstance(shape, tuple):
        return call.output()
    order = _order(call.node.target, list(call.node.args[1:]), x.ndim)
    inv = {src: dst for dst, src in enumerate(order)}
    out = Value(shape, {inv[d]: p for d, p in x.tags.items()})
    for key, mp in x.params:
        out.params.append((key, {inv[d]: ax for d, ax in mp.items()}))
    return out


# ---------------------------------------------------------------------------- cat / stack
@register_function_rule((torch.cat, torch.concat, torch.stack), checked_inputs=False)
def cat(call: Call) -> Any:
    """Other dims behave as an elementwise op; along the cat dim the inputs' groups become
    consecutive segments (``stack``: a new plain dim)."""
    node, shape = call.node, call.shape
    if not node.args:
        return call.unsupported("unknown op on permuted features")
    tensors = node.args[0]
    if not isinstance(tensors, (list, tuple)) or not isinstance(shape, tuple):
        return call.unsupported("cat of a non-list")
    vals = [call.value(a) for a in tensors]
    if any(not isinstance(v, Value) for v in vals):
        return call.unsupported("cat of non-tensors")
    stack = node.target is torch.stack
    nd = vals[0].ndim
    dim = call.arg(1, "dim", 0) % (nd + 1 if stack else nd)
    out = Value(shape)
    for v in vals:
        if v.params:
            call.freeze(Value(v.shape, params=v.params), f"concatenated in {node.name}")
    _cat_other_dims(call, vals, dim, stack, out)
    if not stack:
        _cat_segments(call, vals, dim, out)
    return out


def _cat_other_dims(call: Call, vals: list[Value], dim: int, stack: bool, out: Value) -> None:
    for d in range(vals[0].ndim):
        if not stack and d == dim:
            continue
        tagged = [v.tags[d] for v in vals if d in v.tags]
        if tagged:
            pieces = unify(call, tagged)
            if len(tagged) < len(vals):
                call.freeze_pieces(
                    pieces, f"concatenated with unpermuted tensors in {call.node.name}"
                )
            out.tags[d + 1 if stack and d >= dim else d] = pieces


def _cat_segments(call: Call, vals: list[Value], dim: int, out: Value) -> None:
    off = 0
    cat_pieces: list[Piece] = []
    for v in vals:
        if dim in v.tags:
            if any(p.role != "full" for p in v.tags[dim]):
                call.freeze(
                    Value(v.shape, {dim: v.tags[dim]}), f"heads concatenated in {call.node.name}"
                )
            else:
                cat_pieces.extend(p.shifted(off) for p in v.tags[dim])
        off += v.shape[dim]
    if cat_pieces:
        out.tags[dim] = tuple(cat_pieces)


# ---------------------------------------------------------------------------- split / chunk
@register_function_rule((torch.split, torch.chunk, "split", "chunk"))
def split(call: Call) -> Any:
    """Along a feature dim the group is refined into one group per chunk (a whole group) or
    its pieces are distributed (each inside one chunk); other dims pass."""
    x, node, shape = call.x, call.node, call.shape
    if not isinstance(shape, list) or not all(isinstance(s, tuple) for s in shape):
        if x.active():
            call.report("split into non-tensors")
        call.freeze(x, f"split in {node.name}")
        return None
    dim = call.arg(2, "dim", 0)
    if not isinstance(dim, int):
        if x.active():
            call.report("split along a non-constant dim")
        call.freeze(x, f"split in {node.name}")
        return [Value(s) for s in shape]
    dim %= x.ndim
    sizes = [s[dim] for s in shape]
    outs = [Value(s, {d: p for d, p in x.tags.items() if d != dim}) for s in shape]
    for key, _ in x.params:
        call.state.poisoned.setdefault(key, f"split in {node.name}")
    pieces = x.tags.get(dim)
    if pieces is None or len(sizes) == 1:
        if pieces is not None:
            outs[0].tags[dim] = pieces
        return outs
    if not _refine_whole(call, x, dim, pieces, sizes, outs):
        _distribute(call, dim, pieces, sizes, outs)
    return outs


def _refine_whole(
    call: Call, x: Value, dim: int, pieces: Pieces, sizes: list[int], outs: list[Value]
) -> bool:
    p0 = pieces[0]
    whole = len(pieces) == 1 and p0.role == "full" and p0.start == 0 and p0.inner == 1
    if not whole or p0.n != x.shape[dim]:
        return False
    chunks = call.state.refine(p0.elem, sizes, call.node.name)
    if chunks is None:
        return False
    for o, c, k in zip(outs, chunks, sizes, strict=True):
        o.tags[dim] = (Piece(c, 0, k),)
    return True


def _distribute(call: Call, dim: int, pieces: Pieces, sizes: list[int], outs: list[Value]) -> None:
    """Pieces that each fall inside one chunk are distributed; anything else freezes."""
    offs = [sum(sizes[:i]) for i in range(len(sizes))]
    for p in pieces:
        lo, hi = p.start, p.start + p.n * p.inner
        for o, off, k in zip(outs, offs, sizes, strict=True):
            if off <= lo and hi <= off + k and p.role == "full":
                o.tags[dim] = (*o.tags.get(dim, ()), p.shifted(-off))
                break
        else:
            call.state.freeze(p.elem, f"split across features in {call.node.name}")


# ---------------------------------------------------------------------------- getitem
def _expand_index(idx: Any, ndim: int) -> list[Any]:
    """The index as one item per input dim (Ellipsis expanded, trailing full slices), plus
    the ``None`` s that insert dims."""
    items = idx if isinstance(idx, tuple) else (idx,)
    n_real = sum(1 for i in items if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for i in items:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (ndim - n_real))
        else:
            expanded.append(i)
    while sum(1 for i in expanded if i is not None) < ndim:
        expanded.append(slice(None))
    return expanded


def _is_scalar_index(i: Any) -> bool:
    return isinstance(i, int) or (isinstance(i, fx.Node) and not isinstance(meta_shape(i), tuple))


def _index_map(expanded: list[Any]) -> tuple[dict[int, int | None], set[int]] | None:
    """``(in dim -> out dim or None when removed, dims sliced)``; None for advanced indexing."""
    mapping: dict[int, int | None] = {}
    sliced: set[int] = set()
    d_in = d_out = 0
    for i in expanded:
        if i is None:
            d_out += 1
        elif isinstance(i, slice):
            if not (i.start is None and i.stop is None and i.step is None):
                sliced.add(d_in)
            mapping[d_in] = d_out
            d_in += 1
            d_out += 1
        elif _is_scalar_index(i):
            mapping[d_in] = None
            sliced.add(d_in)
            d_in += 1
        else:
            return None
    return mapping, sliced


@register_function_rule(operator.getitem, checked_inputs=False)
def getitem(call: Call) -> Any:
    """An item of a tuple output, or basic indexing of a tensor: groups on dims kept whole
    move to their output dims; a sliced or indexed feature dim freezes."""
    x, node, shape = call.x, call.node, call.shape
    idx = node.args[1]
    if isinstance(x, list):
        return x[idx] if isinstance(idx, int) and idx < len(x) else None
    if not isinstance(x, Value):
        return call.output()
    if not isinstance(shape, tuple):
        if x.active():
            call.report("indexing to a non-tensor")
        return None
    m = _index_map(_expand_index(idx, x.ndim))
    if m is None:
        if x.active():
            call.report("advanced indexing")
        return call.output()
    mapping, sliced = m
    out = Value(shape)
    for d, p in x.tags.items():
        if d in sliced or mapping.get(d) is None:
            call.freeze(Value(x.shape, {d: p}), f"indexed in {node.name}")
            call.report("indexing along a feature axis")
        else:
            out.tags[mapping[d]] = p
    for key, mp in x.params:
        nm = {
            mapping[d]: (None if d in sliced else ax)
            for d, ax in mp.items()
            if mapping.get(d) is not None
        }
        out.params.append((key, nm))
    return out
