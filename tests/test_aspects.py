"""The survey's four aspects as one report: each number against its definition."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pymerge.landscape import (
    Evaluator,
    aspects_report,
    interpolation_curve,
    loss_barrier,
)
from pymerge.spec import apply_permutation, random_permutation
from pymerge.testing.models import MLP


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Small matrices: one torch thread."""


def _case():
    torch.manual_seed(0)
    m = MLP(6, (8, 8), 3)
    a = {k: v.detach().clone() for k, v in m.state_dict().items()}
    b = {k: v.detach().clone() for k, v in MLP(6, (8, 8), 3).state_dict().items()}
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    return m, a, b, Evaluator((x, y))


def test_convexity_and_connectivity_follow_their_definitions():
    m, a, b, ev = _case()
    spec = m.spec()
    perm = random_permutation(spec, b, seed=1)
    pc = SimpleNamespace(barriers={"curved": -0.5, "linear": 1.0})
    rep = aspects_report(m, a, b, ev, spec=spec, perm=perm, points=9, curved=pc)
    aligned = interpolation_curve(m, a, b, ev, 9, spec=spec, perm=perm)
    naive = interpolation_curve(m, a, b, ev, 9)
    conv = rep["mode convexity"]
    assert conv.value == pytest.approx(loss_barrier(aligned, "entezari"))
    assert conv.details["path"] == "aligned" and conv.note == ""
    lam, v = aligned.lambdas, aligned["loss"]
    assert conv.details["mean_curvature"] == pytest.approx(
        float(np.mean(np.diff(v, 2) / (lam[1] - lam[0]) ** 2))
    )
    conn = rep["connectivity"]
    assert conn.details["barriers"]["linear"] == pytest.approx(loss_barrier(naive))
    assert conn.details["barriers"]["aligned linear"] == pytest.approx(loss_barrier(aligned))
    assert conn.value == -0.5 and conn.details["best_path"] == "curved"
    for name in ("determinism", "directedness"):
        assert rep[name].value is None and "not measured" in rep[name].note
    text = rep.table()
    for name in ("mode convexity", "determinism", "directedness", "connectivity"):
        assert name in text
    assert set(rep.to_dict()) == {"mode convexity", "determinism", "directedness", "connectivity"}
    # without a permutation: convexity along the raw path, said so
    raw = aspects_report(m, a, b, ev, points=5)
    assert raw["mode convexity"].details["path"] == "unaligned" and raw["mode convexity"].note
    assert set(raw["connectivity"].details["barriers"]) == {"linear"}


def test_align_runs_weight_matching():
    m, a, _, ev = _case()
    spec = m.spec()
    b = apply_permutation(spec, random_permutation(spec, a, seed=2), a)
    rep = aspects_report(m, a, b, ev, spec=spec, align=True, points=5)
    # B is a permuted copy of A: aligned, the path is constant
    assert rep["connectivity"].details["barriers"]["aligned linear"] == pytest.approx(0, abs=1e-5)
    assert rep["mode convexity"].value == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(TypeError, match="align=True needs spec"):
        aspects_report(m, a, b, ev, align=True)


def test_directedness_is_the_mean_pairwise_task_vector_cosine():
    m, base, _, ev = _case()
    g = torch.Generator().manual_seed(0)
    d = {k: torch.randn(v.shape, generator=g) for k, v in base.items()}
    noise = {k: 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    taus = [d, {k: d[k] + noise[k] for k in d}, {k: -d[k] for k in d}]
    tuned = [{k: base[k] + t[k] for k in base} for t in taus]
    rep = aspects_report(m, base, tuned[0], ev, points=3, base=base, finetuned=tuned)
    flat = [torch.cat([t[k].reshape(-1) for k in base]) for t in taus]
    cos = [
        float(torch.nn.functional.cosine_similarity(flat[i], flat[j], dim=0))
        for i, j in ((0, 1), (0, 2), (1, 2))
    ]
    got = rep["directedness"]
    assert got.value == pytest.approx(np.mean(cos), abs=1e-5)
    signs = [
        float((flat[i].sign() == flat[j].sign()).double().mean())
        for i, j in ((0, 1), (0, 2), (1, 2))
    ]
    assert got.details["mean_sign_agreement"] == pytest.approx(np.mean(signs), abs=1e-6)
    with pytest.raises(ValueError, match=">= 2 fine-tuned"):
        aspects_report(m, base, tuned[0], ev, points=3, base=base, finetuned=tuned[:1])


def test_determinism_is_the_earliest_stable_spawn_step():
    m, a, b, ev = _case()
    near = {k: v + 1e-4 for k, v in a.items()}
    spawned = {0: (a, b), 10: (a, near), 20: (a, a)}
    rep = aspects_report(m, a, b, ev, points=5, spawned=spawned, stability_tol=0.01)
    det = rep["determinism"]
    per = det.details["barrier_by_spawn_step"]
    assert per[0] > 0.01 and abs(per[10]) <= 0.01
    assert det.value == 10.0
    none = aspects_report(m, a, b, ev, points=5, spawned={0: (a, b)}, stability_tol=0.01)
    assert none["determinism"].value is None and "no spawn step" in none["determinism"].note
    with pytest.raises(ValueError, match="non-empty mapping"):
        aspects_report(m, a, b, ev, points=3, spawned={})
    with pytest.raises(TypeError, match=r"spawned\[0\] must be a"):
        aspects_report(m, a, b, ev, points=3, spawned={0: a})
    with pytest.raises(TypeError, match="curved must be a path_curve result"):
        aspects_report(m, a, b, ev, points=3, curved=3.0)
    with pytest.raises(ValueError, match="stability_tol"):
        aspects_report(m, a, b, ev, points=3, stability_tol=math.nan)
