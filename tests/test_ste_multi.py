"""STE matching and multi-model alignment (anchor, MergeMany, averaging)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pymerge import interpolate
from pymerge.align import align_to_anchor, merge_many, ste_matching
from pymerge.spec import apply_permutation, random_permutation
from pymerge.testing.models import MLP

# --------------------------------------------------------------------------- helpers


def teacher_data(n=512, d=10, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w1 = torch.randn(d, 32, generator=g)
    w2 = torch.randn(32, classes, generator=g)
    y = (torch.tanh(x @ w1) @ w2).argmax(1)
    return x, y


def trained_pair(width=24, steps=300):
    x, y = teacher_data()
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        m = MLP(10, (width, width), 4)
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        for _ in range(steps):
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        states.append({k: v.detach().clone() for k, v in m.state_dict().items()})
    return MLP(10, (width, width), 4), states, x, y


def midpoint_loss(model, a, b, x, y):
    mid = {k: 0.5 * (a[k] + b[k]) for k in a}
    model.load_state_dict(mid)
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


# --------------------------------------------------------------------------- STE


def test_ste_lowers_midpoint_loss(one_thread):
    model, (a, b), x, y = trained_pair()
    spec = model.spec()
    a0 = {k: v.clone() for k, v in a.items()}
    b0 = {k: v.clone() for k, v in b.items()}
    params0 = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(x[i : i + 128], y[i : i + 128]) for i in range(0, 512, 128)]
    res = ste_matching(spec, model, a, b, batches, F.cross_entropy, epochs=5, lr=0.1)
    assert len(res.history.objective) == 20
    assert any(
        not torch.equal(res.extras["state"][k], a[k]) for k in res.extras["state"]
    )  # θ̃ was trained
    assert res.extras["best_loss"] == min(res.history.objective)
    # inputs and the model are untouched
    for k in a:
        assert torch.equal(a[k], a0[k]) and torch.equal(b[k], b0[k])
    for k, v in model.state_dict().items():
        assert torch.equal(v, params0[k])
    naive = midpoint_loss(model, a, b, x, y)
    ste = midpoint_loss(model, a, apply_permutation(spec, res.perm, b), x, y)
    assert ste < 0.8 * naive, (ste, naive)
    # the returned permutation is a valid permutation of every group
    for g, p in res.perm.items():
        assert torch.equal(torch.sort(p).values, torch.arange(p.numel())), g
    # deterministic
    again = ste_matching(spec, model, a, b, batches, F.cross_entropy, epochs=5, lr=0.1)
    assert again.history.objective == pytest.approx(res.history.objective, rel=1e-6)


def test_ste_errors():
    model, (a, b), x, y = trained_pair(width=8, steps=1)
    spec = model.spec()
    with pytest.raises(ValueError, match="empty"):
        ste_matching(spec, model, a, b, [], F.cross_entropy)
    with pytest.raises(TypeError, match="pair"):
        ste_matching(spec, model, a, b, [x], F.cross_entropy)
    with pytest.raises(ValueError, match="lr"):
        ste_matching(spec, model, a, b, [(x, y)], F.cross_entropy, lr=0)
    missing = {k: v for k, v in a.items() if k != "fc0.weight"}
    with pytest.raises(ValueError, match="fc0.weight"):
        ste_matching(spec, model, missing, b, [(x, y)], F.cross_entropy)
    res = ste_matching(spec, model, a, b, [(x, y)] * 5, F.cross_entropy, steps=2)
    assert len(res.history.objective) == 2


# --------------------------------------------------------------------------- multi-model


def random_state(seed, width=20):
    torch.manual_seed(seed)
    m = MLP(7, (width, width, width), 3)
    return m.spec(), {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_align_to_anchor_recovers_permuted_copies():
    spec, a = random_state(0)
    copies = [apply_permutation(spec, random_permutation(spec, a, seed=s), a) for s in (1, 2)]
    states = [copies[0], a, copies[1]]
    perms = align_to_anchor(spec, states, anchor=1).perms
    assert all(torch.equal(p, torch.arange(p.numel())) for p in perms[1].values())
    for p, s in zip(perms, states, strict=True):
        aligned = apply_permutation(spec, p, s)
        for k in a:
            assert torch.equal(aligned[k], a[k]), k
    merged = interpolate(
        [apply_permutation(spec, p, s) for p, s in zip(perms, states, strict=True)], [1 / 3] * 3
    )
    for k in a:
        assert torch.allclose(merged[k], a[k], atol=1e-6)


def test_merge_many_recovers_consistent_perms():
    spec, a = random_state(3)
    states = [apply_permutation(spec, random_permutation(spec, a, seed=s), a) for s in (4, 5, 6)]
    states0 = [{k: v.clone() for k, v in s.items()} for s in states]
    res = merge_many(spec, states, seed=0)
    assert all(torch.equal(p, torch.arange(p.numel())) for p in res.perms[0].values())
    aligned = [apply_permutation(spec, p, s) for p, s in zip(res.perms, states, strict=True)]
    for other in aligned[1:]:
        for k in a:
            assert torch.equal(other[k], aligned[0][k]), k
    for k in a:
        assert torch.allclose(res.extras["merged_state"][k], states[0][k], atol=1e-6)
    assert min(res.history.objective) == pytest.approx(0.0, abs=1e-6)
    for s, s0 in zip(states, states0, strict=True):
        for k in s:
            assert torch.equal(s[k], s0[k])


def test_merge_many_lowers_distance_on_distinct_models():
    states = [random_state(s)[1] for s in (10, 11, 12, 13)]
    spec = random_state(10)[0]
    res = merge_many(spec, states, seed=1)
    h = res.history
    assert h.objective and min(h.objective) < h.initial_objective
    # the reported distance is the one of the returned permutations
    aligned = [apply_permutation(spec, p, s) for p, s in zip(res.perms, states, strict=True)]
    dist = 0.0
    for k in states[0]:
        stack = torch.stack([x[k].double() for x in aligned])
        dist += float(((stack - stack.mean(0)) ** 2).sum())
    assert dist == pytest.approx(min(h.objective), rel=1e-9)
    # the anchored alignment (to model 0) is a fine start but MergeMany does at least as well
    anchored = align_to_anchor(spec, states, anchor=0)
    a2 = [apply_permutation(spec, p, s) for p, s in zip(anchored.perms, states, strict=True)]
    d2 = 0.0
    for k in states[0]:
        stack = torch.stack([x[k].double() for x in a2])
        d2 += float(((stack - stack.mean(0)) ** 2).sum())
    assert dist <= d2 * (1 + 1e-9)


def test_multi_errors():
    spec, a = random_state(0)
    with pytest.raises(ValueError, match="at least 2"):
        merge_many(spec, [a])
    with pytest.raises(ValueError, match="at least 2"):
        align_to_anchor(spec, [a])
    with pytest.raises(TypeError, match="sequence"):
        merge_many(spec, a)
    bad = {k: v for k, v in a.items() if k != "out.bias"}
    with pytest.raises(ValueError, match="out.bias"):
        merge_many(spec, [a, bad])
    with pytest.raises(ValueError, match="anchor"):
        align_to_anchor(spec, [a, a], anchor=2)
    with pytest.raises(TypeError, match="spec first"):
        ste_matching(MLP(7, (20, 20, 20), 3), spec, a, a, [], F.cross_entropy)


def test_ste_with_batchnorm_does_not_touch_inputs():
    from pymerge.testing.models import CNN

    torch.manual_seed(0)
    model = CNN(3, (4, 6), num_classes=3, norm="bn", image_size=6)
    a = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    b = {
        k: v.clone()
        for k, v in CNN(3, (4, 6), num_classes=3, norm="bn", image_size=6).state_dict().items()
    }
    a0 = {k: v.clone() for k, v in a.items()}
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 3, (8,))
    model.train()
    res = ste_matching(model.spec(), model, a, b, [(x, y)] * 3, F.cross_entropy)
    for k in a:
        assert torch.equal(a[k], a0[k]), k
    assert len(res.history.objective) == 3 and model.training


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_weight_matching_on_cuda_matches_cpu():
    from pymerge.align import weight_matching

    spec, a = random_state(7)
    _, b = random_state(8)
    cpu = weight_matching(spec, a, b, seed=0)
    gpu = weight_matching(
        spec, {k: v.cuda() for k, v in a.items()}, {k: v.cuda() for k, v in b.items()}, seed=0
    )
    assert gpu.objective == pytest.approx(cpu.objective, rel=1e-5)
    for g in cpu.perm:
        assert torch.equal(gpu.perm[g].cpu(), cpu.perm[g])
