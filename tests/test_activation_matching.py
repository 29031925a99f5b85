"""Activation matching: exact recovery of known permutations (MLP, CNN, sequences, heads),
agreement with a plain float64 NumPy/SciPy reference, weight fallback, errors, no mutation."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment as scipy_lsa
from torch import nn

from pymerge.align.activation_matching import activation_matching
from pymerge.spec import (
    ActivationPoint,
    AxisRef,
    HeadStructure,
    PermutationSpec,
    apply_permutation,
    invert_permutation,
    random_permutation,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- models + specs


def _mlp(seed: int) -> tuple[nn.Module, PermutationSpec]:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(6, 10), nn.LeakyReLU(0.1), nn.Linear(10, 12), nn.LeakyReLU(0.1), nn.Linear(12, 4)
    )
    spec = PermutationSpec(
        {
            "h0": [("0.weight", 0), ("0.bias", 0), ("2.weight", 1)],
            "h1": [("2.weight", 0), ("2.bias", 0), ("4.weight", 1)],
        },
        free=["4.bias"],
        activation_points={"h0": ActivationPoint("1", 1), "h1": ActivationPoint("3", 1)},
    )
    return model, spec


def _cnn(seed: int) -> tuple[nn.Module, PermutationSpec]:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.Conv2d(5, 6, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, 4),
    )
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.2, 0.2)
    bn = ["1.running_mean", "1.running_var"]
    spec = PermutationSpec(
        {
            "c0": [("0.weight", 0), ("0.bias", 0), ("1.weight", 0), ("1.bias", 0)]
            + [(k, 0) for k in bn]
            + [("3.weight", 1)],
            "c1": [("3.weight", 0), ("3.bias", 0), AxisRef("7.weight", 1, inner=4)],
        },
        free=["1.num_batches_tracked", "7.bias"],
        no_cost=[*bn, "1.num_batches_tracked"],
        activation_points={"c0": ("2", 1), "c1": ("4", 1)},
    )
    return model, spec


def _seq(seed: int) -> tuple[nn.Module, PermutationSpec]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 9), nn.GELU(), nn.Linear(9, 3))
    spec = PermutationSpec(
        {"u": [("0.weight", 0), ("0.bias", 0), ("2.weight", 1)]},
        free=["2.bias"],
        activation_points={"u": ("1", -1)},
    )
    return model, spec


def _heads(seed: int, h: int = 3, d: int = 2) -> tuple[nn.Module, PermutationSpec]:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(5, h * d), nn.Tanh(), nn.Linear(h * d, h * d), nn.Tanh(), nn.Linear(h * d, 3)
    )
    spec = PermutationSpec(
        {
            "g1": [("0.weight", 0), ("0.bias", 0), ("2.weight", 1)],
            "g2": [("2.weight", 0), ("2.bias", 0), ("4.weight", 1)],
        },
        free=["4.bias"],
        heads={"att": HeadStructure(h, d, ("g1", "g2"))},
        activation_points={"g1": ("1", 1), "g2": ("3", 1)},
    )
    return model, spec


def _permuted_copy(model: nn.Module, spec: PermutationSpec, seed: int):
    state = model.state_dict()
    rp = random_permutation(spec, state, seed=seed)
    other = copy.deepcopy(model)
    other.load_state_dict(apply_permutation(spec, rp, state))
    return other, rp


def _data(shape, n_batches=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n_batches)]


BUILDERS = {
    "mlp": (_mlp, (40, 6)),
    "cnn": (_cnn, (8, 3, 4, 4)),
    "seq": (_seq, (7, 5, 6)),
    "heads": (_heads, (40, 5)),
}

# ----------------------------------------------------------------------------- recovery


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_recovers_known_permutation(kind):
    build, shape = BUILDERS[kind]
    model_a, spec = build(0)
    model_b, rp = _permuted_copy(model_a, spec, seed=11)
    batches = [(x, torch.zeros(len(x))) for x in _data(shape)]
    res = activation_matching(spec, model_a, model_b, batches)
    inv = invert_permutation(rp)
    for g in spec.groups():
        assert torch.equal(res.perm[g], inv[g]), g
        corr = res.extras["correlations"][g]
        n = corr.shape[0]
        matched = corr[torch.arange(n), res.perm[g]]
        torch.testing.assert_close(matched, torch.ones(n, dtype=torch.float64))
        assert res.extras["stats"][g]["method"] == "activation"
        assert res.extras["stats"][g]["mean_corr_matched"] == pytest.approx(1.0)
    aligned = apply_permutation(spec, res.perm, model_b.state_dict())
    for k, v in model_a.state_dict().items():
        assert torch.equal(aligned[k], v), k
    assert res.extras["num_batches"] == 3
    assert res.extras["fallback_groups"] == []


# ----------------------------------------------------------------------------- reference


def _features64(model, module, batches, dim):
    mod = dict(model.named_modules())[module]
    rows = []
    h = mod.register_forward_hook(
        lambda m, a, o: rows.append(o.detach().double().movedim(dim, -1).reshape(-1, o.shape[dim]))
    )
    model.eval()
    with torch.no_grad():
        for x in batches:
            model(x)
    h.remove()
    return torch.cat(rows).numpy()


def _reference_corr(a, b, point, batches):
    fa = _features64(a, point.module, batches, point.dim)
    fb = _features64(b, point.module, batches, point.dim)
    fa = fa - fa.mean(0)
    fb = fb - fb.mean(0)
    na, nb = np.linalg.norm(fa, axis=0), np.linalg.norm(fb, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (fa.T @ fb) / np.outer(na, nb)
    return np.nan_to_num(corr)


def _reference_heads(corrs, h, d):
    """Brute force over head permutations; scipy within each head pair."""
    best, best_perm = -np.inf, None
    for sigma in itertools.permutations(range(h)):
        total, perms = 0.0, {}
        for g, c in corrs.items():
            parts = []
            for a, b in enumerate(sigma):
                blk = c[a * d : (a + 1) * d, b * d : (b + 1) * d]
                _, col = scipy_lsa(blk, maximize=True)
                total += blk[np.arange(d), col].sum()
                parts.append(b * d + col)
            perms[g] = np.concatenate(parts)
        if total > best:
            best, best_perm = total, perms
    return best_perm


@pytest.mark.parametrize("kind", list(BUILDERS))
@pytest.mark.parametrize("seed", [1, 2])
def test_matches_float64_scipy_reference_on_random_nets(kind, seed):
    build, shape = BUILDERS[kind]
    model_a, spec = build(seed)
    model_b, _ = build(seed + 100)  # independent weights: a genuine matching problem
    batches = _data(shape, seed=seed)
    res = activation_matching(spec, model_a, model_b, batches)
    corrs = {
        g: _reference_corr(model_a, model_b, spec.activation_points[g], batches)
        for g in spec.groups()
    }
    if spec.heads:
        hs = spec.heads["att"]
        ref = _reference_heads(corrs, hs.num_heads, hs.head_dim)
    else:
        ref = {g: scipy_lsa(c, maximize=True)[1] for g, c in corrs.items()}
    for g in spec.groups():
        np.testing.assert_allclose(res.extras["correlations"][g].numpy(), corrs[g], atol=1e-6)
        assert res.perm[g].tolist() == list(ref[g]), g


@settings(max_examples=25, deadline=None)
@given(
    h=st.integers(1, 4),
    d=st.integers(1, 3),
    n_groups=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_head_assignment_is_optimal_property(h, d, n_groups, seed):
    # the solve step shared by activation and weight matching
    from pymerge.align._solve import Solver
    from pymerge.spec import HeadStructure

    rng = np.random.default_rng(seed)
    corrs = {f"g{i}": rng.normal(size=(h * d, h * d)) for i in range(n_groups)}
    hs = HeadStructure(h, d, tuple(corrs))
    got = Solver(None).heads(hs, {g: torch.tensor(c) for g, c in corrs.items()})
    ref = _reference_heads(corrs, h, d)
    total = sum(c[np.arange(h * d), got[g].numpy()].sum() for g, c in corrs.items())
    best = sum(c[np.arange(h * d), ref[g]].sum() for g, c in corrs.items())
    assert total == pytest.approx(best, rel=1e-12, abs=1e-12)
    for g in corrs:  # heads kept whole and shared by the groups
        blocks = got[g].view(h, d) // d
        assert (blocks == blocks[:, :1]).all()
        assert torch.equal(blocks[:, 0], got["g0"].view(h, d)[:, 0] // d)
        assert sorted(got[g].tolist()) == list(range(h * d))


# ----------------------------------------------------------------------------- fallback


def test_group_without_point_falls_back_to_weights_or_errors():
    model_a, spec = _mlp(3)
    partial = PermutationSpec(
        spec.perm_to_axes, free=spec.free, activation_points={"h1": ActivationPoint("3", 1)}
    )
    model_b, rp = _permuted_copy(model_a, partial, seed=5)
    batches = _data((30, 6))
    with pytest.raises(ValueError, match="'?h0'?"):
        activation_matching(partial, model_a, model_b, batches, fallback="error")
    res = activation_matching(partial, model_a, model_b, batches)
    inv = invert_permutation(rp)
    for g in ("h0", "h1"):
        assert torch.equal(res.perm[g], inv[g]), g
    assert res.extras["fallback_groups"] == ["h0"]
    assert res.extras["stats"]["h0"]["method"] == "weights"
    assert "h0" not in res.extras["correlations"]


def test_head_structure_without_points_falls_back_as_a_whole():
    model_a, spec = _heads(4)
    partial = PermutationSpec(
        spec.perm_to_axes,
        free=spec.free,
        heads=spec.heads,
        activation_points={"g1": ("1", 1)},  # g2 unobserved: the whole structure by weights
    )
    model_b, rp = _permuted_copy(model_a, partial, seed=8)
    res = activation_matching(partial, model_a, model_b, _data((20, 5)))
    assert sorted(res.extras["fallback_groups"]) == ["g1", "g2"]
    inv = invert_permutation(rp)
    for g in ("g1", "g2"):
        assert torch.equal(res.perm[g], inv[g]), g


class _SharedReLU(nn.Module):
    """One ReLU module used twice per forward (as in torchvision's BasicBlock)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0, self.fc1, self.out = nn.Linear(6, 10), nn.Linear(10, 10), nn.Linear(10, 3)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.out(self.relu(self.fc1(self.relu(self.fc0(x)))))


def test_point_module_run_twice_is_not_used_for_activations():
    torch.manual_seed(0)
    model_a = _SharedReLU()
    spec = PermutationSpec(
        {
            "h0": [("fc0.weight", 0), ("fc0.bias", 0), ("fc1.weight", 1)],
            "h1": [("fc1.weight", 0), ("fc1.bias", 0), ("out.weight", 1)],
        },
        free=["out.bias"],
        activation_points={"h0": ("relu", 1), "h1": ("relu", 1)},
    )
    model_b, rp = _permuted_copy(model_a, spec, seed=2)
    data = _data((30, 6))
    with pytest.raises(ValueError, match="'relu' runs 2 times"):
        activation_matching(spec, model_a, model_b, data, fallback="error")
    res = activation_matching(spec, model_a, model_b, data)
    assert res.extras["fallback_groups"] == ["h0", "h1"]
    inv = invert_permutation(rp)
    for g in ("h0", "h1"):
        assert torch.equal(res.perm[g], inv[g]), g


# ----------------------------------------------------------------------------- hygiene


def _hooks_left(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_models_not_mutated_and_modes_restored():
    model_a, spec = _cnn(0)
    model_b, _ = _cnn(1)
    model_a.train()
    model_b.eval()
    model_b[2].train()  # a mixed set of flags must come back as it was
    flags = [[m.training for m in x.modules()] for x in (model_a, model_b)]
    states = [{k: v.clone() for k, v in x.state_dict().items()} for x in (model_a, model_b)]
    activation_matching(spec, model_a, model_b, _data((4, 3, 4, 4)), max_batches=2, progress=False)
    for x, fl, saved in zip((model_a, model_b), flags, states, strict=True):
        assert [m.training for m in x.modules()] == fl
        for k, v in x.state_dict().items():
            assert torch.equal(v, saved[k]), k  # BN running stats untouched (eval during recording)
        assert _hooks_left(x) == 0


def test_hooks_removed_and_modes_restored_on_error():
    model_a, spec = _mlp(0)
    model_b, _ = _mlp(1)
    model_a.train()
    bad = [torch.randn(5, 6), torch.randn(5, 7)]  # second batch has the wrong width
    with pytest.raises(RuntimeError):
        activation_matching(spec, model_a, model_b, bad)
    assert _hooks_left(model_a) == 0 and _hooks_left(model_b) == 0
    assert all(m.training for m in model_a.modules())


def test_max_batches_and_iterator_input():
    model_a, spec = _mlp(0)
    model_b, _ = _mlp(1)
    data = _data((10, 6), n_batches=4)
    res = activation_matching(spec, model_a, model_b, iter(data), max_batches=2, progress=True)
    assert res.extras["num_batches"] == 2
    ref = _reference_corr(model_a, model_b, spec.activation_points["h0"], data[:2])
    np.testing.assert_allclose(res.extras["correlations"]["h0"].numpy(), ref, atol=1e-6)


def test_errors():
    model_a, spec = _mlp(0)
    model_b, _ = _mlp(1)
    data = _data((10, 6), n_batches=1)
    wide = nn.Sequential(
        nn.Linear(6, 11), nn.ReLU(), nn.Linear(11, 12), nn.ReLU(), nn.Linear(12, 4)
    )
    with pytest.raises(ValueError, match=r"'0\.weight'"):
        activation_matching(spec, model_a, wide, data)
    with pytest.raises(ValueError, match="model_b"):
        activation_matching(spec, model_a, nn.Sequential(nn.Linear(6, 4)), data)
    bad_module = PermutationSpec(
        spec.perm_to_axes, free=spec.free, activation_points={"h0": ("9", 1), "h1": ("3", 1)}
    )
    with pytest.raises(ValueError, match="'h0'.*'9'"):
        activation_matching(bad_module, model_a, model_b, data)
    wrong_size = PermutationSpec(
        spec.perm_to_axes, free=spec.free, activation_points={"h0": ("3", 1), "h1": ("3", 1)}
    )
    with pytest.raises(ValueError, match="'h0'.*12.*size 10"):
        activation_matching(wrong_size, model_a, model_b, data)
    with pytest.raises(ValueError, match="empty"):
        activation_matching(spec, model_a, model_b, [])
    with pytest.raises(TypeError, match="single tensor"):
        activation_matching(spec, model_a, model_b, data[0])
    with pytest.raises(TypeError, match="PermutationSpec"):
        activation_matching({"h0": []}, model_a, model_b, data)
    with pytest.raises(TypeError, match="nn.Module"):
        activation_matching(spec, model_a.state_dict(), model_b, data)
    with pytest.raises(ValueError, match="fallback"):
        activation_matching(spec, model_a, model_b, data, fallback="guess")


# ----------------------------------------------------------------------------- reference models


def _model_cases():
    from pymerge.testing import models as M

    return {
        "MLP": (lambda: M.MLP(8, (12, 12), 3, act="gelu"), (100, 8)),  # no dead units
        "CNN-bn": (lambda: M.CNN(3, (4, 6), 3, norm="bn", image_size=8), (6, 3, 8, 8)),
        "CNN-gn": (lambda: M.CNN(3, (4, 8), 3, norm="gn", image_size=8, gn_groups=2), (6, 3, 8, 8)),
        "CNN-ln-flatten": (
            lambda: M.CNN(3, (4, 6), 3, norm="ln", image_size=8, pool="flatten", hidden=7),
            (6, 3, 8, 8),
        ),
        "ResNet20": (lambda: M.ResNet20(), (4, 3, 16, 16)),
        "TinyGPT": (
            lambda: M.TinyGPT(vocab=16, d_model=8, n_heads=2, n_layers=1, max_len=8),
            None,
        ),
    }


@pytest.mark.parametrize(
    "name", ["MLP", "CNN-bn", "CNN-gn", "CNN-ln-flatten", "ResNet20", "TinyGPT"]
)
def test_recovers_permutation_of_reference_models(name):
    make, shape = _model_cases()[name]
    torch.manual_seed(0)
    model_a = make()
    spec = model_a.spec()
    model_b, rp = _permuted_copy(model_a, spec, seed=3)
    g = torch.Generator().manual_seed(0)
    if shape is None:  # tokens
        data = [torch.randint(0, 16, (4, 8), generator=g) for _ in range(2)]
    else:
        data = [torch.randn(*shape, generator=g) for _ in range(2)]
    res = activation_matching(spec, model_a, model_b, data)
    inv = invert_permutation(rp)
    for grp in spec.groups():
        assert torch.equal(res.perm[grp], inv[grp]), grp
    # the GPT's attention q/k/v units have no module output: matched by weights as a whole
    aps = spec.activation_points
    expect_fallback = {g for g in spec.groups() if g not in aps}
    for h in spec.heads.values():
        if any(g not in aps for g in h.groups):
            expect_fallback |= set(h.groups)
    assert sorted(res.extras["fallback_groups"]) == sorted(expect_fallback)
    if name == "TinyGPT":
        assert res.extras["fallback_groups"]


@pytest.mark.parametrize("name", ["MLP", "CNN-bn"])
def test_spec_traced_when_not_given(name):
    from pymerge.spec import spec_from_model

    make, shape = _model_cases()[name]
    torch.manual_seed(0)
    model_a = make()
    data = _data(shape, n_batches=2)
    traced = spec_from_model(model_a, data[0])
    model_b, rp = _permuted_copy(model_a, traced, seed=4)
    res = activation_matching(None, model_a, model_b, data)  # traced on the first batch
    res2 = activation_matching(None, model_a, model_b, data, example_inputs=data[1][:2])
    inv = invert_permutation(rp)
    assert sorted(res.perm) == traced.groups()
    for grp in traced.groups():
        assert torch.equal(res.perm[grp], inv[grp]), grp
        assert torch.equal(res2.perm[grp], inv[grp]), grp


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU; CPU twin: test_matches_float64_scipy_reference_on_random_nets",
)
def test_cuda_device_matches_cpu():
    model_a, spec = _cnn(1)
    model_b, _ = _cnn(2)
    data = _data((8, 3, 4, 4), seed=1)
    cpu = activation_matching(spec, model_a, model_b, data)
    gpu = activation_matching(spec, model_a, model_b, data, device="cuda")
    assert next(model_a.parameters()).device.type == "cpu"  # copied, not moved
    for g in spec.groups():
        assert torch.equal(cpu.perm[g], gpu.perm[g]), g
        torch.testing.assert_close(cpu.correlations[g], gpu.correlations[g], atol=1e-4, rtol=0)
