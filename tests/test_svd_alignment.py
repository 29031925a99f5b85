"""Singular-vector alignment (Ito et al.): the score R, its layers, thresholds and plots."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from pymerge.align import weight_matching
from pymerge.landscape import plot_svd_alignment, singular_vector_alignment
from pymerge.spec import apply_permutation, random_permutation
from pymerge.testing.models import CNN, MLP


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Small matrices: one torch thread (a second one only waits on this busy machine)."""


def _states(model_cls, *args, seed=0, **kw):
    torch.manual_seed(seed)
    m = model_cls(*args, **kw)
    return m, {k: v.detach().clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("gamma", [0.0, 0.3])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_permuted_copy_with_recovered_permutation_has_r_one(kind, gamma):
    if kind == "mlp":
        model, a = _states(MLP, 12, (16, 16), 5)
    else:  # conv weights read as [C_out, C_in*k*k], inputs permuted in blocks of k*k
        model, a = _states(CNN, 3, (4, 8, 8), 5, norm="bn", image_size=8)
    spec = model.spec()
    b = apply_permutation(spec, random_permutation(spec, a, seed=7), a)
    res = weight_matching(spec, a, b)
    got = singular_vector_alignment(spec, a, b, perm=res.perm, gamma=gamma)
    assert got.R == pytest.approx(1.0, abs=1e-8)
    for layer in got.layers.values():
        assert layer.r == pytest.approx(1.0, abs=1e-8), layer.name
        np.testing.assert_allclose(layer.sigma_a, layer.sigma_b, rtol=1e-10)
    # without the permutation the same weights look unaligned
    assert singular_vector_alignment(spec, a, b, gamma=gamma).R < 0.6
    if kind == "cnn":
        assert got.layers["conv1.weight"].shape == (8, 4, 3, 3)
        assert got.layers["conv1.weight"].sigma_a.size == 8  # min(8, 4 * 9)


def test_score_matches_the_definition_term_by_term():
    """R_l = sum_ij (u_i^A . P u_j^B)(v_i^A . P' v_j^B) / min(kept) over the kept columns."""
    _, a = _states(MLP, 6, (5,), 4, seed=1)
    _, b = _states(MLP, 6, (5,), 4, seed=2)
    spec = MLP(6, (5,), 4).spec()
    perm = random_permutation(spec, b, seed=3)
    res = singular_vector_alignment(spec, a, b, perm=perm, gamma=0.3)
    pb = apply_permutation(spec, perm, b)
    for name in ("fc0.weight", "out.weight"):
        ua, sa, vha = np.linalg.svd(a[name].double().numpy(), full_matrices=False)
        ub, sb, vhb = np.linalg.svd(pb[name].double().numpy(), full_matrices=False)
        ka, kb = int((sa >= 0.3 * sa[0]).sum()), int((sb >= 0.3 * sb[0]).sum())
        total = sum((ua[:, i] @ ub[:, j]) * (vha[i] @ vhb[j]) for i in range(ka) for j in range(kb))
        layer = res.layers[name]
        assert (layer.kept_a, layer.kept_b) == (ka, kb)
        assert layer.score == pytest.approx(total, abs=1e-10)
        assert layer.r == pytest.approx(total / min(ka, kb), abs=1e-10)
    whole = sum(v.score for v in res.layers.values()) / sum(v.n for v in res.layers.values())
    assert res.R == pytest.approx(whole)
    assert list(res.layers) == ["fc0.weight", "out.weight"]  # >= 2-D params, state order
    # absolute threshold: sigma >= gamma itself
    ab = singular_vector_alignment(spec, a, b, perm=perm, gamma=0.5, threshold="absolute")
    assert ab.layers["fc0.weight"].kept_a == int((res.layers["fc0.weight"].sigma_a >= 0.5).sum())


def test_bad_inputs_are_named():
    model, a = _states(MLP, 6, (5,), 4)
    spec = model.spec()
    for g in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="gamma must be in \\[0, 1\\)"):
            singular_vector_alignment(spec, a, a, gamma=g)
    with pytest.raises(ValueError, match="threshold must be one of"):
        singular_vector_alignment(spec, a, a, threshold="max")
    with pytest.raises(TypeError, match="gamma must be a number"):
        singular_vector_alignment(spec, a, a, gamma="0.3")
    with pytest.raises(TypeError, match="perm needs spec"):
        singular_vector_alignment(None, a, a, perm=random_permutation(spec, a))
    with pytest.raises(ValueError, match="'fc0.bias' of shape \\(5,\\)"):
        singular_vector_alignment(spec, a, a, params=["fc0.bias"])
    with pytest.raises(ValueError, match="'nope'"):
        singular_vector_alignment(spec, a, a, params=["nope"])
    with pytest.raises(ValueError, match="out.weight"):
        singular_vector_alignment(spec, a, {**a, "out.weight": torch.zeros(4, 4)})
    bad = {**a, "fc0.weight": a["fc0.weight"].clone()}
    bad["fc0.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="'fc0.weight' holds NaN"):
        singular_vector_alignment(spec, a, bad)
    before = {k: v.clone() for k, v in a.items()}
    singular_vector_alignment(spec, a, a, perm=random_permutation(spec, a))
    assert all(torch.equal(a[k], before[k]) for k in a)  # never modified


def test_plot_writes_a_png_and_names_the_extra_without_matplotlib(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    model, a = _states(MLP, 6, (5, 5), 4)
    spec = model.spec()
    _, b = _states(MLP, 6, (5, 5), 4, seed=1)
    res = {
        "naive": singular_vector_alignment(spec, a, b),
        "WM": singular_vector_alignment(spec, a, b, perm=weight_matching(spec, a, b).perm),
    }
    out = tmp_path / "r.png"
    plot_svd_alignment(res, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match='"plot" extra'):
        plot_svd_alignment(res["WM"], tmp_path / "x.png")
