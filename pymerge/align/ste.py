"""Straight-through estimator matching (Git Re-Basin, Ainsworth et al. 2022, Alg. 3).

A free copy θ̃ (initialised at θ_A) is trained so that the midpoint of θ_A and the
projection π(θ_B) of θ_B onto θ̃'s basin has low task loss. Each step:

    π      ← weight_matching(θ̃, θ_B, init=π_prev)          (warm-started)
    θ_ste  = stopgrad(π(θ_B)) + (θ̃ − stopgrad(θ̃))         (forward uses π(θ_B))
    loss   = loss_fn(f(½(θ_A + θ_ste); x), y)               (torch.func.functional_call)
    step on θ̃; keep the π with the lowest loss.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from pymerge.align.weight_matching import WeightMatchingResult, weight_matching
from pymerge.spec import PermutationSpec, apply_permutation

Permutation = dict[str, Tensor]

__all__ = ["SteHistory", "SteResult", "ste_matching"]


@dataclass
class SteHistory:
    """Per step: the task loss at the midpoint, the weight-matching sweeps, wall time."""

    loss: list[float] = field(default_factory=list)
    wm_iterations: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    best_step: int = -1


@dataclass
class SteResult:
    """``perm``: the permutation with the lowest midpoint loss seen; ``best_loss`` its loss;
    ``state``: the trained free weights θ̃ (detached copies)."""

    perm: Permutation
    best_loss: float
    history: SteHistory
    state: dict[str, Tensor]


def _split_batch(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        f"each batch must be an (inputs, targets) pair, got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )


def ste_matching(
    model: nn.Module,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    batches: Iterable[Any],
    loss_fn: Callable[[Tensor, Any], Tensor],
    *,
    spec: PermutationSpec,
    lr: float = 1e-2,
    momentum: float = 0.9,
    optimizer: str = "sgd",
    epochs: int = 1,
    steps: int | None = None,
    init: Mapping[str, Tensor] | None = None,
    seed: int = 0,
    wm_max_iter: int = 100,
    progress: bool = False,
    backend: str | None = None,
) -> SteResult:
    """Learn a permutation of ``state_b`` with the straight-through estimator.

    Args:
        model: the architecture (only used through ``functional_call``; not modified).
        state_a, state_b: endpoint state dicts (same keys/shapes); not modified.
        batches: re-iterable of ``(inputs, targets)`` pairs (a list or a DataLoader);
            iterated ``epochs`` times, or until ``steps`` steps.
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar Tensor``.
        spec: permutation spec of the model.
        lr, momentum: SGD settings (``optimizer="adam"`` uses Adam with ``lr``; the paper's
            alternative is Adam 1e-3).
        epochs, steps: how long to train (``steps`` caps the total number of steps).
        init: warm start for the first weight matching (a Permutation).
        seed: seed of the weight matching group order.
        wm_max_iter: max sweeps of each weight matching.
        progress: tqdm bar over steps.
        backend: assignment backend.

    Returns:
        :class:`SteResult`; ``perm`` is the lowest-loss π (apply it to ``state_b``).
    """
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1 or None, got {steps}")
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    param_names = {n for n, _ in model.named_parameters()}
    missing = sorted(param_names - set(state_a))
    if missing:
        raise ValueError(f"model parameter {missing[0]!r} is not in state_a")
    # free weights θ̃: the model's parameters, initialised at θ_A
    free = {
        k: state_a[k].detach().clone().requires_grad_(True)
        for k in state_a
        if k in param_names and torch.is_floating_point(state_a[k])
    }
    a_detached = {k: v.detach() for k, v in state_a.items()}
    opt: torch.optim.Optimizer
    if optimizer == "sgd":
        opt = torch.optim.SGD(list(free.values()), lr=lr, momentum=momentum)
    else:
        opt = torch.optim.Adam(list(free.values()), lr=lr)

    history = SteHistory()
    best_perm: Permutation | None = None
    best_loss = float("inf")
    prev: WeightMatchingResult | Mapping[str, Tensor] | None = init
    total = None
    if steps is not None:
        total = steps
    elif hasattr(batches, "__len__"):
        total = epochs * len(batches)  # type: ignore[arg-type]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="STE matching", unit="step")
    step = 0
    was_training = model.training
    try:
        for _ in range(epochs):
            for batch in batches:
                if steps is not None and step >= steps:
                    break
                t0 = time.perf_counter()
                x, y = _split_batch(batch)
                current = dict(a_detached)
                current.update({k: v.detach() for k, v in free.items()})
                wm = weight_matching(
                    spec,
                    current,
                    state_b,
                    max_iter=wm_max_iter,
                    init=prev,
                    seed=seed,
                    backend=backend,
                )
                prev = wm
                proj = apply_permutation(spec, wm.perm, state_b)
                mid: dict[str, Tensor] = {}
                for k, a in a_detached.items():
                    if k in free:
                        p = proj[k].detach().to(a.dtype)
                        ste = p + (free[k] - free[k].detach())
                        mid[k] = 0.5 * (a + ste)
                    elif torch.is_floating_point(a):
                        mid[k] = 0.5 * (a + proj[k].detach().to(a.dtype))
                    else:
                        mid[k] = a.clone()  # BN may bump num_batches_tracked in place
                out = functional_call(model, mid, (x,), strict=False)
                loss = loss_fn(out, y)
                if not isinstance(loss, Tensor) or loss.dim() != 0:
                    raise TypeError("loss_fn must return a scalar Tensor")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                value = float(loss.detach())
                if value < best_loss:
                    best_loss = value
                    best_perm = {g: p.clone() for g, p in wm.perm.items()}
                    history.best_step = step
                history.loss.append(value)
                history.wm_iterations.append(wm.history.iterations)
                history.seconds.append(time.perf_counter() - t0)
                step += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{value:.4g}", best=f"{best_loss:.4g}")
            if steps is not None and step >= steps:
                break
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    if best_perm is None:
        raise ValueError("batches is empty: STE matching needs at least one (inputs, targets)")
    return SteResult(
        perm=best_perm,
        best_loss=best_loss,
        history=history,
        state={k: v.detach().clone() for k, v in free.items()},
    )
