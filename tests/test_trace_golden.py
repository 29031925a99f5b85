"""Golden specs: what the tracer derives for every reference and test model, frozen.

``tests/test_trace_golden.json`` holds ``spec.to_dict()`` (report included) of each case below
(first written before the tracer's rules moved into a registry; issue 12 added cases for the
zoo constructs and the ``torch.export`` front; every case also passes the self-check). A
change to what the tracer computes shows here as a readable diff of groups, axes, head
structures, activation points and report lines. When a change is intended, regenerate the
file and review its diff:

    cd tests && python test_trace_golden.py --update
"""

from __future__ import annotations

import json
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pymerge.spec import spec_from_model
from pymerge.testing.models import CNN, MLP, VGG, ResNet18, ResNet20, TinyGPT

sys.path.insert(0, str(Path(__file__).parent))
import test_trace as T  # noqa: E402  (the models of test_trace.py)
import test_trace_coverage as C  # noqa: E402  (issue 12's coverage models)
import test_zoo_models as Z  # noqa: E402  (local models with torchvision's structure)

GOLDEN = Path(__file__).with_name("test_trace_golden.json")


# --------------------------------------------------------------- extra coverage models
class ReduceZoo(nn.Module):
    """Reductions over feature and token dims, keepdim or not, expand / repeat, squeeze."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.scale = nn.Parameter(torch.rand(6) + 0.5)
        self.fc2 = nn.Linear(6, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, T, 4]
        h = self.fc(x)
        h = h - h.mean(-1, keepdim=True)
        h = h / (torch.std(h, dim=-1, keepdim=True) + 1e-5) * self.scale
        h = h + h.amax(1, keepdim=True) + torch.logsumexp(h, 1, keepdim=True)
        v = h.var(1) + torch.norm(h, dim=1) + h.prod(1) + torch.amin(h, 1)  # [N, 6]
        v = v.unsqueeze(1).expand(-1, 3, -1).squeeze(0)  # [N, 3, 6]
        r = v.repeat(1, 1, 1) + h[:, :3].expand_as(v)
        g = self.fc2(torch.sigmoid(r.view_as(r)))
        g = g.sum(dim=(0, 1)) + g.mean()  # [5]
        return self.out(torch.relu(g))


class ShapeZoo(nn.Module):
    """permute / transpose / t, views, unflatten, slicing, split sizes, cat and stack on
    other dims, cat with an unpermuted tensor, advanced indexing, size arithmetic."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 4)
        self.fc3 = nn.Linear(5, 4)
        self.fc4 = nn.Linear(4, 4)
        self.head = nn.Linear(4 * 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, 3, 4, 4]
        n = x.size(0)
        h = self.conv(x)
        c = h.shape[1]
        h = h.reshape(n, c, -1).permute(0, 2, 1)  # [N, 16, 6]
        h = torch.transpose(h, 1, 2).transpose(1, 2)
        h = self.fc(h[:, 1:, :])  # [N, 15, 8]
        a, b = torch.split(h, [3, 5], dim=-1)
        a = torch.cat([a, a[:, :, :2]], dim=-1)  # [N, 15, 5]
        b = b[..., None].squeeze(-1)
        u = self.fc3(a) + self.fc2(torch.cat([b, b[:, :, :3]], -1))  # [N, 15, 4]
        u = torch.stack([u, u], dim=1).flatten(1, 2)  # [N, 30, 4]
        u = torch.cat([u, u], dim=1)  # [N, 60, 4]
        u = u.unflatten(1, (6, 10)).mean(2)  # [N, 6, 4]
        w = self.fc4(u)[torch.tensor([1, 0])]  # advanced indexing
        w = torch.cat([w[:, 0], w[:, 1]], dim=-1)  # [2, 8]
        z = self.head(w)
        return z.t().t() + z.dim() * 0.0


class PoolZoo(nn.Module):
    """Functional and module pooling, pad, interpolate, 1-D and 3-D convs and norms,
    transposed 1-D conv, a grouped conv, InstanceNorm1d, LPPool2d."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.lp = nn.LPPool2d(2, 2)
        self.up = nn.Upsample(scale_factor=2)
        self.g = nn.Conv2d(6, 6, 3, padding=1, groups=2)
        self.c1 = nn.Conv1d(6, 5, 3, padding=1)
        self.inorm = nn.InstanceNorm1d(5, affine=True)
        self.mp1 = nn.MaxPool1d(2)
        self.ap1 = nn.AdaptiveAvgPool1d(2)
        self.ct1 = nn.ConvTranspose1d(5, 4, 3)
        self.c3 = nn.Conv3d(4, 4, 1)
        self.bn3 = nn.BatchNorm3d(4)
        self.ap3 = nn.AvgPool3d(1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, 3, 8, 8]
        h = self.c(x)
        h = F.max_pool2d(F.pad(h, (1, 1, 1, 1)), 2)  # [N, 6, 5, 5]
        h = F.interpolate(F.avg_pool2d(h, 1), size=(8, 8))
        h = self.up(self.lp(self.pool(h)))  # [N, 6, 4, 4]
        k = self.g(h)  # grouped: reported
        h = F.adaptive_max_pool2d(h + 0.0 * k.mean(), 2).flatten(2)  # [N, 6, 4]
        h = self.ap1(self.mp1(self.inorm(self.c1(h))))  # [N, 5, 1] -> ...
        h = self.ct1(h)  # [N, 4, L]
        h = self.ap3(self.bn3(self.c3(h[..., None, None])))
        return self.fc(h.mean((2, 3, 4)))


class AttnZoo(nn.Module):
    """batch-first MHA with a key padding mask, bmm, matmul with a 3-D parameter, sdpa with
    a tensor mask, an Embedding fed features (frozen), softmax / log_softmax modules."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True, bias=False)
        self.q = nn.Linear(8, 8)
        self.k = nn.Linear(8, 8)
        self.v = nn.Linear(8, 6)
        self.w3 = nn.Parameter(torch.randn(1, 6, 6))
        self.sm = nn.Softmax(-1)
        self.lsm = nn.LogSoftmax(-1)
        self.emb2 = nn.Embedding(10, 4)
        self.out = nn.Linear(6 + 4, 3)
        self.register_buffer("tril", torch.ones(8, 8, dtype=torch.bool).tril(), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # [N, T]
        x = self.emb(idx)
        pad = idx == 0
        a, _ = self.mha(x, x, x, key_padding_mask=pad)
        q, k, v = self.q(a), self.k(a), self.v(a)
        att = self.sm(torch.bmm(q, k.transpose(1, 2)))
        y = torch.bmm(att, v) @ self.w3  # [N, T, 6]
        t = idx.shape[1]
        mask = self.tril[:t, :t]
        y = F.scaled_dot_product_attention(y, y, y, attn_mask=mask)
        z = self.emb2(idx % 10)
        return self.lsm(self.out(torch.cat([y, z], -1)))


class Opaque(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + y


class WithOpaque(nn.Module):
    """A user leaf module without a rule, a PReLU with one parameter, F.linear with a
    non-parameter weight, dropout and a clamp with a tensor bound."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.act = nn.PReLU()
        self.drop = nn.Dropout(0.1)
        self.op = Opaque()
        self.fc2 = nn.Linear(6, 6)
        self.fc3 = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.act(self.fc(x)))
        g = self.fc2(h)
        o = self.op(g, h)
        m = F.linear(torch.clamp(g, max=o), h.t() @ h)
        return self.fc3(m + o)


def _cases() -> dict[str, Callable[[], tuple[nn.Module, Any, dict]]]:
    """name -> () -> (model, example inputs, spec_from_model keyword arguments)."""
    torch.manual_seed(0)
    img10, img16 = torch.randn(2, 3, 10, 10), torch.randn(2, 3, 16, 16)
    c: dict[str, Callable[[], tuple[nn.Module, Any, dict]]] = {
        "mlp": lambda: (MLP(12, (8, 9, 10), 3), torch.randn(2, 12), {}),
        "mlp_gelu_nobias": lambda: (
            MLP(7, (6, 5), 4, act="gelu", bias=False),
            torch.randn(2, 7),
            {},
        ),
        "cnn_bn_global": lambda: (CNN(3, (8, 12, 16), 5, "bn", image_size=10), img10, {}),
        "cnn_bn_flatten": lambda: (
            CNN(3, (8, 12), 5, "bn", image_size=10, pool="flatten", hidden=7),
            img10,
            {},
        ),
        "cnn_ln_flatten": lambda: (
            CNN(3, (8, 12), 5, "ln", image_size=10, pool="flatten"),
            img10,
            {},
        ),
        "cnn_ln_hidden": lambda: (
            CNN(3, (4, 6), 3, "ln", image_size=8, pool="flatten", hidden=7),
            torch.randn(2, 3, 8, 8),
            {},
        ),
        "cnn_gn": lambda: (CNN(3, (8, 12), 5, "gn", image_size=10, hidden=6), img10, {}),
        "cnn_gn2": lambda: (
            CNN(3, (8,), 4, "gn", image_size=6, gn_groups=2),
            img10[..., :6, :6],
            {},
        ),
        "cnn_none": lambda: (CNN(3, (8, 12), 5, "none", image_size=10, pool="flatten"), img10, {}),
        "resnet20": lambda: (ResNet20(1, 10, blocks=(2, 1, 1)), img10, {}),
        "resnet20_full": lambda: (ResNet20(), img16, {}),
        "resnet20_gn": lambda: (ResNet20(1, 10, norm="gn", blocks=(1, 1, 1)), img10, {}),
        "resnet20_ln": lambda: (ResNet20(1, 10, norm="ln", blocks=(1, 1, 1)), img10, {}),
        "resnet18": lambda: (ResNet18(10, width=8), img16, {}),
        "vgg_bn": lambda: (
            VGG((8, "M", 12, 12, "M"), image_size=12, hidden=9),
            torch.randn(2, 3, 12, 12),
            {},
        ),
        "vgg_gn": lambda: (
            VGG((8, "M", 12, "M"), norm="gn", image_size=12, hidden=9),
            torch.randn(2, 3, 12, 12),
            {},
        ),
        "vgg_plain": lambda: (
            VGG((8, "M", 12, "M"), norm=None, image_size=12, hidden=9),
            torch.randn(2, 3, 12, 12),
            {},
        ),
        "tinygpt": lambda: (TinyGPT(20, 16, 4, 2, 10), torch.randint(0, 20, (2, 5)), {}),
        "tinygpt_1": lambda: (
            TinyGPT(vocab=16, d_model=8, n_heads=2, n_layers=1, max_len=8),
            torch.randint(0, 16, (2, 8)),
            {},
        ),
        "tv_resnet18": lambda: (T.TVResNet18(), img16, {}),
        "branchy": lambda: (T.Branchy(), torch.randn(2, 3, 8, 8), {}),
        "convnextish": lambda: (T.ConvNeXtish(), torch.randn(2, 3, 6, 6), {}),
        "shared_linear": lambda: (T.SharedLinear(), torch.randn(2, 5), {}),
        "cross_attention": lambda: (
            T.CrossAttention(),
            (torch.randn(5, 2, 3), torch.randn(7, 2, 3)),
            {},
        ),
        "unsupported": lambda: (T.Unsupported(), torch.randn(3, 4), {}),
        "mlp_overrides": lambda: (
            MLP(6, (5, 4, 3), 2),
            torch.randn(2, 6),
            {"overrides": {"fc1": None}},
        ),
        "deep": lambda: (
            nn.Sequential(*[m for _ in range(50) for m in (nn.Linear(3, 3), nn.ReLU())]),
            torch.randn(2, 3),
            {},
        ),
        "tied": lambda: (T.Tied(), torch.randint(0, 10, (2, 3)), {}),
        "param_mix": lambda: (T.ParamMix(True), torch.randn(2, 3, 4), {}),
        "param_mix_buffer": lambda: (T.ParamMix(False), torch.randn(2, 3, 4), {}),
        "encoder_leaf": lambda: (
            T.WithEncoderLayer(),
            torch.randn(2, 4, 3),
            {"leaf_modules": (nn.TransformerEncoderLayer,)},
        ),
        "elementwise_zoo": lambda: (T.ElementwiseZoo(), torch.randn(2, 3, 8, 8), {}),
        "nano_attention": lambda: (T.NanoGPT(False), torch.randint(0, 20, (2, 7)), {}),
        "nano_sdpa": lambda: (T.NanoGPT(True), torch.randint(0, 20, (2, 7)), {}),
        "mixed_heads": lambda: (T.MixedHeads(), torch.randn(3, 4), {}),
        "functional_layers": lambda: (T.FunctionalLayers(), torch.randn(3, 4), {}),
        "module_zoo": lambda: (T.ModuleZoo(), torch.randn(3, 2, 8), {}),
        "reduce_zoo": lambda: (ReduceZoo(), torch.randn(2, 5, 4), {}),
        "shape_zoo": lambda: (ShapeZoo(), torch.randn(2, 3, 4, 4), {}),
        "pool_zoo": lambda: (PoolZoo(), torch.randn(2, 3, 8, 8), {}),
        "attn_zoo": lambda: (AttnZoo(), torch.randint(0, 10, (2, 5)), {}),
        "with_opaque": lambda: (WithOpaque(), torch.randn(6, 4), {"leaf_modules": (Opaque,)}),
        # issue 12: zoo constructs, and the torch.export front
        "indexing": lambda: (C.Indexing(), torch.randn(2, 3, 4), {}),
        "tiny_vit": lambda: (C.TinyViT(), torch.randn(2, 3, 8, 8), {}),
        "rope_gqa": lambda: (C.RopeGQA(False), torch.randint(0, 20, (2, 6)), {}),
        "rope_gqa_export": lambda: (
            C.RopeGQA(True),
            torch.randint(0, 20, (2, 6)),
            {"tracer": "export"},
        ),
        "pad_roll_drop": lambda: (C.PadRollDrop(), torch.randn(2, 3, 5, 5), {}),
        "grouped": lambda: (Z.GroupedBlock(), torch.randn(2, 3, 8, 8), {}),
        "tv_shufflenet": lambda: (Z.TVShuffleNet(), torch.randn(2, 3, 32, 32), {}),
        "tv_convnext": lambda: (Z.TVConvNeXt(), torch.randn(2, 3, 16, 16), {}),
        "resnet20_export": lambda: (ResNet20(1, 10, blocks=(1, 1, 1)), img10, {"tracer": "export"}),
        "nano_sdpa_export": lambda: (
            T.NanoGPT(True),
            torch.randint(0, 20, (2, 7)),
            {"tracer": "export"},
        ),
    }
    for norm in ("bn", "ln", "gn", "none"):
        for pool in ("global", "flatten"):
            for hidden in (None, 3):
                c[f"random_cnn_{norm}_{pool}_{hidden}"] = (
                    lambda norm=norm, pool=pool, hidden=hidden: (
                        CNN(
                            3, (4, 6), 3, norm, image_size=5, pool=pool, hidden=hidden, gn_groups=2
                        ),
                        torch.randn(2, 3, 5, 5),
                        {},
                    )
                )
    return c


CASES = _cases()


def traced(name: str) -> dict:
    model, x, kw = CASES[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return spec_from_model(model, x, **kw).to_dict()


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


def test_golden_covers_every_case(golden: dict) -> None:
    assert sorted(golden) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_spec_unchanged(name: str, golden: dict) -> None:
    assert traced(name) == golden[name]


def _one_line(m: re.Match) -> str:
    return "[" + re.sub(r",\s+", ", ", m.group(1)) + "]"


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python test_trace_golden.py --update")
    out = {name: traced(name) for name in sorted(CASES)}
    text = json.dumps(out, indent=1, sort_keys=True)
    # one line per axis reference: ["param", axis, start, stop, inner]
    text = re.sub(r'\[\s*("[^"]*"(?:,\s*(?:-?\d+|null))+)\s*\]', _one_line, text)
    GOLDEN.write_text(text + "\n")
    print(f"wrote {len(out)} specs to {GOLDEN}")
