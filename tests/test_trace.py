"""spec_from_model: torch.fx tracing of permutation groups."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pymerge.spec import (
    PermutationSpec,
    apply_permutation,
    random_permutation,
    resnet_spec,
    spec_from_model,
)
from pymerge.testing.models import CNN, MLP, VGG, ResNet18, ResNet20, TinyGPT


def _same_function(
    model: nn.Module,
    spec: PermutationSpec,
    *inputs: torch.Tensor,
    train: bool = False,
    seed: int = 0,
) -> dict:
    model = model.double().train(train)
    inputs = tuple(x.double() if x.is_floating_point() else x for x in inputs)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    perm = random_permutation(spec, sd, seed=seed)
    new = apply_permutation(spec, perm, sd)
    other = copy.deepcopy(model)
    other.load_state_dict(new)
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs), other(*inputs), rtol=1e-9, atol=1e-9)
    return perm


def _canon(spec: PermutationSpec) -> set:
    """Groups as sets of axis refs (names ignored) plus head structures."""
    groups = {g: frozenset(spec.perm_to_axes[g]) for g in spec.groups()}
    heads = {
        (h.num_heads, h.head_dim, frozenset(groups[g] for g in h.groups))
        for h in spec.heads.values()
    }
    return set(groups.values()), heads


# --------------------------------------------------------------- torchvision-style ResNet-18
class TVBasicBlock(nn.Module):
    """A verbatim-structure torchvision BasicBlock: one ReLU module used twice."""

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TVResNet18(nn.Module):
    def __init__(self, width: int = 8, num_classes: int = 7) -> None:
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(width, 1)
        self.layer2 = self._make_layer(2 * width, 2)
        self.layer3 = self._make_layer(4 * width, 2)
        self.layer4 = self._make_layer(8 * width, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width, num_classes)

    def _make_layer(self, planes: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers = [
            TVBasicBlock(self.inplanes, planes, stride, downsample),
            TVBasicBlock(planes, planes),
        ]
        self.inplanes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def test_torchvision_style_resnet18_traced() -> None:
    torch.manual_seed(0)
    model = TVResNet18()
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = spec_from_model(model, x)
    builder = resnet_spec((8, 16, 32, 64), (2, 2, 2, 2))
    assert _canon(spec) == _canon(builder)
    assert spec.free == builder.free and spec.no_cost == builder.no_cost
    # state dict names match our ResNet18 exactly, so its spec fits too
    assert set(ResNet18(7, width=8).state_dict()) == set(model.state_dict())
    _same_function(model, spec, x, seed=1)
    _same_function(copy.deepcopy(model), spec, x, train=True, seed=2)
    # the reused ReLU module is never an activation point (it fires twice per forward)
    assert all(
        ap.module.split(".")[-1] != "relu" or ap.module == "relu"
        for ap in spec.activation_points.values()
    )


# --------------------------------------------------------------- activation points
def _check_activation_points(model: nn.Module, spec: PermutationSpec, x: torch.Tensor) -> None:
    sizes = spec.validate(model.state_dict())
    mods = dict(model.named_modules())
    seen: dict[str, list[torch.Size]] = {}
    handles = []
    for ap in spec.activation_points.values():
        assert ap.module in mods, ap.module
        handles.append(
            mods[ap.module].register_forward_hook(
                lambda m, i, o, name=ap.module: seen.setdefault(name, []).append(o.shape)
            )
        )
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    for g, ap in spec.activation_points.items():
        shapes = seen[ap.module]
        assert len(shapes) == 1, f"{ap.module} fires {len(shapes)} times"
        assert shapes[0][ap.dim] == sizes[g], (g, ap, shapes[0])


REFERENCE = {
    "mlp": (lambda: MLP(12, (8, 9), 3), torch.randn(2, 12)),
    "cnn": (
        lambda: CNN(3, (8, 12), 5, "gn", image_size=8, pool="flatten", hidden=6),
        torch.randn(2, 3, 8, 8),
    ),
    "resnet20": (lambda: ResNet20(1, 10, blocks=(1, 1, 1)), torch.randn(2, 3, 8, 8)),
    "resnet18": (lambda: ResNet18(5, width=8), torch.randn(2, 3, 16, 16)),
    "tv_resnet18": (lambda: TVResNet18(), torch.randn(2, 3, 16, 16)),
    "vgg": (lambda: VGG((8, "M", 12, "M"), image_size=8), torch.randn(2, 3, 8, 8)),
    "tinygpt": (lambda: TinyGPT(20, 16, 4, 2, 10), torch.randint(0, 20, (2, 5))),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_activation_points_fire_once_with_group_size(name: str) -> None:
    make, x = REFERENCE[name]
    model = make()
    spec = spec_from_model(model, x)
    _check_activation_points(model, spec, x)
    assert spec.activation_points, "no activation point found"
    if hasattr(model, "spec"):
        _check_activation_points(model, model.spec(), x)


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet20", "resnet18", "vgg", "tinygpt"])
def test_traced_equals_builder(name: str) -> None:
    make, x = REFERENCE[name]
    model = make()
    traced, built = spec_from_model(model, x), model.spec()
    assert _canon(traced) == _canon(built)
    assert traced.free == built.free


def test_tinygpt_traced_heads_and_segments() -> None:
    model = TinyGPT(20, 16, 4, 2, 10)
    spec = spec_from_model(model, torch.randint(0, 20, (2, 5)))
    assert len(spec.heads) == 2
    for h in spec.heads.values():
        assert (h.num_heads, h.head_dim) == (4, 4) and len(h.groups) == 2
    qk = spec.perm_to_axes["blocks.0.attn.qk"]
    segs = sorted((r.start, r.stop) for r in qk if r.param == "blocks.0.attn.in_proj_weight")
    assert segs == [(0, 16), (16, 32)]
    # the residual stream includes embeddings, positional parameter, every LN and the head
    res = {(r.param, r.axis) for r in spec.perm_to_axes["tok_emb"]}
    assert {
        ("tok_emb.weight", 1),
        ("pos_emb", 1),
        ("ln_f.weight", 0),
        ("head.weight", 1),
        ("blocks.1.ln2.bias", 0),
    } <= res
    perm = random_permutation(spec, model.state_dict(), seed=0)
    for h in spec.heads.values():  # whole heads move together, same head perm for qk and vo
        hp = [perm[g].view(4, 4) // 4 for g in h.groups]
        assert torch.equal(hp[0], hp[1]) and bool((hp[0] == hp[0][:, :1]).all())


# --------------------------------------------------------------- harder graphs
class Branchy(nn.Module):
    """cat of two conv branches and the raw input; depthwise conv; functional relu."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 5, 1)
        self.bn = nn.BatchNorm2d(12)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.head = nn.Linear(12 * 4 * 4, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([F.relu(self.a(x)), x, torch.tanh(self.b(x))], dim=1)
        h = self.dw(self.bn(h))
        h = F.adaptive_avg_pool2d(h, 4).flatten(1)
        return self.out(F.gelu(self.head(h)))


def test_cat_segments_and_depthwise() -> None:
    torch.manual_seed(0)
    model = Branchy()
    x = torch.randn(3, 3, 8, 8)
    spec = spec_from_model(model, x)
    a_refs = {(r.param, r.axis, r.start, r.stop, r.inner) for r in spec.perm_to_axes["a"]}
    assert ("bn.weight", 0, 0, 4, 1) in a_refs and ("dw.weight", 0, 0, 4, 1) in a_refs
    assert ("head.weight", 1, 0, 64, 16) in a_refs
    b_refs = {(r.param, r.axis, r.start, r.stop, r.inner) for r in spec.perm_to_axes["b"]}
    assert ("head.weight", 1, 112, 192, 16) in b_refs
    _same_function(model, spec, x, seed=3)
    _same_function(copy.deepcopy(model), spec, x, train=True, seed=4)


class ConvNeXtish(nn.Module):
    """permute to channels-last, LayerNorm, MLP, permute back, residual; custom RMS norm with
    a parameter; view/reshape of the feature axis into [C, H*W] and back."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.dw = nn.Conv2d(c, c, 5, padding=2, groups=c)
        self.ln = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, 3 * c)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(3 * c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.cls = nn.Linear(c, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        n, c, h, w = x.shape
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(self.act(self.fc1(self.ln(y)))).permute(0, 3, 1, 2)
        x = x + y
        x = x.view(n, c, h * w).transpose(1, 2)  # [N, HW, C]
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.gamma
        return self.cls(x.mean(1))


def test_permute_transpose_custom_norm() -> None:
    torch.manual_seed(0)
    model = ConvNeXtish()
    x = torch.randn(2, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = spec_from_model(model, x)
    stem = {(r.param, r.axis) for r in spec.perm_to_axes["stem"]}
    assert {
        ("dw.weight", 0),
        ("ln.weight", 0),
        ("fc1.weight", 1),
        ("fc2.weight", 0),
        ("gamma", 0),
        ("cls.weight", 1),
    } <= stem
    assert "fc1" in spec.perm_to_axes
    _same_function(model, spec, x, seed=5)


class SharedLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.shared = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        h = torch.relu(self.shared(h))
        return self.out(torch.relu(self.shared(h)))


def test_module_called_twice_shares_one_permutation() -> None:
    torch.manual_seed(0)
    model = SharedLinear()
    x = torch.randn(4, 5)
    spec = spec_from_model(model, x)
    assert len(spec.groups()) == 1  # inp, shared (both axes) and out's input all tied
    refs = {(r.param, r.axis) for r in spec.perm_to_axes[spec.groups()[0]]}
    assert {("shared.weight", 0), ("shared.weight", 1), ("inp.weight", 0)} <= refs
    _same_function(model, spec, x, seed=6)


class CrossAttention(nn.Module):
    """Sequence-first nn.MultiheadAttention with kdim/vdim != embed_dim (separate weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(3, 8)
        self.kv = nn.Linear(3, 6)
        self.attn = nn.MultiheadAttention(8, 2, kdim=6, vdim=6, add_bias_kv=True)
        self.ln = nn.LayerNorm(8)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
        q = self.q(x)
        kv = torch.relu(self.kv(mem))
        a, _ = self.attn(q, kv, kv)
        return self.out(self.ln(q + a))


def test_cross_attention_unpacked_weights() -> None:
    torch.manual_seed(0)
    model = CrossAttention()
    x, mem = torch.randn(5, 2, 3), torch.randn(7, 2, 3)
    spec = spec_from_model(model, (x, mem))
    h = spec.heads["attn"]
    assert (h.num_heads, h.head_dim) == (2, 4)
    qk = {(r.param, r.axis) for r in spec.perm_to_axes["attn.qk"]}
    assert {("attn.q_proj_weight", 0), ("attn.k_proj_weight", 0), ("attn.bias_k", 2)} <= qk
    kv = {(r.param, r.axis) for r in spec.perm_to_axes["kv"]}
    assert {("attn.k_proj_weight", 1), ("attn.v_proj_weight", 1)} <= kv
    _same_function(model, spec, x, mem, seed=7)


class Unsupported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 6)
        self.fc3 = nn.Linear(6, 6)
        self.out = nn.Linear(6 + 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        h = torch.cumsum(torch.relu(self.fc2(h)), dim=1)  # order-dependent: not understood
        g = torch.relu(self.fc3(h))
        return self.out(torch.cat([g, g[:, :2]], dim=1))  # slicing the feature axis


def test_unsupported_ops_are_reported_and_frozen() -> None:
    torch.manual_seed(0)
    model = Unsupported()
    x = torch.randn(3, 4)
    with pytest.warns(UserWarning, match="cumsum"):
        spec = spec_from_model(model, x)
    text = "\n".join(spec.report)
    assert "cumsum" in text
    assert "fc1" in spec.perm_to_axes  # fc1 -> fc2 is unaffected
    assert "fc2" not in spec.perm_to_axes and "fc2.bias" in spec.free
    # the slice g[:, :2] refines fc3's group at the bound: [:2] and [2:] move separately
    assert sorted(g for g in spec.groups() if g.startswith("fc3")) == ["fc3[0]", "fc3[1]"]
    assert {(r.param, r.start, r.stop) for r in spec.perm_to_axes["fc3[0]"]} == {
        ("fc3.weight", 0, 2),
        ("fc3.bias", 0, 2),
        ("out.weight", 0, 2),
        ("out.weight", 6, 8),
    }
    _same_function(model, spec, x, seed=8)


def test_overrides_freeze_and_callable() -> None:
    model = MLP(6, (5, 4, 3), 2)
    x = torch.randn(2, 6)
    spec = spec_from_model(model, x, overrides={"fc1": None})
    assert spec.groups() == ["fc0", "fc2"] and "fc1.bias" in spec.free
    spec2 = spec_from_model(model, x, overrides=lambda s: s.without_groups(["fc2"]))
    assert spec2.groups() == ["fc0", "fc1"]
    spec3 = spec_from_model(model, x, overrides={"__free__": ["fc0.bias"]})
    assert spec3.groups() == ["fc1", "fc2"] and "fc0.weight" in spec3.free
    _same_function(model, spec, x)


def test_groupnorm_gives_block_structure() -> None:
    model = CNN(3, (8,), 4, "gn", image_size=6, gn_groups=2)
    spec = spec_from_model(model, torch.randn(2, 3, 6, 6))
    (h,) = spec.heads.values()
    assert (h.num_heads, h.head_dim, h.groups) == (2, 4, ("conv0",))


def test_deep_network_no_recursion_limit() -> None:
    layers: list[nn.Module] = []
    for _ in range(600):
        layers += [nn.Linear(3, 3), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(3, 1))
    spec = spec_from_model(model, torch.randn(2, 3))
    assert len(spec.groups()) == 600
    _same_function(model, spec, torch.randn(2, 3))


def test_model_not_modified_by_tracing() -> None:
    model = ResNet20(1, 10, blocks=(1, 1, 1)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec_from_model(model, torch.randn(2, 3, 8, 8))
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return x


def test_untraceable_model_raises() -> None:
    with pytest.raises(ValueError, match="could not trace DataDependent"):
        spec_from_model(DataDependent(), torch.randn(1, 2))
    with pytest.raises(TypeError):
        spec_from_model(lambda x: x, torch.randn(1, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape propagation"):
        spec_from_model(MLP(4, (3,), 2), torch.randn(2, 5))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.fc = nn.Linear(6, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(self.emb(idx))))


def test_tied_weights() -> None:
    torch.manual_seed(0)
    model = Tied()
    idx = torch.randint(0, 10, (2, 3))
    spec = spec_from_model(model, idx)
    _same_function(model, spec, idx, seed=9)


class ParamMix(nn.Module):
    """Parameters combined with each other, with a constant, with an unsliced positional
    table and as a clamp bound."""

    def __init__(self, persistent: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.g = nn.Parameter(torch.rand(6) + 0.5)
        self.pos = nn.Parameter(torch.randn(3, 6))
        self.out = nn.Linear(6, 2)
        self.register_buffer("c", torch.randn(6), persistent=persistent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.g * 2 + self.c
        h = torch.relu(self.fc(x)) + self.pos
        return self.out(torch.clamp(h * y, min=-self.g))


@pytest.mark.parametrize("persistent", [True, False])
def test_parameter_views_join_or_freeze(persistent: bool) -> None:
    torch.manual_seed(0)
    model = ParamMix(persistent)
    x = torch.randn(2, 3, 4)
    spec = spec_from_model(model, x)
    if persistent:  # c is in the state dict: it is permuted with g and pos
        refs = {(r.param, r.axis) for r in spec.perm_to_axes["fc"]}
        assert {("g", 0), ("c", 0), ("pos", 1), ("out.weight", 1)} <= refs
    else:  # c is a constant the permutation cannot touch: the group must freeze
        assert spec.groups() == []
    _same_function(model, spec, x, seed=10)


class WithEncoderLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
        self.mid = nn.Linear(8, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.mid(self.enc(self.inp(x)))))


def test_opaque_leaf_module_is_reported() -> None:
    model = WithEncoderLayer()
    x = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="leaf_modules"):
        spec_from_model(model, x, tracer="fx")
    with pytest.warns(UserWarning, match="enc"):
        spec = spec_from_model(model, x, leaf_modules=(nn.TransformerEncoderLayer,))
    assert spec.groups() == ["mid"]  # inp flows into the opaque layer: frozen
    assert any("enc" in r and "TransformerEncoderLayer" in r for r in spec.report)
    assert all(k in spec.free for k in model.state_dict() if k.startswith(("enc.", "inp.")))
    _same_function(model, spec, x)


class ElementwiseZoo(nn.Module):
    """Comparisons, where, pad, normalize, spatial mean, masked_fill, softmax on features."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 6, 3)
        self.c2 = nn.Conv2d(6, 5, 3)
        self.fc = nn.Linear(5, 4)
        self.o = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c(x)
        h = torch.where(h > 0, h, 0.1 * h)
        h = F.normalize(F.pad(h, (1, 1, 1, 1)), dim=1)
        h = self.fc(self.c2(h).mean((2, 3)))
        return self.o(F.softmax(h.masked_fill(h < -0.5, 0.0), -1))


def test_elementwise_ops_keep_groups() -> None:
    torch.manual_seed(0)
    model = ElementwiseZoo()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = spec_from_model(model, x)
    assert spec.groups() == ["c", "c2", "fc"]
    _same_function(model, spec, x, seed=11)


@settings(max_examples=6, deadline=None)
@given(
    st.lists(st.integers(2, 6), min_size=1, max_size=3),
    st.sampled_from(["bn", "ln", "gn", "none"]),
    st.sampled_from(["global", "flatten"]),
    st.one_of(st.none(), st.integers(2, 5)),
    st.integers(0, 1000),
)
def test_random_cnn_traced_equals_builder(widths, norm, pool, hidden, seed) -> None:
    widths = [2 * w for w in widths]  # even widths: GroupNorm(2) fits
    torch.manual_seed(seed)
    model = CNN(3, widths, 3, norm, image_size=5, pool=pool, hidden=hidden, gn_groups=2)
    x = torch.randn(2, 3, 5, 5)
    traced = spec_from_model(model, x)
    assert _canon(traced) == _canon(model.spec())
    _same_function(model, traced, x, seed=seed)


# --------------------------------------------------------------- hand-written attention
class NanoAttention(nn.Module):
    """nanoGPT-style causal self-attention: fused qkv Linear, split, view into heads,
    transpose, then either explicit matmul/softmax or scaled_dot_product_attention."""

    def __init__(self, d: int, n_heads: int, sdpa: bool) -> None:
        super().__init__()
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.n_heads, self.d, self.sdpa = n_heads, d, sdpa
        self.register_buffer(
            "tril", torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(self.d, dim=2)
        k = k.view(b, t, self.n_heads, c // self.n_heads).transpose(1, 2)
        q = q.view(b, t, self.n_heads, c // self.n_heads).transpose(1, 2)
        v = v.view(b, t, self.n_heads, c // self.n_heads).transpose(1, 2)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / k.size(-1) ** 0.5)
            att = att.masked_fill(self.tril[:, :, :t, :t] == 0, float("-inf"))
            y = F.softmax(att, dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class SwiGLU(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(d, 6 * d)
        self.w3 = nn.Linear(3 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, g = self.w12(x).chunk(2, dim=-1)
        return self.w3(a * F.silu(g))


class NanoGPT(nn.Module):
    def __init__(self, sdpa: bool, vocab: int = 20, d: int = 16, n_heads: int = 4) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(16, d)
        self.ln_1 = nn.LayerNorm(d)
        self.attn = NanoAttention(d, n_heads, sdpa)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = SwiGLU(d)
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return self.lm_head(self.ln_f(x))


@pytest.mark.parametrize("sdpa", [False, True])
def test_handwritten_attention_heads_and_swiglu(sdpa: bool) -> None:
    torch.manual_seed(0)
    model = NanoGPT(sdpa)
    idx = torch.randint(0, 20, (2, 7))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = spec_from_model(model, idx)
    (h,) = spec.heads.values()
    assert (h.num_heads, h.head_dim) == (4, 4)
    qk, vo = h.groups
    qk_refs = {(r.param, r.axis, r.start, r.stop) for r in spec.perm_to_axes[qk]}
    assert {
        ("attn.c_attn.weight", 0, 0, 16),
        ("attn.c_attn.weight", 0, 16, 32),
        ("attn.c_attn.bias", 0, 0, 16),
    } <= qk_refs
    vo_refs = {(r.param, r.axis, r.start, r.stop) for r in spec.perm_to_axes[vo]}
    assert {("attn.c_attn.weight", 0, 32, 48), ("attn.c_proj.weight", 1, 0, None)} <= vo_refs
    # SwiGLU halves share one permutation (a * silu(g) is elementwise)
    glu = {(r.param, r.axis, r.start, r.stop) for r in spec.perm_to_axes["mlp.w12[0]"]}
    assert {
        ("mlp.w12.weight", 0, 0, 48),
        ("mlp.w12.weight", 0, 48, 96),
        ("mlp.w3.weight", 1, 0, None),
    } <= glu
    res = {(r.param, r.axis) for r in spec.perm_to_axes["wte"]}
    assert {
        ("wpe.weight", 1),
        ("attn.c_attn.weight", 1),
        ("attn.c_proj.weight", 0),
        ("lm_head.weight", 1),
    } <= res
    perm = _same_function(model, spec, idx, seed=12)
    hp = [perm[g].view(4, 4) // 4 for g in h.groups]
    assert torch.equal(hp[0], hp[1]) and bool((hp[0] == hp[0][:, :1]).all())


class MixedHeads(nn.Module):
    """Averaging over heads mixes units across heads: must freeze, not mis-permute."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 8)
        self.out = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.qkv(x).view(x.shape[0], 4, 2)  # [N, heads, units]
        return self.out(y.mean(1))


def test_reducing_heads_freezes_group() -> None:
    model = MixedHeads()
    x = torch.randn(3, 4)
    spec = spec_from_model(model, x)
    assert "qkv" not in spec.perm_to_axes
    _same_function(model, spec, x)


class FunctionalLayers(nn.Module):
    """Parameters used directly: F.linear, x @ W, x @ W.t()."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 4))
        self.b1 = nn.Parameter(torch.randn(6))
        self.w2 = nn.Parameter(torch.randn(6, 5))  # used as x @ w2
        self.w3 = nn.Parameter(torch.randn(3, 5))  # used as x @ w3.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(F.linear(x, self.w1, self.b1))
        h = torch.tanh(h @ self.w2)
        return h @ self.w3.t()


def test_functional_linear_with_parameters() -> None:
    torch.manual_seed(0)
    model = FunctionalLayers()
    x = torch.randn(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = spec_from_model(model, x)
    groups = {g: {(r.param, r.axis) for r in refs} for g, refs in spec.perm_to_axes.items()}
    assert sorted(groups.values(), key=len) == [
        {("w2", 1), ("w3", 1)},
        {("w1", 0), ("b1", 0), ("w2", 0)},
    ]
    _same_function(model, spec, x, seed=13)


class ModuleZoo(nn.Module):
    """Conv1d/BatchNorm1d, ConvTranspose2d, InstanceNorm2d(affine), PReLU(per channel),
    Upsample, depthwise Conv2d, Softmax over channels, Unflatten."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(6)
        self.act1 = nn.PReLU(6)
        self.unflat = nn.Unflatten(2, (2, 4))  # [N, 6, 8] -> [N, 6, 2, 4]
        self.up = nn.Upsample(scale_factor=2)
        self.ct = nn.ConvTranspose2d(6, 5, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(5, affine=True)
        self.dw = nn.Conv2d(5, 5, 3, padding=1, groups=5)
        self.sm = nn.Softmax(dim=1)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.bn1(self.c1(x)))
        h = self.up(self.unflat(h))
        h = self.sm(self.dw(self.inorm(self.ct(h))))
        return self.fc(self.flat(self.pool(h)))


def test_module_zoo() -> None:
    torch.manual_seed(0)
    model = ModuleZoo()
    x = torch.randn(3, 2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = spec_from_model(model, x)
    c1 = {(r.param, r.axis) for r in spec.perm_to_axes["c1"]}
    assert {("c1.weight", 0), ("bn1.running_var", 0), ("act1.weight", 0), ("ct.weight", 0)} <= c1
    ct = {(r.param, r.axis) for r in spec.perm_to_axes["ct"]}
    assert {
        ("ct.weight", 1),
        ("ct.bias", 0),
        ("inorm.weight", 0),
        ("dw.weight", 0),
        ("dw.bias", 0),
        ("fc.weight", 1),
    } <= ct
    _same_function(model, spec, x, seed=14)
    _same_function(copy.deepcopy(model), spec, x, train=True, seed=15)
