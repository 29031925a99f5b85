"""Building blocks rules share: pass-through, broadcasting, unification, spatial mixing."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pymerge.spec.tracing.call import Call
from pymerge.spec.tracing.values import Pieces, Value

__all__ = ["broadcast", "keep_dims", "passthrough", "pointwise", "unify"]


def passthrough(call: Call, v: Any = None) -> Value | None:
    """The output carries ``v``'s (default ``call.x``) tags and parameter views unchanged
    (shape-preserving ops: activations, norms, softmax, dropout)."""
    v = call.x if v is None else v
    shape = call.shape
    if not isinstance(v, Value) or not isinstance(shape, tuple) or tuple(shape) != v.shape:
        return call.output() if v is None else None
    return Value(v.shape, dict(v.tags), list(v.params))


def pointwise(call: Call) -> Value | None:
    """A one-input elementwise op: pass-through when the shape is kept, else broadcast."""
    x = call.x
    if isinstance(call.shape, tuple) and tuple(call.shape) == x.shape:
        return passthrough(call, x)
    return broadcast(call, [x])


def unify(call: Call, tagged: list[Pieces]) -> Pieces:
    """Several tensors' pieces meet on one dim: identical layouts share one permutation
    (heads: the same head permutation); layouts a sound restriction can make identical
    (:meth:`TraceState.align`: refined at each other's boundaries, or coarsened to the
    other's blocks) are made so first; anything else freezes. Returns the first
    (resolved)."""
    st = call.state
    first = st.resolve(tagged[0])
    for other in tagged[1:]:
        pair = st.align(first, other)
        if pair is None:
            call.freeze_pieces(
                (*first, *st.resolve(other)),
                f"incompatible feature layouts meet in {call.node.name}",
            )
            continue
        first, other = pair
        for a, b in zip(first, other, strict=True):
            if a.role == "head":  # same head permutation, own units
                st.link_heads(a.elem, b.elem, a.n, a.hd, "")
            else:
                st.union(a.elem, b.elem)
    return st.resolve(first)


def broadcast(call: Call, vals: list[Any]) -> Value | None:
    """Elementwise op with broadcasting over ``vals`` (None = scalar/constant): groups meeting
    on a dim are unified, parameters met there join them, an unpermuted tensor freezes them."""
    shape = call.shape
    if not isinstance(shape, tuple):
        return _no_tensor_output(call, vals)
    out = Value(shape)
    tensors = [v for v in vals if isinstance(v, Value)]
    mixed: set[int] = set()
    for d in range(len(shape)):
        tagged, params, plain = _gather_dim(call, tensors, d)
        if plain and not tagged:  # params mixed with an unpermuted tensor on this dim: the
            mixed.add(d)  # result may not be permuted along it later
        if tagged:
            pieces = _meet(call, tagged, params, plain)
            if pieces:
                out.tags[d] = pieces
    for v in tensors:
        off = len(shape) - v.ndim
        for key, mp in v.params:
            if not out.tags:  # the output is still a view of the parameters
                out.params.append(
                    (key, {d + off: (None if d + off in mixed else ax) for d, ax in mp.items()})
                )
                continue
            for d, ax in mp.items():  # axes not joined to a group here must not move
                if ax is not None and d + off not in out.tags and v.shape[d] > 1:
                    call.state.pin(key, ax, f"used unpermuted in {call.node.name}")
    return out


def _no_tensor_output(call: Call, vals: list[Any]) -> None:
    if any(isinstance(v, Value) and v.active() for v in vals):
        call.report("no tensor output")
    for v in vals:
        if isinstance(v, Value):
            call.freeze(v, f"flows into {call.node.name}")
    return None


def _gather_dim(
    call: Call, tensors: list[Value], d: int
) -> tuple[list[Pieces], list[tuple[str, int | None]], bool]:
    """What meets on output dim ``d``: pieces, parameter axes, whether a plain tensor does."""
    shape = call.shape
    nd = len(shape)
    tagged: list[Pieces] = []
    params: list[tuple[str, int | None]] = []
    plain = False
    for v in tensors:
        dd = d - (nd - v.ndim)
        if dd < 0:
            continue
        if v.shape[dd] == 1 and shape[d] != 1:
            if dd in v.tags:
                call.freeze(Value(v.shape, {dd: v.tags[dd]}), f"broadcast in {call.node.name}")
            continue
        if dd in v.tags:
            tagged.append(v.tags[dd])
        elif v.params:
            params.extend((key, mp.get(dd)) for key, mp in v.params)
        else:
            plain = True
    return tagged, params, plain


def _meet(
    call: Call, tagged: list[Pieces], params: list[tuple[str, int | None]], plain: bool
) -> Pieces:
    pieces = unify(call, tagged)
    if plain or any(ax is None for _, ax in params):
        if all(p.role == "unit" for p in pieces):  # the same per-unit factor for every head
            return call.state.to_heads(pieces, f"meet an unpermuted tensor in {call.node.name}")
        call.freeze_pieces(pieces, f"meets an unpermuted tensor in {call.node.name}")
    for key, ax in params:
        if ax is not None:
            call.join(pieces, key, ax)
    return pieces


def keep_dims(call: Call, v: Value, mixed: Iterable[int]) -> Value:
    """Output with the same dims as ``v`` where the ``mixed`` dims are transformed (spatial:
    pooling, padding, convolution windows): groups on them freeze, the others pass."""
    shape = call.shape
    out = Value(shape)
    mixed = set(mixed)
    for d, pieces in v.tags.items():
        if d in mixed or shape[d] != v.shape[d]:
            call.freeze(Value(v.shape, {d: pieces}), f"spatially mixed in {call.node.name}")
        else:
            out.tags[d] = pieces
    for key, mp in v.params:  # a parameter resampled (a position table): mixed axes pinned
        kept: dict[int, int | None] = {}
        for d, ax in mp.items():
            if d in mixed or shape[d] != v.shape[d]:
                kept[d] = None
                if ax is not None and v.shape[d] > 1:
                    call.state.pin(key, ax, f"spatially mixed in {call.node.name}")
            else:
                kept[d] = ax
        out.params.append((key, kept))
    return out
