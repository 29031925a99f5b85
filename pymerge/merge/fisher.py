"""Fisher merging (Matena and Raffel 2022): a per-entry weighted average by diagonal Fisher.

    theta*[j] = sum_i lambda_i (F_i[j] + eps) theta_i[j] / sum_i lambda_i (F_i[j] + eps)

``F_i`` is the diagonal of the **empirical** Fisher of model ``i``, estimated from batches:
the mean over samples of the squared gradient of the sample's log-likelihood,
``F = (1/N) sum_n (d log p(y_n | x_n) / d theta)^2``. ``eps = 1e-6`` is added to every
Fisher (so equal Fishers, or all-zero ones, give the plain weighted average, and entries no
batch informs fall back to it). Buffers (BatchNorm statistics) and parameters without a
Fisher are averaged with the normalised ``lambda_i``; non-floating entries are copied from
the first model.

Estimator (``mode``):

* ``"per_sample"`` (default; the definition above): per-sample gradients with
  ``torch.func.vmap(torch.func.grad(...))`` over ``torch.func.functional_call``, in chunks;
  a model ``vmap`` cannot run falls back to one backward pass per sample (same numbers).
* ``"per_batch"``: ``F = (1/B) sum_b g_b^2`` with ``g_b`` the gradient of batch ``b``'s
  *mean* log-likelihood: one backward per batch (much cheaper), but it is the squared
  mean gradient -- about ``1/batch_size`` of the per-sample Fisher for uncorrelated
  sample gradients, and blind to their spread. The merge is invariant to a common scale of
  all Fishers except through ``eps``, so use equal batch sizes for all models.

Labels (``labels``): ``"auto"`` uses the batch's targets when batches are ``(inputs,
targets)`` and the model's own argmax prediction otherwise; ``"batch"`` requires targets;
``"predicted"`` always uses the argmax. The default log-likelihood is that of a softmax
classifier, ``-cross_entropy(logits, y)`` summed over the sample (``loss_fn(output, target)``
replaces the negative log-likelihood). Models run in eval mode (BatchNorm uses its running
statistics, dropout is off).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from pymerge._util.progress import track
from pymerge.merge import _data
from pymerge.merge.registry import Param, StateContext, register_method

__all__ = ["diagonal_fisher", "fisher_merge", "merge_model"]

_MODES = ("per_sample", "per_batch")
_LABELS = ("auto", "batch", "predicted")
_CHUNK_ELEMS = 1 << 24  # per-sample gradient entries held at once


def _nll(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits = output.reshape(-1, output.shape[-1])
    return F.cross_entropy(logits.float(), target.reshape(-1), reduction="sum")


def _check_options(mode: str, labels: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if labels not in _LABELS:
        raise ValueError(f"labels must be one of {_LABELS}, got {labels!r}")


def _targets(work, tensors, x, y, labels: str) -> torch.Tensor:
    if labels == "batch" and y is None:
        raise ValueError("labels='batch' needs (inputs, targets) batches")
    if y is not None and labels != "predicted":
        return y
    with torch.no_grad():
        out = functional_call(work, tensors, (x,))
    return out.argmax(-1)


def _per_sample_sq(work, params, buffers, x, y, loss_fn) -> dict[str, torch.Tensor]:
    """Sum over the batch of squared per-sample gradients."""

    def nll(p, x1, y1):
        out = functional_call(work, (p, buffers), (x1.unsqueeze(0),))
        return loss_fn(out, y1.unsqueeze(0))

    n = x.shape[0]
    numel = sum(p.numel() for p in params.values())
    chunk = max(1, _CHUNK_ELEMS // max(numel, 1))
    acc = {k: torch.zeros(p.shape, dtype=torch.float64, device=p.device) for k, p in params.items()}
    per_sample = vmap(grad(nll), in_dims=(None, 0, 0))
    for i in range(0, n, chunk):
        xs, ys = x[i : i + chunk], y[i : i + chunk]
        try:
            g = per_sample(params, xs, ys)
            for k in acc:
                acc[k] += g[k].double().square().sum(0)
        except (RuntimeError, NotImplementedError):  # an op vmap cannot batch: loop
            for j in range(xs.shape[0]):
                p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
                gs = torch.autograd.grad(nll(p, xs[j], ys[j]), list(p.values()), allow_unused=True)
                for k, gk in zip(p, gs, strict=True):
                    if gk is not None:
                        acc[k] += gk.double().square()
    return acc


def _batch_sq(work, params, buffers, x, y, loss_fn) -> dict[str, torch.Tensor]:
    p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    out = functional_call(work, (p, buffers), (x,))
    loss = loss_fn(out, y) / x.shape[0]
    gs = torch.autograd.grad(loss, list(p.values()), allow_unused=True)
    return {
        k: (torch.zeros_like(v, dtype=torch.float64) if g is None else g.double().square())
        for (k, v), g in zip(p.items(), gs, strict=True)
    }


def diagonal_fisher(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    state: Mapping[str, torch.Tensor] | None = None,
    mode: str = "per_sample",
    labels: str = "auto",
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    num_batches: int | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of ``model`` (at ``state`` if given) over ``batches``.

    Args:
        model: the network; never modified (a deep copy runs, in eval mode).
        batches: iterable of inputs or ``(inputs, targets)``; inputs are single tensors with
            the sample axis first.
        state: evaluate at these weights (``functional_call``) instead of the model's own.
        mode, labels, loss_fn: see the module doc.
        num_batches: use at most this many batches.

    Returns:
        ``parameter name -> float64 tensor`` of the parameter's shape, for every floating
        parameter of the model (mean over samples, or over batches for ``"per_batch"``).
    """
    _check_options(mode, labels)
    model = _data.check_model(model, "diagonal_fisher")
    sets = _data.prepare_batches(
        batches, 1, per_model=False, num_batches=num_batches, method="diagonal_fisher"
    )
    src = dict(model.state_dict()) if state is None else dict(state)
    return _fisher(model, src, sets[0], mode, labels, loss_fn or _nll, num_batches, progress)


def _fisher(model, state, batches, mode, labels, loss_fn, num_batches, progress):
    device = next(iter(state.values())).device if state else None
    work = _data.work_copy(model, device)
    names = set(_data.param_names(work))
    params = {k: v.detach() for k, v in state.items() if k in names}
    buffers = {k: v.detach() for k, v in state.items() if k not in names}
    acc = {k: torch.zeros(p.shape, dtype=torch.float64, device=p.device) for k, p in params.items()}
    count = 0
    it = _data.iter_batches(batches, num_batches)
    for batch in track(it, progress, desc=f"Fisher ({mode})", unit="batch"):
        x, y = _data.split_batch(batch, device)
        if not isinstance(x, torch.Tensor):
            raise TypeError("Fisher merging needs tensor inputs (the sample axis first)")
        if x.shape[0] == 0:
            continue
        y = _targets(work, (params, buffers), x, y, labels)
        if mode == "per_sample":
            sq = _per_sample_sq(work, params, buffers, x, y, loss_fn)
            count += x.shape[0]
        else:
            sq = _batch_sq(work, params, buffers, x, y, loss_fn)
            count += 1
        for k in acc:
            acc[k] += sq[k]
    if count == 0:
        raise ValueError("batches hold no samples: Fisher merging needs data")
    return {k: v / count for k, v in acc.items()}


def _check_fishers(fishers: Any, states: Sequence[Mapping[str, torch.Tensor]]) -> list[dict]:
    if isinstance(fishers, Mapping) or not isinstance(fishers, Sequence):
        raise TypeError("fishers must be a sequence of K dicts (key -> Fisher tensor)")
    if len(fishers) != len(states):
        raise ValueError(f"got {len(fishers)} fishers for {len(states)} state dicts")
    keys = set(fishers[0])
    out = []
    for i, f in enumerate(fishers):
        if set(f) != keys:
            k = sorted(set(f) ^ keys)[0]
            raise ValueError(f"Fisher key {k!r} is in one of fishers[0], fishers[{i}] only")
        for k, v in f.items():
            if k not in states[i]:
                raise ValueError(f"fishers[{i}] has key {k!r}, which the states lack")
            if tuple(v.shape) != tuple(states[i][k].shape):
                raise ValueError(
                    f"fishers[{i}][{k!r}] has shape {tuple(v.shape)}, the weight "
                    f"{tuple(states[i][k].shape)}"
                )
            if not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
                raise ValueError(f"fishers[{i}][{k!r}] must be finite and >= 0")
        out.append(dict(f))
    return out


def fisher_merge(
    states: Sequence[Mapping[str, torch.Tensor]],
    *,
    model: nn.Module | None = None,
    batches: Any = None,
    weights: Sequence[float] | None = None,
    fishers: Sequence[Mapping[str, torch.Tensor]] | None = None,
    mode: str = "per_sample",
    labels: str = "auto",
    eps: float = 1e-6,
    per_model: bool = False,
    num_batches: int | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Fisher-weighted average of K state dicts (formula in the module doc).

    Args:
        states: K >= 1 state dicts of ``model``'s architecture (never modified).
        model: the architecture (data-aware: needs ``model`` and ``batches``).
        batches: iterable of batches shared by all models, or with ``per_model=True`` a
            sequence of K iterables (model ``i``'s Fisher from ``batches[i]``, e.g. each
            model's own task data, as in the paper).
        weights: ``lambda_i`` (finite, >= 0, not all 0); default all 1.
        fishers: precomputed Fishers (K dicts ``key -> tensor``, e.g. from
            :func:`diagonal_fisher`); then ``model``/``batches`` are not needed.
        mode, labels, loss_fn: the estimator (module doc).
        eps: added to every Fisher (default 1e-6), >= 0.
        num_batches: at most this many batches per model.

    Returns:
        A new state dict (float64 math, each tensor cast back to its dtype).
    """
    _check_options(mode, labels)
    if not (isinstance(eps, int | float) and not isinstance(eps, bool)) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    if fishers is None:
        states, model, w = _data.check_merge_inputs(
            states, model, "Fisher merging", min_models=1, weights=weights
        )
        sets = _data.prepare_batches(
            batches,
            len(states),
            per_model=per_model,
            num_batches=num_batches,
            method="Fisher merging",
        )
        fs = [
            _fisher(model, s, b, mode, labels, loss_fn or _nll, num_batches, progress)
            for s, b in zip(states, sets, strict=True)
        ]
    else:
        states = _data.check_states_list(states, "Fisher merging", 1)
        w = _data.check_weights(weights, len(states))
        _data.finite_states(states)
        fs = _check_fishers(fishers, states)
    return _combine(states, fs, lambda key: w, float(eps))


def _combine(states, fishers, weights_of, eps) -> dict[str, torch.Tensor]:
    out = {}
    for key, ref in states[0].items():
        tensors = [s[key] for s in states]
        w = weights_of(key)
        if key not in fishers[0] or not ref.is_floating_point():
            out[key] = _data.weighted_average(tensors, w)
            continue
        num = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
        den = torch.zeros_like(num)
        for t, f, wi in zip(tensors, fishers, w, strict=True):
            fw = (f[key].to(num.device, torch.float64) + eps) * wi
            num += fw * t.double()
            den += fw
        # den == 0 only where every weighted Fisher is 0 (eps = 0): plain average there
        avg = _data.weighted_average(tensors, w).double()
        out[key] = torch.where(den > 0, num / den.clamp_min(1e-300), avg).to(ref.dtype)
    return out


@register_method(
    name="fisher",
    params=(
        Param("weight", 1.0, per_model=True, low=0.0, doc="lambda_i, the model's weight"),
        Param("mode", "per_sample", choices=_MODES, doc="squared gradients per sample or batch"),
        Param("labels", "auto", choices=_LABELS, doc="targets of the batches or predictions"),
        Param("eps", 1e-6, low=0.0, doc="added to every Fisher"),
        Param("per_model", False, doc="batches is a list of K batch sets, one per model"),
        Param("num_batches", None, kind="int", low=1, nullable=True, doc="batches to use"),
    ),
    needs_data=True,
    min_models=1,
    reference="Matena and Raffel 2022, Merging Models with Fisher-Weighted Averaging "
    "(arXiv 2111.09832)",
)
def merge_model(ctx: StateContext) -> dict[str, torch.Tensor]:
    """Fisher merging: ``sum_i lambda_i (F_i + eps) theta_i / sum_i lambda_i (F_i + eps)``
    with each model's diagonal empirical Fisher from ``batches`` (data-aware: ``model=`` and
    ``batches=``; see :mod:`pymerge.merge.fisher`).

    ``weight`` may differ per key (filter overrides); the other parameters are whole-model
    settings. Precomputed Fishers and a custom ``loss_fn``: :func:`fisher_merge`.
    """
    g = _data.global_params(ctx, ("mode", "labels", "eps", "per_model", "num_batches"), "fisher")
    w_by_key = _data.per_model_weights(ctx)
    states, model, _ = _data.check_merge_inputs(
        ctx.states, ctx.model, "Fisher merging", min_models=1
    )
    sets = _data.prepare_batches(
        ctx.batches,
        len(states),
        per_model=g["per_model"],
        num_batches=g["num_batches"],
        method="Fisher merging",
    )
    fs = [
        _fisher(model, s, b, g["mode"], g["labels"], _nll, g["num_batches"], ctx.progress)
        for s, b in zip(states, sets, strict=True)
    ]
    ones = [1.0] * len(states)
    merged = _combine(states, fs, lambda key: w_by_key.get(key, ones), float(g["eps"]))
    return {k: merged[k] for k in ctx.keys}
