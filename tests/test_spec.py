"""PermutationSpec data, validation, permutations and their errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pymerge.spec import (
    ActivationPoint,
    AxisRef,
    HeadStructure,
    PermutationSpec,
    apply_permutation,
    compose_permutations,
    identity_permutation,
    invert_permutation,
    mlp_spec,
    permutation_index_map,
    permute_param,
    random_permutation,
)
from pymerge.testing.models import CNN, MLP, TinyGPT


def _mlp_state(widths=(4, 5, 3, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    names = [f"fc{i}" for i in range(len(widths) - 2)] + ["out"]
    for i, n in enumerate(names):
        sd[f"{n}.weight"] = torch.randn(widths[i + 1], widths[i], generator=g)
        sd[f"{n}.bias"] = torch.randn(widths[i + 1], generator=g)
    return sd


# ----------------------------------------------------------------------------- data
def test_constructor_accepts_tuples_and_derives_inverse() -> None:
    spec = PermutationSpec(
        {"b": [("x.weight", 0), ("y.weight", 1)], "a": [AxisRef("z", 0)]}, free=["y.bias"]
    )
    assert spec.groups() == ["a", "b"]
    assert spec.axes_to_perm["y.weight"] == [(AxisRef("y.weight", 1), "b")]
    assert spec.perm_to_axes["b"][0] == AxisRef("x.weight", 0, 0, None, 1)
    assert spec.free == frozenset({"y.bias"})


@pytest.mark.parametrize(
    "bad, err",
    [
        ({"g": []}, ValueError),
        ({"g": [("w",)]}, TypeError),
        ({"g": [("w", 0, -1)]}, ValueError),
        ({"g": [("w", 0, 4, 2)]}, ValueError),
        ({"g": [("w", 0, 0, None, 0)]}, ValueError),
        ({"g": [("w", 1.0)]}, TypeError),
        ({"": [("w", 0)]}, TypeError),
    ],
)
def test_constructor_rejects_bad_groups(bad, err) -> None:
    with pytest.raises(err):
        PermutationSpec(bad)


def test_constructor_rejects_inconsistent_metadata() -> None:
    with pytest.raises(ValueError, match="declared free"):
        PermutationSpec({"g": [("w", 0)]}, free=["w"])
    with pytest.raises(ValueError, match="unknown group 'h'"):
        PermutationSpec({"g": [("w", 0)]}, heads={"s": HeadStructure(2, 2, ("h",))})
    with pytest.raises(ValueError, match="two head structures"):
        PermutationSpec(
            {"g": [("w", 0)]},
            heads={"s": HeadStructure(2, 2, ("g",)), "t": HeadStructure(1, 4, ("g",))},
        )
    with pytest.raises(ValueError, match="unknown group 'h'"):
        PermutationSpec({"g": [("w", 0)]}, activation_points={"h": ("m", 1)})


def test_to_dict_round_trip_json() -> None:
    spec = TinyGPT(11, 8, 2, 2, 6).spec().with_free([])
    d = json.loads(json.dumps(spec.to_dict()))
    back = PermutationSpec.from_dict(d)
    assert back == spec
    assert back.heads == spec.heads and back.activation_points == spec.activation_points
    assert back.no_cost == spec.no_cost and back.free == spec.free
    assert spec != mlp_spec(2)


# ----------------------------------------------------------------------------- validate
def test_validate_returns_sizes() -> None:
    sd = _mlp_state()
    assert mlp_spec(2).validate(sd) == {"fc0": 5, "fc1": 3}


def test_validate_names_the_problem() -> None:
    sd = _mlp_state()
    spec = mlp_spec(2)
    bad = dict(sd)
    del bad["fc1.weight"]
    with pytest.raises(ValueError, match="'fc1.weight'.*missing"):
        spec.validate(bad)
    with pytest.raises(ValueError, match="'extra'.*neither permuted"):
        spec.validate({**sd, "extra": torch.zeros(2)})
    with pytest.raises(TypeError, match="'fc0.bias'"):
        spec.validate({**sd, "fc0.bias": [1.0] * 5})
    wrong_axis = spec.with_groups({"fc0": [("fc0.weight", 2), ("fc0.bias", 0), ("fc1.weight", 1)]})
    with pytest.raises(ValueError, match="group 'fc0'.*axis 2 out of range"):
        wrong_axis.validate(sd)
    sizes = spec.with_groups({"fc0": [("fc0.weight", 0), ("fc0.bias", 0), ("fc1.weight", 0)]})
    with pytest.raises(ValueError, match="group 'fc0' has inconsistent sizes"):
        sizes.validate(sd)
    seg = spec.with_groups({"fc0": [("fc0.weight", 0, 0, 9), ("fc0.bias", 0, 0, 9)]})
    with pytest.raises(ValueError, match="exceeds"):
        seg.validate(sd)
    inner = spec.with_groups({"fc0": [("fc0.weight", 0, 0, None, 2)]})
    with pytest.raises(ValueError, match="multiple of inner"):
        inner.validate(sd)
    overlap = PermutationSpec({**spec.perm_to_axes, "x": [("fc1.weight", 0, 1, 2)]}, free=spec.free)
    with pytest.raises(ValueError, match="overlap"):
        overlap.validate(sd)
    heads = PermutationSpec(
        spec.perm_to_axes, free=spec.free, heads={"h": HeadStructure(2, 2, ("fc0",))}
    )
    with pytest.raises(ValueError, match="head structure 'h'.*size 5"):
        heads.validate(sd)
    with pytest.raises(ValueError, match="'nope' is declared free"):
        PermutationSpec(spec.perm_to_axes, free={"out.bias", "nope"}).validate(sd)


def test_negative_axes_are_resolved() -> None:
    sd = _mlp_state()
    spec = PermutationSpec(
        {
            "fc0": [("fc0.weight", -2), ("fc0.bias", -1), ("fc1.weight", -1)],
            "fc1": [("fc1.weight", 0), ("fc1.bias", 0), ("out.weight", 1)],
        },
        free=["out.bias"],
    )
    perm = random_permutation(spec, sd, seed=3)
    ref = apply_permutation(mlp_spec(2), perm, sd)
    got = apply_permutation(spec, perm, sd)
    for k in sd:
        assert torch.equal(ref[k], got[k])
    norm = spec.normalized(sd)
    assert all(
        r.axis >= 0 and r.stop is not None for refs in norm.perm_to_axes.values() for r in refs
    )


# ----------------------------------------------------------------------------- permutations
def test_bad_permutations_name_the_group() -> None:
    sd = _mlp_state()
    spec = mlp_spec(2)
    good = random_permutation(spec, sd, seed=0)
    cases = [
        ({"fc1": good["fc1"]}, "missing group 'fc0'"),
        ({**good, "zz": torch.arange(2)}, "unknown group 'zz'"),
        ({**good, "fc0": torch.arange(4)}, "group 'fc0' has shape"),
        ({**good, "fc1": torch.tensor([0, 0, 1])}, "group 'fc1' is not a permutation"),
        ({**good, "fc1": torch.tensor([0, 1, 3])}, "group 'fc1' is not a permutation"),
        ({**good, "fc1": torch.tensor([0.0, 1.0, 2.0])}, "group 'fc1' must be integer"),
        ({**good, "fc1": torch.arange(3).view(3, 1)}, "group 'fc1' has shape"),
    ]
    for perm, msg in cases:
        with pytest.raises(ValueError, match=msg):
            apply_permutation(spec, perm, sd)
    with pytest.raises(TypeError):
        apply_permutation(spec, [good["fc0"], good["fc1"]], sd)  # type: ignore[arg-type]


def test_head_structure_enforced() -> None:
    spec = PermutationSpec(
        {"qk": [("q", 0), ("k", 0)], "vo": [("v", 0)]},
        heads={"attn": HeadStructure(2, 3, ("qk", "vo"))},
    )
    sd = {"q": torch.randn(6, 2), "k": torch.randn(6, 2), "v": torch.randn(6, 2)}
    for seed in range(5):
        p = random_permutation(spec, sd, seed=seed)
        apply_permutation(spec, p, sd)  # accepted
        assert torch.equal(p["qk"].view(2, 3) // 3, p["vo"].view(2, 3) // 3)
    split = {"qk": torch.tensor([0, 1, 3, 2, 4, 5]), "vo": torch.arange(6)}
    with pytest.raises(ValueError, match="group 'qk' splits heads"):
        apply_permutation(spec, split, sd)
    differ = {"qk": torch.tensor([3, 4, 5, 0, 1, 2]), "vo": torch.arange(6)}
    with pytest.raises(ValueError, match="group 'vo' moves heads differently"):
        apply_permutation(spec, differ, sd)


def test_apply_does_not_mutate_and_matches_manual_indexing() -> None:
    sd = _mlp_state()
    snapshot = {k: v.clone() for k, v in sd.items()}
    spec = mlp_spec(2)
    perm = random_permutation(spec, sd, seed=1)
    perm_copy = {g: p.clone() for g, p in perm.items()}
    new = apply_permutation(spec, perm, sd)
    for k in sd:
        assert torch.equal(sd[k], snapshot[k])
    for g in perm:
        assert torch.equal(perm[g], perm_copy[g])
    p0, p1 = perm["fc0"], perm["fc1"]
    assert torch.equal(new["fc0.weight"], sd["fc0.weight"][p0])
    assert torch.equal(new["fc1.weight"], sd["fc1.weight"][p1][:, p0])
    assert torch.equal(new["out.weight"], sd["out.weight"][:, p1])
    assert new["out.bias"] is sd["out.bias"]  # untouched keys are passed through
    assert new["fc0.bias"] is not sd["fc0.bias"]


def test_random_permutation_deterministic_and_seeded() -> None:
    sd = CNN(3, (8, 8), 4, "gn", image_size=4, gn_groups=2).state_dict()
    spec = CNN(3, (8, 8), 4, "gn", image_size=4, gn_groups=2).spec()
    a, b, c = (random_permutation(spec, sd, seed=s) for s in (5, 5, 6))
    assert all(torch.equal(a[g], b[g]) for g in a)
    assert any(not torch.equal(a[g], c[g]) for g in a)
    for g, n in spec.validate(sd).items():
        assert torch.equal(a[g].sort().values, torch.arange(n))
    ident = identity_permutation(spec, sd)
    assert all(torch.equal(ident[g], torch.arange(len(ident[g]))) for g in ident)


def test_invert_and_compose() -> None:
    model = TinyGPT(13, 8, 2, 1, 5)
    sd = model.state_dict()
    spec = model.spec()
    p, q = random_permutation(spec, sd, seed=1), random_permutation(spec, sd, seed=2)
    back = apply_permutation(spec, invert_permutation(p), apply_permutation(spec, p, sd))
    for k in sd:
        assert torch.equal(back[k], sd[k])
    two_step = apply_permutation(spec, q, apply_permutation(spec, p, sd))
    one_step = apply_permutation(spec, compose_permutations(spec, p, q), sd)
    for k in sd:
        assert torch.equal(two_step[k], one_step[k])
    with pytest.raises(ValueError, match="not a permutation"):
        invert_permutation({"g": torch.tensor([0, 0])})
    with pytest.raises(ValueError, match="missing group"):
        compose_permutations(spec, p, {})


@pytest.mark.parametrize(
    "make",
    [
        lambda: TinyGPT(13, 8, 2, 2, 5),
        lambda: CNN(3, (4, 6), 3, "bn", image_size=5, pool="flatten", hidden=5),
    ],
)
def test_index_map_and_permute_param_match_apply(make) -> None:
    model = make()
    sd = model.state_dict()
    spec = model.spec()
    perm = random_permutation(spec, sd, seed=4)
    new = apply_permutation(spec, perm, sd)
    imap = permutation_index_map(spec, perm, sd)
    assert set(imap) == set(spec.axes_to_perm)
    for k, axes in imap.items():
        t = sd[k]
        for ax, idx in axes:
            assert idx.dtype == torch.long and idx.shape == (t.shape[ax],)
            t = t.index_select(ax, idx)
        assert torch.equal(t, new[k]), k
        assert torch.equal(permute_param(spec, perm, k, sd[k]), new[k])
    # skipping a group == treating it as the identity
    g = spec.groups()[0]
    ident = {**perm, g: torch.arange(len(perm[g]))}
    partial = apply_permutation(spec, ident, sd)
    for k in spec.axes_to_perm:
        assert torch.equal(permute_param(spec, perm, k, sd[k], skip_groups=[g]), partial[k])


# ----------------------------------------------------------------------------- editing
def test_without_groups_with_free_and_merge() -> None:
    model = MLP(5, (4, 4, 3), 2).double()
    sd = model.state_dict()
    spec = model.spec()
    frozen = spec.without_groups(["fc1"])
    assert frozen.groups() == ["fc0", "fc2"] and "fc1.bias" in frozen.free
    frozen.validate(sd)
    free = spec.with_free(["fc2.bias"])
    assert "fc2" not in free.perm_to_axes and "fc2.bias" in free.free
    free.validate(sd)
    merged = spec.merge_groups(["fc0", "fc1"], "hidden")
    assert merged.groups() == ["fc2", "hidden"]
    merged.validate(sd)
    with pytest.raises(ValueError, match="unknown group"):
        spec.without_groups(["nope"])
    over = spec.override({"fc2": None, "__merge__": [["fc0", "fc1"]]})
    assert over.groups() == ["fc0"]
    with pytest.raises(ValueError, match="unknown override key"):
        spec.override({"__bogus__": 1})
    x = torch.randn(3, 5, dtype=torch.float64)
    for s in (frozen, free, merged, over):  # all still function-preserving
        other = copy.deepcopy(model)
        other.load_state_dict(apply_permutation(s, random_permutation(s, sd, seed=7), sd))
        torch.testing.assert_close(model(x), other(x), rtol=1e-10, atol=1e-10)
    # a head-structured group freezes its whole structure
    gpt = TinyGPT(7, 8, 2, 1, 4).spec()
    cut = gpt.without_groups(["blocks.0.attn.qk"])
    assert "blocks.0.attn.vo" not in cut.perm_to_axes and not cut.heads
    assert "blocks.0.attn.in_proj_bias" in cut.free


def test_activation_point_type() -> None:
    spec = mlp_spec(1)
    assert spec.activation_points["fc0"] == ActivationPoint("act0", 1)


# ----------------------------------------------------------------------------- property
@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(1, 7), min_size=1, max_size=4),
    st.integers(1, 6),
    st.integers(1, 5),
    st.integers(0, 2**31 - 1),
)
def test_random_mlp_widths_invariance(hidden, din, dout, seed) -> None:
    torch.manual_seed(seed % 1000)
    model = MLP(din, hidden, dout).double()
    sd = model.state_dict()
    spec = model.spec()
    assert spec.validate(sd) == {f"fc{i}": h for i, h in enumerate(hidden)}
    perm = random_permutation(spec, sd, seed=seed)
    other = copy.deepcopy(model)
    other.load_state_dict(apply_permutation(spec, perm, sd))
    x = torch.randn(3, din, dtype=torch.float64)
    torch.testing.assert_close(model(x), other(x), rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA device (CPU twin: test_index_map_and_permute_param_match_apply)",
)
def test_apply_on_cuda_state_with_cpu_permutation() -> None:
    model = TinyGPT(13, 8, 2, 1, 5)
    sd = model.state_dict()
    spec = model.spec()
    perm = random_permutation(spec, sd, seed=2)
    ref = apply_permutation(spec, perm, sd)
    cuda = {k: v.cuda() for k, v in sd.items()}
    got = apply_permutation(spec, perm, cuda)
    imap = permutation_index_map(spec, {g: p.cuda() for g, p in perm.items()}, cuda)
    for k in sd:
        assert got[k].device.type == "cuda"
        assert torch.equal(got[k].cpu(), ref[k])
    for k, axes in imap.items():
        t = cuda[k]
        for ax, idx in axes:
            assert idx.device == t.device
            t = t.index_select(ax, idx)
        assert torch.equal(t.cpu(), ref[k])
