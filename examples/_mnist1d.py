"""MNIST-1D data and training helpers shared by ``examples/mnist1d_barrier.py`` and the tests.

The data are generated locally with the ``mnist1d`` package (no download): 40-sample 1-D
signals of the ten digit templates, 80/20 train/test split.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def batches_of(x: Tensor, y: Tensor, size: int = 1000) -> list[tuple[Tensor, Tensor]]:
    """``(x, y)`` in consecutive batches of ``size``."""
    return [(x[i : i + size], y[i : i + size]) for i in range(0, x.shape[0], size)]


def make_model(width: int = 512, depth: int = 3) -> nn.Module:
    """:class:`pymerge.testing.models.MLP` for MNIST-1D: 40 inputs, ``depth`` hidden ReLU layers of
    ``width`` units, 10 classes (its permutation spec: ``model.spec()``)."""
    from pymerge.testing.models import MLP

    return MLP(40, (width,) * depth, 10)


@dataclass
class Data:
    x_train: Tensor  # float32 [N_train, 40]
    y_train: Tensor  # int64 [N_train]
    x_test: Tensor  # float32 [N_test, 40]
    y_test: Tensor  # int64 [N_test]


def _cache_dir() -> str:
    return os.environ.get(
        "PYMERGE_DATA", os.path.join(os.path.expanduser("~"), ".cache", "pymerge")
    )


def make_data(num_samples: int = 20_000, seed: int = 42) -> Data:
    """Generate MNIST-1D with ``num_samples`` signals (80% train), standardised by the
    training mean/std. The generated arrays are cached in ``$PYMERGE_DATA`` (default
    ``~/.cache/pymerge``): generating takes about 2 ms per signal."""
    from mnist1d.data import get_dataset_args, make_dataset

    path = os.path.join(_cache_dir(), f"mnist1d-{int(num_samples)}-{int(seed)}.pt")
    raw = None
    if os.path.exists(path):
        try:
            raw = torch.load(path, weights_only=True)
        except Exception:  # a damaged cache file: make the data again
            raw = None
    if raw is None:
        args = get_dataset_args()
        args.num_samples = int(num_samples)
        args.seed = int(seed)
        made = make_dataset(args)
        raw = {k: torch.as_tensor(made[k]) for k in ("x", "y", "x_test", "y_test")}
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            torch.save(raw, tmp)
            os.replace(tmp, path)
        except OSError:
            pass  # no cache: fine
    x = torch.as_tensor(raw["x"], dtype=torch.float32)
    xt = torch.as_tensor(raw["x_test"], dtype=torch.float32)
    mean, std = x.mean(), x.std()
    return Data(
        x_train=(x - mean) / std,
        y_train=torch.as_tensor(raw["y"], dtype=torch.long),
        x_test=(xt - mean) / std,
        y_test=torch.as_tensor(raw["y_test"], dtype=torch.long),
    )


def train(
    model: nn.Module,
    data: Data,
    *,
    epochs: int = 20,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    seed: int = 0,
) -> dict[str, Tensor]:
    """Train ``model`` in place with Adam or SGD (momentum 0.9), cosine-decayed lr, on the
    training split; the minibatch order is seeded by ``seed``. Returns a detached copy of
    its state dict."""
    gen = torch.Generator().manual_seed(seed)
    opt: torch.optim.Optimizer
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    n = data.x_train.shape[0]
    steps = epochs * ((n + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` on (x, y), in eval mode."""
    was = model.training
    model.eval()
    logits = model(x)
    out = {
        "loss": float(F.cross_entropy(logits, y)),
        "accuracy": float((logits.argmax(1) == y).float().mean()),
    }
    model.train(was)
    return out


def train_pair(width: int, depth: int, data: Data, *, epochs: int, lr: float = 0.05, seeds=(0, 1)):
    """Two models of one architecture trained from different seeds (init and data order)."""
    states = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = make_model(width, depth)
        states.append(train(model, data, epochs=epochs, lr=lr, optimizer="sgd", seed=seed))
    return states


def match_all(
    spec,
    model: nn.Module,
    state_a: dict[str, Tensor],
    state_b: dict[str, Tensor],
    data: Data,
    *,
    methods=("weight matching", "activation matching", "STE"),
    ste_steps: int = 200,
    ste_optimizer: str = "sgd",
    ste_lr: float = 1e-2,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, dict[str, Tensor]]:
    """B onto A by each method: name -> permutation (AM on 2000 training signals; STE with
    SGD lr 1e-2, momentum 0.9 (or ``ste_optimizer="adam"``, ``ste_lr=1e-3``, the paper's
    alternative), ``ste_steps`` steps of ``batch_size``; its first projection
    is WM(θ_A, θ_B) as in Algorithm 3, where θ̃ starts at θ_A, so ``init=`` the WM result
    only saves those sweeps)."""
    import copy

    from pymerge.align import activation_matching, ste_matching, weight_matching

    out: dict[str, dict[str, Tensor]] = {}
    wm = weight_matching(spec, state_a, state_b, seed=seed).perm
    if "weight matching" in methods:
        out["weight matching"] = wm
    if "activation matching" in methods:
        ma, mb = copy.deepcopy(model), copy.deepcopy(model)
        ma.load_state_dict(state_a)
        mb.load_state_dict(state_b)
        am_batches = batches_of(data.x_train[:2000], data.y_train[:2000], 500)
        out["activation matching"] = activation_matching(spec, ma, mb, am_batches).perm
    if "STE" in methods:
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(data.x_train.shape[0], generator=gen)
        batches = [
            (data.x_train[order[i : i + batch_size]], data.y_train[order[i : i + batch_size]])
            for i in range(0, data.x_train.shape[0] - batch_size + 1, batch_size)
        ]
        epochs = max(1, -(-ste_steps // len(batches)))
        res = ste_matching(
            spec, model, state_a, state_b, batches, F.cross_entropy,
            epochs=epochs, steps=ste_steps, init=wm, seed=seed, optimizer=ste_optimizer,
            lr=ste_lr,
        )  # fmt: skip
        out["STE"] = res.perm
    return out
