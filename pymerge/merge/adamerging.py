"""AdaMerging (Yang et al. 2024): task-arithmetic coefficients learned by entropy minimisation.

With a base ``theta_0`` and task vectors ``tau_k = theta_k - theta_0``, the merged model is

    layer-wise:  theta^l = theta_0^l + sum_k lambda_k^l tau_k^l      (one lambda per task
                                                                      and parameter tensor)
    task-wise:   theta   = theta_0   + sum_k lambda_k   tau_k

and the coefficients minimise the mean Shannon entropy of the merged model's softmax
predictions on **unlabelled** batches (``H = -sum_c p_c log p_c``, averaged over samples),
through ``torch.func.functional_call`` (the model itself is never modified).

Defaults as in the paper and its reference code: coefficients initialised to ``0.3``,
clamped to ``[0, 1]`` in every forward (the raw coefficients are free; the clamp passes no
gradient outside the range), Adam with ``lr = 1e-3`` and betas ``(0.9, 0.999)``, 500 steps,
one batch per step (cycling through ``batches``). With ``per_model=True`` each step sums
the entropies of one batch from each task's set (the paper's per-task unlabelled data;
there each task also has its own head, here every task shares the model's output).

Only floating parameters are learned; floating buffers (BatchNorm statistics) are combined
with the fixed initial coefficient ``init`` (``theta_0 + init * sum_k tau_k``), and
non-floating entries are copied from the base.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from pymerge._util.args import check_int
from pymerge._util.checks import check_state_pair
from pymerge._util.progress import progress_bar
from pymerge.merge import _data
from pymerge.merge.registry import Param, StateContext, register_method

__all__ = [
    "AdaMergingResult",
    "adamerging_merge",
    "learn_coefficients",
    "merge_model",
    "prediction_entropy",
]

_GRANULARITY = ("layer", "task")


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of ``softmax(logits)`` over every leading position."""
    if logits.dtype != torch.float64:
        logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


@dataclass
class AdaMergingResult:
    """Learned coefficients: ``coefficients`` ``[K, L]`` (clamped; ``L = 1`` task-wise),
    ``names`` the L parameter names (``["*"]`` task-wise), ``losses`` the entropy per step,
    ``state`` the merged state dict."""

    coefficients: torch.Tensor
    names: list[str]
    losses: list[float] = field(default_factory=list)
    state: dict[str, torch.Tensor] = field(default_factory=dict)


def _cycle(batch_sets: Sequence[Any], num_batches: int | None) -> Iterator[list[Any]]:
    """One batch from each set per step, restarting each set when it runs out."""
    iters = [iter(itertools.islice(iter(b), num_batches)) for b in batch_sets]
    while True:
        out = []
        for i, b in enumerate(batch_sets):
            try:
                out.append(next(iters[i]))
            except StopIteration:
                iters[i] = iter(itertools.islice(iter(b), num_batches))
                out.append(next(iters[i]))
        yield out


def _check_options(granularity, init, lr, steps, clamp) -> tuple:
    if granularity not in _GRANULARITY:
        raise ValueError(f"granularity must be one of {_GRANULARITY}, got {granularity!r}")
    for name, v in (("init", init), ("lr", lr)):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    steps = check_int(steps, "steps", minimum=0)
    if clamp is not None:
        lo, hi = (float(c) for c in clamp)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise ValueError(f"clamp must be (low, high) with low <= high, got {clamp!r}")
        clamp = (lo, hi)
    return steps, clamp


def learn_coefficients(
    states: Sequence[Mapping[str, torch.Tensor]],
    *,
    model: nn.Module,
    batches: Any,
    base: Mapping[str, torch.Tensor],
    granularity: str = "layer",
    init: float = 0.3,
    lr: float = 1e-3,
    steps: int = 500,
    clamp: tuple[float, float] | None = (0.0, 1.0),
    per_model: bool = False,
    num_batches: int | None = None,
    progress: bool = False,
) -> AdaMergingResult:
    """Learn the AdaMerging coefficients (module doc) and build the merged state dict.

    Args:
        states: K >= 1 fine-tuned state dicts of ``model``'s architecture.
        model: the architecture (data-aware: ``model`` and ``batches`` are required).
        batches: unlabelled inputs (targets, if present, are ignored); with ``per_model``
            K iterables.
        base: the pre-trained state dict ``theta_0`` (required).
        granularity: ``"layer"`` (one coefficient per task and parameter tensor) or
            ``"task"``.
        init, lr, steps, clamp: the optimisation (module doc); ``clamp=None``: no clamp.
        num_batches: cycle through at most this many batches of each set.
    """
    steps, clamp = _check_options(granularity, init, lr, steps, clamp)
    if base is None:
        raise ValueError("AdaMerging needs base= (the pre-trained state dict)")
    states, model, _ = _data.check_merge_inputs(states, model, "AdaMerging", min_models=1)
    if not isinstance(base, Mapping):
        raise TypeError(f"base must be a state dict, got {type(base).__name__}")
    check_state_pair(states[0], base, "states[0]", "base", same_dtype=True)
    _data.finite_states([base], ["base"])
    sets = _data.prepare_batches(
        batches, len(states), per_model=per_model, num_batches=num_batches, method="AdaMerging"
    )
    device = _data.state_device(states)
    work = _data.work_copy(model, device)
    learned = [k for k in _data.param_names(work) if k in base]
    base_d = {k: v.detach() for k, v in base.items()}
    taus = {k: torch.stack([s[k].detach() - base_d[k] for s in states]) for k in learned}
    k_models, n_layers = len(states), (len(learned) if granularity == "layer" else 1)
    dtype = torch.float64 if any(base_d[k].dtype == torch.float64 for k in learned) else None
    raw = torch.full(
        (k_models, n_layers), float(init), dtype=dtype, device=device, requires_grad=True
    )
    fixed = _fixed_entries(states, base_d, learned, float(init))
    opt = torch.optim.Adam([raw], lr=lr, betas=(0.9, 0.999))
    losses: list[float] = []

    def coeffs() -> torch.Tensor:
        return raw if clamp is None else raw.clamp(*clamp)

    def merged_params(lam: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for j, k in enumerate(learned):
            col = lam[:, j if granularity == "layer" else 0]
            shape = (k_models,) + (1,) * base_d[k].dim()
            out[k] = base_d[k] + (col.to(taus[k].dtype).view(shape) * taus[k]).sum(0)
        return out

    batches_iter = _cycle(sets if per_model else sets[:1], num_batches)
    with progress_bar(progress, total=steps, desc="AdaMerging", unit="step") as bar:
        for _ in range(steps):
            group = next(batches_iter)
            params = {**fixed, **merged_params(coeffs())}
            loss = sum(
                prediction_entropy(
                    functional_call(work, params, (_data.split_batch(b, device)[0],))
                )
                for b in group
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            bar.update(1)
    with torch.no_grad():
        lam = coeffs().detach().clone()
        state = _final_state(states, base_d, taus, learned, lam, fixed, granularity)
    names = learned if granularity == "layer" else ["*"]
    return AdaMergingResult(coefficients=lam, names=names, losses=losses, state=state)


def _fixed_entries(states, base, learned, init) -> dict[str, torch.Tensor]:
    """Entries that are not learned: floating ones by task arithmetic with ``init``."""
    out = {}
    for k, b in base.items():
        if k in learned:
            continue
        if b.is_floating_point():
            acc = b.double() + init * sum(s[k].double() - b.double() for s in states)
            out[k] = acc.to(b.dtype)
        else:
            out[k] = b.clone()
    return out


def _final_state(states, base, taus, learned, lam, fixed, granularity) -> dict[str, torch.Tensor]:
    out = {}
    for k in states[0]:
        if k not in learned:
            out[k] = fixed[k].clone()
            continue
        j = learned.index(k) if granularity == "layer" else 0
        acc = base[k].double()
        for i in range(len(states)):
            acc = acc + float(lam[i, j]) * taus[k][i].double()
        out[k] = acc.to(base[k].dtype)
    return out


def adamerging_merge(
    states: Sequence[Mapping[str, torch.Tensor]],
    *,
    model: nn.Module,
    batches: Any,
    base: Mapping[str, torch.Tensor],
    granularity: str = "layer",
    init: float = 0.3,
    lr: float = 1e-3,
    steps: int = 500,
    clamp: tuple[float, float] | None = (0.0, 1.0),
    per_model: bool = False,
    num_batches: int | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """The merged state dict of :func:`learn_coefficients` (same arguments)."""
    return learn_coefficients(
        states,
        model=model,
        batches=batches,
        base=base,
        granularity=granularity,
        init=init,
        lr=lr,
        steps=steps,
        clamp=clamp,
        per_model=per_model,
        num_batches=num_batches,
        progress=progress,
    ).state


@register_method(
    name="adamerging",
    params=(
        Param(
            "granularity",
            "layer",
            choices=_GRANULARITY,
            doc="coefficients per task and parameter tensor ('layer') or per task ('task')",
        ),
        Param("init", 0.3, doc="initial coefficient (the paper's prior)"),
        Param("lr", 1e-3, low=0.0, open_low=True, doc="Adam learning rate"),
        Param("steps", 500, low=0, doc="optimisation steps (one batch each)"),
        Param("clamp", True, doc="clamp the coefficients to [0, 1] in every forward"),
        Param("per_model", False, doc="batches is a list of K batch sets, one per task"),
        Param("num_batches", None, kind="int", low=1, nullable=True, doc="batches to cycle"),
    ),
    needs_data=True,
    base="required",
    min_models=1,
    reference="Yang et al. 2024, AdaMerging: Adaptive Model Merging for Multi-Task "
    "Learning (ICLR 2024, arXiv 2310.02575)",
)
def merge_model(ctx: StateContext) -> dict[str, torch.Tensor]:
    """AdaMerging: task arithmetic ``theta_0 + sum_k lambda_k tau_k`` with per-layer (or
    per-task) coefficients learned by minimising the prediction entropy on unlabelled
    ``batches`` (data-aware: ``model=``, ``batches=`` and ``base=``; see
    :mod:`pymerge.merge.adamerging`). Every parameter is a whole-model setting; the learned
    coefficients themselves: :func:`learn_coefficients`.
    """
    names = ("granularity", "init", "lr", "steps", "clamp", "per_model", "num_batches")
    g = _data.global_params(ctx, names, "adamerging")
    res = learn_coefficients(
        ctx.states,
        model=ctx.model,
        batches=ctx.batches,
        base=ctx.base,
        granularity=g["granularity"],
        init=g["init"],
        lr=g["lr"],
        steps=g["steps"],
        clamp=(0.0, 1.0) if g["clamp"] else None,
        per_model=g["per_model"],
        num_batches=g["num_batches"],
        progress=ctx.progress,
    )
    return {k: res.state[k] for k in ctx.keys}
