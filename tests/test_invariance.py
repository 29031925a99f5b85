"""The core invariant: a permuted model computes the same function.

For every reference architecture, with its builder spec and its traced spec:
``load_state_dict(apply_permutation(spec, random_permutation(spec, sd, seed=seed), sd))`` gives the
same outputs in float64 (eval mode, and train mode where BatchNorm matters, including the
running statistics it updates).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from pymerge.spec import (
    apply_permutation,
    identity_permutation,
    random_permutation,
    spec_from_model,
)
from pymerge.testing.models import CNN, MLP, VGG, ResNet18, ResNet20, TinyGPT


def _perturb_norms(model: torch.nn.Module, seed: int) -> None:
    """Random BN/LN/GN affine params and running stats so that a wrong permutation shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point() and (
                name.endswith(("running_mean", "running_var"))
                or t.ndim == 1
                or "norm" in name
                or "bn" in name
            ):
                noise = torch.rand(t.shape, generator=g, dtype=torch.float64).to(t.dtype)
                if name.endswith("running_var"):
                    t.copy_(0.5 + noise)
                else:
                    t.add_(noise - 0.5)


def check_invariance(
    model: torch.nn.Module, x: torch.Tensor, spec, *, train: bool = False, seed: int = 0
) -> None:
    model = model.double()
    _perturb_norms(model, seed)
    if x.is_floating_point():
        x = x.double()
    model.train(train)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sizes = spec.validate(sd)
    perm = random_permutation(spec, sd, seed=seed)
    # the random permutation must actually move something in every group of size > 1
    for g, n in sizes.items():
        if n > 3:
            assert not torch.equal(perm[g], torch.arange(n)), g
    new = apply_permutation(spec, perm, sd)
    for k in sd:
        assert torch.equal(sd[k], model.state_dict()[k]), f"input mutated: {k}"
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(new)
    with torch.no_grad():
        y1 = model(x)
        y2 = permuted(x)
    torch.testing.assert_close(y1, y2, rtol=1e-9, atol=1e-9)
    # the permuted weights must really differ from the original (not a vacuous test)
    moved = [k for k in spec.axes_to_perm if not torch.equal(new[k], sd[k])]
    assert moved, "permutation changed nothing"
    if train:  # running statistics were updated consistently
        after = apply_permutation(spec, perm, model.state_dict())
        for k, v in permuted.state_dict().items():
            torch.testing.assert_close(v, after[k], rtol=1e-9, atol=1e-9, msg=k)


def _traced(model: torch.nn.Module, x: torch.Tensor):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reference models must trace without unsupported ops
        return spec_from_model(model, (x,))


IMG = torch.randn(4, 3, 10, 10)

MODELS = {
    "mlp": (lambda: MLP(12, (8, 9, 10), 3), torch.randn(5, 12)),
    "mlp_gelu_nobias": (lambda: MLP(7, (6, 5), 4, act="gelu", bias=False), torch.randn(3, 7)),
    "cnn_bn_global": (lambda: CNN(3, (8, 12, 16), 5, "bn", image_size=10), IMG),
    "cnn_bn_flatten": (
        lambda: CNN(3, (8, 12), 5, "bn", image_size=10, pool="flatten", hidden=7),
        IMG,
    ),
    "cnn_ln_flatten": (lambda: CNN(3, (8, 12), 5, "ln", image_size=10, pool="flatten"), IMG),
    "cnn_gn": (lambda: CNN(3, (8, 12), 5, "gn", image_size=10, hidden=6), IMG),
    "cnn_none": (lambda: CNN(3, (8, 12), 5, "none", image_size=10, pool="flatten"), IMG),
    "resnet20": (lambda: ResNet20(1, 10, blocks=(2, 1, 1)), IMG),
    "resnet20_gn": (lambda: ResNet20(1, 10, norm="gn", blocks=(1, 1, 1)), IMG),
    "resnet20_ln": (lambda: ResNet20(1, 10, norm="ln", blocks=(1, 1, 1)), IMG),
    "resnet18": (lambda: ResNet18(10, width=8), torch.randn(2, 3, 16, 16)),
    "vgg_bn": (
        lambda: VGG((8, "M", 12, 12, "M"), image_size=12, hidden=9),
        torch.randn(3, 3, 12, 12),
    ),
    "vgg_gn": (
        lambda: VGG((8, "M", 12, "M"), norm="gn", image_size=12, hidden=9),
        torch.randn(3, 3, 12, 12),
    ),
    "vgg_plain": (
        lambda: VGG((8, "M", 12, "M"), norm=None, image_size=12, hidden=9),
        torch.randn(3, 3, 12, 12),
    ),
    "tinygpt": (
        lambda: TinyGPT(vocab=20, d_model=16, n_heads=4, n_layers=2, max_len=10),
        torch.randint(0, 20, (3, 7)),
    ),
}
BN_MODELS = {"cnn_bn_global", "cnn_bn_flatten", "resnet20", "resnet18", "vgg_bn"}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("source", ["builder", "traced"])
def test_permuted_model_same_function(name: str, source: str) -> None:
    torch.manual_seed(0)
    make, x = MODELS[name]
    model = make().double()
    spec = (
        model.spec()
        if source == "builder"
        else _traced(model, x.double() if x.is_floating_point() else x)
    )
    check_invariance(model, x, spec, train=False, seed=1)
    if name in BN_MODELS:
        check_invariance(make().double(), x, spec, train=True, seed=2)


def test_tinygpt_train_mode_with_dropout_off() -> None:
    torch.manual_seed(0)
    model = TinyGPT(vocab=11, d_model=8, n_heads=2, n_layers=1, max_len=6)
    x = torch.randint(0, 11, (2, 6))
    check_invariance(model, x, model.spec(), train=True, seed=3)


def test_identity_permutation_is_noop() -> None:
    model = ResNet20(1, 10, blocks=(1, 1, 1))
    sd = model.state_dict()
    spec = model.spec()
    new = apply_permutation(spec, identity_permutation(spec, sd), sd)
    for k in sd:
        assert torch.equal(new[k], sd[k])


def test_wrong_permutation_changes_function() -> None:
    """Sanity check that the invariance test can fail: break one coupling."""
    torch.manual_seed(0)
    model = MLP(6, (8, 8), 3).double()
    spec = model.spec()
    broken = spec.with_groups({"fc0": [("fc0.weight", 0), ("fc0.bias", 0)]})  # no fc1 input
    sd = model.state_dict()
    new = apply_permutation(broken, random_permutation(broken, sd, seed=0), sd)
    m2 = copy.deepcopy(model)
    m2.load_state_dict(new)
    x = torch.randn(4, 6, dtype=torch.float64)
    assert not torch.allclose(model(x), m2(x))
