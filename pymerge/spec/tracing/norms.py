"""Norm rules: batch and instance norms (channels), LayerNorm and RMSNorm (modules and
functions), GroupNorm (head-structured channel blocks); the functional forms read their
parameters from the graph (what subclasses traced through and exported graphs call)."""

from __future__ import annotations

from typing import Any

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from pymerge.spec.tracing.call import Call
from pymerge.spec.tracing.functions import whole_param
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


def _per_channel(call: Call, x: Value, ch: int, tensors: list[Any], stats: list[Any]) -> Any:
    """A functional norm with per-channel tensors (affine parameters ``tensors``, running
    statistics ``stats``; None entries absent) on dim ``ch``: parameters join the channel
    group, anything else freezes it."""
    if x.params:
        return call.unsupported("normalisation of a parameter")
    for v in stats:  # running statistics (and their counter) are not matched on
        if isinstance(v, Value):
            for key, _ in v.params:
                call.state.no_cost.add(key)
                if key.endswith("running_mean"):
                    call.state.no_cost.add(key[: -len("running_mean")] + "num_batches_tracked")
    pieces = x.tags.get(ch)
    for v in (*tensors, *stats):
        if not isinstance(v, Value):
            continue
        if v.tags:
            return call.unsupported("normalisation with computed per-channel tensors")
        if pieces is not None:
            _join_affine(call, pieces, v, 0)
    return passthrough(call)


@register_function_rule(F.batch_norm)
def batch_norm_fn(call: Call) -> Any:
    """``F.batch_norm(x, running_mean, running_var, weight, bias, ...)`` (what timm's
    ``BatchNormAct2d`` calls): channels on dim 1."""
    x = call.x
    stats = [call.input(1, "running_mean"), call.input(2, "running_var")]
    affine = [call.input(3, "weight"), call.input(4, "bias")]
    return _per_channel(call, x, 1 if x.ndim > 1 else 0, affine, stats)


@register_function_rule(F.instance_norm)
def instance_norm_fn(call: Call) -> Any:
    """``F.instance_norm(x, running_mean, running_var, weight, bias, ...)``: channels on
    dim 1."""
    stats = [call.input(1, "running_mean"), call.input(2, "running_var")]
    affine = [call.input(3, "weight"), call.input(4, "bias")]
    return _per_channel(call, call.x, 1, affine, stats)


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
    affine = [call.input(2, "weight"), call.input(3, "bias")]
    return _norm_over_last(call, x, len(_seq(ns)), [a for a in affine if isinstance(a, Value)])


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
    mod = call.module
    affine = [call.key("weight"), call.key("bias")] if mod.affine else []
    return _group_norm(call, call.x, mod.num_groups, affine)


@register_function_rule(F.group_norm)
def group_norm_fn(call: Call) -> Any:
    """``F.group_norm(x, num_groups, weight, bias, eps)`` with parameter weight and bias."""
    x, g = call.x, call.arg(1, "num_groups")
    affine = [call.input(2, "weight"), call.input(3, "bias")]
    keys = [whole_param(a, 1) for a in affine if a is not None]
    if not isinstance(g, int) or None in keys or x.params:
        return call.unsupported("group_norm with computed weights")
    return _group_norm(call, x, g, keys)


def _group_norm(call: Call, x: Value, g: int, affine: list[str]) -> Any:
    name, ch = call.name, 1
    for d, pieces in x.tags.items():
        if d != ch:
            call.freeze(Value(x.shape, {d: pieces}), f"normalised in {name}")
    if ch in x.tags:
        pieces = call.state.to_heads(x.tags[ch], f"into {name}")
        c = x.shape[ch]
        if 1 < g < c:
            if len(pieces) == 1 and pieces[0].inner == 1 and pieces[0].n == c:
                call.state.heads.append((g, c // g, [pieces[0].elem], f"{name}"))
            else:
                call.freeze(
                    Value(x.shape, {ch: pieces}), f"GroupNorm {name} on a segmented feature axis"
                )
        for key in affine:
            call.join(pieces, key, 0)
    return passthrough(call)


def _norm_over_last(call: Call, x: Value, k: int, affine: list[Value]) -> Any:
    """Normalisation over the last ``k`` dims with elementwise ``affine`` tensors."""
    if any(a.tags for a in affine) or x.params:
        return call.unsupported("normalisation with computed or permuted affine parameters")
    for d, pieces in x.tags.items():
        if d >= x.ndim - k:
            for a in affine:
                _join_affine(call, pieces, a, d - (x.ndim - k))
    return passthrough(call)


if hasattr(nn, "RMSNorm"):

    @register_module_rule(nn.RMSNorm, kind="norm")
    def rms_norm(call: Call) -> Any:
        """Root-mean-square norm over the last ``len(normalized_shape)`` dims: as LayerNorm
        (its ``weight`` joins the groups there)."""
        mod, x = call.module, call.x
        k = len(mod.normalized_shape)
        for d, pieces in x.tags.items():
            if d >= x.ndim - k and mod.weight is not None:
                call.join(pieces, call.key("weight"), d - (x.ndim - k))
        return passthrough(call)


if hasattr(F, "rms_norm"):

    @register_function_rule(F.rms_norm)
    def rms_norm_fn(call: Call) -> Any:
        """``F.rms_norm(x, normalized_shape, weight, eps)``."""
        ns = call.arg(1, "normalized_shape")
        if not isinstance(ns, (int, list, tuple)) or any(isinstance(n, fx.Node) for n in _seq(ns)):
            return call.unsupported("rms_norm over a non-constant normalized_shape")
        w = call.input(2, "weight")
        return _norm_over_last(call, call.x, len(_seq(ns)), [w] if isinstance(w, Value) else [])
