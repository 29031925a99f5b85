"""Tiny random models of the zoos people use (timm, Hugging Face transformers) and local
modules with the structure of torchvision-specific constructs, for ``test_zoo.py``.

Nothing is downloaded: timm models come from ``timm.create_model(name, pretrained=False, ...)``
with small widths and depths, transformers models from config objects. ``transformers`` and
``timm`` are test-only dependencies (the ``test`` extra); tests skip with a reason when absent.

timm imports ``torchvision`` at import time (``FrozenBatchNorm2d``, dataset and transform
names) but none of the models built here use it. torchvision's PyPI wheels need the CUDA
build of torch, so where torchvision is not installed :func:`import_timm` puts an inert
placeholder package in its place first (every attribute a dummy class) and says so in
:data:`TIMM_NOTE`; a model that really called into it would fail loudly, not silently.

This module holds no tests (pytest collects it and finds none).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

TIMM_NOTE = ""


# ---------------------------------------------------------------------------- optional zoos
class _Placeholder(type):
    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return f"{cls.__name__}.{name}"


class _PlaceholderModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)

        def _unusable(self: Any, *a: Any, **k: Any) -> None:
            raise RuntimeError(f"torchvision placeholder {name} used (torchvision is absent)")

        return _Placeholder(name, (), {"__init__": _unusable})


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: Any) -> types.ModuleType:
        m = _PlaceholderModule(spec.name)
        m.__path__ = []
        return m

    def exec_module(self, module: types.ModuleType) -> None:
        return None


def import_timm() -> Any:
    """``timm``, or None when it is not installed (the caller skips)."""
    global TIMM_NOTE
    if importlib.util.find_spec("timm") is None:
        return None
    if "timm" not in sys.modules and importlib.util.find_spec("torchvision") is None:
        sys.meta_path.insert(0, _PlaceholderFinder())
        TIMM_NOTE = "torchvision absent: timm imported with an inert torchvision placeholder"
    return importlib.import_module("timm")


def import_transformers() -> Any:
    """``transformers``, or None when it is not installed (the caller skips)."""
    if importlib.util.find_spec("transformers") is None:
        return None
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


# ---------------------------------------------------------------------------- the zoo table
@dataclass
class ZooModel:
    """One zoo entry: how to build it and what to expect of it."""

    name: str
    family: str
    source: str  # "timm", "transformers", "local"
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple]
    max_unpermuted: float  # the stated bound on the fraction of parameters left unpermuted
    tracer: str = "auto"  # what spec_from_model is asked to use
    traced_by: str = "fx"  # which front is expected to produce the spec
    notes: str = ""
    kwargs: dict = field(default_factory=dict)


def _images(n: int = 2, size: int = 32) -> Callable[[], tuple]:
    return lambda: (torch.randn(n, 3, size, size),)


def _tokens(vocab: int, n: int = 2, t: int = 8) -> Callable[[], tuple]:
    return lambda: (torch.randint(0, vocab, (n, t)),)


def _timm(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        timm = import_timm()
        return timm.create_model(name, pretrained=False, **kw)

    return build


def _regnet() -> nn.Module:
    import_timm()
    from timm.models.regnet import RegNet, RegNetCfg

    cfg = RegNetCfg(depth=4, w0=8, wa=16.0, wm=1.5, group_size=4, se_ratio=0.25, stem_width=8)
    return RegNet(cfg, num_classes=10)


def _hf(config_cls: str, model_cls: str, **cfg: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        tf = import_transformers()
        config = getattr(tf, config_cls)(**cfg)
        config._attn_implementation = cfg.get("_attn_implementation", "sdpa")
        return getattr(tf, model_cls)(config)

    return build


_LLAMA_LIKE = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
    use_cache=False,
)


# ---------------------------------------------------------------------------- local modules
@torch.fx.wrap
def stochastic_depth(x: torch.Tensor, p: float, mode: str, training: bool = True) -> torch.Tensor:
    """Drop whole residual branches per sample (identity in eval). Written here with the
    structure of torchvision's ``torchvision.ops.stochastic_depth``: a function
    ``torch.fx.wrap``-ed at module level, so ``torch.fx`` records it as one opaque call."""
    if not training or p == 0.0:
        return x
    shape = [x.shape[0]] + [1] * (x.ndim - 1) if mode == "row" else [1] * x.ndim
    keep = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


# the tracer knows torchvision's function by its qualified name; this one stands in for it
stochastic_depth.__module__ = "torchvision.ops.stochastic_depth"
stochastic_depth.__qualname__ = "stochastic_depth"


class StochasticDepth(nn.Module):
    def __init__(self, p: float, mode: str = "row") -> None:
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stochastic_depth(x, self.p, self.mode, self.training)


class LayerNorm2d(nn.LayerNorm):
    """Channels-first LayerNorm as torchvision's ConvNeXt writes it: an ``nn.LayerNorm``
    subclass overriding ``forward`` with permutes around ``F.layer_norm``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    """A torchvision-structured ConvNeXt block: depthwise 7x7, channels-last LayerNorm via
    ``Permute``, Linear MLP, layer scale (a ``[C, 1, 1]`` parameter), stochastic depth."""

    def __init__(self, dim: int, p: float) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, 7, padding=3, groups=dim),
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim),
            nn.GELU(),
            nn.Linear(4 * dim, dim),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * 1e-6)
        self.stochastic_depth = StochasticDepth(p, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.stochastic_depth(self.layer_scale * self.block(x))


class Permute(nn.Module):
    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.permute(x, self.dims)


class TVConvNeXt(nn.Module):
    """torchvision-structured ConvNeXt: stem conv + LayerNorm2d, stages of CNBlocks,
    downsampling LayerNorm2d + conv 2x2/2, classifier LayerNorm2d + Flatten + Linear."""

    def __init__(self, dims: tuple[int, ...] = (8, 16), num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6))
        ]
        for i, d in enumerate(dims):
            layers.append(nn.Sequential(CNBlock(d, 0.1), CNBlock(d, 0.1)))
            if i + 1 < len(dims):
                layers.append(
                    nn.Sequential(LayerNorm2d(d, eps=1e-6), nn.Conv2d(d, dims[i + 1], 2, stride=2))
                )
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            LayerNorm2d(dims[-1], eps=1e-6), nn.Flatten(1), nn.Linear(dims[-1], num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle (the same view / transpose / view steps)."""
    n, c, h, w = x.size()
    x = x.view(n, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(n, c, h, w)


class ShuffleUnit(nn.Module):
    """A ShuffleNetV2-structured unit (stride 1): split the channels in two, one half
    through 1x1 conv - depthwise 3x3 - 1x1 conv, concatenate, shuffle two groups."""

    def __init__(self, c: int) -> None:
        super().__init__()
        h = c // 2
        self.branch2 = nn.Sequential(
            nn.Conv2d(h, h, 1, bias=False),
            nn.BatchNorm2d(h),
            nn.ReLU(),
            nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False),
            nn.BatchNorm2d(h),
            nn.Conv2d(h, h, 1, bias=False),
            nn.BatchNorm2d(h),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat((x1, self.branch2(x2)), dim=1), 2)


class ShuffleDown(nn.Module):
    """A ShuffleNetV2-structured downsampling unit: both branches see the whole input."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        h = c_out // 2
        self.branch1 = nn.Sequential(
            nn.Conv2d(c_in, c_in, 3, 2, 1, groups=c_in, bias=False),
            nn.BatchNorm2d(c_in),
            nn.Conv2d(c_in, h, 1, bias=False),
            nn.BatchNorm2d(h),
            nn.ReLU(),
        )
        self.branch2 = nn.Sequential(
            nn.Conv2d(c_in, h, 1, bias=False),
            nn.BatchNorm2d(h),
            nn.ReLU(),
            nn.Conv2d(h, h, 3, 2, 1, groups=h, bias=False),
            nn.BatchNorm2d(h),
            nn.Conv2d(h, h, 1, bias=False),
            nn.BatchNorm2d(h),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(torch.cat((self.branch1(x), self.branch2(x)), dim=1), 2)


class TVShuffleNet(nn.Module):
    """A small ShuffleNetV2 with torchvision's structure (stem, shuffle stages, conv5)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.stage2 = nn.Sequential(ShuffleDown(8, 16), ShuffleUnit(16))
        self.stage3 = nn.Sequential(ShuffleDown(16, 32), ShuffleUnit(32))
        self.conv5 = nn.Sequential(nn.Conv2d(32, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.maxpool(self.conv1(x))))
        return self.fc(self.conv5(x).mean([2, 3]))


class GroupedBlock(nn.Module):
    """ResNeXt / RegNet-style bottleneck: 1x1 conv, grouped 3x3 conv (4 groups of 4
    channels), 1x1 conv, with a residual; and a depthwise conv with channel multiplier 2."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(16)
        self.a = nn.Conv2d(16, 16, 1)
        self.bna = nn.BatchNorm2d(16)
        self.g = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.bng = nn.BatchNorm2d(16)
        self.c = nn.Conv2d(16, 16, 1)
        self.dw2 = nn.Conv2d(16, 32, 3, padding=1, groups=16)
        self.bnd = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        h = F.relu(self.bna(self.a(x)))
        h = F.relu(self.bng(self.g(h)))
        x = F.relu(x + self.c(h))
        x = F.relu(self.bnd(self.dw2(x)))
        return self.fc(x.mean((2, 3)))


# ---------------------------------------------------------------------------- the zoo
def zoo() -> list[ZooModel]:
    """Every zoo model (builders are lazy: nothing is imported until one is built)."""
    llama = dict(_LLAMA_LIKE)
    return [
        # ---- timm CNNs
        ZooModel(
            "timm_resnet",
            "ResNet",
            "timm",
            _timm(
                "resnet18",
                layers=(1, 1, 1, 1),
                channels=(8, 16, 24, 32),
                stem_width=8,
                num_classes=10,
            ),
            _images(),
            0.01,
        ),
        ZooModel(
            "timm_convnext_atto",
            "ConvNeXt (LayerNorm2d, conv MLP)",
            "timm",
            _timm(
                "convnext_atto",
                depths=(1, 1, 1, 1),
                dims=(8, 16, 24, 32),
                num_classes=10,
                ls_init_value=1e-6,
                drop_path_rate=0.1,
            ),
            _images(),
            0.01,
        ),
        ZooModel(
            "timm_convnext",
            "ConvNeXt (channels-last LayerNorm, Linear MLP)",
            "timm",
            _timm(
                "convnext_tiny",
                depths=(1, 1, 1, 1),
                dims=(8, 16, 24, 32),
                num_classes=10,
                drop_path_rate=0.1,
            ),
            _images(),
            0.01,
        ),
        ZooModel(
            "timm_efficientnet",
            "EfficientNet (BatchNormAct, squeeze-excitation, drop path)",
            "timm",
            _timm("test_efficientnet", num_classes=10, drop_path_rate=0.1),
            _images(),
            0.01,
        ),
        ZooModel(
            "timm_mobilenetv3",
            "MobileNetV3 (hard-swish, SE with hard-sigmoid)",
            "timm",
            _timm("mobilenetv3_small_050", num_classes=10),
            _images(),
            0.01,
        ),
        ZooModel("timm_regnet", "RegNet (grouped convs, SE)", "timm", _regnet, _images(), 0.01),
        # ---- timm transformers
        ZooModel(
            "timm_vit",
            "ViT (class token, fused qkv)",
            "timm",
            _timm(
                "vit_tiny_patch16_224",
                img_size=32,
                patch_size=8,
                embed_dim=32,
                depth=2,
                num_heads=4,
                num_classes=10,
                init_values=1e-5,
            ),
            _images(),
            0.01,
        ),
        ZooModel(
            "timm_vit_reg",
            "ViT (class + register tokens, avg pool)",
            "timm",
            _timm(
                "vit_tiny_patch16_224",
                img_size=32,
                patch_size=8,
                embed_dim=32,
                depth=2,
                num_heads=4,
                num_classes=10,
                reg_tokens=2,
                global_pool="avg",
            ),
            _images(),
            0.01,
        ),
        ZooModel(
            "timm_deit",
            "DeiT (class + distillation tokens, two heads)",
            "timm",
            _timm(
                "deit_tiny_distilled_patch16_224",
                img_size=32,
                patch_size=8,
                embed_dim=32,
                depth=2,
                num_heads=4,
                num_classes=10,
            ),
            _images(),
            0.01,
        ),
        ZooModel(
            "timm_swin",
            "Swin (windows, shifted windows, relative position bias, patch merging)",
            "timm",
            _timm(
                "swin_tiny_patch4_window7_224",
                img_size=32,
                patch_size=2,
                window_size=4,
                embed_dim=16,
                depths=(2, 2),
                num_heads=(2, 4),
                num_classes=10,
            ),
            _images(),
            0.01,
        ),
        ZooModel(
            "timm_vit_relpos",
            "ViT with a relative-position MLP bias (a per-head sdpa mask)",
            "timm",
            _timm("test_vit_relpos", num_classes=10, img_size=64),
            _images(size=64),
            0.01,
        ),
        ZooModel(
            "timm_vit_dynamic",
            "ViT with dynamic image size (position table resampled; fx cannot trace it)",
            "timm",
            _timm("test_vit", num_classes=10),
            _images(size=64),
            0.01,
            traced_by="export",
        ),
        ZooModel(
            "timm_coatnet",
            "CoAtNet (MBConv stages, relative-position attention)",
            "timm",
            _timm("test_coatnet", num_classes=10, img_size=64),
            _images(size=64),
            0.01,
        ),
        # ---- local modules with torchvision's structure
        ZooModel(
            "tv_convnext", "ConvNeXt (torchvision structure)", "local", TVConvNeXt, _images(), 0.01
        ),
        ZooModel(
            "tv_shufflenet",
            "ShuffleNetV2 (channel shuffle)",
            "local",
            TVShuffleNet,
            _images(),
            0.01,
        ),
        ZooModel(
            "grouped",
            "grouped + multiplier depthwise convs",
            "local",
            GroupedBlock,
            _images(n=2, size=8),
            0.01,
        ),
        # ---- Hugging Face transformers
        ZooModel(
            "hf_gpt2",
            "GPT-2 (Conv1D, learned positions, tied embeddings)",
            "transformers",
            _hf(
                "GPT2Config",
                "GPT2LMHeadModel",
                vocab_size=64,
                n_positions=16,
                n_embd=32,
                n_layer=2,
                n_head=4,
                use_cache=False,
            ),
            _tokens(64),
            0.01,
            traced_by="export",
        ),
        ZooModel(
            "hf_llama",
            "Llama (GQA, RoPE, RMSNorm, SwiGLU)",
            "transformers",
            _hf("LlamaConfig", "LlamaForCausalLM", **llama),
            _tokens(64),
            0.01,
            traced_by="export",
        ),
        ZooModel(
            "hf_mistral",
            "Mistral (GQA, sliding window)",
            "transformers",
            _hf("MistralConfig", "MistralForCausalLM", **llama, sliding_window=4),
            _tokens(64),
            0.01,
            traced_by="export",
        ),
        ZooModel(
            "hf_qwen2",
            "Qwen2 (GQA, qkv biases)",
            "transformers",
            _hf("Qwen2Config", "Qwen2ForCausalLM", **llama),
            _tokens(64),
            0.01,
            traced_by="export",
        ),
        ZooModel(
            "hf_bert",
            "BERT (post-norm encoder, pooler, classifier)",
            "transformers",
            _hf(
                "BertConfig",
                "BertForSequenceClassification",
                vocab_size=64,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=48,
                max_position_embeddings=16,
                num_labels=3,
            ),
            _tokens(64),
            0.01,
            traced_by="export",
        ),
    ]
