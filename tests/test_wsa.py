"""Weight Scope Alignment: scopes, the KL regulariser, fusion, multi-stage fusion, rescaling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import pymerge
from pymerge.testing.models import CNN, MLP
from pymerge.wsa import (
    LayerScope,
    ScopeRegularizer,
    fuse_scopes,
    fuse_stages,
    rescale_to_scope,
    scope_kl,
    weight_scope,
)


def _ref_scope(t: torch.Tensor) -> tuple[float, float]:
    x = t.detach().double().reshape(-1).numpy()
    return float(x.mean()), float(np.sqrt(((x - x.mean()) ** 2).mean()))


def _clone(state):
    return {k: v.clone() for k, v in state.items()}


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(6, (12, 10), 3)


def test_weight_scope_of_a_model_matches_float64_reference():
    torch.manual_seed(0)
    model = CNN(in_channels=2, widths=(4, 6), num_classes=3, norm="bn", image_size=8)
    scopes = weight_scope(model)
    # Linear/Conv weights only: no BN weight, no bias
    assert list(scopes) == ["conv0.weight", "conv1.weight", "out.weight"]
    for k, s in scopes.items():
        assert isinstance(s, LayerScope)
        mean, std = _ref_scope(model.state_dict()[k])
        assert s.mean == pytest.approx(mean, abs=1e-15)
        assert s.std == pytest.approx(std, rel=1e-12)


def test_weight_scope_of_a_state_dict_takes_weights_of_two_or_more_dims():
    torch.manual_seed(0)
    model = CNN(in_channels=2, widths=(4, 6), num_classes=3, norm="bn", image_size=8)
    state = model.state_dict()
    assert list(weight_scope(state)) == list(weight_scope(model))
    emb = {"emb.weight": torch.randn(5, 3), "ln.weight": torch.ones(3), "fc.bias": torch.zeros(3)}
    assert list(weight_scope(emb)) == ["emb.weight"]  # embeddings count (documented)


def test_layer_choice_and_bad_input():
    state = _mlp(0).state_dict()
    assert list(weight_scope(state, layers=["fc0.bias"])) == ["fc0.bias"]
    picked = weight_scope(state, layers=lambda k, t: k.endswith("bias"))
    assert list(picked) == ["fc0.bias", "fc1.bias", "out.bias"]
    with pytest.raises(ValueError, match="'nope' is not in"):
        weight_scope(state, layers=["nope"])
    with pytest.raises(ValueError, match="no layers selected"):
        weight_scope(state, layers=lambda k, t: False)
    with pytest.raises(TypeError, match="not a single string"):
        weight_scope(state, layers="fc0.weight")
    bad = _clone(state)
    bad["fc1.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="'fc1.weight' has non-finite"):
        weight_scope(bad)
    with pytest.raises(ValueError, match="at least 2"):
        weight_scope({"w.weight": torch.ones(1, 1)})
    with pytest.raises(TypeError, match="floating"):
        weight_scope({"w.weight": torch.ones(2, 2, dtype=torch.long)})
    with pytest.raises(TypeError, match="nn.Module or a state dict"):
        weight_scope([1, 2])


def test_scope_kl_against_numeric_integration():
    for (mu, sd), (mt, st) in [
        ((0.1, 0.5), (-0.2, 0.3)),
        ((0.0, 1.0), (0.0, 1.0)),
        ((2, 1), (0, 3)),
    ]:
        lo = min(mu - 12 * sd, mt - 12 * st)
        hi = max(mu + 12 * sd, mt + 12 * st)
        x = np.linspace(lo, hi, 400_001)
        logp = -0.5 * ((x - mu) / sd) ** 2 - np.log(sd * math.sqrt(2 * math.pi))
        logq = -0.5 * ((x - mt) / st) ** 2 - np.log(st * math.sqrt(2 * math.pi))
        numeric = np.trapezoid(np.exp(logp) * (logp - logq), x)
        assert scope_kl((mu, sd), (mt, st)) == pytest.approx(numeric, abs=1e-8)


def test_regularizer_value_and_gradient_match_the_closed_form():
    torch.manual_seed(1)
    model = _mlp(1).double()
    target = {"fc0.weight": (0.05, 0.2), "fc1.weight": (-0.01, 0.4), "out.weight": (0.0, 0.1)}
    reg = ScopeRegularizer(target, lam=0.7)
    loss = reg(model)
    loss.backward()
    # reference: the closed form written here, autograd through float64 leaf copies
    total = torch.zeros((), dtype=torch.float64)
    leaves = {}
    for k, (mt, st) in target.items():
        w = model.state_dict()[k].detach().clone().requires_grad_(True)
        leaves[k] = w
        mu = w.mean()
        sd = ((w - mu) ** 2).mean().sqrt()
        total = total + math.log(st) - torch.log(sd) + (sd**2 + (mu - mt) ** 2) / (2 * st**2) - 0.5
        ref_kl = scope_kl(_ref_scope(w), (mt, st))
        assert float(reg.layer_kl(model).detach()[list(target).index(k)]) == pytest.approx(
            ref_kl, rel=1e-10
        )
    (0.7 * total).backward()
    assert float(loss.detach()) == pytest.approx(float(0.7 * total.detach()), rel=1e-12)
    params = dict(model.named_parameters())
    for k, w in leaves.items():
        torch.testing.assert_close(params[k].grad, w.grad, rtol=1e-10, atol=1e-14)
    assert params["fc0.bias"].grad is None  # only the target layers are touched


def test_regularizer_is_zero_at_the_target_and_pulls_toward_it():
    model = _mlp(2)
    reg = ScopeRegularizer(weight_scope(model), lam=1.0)
    assert float(reg(model).detach()) == pytest.approx(0.0, abs=1e-6)
    target = {k: (s.mean + 0.1, s.std * 2) for k, s in weight_scope(model).items()}
    reg.set_target(target)
    before = float(reg(model).detach())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        reg(model).backward()
        opt.step()
    assert float(reg(model).detach()) < 0.05 * before
    for k, s in weight_scope(model).items():
        assert s.mean == pytest.approx(target[k][0], abs=0.02)
        assert s.std == pytest.approx(target[k][1], rel=0.05)


def test_regularizer_on_a_functional_parameter_mapping_and_reduction():
    model = _mlp(3)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    target = fuse_scopes([_mlp(4), _mlp(5)])
    s = ScopeRegularizer(target, lam=2.0)(params)
    m = ScopeRegularizer(target, lam=2.0, reduction="mean")(params)
    assert float(s.detach()) == pytest.approx(3 * float(m.detach()), rel=1e-6)
    s.backward()
    assert params["fc0.weight"].grad is not None


def test_regularizer_bad_input():
    target = {"fc0.weight": (0.0, 0.1)}
    with pytest.raises(ValueError, match="std 0"):
        ScopeRegularizer({"fc0.weight": (0.0, 0.0)})
    with pytest.raises(ValueError, match="not a finite scope"):
        ScopeRegularizer({"fc0.weight": (float("nan"), 0.1)})
    with pytest.raises(TypeError, match="pair"):
        ScopeRegularizer({"fc0.weight": 0.1})
    with pytest.raises(ValueError, match="lam"):
        ScopeRegularizer(target, lam=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        ScopeRegularizer(target, reduction="max")
    reg = ScopeRegularizer({"missing.weight": (0.0, 0.1)})
    with pytest.raises(ValueError, match="'missing.weight' is not in model"):
        reg(_mlp(0))
    reg = ScopeRegularizer(target)
    with pytest.raises(ValueError, match="same layers"):
        reg.set_target({"fc1.weight": (0.0, 0.1)})


def test_fuse_scopes_mean_and_pooled_against_references():
    models = [_mlp(s) for s in range(3)]
    w = [0.2, 0.3, 0.5]
    mean = fuse_scopes(models, "mean", weights=w)
    pooled = fuse_scopes([weight_scope(m) for m in models], "pooled", weights=[1, 1, 1])
    for k in mean:
        mus = [_ref_scope(m.state_dict()[k])[0] for m in models]
        sds = [_ref_scope(m.state_dict()[k])[1] for m in models]
        assert mean[k].mean == pytest.approx(float(np.dot(w, mus)), abs=1e-15)
        assert mean[k].std == pytest.approx(float(np.dot(w, sds)), rel=1e-13)
        # pooled == the std of all models' weights of the layer put together
        allw = torch.cat([m.state_dict()[k].reshape(-1) for m in models])
        mu_all, sd_all = _ref_scope(allw)
        assert pooled[k].mean == pytest.approx(mu_all, abs=1e-14)
        assert pooled[k].std == pytest.approx(sd_all, rel=1e-12)
        assert pooled[k].std >= fuse_scopes(models)[k].std - 1e-15


def test_fuse_scopes_bad_input():
    a, b = weight_scope(_mlp(0)), weight_scope(_mlp(1))
    with pytest.raises(ValueError, match="how"):
        fuse_scopes([a, b], "median")
    with pytest.raises(ValueError, match="empty"):
        fuse_scopes([])
    with pytest.raises(TypeError, match="sequence"):
        fuse_scopes(a)
    del b["fc1.weight"]
    with pytest.raises(ValueError, match="'fc1.weight' is only in scopes\\[0\\]"):
        fuse_scopes([a, b])
    with pytest.raises(ValueError, match="got 1 weights for 2"):
        fuse_scopes([a, a], weights=[1.0])
    with pytest.raises(ValueError, match="sum to 0"):
        fuse_scopes([a, a], weights=[0.0, 0.0])
    with pytest.raises(ValueError, match="finite"):
        fuse_scopes([a, a], weights=[float("inf"), 1.0])


@pytest.mark.parametrize("how", ["mean", "pooled"])
def test_multi_stage_fusion_by_count_equals_flat_fusion(how):
    ms = [_mlp(s).state_dict() for s in range(5)]
    flat = fuse_scopes(ms, how)
    staged = fuse_stages([[ms[0], ms[1]], [ms[2], [ms[3], ms[4]]]], how)
    for k in flat:
        assert staged[k].mean == pytest.approx(flat[k].mean, abs=1e-15)
        assert staged[k].std == pytest.approx(flat[k].std, rel=1e-13)
    equal = fuse_stages([[ms[0], ms[1]], [ms[2], [ms[3], ms[4]]]], how, weights="equal")
    manual = fuse_scopes(
        [fuse_scopes(ms[:2], how), fuse_scopes([ms[2], fuse_scopes(ms[3:], how)], how)], how
    )
    assert equal == manual
    assert any(abs(equal[k].mean - flat[k].mean) > 1e-6 for k in flat)
    with pytest.raises(ValueError, match="empty stage"):
        fuse_stages([[ms[0]], []])
    with pytest.raises(ValueError, match="weights"):
        fuse_stages([ms[0]], weights="size")


def test_rescale_to_scope_hits_the_target_and_leaves_the_rest():
    state = _mlp(0).state_dict()
    orig = _clone(state)
    target = {"fc0.weight": (0.3, 0.05), "out.weight": (-0.1, 1.5)}
    out = rescale_to_scope(state, target)
    for k in state:
        torch.testing.assert_close(state[k], orig[k], rtol=0, atol=0)  # not mutated
    got = weight_scope(out, layers=list(target))
    for k, (m, s) in target.items():
        assert got[k].mean == pytest.approx(m, abs=1e-6)
        assert got[k].std == pytest.approx(s, rel=1e-6)
    torch.testing.assert_close(out["fc1.weight"], state["fc1.weight"])
    assert out["fc1.weight"].data_ptr() != state["fc1.weight"].data_ptr()
    const = _clone(state)
    const["fc0.weight"].fill_(0.5)
    with pytest.raises(ValueError, match="constant"):
        rescale_to_scope(const, target)
    with pytest.raises(ValueError, match="not in state"):
        rescale_to_scope(state, {"nope.weight": (0.0, 1.0)})


def test_inputs_are_never_mutated():
    model = _mlp(7)
    before = _clone(model.state_dict())
    weight_scope(model)
    fuse_scopes([model, model.state_dict()], "pooled")
    reg = ScopeRegularizer(fuse_scopes([_mlp(8)]))
    reg(model).backward()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_top_level_exports():
    for name in ("weight_scope", "ScopeRegularizer", "fuse_scopes", "fuse_stages", "scope_kl"):
        assert getattr(pymerge, name) is getattr(pymerge.wsa, name)
    assert pymerge.wsa.rescale_to_scope is rescale_to_scope


# --------------------------------------------------------------------------- method="wsa"


def _ref_wsa(states, w, how, key_is_layer):
    w = [x / sum(w) for x in w]
    out = {}
    for k in states[0]:
        ts = [s[k].double() for s in states]
        if not key_is_layer(k, states[0][k]):
            out[k] = sum(wi * t for wi, t in zip(w, ts, strict=True))
            continue
        mus = [float(t.mean()) for t in ts]
        sds = [float(t.std(correction=0)) for t in ts]
        mu = sum(wi * m for wi, m in zip(w, mus, strict=True))
        if how == "mean":
            sd = sum(wi * s for wi, s in zip(w, sds, strict=True))
        else:
            sd = math.sqrt(
                sum(wi * (s**2 + (m - mu) ** 2) for wi, m, s in zip(w, mus, sds, strict=True))
            )
        out[k] = sum(
            wi * (mu + (t - m) * sd / s) for wi, t, m, s in zip(w, ts, mus, sds, strict=True)
        )
    return out


@pytest.mark.parametrize("how", ["mean", "pooled"])
def test_wsa_method_against_the_formula(how):
    states = [_mlp(s).state_dict() for s in range(3)]
    w = [1.0, 2.0, 3.0]
    got = pymerge.merge("wsa", states, weights=w, how=how)
    ref = _ref_wsa(states, w, how, lambda k, t: k.endswith("weight") and t.dim() >= 2)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k].float(), rtol=1e-6, atol=1e-7)
    # layers="all" rescales the biases too; "none" is plain averaging
    got_all = pymerge.merge("wsa", states, layers="all")
    ref_all = _ref_wsa(states, [1, 1, 1], "mean", lambda k, t: True)
    for k in ref_all:
        torch.testing.assert_close(got_all[k], ref_all[k].float(), rtol=1e-6, atol=1e-7)
    plain = pymerge.merge("wsa", states, layers="none", weights=w)
    avg = pymerge.merge("linear", states, weights=w)
    for k in avg:
        torch.testing.assert_close(plain[k], avg[k], rtol=1e-6, atol=1e-7)


def test_wsa_method_invariants():
    a = _mlp(0).state_dict()
    same = pymerge.merge("wsa", [a, a, a])
    for k in a:
        torch.testing.assert_close(same[k], a[k])
    states = [_mlp(s).state_dict() for s in range(2)]
    out = pymerge.merge("wsa", states, output_scope=True)
    target = fuse_scopes(states)
    got = weight_scope(out)
    for k, s in target.items():
        assert got[k].mean == pytest.approx(s.mean, abs=1e-6)
        assert got[k].std == pytest.approx(s.std, rel=1e-5)
    # without output_scope, averaging shrinks the std below the target's
    shrunk = weight_scope(pymerge.merge("wsa", states))
    assert all(shrunk[k].std < target[k].std for k in target)
    # a constant layer has no scope: it is averaged as it is
    zero = {k: v.clone() for k, v in states[1].items()}
    zero["fc1.weight"].zero_()
    z = pymerge.merge("wsa", [states[0], zero])
    assert torch.isfinite(z["fc1.weight"]).all()
    before = [{k: v.clone() for k, v in s.items()} for s in states]
    pymerge.merge("wsa", states, how="pooled")
    for s, b in zip(states, before, strict=True):
        for k in s:
            assert torch.equal(s[k], b[k])
    with pytest.raises(ValueError, match="sum to zero"):
        pymerge.merge("wsa", states, weights=[0.0, 0.0])
    with pytest.raises(ValueError, match="weight"):
        pymerge.merge("wsa", states, weights=[1.0, float("nan")])
    with pytest.raises(ValueError, match="how"):
        pymerge.merge("wsa", states, how="median")
