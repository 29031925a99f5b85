"""Module rules: layers with weights, pass-through modules and activations, pooling, flatten.

Norms live in :mod:`~pymerge.spec.tracing.norms`, attention in
:mod:`~pymerge.spec.tracing.attention`. Each rule gets a :class:`~pymerge.spec.tracing.Call`
whose ``x`` is the module's one traced input (checked inputs, see ``docs/tracing.md``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pymerge.spec.tracing.call import Call
from pymerge.spec.tracing.primitives import keep_dims, passthrough
from pymerge.spec.tracing.registry import register_module_rule
from pymerge.spec.tracing.shapes import reshape
from pymerge.spec.tracing.values import Value

ACTIVATIONS: tuple[type[nn.Module], ...] = (
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
IDENTITIES: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
)
#: pooling module -> number of spatial (trailing) dims it mixes
POOLS: dict[type[nn.Module], int] = {
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


def _bias_ref(call: Call) -> list[tuple[str, int]]:
    return [(call.key("bias"), 0)] if call.module.bias is not None else []


@register_module_rule(nn.Linear)
def linear(call: Call) -> Value:
    """``y = x W^T + b``: x's last dim joins ``weight`` axis 1; a new group on axis 0."""
    mod, x = call.module, call.x
    last = x.ndim - 1
    if last in x.tags:
        call.join(x.tags[last], call.key("weight"), 1)
    out = call.output({d: p for d, p in x.tags.items() if d != last})
    refs = [(call.key("weight"), 0), *_bias_ref(call)]
    out.tags[len(call.shape) - 1] = call.new_group(mod.out_features, refs)
    return out


@register_module_rule(
    (
        nn.Conv1d,
        nn.Conv2d,
        nn.Conv3d,
        nn.ConvTranspose1d,
        nn.ConvTranspose2d,
        nn.ConvTranspose3d,
    )
)
def conv(call: Call) -> Value:
    """Channels join the weight's input axis, a new group starts on its output axis (swapped
    for transposed convs); depthwise convs carry the group through; other grouped convs
    freeze the channels; spatial dims are mixed."""
    mod, x = call.module, call.x
    ch = x.ndim - len(mod.kernel_size) - 1
    in_ax, out_ax = (0, 1) if mod.transposed else (1, 0)
    rest = Value(x.shape, {d: p for d, p in x.tags.items() if d != ch})
    out = keep_dims(call, rest, range(ch + 1, x.ndim))
    depthwise = not mod.transposed and mod.groups == mod.in_channels == mod.out_channels
    if mod.groups != 1 and not depthwise:
        if ch in x.tags:
            call.freeze(Value(x.shape, {ch: x.tags[ch]}), f"grouped conv {call.name}")
            call.report("grouped convolution")
        return out
    if depthwise:
        if ch in x.tags:
            call.join(x.tags[ch], call.key("weight"), 0)
            if mod.bias is not None:
                call.join(x.tags[ch], call.key("bias"), 0)
            out.tags[ch] = x.tags[ch]
        return out
    if ch in x.tags:
        call.join(x.tags[ch], call.key("weight"), in_ax)
    refs = [(call.key("weight"), out_ax), *_bias_ref(call)]
    out.tags[ch] = call.new_group(mod.out_channels, refs)
    return out


@register_module_rule(nn.Embedding)
def embedding(call: Call) -> Value:
    """A new group on ``weight`` axis 1; features used as indices freeze."""
    x = call.x
    if x.tags:
        call.freeze(x, f"used as indices in {call.name}")
    pieces = call.new_group(call.module.embedding_dim, [(call.key("weight"), 1)])
    return Value(call.shape, {len(call.shape) - 1: pieces})


@register_module_rule(nn.PReLU)
def prelu(call: Call) -> Any:
    """Per-channel slopes (dim 1) join the channel group."""
    if call.module.num_parameters > 1 and 1 in call.x.tags:
        call.join(call.x.tags[1], call.key("weight"), 0)
    return passthrough(call)


register_module_rule(ACTIVATIONS, passthrough, kind="activation")
register_module_rule((*IDENTITIES, nn.Softmax, nn.LogSoftmax), passthrough)


def _pool(nsp: int) -> Any:
    def pool(call: Call) -> Value:
        x = call.x
        return keep_dims(call, x, range(x.ndim - nsp, x.ndim))

    pool.__doc__ = f"Mixes the last {nsp} (spatial) dims; features pass."
    return pool


for _cls, _nsp in POOLS.items():
    register_module_rule(_cls, _pool(_nsp))


@register_module_rule(nn.Upsample)
def upsample(call: Call) -> Value:
    """Mixes every dim after the channels."""
    return keep_dims(call, call.x, range(2, call.x.ndim))


@register_module_rule((nn.Flatten, nn.Unflatten))
def flatten(call: Call) -> Any:
    """A reshape (see :func:`~pymerge.spec.tracing.shapes.reshape`)."""
    return reshape(call, call.x)
