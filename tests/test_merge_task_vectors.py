"""The task-vector methods through pymerge.merge: the whole-state fast path equals the
per-tensor (streaming) function, the formulas, defaults, and bad input before any work."""

from __future__ import annotations

import pytest
import torch
from test_task_vectors import awkward, reference

import pymerge
from pymerge.merge.registry import plan_merge
from pymerge.ops import TaskVectorParams

FAMILY = {
    # name: (sparsify, consensus, normalize default, rescale default)
    "task_arithmetic": ("none", False, False, False),
    "ties": ("magnitude", True, True, False),
    "dare_linear": ("random", False, False, True),
    "dare_ties": ("random", True, False, True),
    "breadcrumbs": ("magnitude_outliers", False, False, False),
    "breadcrumbs_ties": ("magnitude_outliers", True, False, False),
    "della": ("della_magprune", True, True, True),
    "della_linear": ("della_magprune", False, False, True),
}


def _kwargs(name):
    kw = {"weight": [0.6, 1.0, 0.3], "density": [0.4, 0.7, 0.5], "lambda": 0.9}
    if name.startswith("breadcrumbs"):
        kw["gamma"] = [0.05, 0.0, 0.1]
    if name.startswith("della"):
        kw["epsilon"] = 0.1
    if name.startswith(("dare", "della")):
        kw["seed"] = 3
    return kw


def test_registered_with_mergekits_parameters_and_defaults():
    infos = {m.name: m for m in pymerge.merge_methods()}
    for name, (_, _, normalize, rescale) in FAMILY.items():
        info = infos[name]
        assert info.needs_base and info.min_models == 1
        by = {p.name: p for p in info.params}
        assert by["weight"].per_model and by["density"].per_model
        assert by["density"].default == 1.0 and by["lambda"].default == 1.0
        assert by["normalize"].default is normalize and by["rescale"].default is rescale
        assert ("gamma" in by) == name.startswith("breadcrumbs")
        assert ("epsilon" in by) == name.startswith("della")
        assert ("seed" in by) == name.startswith(("dare", "della"))
        if "gamma" in by:
            assert by["gamma"].default == 0.01
        if "epsilon" in by:
            assert by["epsilon"].default == 0.15
        assert "mergekit" in info.reference


@pytest.mark.parametrize("name", sorted(FAMILY))
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_whole_state_path_equals_the_per_tensor_function_and_the_formulas(name, dtype):
    sparsify, consensus, normalize, rescale = FAMILY[name]
    states, base = awkward(dtype, seed=4)
    kw = _kwargs(name)
    fast = pymerge.merge(name, states, base=base, **kw)
    plan = plan_merge(name, len(states), has_base=True, **kw)
    floats = [k for k, v in base.items() if v.is_floating_point()]
    p = TaskVectorParams.make(
        3,
        weight=kw["weight"],
        density=kw["density"],
        gamma=kw.get("gamma", 0.01),
        epsilon=kw.get("epsilon", 0.15),
        lam=kw["lambda"],
        normalize=normalize,
        rescale=rescale,
    )
    ref = reference(
        [{k: s[k] for k in floats} for s in states],
        {k: base[k] for k in floats},
        p,
        sparsify,
        consensus,
        seed=kw.get("seed", 0),
    )
    for k in floats:
        streamed = plan.merge_tensor(k, [s[k] for s in states], base[k])
        assert torch.equal(fast[k], streamed.to(fast[k].dtype)), k
        tol = (
            1e-6
            if dtype == torch.float64
            else 2 * torch.finfo(dtype).eps * max(1.0, float(ref[k].abs().max()))
        )
        assert float((fast[k].double() - ref[k]).abs().max()) <= tol, k
    assert torch.equal(fast["count"], states[0]["count"])


def test_seed_changes_dare_and_della_masks_only():
    states, base = awkward(torch.float32, seed=5)
    a = pymerge.merge("dare_ties", states, base=base, density=0.5, seed=1)
    b = pymerge.merge("dare_ties", states, base=base, density=0.5, seed=1)
    c = pymerge.merge("dare_ties", states, base=base, density=0.5, seed=2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["w"], c["w"])


def test_inputs_are_never_modified():
    states, base = awkward(torch.float16, seed=6)
    copies = [{k: v.clone() for k, v in s.items()} for s in (*states, base)]
    for name in FAMILY:
        pymerge.merge(name, states, base=base, **_kwargs(name))
    for s, c in zip((*states, base), copies, strict=True):
        assert all(torch.equal(s[k], c[k]) for k in s)


def test_bad_input_is_a_clear_error_before_any_work():
    states, base = awkward(torch.float32)
    with pytest.raises(ValueError, match="needs a base"):
        pymerge.merge("ties", states, density=0.5)
    with pytest.raises(ValueError, match="density"):
        pymerge.merge("ties", states, base=base, density=0.0)
    with pytest.raises(ValueError, match="density"):
        pymerge.merge("dare_linear", states, base=base, density=[0.5, 1.2, 0.5])
    with pytest.raises(ValueError, match="finite"):
        pymerge.merge("task_arithmetic", states, base=base, weight=[1.0, float("inf"), 1.0])
    with pytest.raises(ValueError, match="at least 1"):
        pymerge.merge("breadcrumbs", [], base=base)
    with pytest.raises(ValueError, match="epsilon"):
        pymerge.merge("della", states, base=base, density=0.1)  # 0.1 - 0.15 <= 0
    with pytest.raises(ValueError, match="sum to zero"):
        pymerge.merge("task_arithmetic", states, base=base, weight=[1.0, -1.0, 0.0], normalize=True)
    with pytest.raises(ValueError, match="gamma"):
        pymerge.merge("breadcrumbs", states, base=base, density=0.5, gamma=1.5)
    with pytest.raises(ValueError, match="unknown parameter 'densty'"):
        pymerge.merge("ties", states, base=base, densty=0.5)
    with pytest.raises(ValueError, match="seed"):
        pymerge.merge("ties", states, base=base, seed=1)
    # consensus methods divide per entry (0 -> 1): zero-sum weights are allowed there
    pymerge.merge("ties", states, base=base, weight=[1.0, -1.0, 0.0], density=0.5)


def test_per_key_overrides_reach_the_fused_path():
    states, base = awkward(torch.float32, seed=7)
    out = pymerge.merge(
        "ties", states, base=base, density=0.9, overrides=[{"filter": "conv", "density": 0.2}]
    )
    conv_only = pymerge.merge("ties", states, base=base, density=0.2)
    other = pymerge.merge("ties", states, base=base, density=0.9)
    assert torch.equal(out["conv"], conv_only["conv"])
    assert torch.equal(out["w"], other["w"])
