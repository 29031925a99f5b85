"""Module rules: layers with weights, pass-through modules and activations, pooling, flatten.

Norms live in :mod:`~pymerge.spec.tracing.norms`, attention in
:mod:`~pymerge.spec.tracing.attention`. Each rule gets a :class:`~pymerge.spec.tracing.Call`
whose ``x`` is the module's one traced input (checked inputs, see ``docs/tracing.md``).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import nn

from pymerge.spec.tracing.call import Call
from pymerge.spec.tracing.functions import layer_name, whole_param
from pymerge.spec.tracing.primitives import keep_dims, passthrough
from pymerge.spec.tracing.registry import register_function_rule, register_module_rule
from pymerge.spec.tracing.shapes import reshape
from pymerge.spec.tracing.values import Piece, Value

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
    """A convolution module: see :func:`conv_layer`."""
    mod = call.module
    bias = call.key("bias") if mod.bias is not None else None
    return conv_layer(
        call,
        call.x,
        call.key("weight"),
        bias,
        groups=mod.groups,
        transposed=mod.transposed,
        spatial=len(mod.kernel_size),
        in_channels=mod.in_channels,
        out_channels=mod.out_channels,
    )


def conv_layer(
    call: Call,
    x: Value,
    weight: str,
    bias: str | None,
    *,
    groups: int,
    transposed: bool,
    spatial: int,
    in_channels: int,
    out_channels: int,
) -> Value:
    """Channels join the weight's input axis, a new group starts on its output axis (swapped
    for transposed convs); spatial dims are mixed. Grouped convolutions:

    - depthwise (one input channel per group, ``k`` outputs each): the input's group carries
      through in blocks of ``k`` output channels (whole groups move);
    - otherwise every block of input channels is permuted alike (the groups are refined at
      the block boundaries and the blocks share one permutation on the weight's input
      axis) and the output channels are permuted within each block (one group per block).
    Grouped transposed convolutions freeze their input channels."""
    st = call.state
    ch = x.ndim - spatial - 1
    in_ax, out_ax = (0, 1) if transposed else (1, 0)
    rest = Value(x.shape, {d: p for d, p in x.tags.items() if d != ch})
    out = keep_dims(call, rest, range(ch + 1, x.ndim))
    pieces = st.to_heads(x.tags[ch], f"into {call.name}") if ch in x.tags else None
    bias_refs = [(bias, 0)] if bias is not None else []
    owner = call.name if call.module is not None else layer_name(call, weight)
    if groups == 1:
        if pieces:
            call.join(pieces, weight, in_ax)
        out.tags[ch] = call.new_group(out_channels, [(weight, out_ax), *bias_refs], name=owner)
        return out
    if transposed:
        if pieces:
            call.freeze(Value(x.shape, {ch: pieces}), f"grouped transposed conv {call.name}")
            call.report("grouped transposed convolution")
        return out
    b_in, b_out = in_channels // groups, out_channels // groups
    if b_in == 1:  # depthwise, with a channel multiplier b_out
        if pieces:
            carried = tuple(p.scaled(b_out) for p in pieces)
            for key in (weight, bias):
                if key is not None:
                    call.join(carried, key, 0)
            out.tags[ch] = carried
        return out
    if pieces:
        _join_blocks(call, Value(x.shape, {ch: pieces}), ch, groups, b_in, weight)
    segs: list = []
    for k in range(groups):
        lo, hi = k * b_out, (k + 1) * b_out
        refs = [(weight, 0, lo, hi)] + ([(bias, 0, lo, hi)] if bias is not None else [])
        (p,) = call.new_group(b_out, refs, name=f"{owner}.g{k}")
        segs.append(Piece(p.elem, lo, b_out))
    out.tags[ch] = tuple(segs)
    return out


def _join_blocks(call: Call, x: Value, ch: int, groups: int, b_in: int, weight: str) -> None:
    """Every block of ``b_in`` input channels shares one permutation of the weight's input
    axis (or the channels freeze)."""
    local = call.state.share_blocks(x.tags[ch], groups, b_in)
    if local is None:
        call.freeze(x, f"grouped conv {call.name}")
        call.report("grouped convolution whose channel blocks cannot share a permutation")
        return
    call.join(local, weight, 1)


_CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_CONV_T_FUNCTIONS = {F.conv_transpose1d: 1, F.conv_transpose2d: 2, F.conv_transpose3d: 3}


def _conv_fn(spatial: int, transposed: bool) -> Any:
    def conv_fn(call: Call) -> Any:
        """``F.conv*d(x, weight, bias, ..., groups)`` with parameter weight and bias."""
        x = call.x
        weight = whole_param(call.input(1, "weight"))
        b = call.input(2, "bias")
        bias = whole_param(b, 1)
        groups = call.arg(6, "groups", 1)  # position 6 in both signatures
        if weight is None or (b is not None and bias is None) or not isinstance(groups, int):
            return call.unsupported("convolution with non-parameter weights")
        if x.params or not isinstance(call.shape, tuple):
            return call.unsupported("convolution of a parameter")
        w = call.input(1, "weight").shape
        ch = x.ndim - spatial - 1
        out_ch = call.shape[ch]
        return conv_layer(
            call,
            x,
            weight,
            bias,
            groups=groups,
            transposed=transposed,
            spatial=spatial,
            in_channels=w[0] if transposed else w[1] * groups,
            out_channels=out_ch,
        )

    return conv_fn


for _fn, _nsp in _CONV_FUNCTIONS.items():
    register_function_rule(_fn, _conv_fn(_nsp, False))
for _fn, _nsp in _CONV_T_FUNCTIONS.items():
    register_function_rule(_fn, _conv_fn(_nsp, True))


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


# torchvision's stochastic depth (drop path): a ``torch.fx.wrap``-ed function, the identity in
# eval and a per-sample (or per-batch) scalar factor in training: it commutes with any
# permutation of the features
register_function_rule("torchvision.ops.stochastic_depth.stochastic_depth", passthrough)


@register_function_rule(F.prelu)
def prelu_fn(call: Call) -> Any:
    """``F.prelu(x, weight)``: per-channel slopes (dim 1) join the channel group."""
    x, w = call.x, call.input(1, "weight")
    key = whole_param(w, 1)
    if key is None:
        return call.unsupported("prelu with computed slopes")
    if w.shape[0] > 1 and x.ndim > 1 and 1 in x.tags:
        call.join(x.tags[1], key, 0)
    return passthrough(call)
