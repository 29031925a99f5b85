"""Norm rules: batch and instance norms (channels), LayerNorm (module and ``F.layer_norm``),
GroupNorm (head-structured channel blocks)."""

from __future__ import annotations

from typing import Any

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from pymerge.spec.tracing.call import Call
from pymerge.spec.tracing.primitives import passthrough
from pymerge.spec.tracing.registry import register_function_rule, register_module_rule
from pymerge.spec.tracing.values import Pieces, Value

_STATS = ("running_mean", "running_var", "num_batches_tracked")
_PER_CHANNEL = ("weight", "bias", "running_mean", "running_var")


def _channel_norm(unbatched_ndim: int | None) -> Any:
    """Rule for a norm with per-channel parameters and statistics on dim 1 (dim 0 for an
    unbatched input of ``unbatched_ndim`` dims; None: dim 0 only for 1-D inputs)."""

    def channel_norm(call: Call) -> Any:
        mod, x = call.module, call.x
        if unbatched_ndim is None:
            ch = 1 if x.ndim > 1 else 0
        else:
            ch = 0 if x.ndim == unbatched_ndim else 1
        for p in _STATS:
            if getattr(mod, p, None) is not None:
                call.state.no_cost.add(call.key(p))
        if ch in x.tags:
            for p in _PER_CHANNEL:
                if getattr(mod, p, None) is not None:
                    call.join(x.tags[ch], call.key(p), 0)
        return passthrough(call)

    return channel_norm


register_module_rule(
    (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), _channel_norm(None), kind="norm"
)
for _cls, _nd in ((nn.InstanceNorm1d, 2), (nn.InstanceNorm2d, 3), (nn.InstanceNorm3d, 4)):
    register_module_rule(_cls, _channel_norm(_nd), kind="norm")


@register_module_rule(nn.LayerNorm, kind="norm")
def layer_norm(call: Call) -> Any:
    """Normalises the last ``len(normalized_shape)`` dims (any permutation within them keeps
    the statistics); their groups join the affine ``weight`` / ``bias`` axes."""
    mod, x = call.module, call.x
    k = len(mod.normalized_shape)
    for d, pieces in x.tags.items():
        if d >= x.ndim - k and mod.elementwise_affine:
            ax = d - (x.ndim - k)
            call.join(pieces, call.key("weight"), ax)
            if mod.bias is not None:
                call.join(pieces, call.key("bias"), ax)
    return passthrough(call)


@register_function_rule(F.layer_norm)
def layer_norm_fn(call: Call) -> Any:
    """``F.layer_norm(x, normalized_shape, weight, bias, eps)`` (what a channels-first
    ``LayerNorm2d`` calls after permuting): as the module, with ``weight`` / ``bias`` read
    from the graph (parameters join the groups; any other tensor freezes them)."""
    x = call.x
    ns = call.arg(1, "normalized_shape")
    if not isinstance(ns, (int, list, tuple)) or any(isinstance(n, fx.Node) for n in _seq(ns)):
        return call.unsupported("layer_norm over a non-constant normalized_shape")
    k = len(_seq(ns))
    affine = [call.input(2, "weight"), call.input(3, "bias")]
    affine = [a for a in affine if isinstance(a, Value)]
    if any(a.tags for a in affine) or x.params:
        return call.unsupported("layer_norm with computed or permuted affine parameters")
    for d, pieces in x.tags.items():
        if d >= x.ndim - k:
            for a in affine:
                _join_affine(call, pieces, a, d - (x.ndim - k))
    return passthrough(call)


def _seq(ns: Any) -> tuple:
    return (ns,) if isinstance(ns, int) else tuple(ns)


def _join_affine(call: Call, pieces: Pieces, a: Value, ax: int) -> None:
    axes = [(key, mp.get(ax)) for key, mp in a.params]
    if not axes or any(p is None for _, p in axes):  # a constant or a sliced parameter
        call.freeze_pieces(pieces, f"normalised with unpermuted weights in {call.node.name}")
    for key, p in axes:
        if p is not None:
            call.join(pieces, key, p)


@register_module_rule(nn.GroupNorm, kind="norm")
def group_norm(call: Call) -> Any:
    """Channels (dim 1) in ``num_groups`` blocks: a head structure (blocks move whole, units
    within a block together); other tagged dims are normalised over and freeze."""
    mod, x = call.module, call.x
    name, ch = call.name, 1
    for d, pieces in x.tags.items():
        if d != ch:
            call.freeze(Value(x.shape, {d: pieces}), f"normalised in {name}")
    if ch in x.tags:
        pieces = x.tags[ch]
        g, c = mod.num_groups, mod.num_channels
        if 1 < g < c:
            if len(pieces) == 1 and pieces[0].inner == 1 and pieces[0].n == c:
                call.state.heads.append((g, c // g, [pieces[0].elem], f"{name}"))
            else:
                call.freeze(
                    Value(x.shape, {ch: pieces}), f"GroupNorm {name} on a segmented feature axis"
                )
        if mod.affine:
            call.join(pieces, call.key("weight"), 0)
            call.join(pieces, call.key("bias"), 0)
    return passthrough(call)
