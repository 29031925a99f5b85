"""Shared checks and plumbing of the data-aware merges (Fisher, RegMean, AdaMerging, ZipIt!).

Everything a data-aware method needs before it starts working: the template ``model``
matches the K state dicts (keys and shapes, :func:`pymerge._util.checks.check_state_pair`),
the states agree with each other (:func:`pymerge._util.checks.check_states`), every
floating weight is finite, the per-model weights are usable, and ``batches`` holds at least
one batch (one set shared by all models, or one set per model with ``per_model=True``).

The template model is never modified: methods run a deep copy of it (in eval mode) with
each state's tensors swapped in by ``torch.func.functional_call``.
"""

from __future__ import annotations

import copy
import itertools
import math
import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pymerge._util.checks import check_state_pair, check_states
from pymerge.align import _hooks

StateDict = Mapping[str, torch.Tensor]

__all__ = [
    "check_merge_inputs",
    "global_params",
    "per_model_weights",
    "check_model",
    "check_weights",
    "finite_states",
    "prepare_batches",
    "split_batch",
    "work_copy",
]


def check_model(model: Any, method: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{method} needs model= (an nn.Module of the states' architecture), "
            f"got {type(model).__name__}"
        )
    return model


def check_states_list(states: Any, method: str, min_models: int) -> list[StateDict]:
    if isinstance(states, Mapping) or not isinstance(states, Sequence):
        raise TypeError(f"{method}: states must be a sequence of state dicts")
    states = list(states)
    if len(states) < min_models:
        raise ValueError(f"{method} needs at least {min_models} state dicts, got {len(states)}")
    names = [f"states[{i}]" for i in range(len(states))]
    check_states(states, names)
    return states


def finite_states(states: Sequence[StateDict], names: Sequence[str] | None = None) -> None:
    """ValueError naming the first state dict and key holding a NaN/inf weight."""
    names = names or [f"states[{i}]" for i in range(len(states))]
    for s, name in zip(states, names, strict=True):
        for k, v in s.items():
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise ValueError(f"{name}[{k!r}] has non-finite weights")


def check_weights(weights: Any, k: int, name: str = "weights") -> list[float]:
    """K finite non-negative floats with a positive sum (default: K ones), not normalised."""
    if weights is None:
        return [1.0] * k
    if isinstance(weights, torch.Tensor):
        weights = weights.tolist()
    if isinstance(weights, str) or not isinstance(weights, Iterable):
        raise TypeError(f"{name} must be a sequence of {k} numbers, got {weights!r}")
    w = list(weights)
    if len(w) != k:
        raise ValueError(f"got {len(w)} {name} for {k} state dicts")
    for i, x in enumerate(w):
        if isinstance(x, bool) or not isinstance(x, numbers.Real):
            raise TypeError(f"{name}[{i}] must be a number, got {x!r}")
        if not math.isfinite(float(x)):
            raise ValueError(f"{name}[{i}] is not finite: {x}")
        if x < 0:
            raise ValueError(f"{name}[{i}] is negative: {x}")
    if sum(w) <= 0:
        raise ValueError(f"{name} sum to 0")
    return [float(x) for x in w]


def _peek(batches: Iterable[Any], what: str, method: str) -> None:
    if next(iter(batches), None) is None:
        raise ValueError(f"{what} is empty: {method} needs at least one batch of data")


def prepare_batches(
    batches: Any, k: int, *, per_model: bool, num_batches: int | None, method: str
) -> list[Iterable[Any]]:
    """K re-iterable batch sets (the same object K times unless ``per_model``), each
    checked to hold at least one batch."""
    if batches is None:
        raise TypeError(f"{method} needs batches= (an iterable of input batches)")
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    ):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    if per_model:
        if isinstance(batches, torch.Tensor) or not isinstance(batches, Sequence):
            raise TypeError("per_model=True needs batches as a sequence of K batch iterables")
        if len(batches) != k:
            raise ValueError(f"per_model=True: got {len(batches)} batch sets for {k} models")
        sets = [_hooks.reiterable(b, num_batches) for b in batches]
        for i, b in enumerate(sets):
            _peek(b, f"batches[{i}]", method)
        return sets
    one = _hooks.reiterable(batches, num_batches)
    _peek(one, "batches", method)
    return [one] * k


def iter_batches(batches: Iterable[Any], num_batches: int | None) -> Iterator[Any]:
    return itertools.islice(iter(batches), num_batches)


def split_batch(batch: Any, device: torch.device | None) -> tuple[Any, Any]:
    """``(inputs, targets or None)`` of one batch, moved to ``device``."""
    x = _hooks.batch_input(batch)
    y = None
    if not isinstance(batch, torch.Tensor | Mapping) and len(batch) > 1:
        y = batch[1]
    return _hooks.to_device(x, device), _hooks.to_device(y, device)


def check_merge_inputs(
    states: Any,
    model: Any,
    method: str,
    *,
    min_models: int,
    weights: Any = None,
) -> tuple[list[StateDict], nn.Module, list[float]]:
    """The common checks: states agree, the model matches them, weights are finite and
    non-negative, no weight is NaN/inf. Returns the states (a list), the model, weights."""
    model = check_model(model, method)
    states = check_states_list(states, method, min_models)
    check_state_pair(model.state_dict(), states[0], "model", "states[0]")
    w = check_weights(weights, len(states))
    finite_states(states)
    return states, model, w


def work_copy(model: nn.Module, device: torch.device | None = None) -> nn.Module:
    """A deep copy of the template in eval mode, without gradients on its own parameters."""
    work = copy.deepcopy(model)
    if device is not None:
        work = work.to(device)
    work.eval()
    for p in work.parameters():
        p.requires_grad_(False)
    return work


def state_device(states: Sequence[StateDict]) -> torch.device:
    for v in states[0].values():
        return v.device
    return torch.device("cpu")


def param_names(model: nn.Module) -> list[str]:
    """Trainable parameter names (each tensor once), in ``named_parameters`` order."""
    return [k for k, p in model.named_parameters() if p.is_floating_point()]


def weighted_average(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum_i w_i t_i / sum_i w_i`` in float64, cast back (non-floating: the first's clone)."""
    first = tensors[0]
    if not first.is_floating_point():
        return first.clone()
    total = math.fsum(weights)
    acc = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
    for t, w in zip(tensors, weights, strict=True):
        acc.add_(t.double(), alpha=w / total)
    return acc.to(first.dtype)


def global_params(ctx: Any, names: Sequence[str], method: str) -> dict[str, Any]:
    """The values of whole-model parameters from a registry ``StateContext``: the same at
    every key (a filter override giving one key another value is refused, naming both)."""
    info_params = {p.name: p.default for p in ctx.plan.info.params}
    if not ctx.keys:
        return {n: info_params[n] for n in names}
    first_key = ctx.keys[0]
    first = ctx.params[first_key]
    for k in ctx.keys[1:]:
        for n in names:
            if ctx.params[k][n] != first[n]:
                raise ValueError(
                    f"{method}: parameter {n!r} is a whole-model setting and must be the same "
                    f"for every key; key {k!r} has {ctx.params[k][n]!r}, key {first_key!r} "
                    f"{first[n]!r}"
                )
    return {n: first[n] for n in names}


def per_model_weights(ctx: Any, name: str = "weight") -> dict[str, list[float]]:
    """key -> the K resolved per-model weights (checked: finite, >= 0, positive sum)."""
    return {
        k: check_weights(ctx.params[k][name], len(ctx.states), f"{name} (key {k!r})")
        for k in ctx.keys
    }
