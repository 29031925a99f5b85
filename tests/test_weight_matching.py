"""Weight matching: recovery of known permutations, monotonicity, determinism, warm starts,
errors, no mutation, and equality with an independent scipy reference implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment as scipy_lsa

from pymerge.align import AlignmentResult, matching_objective, weight_matching
from pymerge.align._costs import CostBuilder, naive_cost
from pymerge.spec import (
    AxisRef,
    HeadStructure,
    PermutationSpec,
    apply_permutation,
    random_permutation,
)

# --------------------------------------------------------------------------- fixtures


def mlp_case(dims=(13, 37, 29, 23, 7), seed=0, dtype=torch.float64):
    """A hand-written MLP spec (layers.i.weight/bias) and a random state."""
    g = torch.Generator().manual_seed(seed)
    state, p2a = {}, {}
    for i in range(len(dims) - 1):
        state[f"layers.{i}.weight"] = torch.randn(dims[i + 1], dims[i], generator=g, dtype=dtype)
        state[f"layers.{i}.bias"] = torch.randn(dims[i + 1], generator=g, dtype=dtype)
    for i in range(len(dims) - 2):
        p2a[f"h{i}"] = [
            AxisRef(f"layers.{i}.weight", 0),
            AxisRef(f"layers.{i}.bias", 0),
            AxisRef(f"layers.{i + 1}.weight", 1),
        ]
    return PermutationSpec(p2a, free=(f"layers.{len(dims) - 2}.bias",)), state


def cnn_case(seed=0):
    """conv -> BN -> conv -> BN -> flatten -> linear (``inner`` blocks), BN buffers no_cost."""
    g = torch.Generator().manual_seed(seed)
    c1, c2, hw = 6, 5, 4
    s = {
        "conv1.weight": torch.randn(c1, 3, 3, 3, generator=g),
        "bn1.weight": torch.rand(c1, generator=g) + 0.5,
        "bn1.bias": torch.randn(c1, generator=g),
        "bn1.running_mean": torch.randn(c1, generator=g),
        "bn1.running_var": torch.rand(c1, generator=g) + 0.5,
        "bn1.num_batches_tracked": torch.tensor(3),
        "conv2.weight": torch.randn(c2, c1, 3, 3, generator=g),
        "bn2.weight": torch.rand(c2, generator=g) + 0.5,
        "bn2.bias": torch.randn(c2, generator=g),
        "bn2.running_mean": torch.randn(c2, generator=g),
        "bn2.running_var": torch.rand(c2, generator=g) + 0.5,
        "bn2.num_batches_tracked": torch.tensor(3),
        "fc.weight": torch.randn(10, c2 * hw, generator=g),
        "fc.bias": torch.randn(10, generator=g),
    }
    spec = PermutationSpec(
        {
            "c1": [
                AxisRef("conv1.weight", 0),
                AxisRef("bn1.weight", 0),
                AxisRef("bn1.bias", 0),
                AxisRef("bn1.running_mean", 0),
                AxisRef("bn1.running_var", 0),
                AxisRef("conv2.weight", 1),
            ],
            "c2": [
                AxisRef("conv2.weight", 0),
                AxisRef("bn2.weight", 0),
                AxisRef("bn2.bias", 0),
                AxisRef("bn2.running_mean", 0),
                AxisRef("bn2.running_var", 0),
                AxisRef("fc.weight", 1, inner=hw),
            ],
        },
        free=("fc.bias", "bn1.num_batches_tracked", "bn2.num_batches_tracked"),
        no_cost=(
            "bn1.running_mean",
            "bn1.running_var",
            "bn2.running_mean",
            "bn2.running_var",
            "bn1.num_batches_tracked",
            "bn2.num_batches_tracked",
        ),
    )
    return spec, s


def attention_case(seed=0, heads=3, head_dim=4, d_model=7, d_ff=11):
    """Packed multi-head attention + MLP, residual stream permuted, whole heads permuted."""
    g = torch.Generator().manual_seed(seed)
    e = heads * head_dim
    s = {
        "emb.weight": torch.randn(17, d_model, generator=g),
        "attn.in_proj_weight": torch.randn(3 * e, d_model, generator=g),
        "attn.in_proj_bias": torch.randn(3 * e, generator=g),
        "attn.out_proj.weight": torch.randn(d_model, e, generator=g),
        "attn.out_proj.bias": torch.randn(d_model, generator=g),
        "ln.weight": torch.randn(d_model, generator=g),
        "ln.bias": torch.randn(d_model, generator=g),
        "fc1.weight": torch.randn(d_ff, d_model, generator=g),
        "fc1.bias": torch.randn(d_ff, generator=g),
        "fc2.weight": torch.randn(d_model, d_ff, generator=g),
        "fc2.bias": torch.randn(d_model, generator=g),
        "head.weight": torch.randn(5, d_model, generator=g),
        "head.bias": torch.randn(5, generator=g),
    }
    spec = PermutationSpec(
        {
            "res": [
                AxisRef("emb.weight", 1),
                AxisRef("attn.in_proj_weight", 1),
                AxisRef("attn.out_proj.weight", 0),
                AxisRef("attn.out_proj.bias", 0),
                AxisRef("ln.weight", 0),
                AxisRef("ln.bias", 0),
                AxisRef("fc1.weight", 1),
                AxisRef("fc2.weight", 0),
                AxisRef("fc2.bias", 0),
                AxisRef("head.weight", 1),
            ],
            "qk": [
                AxisRef("attn.in_proj_weight", 0, 0, e),
                AxisRef("attn.in_proj_bias", 0, 0, e),
                AxisRef("attn.in_proj_weight", 0, e, 2 * e),
                AxisRef("attn.in_proj_bias", 0, e, 2 * e),
            ],
            "vo": [
                AxisRef("attn.in_proj_weight", 0, 2 * e, 3 * e),
                AxisRef("attn.in_proj_bias", 0, 2 * e, 3 * e),
                AxisRef("attn.out_proj.weight", 1),
            ],
            "ff": [AxisRef("fc1.weight", 0), AxisRef("fc1.bias", 0), AxisRef("fc2.weight", 1)],
        },
        free=("head.bias",),
        heads={"attn": HeadStructure(heads, head_dim, ("qk", "vo"))},
    )
    return spec, s


CASES = {"mlp": mlp_case, "cnn": cnn_case, "attention": attention_case}


def cost_norm(spec, state):
    return sum(
        float((v.double() ** 2).sum())
        for k, v in state.items()
        if k not in spec.no_cost and torch.is_floating_point(v)
    )


def obj_rel(state):
    """Relative accuracy of reported objectives: exact-ish in float64, float32 products else."""
    wide = any(v.dtype == torch.float64 for v in state.values())
    return 1e-12 if wide else 1e-6


def assert_state_equal(x, y):
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k


# --------------------------------------------------------------------------- recovery


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_recovers_known_permutation(case, seed):
    spec, a = CASES[case](seed=seed)
    true = random_permutation(spec, a, seed=seed + 10)
    b = apply_permutation(spec, true, a)
    res = weight_matching(spec, a, b, seed=seed)
    assert res.converged
    assert_state_equal(apply_permutation(spec, res.perm, b), a)
    assert res.objective == pytest.approx(cost_norm(spec, a), rel=obj_rel(a))
    for g, p in res.perm.items():
        assert p.dtype == torch.long
        # found perm inverts the true one: b[found] = a[true][found] = a
        assert torch.equal(true[g][p], torch.arange(p.numel())), g


def _builder_models():
    from pymerge.testing import models

    return {
        "MLP": (models.MLP(9, (16, 12, 16), 5), lambda: torch.randn(4, 9)),
        "CNN-gn-flatten": (
            models.CNN(3, (8, 12), norm="gn", image_size=8, pool="flatten", hidden=10),
            lambda: torch.randn(2, 3, 8, 8),
        ),
        "ResNet20": (models.ResNet20(width_multiplier=1), lambda: torch.randn(2, 3, 8, 8)),
        "VGG": (models.VGG(image_size=8), lambda: torch.randn(2, 3, 8, 8)),
        "TinyGPT": (
            models.TinyGPT(vocab=11, d_model=16, n_heads=4, n_layers=2, max_len=8),
            lambda: torch.randint(0, 11, (2, 8)),
        ),
    }


@pytest.mark.parametrize("name", ["MLP", "CNN-gn-flatten", "ResNet20", "VGG", "TinyGPT"])
def test_recovers_with_builder_models(name):
    torch.manual_seed(0)
    model, make_input = _builder_models()[name]
    spec = model.spec()
    a = {k: v.clone() for k, v in model.state_dict().items()}
    # break the ties of default norm initialisation (ones/zeros) so recovery is unique
    for k, v in a.items():
        if v.is_floating_point() and k not in spec.no_cost:
            a[k] = v + 0.1 * torch.randn(v.shape)
    true = random_permutation(spec, a, seed=3)
    b = apply_permutation(spec, true, a)
    res = weight_matching(spec, a, b, seed=0)
    back = apply_permutation(spec, res.perm, b)
    for k in a:
        assert torch.equal(back[k], a[k]), (name, k)
    assert res.objective == pytest.approx(cost_norm(spec, a), rel=obj_rel(a))
    # and the matched model computes the same function as model B
    model.eval()
    x = make_input()
    model.load_state_dict(b)
    out_b = model(x)
    model.load_state_dict(back)
    assert torch.allclose(model(x), out_b, atol=1e-5)


# --------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("case", sorted(CASES))
def test_objective_non_decreasing_and_history(case):
    spec, a = CASES[case](seed=4)
    _, b = CASES[case](seed=5)
    res = weight_matching(spec, a, b, seed=2)
    obj = [res.history.initial_objective, *res.history.objective]
    assert all(y >= x - 1e-9 * abs(x) for x, y in zip(obj, obj[1:], strict=False))
    assert obj[-1] > obj[0]
    h = res.history
    assert len(h.objective) == len(h.solves) == len(h.seconds) == len(h.improved)
    assert h.improved[-1] == 0 and res.converged
    assert all(s >= 1 for s in h.solves)
    # reported objective matches a direct evaluation of the returned permutation
    direct = sum(
        float((a[k].double() * v.double()).sum())
        for k, v in apply_permutation(spec, res.perm, b).items()
        if k not in spec.no_cost and torch.is_floating_point(v)
    )
    assert res.objective == pytest.approx(direct, rel=obj_rel(a))
    assert matching_objective(spec, a, b, res.perm) == pytest.approx(direct, rel=1e-12)
    # intermediate values (tracked from assignment gains) match exact evaluations of the
    # same path stopped early
    for k in range(1, h.iterations):
        early = weight_matching(spec, a, b, seed=2, max_iter=k)
        assert early.objective == pytest.approx(h.objective[k - 1], rel=max(obj_rel(a), 1e-9)), k


def test_deterministic_for_seed():
    spec, a = mlp_case(dims=(9, 40, 40, 40, 40, 3), seed=0)
    _, b = mlp_case(dims=(9, 40, 40, 40, 40, 3), seed=1)
    r1 = weight_matching(spec, a, b, seed=7)
    r2 = weight_matching(spec, a, b, seed=7)
    assert r1.history.objective == r2.history.objective
    for g in r1.perm:
        assert torch.equal(r1.perm[g], r2.perm[g])


def test_warm_start_from_perm_and_result():
    spec, a = mlp_case(seed=2)
    true = random_permutation(spec, a, seed=5)
    b = apply_permutation(spec, true, a)
    inv = {g: torch.argsort(p) for g, p in true.items()}
    res = weight_matching(spec, a, b, init=inv)
    assert res.history.iterations == 1 and res.history.improved == [0]
    assert res.history.initial_objective == pytest.approx(cost_norm(spec, a), rel=1e-12)
    # a result as init also carries its duals and converges at once
    _, c = mlp_case(seed=3)
    first = weight_matching(spec, a, c, seed=1)
    again = weight_matching(spec, a, c, init=first, seed=1)
    assert isinstance(again, AlignmentResult) and again.method == "weight_matching"
    assert again.history.iterations == 1
    assert again.objective == pytest.approx(first.objective, rel=1e-12)
    for g in first.perm:
        assert torch.equal(first.perm[g], again.perm[g])
    # partial init: missing groups start at identity
    part = weight_matching(spec, a, b, init={"h0": inv["h0"]})
    assert_state_equal(apply_permutation(spec, part.perm, b), a)


def test_max_iter_zero_and_one():
    spec, a = mlp_case(seed=0)
    _, b = mlp_case(seed=1)
    r0 = weight_matching(spec, a, b, max_iter=0)
    assert r0.history.iterations == 0 and not r0.converged
    assert all(torch.equal(p, torch.arange(p.numel())) for p in r0.perm.values())
    assert r0.objective == pytest.approx(matching_objective(spec, a, b), rel=1e-12)
    r1 = weight_matching(spec, a, b, max_iter=1)
    assert r1.history.iterations == 1


def test_float32_and_bfloat16_inputs():
    spec, a = mlp_case(seed=0, dtype=torch.float32)
    true = random_permutation(spec, a, seed=1)
    b = apply_permutation(spec, true, a)
    res = weight_matching(spec, a, b)
    assert_state_equal(apply_permutation(spec, res.perm, b), a)
    a16 = {k: v.to(torch.bfloat16) for k, v in a.items()}
    b16 = apply_permutation(spec, true, a16)
    res16 = weight_matching(spec, a16, b16)
    assert_state_equal(apply_permutation(spec, res16.perm, b16), a16)
    # float32 arithmetic mode still recovers an exact copy
    res32 = weight_matching(spec, a, b, dtype=torch.float32)
    assert_state_equal(apply_permutation(spec, res32.perm, b), a)


def test_no_cost_keys_do_not_influence_matching():
    spec, a = cnn_case(seed=0)
    _, b = cnn_case(seed=1)
    r1 = weight_matching(spec, a, b)
    b2 = dict(b)
    b2["bn1.running_mean"] = torch.randn(6) * 1e6
    b2["bn2.running_var"] = torch.rand(5) * 1e6
    r2 = weight_matching(spec, a, b2)
    assert r1.objective == r2.objective
    for g in r1.perm:
        assert torch.equal(r1.perm[g], r2.perm[g])


def test_heads_stay_whole():
    spec, a = attention_case(seed=0)
    _, b = attention_case(seed=1)
    res = weight_matching(spec, a, b, seed=0)
    for g in ("qk", "vo"):
        blocks = res.perm[g].view(3, 4) // 4
        assert bool((blocks == blocks[:, :1]).all()), g
    # q/k and v/o share the head permutation
    assert torch.equal(res.perm["qk"].view(3, 4)[:, 0] // 4, res.perm["vo"].view(3, 4)[:, 0] // 4)


def test_inputs_not_mutated():
    for case in CASES.values():
        spec, a = case(seed=0)
        _, b = case(seed=1)
        a0 = {k: v.clone() for k, v in a.items()}
        b0 = {k: v.clone() for k, v in b.items()}
        init = {g: torch.arange(n) for g, n in spec.validate(a).items()}
        init0 = {g: p.clone() for g, p in init.items()}
        res = weight_matching(spec, a, b, init=init)
        assert_state_equal(a, a0)
        assert_state_equal(b, b0)
        assert_state_equal(init, init0)
        for g in init:  # result does not alias the init tensors
            assert res.perm[g].data_ptr() != init[g].data_ptr()


# --------------------------------------------------------------------------- errors


def test_errors_name_the_problem():
    spec, a = mlp_case(seed=0)
    _, b = mlp_case(seed=1)
    with pytest.raises(TypeError, match="PermutationSpec"):
        weight_matching({"h0": []}, a, b)
    missing = {k: v for k, v in b.items() if k != "layers.1.bias"}
    with pytest.raises(ValueError, match="layers.1.bias"):
        weight_matching(spec, a, missing)
    extra = dict(b, **{"extra.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="extra.weight"):
        weight_matching(spec, a, extra)
    wrong = dict(b, **{"layers.2.weight": torch.zeros(23, 30, dtype=torch.float64)})
    with pytest.raises(ValueError, match="layers.2.weight"):
        weight_matching(spec, a, wrong)
    with pytest.raises(TypeError, match="layers.0.bias"):
        weight_matching(spec, a, dict(b, **{"layers.0.bias": np.zeros(37)}))
    with pytest.raises(ValueError, match="'h1'.*length 5"):
        weight_matching(spec, a, b, init={"h1": torch.arange(5)})
    with pytest.raises(ValueError, match="'h1'.*not a permutation"):
        weight_matching(spec, a, b, init={"h1": torch.zeros(29, dtype=torch.long)})
    with pytest.raises(ValueError, match="'h0'.*integer"):
        weight_matching(spec, a, b, init={"h0": torch.arange(37.0)})
    with pytest.raises(ValueError, match="'nope'"):
        weight_matching(spec, a, b, init={"nope": torch.arange(3)})
    with pytest.raises(ValueError, match="max_iter"):
        weight_matching(spec, a, b, max_iter=-1)
    spec_h, ah = attention_case()
    bad = {"qk": torch.tensor([1, 0, 2, 3, 4, 5, 6, 7, 8, 9, 11, 10]).roll(2)}
    with pytest.raises(ValueError, match="'qk'.*head"):
        weight_matching(spec_h, ah, ah, init=bad)


# --------------------------------------------------------------------------- reference


def reference_weight_matching(spec, state_a, state_b, max_iter=100, seed=0, greedy=False):
    """Plain Git Re-Basin weight matching (NumPy + scipy), written from the paper.

    Group order per iteration: ``torch.randperm`` on a generator seeded with ``seed`` over
    the sorted group names (the documented order). Supports plain (param, axis) refs.
    ``greedy``: the first sweep visits groups most-determined-first and builds each cost only
    from the terms whose other permuted axes belong to groups visited before (pymerge's
    documented default initial sweep).
    """
    a = {k: v.double().numpy() for k, v in state_a.items() if torch.is_floating_point(v)}
    b = {k: v.double().numpy() for k, v in state_b.items() if torch.is_floating_point(v)}
    sizes = spec.validate(state_a)
    names = sorted(spec.perm_to_axes)
    perm = {p: np.arange(sizes[p]) for p in names}
    axes_of = {}
    for p in names:
        for ref in spec.perm_to_axes[p]:
            axes_of.setdefault(ref.param, []).append((ref.axis, p))

    def permuted(key, except_axis=None):
        w = b[key]
        for axis, p in axes_of.get(key, []):
            if axis != except_axis:
                w = np.take(w, perm[p], axis=axis)
        return w

    def other_groups(ref):
        return {p for axis, p in axes_of[ref.param] if axis != ref.axis}

    def cost(p, known=None):
        n = sizes[p]
        A = np.zeros((n, n))
        for ref in spec.perm_to_axes[p]:
            if ref.param in spec.no_cost:
                continue
            if known is not None and not other_groups(ref) <= known:
                continue
            wa = np.moveaxis(a[ref.param], ref.axis, 0).reshape(n, -1)
            wb = np.moveaxis(permuted(ref.param, ref.axis), ref.axis, 0).reshape(n, -1)
            A += wa @ wb.T
        return A

    gen = torch.Generator().manual_seed(seed)
    for it in range(max_iter):
        order = [names[i] for i in torch.randperm(len(names), generator=gen).tolist()]
        if it == 0 and greedy:
            known, left = set(), list(names)
            for _ in names:

                def weight(p, known=known):
                    return sum(
                        a[ref.param].size
                        for ref in spec.perm_to_axes[p]
                        if ref.param not in spec.no_cost and other_groups(ref) <= known
                    )

                best = max(left, key=lambda p: (weight(p), -names.index(p)))
                left.remove(best)
                n = sizes[best]
                _, ci = scipy_lsa(cost(best, known), maximize=True)
                perm[best] = ci
                known.add(best)
            identity = {p: np.arange(sizes[p]) for p in names}
            greedy_perm = dict(perm)
            perm.update(identity)
            start = sum(float((a[k] * permuted(k)).sum()) for k in a if k not in spec.no_cost)
            perm.update(greedy_perm)
            now = sum(float((a[k] * permuted(k)).sum()) for k in a if k not in spec.no_cost)
            if now < start:
                perm.update(identity)
            continue
        progress = False
        for p in order:
            n = sizes[p]
            A = cost(p)
            _, ci = scipy_lsa(A, maximize=True)
            old = A[np.arange(n), perm[p]].sum()
            new = A[np.arange(n), ci].sum()
            progress = progress or new > old + 1e-12
            perm[p] = ci
        if not progress:
            break
    objective = sum(float((a[k] * permuted(k)).sum()) for k in a if k not in spec.no_cost)
    return perm, objective


@pytest.mark.parametrize("greedy", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_scipy_reference(seed, greedy):
    spec, a = mlp_case(dims=(11, 48, 40, 36, 30, 6), seed=10 + seed)
    _, b = mlp_case(dims=(11, 48, 40, 36, 30, 6), seed=20 + seed)
    ref_perm, ref_obj = reference_weight_matching(spec, a, b, seed=seed, greedy=greedy)
    res = weight_matching(spec, a, b, seed=seed, greedy=greedy)
    assert res.objective == pytest.approx(ref_obj, rel=1e-12)
    for g in ref_perm:
        assert np.array_equal(res.perm[g].numpy(), ref_perm[g]), g


def test_equals_scipy_reference_torch_backend():
    spec, a = mlp_case(dims=(7, 30, 25, 20, 4), seed=3)
    _, b = mlp_case(dims=(7, 30, 25, 20, 4), seed=4)
    ref_perm, ref_obj = reference_weight_matching(spec, a, b, seed=5)
    res = weight_matching(spec, a, b, seed=5, backend="torch")  # the paper's algorithm: default
    assert res.objective == pytest.approx(ref_obj, rel=1e-12)
    for g in ref_perm:
        assert np.array_equal(res.perm[g].numpy(), ref_perm[g]), g


def test_incremental_costs_equal_fresh_costs():
    """The cached/incremental cost of every group equals a from-scratch build and the naive
    definition (``naive_cost``), including a tensor with three permuted axes and
    segment/inner refs."""
    g = torch.Generator().manual_seed(0)
    state = {
        "w1": torch.randn(8, 5, generator=g, dtype=torch.float64),
        "t3": torch.randn(8, 6, 4, generator=g, dtype=torch.float64),  # axes: p, q, r
        "w2": torch.randn(3, 6 * 2, generator=g, dtype=torch.float64),  # q with inner=2
        "w3": torch.randn(4, 7, generator=g, dtype=torch.float64),
    }
    spec = PermutationSpec(
        {
            "p": [AxisRef("w1", 0), AxisRef("t3", 0)],
            "q": [AxisRef("t3", 1), AxisRef("w2", 1, inner=2)],
            "r": [AxisRef("t3", 2), AxisRef("w3", 0)],
        }
    )
    other = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in state.items()}
    plan = CostBuilder(spec, state, other, torch.float64)
    perm = {k: torch.arange(n) for k, n in plan.sizes.items()}
    rng = np.random.default_rng(0)
    for step in range(30):
        grp = ["p", "q", "r"][step % 3]
        n = plan.sizes[grp]
        new = perm[grp].clone()
        i, j = rng.choice(n, 2, replace=False)  # sparse change: a swap
        new[[i, j]] = new[[j, i]]
        if step % 7 == 0:
            new = torch.from_numpy(rng.permutation(n))  # dense change
        perm[grp] = new
        plan.invalidate(grp)
        for h in ("p", "q", "r"):
            fresh = CostBuilder(spec, state, other, torch.float64)
            got = plan.cost(h, perm)
            assert torch.allclose(got, fresh.cost(h, perm), rtol=1e-12, atol=1e-12)
            naive = naive_cost(spec, state, other, perm, h)
            assert torch.allclose(got, naive, rtol=1e-12, atol=1e-12), (step, h)
        assert plan.objective(perm) == pytest.approx(
            matching_objective(spec, state, other, perm), rel=1e-12
        )
    assert plan.delta_updates > 0


def test_progress_bar_runs(capsys):
    spec, a = mlp_case(seed=0)
    _, b = mlp_case(seed=1)
    quiet = weight_matching(spec, a, b, seed=3)
    loud = weight_matching(spec, a, b, seed=3, progress=True)
    assert "weight matching" in capsys.readouterr().err
    assert loud.history.objective == quiet.history.objective


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(1, 9), min_size=2, max_size=4),
    st.integers(1, 6),
    st.integers(0, 2**16),
)
def test_recovery_property(hidden, d_in, seed):
    """Any MLP shape (incl. width-1 layers): with the greedy first sweep a permuted copy is
    matched back exactly; the paper's algorithm (default) ends at a coordinate-wise optimum
    at least as good as the identity (on tiny nets it can stop short of the exact copy)."""
    dims = (d_in, *hidden, 3)
    spec, a = mlp_case(dims=dims, seed=seed)
    true = random_permutation(spec, a, seed=seed + 1)
    b = apply_permutation(spec, true, a)
    res = weight_matching(spec, a, b, seed=seed, greedy=True)
    assert_state_equal(apply_permutation(spec, res.perm, b), a)
    assert res.objective == pytest.approx(cost_norm(spec, a), rel=1e-12)
    paper = weight_matching(spec, a, b, seed=seed)
    assert paper.converged
    assert paper.objective >= matching_objective(spec, a, b) - 1e-9
    # a local optimum: one more sweep from it changes nothing
    again = weight_matching(spec, a, b, init=paper.perm, seed=seed + 1)
    assert again.history.improved == [0]
    assert again.objective == pytest.approx(paper.objective, rel=1e-12)


def test_non_finite_weights_name_the_key_and_group():
    spec, a = mlp_case(seed=0)
    _, b = mlp_case(seed=1)
    key = "layers.1.weight"
    bad = dict(b, **{key: b[key].clone()})
    bad[key][2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"state_b\['layers\.1\.weight'\].*nan.*\(2, 3\).*'h"):
        weight_matching(spec, a, bad)
    bad[key][2, 3] = float("inf")
    with pytest.raises(ValueError, match=r"state_a\['layers\.1\.weight'\].*inf"):
        weight_matching(spec, bad, a)  # as state_a too: named state_a
    assert torch.isinf(bad[key][2, 3])  # the input is left as it was


@pytest.mark.parametrize(
    ("seed", "error", "match"),
    [
        (2**70, ValueError, r"seed must be an int in \[0, 2\*\*63\), got 1180591620717411303424"),
        (-1, ValueError, "seed must be an int"),
        (None, TypeError, "seed must be an int.*None"),
        (1.5, TypeError, "seed must be an int.*1.5"),
        (True, TypeError, "seed must be an int.*True"),
    ],
)
def test_bad_seeds_are_named(seed, error, match):
    spec, a = mlp_case(seed=0)
    with pytest.raises(error, match=match):
        weight_matching(spec, a, a, seed=seed)


def test_groups_option_optimises_only_those_groups():
    spec, a = mlp_case(seed=2)
    true = random_permutation(spec, a, seed=5)
    b = apply_permutation(spec, true, a)
    inv = {g: torch.argsort(p) for g, p in true.items()}
    # every other group fixed at its true value: the one left free is recovered exactly
    g0 = spec.groups()[0]
    fixed = {g: p for g, p in inv.items() if g != g0}
    res = weight_matching(spec, a, b, init=fixed, groups=[g0])
    assert torch.equal(res.perm[g0], inv[g0])
    for g in fixed:
        assert torch.equal(res.perm[g], inv[g])
    # from the identity, groups left out stay at the identity
    only = weight_matching(spec, a, b, groups=[g0])
    for g in spec.groups():
        if g != g0:
            assert torch.equal(only.perm[g], torch.arange(only.perm[g].numel()))
    with pytest.raises(ValueError, match="'nope'"):
        weight_matching(spec, a, b, groups=["nope"])


def test_greedy_option_documented_gain():
    """The greedy first sweep is an option; on random MLPs it is never below the identity and
    both variants converge to coordinate-wise optima."""
    spec, a = mlp_case(dims=(9, 40, 40, 40, 40, 3), seed=0)
    _, b = mlp_case(dims=(9, 40, 40, 40, 40, 3), seed=1)
    paper = weight_matching(spec, a, b, seed=0)
    greedy = weight_matching(spec, a, b, seed=0, greedy=True)
    base = matching_objective(spec, a, b)
    assert paper.converged and greedy.converged
    assert paper.objective > base and greedy.objective > base
