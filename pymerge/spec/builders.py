"""Hand-written PermutationSpec builders for common architectures.

Parameter names follow the reference models in :mod:`pymerge.testing.models` (and torchvision for
ResNet-18); every builder takes a ``prefix`` for models nested inside another module.
Activation points name post-nonlinearity modules where the model has one.
"""

from __future__ import annotations

from collections.abc import Sequence

from pymerge.spec.spec import ActivationPoint, AxisRef, HeadStructure, PermutationSpec

__all__ = ["mlp_spec", "cnn_spec", "resnet_spec", "vgg_spec", "transformer_spec"]

_BN = ("weight", "bias", "running_mean", "running_var")


class _Builder:
    """Accumulates groups, free/no_cost keys, heads and activation points."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.p2a: dict[str, list[AxisRef]] = {}
        self.free: set[str] = set()
        self.no_cost: set[str] = set()
        self.heads: dict[str, HeadStructure] = {}
        self.aps: dict[str, ActivationPoint] = {}

    def k(self, name: str) -> str:
        return self.prefix + name

    def add(
        self,
        group: str,
        name: str,
        axis: int,
        start: int = 0,
        stop: int | None = None,
        inner: int = 1,
    ) -> None:
        self.p2a.setdefault(group, []).append(AxisRef(self.k(name), axis, start, stop, inner))

    def norm(self, group: str, mod: str, norm: str | None, width: int, gn_groups: int) -> None:
        """Register the params of a norm layer ``mod`` on channel group ``group``."""
        if norm in (None, "none"):
            return
        if norm == "bn":
            for p in _BN:
                self.add(group, f"{mod}.{p}", 0)
            self.no_cost.update(
                {
                    self.k(f"{mod}.running_mean"),
                    self.k(f"{mod}.running_var"),
                    self.k(f"{mod}.num_batches_tracked"),
                }
            )
            self.free.add(self.k(f"{mod}.num_batches_tracked"))
        elif norm in ("ln", "gn"):
            self.add(group, f"{mod}.weight", 0)
            self.add(group, f"{mod}.bias", 0)
            if norm == "gn":
                g = gn_groups
                if 1 < g < width:
                    self.heads[f"{group}.gn"] = HeadStructure(g, width // g, (group,))
        else:
            raise ValueError(f"unknown norm {norm!r}; use 'bn', 'ln', 'gn' or 'none'")

    def ap(self, group: str, module: str, dim: int = 1) -> None:
        self.aps[group] = ActivationPoint(self.k(module), dim)

    def build(self) -> PermutationSpec:
        return PermutationSpec(
            self.p2a,
            free=self.free,
            no_cost=self.no_cost,
            heads=self.heads,
            activation_points=self.aps,
        )


def mlp_spec(num_hidden: int, *, bias: bool = True, prefix: str = "") -> PermutationSpec:
    """Spec of :class:`pymerge.testing.models.MLP` with ``num_hidden`` hidden layers.

    Layers ``fc0..fc{L-1}`` (hidden, groups named ``fc{i}``) and ``out`` (classifier); the
    output bias is free. Activation points: ``act{i}`` (dim 1).
    """
    if num_hidden < 1:
        raise ValueError(f"num_hidden must be >= 1, got {num_hidden}")
    b = _Builder(prefix)
    names = [f"fc{i}" for i in range(num_hidden)] + ["out"]
    for i in range(num_hidden):
        g = names[i]
        b.add(g, f"{g}.weight", 0)
        if bias:
            b.add(g, f"{g}.bias", 0)
        b.add(g, f"{names[i + 1]}.weight", 1)
        b.ap(g, f"act{i}")
    if bias:
        b.free.add(b.k("out.bias"))
    return b.build()


def cnn_spec(
    widths: Sequence[int],
    *,
    norm: str = "bn",
    pool: str = "global",
    spatial: int = 1,
    hidden: int | None = None,
    gn_groups: int = 4,
    conv_bias: bool = True,
    prefix: str = "",
) -> PermutationSpec:
    """Spec of :class:`pymerge.testing.models.CNN`: ``conv{i} -> norm{i} -> act{i}``, then either
    global pooling or a flatten (``spatial`` = H*W of the last feature map, the ``inner`` block
    size), an optional hidden Linear ``fc`` (+ ``fc_act``), and the classifier ``out``."""
    if pool not in ("global", "flatten"):
        raise ValueError(f"pool must be 'global' or 'flatten', got {pool!r}")
    b = _Builder(prefix)
    n = len(widths)
    head_in = "fc" if hidden else "out"
    for i, w in enumerate(widths):
        g = f"conv{i}"
        b.add(g, f"conv{i}.weight", 0)
        if conv_bias:
            b.add(g, f"conv{i}.bias", 0)
        b.norm(g, f"norm{i}", norm, w, gn_groups)
        if i + 1 < n:
            b.add(g, f"conv{i + 1}.weight", 1)
        else:
            b.add(g, f"{head_in}.weight", 1, inner=spatial if pool == "flatten" else 1)
        b.ap(g, f"act{i}")
    if hidden:
        b.add("fc", "fc.weight", 0)
        b.add("fc", "fc.bias", 0)
        b.add("fc", "out.weight", 1)
        b.ap("fc", "fc_act")
    b.free.add(b.k("out.bias"))
    return b.build()


def resnet_spec(
    widths: Sequence[int],
    blocks: Sequence[int],
    *,
    stem_width: int | None = None,
    norm: str = "bn",
    gn_groups: int = 4,
    conv_bias: bool | None = None,
    downsample: Sequence[bool] | None = None,
    fc: str = "fc",
    prefix: str = "",
) -> PermutationSpec:
    """Spec of a BasicBlock ResNet with torchvision names (``conv1``, ``bn1``,
    ``layer{s}.{b}.conv1/bn1/conv2/bn2/downsample.0/.1``, ``fc``): ResNet-20 and ResNet-18 of
    :mod:`pymerge.testing.models`.

    Each stage's residual stream is one group ``layer{s}`` (block outputs, ``bn2``,
    downsample, and the stem when stage 1 has no downsample); each block's inner channels
    are ``layer{s}.{b}``. ``downsample[s]``: whether block 0 of stage s has a projection
    shortcut (default: stage > 0 or width change).
    """
    if len(widths) != len(blocks) or not widths:
        raise ValueError("widths and blocks must have the same non-zero length")
    stem_width = widths[0] if stem_width is None else stem_width
    conv_bias = (norm in (None, "none")) if conv_bias is None else conv_bias
    if downsample is None:
        downsample = [s > 0 or stem_width != widths[0] for s in range(len(widths))]
    b = _Builder(prefix)

    def conv_out(group: str, conv: str) -> None:
        b.add(group, f"{conv}.weight", 0)
        if conv_bias:
            b.add(group, f"{conv}.bias", 0)

    # group of the tensor entering stage s (stem output or previous stage's stream)
    if downsample[0]:
        cur = "conv1"
        cur_width = stem_width
        b.ap(cur, "relu")
    else:
        cur = "layer1"
        cur_width = widths[0]
    conv_out(cur, "conv1")
    b.norm(cur, "bn1", norm, cur_width, gn_groups)
    for s, (w, nb) in enumerate(zip(widths, blocks, strict=True)):
        stream = f"layer{s + 1}"
        for blk in range(nb):
            m = f"layer{s + 1}.{blk}"
            b.add(cur, f"{m}.conv1.weight", 1)
            if blk == 0 and downsample[s]:
                b.add(cur, f"{m}.downsample.0.weight", 1)
                conv_out(stream, f"{m}.downsample.0")
                b.norm(stream, f"{m}.downsample.1", norm, w, gn_groups)
            inner = m
            conv_out(inner, f"{m}.conv1")
            b.norm(inner, f"{m}.bn1", norm, w, gn_groups)
            b.add(inner, f"{m}.conv2.weight", 1)
            b.ap(inner, f"{m}.relu")
            conv_out(stream, f"{m}.conv2")
            b.norm(stream, f"{m}.bn2", norm, w, gn_groups)
            cur = stream
        b.ap(stream, f"layer{s + 1}.{nb - 1}")
    b.add(cur, f"{fc}.weight", 1)
    b.free.add(b.k(f"{fc}.bias"))
    return b.build()


def vgg_spec(
    cfg: Sequence[int | str],
    *,
    norm: str | None = "bn",
    spatial: int = 1,
    hidden: int = 64,
    gn_groups: int = 4,
    prefix: str = "",
) -> PermutationSpec:
    """Spec of :class:`pymerge.testing.models.VGG`: ``features`` is a Sequential of conv[, norm],
    ReLU and ``"M"`` max-pools; then flatten (``spatial`` = final H*W) and
    ``classifier = [Linear(C*H*W, hidden), ReLU, Linear(hidden, classes)]``."""
    b = _Builder(prefix)
    idx = 0
    prev: str | None = None
    for c in cfg:
        if c == "M":
            idx += 1
            continue
        g = f"features.{idx}"
        if prev is not None:
            b.add(prev, f"features.{idx}.weight", 1)
        b.add(g, f"features.{idx}.weight", 0)
        b.add(g, f"features.{idx}.bias", 0)
        idx += 1
        if norm not in (None, "none"):
            b.norm(g, f"features.{idx}", norm, int(c), gn_groups)
            idx += 1
        b.ap(g, f"features.{idx}")
        idx += 1
        prev = g
    if prev is None:
        raise ValueError("cfg has no conv layer")
    b.add(prev, "classifier.0.weight", 1, inner=spatial)
    for p, ax in (("classifier.0.weight", 0), ("classifier.0.bias", 0), ("classifier.2.weight", 1)):
        b.add("classifier.0", p, ax)
    b.ap("classifier.0", "classifier.1")
    b.free.add(b.k("classifier.2.bias"))
    return b.build()


def transformer_spec(
    n_layers: int,
    d_model: int,
    n_heads: int,
    *,
    head_bias: bool = False,
    pos_emb: str | None = "pos_emb",
    tok_emb: str = "tok_emb",
    prefix: str = "",
) -> PermutationSpec:
    """Spec of :class:`pymerge.testing.models.TinyGPT` (pre-LN GPT with nn.MultiheadAttention).

    Groups: ``res`` (residual stream: embeddings, every LayerNorm, attention ``out_proj``
    rows, MLP ``fc2`` rows, ``in_proj``/``fc1``/``head`` columns); ``blocks.{i}.mlp`` (MLP
    hidden units); ``blocks.{i}.attn.qk`` (q and k rows of ``in_proj``) and
    ``blocks.{i}.attn.vo`` (v rows, ``out_proj`` columns) sharing the head structure
    ``blocks.{i}.attn``.
    """
    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
    b = _Builder(prefix)
    E = d_model
    b.add("res", f"{tok_emb}.weight", 1)
    if pos_emb:
        b.add("res", pos_emb, 1)
    for i in range(n_layers):
        m = f"blocks.{i}"
        for ln in ("ln1", "ln2"):
            b.add("res", f"{m}.{ln}.weight", 0)
            b.add("res", f"{m}.{ln}.bias", 0)
        b.add("res", f"{m}.attn.in_proj_weight", 1)
        b.add("res", f"{m}.attn.out_proj.weight", 0)
        b.add("res", f"{m}.attn.out_proj.bias", 0)
        b.add("res", f"{m}.mlp.fc1.weight", 1)
        b.add("res", f"{m}.mlp.fc2.weight", 0)
        b.add("res", f"{m}.mlp.fc2.bias", 0)
        qk, vo = f"{m}.attn.qk", f"{m}.attn.vo"
        for p in ("in_proj_weight", "in_proj_bias"):
            b.add(qk, f"{m}.attn.{p}", 0, 0, E)
            b.add(qk, f"{m}.attn.{p}", 0, E, 2 * E)
            b.add(vo, f"{m}.attn.{p}", 0, 2 * E, 3 * E)
        b.add(vo, f"{m}.attn.out_proj.weight", 1)
        b.heads[f"{m}.attn"] = HeadStructure(n_heads, E // n_heads, (qk, vo))
        g = f"{m}.mlp"
        b.add(g, f"{m}.mlp.fc1.weight", 0)
        b.add(g, f"{m}.mlp.fc1.bias", 0)
        b.add(g, f"{m}.mlp.fc2.weight", 1)
        b.ap(g, f"{m}.mlp.act", -1)
    b.add("res", "ln_f.weight", 0)
    b.add("res", "ln_f.bias", 0)
    b.add("res", "head.weight", 1)
    b.ap("res", "ln_f", -1)
    if head_bias:
        b.free.add(b.k("head.bias"))
    return b.build()
