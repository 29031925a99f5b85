"""REPAIR and BatchNorm statistics reset: goal statistics reached, exact BN statistics,
inputs never mutated, clear errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment as scipy_lsa
from torch import nn

from pymerge.align.repair import repair, reset_bn_stats

# tiny models: threads only add overhead on a shared machine (fixture in conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- helpers


def _mlp(seed: int, widths=(7, 13, 11, 5)) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _cnn(seed: int, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Conv2d(3, 6, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(6))
    layers += [nn.ReLU(), nn.Conv2d(6, 5, 3, bias=False)]
    if bn:
        layers.append(nn.BatchNorm2d(5))
    layers += [nn.ReLU(), nn.Flatten(), nn.Linear(5 * 5 * 5, 4)]
    return nn.Sequential(*layers)


def _average(a: nn.Module, b: nn.Module, alpha: float) -> nn.Module:
    out = copy.deepcopy(a)
    sb = b.state_dict()
    out.load_state_dict(
        {
            k: ((1 - alpha) * v + alpha * sb[k]) if v.is_floating_point() else v
            for k, v in a.state_dict().items()
        }
    )
    return out


def _snapshot(m: nn.Module) -> tuple[dict[str, torch.Tensor], list[bool]]:
    return {k: v.clone() for k, v in m.state_dict().items()}, [x.training for x in m.modules()]


def _assert_unchanged(m: nn.Module, snap) -> None:
    state, flags = snap
    now = m.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), k
    assert [x.training for x in m.modules()] == flags


def _outputs64(model: nn.Module, name: str, batches, dim: int) -> torch.Tensor:
    """All outputs of module ``name`` over the batches as float64 [samples, C] (reference)."""
    mod = dict(model.named_modules())[name]
    rows = []
    h = mod.register_forward_hook(
        lambda m, a, o: rows.append(o.detach().double().movedim(dim, -1).reshape(-1, o.shape[dim]))
    )
    try:
        model.eval()
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        h.remove()
    return torch.cat(rows)


def _goal(a, b, name, batches, dim, alpha):
    oa, ob = _outputs64(a, name, batches, dim), _outputs64(b, name, batches, dim)
    mu = (1 - alpha) * oa.mean(0) + alpha * ob.mean(0)
    sd = (1 - alpha) * oa.std(0, unbiased=False) + alpha * ob.std(0, unbiased=False)
    return mu, sd


# ----------------------------------------------------------------------------- REPAIR


@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_repair_mlp_reaches_goal_statistics(alpha):
    a, b = _mlp(0), _mlp(1)
    merged = _average(a, b, alpha)
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(n, 7, generator=g) for n in (17, 9, 23)]
    snaps = [_snapshot(m) for m in (a, b, merged)]
    fixed = repair(a, b, merged, batches, alpha=alpha, eps=1e-10)
    for m, s in zip((a, b, merged), snaps, strict=True):
        _assert_unchanged(m, s)
    assert fixed is not merged
    for name in ("0", "2"):  # hidden Linear layers; "4" is the output layer
        mu_g, sd_g = _goal(a, b, name, batches, -1, alpha)
        out = _outputs64(fixed, name, batches, -1)
        torch.testing.assert_close(out.mean(0), mu_g, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.std(0, unbiased=False), sd_g, atol=1e-4, rtol=1e-3)
        before = _outputs64(merged, name, batches, -1)
        assert not torch.allclose(before.std(0, unbiased=False), sd_g, atol=1e-3)
    # output layer untouched
    assert torch.equal(fixed[4].weight, merged[4].weight)
    assert torch.equal(fixed[4].bias, merged[4].bias)


def test_repair_cnn_bias_free_layer_and_sequential_exactness():
    a, b = _cnn(0), _cnn(1)
    merged = _average(a, b, 0.5)
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randn(n, 3, 7, 7, generator=g), torch.zeros(n)) for n in (6, 5)]
    xs = [x for x, _ in batches]
    fixed = repair(a, b, merged, batches, eps=1e-10)
    assert merged[2].bias is None and fixed[2].bias is not None  # bias added by folding
    for name in ("0", "2"):
        mu_g, sd_g = _goal(a, b, name, xs, 1, 0.5)
        out = _outputs64(fixed, name, xs, 1)
        torch.testing.assert_close(out.mean(0), mu_g, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.std(0, unbiased=False), sd_g, atol=1e-4, rtol=1e-3)
    # one-pass mode: the first point is exact, the later one measured before correction
    approx = repair(a, b, merged, batches, sequential=False, eps=1e-10)
    mu_g, sd_g = _goal(a, b, "0", xs, 1, 0.5)
    torch.testing.assert_close(_outputs64(approx, "0", xs, 1).mean(0), mu_g, atol=1e-4, rtol=1e-4)


def test_repair_explicit_points_and_generator_batches():
    a, b = _mlp(5), _mlp(6)
    merged = _average(a, b, 0.5)
    g = torch.Generator().manual_seed(5)
    data = [torch.randn(10, 7, generator=g) for _ in range(3)]
    fixed = repair(a, b, merged, (x for x in data), points=["2"], eps=1e-10)
    assert torch.equal(fixed[0].weight, merged[0].weight)  # not a point: untouched
    mu_g, sd_g = _goal(a, b, "2", data, -1, 0.5)
    out = _outputs64(fixed, "2", data, -1)
    torch.testing.assert_close(out.mean(0), mu_g, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.std(0, unbiased=False), sd_g, atol=1e-4, rtol=1e-3)


def test_repair_on_bn_network_is_bn_reset():
    a, b = _cnn(0, bn=True), _cnn(1, bn=True)
    # give the endpoints distinct running statistics
    g = torch.Generator().manual_seed(6)
    data = [torch.randn(8, 3, 7, 7, generator=g) for _ in range(3)]
    a, b = reset_bn_stats(a, data), reset_bn_stats(b, data)
    merged = _average(a, b, 0.5)
    fixed = repair(a, b, merged, data)
    # no Linear/Conv point (convs feed BatchNorm, the Linear is the output layer): REPAIR is
    # exactly the BN statistics reset
    reset = reset_bn_stats(merged, data)
    assert fixed.state_dict().keys() == merged.state_dict().keys()
    for k, v in reset.state_dict().items():
        assert torch.equal(fixed.state_dict()[k], v), k
    assert not torch.equal(fixed[1].running_mean, merged[1].running_mean)

    # exact_bn: each BN gets the exact eval-mode statistics of its input, in order
    exact = repair(a, b, merged, data, exact_bn=True)
    for k in ("0.weight", "0.bias", "3.weight", "7.weight", "7.bias"):
        assert torch.equal(exact.state_dict()[k], merged.state_dict()[k]), k
    conv_out = _outputs64(merged, "0", data, 1)
    for stat, ref in (
        (exact[1].running_mean, conv_out.mean(0)),
        (exact[1].running_var, conv_out.var(0)),
    ):
        torch.testing.assert_close(stat.double(), ref, rtol=1e-5, atol=1e-6)
    conv2_out = _outputs64(exact, "3", data, 1)  # with the first BN already reset
    for stat, ref in (
        (exact[4].running_mean, conv2_out.mean(0)),
        (exact[4].running_var, conv2_out.var(0)),
    ):
        torch.testing.assert_close(stat.double(), ref, rtol=1e-5, atol=1e-6)
    assert int(exact[1].num_batches_tracked) == 3 and int(exact[4].num_batches_tracked) == 3
    # the first BN's input does not depend on any BN: both ways agree there
    torch.testing.assert_close(exact[1].running_mean, fixed[1].running_mean)
    torch.testing.assert_close(exact[1].running_var, fixed[1].running_var)


def test_repair_mixed_network_resets_bn_after_corrections():
    """A Linear point upstream of a BatchNorm: the final BN statistics see corrected inputs."""
    torch.manual_seed(0)

    def make(seed):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(5, 8),
            nn.ReLU(),
            nn.Linear(8, 6),
            nn.BatchNorm1d(6),
            nn.ReLU(),
            nn.Linear(6, 2),
        )

    data = [torch.randn(12, 5) for _ in range(3)]
    a, b = reset_bn_stats(make(0), data), reset_bn_stats(make(1), data)
    merged = _average(a, b, 0.5)
    fixed = repair(a, b, merged, data, eps=1e-10)
    mu_g, sd_g = _goal(a, b, "0", data, -1, 0.5)
    out = _outputs64(fixed, "0", data, -1)
    torch.testing.assert_close(out.mean(0), mu_g, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.std(0, unbiased=False), sd_g, atol=1e-4, rtol=1e-3)
    assert torch.equal(fixed[2].weight, merged[2].weight)  # feeds the BN: not a point
    bn_in = _outputs64(fixed, "2", data, -1)
    torch.testing.assert_close(fixed[3].running_mean.double(), bn_in.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fixed[3].running_var.double(), bn_in.var(0), rtol=1e-5, atol=1e-6)


def test_channel_stats_match_float64_reference():
    from pymerge.ops import ChannelStats

    g = torch.Generator().manual_seed(9)
    batches = [torch.randn(n, 4, 3, 5, generator=g) * 0.1 + 1e3 for n in (1, 7, 2)]
    st = ChannelStats(4)
    for x in batches:
        st.update(x, 1)
    ref = torch.cat([x.double().movedim(1, -1).reshape(-1, 4) for x in batches])
    torch.testing.assert_close(st.mean, ref.mean(0), rtol=1e-6, atol=0)  # float32 batch means
    torch.testing.assert_close(st.var(), ref.var(0, unbiased=False), rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(st.var(unbiased=True), ref.var(0), rtol=1e-4, atol=1e-8)
    half = ChannelStats(3)
    xs = torch.randn(50, 3, generator=g).half()
    half.update(xs[:20])
    half.update(xs[20:].t().contiguous().t())  # non-contiguous
    torch.testing.assert_close(half.var(), xs.double().var(0, unbiased=False), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="4 channels"):
        st.update(torch.randn(3, 5), 1)


def _digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(y), generator=g)
    return x[idx], y[idx]


def _train(seed, x, y, width=64, steps=150):
    model = _mlp(seed, widths=(64, width, width, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (128,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model


def _align_by_activations(a, b, x):
    """Permute b's hidden units to a's (plain float64 scipy activation matching)."""
    b = copy.deepcopy(b)
    ha, hb = x, x
    with torch.no_grad():
        for i in (0, 2):
            ha = torch.relu(a[i](ha))
            hb = torch.relu(b[i](hb))
            ca = (ha - ha.mean(0)).double()
            cb = (hb - hb.mean(0)).double()
            corr = (ca.T @ cb) / (ca.norm(dim=0)[:, None] * cb.norm(dim=0)[None, :] + 1e-12)
            _, p = scipy_lsa(corr.numpy(), maximize=True)
            p = torch.as_tensor(p)
            b[i].weight.copy_(b[i].weight[p])
            b[i].bias.copy_(b[i].bias[p])
            b[i + 2].weight.copy_(b[i + 2].weight[:, p])
            hb = hb[:, p]
    return b


@pytest.mark.parametrize("aligned", [False, True])
def test_repair_lowers_loss_of_trained_merge(aligned):
    x, y = _digits()
    xtr, ytr, xte, yte = x[:1400], y[:1400], x[1400:], y[1400:]
    a, b = _train(0, xtr, ytr), _train(1, xtr, ytr)
    if aligned:
        b = _align_by_activations(a, b, xtr)
    merged = _average(a, b, 0.5)
    batches = [(xtr[i : i + 200], ytr[i : i + 200]) for i in range(0, 1400, 200)]
    fixed = repair(a, b, merged, batches)

    def loss(m):
        with torch.no_grad():
            return F.cross_entropy(m(xte), yte).item()

    la, lb, lm, lr = loss(a), loss(b), loss(merged), loss(fixed)
    assert lm > 0.5 * (la + lb)  # a barrier exists
    assert lr < lm, (la, lb, lm, lr)


# ----------------------------------------------------------------------------- reset_bn_stats


def test_reset_bn_stats_exact_statistics_train_mode():
    model = _cnn(2, bn=True)
    model.add_module("drop", nn.Dropout(0.5))  # must stay off during the pass
    model.eval()
    snap = _snapshot(model)
    g = torch.Generator().manual_seed(7)
    data = [(torch.randn(n, 3, 7, 7, generator=g), None) for n in (5, 9, 4)]
    out = reset_bn_stats(model, data)
    _assert_unchanged(model, snap)
    assert out is not model and not out.training  # flags preserved on the copy
    # float64 reference: BN layers normalise with batch statistics during the pass
    sd = {k: v.double() for k, v in model.state_dict().items()}
    in1, in2 = [], []
    for x, _ in data:
        h = F.conv2d(x.double(), sd["0.weight"], sd["0.bias"], padding=1)
        in1.append(h.movedim(1, -1).reshape(-1, 6))
        h = F.batch_norm(h, None, None, sd["1.weight"], sd["1.bias"], training=True, eps=1e-5)
        h = F.conv2d(torch.relu(h), sd["3.weight"])
        in2.append(h.movedim(1, -1).reshape(-1, 5))
    for bn, rows in ((out[1], torch.cat(in1)), (out[4], torch.cat(in2))):
        torch.testing.assert_close(bn.running_mean.double(), rows.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var.double(), rows.var(0), rtol=1e-5, atol=1e-6)
        assert int(bn.num_batches_tracked) == 3
    # deterministic (dropout was off) and num_batches honoured
    again = reset_bn_stats(model, data)
    assert torch.equal(again[4].running_var, out[4].running_var)
    two = reset_bn_stats(model, data, num_batches=2)
    ref = torch.cat(in1[:2])
    torch.testing.assert_close(two[1].running_mean.double(), ref.mean(0), rtol=1e-5, atol=1e-6)


def test_reset_bn_stats_inplace_and_no_bn():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    data = [torch.randn(6, 4) for _ in range(2)]
    same = reset_bn_stats(model, data, inplace=True)
    assert same is model
    assert not torch.equal(model[1].running_mean, torch.zeros(3))
    plain = _mlp(0)
    out = reset_bn_stats(plain, [torch.randn(3, 7)])
    assert out is not plain
    for k, v in plain.state_dict().items():
        assert torch.equal(out.state_dict()[k], v)


# ----------------------------------------------------------------------------- errors


def test_errors():
    a, b = _mlp(0), _mlp(1)
    merged = _average(a, b, 0.5)
    data = [torch.randn(4, 7)]
    wide = _mlp(2, widths=(7, 14, 11, 5))
    with pytest.raises(ValueError, match=r"'0\.weight'"):
        repair(a, wide, merged, data)
    with pytest.raises(ValueError, match="model_b"):
        repair(a, nn.Sequential(nn.Linear(7, 5)), merged, data)
    with pytest.raises(ValueError, match="'1'.*ReLU"):
        repair(a, b, merged, data, points=["1"])
    with pytest.raises(ValueError, match="'nope'"):
        repair(a, b, merged, data, points=["nope"])
    with pytest.raises(ValueError, match="empty"):
        repair(a, b, merged, [])
    with pytest.raises(TypeError, match="single tensor"):
        repair(a, b, merged, torch.randn(4, 7))
    with pytest.raises(TypeError, match="merged_model"):
        repair(a, b, merged.state_dict(), data)
    with pytest.raises(ValueError, match="empty"):
        reset_bn_stats(nn.BatchNorm1d(3), [])
    with pytest.raises(TypeError, match="batch"):
        reset_bn_stats(nn.BatchNorm1d(3), [3])


def test_repair_equals_explicit_float64_rescaling():
    """REPAIR's folded correction equals an explicit float64 rescaling of the outputs."""
    rng = np.random.default_rng(0)
    a, b = _mlp(7, widths=(5, 9, 3)), _mlp(8, widths=(5, 9, 3))
    merged = _average(a, b, 0.5)
    data = [torch.tensor(rng.normal(size=(11, 5)), dtype=torch.float32) for _ in range(2)]
    fixed = repair(a, b, merged, data, eps=0.0)
    x = torch.cat(data).double()
    sa, sb, sm = ({k: v.double() for k, v in m.state_dict().items()} for m in (a, b, merged))
    za, zb, zm = (x @ s["0.weight"].T + s["0.bias"] for s in (sa, sb, sm))
    mu = 0.5 * (za.mean(0) + zb.mean(0))
    sd = 0.5 * (za.std(0, unbiased=False) + zb.std(0, unbiased=False))
    z = (zm - zm.mean(0)) / zm.std(0, unbiased=False) * sd + mu
    ref = torch.relu(z) @ sm["2.weight"].T + sm["2.bias"]
    with torch.no_grad():
        got = fixed(x.float()).double()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU; CPU twin: test_repair_mlp_reaches_goal_statistics",
)
def test_repair_on_cuda_device_matches_cpu():
    a, b = _mlp(0), _mlp(1)
    merged = _average(a, b, 0.5)
    data = [torch.randn(16, 7) for _ in range(2)]
    cpu = repair(a, b, merged, data)
    gpu = repair(a, b, merged, data, device="cuda")
    assert next(a.parameters()).device.type == "cpu"  # inputs copied, not moved
    for k, v in cpu.state_dict().items():
        torch.testing.assert_close(gpu.state_dict()[k].cpu(), v, rtol=1e-4, atol=1e-5)
    bn = reset_bn_stats(_cnn(0, bn=True), [torch.randn(4, 3, 7, 7)], device="cuda")
    assert bn[1].running_mean.is_cuda
