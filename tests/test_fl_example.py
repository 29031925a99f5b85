"""The federated-learning example (examples/fl_wsa.py) at small sizes: it runs end to end,
the Dirichlet split is a partition, and the WSA regulariser pulls the clients' scopes
toward the target (against FedAvg from the same split, initial model and batch order)."""

from __future__ import annotations

import os
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("mnist1d", reason="the example generates MNIST-1D with the mnist1d package")
pytestmark = pytest.mark.usefixtures("one_thread")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

import fl_wsa  # noqa: E402


def test_dirichlet_split_is_a_partition_with_a_minimum_size():
    y = torch.arange(300) % 10
    parts = fl_wsa.dirichlet_split(y, 5, 0.3, seed=1, min_size=10)
    allidx = torch.cat(parts)
    assert sorted(allidx.tolist()) == list(range(300))
    assert min(len(p) for p in parts) >= 10
    # non-IID: with alpha = 0.3 the clients' label histograms differ a lot
    hist = np.stack([np.bincount(y[p].numpy(), minlength=10) / len(p) for p in parts])
    assert hist.max(0).min() > 0.15
    again = fl_wsa.dirichlet_split(y, 5, 0.3, seed=1, min_size=10)
    assert all(torch.equal(a, b) for a, b in zip(parts, again, strict=True))
    with pytest.raises(RuntimeError, match="no Dirichlet"):
        fl_wsa.dirichlet_split(y, 50, 0.01, seed=0, min_size=10)


def test_the_example_runs_and_wsa_pulls_scopes_toward_the_target(tmp_path):
    cfg = replace(fl_wsa.QUICK, rounds=3)
    png = tmp_path / "fl.png"
    res = fl_wsa.run(cfg, out=str(png), verbose=False)
    assert png.stat().st_size > 1000
    runs = {r.method: r for r in res["runs"]}
    assert runs["wsa"].lam == 1.0 and runs["fedavg"].lam == 0.0
    assert set(runs) == {"fedavg", "fedprox", "wsa"}
    for r in runs.values():
        assert len(r.accuracy) == len(r.spread) == len(r.target_kl) == cfg.rounds
        assert all(0.0 <= a <= 1.0 for a in r.accuracy)
    # the regulariser: the clients end every round closer to the target scope, and to
    # each other, than FedAvg's clients do
    for i in range(cfg.rounds):
        assert runs["wsa"].target_kl[i] < runs["fedavg"].target_kl[i]
    assert runs["wsa"].spread[-1] < runs["fedavg"].spread[-1]
    (pair,) = res["pairs"]
    # both regularised pairs end with closer scopes than the plain pair
    assert pair["wsa_init_scope_kl"] < pair["plain_scope_kl"]
    assert pair["wsa_trained_scope_kl"] < pair["plain_scope_kl"]
    for name in ("plain", "wsa_init", "wsa_trained"):
        for key in ("loss_barrier", "error_barrier", "loss_barrier_wm", "error_barrier_wm"):
            assert np.isfinite(pair[f"{name}_{key}"])
    assert "| FedAvg + WSA (λ = 1) |" in res["table"]
    assert "toward the fused scope of the two inits" in res["table"]


def test_the_command_line_quick_run(capsys):
    res = fl_wsa.main(["--quick", "--no-pair", "--rounds", "1", "--clients", "2", "--lams", "3"])
    out = capsys.readouterr().out
    assert "| FedProx |" in out and res["pairs"] == []
    assert res["config"]["clients"] == 2 and res["config"]["lams"] == (3.0,)
    assert "| FedAvg + WSA (λ = 3) |" in out


def test_wsa_with_zero_weight_is_fedavg():
    """The only difference between the FedAvg and WSA runs is the regulariser's term."""
    cfg = replace(fl_wsa.QUICK, rounds=2, samples=1000)
    data = fl_wsa.make_data(cfg.samples, seed=42)
    a = fl_wsa.run_fl("fedavg", data, cfg, 0)
    b = fl_wsa.run_fl("wsa", data, cfg, 0, lam=0.0)
    assert a.accuracy == b.accuracy and a.spread == b.spread
