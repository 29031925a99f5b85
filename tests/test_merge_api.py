"""pymerge.merge and the registry: parameter forms (per-model lists, gradients, filters,
overrides), the streaming plan, the fast path, bad input (each a clear error before any
work), inputs never mutated, the name ``pymerge.merge``, and ``align=``."""

from __future__ import annotations

import copy
import importlib
import inspect

import pytest
import torch

import pymerge
from pymerge.merge import registry
from pymerge.merge.registry import Param, layer_positions, plan_merge, register_method


def _sd(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed.weight": torch.randn(6, 4, generator=g).to(dtype),
        "model.layers.0.attn.weight": torch.randn(4, 4, generator=g).to(dtype),
        "model.layers.0.mlp.weight": torch.randn(5, 4, generator=g).to(dtype),
        "model.layers.1.attn.weight": torch.randn(4, 4, generator=g).to(dtype),
        "model.layers.1.mlp.weight": torch.randn(5, 4, generator=g).to(dtype),
        "model.layers.2.attn.weight": torch.randn(4, 4, generator=g).to(dtype),
        "model.norm.weight": torch.randn(4, generator=g).to(dtype),
        "model.steps": torch.tensor(7 + seed),
    }


@pytest.fixture
def three():
    return [_sd(0), _sd(1), _sd(2)]


@pytest.fixture
def counter():
    """A throw-away method that counts its per-tensor calls (removed afterwards)."""
    calls = []

    @register_method(
        name="_counting",
        params=(
            Param("weight", 1.0, per_model=True),
            Param("density", 1.0, low=0.0, open_low=True, high=1.0),
        ),
        base="optional",
    )
    def _fn(ctx):
        calls.append(ctx.key)
        return sum(ctx.tensors) / ctx.k

    yield calls
    registry._REGISTRY.pop("_counting", None)


# -------------------------------------------------------------------- parameter forms


def test_per_model_weights_and_the_weights_shorthand(three):
    out = pymerge.merge("linear", three, weights=[1, 2, 3])
    same = pymerge.merge("linear", three, weight=[1, 2, 3])
    k = "model.embed.weight"
    want = (three[0][k] + 2 * three[1][k] + 3 * three[2][k]) / 6
    torch.testing.assert_close(out[k], want)
    assert all(torch.equal(out[x], same[x]) for x in out)


def test_layer_positions_follow_mergekit():
    keys = list(_sd(0))
    t = layer_positions(keys)
    assert t["model.embed.weight"] == 0.0 and t["model.norm.weight"] == 0.0
    assert t["model.layers.0.mlp.weight"] == 0.0
    assert t["model.layers.1.attn.weight"] == 0.5
    assert t["model.layers.2.attn.weight"] == 1.0
    assert layer_positions(["a.layers.0.w"]) == {"a.layers.0.w": 1.0}  # one layer: t = 1


def test_gradient_filters_and_overrides(three):
    a, b = three[0], three[1]
    # a gradient over the layers: t = 0 at layer 0 (and outside the stack), 1 at layer 2
    out = pymerge.merge("slerp", [a, b], t=[0.0, 1.0])
    assert torch.equal(out["model.layers.0.attn.weight"], a["model.layers.0.attn.weight"])
    torch.testing.assert_close(out["model.layers.2.attn.weight"], b["model.layers.2.attn.weight"])
    # a filter list: the first matching entry wins; no match falls back
    out = pymerge.merge("slerp", [a, b], t=[{"filter": "mlp", "value": 1.0}, {"value": 0.0}])
    torch.testing.assert_close(out["model.layers.0.mlp.weight"], b["model.layers.0.mlp.weight"])
    assert torch.equal(out["model.layers.0.attn.weight"], a["model.layers.0.attn.weight"])
    # overrides win over the parameter's own setting, first match first
    out = pymerge.merge(
        "linear",
        [a, b],
        weights=[1.0, 1.0],
        overrides=[
            {"filter": "attn", "weight": [1.0, 0.0]},
            {"filter": "layers", "weight": [0, 1]},
        ],
    )
    k1, k2, k3 = "model.layers.1.attn.weight", "model.layers.1.mlp.weight", "model.norm.weight"
    torch.testing.assert_close(out[k1], a[k1])
    torch.testing.assert_close(out[k2], b[k2])
    torch.testing.assert_close(out[k3], (a[k3] + b[k3]) / 2)
    # a per-model list of settings: model 1 gets a filter list
    plan = plan_merge("linear", 2, weight=[2.0, [{"filter": "mlp", "value": 5.0}, {"value": 1}]])
    assert plan.resolve("model.layers.0.mlp.weight")["weight"] == [2.0, 5.0]
    assert plan.resolve("model.norm.weight")["weight"] == [2.0, 1.0]
    # the broadcast filter form gives every model the same gradient
    plan = plan_merge("linear", 3, weight=[{"value": [0.0, 1.0]}])
    assert plan.resolve("k", t=0.25)["weight"] == [0.25, 0.25, 0.25]


def test_the_streaming_plan_gives_the_in_memory_result(three):
    """A driver that resolves and merges key by key (issue 11's streaming) gets the same
    tensors as pymerge.merge on the whole dicts, fast path included."""
    base = _sd(9)
    cases = [
        ("linear", three, {"weights": [0.2, 0.3, 0.5]}),
        ("slerp", three[:2], {"t": [0.1, 0.9]}),
        ("sce", three, {"base": base, "select_topk": 0.5}),
        ("model_stock", three, {"base": base}),
        ("karcher", three, {}),
    ]
    for name, states, kw in cases:
        kw = dict(kw)
        b = kw.pop("base", None)
        ours = pymerge.merge(name, states, base=b, **kw)
        plan = plan_merge(name, len(states), has_base=b is not None, **kw)
        t = layer_positions(states[0])
        for k in states[0]:
            streamed = plan.merge_tensor(
                k, [s[k] for s in states], None if b is None else b[k], t=t[k]
            )
            torch.testing.assert_close(streamed, ours[k], rtol=1e-6, atol=1e-6)


def test_linear_fast_path_equals_the_per_tensor_function(three):
    from pymerge.merge import linear

    ours = pymerge.merge("linear", three, weights=[0.2, 0.3, 0.5])  # through ops.interpolate
    plan = plan_merge("linear", 3, weights=[0.2, 0.3, 0.5])
    for k in three[0]:
        if not three[0][k].is_floating_point():
            continue
        ref = linear.merge_tensor(plan.context(k, [s[k] for s in three]))
        torch.testing.assert_close(ours[k], ref, rtol=1e-6, atol=1e-6)


def test_integer_buffers_are_copied_not_merged(three):
    out = pymerge.merge("linear", three)
    assert out["model.steps"].item() == 7 and out["model.steps"].dtype == torch.int64
    out = pymerge.merge("sce", three, base=_sd(5))
    assert out["model.steps"].item() == 12  # from the base
    assert out["model.steps"].data_ptr() != three[0]["model.steps"].data_ptr()


def test_output_key_order_dtype_and_device(three):
    shuffled = [dict(reversed(list(s.items()))) for s in three]
    out = pymerge.merge("linear", [three[0], *shuffled[1:]])
    assert list(out) == list(three[0])
    half = [
        {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in s.items()}
        for s in three
    ]
    out = pymerge.merge("multislerp", half)
    assert out["model.embed.weight"].dtype == torch.bfloat16


def test_progress_bar_runs(three, capsys):
    pymerge.merge("slerp", three[:2], t=0.5, progress=True)
    assert "merge slerp" in capsys.readouterr().err


# ------------------------------------------------------------------------- bad input


def _raises(match, fn, *args, exc=ValueError, **kw):
    with pytest.raises(exc, match=match):
        fn(*args, **kw)


def test_unknown_method_lists_the_known_ones_and_the_closest(three):
    with pytest.raises(ValueError, match="did you mean 'slerp'") as e:
        pymerge.merge("slepr", three)
    assert "linear" in str(e.value) and "karcher" in str(e.value)
    _raises("method must be a str", pymerge.merge, 3, three, exc=TypeError)


def test_unknown_parameter_is_named_with_the_method_parameters(three):
    with pytest.raises(ValueError, match="unknown parameter 'normalise'") as e:
        pymerge.merge("linear", three, normalise=False)
    assert "did you mean 'normalize'" in str(e.value) and "weight=" in str(e.value)
    _raises(
        "overrides\\[0\\]: unknown parameter 'tt'",
        pymerge.merge,
        "slerp",
        three[:2],
        t=0.5,
        overrides=[{"filter": "mlp", "tt": 0.3}],
    )
    _raises(
        "passthrough has no per-model 'weight' parameter.*scale",
        pymerge.merge,
        "passthrough",
        three[:1],
        weights=[1.0],
    )


def test_missing_base_required_parameter_and_unwanted_base(three):
    _raises("model_stock needs a base model", pymerge.merge, "model_stock", three)
    _raises("sce needs a base model", pymerge.merge, "sce", three)
    _raises("'t' is required", pymerge.merge, "slerp", three[:2])
    _raises("linear takes no base", pymerge.merge, "linear", three, base=three[0])
    if "ties" in registry.method_names():
        _raises("ties needs a base", pymerge.merge, "ties", three)


def test_mismatched_state_dicts_are_named(three):
    a, b = three[0], dict(three[1])
    b.pop("model.norm.weight")
    _raises(
        "'model.norm.weight' is in states\\[0\\] but not in states\\[1\\]",
        pymerge.merge,
        "linear",
        [a, b],
    )
    c = dict(three[1], **{"model.norm.weight": torch.zeros(5)})
    _raises("'model.norm.weight' has shape", pymerge.merge, "linear", [a, c])
    d = dict(three[1], **{"model.norm.weight": three[1]["model.norm.weight"].double()})
    _raises("'model.norm.weight' has dtype", pymerge.merge, "linear", [a, d])
    _raises("key 'model.norm.weight' .* base", pymerge.merge, "sce", [a], base=b)
    _raises("list of state dicts", pymerge.merge, "linear", a, exc=TypeError)


def test_non_finite_weights_and_out_of_range_values(three):
    _raises(
        "'weight' .* must be finite",
        pymerge.merge,
        "linear",
        three,
        weights=[1.0, float("nan"), 1.0],
    )
    _raises("must be finite", pymerge.merge, "linear", three, weights=[1.0, float("inf"), 1.0])
    _raises(
        "'weight' .* must be a number",
        pymerge.merge,
        "linear",
        three,
        weights=[1, "x", 1],
        exc=TypeError,
    )
    _raises(
        "'select_topk' .* must be in \\[0, 1\\]",
        pymerge.merge,
        "sce",
        three,
        base=three[0],
        select_topk=1.5,
    )
    _raises("must be a bool", pymerge.merge, "linear", three, normalize=1, exc=TypeError)
    if "ties" in registry.method_names():
        for bad in (0.0, 1.5, -0.1):
            _raises("density", pymerge.merge, "ties", three, base=three[0], density=bad)


def test_density_outside_0_1_through_a_filter_errors_before_work(three, counter):
    _raises(
        "'density' .* must be in \\(0, 1\\]",
        pymerge.merge,
        "_counting",
        three,
        density=[{"filter": "layers.2", "value": 0.0}, {"value": 0.5}],
    )
    _raises(
        "'density' .* must be in \\(0, 1\\]",
        pymerge.merge,
        "_counting",
        three,
        overrides=[{"filter": "norm", "density": 1.01}],
    )
    assert counter == []  # nothing ran


def test_weights_summing_to_zero_with_normalize(three):
    _raises("sum to zero at key", pymerge.merge, "linear", three, weights=[1.0, -0.5, -0.5])
    out = pymerge.merge("linear", three, weights=[1.0, -0.5, -0.5], normalize=False)
    assert torch.isfinite(out["model.embed.weight"]).all()
    _raises("sum to zero", pymerge.merge, "multislerp", three, weights=[1.0, -1.0, 0.0])
    _raises(
        "sum to zero",
        pymerge.merge,
        "linear",
        three,
        overrides=[{"filter": "mlp", "weight": [1, -1, 0]}],
    )


def test_model_counts(three):
    _raises(
        "slerp needs exactly 2 models in states, got 1", pymerge.merge, "slerp", three[:1], t=0.5
    )
    _raises("slerp needs exactly 2 models", pymerge.merge, "slerp", three, t=0.5)
    _raises(
        "model_stock needs at least 2 models .*base=",
        pymerge.merge,
        "model_stock",
        three[:1],
        base=three[2],
    )
    _raises("nearswap needs exactly 1", pymerge.merge, "nearswap", three[:2], base=three[2], t=1)
    _raises(
        "one value for all models or one per model \\(3\\); got a list of 2",
        pymerge.merge,
        "linear",
        three,
        weights=[1.0, 2.0],
    )


def test_malformed_settings(three):
    _raises(
        "overrides must be a list",
        pymerge.merge,
        "linear",
        three,
        overrides={"filter": "x", "weight": 1},
        exc=TypeError,
    )
    _raises("'filter' and 'value'", pymerge.merge, "slerp", three[:2], t=[{"filter": "a"}])
    _raises(
        "pass weights= or weight=",
        pymerge.merge,
        "linear",
        three,
        weights=[1, 1, 1],
        weight=[1, 1, 1],
    )
    _raises("takes no model=", pymerge.merge, "linear", three, model=torch.nn.Linear(2, 2))
    _raises("spec= is only used with align=", pymerge.merge, "linear", three, spec=object())
    _raises("unknown align='wm'", pymerge.merge, "linear", three, align="wm")
    _raises("needs spec=", pymerge.merge, "linear", three, align="weight_matching")
    _raises("K >= 3", pymerge.merge, "linear", three[:2], align="merge_many", spec=object())
    _raises("needs model=", pymerge.merge, "linear", three, align="activation_matching")
    _raises(
        "with base= use align='weight_matching'",
        pymerge.merge,
        "sce",
        three,
        base=three[0],
        align="merge_many",
        spec=object(),
    )


def test_errors_come_before_any_work(three, counter):
    """A bad value at the last key (through a filter) raises before the first key merges."""
    _raises(
        "'weight' .* must be finite",
        pymerge.merge,
        "_counting",
        three,
        weight=[1, 1, [{"filter": "norm", "value": float("nan")}, {"value": 1.0}]],
    )
    assert counter == []
    pymerge.merge("_counting", three)
    assert len(counter) == 7  # the integer buffer is not passed to the method


# ---------------------------------------------------------------------- never mutated

MINE = [
    ("linear", 3, False, {"weights": [0.5, 1.0, 2.0]}),
    ("slerp", 2, False, {"t": 0.3}),
    ("nuslerp", 2, True, {"weights": [1.0, 2.0], "nuslerp_flatten": False}),
    ("multislerp", 3, True, {}),
    ("karcher", 3, False, {}),
    ("model_stock", 3, True, {"filter_wise": True}),
    ("sce", 3, True, {"select_topk": 0.5}),
    ("nearswap", 1, True, {"t": 0.1}),
    ("passthrough", 1, False, {}),
    ("passthrough", 1, False, {"scale": 2.0}),
]


@pytest.mark.parametrize(
    "name,k,with_base,kw", MINE, ids=[f"{m[0]}-{i}" for i, m in enumerate(MINE)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inputs_never_mutated_and_outputs_never_alias(name, k, with_base, kw, dtype):
    states = [_sd(i, dtype) for i in range(k)]
    states[0]["model.embed.weight"] = (
        states[0]["model.embed.weight"].t().contiguous().t()
    )  # non-contiguous
    base = _sd(9, dtype) if with_base else None
    before = copy.deepcopy((states, base))
    out = pymerge.merge(name, states, base=base, **kw)
    for s, s0 in zip([*states, base or {}], [*before[0], before[1] or {}], strict=True):
        assert list(s) == list(s0)
        for key in s:
            assert torch.equal(s[key], s0[key]) and s[key].stride() == s0[key].stride()
    ptrs = {t.untyped_storage().data_ptr() for s in [*states, base or {}] for t in s.values()}
    assert not ptrs & {t.untyped_storage().data_ptr() for t in out.values()}


# ------------------------------------------------------------------------------ name


def test_the_name_pymerge_merge_is_one_callable_object(three):
    import pymerge.merge as pm
    from pymerge import merge as m1
    from pymerge.merge import merge as m2

    assert pm is pymerge.merge is m1 is m2 is importlib.import_module("pymerge.merge")
    assert callable(pm) and pm.merge_methods is pymerge.merge_methods
    assert "states" in inspect.signature(pymerge.merge).parameters
    assert pm.api.merge.__doc__ == type(pm).__call__.__doc__
    out = pm("linear", three)
    assert set(out) == set(three[0])


def test_merge_methods_describe_themselves():
    infos = pymerge.merge_methods()
    assert [i.name for i in infos] == sorted(i.name for i in infos)
    slerp = registry.get_method("slerp")
    assert slerp.param("t").required and slerp.min_models == slerp.max_models == 2
    assert not slerp.needs_base and registry.get_method("sce").needs_base
    text = slerp.describe()
    assert "t (float, required)" in text and "mergekit" in text


# ----------------------------------------------------------------------------- align


def _mlp_states(seeds=(0, 1, 2)):
    from pymerge.testing.models import MLP

    out = []
    for s in seeds:
        torch.manual_seed(s)
        out.append({k: v.detach().clone() for k, v in MLP(8, (16, 12), 3).state_dict().items()})
    return out


def test_align_weight_matching_recovers_a_permuted_copy():
    """Permute model A; align= undoes it, so averaging A with pi(A) gives A back."""
    from pymerge.spec import apply_permutation, mlp_spec, random_permutation

    spec = mlp_spec(2)
    (a,) = _mlp_states((0,))
    pa = apply_permutation(spec, random_permutation(spec, a, seed=3), a)
    plain = pymerge.merge("linear", [a, pa])
    assert not torch.allclose(plain["fc0.weight"], a["fc0.weight"])
    out = pymerge.merge("linear", [a, pa], align="weight_matching", spec=spec)
    for k in a:
        torch.testing.assert_close(out[k], a[k])
    # with a base: every model goes to the base
    out = pymerge.merge(
        "sce", [pa, pa], base=a, align={"method": "weight_matching", "max_iter": 20}, spec=spec
    )
    for k in a:
        torch.testing.assert_close(out[k], a[k])


def test_align_merge_many_and_traced_spec():
    from pymerge.spec import apply_permutation, mlp_spec, random_permutation
    from pymerge.testing.models import MLP

    spec = mlp_spec(2)
    (a,) = _mlp_states((0,))
    copies = [apply_permutation(spec, random_permutation(spec, a, seed=s), a) for s in (1, 2)]
    out = pymerge.merge("karcher", [a, *copies], align="merge_many", spec=spec)
    # MergeMany finds a common basis (not necessarily a's): the merge is a permuted copy of a
    ref = pymerge.merge("karcher", [a, a, a])
    assert sorted(out["fc0.bias"].tolist()) == pytest.approx(sorted(ref["fc0.bias"].tolist()))
    # the spec traced from model= (with example_inputs=)
    out = pymerge.merge(
        "linear",
        [a, copies[0]],
        align="weight_matching",
        model=MLP(8, (16, 12), 3),
        example_inputs=torch.randn(2, 8),
    )
    for k in a:
        torch.testing.assert_close(out[k], a[k])


def test_align_activation_matching():
    from pymerge.spec import apply_permutation, mlp_spec, random_permutation
    from pymerge.testing.models import MLP

    spec = mlp_spec(2)
    (a,) = _mlp_states((0,))
    pa = apply_permutation(spec, random_permutation(spec, a, seed=5), a)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(32, 8, generator=g) for _ in range(3)]
    out = pymerge.merge(
        "linear",
        [a, pa],
        align="activation_matching",
        spec=spec,
        model=MLP(8, (16, 12), 3),
        batches=batches,
    )
    for k in a:
        torch.testing.assert_close(out[k], a[k])
