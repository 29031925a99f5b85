"""Reference architectures with matching permutation specs.

Every model uses activation *modules* (``nn.ReLU``/``nn.GELU``), each called once, so
activation-matching hooks see every hidden feature. ``model.spec()`` returns the builder
spec (see :mod:`pymerge.spec.builders`); :func:`pymerge.spec_from_model` traces the same.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from pymerge.spec.builders import cnn_spec, mlp_spec, resnet_spec, transformer_spec, vgg_spec
from pymerge.spec.spec import PermutationSpec

__all__ = ["MLP", "CNN", "ResNet20", "ResNet18", "BasicBlock", "VGG", "TinyGPT", "make_norm"]

_ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


def _act(name: str) -> nn.Module:
    if name not in _ACTS:
        raise ValueError(f"unknown activation {name!r}; use one of {sorted(_ACTS)}")
    return _ACTS[name]()


def make_norm(
    norm: str | None, channels: int, *, gn_groups: int = 4, shape: Sequence[int] | None = None
) -> nn.Module:
    """``"bn"`` BatchNorm2d, ``"gn"`` GroupNorm(gn_groups), ``"ln"`` LayerNorm over
    ``shape`` (C, H, W) if given else GroupNorm(1, C), ``"none"``/None Identity."""
    if norm in (None, "none"):
        return nn.Identity()
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "gn":
        if channels % gn_groups:
            raise ValueError(f"GroupNorm: {channels} channels not divisible by {gn_groups}")
        return nn.GroupNorm(gn_groups, channels)
    if norm == "ln":
        return nn.LayerNorm(list(shape)) if shape is not None else nn.GroupNorm(1, channels)
    raise ValueError(f"unknown norm {norm!r}; use 'bn', 'ln', 'gn' or 'none'")


class MLP(nn.Sequential):
    """``flatten -> fc0 -> act0 -> ... -> out``. Input ``[N, *]`` flattened to ``in_dim``;
    output ``[N, out_dim]``. Spec: :meth:`spec` (groups ``fc{i}``)."""

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int] = (512, 512, 512),
        out_dim: int = 10,
        act: str = "relu",
        bias: bool = True,
    ) -> None:
        hidden = list(hidden)
        if not hidden:
            raise ValueError("MLP needs at least one hidden layer")
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        prev = in_dim
        for i, h in enumerate(hidden):
            layers[f"fc{i}"] = nn.Linear(prev, h, bias=bias)
            layers[f"act{i}"] = _act(act)
            prev = h
        layers["out"] = nn.Linear(prev, out_dim, bias=bias)
        super().__init__(layers)
        self.num_hidden = len(hidden)
        self.bias = bias

    def spec(self) -> PermutationSpec:
        return mlp_spec(self.num_hidden, bias=self.bias)


def _conv_out(size: int, stride: int) -> int:
    return (size - 1) // stride + 1  # kernel 3, padding 1


class CNN(nn.Module):
    """Plain CNN: ``conv{i}`` (3x3, stride 1 then 2) -> ``norm{i}`` -> ``act{i}``; head either
    global average pooling or flatten of the last C x H x W map; optional hidden Linear
    ``fc``/``fc_act``; classifier ``out``. Input ``[N, in_channels, image_size, image_size]``."""

    def __init__(
        self,
        in_channels: int = 3,
        widths: Sequence[int] = (16, 32, 64),
        num_classes: int = 10,
        norm: str = "bn",
        image_size: int = 32,
        pool: str = "global",
        hidden: int | None = None,
        gn_groups: int = 4,
        act: str = "relu",
    ) -> None:
        super().__init__()
        if pool not in ("global", "flatten"):
            raise ValueError(f"pool must be 'global' or 'flatten', got {pool!r}")
        self.cfg = dict(
            widths=tuple(widths), norm=norm, pool=pool, hidden=hidden, gn_groups=gn_groups
        )
        prev, size = in_channels, image_size
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            size = _conv_out(size, stride)
            self.add_module(f"conv{i}", nn.Conv2d(prev, w, 3, stride=stride, padding=1))
            self.add_module(
                f"norm{i}", make_norm(norm, w, gn_groups=gn_groups, shape=(w, size, size))
            )
            self.add_module(f"act{i}", _act(act))
            prev = w
        self.n_conv = len(widths)
        self.spatial = size * size
        if pool == "global":
            self.pool = nn.AdaptiveAvgPool2d(1)
            feat = prev
        else:
            self.pool = nn.Identity()
            feat = prev * self.spatial
        self.flatten = nn.Flatten()
        if hidden:
            self.fc = nn.Linear(feat, hidden)
            self.fc_act = _act(act)
            feat = hidden
        self.out = nn.Linear(feat, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.n_conv):
            x = getattr(self, f"act{i}")(getattr(self, f"norm{i}")(getattr(self, f"conv{i}")(x)))
        x = self.flatten(self.pool(x))
        if self.cfg["hidden"]:
            x = self.fc_act(self.fc(x))
        return self.out(x)

    def spec(self) -> PermutationSpec:
        c = self.cfg
        return cnn_spec(
            c["widths"],
            norm=c["norm"],
            pool=c["pool"],
            hidden=c["hidden"],
            spatial=self.spatial if c["pool"] == "flatten" else 1,
            gn_groups=c["gn_groups"],
        )


class BasicBlock(nn.Module):
    """torchvision-style BasicBlock (param names conv1, bn1, conv2, bn2, downsample.0/.1).
    Uses two ReLU modules (``relu`` inside, ``relu2`` after the residual add)."""

    def __init__(
        self, cin: int, cout: int, stride: int = 1, norm: str = "bn", gn_groups: int = 4
    ) -> None:
        super().__init__()
        bias = norm in (None, "none")
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)
        self.bn1 = make_norm(norm, cout, gn_groups=gn_groups)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=bias)
        self.bn2 = make_norm(norm, cout, gn_groups=gn_groups)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=bias),
                make_norm(norm, cout, gn_groups=gn_groups),
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + identity)


class _ResNet(nn.Module):
    def __init__(
        self,
        stem: nn.Module | None,
        stem_width: int,
        widths: Sequence[int],
        blocks: Sequence[int],
        strides: Sequence[int],
        num_classes: int,
        norm: str,
        gn_groups: int,
        in_channels: int,
        stem_kernel: int,
    ) -> None:
        super().__init__()
        bias = norm in (None, "none")
        pad = stem_kernel // 2
        stride = 2 if stem_kernel == 7 else 1
        self.conv1 = nn.Conv2d(
            in_channels, stem_width, stem_kernel, stride=stride, padding=pad, bias=bias
        )
        self.bn1 = make_norm(norm, stem_width, gn_groups=gn_groups)
        self.relu = nn.ReLU()
        self.maxpool = stem if stem is not None else nn.Identity()
        prev = stem_width
        for s, (w, nb, st) in enumerate(zip(widths, blocks, strides, strict=True)):
            layer = nn.Sequential(
                *[
                    BasicBlock(prev if b == 0 else w, w, st if b == 0 else 1, norm, gn_groups)
                    for b in range(nb)
                ]
            )
            self.add_module(f"layer{s + 1}", layer)
            prev = w
        self.n_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(prev, num_classes)
        self._cfg = dict(
            widths=tuple(widths),
            blocks=tuple(blocks),
            stem_width=stem_width,
            norm=norm,
            gn_groups=gn_groups,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for s in range(self.n_stages):
            x = getattr(self, f"layer{s + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def spec(self) -> PermutationSpec:
        c = self._cfg
        ds = [
            getattr(self, f"layer{s + 1}")[0].downsample is not None for s in range(self.n_stages)
        ]
        return resnet_spec(
            c["widths"],
            c["blocks"],
            stem_width=c["stem_width"],
            norm=c["norm"],
            gn_groups=c["gn_groups"],
            downsample=ds,
        )


class ResNet20(_ResNet):
    """CIFAR ResNet-20: 3x3 stem (16w), stages of 3 BasicBlocks at 16w/32w/64w (strides
    1/2/2), 1x1-conv projection shortcuts, global pooling, ``fc``. Input ``[N, 3, H, W]``."""

    def __init__(
        self,
        width_multiplier: int = 1,
        num_classes: int = 10,
        norm: str = "bn",
        gn_groups: int = 4,
        in_channels: int = 3,
        blocks: Sequence[int] = (3, 3, 3),
    ) -> None:
        w = [16 * width_multiplier, 32 * width_multiplier, 64 * width_multiplier]
        super().__init__(
            None, w[0], w, blocks, (1, 2, 2), num_classes, norm, gn_groups, in_channels, 3
        )


class ResNet18(_ResNet):
    """torchvision-style ResNet-18 (same state-dict names): 7x7/2 stem ``conv1``, ``bn1``,
    ``maxpool``, ``layer1..4`` of 2 BasicBlocks at width, 2w, 4w, 8w, ``avgpool``, ``fc``.
    ``width=64`` gives torchvision's shapes."""

    def __init__(
        self,
        num_classes: int = 1000,
        width: int = 64,
        norm: str = "bn",
        gn_groups: int = 4,
        in_channels: int = 3,
    ) -> None:
        w = [width, 2 * width, 4 * width, 8 * width]
        super().__init__(
            nn.MaxPool2d(3, 2, 1),
            width,
            w,
            (2, 2, 2, 2),
            (1, 2, 2, 2),
            num_classes,
            norm,
            gn_groups,
            in_channels,
            7,
        )


class VGG(nn.Module):
    """Small VGG: ``features`` = Sequential of Conv3x3 [+ norm] + ReLU and ``"M"`` max-pools,
    flatten, ``classifier`` = [Linear(C*H*W, hidden), ReLU, Linear(hidden, num_classes)]."""

    def __init__(
        self,
        cfg: Sequence[int | str] = (16, "M", 32, "M", 64, "M"),
        num_classes: int = 10,
        norm: str | None = "bn",
        in_channels: int = 3,
        image_size: int = 32,
        hidden: int = 64,
        gn_groups: int = 4,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev, size = in_channels, image_size
        for c in cfg:
            if c == "M":
                layers.append(nn.MaxPool2d(2))
                size //= 2
                continue
            layers.append(nn.Conv2d(prev, int(c), 3, padding=1))
            if norm not in (None, "none"):
                layers.append(
                    make_norm(norm, int(c), gn_groups=gn_groups, shape=(int(c), size, size))
                )
            layers.append(nn.ReLU())
            prev = int(c)
        self.features = nn.Sequential(*layers)
        self.spatial = size * size
        self.classifier = nn.Sequential(
            nn.Linear(prev * self.spatial, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )
        self._cfg = dict(cfg=tuple(cfg), norm=norm, hidden=hidden, gn_groups=gn_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))

    def spec(self) -> PermutationSpec:
        c = self._cfg
        return vgg_spec(
            c["cfg"],
            norm=c["norm"],
            spatial=self.spatial,
            hidden=c["hidden"],
            gn_groups=c["gn_groups"],
        )


class GPTMLP(nn.Module):
    def __init__(self, d: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class GPTBlock(nn.Module):
    """Pre-LN block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, d: int, n_heads: int, mlp_hidden: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, n_heads, dropout=dropout, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = GPTMLP(d, mlp_hidden, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """GPT-style decoder: token embedding ``tok_emb`` + learned positional ``pos_emb``
    ``[max_len, d_model]``, ``n_layers`` pre-LN blocks (causal nn.MultiheadAttention,
    GELU MLP), final ``ln_f`` and ``head`` (no bias). Input ``[N, T]`` int64 tokens with
    ``T <= max_len``; output logits ``[N, T, vocab]``."""

    def __init__(
        self,
        vocab: int = 64,
        d_model: int = 32,
        n_heads: int = 4,
        n_layers: int = 2,
        max_len: int = 64,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d_model)
        self.pos_emb = nn.Parameter(torch.randn(max_len, d_model) * 0.02)
        self.blocks = nn.ModuleList(
            [GPTBlock(d_model, n_heads, mlp_ratio * d_model, dropout) for _ in range(n_layers)]
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        mask = torch.triu(torch.ones(max_len, max_len, dtype=torch.bool), diagonal=1)
        self.register_buffer("causal_mask", mask, persistent=False)
        self._cfg = (n_layers, d_model, n_heads)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok_emb(idx) + self.pos_emb[:t]
        mask = self.causal_mask[:t, :t]
        for blk in self.blocks:
            x = blk(x, mask)
        return self.head(self.ln_f(x))

    def spec(self) -> PermutationSpec:
        n_layers, d, h = self._cfg
        return transformer_spec(n_layers, d, h)
