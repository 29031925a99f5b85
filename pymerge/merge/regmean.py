"""RegMean (Jin et al. 2023): merge every ``nn.Linear`` by regression on its inputs' Gram matrix.

For each Linear layer with weight ``W_i`` (``[out, in]``) in model ``i``, the Gram matrix of
the layer's inputs ``G_i = X_i^T X_i / N_i`` is streamed over the batches with
:class:`pymerge.ops.CorrelationAccumulator` in float64 (``.gram()``: shifted sums merged
with Chan et al.'s update, so no ``N * mean^2`` term is formed). Then

    G~_i = alpha * G_i + (1 - alpha) * diag(G_i)       (off-diagonals scaled by alpha)
    W*^T = (sum_i lambda_i G~_i)^-1  sum_i lambda_i G~_i W_i^T

solved in float64 with ``torch.linalg.solve``. ``alpha = 0.9`` by default, as in the paper
(``alpha = 1``: the exact least-squares merge; ``alpha = 0``: a per-input-feature weighted
average). With ``alpha < 1`` every input feature that is ever non-zero makes the system
positive definite; the system is singular when an input feature is zero on all data (a
dead ReLU upstream) or, with ``alpha = 1``, when there are fewer samples than features.

**Regularisation.** When ``A = sum_i lambda_i G~_i`` has its smallest eigenvalue at most
``1e-10`` times its largest (or is zero), the solve becomes
``(A + delta I) W*^T = B + delta W_avg^T`` with ``delta = 1e-8 * max(lambda_max(A), 1e-300)``:
Tikhonov regularisation toward the plain weighted average ``W_avg``, so directions no data
informs (e.g. the rows of dead input features) get the average and the rest stays within
about ``1e-8`` relative of the least-squares solution.

Biases (``bias``): ``"average"`` (default, as in the paper: "other parameters averaged")
or ``"augment"``: the input is extended by a constant 1 (``G`` gains the input mean as its
last row/column) and ``[W | b]`` is merged as one matrix: the exact joint least-squares
merge of the affine layers. Every other entry (non-Linear parameters, buffers) is the
``lambda``-weighted average. Linear layers that never run (e.g. ``MultiheadAttention``'s
``out_proj``, used through its weight) are averaged too.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from pymerge._util.args import check_fraction
from pymerge._util.progress import track
from pymerge.merge import _data
from pymerge.merge.registry import Param, StateContext, register_method
from pymerge.ops import CorrelationAccumulator

__all__ = ["linear_grams", "merge_model", "regmean_merge", "solve_regmean"]

_RCOND = 1e-10
_RIDGE = 1e-8


def _linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _grams(model, state, batches, num_batches, progress) -> dict[str, CorrelationAccumulator]:
    """Run ``model`` at ``state`` over the batches; one float64 accumulator per Linear."""
    device = _data.state_device([state])
    work = _data.work_copy(model, device)
    accs: dict[str, CorrelationAccumulator] = {}
    handles = []

    def make_hook(name: str, d: int):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            if x.dim() < 2:
                x = x.unsqueeze(0)
            if name not in accs:
                accs[name] = CorrelationAccumulator(d, dtype=torch.float64)
            try:
                accs[name].update(x, feature_dim=-1)
            except ValueError as e:
                raise ValueError(f"RegMean: the input of Linear {name!r}: {e}") from None

        return hook

    try:
        for name, m in _linear_modules(work).items():
            handles.append(m.register_forward_pre_hook(make_hook(name, m.in_features)))
        tensors = {k: v.detach() for k, v in state.items()}
        with torch.no_grad():
            for batch in track(
                _data.iter_batches(batches, num_batches), progress, desc="RegMean Grams"
            ):
                x, _ = _data.split_batch(batch, device)
                functional_call(work, tensors, (x,))
    finally:
        for h in handles:
            h.remove()
    return accs


def linear_grams(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    state: Mapping[str, torch.Tensor] | None = None,
    bias: bool = False,
    num_batches: int | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """``module name -> X^T X / N`` (float64) of every ``nn.Linear``'s inputs over the batches;
    with ``bias=True`` the input is extended by a constant 1 (``[in + 1, in + 1]``)."""
    model = _data.check_model(model, "linear_grams")
    sets = _data.prepare_batches(
        batches, 1, per_model=False, num_batches=num_batches, method="linear_grams"
    )
    src = dict(model.state_dict()) if state is None else dict(state)
    accs = _grams(model, src, sets[0], num_batches, progress)
    return {n: _gram_of(acc, bias) for n, acc in accs.items()}


def _gram_of(acc: CorrelationAccumulator, bias: bool) -> torch.Tensor:
    g = acc.gram()
    if not bias:
        return g
    mean = acc.mean_a
    d = g.shape[0]
    out = g.new_empty(d + 1, d + 1)
    out[:d, :d] = g
    out[:d, d] = mean
    out[d, :d] = mean
    out[d, d] = 1.0
    return out


def _reduce(g: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * G + (1 - alpha) * diag(G)."""
    return g * alpha + torch.diag(torch.diagonal(g)) * (1.0 - alpha)


def solve_regmean(
    grams: Sequence[torch.Tensor], mats: Sequence[torch.Tensor], weights: Sequence[float]
) -> torch.Tensor:
    """``W*`` from reduced Grams ``G~_i`` and weights ``W_i`` (``[out, in]``), float64, with
    the regularisation of the module doc."""
    a = sum(w * g for w, g in zip(weights, grams, strict=True))
    b = sum(w * (g @ m.double().T) for w, g, m in zip(weights, grams, mats, strict=True))
    eig = torch.linalg.eigvalsh(a)
    top = float(eig[-1].clamp_min(0))
    if float(eig[0]) <= _RCOND * top or top == 0:
        total = sum(weights)
        avg = sum((w / total) * m.double() for w, m in zip(weights, mats, strict=True))
        delta = _RIDGE * max(top, 1e-300)
        a = a + delta * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        b = b + delta * avg.T
    return torch.linalg.solve(a, b).T


def regmean_merge(
    states: Sequence[Mapping[str, torch.Tensor]],
    *,
    model: nn.Module,
    batches: Any,
    weights: Sequence[float] | None = None,
    alpha: float = 0.9,
    bias: str = "average",
    per_model: bool = False,
    num_batches: int | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """RegMean merge of K state dicts of ``model`` (formula in the module doc).

    Args:
        states: K >= 1 state dicts (never modified).
        model: the architecture (data-aware: ``model`` and ``batches`` are required); never
            modified.
        batches: iterable of inputs or ``(inputs, targets)`` shared by all models, or with
            ``per_model=True`` K iterables (model ``i``'s Grams from ``batches[i]``: each
            model's own training data, as in the paper).
        weights: ``lambda_i`` scaling each model's Grams (and the averages); default 1.
        alpha: off-diagonal scale in ``[0, 1]`` (default 0.9, the paper's).
        bias: ``"average"`` or ``"augment"`` (module doc).
        num_batches: at most this many batches per model.

    Returns:
        A new state dict (each tensor in its input dtype).
    """
    alpha = check_fraction(alpha, "alpha")
    if bias not in ("average", "augment"):
        raise ValueError(f"bias must be 'average' or 'augment', got {bias!r}")
    states, model, w = _data.check_merge_inputs(
        states, model, "RegMean", min_models=1, weights=weights
    )
    sets = _data.prepare_batches(
        batches, len(states), per_model=per_model, num_batches=num_batches, method="RegMean"
    )
    return _regmean(
        states, model, sets, lambda key: w, lambda key: alpha, bias, num_batches, progress
    )


def _regmean(states, model, sets, weights_of, alpha_of, bias, num_batches, progress):
    linears = _linear_modules(model)
    accs = [_grams(model, s, b, num_batches, progress) for s, b in zip(states, sets, strict=True)]
    out: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    for name, mod in linears.items():
        wkey = f"{name}.weight" if name else "weight"
        bkey = f"{name}.bias" if name else "bias"
        has_bias = mod.bias is not None and bkey in states[0]
        if any(name not in a for a in accs):
            warnings.warn(
                f"RegMean: Linear {name!r} never ran on the batches; its weights are averaged",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        augment = bias == "augment" and has_bias
        w = weights_of(wkey)
        grams = [_reduce(_gram_of(a[name], augment), alpha_of(wkey)) for a in accs]
        mats = [s[wkey] for s in states]
        if augment:
            mats = [
                torch.cat([m, s[bkey].unsqueeze(1)], dim=1)
                for m, s in zip(mats, states, strict=True)
            ]
        merged = solve_regmean(grams, mats, w)
        dtype = states[0][wkey].dtype
        if augment:
            out[wkey] = merged[:, :-1].to(dtype).contiguous()
            out[bkey] = merged[:, -1].to(states[0][bkey].dtype).contiguous()
            done.add(bkey)
        else:
            out[wkey] = merged.to(dtype).contiguous()
        done.add(wkey)
    return {
        k: out[k] if k in done else _data.weighted_average([s[k] for s in states], weights_of(k))
        for k in states[0]
    }


@register_method(
    name="regmean",
    params=(
        Param("weight", 1.0, per_model=True, low=0.0, doc="lambda_i, scales model i's Grams"),
        Param("alpha", 0.9, low=0.0, high=1.0, doc="scale of the Grams' off-diagonals"),
        Param(
            "bias",
            "average",
            choices=("average", "augment"),
            doc="biases averaged or solved with the weights (input extended by 1)",
        ),
        Param("per_model", False, doc="batches is a list of K batch sets, one per model"),
        Param("num_batches", None, kind="int", low=1, nullable=True, doc="batches to use"),
    ),
    needs_data=True,
    min_models=1,
    reference="Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language "
    "Models (RegMean, arXiv 2212.09849)",
)
def merge_model(ctx: StateContext) -> dict[str, torch.Tensor]:
    """RegMean: every ``nn.Linear`` solved from its inputs' Gram matrices,
    ``W*^T = (sum_i lambda_i G~_i)^-1 sum_i lambda_i G~_i W_i^T``, everything else averaged
    (data-aware: ``model=`` and ``batches=``; see :mod:`pymerge.merge.regmean`).

    ``weight`` and ``alpha`` may differ per key (``alpha`` is read at each Linear's weight
    key); ``bias``, ``per_model`` and ``num_batches`` are whole-model settings.
    """
    g = _data.global_params(ctx, ("bias", "per_model", "num_batches"), "regmean")
    w_by_key = _data.per_model_weights(ctx)
    states, model, _ = _data.check_merge_inputs(ctx.states, ctx.model, "RegMean", min_models=1)
    sets = _data.prepare_batches(
        ctx.batches,
        len(states),
        per_model=g["per_model"],
        num_batches=g["num_batches"],
        method="RegMean",
    )
    ones = [1.0] * len(states)
    merged = _regmean(
        states,
        model,
        sets,
        lambda key: w_by_key.get(key, ones),
        lambda key: ctx.params[key]["alpha"] if key in ctx.params else 0.9,
        g["bias"],
        g["num_batches"],
        ctx.progress,
    )
    return {k: merged[k] for k in ctx.keys}
