"""Out of core: weight matching streams from checkpoints on disk with the in-memory results."""

import pytest
import torch
from safetensors.torch import save_file

from pymerge.align import matching_objective, weight_matching
from pymerge.align._costs import CostBuilder, is_lazy
from pymerge.io import open_checkpoint
from pymerge.testing.models import MLP, TinyGPT


def _pair(model_fn, seed):
    torch.manual_seed(seed)
    a = {k: v.detach().clone() for k, v in model_fn().state_dict().items()}
    torch.manual_seed(seed + 1)
    b = {k: v.detach().clone() for k, v in model_fn().state_dict().items()}
    return a, b


def _to_disk(tmp_path, name, state, dtype=None):
    path = tmp_path / f"{name}.safetensors"
    save_file(
        {k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in state.items()}, path
    )
    return open_checkpoint(path)


CASES = {
    "mlp": (lambda: MLP(20, (48, 40, 32), 10), lambda m: m.spec()),
    "gpt": (lambda: TinyGPT(vocab=40, d_model=32, n_heads=4, n_layers=2), lambda m: m.spec()),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("greedy", [False, True])
def test_streaming_gives_the_in_memory_permutation(tmp_path, case, greedy):
    make, spec_of = CASES[case]
    spec = spec_of(make())
    a, b = _pair(make, 3)
    lazy_a, lazy_b = _to_disk(tmp_path, "a", a), _to_disk(tmp_path, "b", b)
    assert is_lazy(lazy_a) and not is_lazy(a)
    mem = weight_matching(spec, a, b, seed=1, greedy=greedy)
    disk = weight_matching(spec, lazy_a, lazy_b, seed=1, greedy=greedy)
    assert mem.perm.keys() == disk.perm.keys()
    for g in mem.perm:
        assert torch.equal(mem.perm[g], disk.perm[g]), g
    assert mem.history.objective == disk.history.objective  # bit for bit
    assert matching_objective(spec, lazy_a, lazy_b, disk.perm) == pytest.approx(
        matching_objective(spec, a, b, mem.perm), rel=1e-12
    )


def test_streaming_bf16_checkpoints_match_in_memory(tmp_path):
    make, spec_of = CASES["gpt"]
    spec = spec_of(make())
    a, b = _pair(make, 5)
    a16 = {k: v.bfloat16() for k, v in a.items()}
    b16 = {k: v.bfloat16() for k, v in b.items()}
    mem = weight_matching(spec, a16, b16)
    disk = weight_matching(spec, _to_disk(tmp_path, "a", a16), _to_disk(tmp_path, "b", b16))
    for g in mem.perm:
        assert torch.equal(mem.perm[g], disk.perm[g]), g


def test_streaming_builder_keeps_no_operands(tmp_path):
    make, spec_of = CASES["mlp"]
    spec = spec_of(make())
    a, b = _pair(make, 0)
    plan = CostBuilder(spec, _to_disk(tmp_path, "a", a), _to_disk(tmp_path, "b", b), None)
    assert plan.stream
    assert all(
        t.a_t is None and t.b_t is None and t.a_mat is None
        for ts in plan.terms.values()
        for t in ts
    )
    mem = CostBuilder(spec, a, b, None)
    perm = {
        g: torch.randperm(n, generator=torch.Generator().manual_seed(1))
        for g, n in plan.sizes.items()
    }
    for g in plan.groups:
        assert torch.equal(plan.cost(g, perm), mem.cost(g, perm)), g


def test_streaming_checks_name_the_key(tmp_path):
    make, spec_of = CASES["mlp"]
    spec = spec_of(make())
    a, b = _pair(make, 0)
    b["fc1.weight"][2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"state_b\['fc1.weight'\] has a non-finite value"):
        weight_matching(spec, _to_disk(tmp_path, "a", a), _to_disk(tmp_path, "b", b))
    b.pop("fc1.bias")
    with pytest.raises(ValueError, match="fc1.bias"):
        weight_matching(spec, _to_disk(tmp_path, "a", a), _to_disk(tmp_path, "b2", b))
