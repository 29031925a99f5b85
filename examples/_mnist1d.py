"""MNIST-1D data and training helpers shared by ``examples/mnist1d_barrier.py`` and the tests.

The data are generated locally with the ``mnist1d`` package (no download): 40-sample 1-D
signals of the ten digit templates, 80/20 train/test split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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


def make_data(num_samples: int = 20_000, seed: int = 42) -> Data:
    """Generate MNIST-1D with ``num_samples`` signals (80% train), standardised by the
    training mean/std."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = int(num_samples)
    args.seed = int(seed)
    raw = make_dataset(args)
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
