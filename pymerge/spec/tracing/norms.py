"""Norm rules: batch and instance norms (channels), LayerNorm, GroupNorm (head-structured
channel blocks)."""

from __future__ import annotations

from typing import Any

from torch import nn

from pymerge.spec.tracing.call import Call
from pymerge.spec.tracing.primitives import passthrough
from pymerge.spec.tracing.registry import register_module_rule
from pymerge.spec.tracing.values import Value

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
