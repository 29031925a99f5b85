"""ZipIt!: the greedy matching against a plain reference written here, the merge/unmerge
algebra on MLPs and CNNs (r=0 is the models side by side, a permuted copy zips back to the
model), REPAIR hitting its goal statistics, partial zipping, bad input, no mutation, and
merged accuracy above naive averaging on sklearn's digits."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from pymerge.merge.zipit import zip_matching, zipit
from pymerge.spec import (
    HeadStructure,
    PermutationSpec,
    apply_permutation,
    random_permutation,
)
from pymerge.testing.models import CNN, MLP

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- the reference


def _ref_zip(corr: np.ndarray, k: int, r: float, alpha: float, beta: float):
    """ZipIt!'s greedy matching, written out with Python lists."""
    o = corr.shape[0]
    n = o // k
    m = int(o * (1 - r) + 1e-4)
    sim = [[-math.inf if i == j else float(corr[i, j]) for j in range(o)] for i in range(o)]
    origin = [i // n for i in range(o)]
    members = {i: [i] for i in range(o)}
    active = list(range(o))
    budget = int((o - m) // k * beta + 1e-4)
    used = [0] * k

    def allowed(i, j):
        return origin[i] != origin[j] or used[origin[i]] < budget

    def best(check_budget):
        top, pair = -math.inf, None
        for a, i in enumerate(active):
            for j in active[a + 1 :]:
                if (not check_budget or allowed(i, j)) and sim[i][j] > top:
                    top, pair = sim[i][j], (i, j)
        return pair

    while len(active) > m:
        pair = best(True) or best(False)
        if pair is None:
            pair = max(
                ((i, j) for a, i in enumerate(active) for j in active[a + 1 :]),
                key=lambda p: corr[p[0], p[1]],
            )
        i, j = pair
        members[i] += members[j]
        active.remove(j)
        for x in active:
            if x == i:
                continue
            s = min(sim[i][x], sim[j][x])
            if alpha > 0:
                s *= alpha
            elif origin[x] in (origin[i], origin[j]):
                s = -math.inf
            sim[i][x] = sim[x][i] = s
        if origin[i] == origin[j]:
            used[origin[i]] += 1
    u = np.zeros((o, len(active)))
    for c, i in enumerate(active):
        u[members[i], c] = 1
    return (u / u.sum(0)).T, u


def _random_corr(o: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * o, o, generator=g, dtype=torch.float64)
    x = x + 0.8 * x.roll(o // 2, 1)  # some structure across the models
    return torch.corrcoef(x.T)


@pytest.mark.parametrize(
    "k,n,r,alpha,beta",
    [
        (2, 6, 0.5, 0.3, 0.125),
        (2, 8, 0.5, 0.3, 0.5),
        (2, 8, 0.25, 0.3, 0.25),
        (3, 4, 2 / 3, 0.3, 0.5),
        (3, 4, 0.5, 0.0, 0.0),
        (2, 6, 0.5, -1.0, 1.0),
        (2, 5, 0.8, 0.3, 0.0),  # past the point where every pair is blocked
    ],
)
def test_zip_matching_matches_the_reference(k, n, r, alpha, beta):
    corr = _random_corr(k * n, seed=k * 100 + n)
    m_ref, u_ref = _ref_zip(corr.numpy(), k, r, alpha, beta)
    merge, unmerge = zip_matching(corr, k, r=r, alpha=alpha, beta=beta)
    np.testing.assert_array_equal(unmerge.numpy(), u_ref)
    np.testing.assert_allclose(merge.numpy(), m_ref, rtol=1e-15)
    assert merge.shape == (int(k * n * (1 - r) + 1e-4), k * n)
    torch.testing.assert_close(merge.sum(1), torch.ones(merge.shape[0], dtype=torch.float64))
    assert torch.all(unmerge.sum(1) == 1)


def test_zip_matching_recovers_a_planted_permutation_and_obeys_the_budget():
    g = torch.Generator().manual_seed(0)
    n = 10
    fa = torch.randn(500, n, generator=g, dtype=torch.float64)
    pi = torch.randperm(n, generator=g)
    fb = fa[:, pi] + 0.05 * torch.randn(500, n, generator=g, dtype=torch.float64)
    corr = torch.corrcoef(torch.cat([fa, fb], 1).T)
    merge, unmerge = zip_matching(corr, 2, r=0.5, alpha=0.0, beta=0.0)
    pairs = {tuple(torch.nonzero(unmerge[:, c]).flatten().tolist()) for c in range(n)}
    assert pairs == {(int(pi[j]), n + j) for j in range(n)}
    # beta bounds same-model merges: at most floor(beta * floor(n_removed / K)) per model
    corr = _random_corr(16, seed=3)
    for beta in (0.0, 0.25, 1.0):
        _, u = zip_matching(corr, 2, r=0.5, beta=beta)
        same = [0, 0]
        for c in range(u.shape[1]):
            rows = torch.nonzero(u[:, c]).flatten()
            by_model = [(rows // 8 == i).sum().item() for i in range(2)]
            for i in range(2):
                same[i] += max(by_model[i] - 1, 0)
        assert max(same) <= int(8 // 2 * beta + 1e-4) + 0 or beta == 1.0
    _, u = zip_matching(corr, 2, r=0.0)
    assert torch.equal(u, torch.eye(16, dtype=torch.float64))


# --------------------------------------------------------------------------- models


def _inputs(shape, n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, *shape, generator=g) for _ in range(n)]


def _bn_warm(model, batches):
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    model.eval()
    return model


def _models(kind, seed):
    torch.manual_seed(seed)
    if kind == "mlp":
        return MLP(5, (8, 6), 3), (5,)
    if kind == "cnn_bn":
        return CNN(2, (4, 6), 3, norm="bn", image_size=8), (2, 8, 8)
    if kind == "cnn_none":
        return CNN(2, (4, 6), 3, norm="none", image_size=8), (2, 8, 8)
    if kind == "cnn_flatten":
        return CNN(2, (4, 6), 3, norm="none", image_size=8, pool="flatten", hidden=5), (2, 8, 8)
    raise KeyError(kind)


def _pair(kind, k=2):
    models = []
    for s in range(k):
        m, shape = _models(kind, s)
        models.append(m)
    batches = _inputs(shape)
    for m in models:
        _bn_warm(m, batches)
    return models, shape, batches


def _out(model, state, x):
    with torch.no_grad():
        model.eval()
        return functional_call(model, state, (x,))


@pytest.mark.parametrize("kind", ["mlp", "cnn_bn", "cnn_none", "cnn_flatten"])
@pytest.mark.parametrize("k", [2, 3])
def test_no_reduction_is_the_models_side_by_side(kind, k):
    models, shape, batches = _pair(kind, k)
    states = [m.state_dict() for m in models]
    res = zipit(models[0].spec(), models[0], states, batches, r=0.0, repair=False)
    n = models[0].spec().group_sizes(states[0])
    assert res.widths == {g: k * w for g, w in n.items()}
    x = _inputs(shape, n=1, size=7, seed=9)[0]
    mean = sum(_out(models[0], s, x) for s in states) / k
    torch.testing.assert_close(_out(res.model, res.state, x), mean, rtol=1e-5, atol=1e-6)
    # REPAIR at r=0 changes nothing but its eps (BatchNorm networks: the statistics reset)
    rep = zipit(models[0].spec(), models[0], states, batches, r=0.0)
    if kind == "cnn_bn":
        from pymerge.align import reset_bn_stats

        mean = reset_bn_stats(res.model, batches)(x).detach()
    torch.testing.assert_close(_out(rep.model, rep.state, x), mean, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kind", ["mlp", "cnn_bn", "cnn_none", "cnn_flatten"])
def test_a_permuted_copy_zips_back_to_the_model(kind):
    (model,), shape, batches = _pair(kind, 1)
    spec = model.spec()
    a = model.state_dict()
    b = apply_permutation(spec, random_permutation(spec, a, seed=3), a)
    res = zipit(spec, model, [a, b], batches, beta=0.0, repair=False)
    assert res.widths == spec.group_sizes(a)
    assert set(res.state) == set(a)
    x = _inputs(shape, n=1, size=7, seed=9)[0]
    torch.testing.assert_close(_out(model, res.state, x), _out(model, a, x), rtol=1e-5, atol=1e-6)


def test_the_correlations_are_pearson_over_the_concatenated_features():
    models, _, batches = _pair("mlp")
    states = [m.state_dict() for m in models]
    res = zipit(models[0].spec(), models[0], states, batches, repair=False)
    x = torch.cat(batches)
    feats = [torch.relu(x @ s["fc0.weight"].T + s["fc0.bias"]).double() for s in states]
    ref = torch.corrcoef(torch.cat(feats, 1).T)
    ref = torch.nan_to_num(ref, nan=0.0)  # dead units: correlation 0
    torch.testing.assert_close(res.correlations["fc0"], ref, rtol=1e-7, atol=1e-7)


def test_repair_rescales_the_zipped_layers_to_the_goal_statistics():
    models, _, batches = _pair("mlp")
    states = [m.state_dict() for m in models]
    res = zipit(models[0].spec(), models[0], states, batches, eps=0.0)
    x = torch.cat(batches).double()

    def pre(state, layer, inp):
        return inp @ state[f"{layer}.weight"].double().T + state[f"{layer}.bias"].double()

    # endpoint pre-activation statistics, concatenated over the models
    ends = []
    for s in states:
        z0 = pre(s, "fc0", x)
        z1 = pre(s, "fc1", torch.relu(z0))
        ends.append((z0, z1))
    merged = {k: v.double() for k, v in res.state.items()}
    m0 = pre(merged, "fc0", x)
    m1 = pre(merged, "fc1", torch.relu(m0))
    for g, (i, got) in {"fc0": (0, m0), "fc1": (1, m1)}.items():
        mu = torch.cat([e[i].mean(0) for e in ends])
        sd = torch.cat([e[i].std(0, correction=0) for e in ends])
        torch.testing.assert_close(got.mean(0), res.merge[g] @ mu, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            got.std(0, correction=0), res.merge[g] @ sd, rtol=1e-4, atol=1e-5
        )


def test_partial_zipping_keeps_later_groups_apart():
    models, shape, batches = _pair("mlp")
    states = [m.state_dict() for m in models]
    spec = models[0].spec()
    res = zipit(spec, models[0], states, batches, groups=["fc0"], repair=False)
    assert res.widths == {"fc0": 8, "fc1": 12}
    assert res.state["fc1.weight"].shape == (12, 8)
    assert res.state["out.weight"].shape == (3, 12)
    # fc1 is block-structured: each model's own fc1 reading the zipped fc0 through U
    u = res.unmerge["fc0"].float()
    for i, s in enumerate(states):
        block = res.state["fc1.weight"][6 * i : 6 * (i + 1)]
        torch.testing.assert_close(block, s["fc1.weight"] @ u[8 * i : 8 * (i + 1)])
    torch.testing.assert_close(
        res.state["out.weight"], torch.cat([s["out.weight"] for s in states], 1) / 2
    )
    # keeping every group apart is r = 0
    apart = zipit(spec, models[0], states, batches, groups=[], repair=False)
    flat = zipit(spec, models[0], states, batches, r=0.0, repair=False)
    for key in flat.state:
        torch.testing.assert_close(apart.state[key], flat.state[key])


def test_a_traced_spec_gives_the_same_merge():
    models, _, batches = _pair("cnn_bn")
    states = [m.state_dict() for m in models]
    a = zipit(models[0].spec(), models[0], states, batches)
    b = zipit(None, models[0], states, batches)
    for key in a.state:
        torch.testing.assert_close(a.state[key], b.state[key])


def test_bad_input_is_refused_before_any_work():
    models, _, batches = _pair("mlp")
    states = [m.state_dict() for m in models]
    spec, model = models[0].spec(), models[0]
    with pytest.raises(ValueError, match="at least 2"):
        zipit(spec, model, states[:1], batches)
    with pytest.raises(ValueError, match="r=1 would remove"):
        zipit(spec, model, states, batches, r=1.0)
    with pytest.raises(ValueError, match="r must be in"):
        zipit(spec, model, states, batches, r=-0.1)
    with pytest.raises(ValueError, match="beta"):
        zipit(spec, model, states, batches, beta=2.0)
    with pytest.raises(ValueError, match="alpha"):
        zipit(spec, model, states, batches, alpha=float("nan"))
    with pytest.raises(ValueError, match="'fc9' is not in the spec"):
        zipit(spec, model, states, batches, groups=["fc9"])
    with pytest.raises(ValueError, match="batches is empty"):
        zipit(spec, model, states, [])
    no_ap = PermutationSpec(spec.perm_to_axes, free=spec.free)
    with pytest.raises(ValueError, match="'fc0' has no activation point"):
        zipit(no_ap, model, states, batches)
    heads = PermutationSpec(
        spec.perm_to_axes,
        free=spec.free,
        heads={"h": HeadStructure(2, 4, ("fc0",))},
        activation_points=spec.activation_points,
    )
    with pytest.raises(NotImplementedError, match="head-structured"):
        zipit(heads, model, states, batches)
    other = MLP(5, (9, 6), 3).state_dict()
    with pytest.raises(ValueError, match="fc0"):
        zipit(spec, model, [states[0], other], batches)
    bad = {k: v.clone() for k, v in states[1].items()}
    bad["fc1.bias"][0] = float("nan")
    with pytest.raises(ValueError, match=r"states\[1\]\['fc1.bias'\] has non-finite"):
        zipit(spec, model, [states[0], bad], batches)
    with pytest.raises(TypeError, match="PermutationSpec"):
        zipit("mlp", model, states, batches)


def test_inputs_and_model_are_never_mutated():
    models, _, batches = _pair("cnn_bn")
    states = [m.state_dict() for m in models]
    before = [{k: v.clone() for k, v in s.items()} for s in states]
    model_before = {k: v.clone() for k, v in models[0].state_dict().items()}
    models[0].train()
    copies = [x.clone() for x in batches]
    zipit(models[0].spec(), models[0], states, batches)
    assert models[0].training
    for s, b in zip(states, before, strict=True):
        for k in s:
            assert torch.equal(s[k], b[k]), k
    for k, v in models[0].state_dict().items():
        assert torch.equal(v, model_before[k]), k
    assert all(torch.equal(x, c) for x, c in zip(batches, copies, strict=True))


# --------------------------------------------------------------------------- accuracy


@functools.lru_cache(maxsize=1)
def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x, y, perm[:1400], perm[1400:]


def _train(model, x, y, idx, epochs, seed):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = idx[torch.randperm(len(idx), generator=gen)]
        for i in range(0, len(order), 64):
            b = order[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
    model.eval()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _acc(model, state, x, y):
    with torch.no_grad():
        return float((functional_call(model, state, (x,)).argmax(1) == y).float().mean())


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_zipit_beats_naive_averaging_on_digits(arch):
    x, y, tr, te = _digits()
    if arch == "cnn":
        x = x.view(-1, 1, 8, 8)

    def make(seed):
        torch.manual_seed(seed)
        if arch == "mlp":
            return MLP(64, (64,), 10)
        return CNN(1, (8, 16), 10, norm="bn", image_size=8)

    models = [make(s) for s in (1, 2)]
    states = [_train(m, x, y, tr, 4, s) for m, s in zip(models, (3, 4), strict=True)]
    batches = [x[tr[i : i + 128]] for i in range(0, 512, 128)]
    res = zipit(models[0].spec(), models[0], states, batches)
    avg = {k: (states[0][k] + states[1][k]) / 2 for k in states[0]}
    if arch == "cnn":  # averaging a BN network gets the same BN reset, to be fair
        from pymerge.align import reset_bn_stats

        m = make(0)
        m.load_state_dict(avg)
        avg = reset_bn_stats(m, batches).state_dict()
    a_zip = _acc(res.model, res.state, x[te], y[te])
    a_avg = _acc(models[0], avg, x[te], y[te])
    a_end = min(_acc(models[0], s, x[te], y[te]) for s in states)
    assert a_zip > a_avg + 0.02, (a_zip, a_avg, a_end)


def test_pymerge_merge_zipit_keeps_the_widths():
    import pymerge

    models, _, batches = _pair("cnn_bn")
    states = [m.state_dict() for m in models]
    got = pymerge.merge("zipit", states, model=models[0], batches=batches)
    ref = zipit(None, models[0], states, batches).state
    for k in ref:
        torch.testing.assert_close(got[k], ref[k])
    info = {m.name: m for m in pymerge.merge_methods()}["zipit"]
    assert info.needs_data and info.min_models == 2
    assert (info.param("r").default, info.param("alpha").default, info.param("beta").default) == (
        0.5,
        0.3,
        0.125,
    )
    with pytest.raises(ValueError, match="width 6, not the models' 4"):
        pymerge.merge("zipit", states, model=models[0], batches=batches, r=0.25)
    with pytest.raises(ValueError, match="at least 2"):
        pymerge.merge("zipit", states[:1], model=models[0], batches=batches)
