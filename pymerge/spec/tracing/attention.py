"""Attention rules: ``nn.MultiheadAttention`` and ``F.scaled_dot_product_attention``.

Hand-written attention (``q @ k.transpose(-2, -1)``, softmax, ``@ v``) is handled by the
matmul rule and the shape rules that split features into heads (see
:mod:`~pymerge.spec.tracing.shapes`)."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import nn

from pymerge.spec.spec import AxisRef
from pymerge.spec.tracing.call import Call
from pymerge.spec.tracing.functions import batch_dims, contract
from pymerge.spec.tracing.primitives import unify
from pymerge.spec.tracing.registry import register_function_rule, register_module_rule
from pymerge.spec.tracing.values import Piece, Value

_MHA_ARGS = ["query", "key", "value", "key_padding_mask", "need_weights", "attn_mask"]


@register_module_rule(nn.MultiheadAttention, checked_inputs=False)
def multihead_attention(call: Call) -> Any:
    """q/k/v features join the input projections; groups ``<name>.qk`` (query and key rows,
    contracted together) and ``<name>.vo`` (value rows and out_proj columns) share a head
    structure; ``<name>.out_proj`` starts the output group. Masks must carry no features."""
    node, shape = call.node, call.shape
    args = dict(zip(_MHA_ARGS, node.args, strict=False))
    args.update(node.kwargs)
    out_shapes = shape if isinstance(shape, list) else [shape]
    others = [call.value(a) for n, a in args.items() if n not in ("query", "key", "value")]
    if any(isinstance(o, Value) and o.active() for o in others):
        call.unsupported("permuted tensor used as attention mask")
        return [Value(s) if isinstance(s, tuple) else None for s in out_shapes]
    ins = [call.value(args.get(n)) for n in ("query", "key", "value")]
    _mha_inputs(call, ins)
    out = _mha_groups(call)
    res: list[Any] = []
    for i, s in enumerate(out_shapes):
        if not isinstance(s, tuple):
            res.append(None)
        elif i == 0:
            res.append(Value(s, {len(s) - 1: out}))
        else:
            res.append(Value(s))
    return res if isinstance(shape, list) else res[0]


def _mha_inputs(call: Call, given: list[Any]) -> None:
    """Only the inputs' feature (last) dims may carry groups; they join the projections
    (query, key and value each with its own weight when they are separate)."""
    mod, name = call.module, call.name
    ins = [x for x in given if isinstance(x, Value)]
    for x in ins:
        bad = {d: p for d, p in x.tags.items() if d != x.ndim - 1}
        if bad or x.params:
            call.freeze(Value(x.shape, bad, x.params), f"non-feature dims into {name}")
    if mod._qkv_same_embed_dim:
        tagged = [t for t in (x.tags.get(x.ndim - 1) for x in ins) if t is not None]
        if tagged:
            pieces = unify(call, tagged)
            if len(tagged) < len(ins):
                call.freeze_pieces(pieces, f"attention {name} mixes permuted and fixed inputs")
            call.join(pieces, call.key("in_proj_weight"), 1)
        return
    for x, p in zip(given, ("q_proj_weight", "k_proj_weight", "v_proj_weight"), strict=True):
        t = x.tags.get(x.ndim - 1) if isinstance(x, Value) else None
        if t is not None:
            call.join(t, call.key(p), 1)


def _mha_groups(call: Call) -> tuple[Piece, ...]:
    """The qk / vo groups with their head structure, and the output group's pieces."""
    mod, name, key = call.module, call.name, call.key
    E, H = mod.embed_dim, mod.num_heads
    if mod._qkv_same_embed_dim:
        w = key("in_proj_weight")
        qk = [AxisRef(w, 0, 0, E), AxisRef(w, 0, E, 2 * E)]
        vo = [AxisRef(w, 0, 2 * E, 3 * E)]
    else:
        qk = [AxisRef(key("q_proj_weight"), 0), AxisRef(key("k_proj_weight"), 0)]
        vo = [AxisRef(key("v_proj_weight"), 0)]
    if mod.in_proj_bias is not None:
        b = key("in_proj_bias")
        qk += [AxisRef(b, 0, 0, E), AxisRef(b, 0, E, 2 * E)]
        vo.append(AxisRef(b, 0, 2 * E, 3 * E))
    if mod.bias_k is not None:
        qk.append(AxisRef(key("bias_k"), 2))
        vo.append(AxisRef(key("bias_v"), 2))
    vo.append(AxisRef(key("out_proj.weight"), 1))
    (qk_piece,) = call.new_group(E, qk, name=f"{name}.qk")
    (vo_piece,) = call.new_group(E, vo, name=f"{name}.vo")
    call.state.heads.append((H, E // H, [qk_piece.elem, vo_piece.elem], name))
    out = [AxisRef(key("out_proj.weight"), 0)]
    if mod.out_proj.bias is not None:
        out.append(AxisRef(key("out_proj.bias"), 0))
    return call.new_group(E, out, name=f"{name}.out_proj")


@register_function_rule(F.scaled_dot_product_attention)
def scaled_dot_product_attention(call: Call) -> Any:
    """``sdpa(q, k, v, attn_mask, ...)``: q/k contracted over their last dim, k/v over
    positions, heads (batch dims) unified, v's last dim carried. The mask is added to the
    scores: its batch dims meet the heads (a per-head bias, e.g. a relative position bias,
    joins or freezes them), its position dims must carry nothing."""
    q, k, v = call.input(0, "query"), call.input(1, "key"), call.input(2, "value")
    mask = call.input(3, "attn_mask")
    shape = call.shape
    if not all(
        isinstance(t, Value) and t.ndim >= 2 and not t.params for t in (q, k, v)
    ) or not isinstance(shape, tuple):
        return call.unsupported("attention on unexpected inputs")
    if call.arg(7, "enable_gqa", False) and q.ndim >= 3 and k.shape[-3] != q.shape[-3]:
        k, v = (_repeat_heads(call, t, q.shape[-3]) for t in (k, v))
        if k is None or v is None:
            return call.unsupported("grouped-query attention with unexpected head counts")
    out = Value(shape)
    nd = len(shape)
    batch_dims(call, [q, k, v], nd, out)
    contract(call, q.tags.get(q.ndim - 1), k.tags.get(k.ndim - 1))
    contract(call, k.tags.get(k.ndim - 2), v.tags.get(v.ndim - 2))
    if q.ndim - 2 in q.tags:
        out.tags[nd - 2] = q.tags[q.ndim - 2]
    if v.ndim - 1 in v.tags:
        out.tags[nd - 1] = v.tags[v.ndim - 1]
    if isinstance(mask, Value):
        _mask(call, mask, out, nd)
    return out


def _mask(call: Call, mask: Value, out: Value, nd: int) -> None:
    """The mask broadcasts against the scores ``[..., Tq, Tk]`` (same batch dims as the
    output): on a batch dim its groups unify with the heads there, a parameter axis joins
    them, an unpermuted per-head tensor freezes them; its position dims carry nothing."""
    st, name = call.state, call.node.name
    for dm in range(mask.ndim):
        d = dm + nd - mask.ndim
        pieces = mask.tags.get(dm)
        axes = [(key, mp.get(dm)) for key, mp in mask.params]
        if d < 0 or d >= nd - 2 or mask.shape[dm] == 1:
            if pieces:
                call.freeze(Value(mask.shape, {dm: pieces}), f"attention mask in {name}")
            for key, ax in axes:
                if ax is not None and mask.shape[dm] > 1:
                    st.pin(key, ax, f"attention mask in {name}")
            continue
        heads = out.tags.get(d)
        if pieces:
            if heads is None:
                call.freeze(Value(mask.shape, {dm: pieces}), f"attention mask in {name}")
            else:
                out.tags[d] = unify(call, [heads, pieces])
        elif heads is not None and axes and all(ax is not None for _, ax in axes):
            for key, ax in axes:
                call.join(heads, key, ax)
        elif heads is not None:
            call.freeze_pieces(heads, f"per-head attention mask in {name}")
        else:
            for key, ax in axes:
                if ax is not None:
                    st.pin(key, ax, f"attention mask in {name}")


def _repeat_heads(call: Call, t: Value, heads: int) -> Value | None:
    """``t`` with its key/value heads (dim -3) repeated for their groups of query heads, as
    ``scaled_dot_product_attention(..., enable_gqa=True)`` does: each head's group moves
    with it (whole heads)."""
    d, n = t.ndim - 3, t.shape[-3]
    if heads % n:
        return None
    g = heads // n
    tags = dict(t.tags)
    if d in tags:
        pieces = call.state.to_heads(tags[d], f"repeated in {call.node.name}")
        tags = {k: call.state.resolve(p) for k, p in call.state.resolve_val(t).tags.items()}
        tags[d] = tuple(p.scaled(g) for p in pieces)
    shape = (*t.shape[:d], heads, *t.shape[d + 1 :])
    return Value(shape, {k: p for k, p in tags.items() if p})
