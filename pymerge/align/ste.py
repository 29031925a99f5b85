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
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from pymerge._util.args import check_int, check_seed
from pymerge._util.progress import progress_bar
from pymerge.align.result import AlignmentHistory, AlignmentResult
from pymerge.align.weight_matching import weight_matching
from pymerge.spec.apply import Permutation, apply_permutation
from pymerge.spec.spec import PermutationSpec

__all__ = ["ste_matching"]


def _split_batch(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        f"each batch must be an (inputs, targets) pair, got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )


def ste_matching(
    spec: PermutationSpec,
    model: nn.Module,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    batches: Iterable[Any],
    loss_fn: Callable[[Tensor, Any], Tensor],
    *,
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
) -> AlignmentResult:
    """Learn a permutation of ``state_b`` with the straight-through estimator.

    Args:
        spec: permutation spec of the model.
        model: the architecture (only used through ``functional_call``; not modified).
        state_a, state_b: endpoint state dicts (same keys/shapes); not modified.
        batches: re-iterable of ``(inputs, targets)`` pairs (a list or a DataLoader);
            iterated ``epochs`` times, or until ``steps`` steps.
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar Tensor``.
        lr, momentum: SGD settings (``optimizer="adam"`` uses Adam with ``lr``; the paper's
            alternative is Adam 1e-3).
        epochs, steps: how long to train (``steps`` caps the total number of steps).
        init: warm start for the first weight matching (a permutation).
        seed: seed of the weight-matching group order.
        wm_max_iter: max sweeps of each weight matching.
        progress: a progress bar over steps.
        backend: assignment backend.

    Returns:
        :class:`AlignmentResult` with ``method="ste"``: ``perm`` is the permutation with
        the lowest midpoint loss seen (apply it to ``state_b``); ``history.objective`` the
        midpoint loss per step (lower is better), ``history.wm_iterations`` the
        weight-matching sweeps per step; ``extras``: ``best_loss``, ``best_step`` and
        ``state`` (the trained free weights θ̃, detached copies). ``converged`` is True
        when training ran every requested step.
    """
    if isinstance(spec, nn.Module):
        raise TypeError(
            "ste_matching takes the spec first: ste_matching(spec, model, state_a, state_b, "
            "batches, loss_fn, ...)"
        )
    if not isinstance(spec, PermutationSpec):
        raise TypeError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    epochs = check_int(epochs, "epochs", minimum=1)
    if steps is not None:
        steps = check_int(steps, "steps", minimum=1)
    seed = check_seed(seed)
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    free, a_detached = _free_weights(model, state_a)
    opt: torch.optim.Optimizer
    if optimizer == "sgd":
        opt = torch.optim.SGD(list(free.values()), lr=lr, momentum=momentum)
    else:
        opt = torch.optim.Adam(list(free.values()), lr=lr)

    history = AlignmentHistory()
    best_perm: Permutation | None = None
    best_loss, best_step = float("inf"), -1
    prev: AlignmentResult | Mapping[str, Tensor] | None = init
    total = (
        steps
        if steps is not None
        else (
            epochs * len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
        )
    )
    was_training = model.training
    try:
        with progress_bar(progress, total=total, desc="STE matching", unit="step") as bar:
            for x, y in _batches(batches, epochs, steps):
                t0 = time.perf_counter()
                current = {**a_detached, **{k: v.detach() for k, v in free.items()}}
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
                loss = _midpoint_loss(
                    model, spec, wm.perm, a_detached, free, state_b, x, y, loss_fn
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                value = float(loss.detach())
                if value < best_loss:
                    best_loss, best_step = value, history.iterations
                    best_perm = {g: p.clone() for g, p in wm.perm.items()}
                history.record(
                    value,
                    time.perf_counter() - t0,
                    solves=wm.history.total_solves,
                    wm_iterations=wm.history.iterations,
                )
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4g}", best=f"{best_loss:.4g}")
    finally:
        model.train(was_training)
    if best_perm is None:
        raise ValueError("batches is empty: STE matching needs at least one (inputs, targets)")
    return AlignmentResult(
        perm=best_perm,
        history=history,
        converged=steps is None or history.iterations >= steps,
        method="ste",
        extras={
            "best_loss": best_loss,
            "best_step": best_step,
            "state": {k: v.detach().clone() for k, v in free.items()},
        },
    )


def _free_weights(
    model: nn.Module, state_a: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The free weights θ̃ (the model's floating parameters, initialised at θ_A, requiring
    grad) and a detached view of ``state_a``."""
    param_names = {n for n, _ in model.named_parameters()}
    missing = sorted(param_names - set(state_a))
    if missing:
        raise ValueError(f"model parameter {missing[0]!r} is not in state_a")
    free = {
        k: state_a[k].detach().clone().requires_grad_(True)
        for k in state_a
        if k in param_names and torch.is_floating_point(state_a[k])
    }
    return free, {k: v.detach() for k, v in state_a.items()}


def _batches(batches: Iterable[Any], epochs: int, steps: int | None):
    """``(inputs, targets)`` of ``epochs`` passes over ``batches``, at most ``steps``."""
    done = 0
    for _ in range(epochs):
        for batch in batches:
            if steps is not None and done >= steps:
                return
            yield _split_batch(batch)
            done += 1


def _midpoint_loss(
    model: nn.Module,
    spec: PermutationSpec,
    perm: Permutation,
    a: Mapping[str, Tensor],
    free: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    x: Any,
    y: Any,
    loss_fn: Callable[[Tensor, Any], Tensor],
) -> Tensor:
    """Task loss at ½(θ_A + θ_ste), θ_ste = stopgrad(π(θ_B)) + (θ̃ − stopgrad(θ̃))."""
    proj = apply_permutation(spec, perm, state_b)
    mid: dict[str, Tensor] = {}
    for k, t in a.items():
        if k in free:
            ste = proj[k].detach().to(t.dtype) + (free[k] - free[k].detach())
            mid[k] = 0.5 * (t + ste)
        elif torch.is_floating_point(t):
            mid[k] = 0.5 * (t + proj[k].detach().to(t.dtype))
        else:
            mid[k] = t.clone()  # BN may bump num_batches_tracked in place
    loss = loss_fn(functional_call(model, mid, (x,), strict=False), y)
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise TypeError(
            "loss_fn must return a scalar Tensor, got "
            + (
                f"a tensor of shape {tuple(loss.shape)}"
                if isinstance(loss, Tensor)
                else type(loss).__name__
            )
        )
    return loss
