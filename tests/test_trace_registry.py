"""The tracing rule registry: registration, dispatch by semantics, user rules.

- a subclass of a known layer that overrides ``forward`` never gets its parent's rule: a
  channels-first ``LayerNorm2d`` (timm / torchvision style) is traced through and the
  permuted model computes the same function, with norm parameters re-randomised;
- the worked example of ``docs/tracing.md`` (a user ``ScaledLinear`` with its own weight
  layout) and a function rule, checked for function invariance under a random permutation.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from pymerge.spec import (
    PermutationSpec,
    apply_permutation,
    random_permutation,
    register_function_rule,
    register_module_rule,
    spec_from_model,
)
from pymerge.spec import trace as trace_mod
from pymerge.spec.tracing import (
    Call,
    Value,
    broadcast,
    function_rule_for,
    module_rule_for,
    passthrough,
    registry,
)


# --------------------------------------------------------------- helpers
def _perturb(model: nn.Module, seed: int) -> None:
    """Re-randomise every 1-D float tensor (norm scales and biases, running statistics):
    with stock initialisation a wrong permutation of a norm changes nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point() and t.ndim == 1:
                noise = torch.rand(t.shape, generator=g, dtype=torch.float64).to(t.dtype)
                t.copy_(0.5 + noise if name.endswith("running_var") else t + 2 * noise - 1)


def _outputs(model: nn.Module, spec: PermutationSpec, x: torch.Tensor, seed: int = 0):
    """Outputs of ``model`` and of its permuted copy (float64, eval), and the permutation."""
    model = model.double().eval()
    _perturb(model, seed)
    x = x.double() if x.is_floating_point() else x
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    perm = random_permutation(spec, sd, seed=seed)
    other = copy.deepcopy(model)
    other.load_state_dict(apply_permutation(spec, perm, sd))
    with torch.no_grad():
        return model(x), other(x), perm


def _assert_same_function(
    model: nn.Module, spec: PermutationSpec, x: torch.Tensor, *, moves: bool = True
) -> None:
    y, y_perm, perm = _outputs(model, spec, x, seed=3)
    if moves:  # not vacuous
        assert any(not torch.equal(p, torch.arange(len(p))) for p in perm.values())
    torch.testing.assert_close(y, y_perm, rtol=1e-9, atol=1e-9)


def _refs(spec: PermutationSpec, group: str) -> set[tuple[str, int]]:
    return {(r.param, r.axis) for r in spec.perm_to_axes[group]}


@pytest.fixture
def restore_registry():
    """Registrations made in a test are undone after it (the registry is global)."""
    tables = (registry._MODULES, registry._FUNCTIONS, registry._METHODS, registry._QUALNAMES)
    saved = [dict(t) for t in tables]
    yield
    for table, old in zip(tables, saved, strict=True):
        table.clear()
        table.update(old)
    registry._RESOLVED.clear()


# --------------------------------------------------------------- LayerNorm2d
class LayerNorm2d(nn.LayerNorm):
    """Channels-first LayerNorm as timm and torchvision write it: an ``nn.LayerNorm``
    subclass that permutes to channels-last, normalises the channels, permutes back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class UntraceableLayerNorm2d(nn.LayerNorm):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = x * 1.0
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias)
        return x.permute(0, 3, 1, 2)


class ChannelsLastLayerNorm(nn.LayerNorm):
    """A subclass that keeps ``forward``: it is a LayerNorm and gets its rule."""

    def __init__(self, c: int) -> None:
        super().__init__(c, eps=1e-5)
        self.tag = "cl"


class ConvNeXtStage(nn.Module):
    """stem conv -> LayerNorm2d -> residual block (depthwise conv, LayerNorm2d, pointwise
    MLP) -> pooled head: the ConvNeXt pattern where the old tracer gave a wrong spec."""

    def __init__(self, c: int = 8, norm: type[nn.Module] = LayerNorm2d) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 2, stride=2)
        self.norm = norm(c)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm2 = norm(c)
        self.pw1 = nn.Conv2d(c, 2 * c, 1)
        self.act = nn.GELU()
        self.pw2 = nn.Conv2d(2 * c, c, 1)
        self.head = nn.Linear(c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.stem(x))
        x = x + self.pw2(self.act(self.pw1(self.norm2(self.dw(x)))))
        return self.head(x.mean((2, 3)))


def test_overridden_forward_gets_no_parent_rule() -> None:
    assert module_rule_for(nn.LayerNorm).owner is nn.LayerNorm
    assert module_rule_for(LayerNorm2d) is None
    assert module_rule_for(UntraceableLayerNorm2d) is None
    assert module_rule_for(ChannelsLastLayerNorm).owner is nn.LayerNorm
    # the fx leaf decision follows the registry
    tracer = trace_mod._Tracer(())
    assert tracer.is_leaf_module(nn.LayerNorm(4), "n")
    assert tracer.is_leaf_module(ChannelsLastLayerNorm(4), "n")
    assert not tracer.is_leaf_module(LayerNorm2d(4), "n")
    assert trace_mod._Tracer((LayerNorm2d,)).is_leaf_module(LayerNorm2d(4), "n")


def test_layernorm2d_traced_through_same_function() -> None:
    torch.manual_seed(0)
    model = ConvNeXtStage()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = spec_from_model(model, x)
    stem = _refs(spec, "stem")
    assert {("norm.weight", 0), ("norm.bias", 0), ("norm2.weight", 0), ("dw.weight", 0)} <= stem
    assert {("pw1.weight", 1), ("pw2.weight", 0), ("head.weight", 1)} <= stem
    assert "pw1" in spec.perm_to_axes
    _assert_same_function(model, spec, x)
    # the check can fail: leave the norm's affine parameters out of the channel group (what
    # the LayerNorm rule did to LayerNorm2d) and the permuted model differs
    wrong = spec.with_groups(
        {"stem": [r for r in spec.perm_to_axes["stem"] if not r.param.startswith("norm.")]}
    ).with_free(["norm.weight", "norm.bias"])
    y, y_perm, _ = _outputs(ConvNeXtStage(), wrong, x, seed=3)
    assert not torch.allclose(y, y_perm, rtol=1e-6, atol=1e-6)


def test_untraceable_subclass_is_opaque_and_frozen() -> None:
    torch.manual_seed(0)
    model = ConvNeXtStage(norm=UntraceableLayerNorm2d)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="leaf_modules"):
        spec_from_model(model, x)
    with pytest.warns(UserWarning, match="no rule for module type UntraceableLayerNorm2d"):
        spec = spec_from_model(model, x, leaf_modules=(UntraceableLayerNorm2d,))
    assert any("norm" in r and "UntraceableLayerNorm2d" in r for r in spec.report)
    assert "stem" not in spec.perm_to_axes  # the channels flow into the opaque norm
    assert {"norm.weight", "norm.bias", "stem.weight"} <= spec.free
    _assert_same_function(model, spec, x)


def test_subclass_keeping_forward_inherits_the_rule() -> None:
    torch.manual_seed(0)

    class Tokens(nn.Module):
        def __init__(self, norm: type[nn.Module]) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.ln = norm(6)
            self.out = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.ln(self.fc(x)))

    x = torch.randn(2, 3, 4)
    sub = spec_from_model(Tokens(ChannelsLastLayerNorm), x)
    base = spec_from_model(Tokens(nn.LayerNorm), x)
    assert sub.to_dict() == base.to_dict()
    assert ("ln.weight", 0) in _refs(sub, "fc")
    _assert_same_function(Tokens(ChannelsLastLayerNorm), sub, x)


def test_functional_layer_norm_on_channels_last() -> None:
    """``F.layer_norm`` with parameters joins them; with a constant weight it freezes."""
    torch.manual_seed(0)

    class FnNorm(nn.Module):
        def __init__(self, persistent: bool) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.w = nn.Parameter(torch.rand(6) + 0.5)
            self.register_buffer("b", torch.randn(6), persistent=persistent)
            self.out = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(F.layer_norm(self.fc(x), (6,), self.w, self.b))

    x = torch.randn(3, 5, 4)
    spec = spec_from_model(FnNorm(True), x)
    assert {("w", 0), ("b", 0), ("out.weight", 1)} <= _refs(spec, "fc")
    _assert_same_function(FnNorm(True), spec, x)
    frozen = spec_from_model(FnNorm(False), x)  # b is not in the state dict: fc can't move
    assert "fc" not in frozen.perm_to_axes
    _assert_same_function(FnNorm(False), frozen, x, moves=False)


# --------------------------------------------------------------- the worked example
class ScaledLinear(nn.Module):
    """``y = (x @ weight) * scale + bias`` with ``weight`` stored ``[in, out]`` (like GPT-2's
    ``Conv1D``), computed with ``einsum``, which the tracer does not know."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out) / d_in**0.5)
        self.scale = nn.Parameter(torch.rand(d_out) + 0.5)
        self.bias = nn.Parameter(torch.randn(d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...i,io->...o", x, self.weight) * self.scale + self.bias


@register_module_rule(ScaledLinear)
def scaled_linear(call: Call) -> Value:
    x = call.x  # the input's value: its tagged dims carry feature groups
    last = x.ndim - 1
    if last in x.tags:  # the input features permute the rows of weight
        call.join(x.tags[last], call.key("weight"), 0)
    out = call.output({d: p for d, p in x.tags.items() if d != last})  # other dims pass
    out.tags[len(call.shape) - 1] = call.new_group(  # a new group: the output features
        call.module.weight.shape[1],
        [(call.key("weight"), 1), (call.key("scale"), 0), (call.key("bias"), 0)],
    )
    return out


class UnregisteredScaledLinear(ScaledLinear):
    """The same computation, but ``forward`` is overridden: no rule (not the parent's), so
    the tracer traces through it, meets ``einsum`` and freezes what it touches."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...i,io->...o", x, self.weight) * self.scale + self.bias


class WithScaled(nn.Module):
    def __init__(self, layer: type[nn.Module] = ScaledLinear) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.act = nn.ReLU()
        self.sl = layer(6, 5)
        self.act2 = nn.GELU()
        self.out = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act2(self.sl(self.act(self.fc(x)))))


def test_user_module_rule_worked_example() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 7, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = spec_from_model(WithScaled(), x)
    assert spec.groups() == ["fc", "sl"]
    assert _refs(spec, "fc") == {("fc.weight", 0), ("fc.bias", 0), ("sl.weight", 0)}
    assert _refs(spec, "sl") == {
        ("sl.weight", 1),
        ("sl.scale", 0),
        ("sl.bias", 0),
        ("out.weight", 1),
    }
    assert spec.activation_points["sl"].module == "act2"
    _assert_same_function(WithScaled(), spec, x)


def test_without_a_rule_the_layer_is_traced_through_and_frozen() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 7, 4)
    with pytest.warns(UserWarning, match="einsum"):
        spec = spec_from_model(WithScaled(UnregisteredScaledLinear), x)
    assert spec.groups() == []  # einsum is not understood: everything it touches freezes
    _assert_same_function(WithScaled(UnregisteredScaledLinear), spec, x, moves=False)


class Gate(nn.Module):
    """Two inputs: ``x * sigmoid(g)``."""

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(g)


@torch.fx.wrap
def scaled_tanh(x: torch.Tensor, s: float) -> torch.Tensor:
    return torch.tanh(x) * s


@torch.fx.wrap
def unknown_op(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


class GLU(nn.Module):
    def __init__(self, known: bool = True) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(4, 6)
        self.gate = Gate()
        self.out = nn.Linear(6, 2)
        self.known = known

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate(self.a(x), self.b(x))
        h = scaled_tanh(h, 2.0) if self.known else unknown_op(h)
        return self.out(h)


def test_multi_input_module_rule_and_function_rule(restore_registry) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    # Gate has no rule: traced through, which works; as a leaf it must be told what it does
    register_module_rule(Gate, lambda call: broadcast(call, call.values()), checked_inputs=False)
    with pytest.warns(UserWarning, match="scaled_tanh"):  # wrapped function without a rule
        spec_from_model(GLU(), x)

    @register_function_rule(scaled_tanh)
    def _scaled_tanh(call: Call) -> Value | None:
        return passthrough(call)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = spec_from_model(GLU(), x)
    assert trace_mod._Tracer(()).is_leaf_module(Gate(), "gate")
    assert spec.groups() == ["a"]  # a and b meet in the gate: one group
    assert {("a.weight", 0), ("b.weight", 0), ("out.weight", 1)} <= _refs(spec, "a")
    _assert_same_function(GLU(), spec, x)
    with pytest.warns(UserWarning, match="unknown_op"):
        assert spec_from_model(GLU(known=False), x).groups() == []


def test_checked_inputs_report_extra_features(restore_registry) -> None:
    called = []
    register_module_rule(Gate, lambda call: called.append(call) or passthrough(call))

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.gate, self.out = (
                nn.Linear(4, 6),
                nn.Linear(4, 6),
                Gate(),
                nn.Linear(6, 2),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.gate(self.a(x), self.b(x)))

    with pytest.warns(UserWarning, match="extra inputs to Gate"):
        spec = spec_from_model(M(), torch.randn(3, 4))
    assert not called and spec.groups() == []


# --------------------------------------------------------------- the registry itself
def test_registration_errors_and_replace(restore_registry) -> None:
    class Layer(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    register_module_rule(Layer, passthrough)
    with pytest.raises(ValueError, match="already registered"):
        register_module_rule(Layer, passthrough)
    register_module_rule(Layer, passthrough, kind="activation", replace=True)
    assert module_rule_for(Layer).kind == "activation"
    with pytest.raises(ValueError, match="already registered"):
        register_module_rule(nn.Linear, passthrough)
    with pytest.raises(ValueError, match="kind"):
        register_module_rule(Layer, passthrough, kind="conv", replace=True)
    with pytest.raises(TypeError, match="not an nn.Module"):
        register_module_rule(int, passthrough)
    with pytest.raises(TypeError, match="callable"):
        register_module_rule(Layer, "passthrough", replace=True)
    with pytest.raises(ValueError, match="already registered"):
        register_function_rule(torch.relu, passthrough)
    with pytest.raises(ValueError, match="already registered"):
        register_function_rule("view", passthrough)
    with pytest.raises(TypeError, match="function or a method name"):
        register_function_rule(3, passthrough)
    with pytest.raises(ValueError, match="nothing"):
        register_function_rule((), passthrough)


def test_lookup_cache_follows_new_registrations(restore_registry) -> None:
    class Base(nn.Linear):
        pass

    class Child(Base):
        pass

    assert module_rule_for(Child).owner is nn.Linear  # inherited, forward untouched
    register_module_rule(Base, passthrough)
    assert module_rule_for(Child).owner is Base
    assert module_rule_for(Child).rule is passthrough


def test_method_and_function_tables_are_separate() -> None:
    assert function_rule_for("call_method", "view").key == "view"
    assert function_rule_for("call_function", torch.flatten).key is torch.flatten
    assert function_rule_for("call_function", "view") is None  # a name is not a function
    assert function_rule_for("call_method", torch.relu) is None
    assert function_rule_for("call_function", torch.cumsum) is None
    assert function_rule_for("call_function", [1]) is None  # unhashable target


def test_aten_overload_falls_back_to_its_packet(restore_registry) -> None:
    lib = torch.library.Library("pymerge_trace_test", "DEF")
    lib.define("twice(Tensor x) -> Tensor")
    packet = torch.ops.pymerge_trace_test.twice
    assert function_rule_for("call_function", packet.default) is None
    register_function_rule(packet, passthrough)
    assert function_rule_for("call_function", packet.default).rule is passthrough


def test_default_leaf_modules_are_the_builtin_rules() -> None:
    old = {  # the tuple the tracer used before the registry
        nn.Linear,
        *(nn.Conv1d, nn.Conv2d, nn.Conv3d),
        *(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
        *(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
        *(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d),
        nn.LayerNorm,
        nn.GroupNorm,
        nn.Embedding,
        nn.MultiheadAttention,
        nn.Flatten,
        nn.Unflatten,
        nn.Softmax,
        nn.LogSoftmax,
        nn.PReLU,
        nn.Upsample,
        *(nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout),
        *(nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Mish),
        *(nn.Hardswish, nn.Hardsigmoid, nn.ReLU6, nn.Softplus, nn.CELU, nn.SELU, nn.Hardtanh),
        *(nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Softshrink, nn.Hardshrink),
        *(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d),
        *(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d),
        *(nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d),
        *(nn.LPPool1d, nn.LPPool2d),
    }
    new = {nn.RMSNorm}  # issue 12
    assert set(trace_mod.DEFAULT_LEAF_MODULES) == old | new
    kinds = {t: module_rule_for(t).kind for t in old}
    assert {t for t, k in kinds.items() if k == "norm"} == {
        *(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
        *(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d),
        nn.LayerNorm,
        nn.GroupNorm,
    }
    assert kinds[nn.ReLU] == kinds[nn.Hardshrink] == "activation"
    assert kinds[nn.PReLU] == kinds[nn.Dropout] == "layer"
