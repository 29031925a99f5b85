"""Tracer coverage added for the model zoos (issue 12), on small local models:

- never a silent wrong spec: advanced indexing of a feature axis freezes, tensors passed by
  keyword to elementwise ops keep their groups, MultiheadAttention pairs separate q/k/v
  weights by name, a subclass overriding a helper ``forward`` calls is traced through, a
  parameter axis used where no permutation follows it is pinned; the self-check (on by
  default) raises naming the first group at fault;
- transformers: class tokens concatenated along the sequence join the stream, fused qkv
  split by ``reshape(..., 3, H, D)`` / ``unbind``, rotary embeddings (whole heads: a joint
  permutation of RoPE's pairs is shown to break it), grouped-query attention (key/value
  heads move with their query heads, also via ``enable_gqa``), RMSNorm;
- CNNs: grouped convolutions (within blocks), depthwise with a multiplier, channel shuffle,
  ``F.pad`` of the spatial dims only, ``torch.roll``, drop path;
- the ``torch.export`` front reads the same rules: it derives the same groups as
  ``torch.fx`` on the reference models, with activation points that fire once.
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pymerge.spec import (
    PermutationSpec,
    apply_permutation,
    check_spec,
    random_permutation,
    register_module_rule,
    spec_from_model,
)
from pymerge.spec.tracing import module_rule_for, passthrough, registry
from pymerge.spec.tracing.attention import _mha_inputs
from pymerge.spec.tracing.check import SpecCheckError, perturb_state
from pymerge.spec.tracing.state import TraceState
from pymerge.spec.tracing.values import Piece, Value
from pymerge.testing.models import CNN, MLP, VGG, ResNet20

sys.path.insert(0, str(Path(__file__).parent))
import test_trace as T  # noqa: E402
import test_zoo_models as Z  # noqa: E402

# tiny models run fastest (and far less load-sensitive) on one torch thread
pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------- helpers
def same_function(model: nn.Module, spec: PermutationSpec, *inputs: torch.Tensor, seed: int = 0):
    """A random permutation keeps the float64 outputs (1-D state entries re-randomised);
    returns the permutation."""
    model = copy.deepcopy(model).double().eval()
    perturb_state(model, seed)
    xs = tuple(x.double() if x.is_floating_point() else x for x in inputs)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    perm = random_permutation(spec, sd, seed=seed)
    other = copy.deepcopy(model)
    other.load_state_dict(apply_permutation(spec, perm, sd))
    with torch.no_grad():
        a, b = model(*xs), other(*xs)
    scale = float(a.abs().max())
    assert float((a - b).abs().max()) <= 1e-9 * max(scale, 1.0)
    return perm


def refs(spec: PermutationSpec, group: str) -> set[tuple]:
    return {(r.param, r.axis, r.start, r.stop, r.inner) for r in spec.perm_to_axes[group]}


def group_of(spec: PermutationSpec, param: str, axis: int) -> str:
    (g,) = {g for r, g in spec.axes_to_perm[param] if r.axis == axis}
    return g


@pytest.fixture
def restore_registry():
    tables = (registry._MODULES, registry._FUNCTIONS, registry._METHODS, registry._QUALNAMES)
    saved = [dict(t) for t in tables]
    yield
    for table, old in zip(tables, saved, strict=True):
        table.clear()
        table.update(old)
    registry._RESOLVED.clear()


# --------------------------------------------------------------- never a silent wrong spec
class Indexing(nn.Module):
    """Last-token pooling (advanced indexing of the batch and token dims keeps the feature
    dim) and a fancy index of the feature axis (must freeze)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 5)
        self.fc3 = nn.Linear(4, 4)
        self.out = nn.Linear(5 + 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, T, 4]
        h = torch.relu(self.fc1(x))
        last = h[torch.arange(x.shape[0]), torch.tensor([2, 1])]  # [N, 6]
        g = torch.relu(self.fc3(x))[:, -1][:, [1, 0, 3, 2]]  # features shuffled: frozen
        return self.out(torch.cat([torch.relu(self.fc2(last)), g], -1))


def test_advanced_indexing_freezes_the_indexed_axis_only() -> None:
    torch.manual_seed(0)
    model, x = Indexing(), torch.randn(2, 3, 4)
    with pytest.warns(UserWarning, match="advanced indexing"):
        spec = spec_from_model(model, x)
    assert ("fc2.weight", 1, 0, None, 1) in refs(spec, "fc1")  # the feature dim survives
    assert "fc3.weight" not in spec.axes_to_perm and "fc3.bias" in spec.free
    assert any("fc3" in r and "indexed by a tensor" in r for r in spec.report)
    same_function(model, spec, x, seed=1)


class KeywordOperand(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.mul(2.0, other=torch.relu(self.fc(x))))


def test_elementwise_tensor_passed_by_keyword_keeps_its_group() -> None:
    torch.manual_seed(0)
    spec = spec_from_model(KeywordOperand(), torch.randn(3, 4))
    assert ("out.weight", 1, 0, None, 1) in refs(spec, "fc")
    same_function(KeywordOperand(), spec, torch.randn(3, 4), seed=2)


def test_separate_qkv_weights_pair_by_name() -> None:
    """A query that is not a traced tensor must not shift key/value onto q/k weights."""
    st = TraceState()
    e = st.new(5, "kv")
    joined: list[tuple[str, int]] = []
    mod = SimpleNamespace(_qkv_same_embed_dim=False)
    call = SimpleNamespace(
        module=mod,
        name="attn",
        key=lambda p: f"attn.{p}",
        freeze=lambda *a: None,
        freeze_pieces=lambda *a: None,
        join=lambda pieces, key, axis: joined.append((key, axis)),
    )
    kv = Value((2, 3, 5), {2: (Piece(e, 0, 5),)})
    _mha_inputs(call, [None, kv, kv])
    assert joined == [("attn.k_proj_weight", 1), ("attn.v_proj_weight", 1)]


class StdConv2d(nn.Conv2d):
    """Weight standardisation by overriding ``_conv_forward`` (forward is Conv2d's own)."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias):  # type: ignore[override]
        w = (weight - weight.mean((1, 2, 3), keepdim=True)) / (weight.std((1, 2, 3), keepdim=True))
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)


class QuietConv2d(nn.Conv2d):
    def __init__(self, *a, **k) -> None:
        super().__init__(*a, **k)
        self.note = "same computation"


def test_overriding_a_helper_of_forward_drops_the_parent_rule() -> None:
    torch.manual_seed(0)
    assert module_rule_for(StdConv2d) is None
    assert module_rule_for(QuietConv2d) is module_rule_for(nn.Conv2d)
    model = nn.Sequential(StdConv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.Flatten(1))
    x = torch.randn(2, 3, 7, 7)
    spec = spec_from_model(model, x, warn=False)
    assert "0.weight" in spec.free  # the standardised weight is computed: its layer freezes
    same_function(model, spec, x, seed=3)


class PinnedParam(nn.Module):
    """``s`` joins the features in one place and scales a fixed tensor in another: moving
    it with the group would change the second use."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.s = nn.Parameter(torch.randn(6))
        self.out = nn.Linear(6, 2)
        self.register_buffer("c", torch.randn(3, 6), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x) * self.s  # [N, 6]
        bias = (self.c * self.s).sum(0)  # s along a dim no group follows
        return self.out(torch.relu(h) + bias)


def test_parameter_used_unpermuted_pins_its_axis() -> None:
    torch.manual_seed(0)
    spec = spec_from_model(PinnedParam(), torch.randn(3, 4))
    assert "fc" not in spec.perm_to_axes
    same_function(PinnedParam(), spec, torch.randn(3, 4), seed=4)


class MixingUnit(nn.Module):
    """Flips the feature order: it mixes features, so a pass-through rule is wrong."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(-1)


class WithMixing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.mix = MixingUnit()
        self.ok = nn.Linear(6, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.ok(self.mix(torch.relu(self.fc(x))))))


def test_self_check_names_the_group_a_wrong_rule_breaks(restore_registry) -> None:
    torch.manual_seed(0)
    register_module_rule(MixingUnit, passthrough)  # a wrong rule
    model, x = WithMixing(), torch.randn(3, 4)
    with pytest.raises(SpecCheckError, match="permuting group 'fc' alone") as err:
        spec_from_model(model, x)
    assert err.value.groups == ["fc"] and isinstance(err.value, ValueError)
    assert "check=False" in str(err.value)
    spec = spec_from_model(model, x, check=False)
    assert check_spec(model, spec, x) == ["fc"]
    fixed = spec.without_groups(err.value.groups)
    assert check_spec(model, fixed, x) == []
    same_function(model, fixed, x, seed=5)


def test_self_check_perturbs_norms_so_it_can_fail() -> None:
    """With stock norm parameters a wrongly permuted LayerNorm changes nothing; the check
    perturbs them first, so it catches the wrong spec."""
    torch.manual_seed(0)
    model, x = T.ConvNeXtish(), torch.randn(2, 3, 6, 6)
    spec = spec_from_model(model, x)
    assert check_spec(model, spec, x) == []
    g = group_of(spec, "ln.weight", 0)
    wrong = spec.with_groups(
        {g: [r for r in spec.perm_to_axes[g] if not r.param.startswith("ln.")]}
    ).with_free(["ln.weight", "ln.bias"])
    assert g in check_spec(model, wrong, x)


def test_self_check_skips_with_a_warning_when_it_cannot_run(monkeypatch) -> None:
    from pymerge.spec.tracing import check

    model, x = MLP(4, (3,), 2), torch.randn(2, 4)
    monkeypatch.setattr(check, "MAX_COPY", 50)  # bytes: the float64 and float32 copies exceed it
    with pytest.warns(UserWarning, match="self-check skipped: a .* copy is over"):
        spec = spec_from_model(model, x)
    assert spec.report[-1].startswith("self-check skipped")
    with pytest.raises(ValueError, match="check_spec: skipped"):
        check_spec(model, spec, x)


def test_self_check_chooses_activation_points_that_fire_once() -> None:
    model, x = ResNet20(1, 10, blocks=(1, 1, 1)), torch.randn(2, 3, 8, 8)
    T._check_activation_points(model, spec_from_model(model, x), x)
    T._check_activation_points(model, spec_from_model(model, x, check=False), x)


# --------------------------------------------------------------- the tracer option, export
class ShapeLoop(nn.Module):
    """Python over a shape: torch.fx cannot trace it, torch.export can."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(x))
        acc = h[0]
        for i in range(1, x.shape[0]):
            acc = acc + h[i]
        return self.out(acc)


def test_tracer_option_and_fallback() -> None:
    torch.manual_seed(0)
    model, x = ShapeLoop(), torch.randn(3, 4)
    with pytest.raises(ValueError, match="tracer must be one of"):
        spec_from_model(model, x, tracer="dynamo")
    with pytest.raises(ValueError, match="torch.fx could not trace ShapeLoop.*tracer='export'"):
        spec_from_model(model, x, tracer="fx")
    auto = spec_from_model(model, x)
    assert auto.report[0].startswith("traced with torch.export: torch.fx could not trace")
    exported = spec_from_model(model, x, tracer="export")
    assert auto == exported and ("out.weight", 1, 0, None, 1) in refs(auto, "fc")
    same_function(model, auto, x, seed=6)
    with pytest.raises(ValueError, match="could not trace DataDependent.*torch.export"):
        spec_from_model(T.DataDependent(), torch.randn(1, 2))


EXPORT_CASES = {
    "mlp": (lambda: MLP(12, (8, 9), 3), torch.randn(2, 12)),
    "cnn_bn": (lambda: CNN(3, (8, 12), 5, "bn", image_size=8), torch.randn(2, 3, 8, 8)),
    "cnn_ln": (
        lambda: CNN(3, (4, 6), 3, "ln", image_size=8, pool="flatten", hidden=7),
        torch.randn(2, 3, 8, 8),
    ),
    "cnn_gn": (
        lambda: CNN(3, (8, 12), 5, "gn", image_size=8, pool="flatten", hidden=6),
        torch.randn(2, 3, 8, 8),
    ),
    "resnet20": (lambda: ResNet20(1, 10, blocks=(1, 1, 1)), torch.randn(2, 3, 8, 8)),
    "vgg": (lambda: VGG((8, "M", 12, "M"), image_size=8), torch.randn(2, 3, 8, 8)),
    "tv_resnet18": (lambda: T.TVResNet18(), torch.randn(2, 3, 16, 16)),
    "nano_sdpa": (lambda: T.NanoGPT(True), torch.randint(0, 20, (2, 7))),
    "nano_matmul": (lambda: T.NanoGPT(False), torch.randint(0, 20, (2, 7))),
    "convnextish": (lambda: T.ConvNeXtish(), torch.randn(2, 3, 6, 6)),
    "tied": (lambda: T.Tied(), torch.randint(0, 10, (2, 3))),
    "prelu_ln_module": (
        lambda: nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.PReLU(4), nn.Conv2d(4, 2, 1), nn.Flatten(1), nn.LayerNorm(18)
        ),
        torch.randn(2, 3, 5, 5),
    ),
    "grouped": (Z.GroupedBlock, torch.randn(2, 3, 8, 8)),
    "shufflenet": (Z.TVShuffleNet, torch.randn(2, 3, 32, 32)),
}


@pytest.mark.parametrize("name", sorted(EXPORT_CASES))
def test_export_front_reads_the_same_rules(name: str) -> None:
    """The same spec from both fronts (groups and their names, free and unscored keys, head
    structures, activation points), and the exported spec's activation points fire once
    with the group's size."""
    torch.manual_seed(0)
    make, x = EXPORT_CASES[name]
    model = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fx_spec = spec_from_model(model, x, tracer="fx")
        ex_spec = spec_from_model(model, x, tracer="export")
    assert fx_spec.to_dict(include_report=False) == ex_spec.to_dict(include_report=False)
    T._check_activation_points(model, ex_spec, x)
    assert ex_spec.activation_points
    same_function(model, ex_spec, x, seed=7)


# --------------------------------------------------------------- transformers
class TinyViT(nn.Module):
    """timm-structured ViT: patch conv, class + register tokens concatenated along the
    sequence, learned positions, fused qkv split by ``reshape(B, N, 3, H, D)`` and
    ``unbind``, sdpa, class-token pooling."""

    def __init__(self, d: int = 16, heads: int = 4, regs: int = 2) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.reg = nn.Parameter(torch.randn(1, regs, d))
        self.pos = nn.Parameter(torch.randn(1, 1 + regs + 4, d))
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)
        self.h = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)  # [B, 4, d]
        b, n0, c = x.shape
        x = torch.cat([self.cls.expand(b, -1, -1), self.reg.expand(b, -1, -1), x], dim=1)
        x = x + self.pos
        n = x.shape[1]
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.h, c // self.h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(y)
        return self.head(self.norm(x)[:, 0])


def test_class_tokens_and_fused_qkv_join_the_stream() -> None:
    torch.manual_seed(0)
    model, x = TinyViT(), torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = spec_from_model(model, x)
    stream = group_of(spec, "patch.weight", 0)
    assert {("cls", 2), ("reg", 2), ("pos", 2), ("qkv.weight", 1), ("head.weight", 1)} <= {
        (p, a) for p, a, *_ in refs(spec, stream)
    }
    (h,) = spec.heads.values()
    assert (h.num_heads, h.head_dim) == (4, 4)
    assert sum(t.numel() for k, t in model.state_dict().items() if k in spec.free) == 3
    same_function(model, spec, x, seed=8)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    return torch.cat((-x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]), dim=-1)


class RopeGQA(nn.Module):
    """Llama-structured attention block: RMSNorm, q/k/v projections, rotary embeddings
    (rotate-half), key/value heads repeated for their query heads (``repeat_kv`` or
    ``enable_gqa``), sdpa, o_proj, SwiGLU MLP."""

    def __init__(self, gqa_sdpa: bool, d: int = 16, heads: int = 4, kv: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, d)
        self.norm = nn.RMSNorm(d)
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, kv * d // heads, bias=True)
        self.v = nn.Linear(d, kv * d // heads, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.norm2 = nn.RMSNorm(d)
        self.gate = nn.Linear(d, 24, bias=False)
        self.up = nn.Linear(d, 24, bias=False)
        self.down = nn.Linear(24, d, bias=False)
        self.head = nn.Linear(d, 20, bias=False)
        self.h, self.kv, self.hd, self.gqa_sdpa = heads, kv, d // heads, gqa_sdpa
        inv = 1.0 / (10000 ** (torch.arange(0, self.hd, 2).float() / self.hd))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        b, t, _ = x.shape
        f = torch.outer(torch.arange(t, dtype=self.inv_freq.dtype), self.inv_freq)
        emb = torch.cat((f, f), dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        hs = self.norm(x)
        q = self.q(hs).view(b, t, self.h, self.hd).transpose(1, 2)
        k = self.k(hs).view(b, t, self.kv, self.hd).transpose(1, 2)
        v = self.v(hs).view(b, t, self.kv, self.hd).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if self.gqa_sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            g = self.h // self.kv
            k = k[:, :, None].expand(b, self.kv, g, t, self.hd).reshape(b, self.h, t, self.hd)
            v = v[:, :, None].expand(b, self.kv, g, t, self.hd).reshape(b, self.h, t, self.hd)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(y.transpose(1, 2).reshape(b, t, -1))
        hs = self.norm2(x)
        x = x + self.down(F.silu(self.gate(hs)) * self.up(hs))
        return self.head(x)


@pytest.mark.parametrize("gqa_sdpa", [False, True])
@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_rope_gqa_moves_whole_key_value_head_groups(tracer: str, gqa_sdpa: bool) -> None:
    torch.manual_seed(0)
    model, idx = RopeGQA(gqa_sdpa), torch.randint(0, 20, (2, 6))
    spec = spec_from_model(model, idx, tracer=tracer)
    heads = group_of(spec, "k.weight", 0)
    assert refs(spec, heads) == {
        ("q.weight", 0, 0, None, 8),  # 2 query heads of 4 units per key/value head
        ("k.weight", 0, 0, None, 4),
        ("k.bias", 0, 0, None, 4),
        ("v.weight", 0, 0, None, 4),
        ("o.weight", 1, 0, None, 8),
    }
    assert not spec.heads  # no permutation within heads (RoPE)
    stream = group_of(spec, "emb.weight", 1)
    assert {("norm.weight", 0), ("norm2.weight", 0), ("head.weight", 1)} <= {
        (p, a) for p, a, *_ in refs(spec, stream)
    }
    same_function(model, spec, idx, seed=9)


def test_rope_pairs_permuted_jointly_change_the_scores() -> None:
    """Why RoPE admits whole heads only: rotary pairs (i, i + D/2) rotate at frequencies of
    their own, so even permuting pairs jointly in q and k changes q . k."""
    torch.manual_seed(0)
    d, t = 8, 5
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).double() / d))
    f = torch.outer(torch.arange(t).double(), inv)
    cos, sin = torch.cat([f, f], -1).cos(), torch.cat([f, f], -1).sin()

    def rope(x: torch.Tensor) -> torch.Tensor:
        return x * cos + rotate_half(x) * sin

    q, k = torch.randn(t, d, dtype=torch.double), torch.randn(t, d, dtype=torch.double)
    pairs = torch.tensor([1, 0, 3, 2])
    perm = torch.cat([pairs, pairs + d // 2])
    scores, permuted = rope(q) @ rope(k).T, rope(q[:, perm]) @ rope(k[:, perm]).T
    assert float((scores - permuted).abs().max()) > 0.1 * float(scores.abs().max())
    torch.testing.assert_close(scores, rope(q) @ rope(k).T)  # whole heads: unchanged


class BiasedAttention(nn.Module):
    """sdpa with a per-head additive mask ``[1, H, N, N]``: from an MLP over relative
    positions (timm's RelPosMlp), from a parameter table indexed by a buffer (Swin / BEiT
    relative position bias), or a constant per-head buffer (ALiBi-like: the heads cannot
    move). A fused k/v projection with one head is split as ``reshape(B, N, 2, C)`` blocks."""

    def __init__(self, kind: str, d: int = 8, heads: int = 2, n: int = 4) -> None:
        super().__init__()
        self.kind, self.h, self.n = kind, heads, n
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, heads))
        self.table = nn.Parameter(torch.randn((2 * n - 1), heads))
        rel = torch.arange(n)[:, None] - torch.arange(n)[None, :] + n - 1
        self.register_buffer("index", rel, persistent=False)
        self.register_buffer("coords", torch.randn(n, n, 2), persistent=False)
        self.register_buffer("slopes", torch.randn(heads, 1, 1), persistent=False)
        self.k1 = nn.Linear(d, 2 * d)  # one head: k and v as blocks
        self.out = nn.Linear(2 * d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, d]
        b, n, c = x.shape
        q = self.q(x).view(b, n, self.h, c // self.h).transpose(1, 2)
        k, v = self.kv(x).reshape(b, n, 2, self.h, c // self.h).permute(2, 0, 3, 1, 4).unbind(0)
        if self.kind == "mlp":
            bias = self.mlp(self.coords).permute(2, 0, 1)[None]
        elif self.kind == "table":
            bias = self.table[self.index.reshape(-1)].view(n, n, -1).permute(2, 0, 1)[None]
        else:
            bias = (self.slopes * self.index.float())[None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        y = self.proj(y.transpose(1, 2).reshape(b, n, c))
        k1, v1 = self.k1(x).reshape(b, n, 2, c).permute(2, 0, 1, 3).unbind(0)
        z = F.scaled_dot_product_attention(y[:, None], k1[:, None], v1[:, None])[:, 0]
        return self.out(torch.cat([y, z], -1).mean(1))


@pytest.mark.parametrize("kind", ["mlp", "table", "constant"])
def test_per_head_attention_mask_meets_the_heads(kind: str) -> None:
    torch.manual_seed(0)
    model, x = BiasedAttention(kind), torch.randn(2, 4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = spec_from_model(model, x)
    if kind == "constant":  # heads pinned by the per-head constant: q/k/v frozen
        assert "q.weight" not in spec.axes_to_perm and "kv.weight" not in spec.axes_to_perm
    else:  # heads move whole, with the bias's head axis
        heads = group_of(spec, "q.weight", 0)
        bias = ("mlp.2.weight", 0) if kind == "mlp" else ("table", 1)
        assert bias in {(p, a) for p, a, *_ in refs(spec, heads)}
        assert ("q.weight", 0, 0, None, 4) in refs(spec, heads)
    k1 = group_of(spec, "k1.weight", 0)  # reshape(B, N, 2, C) + unbind: blocks, not heads
    assert {("k1.weight", 0, 0, 8, 1), ("k1.weight", 0, 8, 16, 1)} <= refs(spec, k1)
    same_function(model, spec, x, seed=13)


class ResampledPositions(nn.Module):
    """A class token's position kept, the patch positions resampled to the input size
    (timm's dynamic image size): slices, reshape, interpolate and cat of parameter views."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, d, 2, stride=2)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 1 + 9, d))
        self.fc = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x)
        b, c, h, w = t.shape
        grid = self.pos[:, 1:].reshape(1, 3, 3, c).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bilinear").permute(0, 2, 3, 1)
        pos = torch.cat([self.pos[:, :1], grid.reshape(1, h * w, c)], dim=1)
        x = torch.cat([self.cls.expand(b, -1, -1), t.flatten(2).transpose(1, 2)], 1) + pos
        return self.head(x + self.fc(x))[:, 0]


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_resampled_position_table_joins_the_stream(tracer: str) -> None:
    torch.manual_seed(0)
    model, x = ResampledPositions(), torch.randn(2, 3, 8, 8)
    spec = spec_from_model(model, x, tracer=tracer)
    stream = group_of(spec, "patch.weight", 0)
    assert {("pos", 2), ("cls", 2), ("fc.weight", 1)} <= {(p, a) for p, a, *_ in refs(spec, stream)}
    same_function(model, spec, x, seed=14)


# --------------------------------------------------------------- CNNs
def test_grouped_conv_permutes_within_blocks() -> None:
    torch.manual_seed(0)
    model, x = Z.GroupedBlock(), torch.randn(2, 3, 8, 8)
    spec = spec_from_model(model, x)
    blocks = [g for g in spec.groups() if g.startswith("g.g")]
    assert len(blocks) == 4
    assert refs(spec, "g.g1") >= {("g.weight", 0, 4, 8, 1), ("g.bias", 0, 4, 8, 1)}
    shared = group_of(spec, "g.weight", 1)  # every input block permuted alike
    assert {("a.weight", 0, s, s + 4, 1) for s in (0, 4, 8, 12)} <= refs(spec, shared)
    dw = group_of(spec, "dw2.weight", 0)  # depthwise x2: blocks of two output channels
    assert ("dw2.weight", 0, 0, None, 2) in refs(spec, dw)
    same_function(model, spec, x, seed=10)


def test_channel_shuffle_is_a_known_group_permutation() -> None:
    torch.manual_seed(0)
    model, x = Z.TVShuffleNet(), torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = spec_from_model(model, x)
    # shuffled channels move in blocks (pairs after one shuffle, fours after two)
    assert {r.inner for r, _ in spec.axes_to_perm["stage3.1.branch2.0.weight"]} == {1, 2}
    assert {r.inner for r, _ in spec.axes_to_perm["conv5.0.weight"]} == {1, 4}
    frozen = sum(t.numel() for k, t in model.state_dict().items() if k in spec.free)
    assert frozen == model.fc.bias.numel() + sum(
        t.numel() for k, t in model.state_dict().items() if k.endswith("num_batches_tracked")
    )
    same_function(model, spec, x, seed=11)


class PadRollDrop(nn.Module):
    """Channels-last padding of the spatial dims only (Swin), a cyclic shift (Swin's
    shifted windows), torchvision-structured stochastic depth, channels-first LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.ln = Z.LayerNorm2d(6)
        self.drop = Z.StochasticDepth(0.2)
        self.fc = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(self.conv(x)).permute(0, 2, 3, 1)  # [N, H, W, C]
        h = F.pad(h, (0, 0, 0, 1, 0, 1))
        h = torch.roll(h, shifts=(-1, -1), dims=(1, 2))
        h = h + self.drop(self.fc(h))
        return self.out(h.mean((1, 2)))


def test_pad_roll_and_drop_path_keep_channels() -> None:
    torch.manual_seed(0)
    model, x = PadRollDrop(), torch.randn(2, 3, 5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = spec_from_model(model, x)
    conv = group_of(spec, "conv.weight", 0)
    assert {("ln.weight", 0), ("fc.weight", 1), ("out.weight", 1)} <= {
        (p, a) for p, a, *_ in refs(spec, conv)
    }
    same_function(model, spec, x, seed=12)
