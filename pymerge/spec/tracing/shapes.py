"""Shape-op rules: view / reshape / flatten (feature blocks, attention heads), permute /
transpose, cat / stack (segments), split / chunk (refined groups), getitem (indexing)."""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx

from pymerge.spec.tracing.call import Call
from pymerge.spec.tracing.primitives import keep_dims, unify
from pymerge.spec.tracing.registry import register_function_rule
from pymerge.spec.tracing.state import TraceState
from pymerge.spec.tracing.values import Piece, Pieces, Value, meta_dtype, meta_shape

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


#: most pieces one merged dim may carry (a tagged dim merged after a long untagged one)
_MAX_PIECES = 4096


def reshape(call: Call, x: Any) -> Any:
    """Reshape ``x`` to the output shape. The dims are matched in runs of equal size; within
    a run:

    - a tagged dim merged with untagged ones keeps its groups: trailing dims give an
      ``inner`` block size (conv channels flattened into a Linear's input), leading ones
      repeat the pieces (``[..., 4, C] -> [..., 4C]``, Swin's patch merging);
    - ``[..., H, D] -> [..., E]`` of linked head / unit pieces rejoins the heads; a head dim
      merged otherwise moves whole heads (a key/value head repeated for its query heads);
    - a tagged dim split into several: a whole group split as ``[H, D]`` gives head
      structure; a dim of blocks (``[..., 3E] -> [..., 3, H, D]``, fused qkv; ``[C] ->
      [g, C/g]``, channel shuffle) has its groups refined at the block boundaries and the
      blocks share one permutation (the block dim carries nothing);
    - anything else (two tagged dims merged, a piece straddling what cannot be split)
      freezes the groups involved."""
    shape = call.shape
    if not isinstance(x, Value) or not isinstance(shape, tuple):
        return call.output()
    out = Value(shape)
    runs = _runs(x.shape, shape)
    placed: set[int] = set()
    for ins, outs in runs or []:
        tags = {d: x.tags[d] for d in ins if d in x.tags}
        if not tags:
            continue
        placed.update(tags)
        if len(ins) == 1 and len(outs) == 1:
            out.tags[outs[0]] = tags[ins[0]]
            continue
        if len(outs) == 1:
            ok = _merge(call, x, ins, outs[0], out)
        elif len(ins) == 1:
            ok = _split(call, tags[ins[0]], outs, shape, out)
        else:
            ok = False
        if not ok:
            call.freeze(Value(x.shape, tags), f"reshaped in {call.node.name}")
            call.report("reshape that splits or interleaves a feature axis")
    for d, pieces in x.tags.items():  # dims of size 1 (a group of one feature: fixed anyway)
        if d not in placed:
            call.freeze(Value(x.shape, {d: pieces}), f"reshaped in {call.node.name}")
    out.params.extend(_reshape_params(call, x, shape))
    return out


def _runs(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Input and output dims in runs of equal products (size-1 dims left out)."""
    ia = [d for d, n in enumerate(a) if n != 1]
    ib = [d for d, n in enumerate(b) if n != 1]
    runs: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(ia) and j < len(ib):
        ins, outs = [ia[i]], [ib[j]]
        pa, pb = a[ia[i]], b[ib[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(ia):
                ins.append(ia[i])
                pa *= a[ia[i]]
                i += 1
            elif pb < pa and j < len(ib):
                outs.append(ib[j])
                pb *= b[ib[j]]
                j += 1
            else:
                return None
        runs.append((ins, outs))
    return runs if i == len(ia) and j == len(ib) else None


def _head_pair(st: TraceState, hp: Pieces | None, up: Pieces | None) -> Piece | None:
    """The whole piece of ``[..., H, D] -> [..., H*D]`` when ``hp`` / ``up`` are a head and a
    unit piece of linked elements, else None."""
    if hp is None or up is None or len(hp) != 1 or len(up) != 1:
        return None
    h, u = hp[0], up[0]
    if h.role != "head" or u.role != "unit" or (h.n, h.hd) != (u.hd, u.n) or h.inner != 1:
        return None
    return Piece(u.elem, 0, h.n * u.n) if st.linked(h.elem, u.elem) else None


def _merge(call: Call, x: Value, ins: list[int], o: int, out: Value) -> bool:
    st = call.state
    sizes = [x.shape[d] for d in ins]
    tags = [x.tags.get(d) for d in ins]
    for i in range(len(ins) - 1):
        whole = _head_pair(st, tags[i], tags[i + 1])
        if whole is not None:
            sizes[i : i + 2] = [sizes[i] * sizes[i + 1]]
            tags[i : i + 2] = [(whole,)]
            break
    for t in tags:  # other head dims merged: whole heads only
        if t is not None and any(p.role != "full" for p in t):
            st.to_heads(t, f"merged in {call.node.name}")
    tags = [(st.resolve(t) or None) if t is not None else None for t in tags]
    tagged = [i for i, t in enumerate(tags) if t]
    if not tagged:
        return True
    if len(tagged) > 1:
        return False
    i = tagged[0]
    lead, trail = math.prod(sizes[:i]), math.prod(sizes[i + 1 :])
    pieces = tags[i]
    if lead * len(pieces) > _MAX_PIECES:
        return False
    step = sizes[i] * trail
    out.tags[o] = tuple(
        Piece(p.elem, r * step + p.start * trail, p.n, p.inner * trail)
        for r in range(lead)
        for p in pieces
    )
    return True


def _split(call: Call, pieces: Pieces, outs: list[int], shape: tuple[int, ...], out: Value) -> bool:
    """Lay ``pieces`` (along a dim of size ``prod(shape[outs])``) out on the dims ``outs``."""
    st = call.state
    pieces = st.to_heads(pieces, f"split in {call.node.name}")
    if not pieces:
        return True
    if len(outs) == 1:
        out.tags[outs[0]] = pieces
        return True
    b1, block = shape[outs[0]], math.prod(shape[o] for o in outs[1:])
    if all(p.start % block == 0 and p.inner % block == 0 for p in pieces):  # [C*HW] -> [C, HW]
        out.tags[outs[0]] = tuple(
            Piece(p.elem, p.start // block, p.n, p.inner // block) for p in pieces
        )
        return True
    p0 = pieces[0]
    whole = len(pieces) == 1 and p0.start == 0 and p0.inner == 1 and p0.n == b1 * block
    if len(outs) == 2 and whole and not _selected_later(call.node, outs[0]):
        if p0.n == b1 * block:  # [E] -> [H, D]: heads
            out.tags[outs[0]] = (Piece(p0.elem, 0, b1, 1, "head", block),)
            out.tags[outs[1]] = (Piece(p0.elem, 0, block, 1, "unit", b1),)
            st.heads.append((b1, block, [p0.elem], ""))
            return True
    local = st.share_blocks(pieces, b1, block)
    if local is None:
        return False
    return _split(call, local, outs[1:], shape, out)


_MOVES = (torch.permute, torch.transpose, "permute", "transpose")
_KEEPS = ("contiguous", "clone", torch.clone)


def _selected_later(node: fx.Node, dim: int, depth: int = 8) -> bool:
    """Whether dim ``dim`` of ``node``'s output is later indexed by an integer or unbound
    (through permutes and copies): then ``[..., k, E/k]`` is ``k`` blocks (fused k/v,
    ``reshape(B, N, 2, C)``), not ``k`` attention heads."""
    todo = [(node, dim, 0)]
    while todo:
        n, d, k = todo.pop()
        if k > depth:
            continue
        for u in n.users:
            if u.args[:1] != (n,):
                continue
            if u.target in _MOVES:
                nd = len(meta_shape(u) or ())
                if nd:
                    order = _order(u.target, list(u.args[1:]), nd)
                    todo.append((u, order.index(d), k + 1))
            elif u.target in _KEEPS:
                todo.append((u, d, k + 1))
            elif u.target in (torch.unbind, "unbind"):
                ud = u.args[1] if len(u.args) > 1 else u.kwargs.get("dim", 0)
                nd = len(meta_shape(n) or ())
                if isinstance(ud, int) and nd and ud % nd == d:
                    return True
            elif u.target is operator.getitem and isinstance(meta_shape(n), tuple):
                items = _classify(u.args[1], len(meta_shape(n)))
                if items is not None and _consumes_int(items, d):
                    return True
    return False


def _consumes_int(items: list[tuple[str, Any, int]], dim: int) -> bool:
    d = 0
    for kind, _, k in items:
        if d <= dim < d + k:
            return kind == "int"
        d += k
    return False


def _reshape_params(call: Call, x: Value, shape: tuple[int, ...]) -> list:
    """Parameter views follow the dims kept whole (same flat offset and size); an axis
    merged or split away cannot be permuted any more (it is pinned)."""
    prefix_out = [math.prod(shape[:j]) for j in range(len(shape))]
    res = []
    for key, mp in x.params:
        nm: dict[int, int | None] = {}
        for d, ax in mp.items():
            p_in = math.prod(x.shape[:d])
            for j in range(len(shape)):
                if prefix_out[j] == p_in and shape[j] == x.shape[d] and shape[j] != 1:
                    nm[j] = ax
                    break
            else:
                if ax is not None and x.shape[d] > 1:
                    call.state.pin(key, ax, f"reshaped in {call.node.name}")
        res.append((key, nm))
    return res


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
    """Other dims behave as an elementwise op (a parameter met there joins the group: a
    class or register token concatenated with the patch stream along the sequence is
    permuted with the stream); along the cat dim the inputs' groups become consecutive
    segments (``stack``: a new plain dim)."""
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
    _cat_other_dims(call, vals, dim, stack, out)
    if not stack:
        _cat_segments(call, vals, dim, out)
    if not out.tags and all(v.params for v in vals):  # parameters concatenated: still a view
        for v in vals:
            for key, mp in v.params:
                nm = {(d + 1 if stack and d >= dim else d): ax for d, ax in mp.items()}
                if not stack:
                    if mp.get(dim) is not None and v.shape[dim] > 1:
                        call.state.pin(key, mp[dim], f"concatenated in {node.name}")
                    nm[dim] = None
                out.params.append((key, nm))
        return out
    for v in vals:  # parameter axes not joined to a group here must not move
        for key, mp in v.params:
            for d, ax in mp.items():
                od = d + 1 if stack and d >= dim else d
                joined = od in out.tags and (stack or d != dim)
                if ax is not None and v.shape[d] > 1 and not joined:
                    call.state.pin(key, ax, f"concatenated in {node.name}")
    return out


def _cat_other_dims(call: Call, vals: list[Value], dim: int, stack: bool, out: Value) -> None:
    for d in range(vals[0].ndim):
        if not stack and d == dim:
            continue
        tagged = [v.tags[d] for v in vals if d in v.tags]
        if not tagged:
            continue
        pieces = unify(call, tagged)
        params = [(key, mp.get(d)) for v in vals if d not in v.tags for key, mp in v.params]
        plain = any(d not in v.tags and not v.params for v in vals)
        if plain or any(ax is None for _, ax in params):
            call.freeze_pieces(pieces, f"concatenated with unpermuted tensors in {call.node.name}")
        for key, ax in params:
            if ax is not None:
                call.join(pieces, key, ax)
        out.tags[d + 1 if stack and d >= dim else d] = call.state.resolve(pieces)


def _cat_segments(call: Call, vals: list[Value], dim: int, out: Value) -> None:
    st = call.state
    for v in vals:  # units concatenated (RoPE's rotate-half): whole heads only
        if dim in v.tags and any(p.role == "unit" for p in v.tags[dim]):
            st.to_heads(v.tags[dim], f"concatenated in {call.node.name}")
    off = 0
    cat_pieces: list[Piece] = []
    for v in vals:
        pieces = st.resolve(v.tags.get(dim, ()))
        if any(p.role != "full" for p in pieces):
            call.freeze(Value(v.shape, {dim: pieces}), f"heads concatenated in {call.node.name}")
        else:
            cat_pieces.extend(p.shifted(off) for p in pieces)
        off += v.shape[dim]
    if cat_pieces:
        out.tags[dim] = tuple(cat_pieces)


# ---------------------------------------------------------------------------- split / chunk
@register_function_rule((torch.split, torch.chunk, "split", "chunk"))
def split(call: Call) -> Any:
    """Along a feature dim the groups are refined at the chunk boundaries and each chunk
    carries its pieces; units of attention heads split (RoPE's halves) keep the units in
    place (whole heads move); other dims pass."""
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
    if pieces is None:
        return outs
    _chunk_pieces(call, Value(x.shape, {dim: pieces}), dim, sizes, outs)
    return outs


def _chunk_pieces(call: Call, x: Value, dim: int, sizes: list[int], outs: list[Value]) -> None:
    """Distribute ``x``'s pieces on ``dim`` over consecutive chunks of ``sizes``."""
    st = call.state
    pieces = x.tags[dim]
    if any(p.role == "unit" for p in pieces):
        pieces = st.to_heads(pieces, f"split in {call.node.name}")
    offs = [sum(sizes[:i]) for i in range(len(sizes))]
    cut = st.refine_at(st.to_heads(pieces, f"split in {call.node.name}"), offs[1:])
    if cut is None:
        call.freeze(x, f"split across features in {call.node.name}")
        call.report("split inside a feature block")
        return
    for p in cut:
        for o, off, k in zip(outs, offs, sizes, strict=True):
            if off <= p.start < off + k:
                o.tags[dim] = (*o.tags.get(dim, ()), p.shifted(-off))
                break


@register_function_rule((torch.unbind, "unbind"))
def unbind(call: Call) -> Any:
    """Tensors along ``dim``: a dim carrying nothing is removed; along a feature dim every
    feature would become its own tensor (frozen)."""
    x, shape = call.x, call.shape
    dim = call.arg(1, "dim", 0)
    if not isinstance(shape, list) or not isinstance(dim, int):
        return call.unsupported("unbind")
    dim %= x.ndim
    if dim in x.tags:
        call.freeze(Value(x.shape, {dim: x.tags[dim]}), f"unbound in {call.node.name}")
        call.report("unbind of a feature axis")
    outs = []
    for s in shape:
        tags = {d - (d > dim): p for d, p in x.tags.items() if d != dim}
        params = [
            (key, {d - (d > dim): ax for d, ax in mp.items() if d != dim}) for key, mp in x.params
        ]
        outs.append(Value(s, tags, params) if isinstance(s, tuple) else None)
    for key, mp in x.params:
        if mp.get(dim) is not None and x.shape[dim] > 1:
            call.state.pin(key, mp[dim], f"unbound in {call.node.name}")
    return outs


@register_function_rule((torch.roll, "roll"))
def roll(call: Call) -> Any:
    """Rolled dims are mixed (Swin's shifted windows roll the spatial dims); the others
    pass."""
    x = call.x
    dims = call.arg(2, "dims")
    if not isinstance(call.shape, tuple):
        return call.unsupported("roll")
    if dims is None:
        return call.unsupported("roll of the flattened tensor")
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not all(isinstance(d, int) for d in dims):
        return call.unsupported("roll along non-constant dims")
    out = keep_dims(call, Value(x.shape, dict(x.tags)), [d % x.ndim for d in dims])
    if x.params:
        call.freeze(Value(x.shape, params=x.params), f"rolled in {call.node.name}")
    return out


# ---------------------------------------------------------------------------- getitem
def _tensor_index_dims(i: Any) -> int | None:
    """Dims an index tensor consumes (a bool mask: its ndim), None when ``i`` is no tensor."""
    if not isinstance(i, fx.Node):
        return None
    shp = meta_shape(i)
    if not isinstance(shp, tuple):
        return None
    return len(shp) if meta_dtype(i) == torch.bool else 1


def _classify(idx: Any, ndim: int) -> list[tuple[str, Any, int]] | None:
    """The index as ``(kind, item, input dims consumed)`` with Ellipsis expanded and trailing
    full slices added; kinds: ``new`` (None), ``slice``, ``int``, ``adv`` (tensor / list
    index). None for what is not understood."""
    items = idx if isinstance(idx, tuple) else (idx,)
    out: list[tuple[str, Any, int]] = []
    for i in items:
        if i is None:
            out.append(("new", None, 0))
        elif i is Ellipsis:
            out.append(("...", None, 0))
        elif isinstance(i, slice):
            out.append(("slice", i, 1))
        elif isinstance(i, bool):
            return None
        elif isinstance(i, int):
            out.append(("int", i, 1))
        elif isinstance(i, (list, tuple)):
            out.append(("adv", i, 1))
        elif isinstance(i, fx.Node):
            k = _tensor_index_dims(i)
            out.append(("int", i, 1) if k is None else ("adv", i, k))
        else:
            return None
    used = sum(k for _, _, k in out)
    if sum(1 for kind, _, _ in out if kind == "...") > 1 or used > ndim:
        return None
    full = ("slice", slice(None), 1)
    expanded: list[tuple[str, Any, int]] = []
    for item in out:
        expanded.extend([full] * (ndim - used) if item[0] == "..." else [item])
    if not any(item[0] == "..." for item in out):
        expanded.extend([full] * (ndim - used))
    return expanded


def _output_dims(items: list[tuple[str, Any, int]], out_nd: int) -> list[Any] | None:
    """For each item, the output dim it produces (``new`` / ``slice``), None (``int``) or
    ``"adv"``; advanced indices (ints among them) go where NumPy puts them: in place when
    adjacent, else first."""
    adv = [k for k, (kind, _, _) in enumerate(items) if kind == "adv"]
    kinds = [("adv" if adv and kind == "int" else kind) for kind, _, _ in items]
    adv = [k for k, kind in enumerate(kinds) if kind == "adv"]
    n_basic = sum(1 for kind in kinds if kind in ("new", "slice"))
    n_adv = out_nd - n_basic
    if adv and n_adv < 0:
        return None
    res: list[Any] = []
    pos = n_adv if adv and adv != list(range(adv[0], adv[-1] + 1)) else 0
    placed_adv = pos > 0
    for kind in kinds:
        if kind == "adv":
            res.append("adv")
            if not placed_adv:
                pos += n_adv
                placed_adv = True
        elif kind == "int":
            res.append(None)
        else:
            res.append(pos)
            pos += 1
    return res if pos == out_nd or (adv and pos <= out_nd) else None


def _slice_bounds(s: slice, n: int, n_out: int) -> tuple[int, int] | None:
    """``(start, stop)`` of a step-1 slice of a dim of size ``n`` (``n_out`` the output
    size, which settles bounds computed at run time); None otherwise."""
    if isinstance(s.step, fx.Node) or s.step not in (None, 1):
        return None
    if isinstance(s.start, fx.Node) or isinstance(s.stop, fx.Node):
        return (0, n) if n_out == n else None
    start, stop, _ = s.indices(n)
    return start, max(start, stop)


@register_function_rule(operator.getitem, checked_inputs=False)
def getitem(call: Call) -> Any:
    """An item of a tuple output, or indexing of a tensor: groups on dims kept whole move to
    their output dims; a slice or an integer index of a feature dim refines its groups at
    the bounds (the part taken carries its pieces); a dim indexed by a tensor or a list
    (advanced indexing, e.g. ``h[torch.arange(B), lengths - 1]``) freezes what it carries,
    and the other dims go where NumPy's rules put them."""
    x, node, shape = call.x, call.node, call.shape
    idx = node.args[1]
    if isinstance(x, list):
        return x[idx] if isinstance(idx, int) and -len(x) <= idx < len(x) else None
    if not isinstance(x, Value):
        return call.output()
    for v in call.extra_values():  # features used as indices
        call.freeze(v, f"used as an index in {node.name}")
    if not isinstance(shape, tuple):
        if x.active():
            call.report("indexing to a non-tensor")
        call.freeze(x, f"indexed in {node.name}")
        return None
    items = _classify(idx, x.ndim)
    dims = _output_dims(items, len(shape)) if items is not None else None
    if items is None or dims is None:
        return call.unsupported("indexing not understood")
    return _index(call, x, items, dims)


def _index(call: Call, x: Value, items: list, dims: list) -> Value:
    st, node, shape = call.state, call.node, call.shape
    out = Value(shape)
    d_in = 0
    pmaps: list[dict[int, int | None]] = [{} for _ in x.params]
    for (kind, item, k), od in zip(items, dims, strict=True):
        if k == 0:
            continue
        for d in range(d_in, d_in + k):
            pieces = x.tags.get(d)
            for (key, mp), nm in zip(x.params, pmaps, strict=True):
                ax = mp.get(d)
                whole = kind == "slice" and shape[od] == x.shape[d]
                if isinstance(od, int) and kind == "slice":
                    nm[od] = ax if whole else None
                if ax is not None and not whole and x.shape[d] > 1:
                    st.pin(key, ax, f"indexed in {node.name}")
            if pieces is None:
                continue
            if kind == "adv":
                call.freeze(Value(x.shape, {d: pieces}), f"indexed by a tensor in {node.name}")
                call.report("advanced indexing of a feature axis")
                continue
            n = x.shape[d]
            if kind == "slice":
                bounds = _slice_bounds(item, n, shape[od])
            else:
                i = item if isinstance(item, int) else None
                bounds = None if i is None else (i % n, i % n + 1)
            kept = _take(st, pieces, bounds)
            if kept is None:
                call.freeze(Value(x.shape, {d: pieces}), f"indexed in {node.name}")
                call.report("indexing inside a feature block")
            elif kept and isinstance(od, int):
                out.tags[od] = kept
        d_in += k
    out.params = [(key, nm) for (key, _), nm in zip(x.params, pmaps, strict=True)]
    return out


def _take(st: TraceState, pieces: Pieces, bounds: tuple[int, int] | None) -> Pieces | None:
    """The pieces inside ``[start, stop)``, shifted to start at 0 (groups refined at the
    bounds; unit pieces: whole heads only); None when that is impossible."""
    if bounds is None:
        return None
    lo, hi = bounds
    if lo == 0 and all(p.start + p.n * p.inner <= hi for p in pieces):
        return pieces
    pieces = st.to_heads(pieces, "indexed")
    cut = st.refine_at(pieces, [lo, hi])
    if cut is None:
        return None
    return tuple(p.shifted(-lo) for p in cut if lo <= p.start < hi)
