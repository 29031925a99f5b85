"""REPAIR (Jordan et al. 2022) and BatchNorm statistics reset for merged models.

An interpolated network ``(1 - alpha) * A + alpha * B`` suffers "variance collapse": its
hidden units' activations shrink. REPAIR measures, per channel, the mean and standard
deviation of each pre-activation output (the outputs of Linear/Conv layers) in both
endpoints, sets the goal ``(1 - alpha) * mu_A + alpha * mu_B`` and
``(1 - alpha) * sigma_A + alpha * sigma_B``, and rescales the merged network's channels to
those statistics. The affine correction is folded into the layer's weight and bias, so the
result is a plain model of the same architecture (a bias is added to bias-free layers).

For networks with BatchNorm the correction reduces to recomputing the BatchNorm running
statistics on data (:func:`reset_bn_stats`).

Neither function mutates its inputs by default: both return a new module.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from pymerge._util.progress import track
from pymerge.align import _hooks
from pymerge.ops.moments import ChannelStats

__all__ = ["repair", "reset_bn_stats"]

_FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _bn_modules(model: nn.Module) -> dict[str, _BatchNorm]:
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None
    }


def _set_bn_stats(bn: _BatchNorm, stats: ChannelStats, num_batches: int) -> None:
    with torch.no_grad():
        bn.running_mean.copy_(stats.mean.to(bn.running_mean.dtype))
        var = stats.var(unbiased=stats.count > 1)
        bn.running_var.copy_(var.to(bn.running_var.dtype))
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.fill_(num_batches)


def reset_bn_stats(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    num_batches: int | None = None,
    device: torch.device | str | None = None,
    inplace: bool = False,
    progress: bool = False,
) -> nn.Module:
    """Recompute every BatchNorm layer's running statistics on data.

    One pass over ``batches`` with the BatchNorm layers in train mode (they normalise with
    batch statistics, as during training; every other module, e.g. dropout, in eval mode).
    Each layer's ``running_mean``/``running_var`` become the exact mean and unbiased variance
    of its inputs pooled over all samples of the pass (float64 accumulation): the
    cumulative average that ``momentum=None`` computes, without its bias from averaging
    per-batch variances. ``num_batches_tracked`` is set to the number of batches.

    Args:
        model: any module; layers without running statistics are left alone (a model without
            BatchNorm comes back unchanged).
        batches: iterable of input tensors, ``(inputs, targets)`` pairs or keyword mappings.
        num_batches: use at most this many batches.
        device: run there (the copy is moved; with ``inplace=True`` the model itself is moved).
        inplace: update ``model`` itself instead of a deep copy (default: copy; the argument
            is never mutated).
        progress: tqdm bar over batches.

    Returns:
        The model with reset statistics (a new module unless ``inplace``), with each module's
        train/eval flag as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    target = model if inplace else copy.deepcopy(model)
    if device is not None:
        target = target.to(device)
    bns = _bn_modules(target)
    if not bns:
        return target
    dev = _hooks.model_device(target)
    stats: dict[str, ChannelStats] = {}
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            if name not in stats:
                stats[name] = ChannelStats(x.shape[1], x.device)
            stats[name].update(x, 1)

        return hook

    bn_set = set(bns.values())
    count = 0
    try:
        for name, bn in bns.items():
            handles.append(bn.register_forward_pre_hook(make_hook(name)))
        with torch.no_grad(), _hooks.eval_mode(target, train=lambda m: m in bn_set):
            inputs = _hooks.iter_inputs(batches, num_batches, dev)
            for x in track(inputs, progress, desc="reset BN stats"):
                _hooks.call_model(target, x)
                count += 1
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        raise ValueError("batches is empty: resetting BatchNorm statistics needs data")
    for name, bn in bns.items():
        if name in stats:
            _set_bn_stats(bn, stats[name], count)
    return target


# --------------------------------------------------------------------------- REPAIR


def _channel_dim(module: nn.Module) -> int:
    return -1 if isinstance(module, nn.Linear) else 1


class _Stats(dict):
    """module name -> ChannelStats, plus the number of batches run (``num_batches``)."""

    num_batches: int = 0


def _output_stats(
    model: nn.Module,
    names: Sequence[str],
    batches: Iterable[Any],
    num_batches: int | None,
    stop_after: str | None = None,
    inputs_of: Sequence[str] = (),
) -> _Stats:
    """Per-channel statistics of the outputs of ``names`` (and of the inputs of ``inputs_of``,
    channel dim 1), over the batches, in eval mode. ``stop_after``: end each forward right
    after that module (it must run once per forward)."""
    modules = dict(model.named_modules())
    dev = _hooks.model_device(model)
    stats = _Stats()
    handles = []

    def add(key: str, x: torch.Tensor, dim: int) -> None:
        if x.dim() < 2:
            raise ValueError(f"output of {key!r} has shape {tuple(x.shape)}: no channel axis")
        if key not in stats:
            stats[key] = ChannelStats(x.shape[dim], x.device)
        stats[key].update(x, dim)

    def out_hook(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            add(name, output.detach(), _channel_dim(module))
            if name == stop_after:
                raise _hooks.StopForward

        return hook

    def in_hook(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            add(name, args[0].detach(), 1)
            if name == stop_after:
                raise _hooks.StopForward

        return hook

    try:
        for name in names:
            handles.append(modules[name].register_forward_hook(out_hook(name)))
        for name in inputs_of:
            handles.append(modules[name].register_forward_pre_hook(in_hook(name)))
        with torch.no_grad(), _hooks.eval_mode(model):
            for x in _hooks.iter_inputs(batches, num_batches, dev):
                try:
                    _hooks.call_model(model, x)
                except _hooks.StopForward:
                    pass
                stats.num_batches += 1
    finally:
        for h in handles:
            h.remove()
    return stats


def _fold(module: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Make ``module``'s output ``scale * out + shift`` per output channel (float64 math)."""
    w = module.weight
    view = (-1,) + (1,) * (w.dim() - 1)
    with torch.no_grad():
        s = scale.to(w.device)
        w.copy_((w.double() * s.view(view)).to(w.dtype))
        new_b = shift.to(w.device)
        if module.bias is not None:
            new_b = new_b + module.bias.double() * s
            module.bias.copy_(new_b.to(module.bias.dtype))
        else:
            module.bias = nn.Parameter(new_b.to(w.dtype), requires_grad=w.requires_grad)


def _default_points(model: nn.Module, order: list[str]) -> list[str]:
    """Linear/Conv layers that ran, except the last one (the output layer) and those whose
    next module to run is a BatchNorm (which re-normalises their output anyway)."""
    modules = dict(model.named_modules())
    cands = [i for i, n in enumerate(order) if isinstance(modules[n], _FOLDABLE)]
    if cands:
        cands = cands[:-1]
    out = []
    for i in cands:
        nxt = modules[order[i + 1]] if i + 1 < len(order) else None
        if not isinstance(nxt, _BatchNorm):
            out.append(order[i])
    return out


def repair(
    model_a: nn.Module,
    model_b: nn.Module,
    merged_model: nn.Module,
    batches: Iterable[Any],
    *,
    alpha: float = 0.5,
    points: Sequence[str] | None = None,
    num_batches: int | None = None,
    device: torch.device | str | None = None,
    eps: float = 1e-5,
    sequential: bool = True,
    reset_bn: bool = True,
    exact_bn: bool = False,
    progress: bool = False,
) -> nn.Module:
    """REPAIR the merged model ``(1 - alpha) * A + alpha * B`` (B already aligned to A).

    For each correction point (a Linear or Conv1d/2d/3d module, channels along the last dim
    for Linear and dim 1 for Conv), the per-channel mean and (biased) std of its output are
    measured on ``batches`` in both endpoints; the merged model's outputs are rescaled to
    ``mu_goal = (1 - alpha) mu_A + alpha mu_B`` and ``sigma_goal = (1 - alpha) sigma_A +
    alpha sigma_B`` by folding ``y -> sigma_goal * (y - mu_M) / sqrt(sigma_M^2 + eps) + mu_goal``
    into the layer's weight and bias. BatchNorm layers get their running statistics reset
    (see ``reset_bn``).

    Args:
        model_a, model_b, merged_model: same architecture (state-dict keys and shapes).
            None of them is mutated; the endpoints are only run (eval mode, no grad).
        batches: iterable of inputs, ``(inputs, targets)`` pairs or keyword mappings; iterated
            several times, so a one-shot iterator is first drawn into a list.
        alpha: interpolation weight of B in the merged model.
        points: module names to correct. Default: every Linear/Conv layer that runs, except
            the last one (the output layer) and those immediately followed by a BatchNorm.
            For a pure BatchNorm network this is empty and REPAIR is the statistics reset.
        num_batches: use at most this many batches.
        device: where to run (models elsewhere are copied there; the result lives there).
        eps: added to the merged variance before dividing, as in BatchNorm.
        sequential: correct the points one at a time in execution order, measuring each with
            the upstream ones already corrected, so that the result's statistics equal the goal
            (about ``len(points)/2`` passes over the data, each stopped early). False: one pass
            measures all points on the uncorrected model: faster, approximate in deep networks.
        reset_bn: reset BatchNorm running statistics. By default with :func:`reset_bn_stats`
            (one train-mode pass) before the points are measured, and once more after them when
            points were corrected; a pure BatchNorm network therefore gets exactly
            ``reset_bn_stats(merged_model, batches)``, as in the paper.
        exact_bn: (with ``sequential``) instead set each BatchNorm layer, in execution order, to
            the exact eval-mode statistics of its input with everything upstream already fixed
            (one early-stopped pass per BatchNorm layer: slower, exact in eval mode).
        progress: tqdm bar over the correction units.

    Returns:
        A new module computing the repaired function (train/eval flags as ``merged_model``).
    """
    alpha = _check_args(model_a, model_b, merged_model, alpha, eps)
    batches = _hooks.reiterable(batches, num_batches)
    merged = copy.deepcopy(merged_model)
    if device is not None:
        merged = merged.to(device)
    ma = _hooks.model_on(model_a, device)
    mb = _hooks.model_on(model_b, device)

    first = next(iter(_hooks.iter_inputs(batches, 1, _hooks.model_device(merged))), None)
    if first is None:
        raise ValueError("batches is empty: REPAIR needs data")
    with _hooks.eval_mode(merged):
        order, calls = _hooks.execution_order(merged, first)
    modules = dict(merged.named_modules())
    pts = _resolve_points(merged, points, order, calls)
    bns = [n for n in order if n in _bn_modules(merged)] if reset_bn else []
    goal = _goal_stats(ma, mb, pts, batches, num_batches, alpha) if pts else {}

    def correct(name: str, s: ChannelStats) -> None:
        mu_g, sd_g = goal[name]
        scale = sd_g.to(s.mean.device) / (s.var() + eps).sqrt()
        shift = mu_g.to(s.mean.device) - scale * s.mean
        _fold(modules[name], scale, shift)

    def reset_all() -> None:
        reset_bn_stats(merged, batches, num_batches=num_batches, inplace=True)

    walk_bns = bns if exact_bn else []
    if bns and not exact_bn:
        reset_all()  # the points below are measured with sensible BN statistics
    if sequential:
        units = sorted([*pts, *walk_bns], key=order.index)
        for name in track(units, progress, desc="REPAIR"):
            stop = name if calls.get(name) == 1 else None
            if name in walk_bns:
                s = _output_stats(merged, (), batches, num_batches, stop, inputs_of=(name,))
                _set_bn_stats(modules[name], s[name], s.num_batches)
            else:
                s = _output_stats(merged, (name,), batches, num_batches, stop)
                correct(name, s[name])
    else:
        if walk_bns:
            reset_all()
        if pts:
            s_all = _output_stats(merged, pts, batches, num_batches)
            for name in pts:
                correct(name, s_all[name])
    if bns and pts and not (sequential and exact_bn):
        reset_all()  # BN layers downstream of corrected points see their new inputs
    return merged


def _check_args(
    model_a: nn.Module, model_b: nn.Module, merged_model: nn.Module, alpha: Any, eps: float
) -> float:
    for nm, m in (("model_a", model_a), ("model_b", model_b), ("merged_model", merged_model)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{nm} must be an nn.Module, got {type(m).__name__}")
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    _hooks.check_same_architecture(model_a=model_a, model_b=model_b, merged_model=merged_model)
    return alpha


def _resolve_points(
    merged: nn.Module, points: Sequence[str] | None, order: list[str], calls: dict[str, int]
) -> list[str]:
    """The correction points in execution order (the defaults when ``points`` is None),
    each checked to be a foldable module that runs."""
    if points is None:
        return _default_points(merged, order)
    if isinstance(points, str):
        raise TypeError("points must be a sequence of module names, not a single string")
    pts = []
    for name in points:
        mod = _hooks.resolve_module(merged, name, "REPAIR point")
        if not isinstance(mod, _FOLDABLE):
            raise ValueError(
                f"REPAIR point {name!r} is a {type(mod).__name__}; only Linear and "
                "Conv1d/2d/3d outputs can be corrected (BatchNorm layers are reset)"
            )
        if name not in calls:
            raise ValueError(f"REPAIR point {name!r} does not run in the model's forward pass")
        pts.append(name)
    return sorted(set(pts), key=order.index)


def _goal_stats(
    ma: nn.Module,
    mb: nn.Module,
    pts: list[str],
    batches: Iterable[Any],
    num_batches: int | None,
    alpha: float,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per point: the goal mean and std, interpolated between the endpoints' statistics."""
    st_a = _output_stats(ma, pts, batches, num_batches)
    st_b = _output_stats(mb, pts, batches, num_batches)
    return {
        n: (
            (1 - alpha) * st_a[n].mean + alpha * st_b[n].mean,
            (1 - alpha) * st_a[n].std() + alpha * st_b[n].std(),
        )
        for n in pts
    }
