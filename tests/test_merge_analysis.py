"""Task-vector analysis: cosine similarity and sign agreement, whole model and per layer,
against a float64 flatten-and-compare reference; chunking; the heat map; bad input."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

import pymerge
from pymerge.merge import analysis


def _dicts(dtype=torch.float32, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "model.embed.weight": (11, 6),
        "model.layers.0.attn.weight": (6, 6),
        "model.layers.0.scale": (),
        "model.layers.1.mlp.weight": (5, 6),
        "model.layers.1.norm": (6,),
        "head.weight": (3, 6),
    }
    base = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    common = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    states = []
    for i in range(k):
        sd = {}
        for n, b in base.items():
            tau = (
                0.1 * torch.randn(b.shape, generator=g, dtype=torch.float64) + 0.05 * i * common[n]
            )
            sd[n] = (b + tau).to(dtype)
        states.append(sd)
    base = {n: b.to(dtype) for n, b in base.items()}
    # a non-contiguous view in one fine-tune
    states[1]["model.embed.weight"] = states[1]["model.embed.weight"].t().contiguous().t()
    return states, base


def _reference(states, base, keys):
    t = torch.stack(
        [torch.cat([(s[k].double() - base[k].double()).reshape(-1) for k in keys]) for s in states]
    )
    n = t.norm(dim=1)
    cos = (t @ t.T) / (n[:, None] * n[None, :])
    s = t.sign()
    k = len(states)
    sign = torch.empty(k, k, dtype=torch.float64)
    for i in range(k):
        for j in range(k):
            both = (s[i] != 0) & (s[j] != 0)
            sign[i, j] = ((s[i] == s[j]) & both).sum().double() / both.sum().double()
    return cos, sign


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_matches_the_float64_reference(dtype):
    states, base = _dicts(dtype)
    before = copy.deepcopy((states, base))
    r = pymerge.task_vector_similarity(states, base=base, names=["a", "b", "c"])
    cos, sign = _reference(states, base, list(base))
    torch.testing.assert_close(r.cosine, cos, rtol=0, atol=1e-12)
    torch.testing.assert_close(r.sign_agreement, sign, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        r.norms,
        cos.new_tensor(
            [
                float(
                    torch.cat([(s[k].double() - base[k].double()).reshape(-1) for k in base]).norm()
                )
                for s in states
            ]
        ),
        rtol=1e-12,
        atol=0,
    )
    assert r.layers == ["model.embed.weight", "model.layers.0", "model.layers.1", "head.weight"]
    groups = {
        "model.layers.0": ["model.layers.0.attn.weight", "model.layers.0.scale"],
        "model.layers.1": ["model.layers.1.mlp.weight", "model.layers.1.norm"],
    }
    for name, keys in groups.items():
        c, s = r.layer(name)
        rc, rs = _reference(states, base, keys)
        torch.testing.assert_close(c, rc, rtol=0, atol=1e-12)
        torch.testing.assert_close(s, rs, rtol=0, atol=1e-12)
    assert int(r.layer_numel.sum()) == sum(b.numel() for b in base.values())
    for s, s0 in zip([*states, base], [*before[0], before[1]], strict=True):
        assert all(torch.equal(s[k], s0[k]) for k in s)  # never mutated
    d = r.to_dict()
    assert d["names"] == ["a", "b", "c"] and set(d["layers"]) == set(r.layers)


def test_chunks_and_groups(monkeypatch):
    states, base = _dicts()
    whole = pymerge.task_vector_similarity(states, base=base, groups="key")
    monkeypatch.setattr(analysis, "_CHUNK", 7)  # every tensor in several chunks
    chunked = pymerge.task_vector_similarity(states, base=base, groups="key")
    torch.testing.assert_close(chunked.cosine, whole.cosine, rtol=0, atol=1e-13)
    torch.testing.assert_close(chunked.layer_sign_agreement, whole.layer_sign_agreement)
    assert whole.layers == list(base)
    mine = pymerge.task_vector_similarity(states, base=base, groups=lambda k: k.split(".")[0])
    assert mine.layers == ["model", "head"]
    only = pymerge.task_vector_similarity(states, base=base, keys=["head.weight"])
    rc, _ = _reference(states, base, ["head.weight"])
    torch.testing.assert_close(only.cosine, rc, rtol=0, atol=1e-12)


def test_zero_task_vectors_give_nan_not_numbers():
    states, base = _dicts(k=2)
    states[0] = {k: v.clone() for k, v in base.items()}  # a fine-tune equal to the base
    r = pymerge.task_vector_similarity(states, base=base)
    assert torch.isnan(r.cosine[0, 1]) and torch.isnan(r.sign_agreement[0, 0])
    assert r.cosine[1, 1] == pytest.approx(1.0) and r.norms[0] == 0


def test_threads_are_restored():
    states, base = _dicts()
    before = torch.get_num_threads()
    pymerge.task_vector_similarity(states, base=base, threads=1)
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads must be >= 1"):
        pymerge.task_vector_similarity(states, base=base, threads=0)


def test_heatmap_png(tmp_path):
    pytest.importorskip("matplotlib")
    states, base = _dicts()
    r = pymerge.task_vector_similarity(states, base=base)
    path = r.save_heatmap(tmp_path / "sub" / "tv.png", title="three fine-tunes", dpi=40)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_heatmap_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    states, base = _dicts()
    r = pymerge.task_vector_similarity(states, base=base)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pymerge\[plot\]"):
        r.save_heatmap(tmp_path / "x.png")


def test_bad_input():
    states, base = _dicts()
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'base'"):
        pymerge.task_vector_similarity(states)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="needs base="):
        pymerge.task_vector_similarity(states, base=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="list of state dicts"):
        pymerge.task_vector_similarity(states[0], base=base)
    bad = dict(states[1])
    bad.pop("head.weight")
    with pytest.raises(
        ValueError, match="'head.weight' is in states\\[0\\] but not in states\\[1\\]"
    ):
        pymerge.task_vector_similarity([states[0], bad], base=base)
    with pytest.raises(ValueError, match="has dtype"):
        pymerge.task_vector_similarity(states, base={k: v.double() for k, v in base.items()})
    with pytest.raises(ValueError, match="names has 2 entries for 3"):
        pymerge.task_vector_similarity(states, base=base, names=["a", "b"])
    with pytest.raises(ValueError, match="groups must be"):
        pymerge.task_vector_similarity(states, base=base, groups="layers")
    with pytest.raises(ValueError, match="'nope' of keys="):
        pymerge.task_vector_similarity(states, base=base, keys=["nope"])
