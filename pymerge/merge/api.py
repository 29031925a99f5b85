"""``pymerge.merge(method, states, ...)``: every registered method behind one call."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from pymerge._util.checks import check_states
from pymerge._util.progress import track
from pymerge.merge.registry import (
    MergePlan,
    StateContext,
    get_method,
    layer_positions,
    merge_methods,
    plan_merge,
)

__all__ = ["merge", "merge_methods"]

_ALIGN_METHODS = ("weight_matching", "activation_matching", "merge_many")
# keyword arguments that are data, not per-key parameters
_DATA_KWARGS = ("model", "batches", "example_inputs")


def merge(
    method: str,
    states: Sequence[Mapping[str, torch.Tensor]],
    *,
    base: Mapping[str, torch.Tensor] | None = None,
    weights: Any = None,
    overrides: Sequence[Mapping[str, Any]] | None = None,
    align: str | Mapping[str, Any] | None = None,
    spec: Any = None,
    progress: bool = False,
    **params: Any,
) -> dict[str, torch.Tensor]:
    """Merge K state dicts with a registered method; returns a new state dict.

    Args:
        method: a name from :func:`merge_methods` (``"linear"``, ``"slerp"``, ``"ties"``...).
        states: the K models' state dicts (same keys, shapes and dtypes; key order may
            differ; the output follows ``states[0]``). Never modified.
        base: the base (pre-trained) model, for methods that take one (task-vector methods,
            ``model_stock``, ``sce``, ``nearswap``; optional for ``nuslerp``/``multislerp``).
        weights: shorthand for the per-model parameter ``weight`` (one value, or one per
            model, or any per-model setting form of :mod:`pymerge.merge.registry`).
        overrides: mergekit-style per-key settings: ``[{"filter": "self_attn", "t": 0.3},
            {"filter": "mlp", "density": [0.5, 0.7]}]``; the first override whose ``filter``
            is a substring of the key and names a parameter sets it for that key.
        align: permute every model onto one anchor before merging: ``"weight_matching"``
            (each model to the base when given, else to ``states[0]``),
            ``"activation_matching"`` (the same anchor; needs ``model=`` and ``batches=``),
            ``"merge_many"`` (MergeMany over the K >= 3 models). A dict
            ``{"method": ..., **options}`` passes options to the alignment function.
        spec: the :class:`~pymerge.spec.PermutationSpec` for ``align``; when None it is
            traced from ``model=`` (``example_inputs=``, or the first batch of ``batches``).
        progress: show a progress bar (tqdm) over the keys.
        **params: the method's parameters (mergekit's names; see :func:`merge_methods`), each
            a scalar, a per-model list, a gradient over layers, or filter entries; for
            stochastic methods ``seed=``; for data-aware methods (and
            ``align="activation_matching"``) ``model=`` (an ``nn.Module`` of the
            architecture) and ``batches=`` (an iterable of inputs).

    Returns:
        ``dict[str, Tensor]``: every key of ``states[0]``, in its dtype and on its device;
        integer buffers are copied from the base (else ``states[0]``), not merged. No output
        tensor shares memory with an input.

    Raises:
        ValueError / TypeError before any work: an unknown method or parameter (naming the
        closest one and listing the method's parameters), a missing base, state dicts with
        different keys, shapes or dtypes (naming the key), non-finite weights, densities
        outside (0, 1], weights summing to zero with ``normalize``, too few models, a bad
        ``align`` or ``overrides``.
    """
    info = get_method(method)
    if isinstance(states, Mapping) or not isinstance(states, Sequence):
        raise TypeError(
            f"states must be a list of state dicts (one per model), got {type(states).__name__}"
        )
    states = list(states)
    data = {k: params.pop(k) for k in _DATA_KWARGS if k in params}
    align_method, align_opts = _check_align(align, len(states), spec, data)
    if align_method == "merge_many" and base is not None:
        raise ValueError(
            "align='merge_many' moves the models to a common basis of their own, not the "
            "base's; with base= use align='weight_matching' (every model onto the base)"
        )
    uses_data = (
        info.needs_data
        or align_method == "activation_matching"
        or (align_method is not None and spec is None)
    )
    if info.needs_data:
        for k in ("model", "batches"):
            if data.get(k) is None:
                raise ValueError(f"{info.name} is data-aware: pass {k}= (see its docstring)")
    elif data and not uses_data:
        extra = ", ".join(f"{k}=" for k in data)
        raise ValueError(
            f"{info.name} takes no {extra} (data-aware methods, align='activation_matching' "
            "and tracing a spec for align= use model=/batches=/example_inputs=)"
        )
    plan = plan_merge(
        info,
        len(states),
        has_base=base is not None,
        weights=weights,
        overrides=overrides,
        **params,
    )
    names = [f"states[{i}]" for i in range(len(states))]
    all_states = [*states, *([base] if base is not None else [])]
    keys, _, dtypes, _ = check_states(all_states, [*names, *(["base"] if base else [])])
    positions = layer_positions(keys)
    floating = [k for k, d in zip(keys, dtypes, strict=True) if d.is_floating_point]
    resolved = {k: plan.resolve(k, positions[k]) for k in floating}  # every error before work

    if align_method is not None:
        states = _align(align_method, align_opts, states, base, spec, data, progress)

    ctx = StateContext(
        keys=floating,
        states=states,
        base=base,
        plan=plan,
        params=resolved,
        positions=positions,
        progress=progress,
        model=data.get("model"),
        batches=data.get("batches"),
    )
    if info.merge_state is not None:
        merged = info.merge_state(ctx)
    else:
        merged = _per_tensor(ctx, plan)
    return _assemble(keys, merged, states, base, plan)


def _per_tensor(ctx: StateContext, plan: MergePlan) -> dict[str, torch.Tensor]:
    out = {}
    for k in track(ctx.keys, ctx.progress, desc=f"merge {plan.info.name}", unit="tensor"):
        out[k] = plan.merge_tensor(
            k,
            [s[k] for s in ctx.states],
            None if ctx.base is None else ctx.base[k],
            t=ctx.positions[k],
            params=ctx.params[k],
        )
    return out


def _assemble(
    keys: list[str],
    merged: Mapping[str, torch.Tensor],
    states: list[Mapping[str, torch.Tensor]],
    base: Mapping[str, torch.Tensor] | None,
    plan: MergePlan,
) -> dict[str, torch.Tensor]:
    """The output in ``states[0]``'s key order; non-merged keys copied; dtypes restored."""
    out = {}
    for k in keys:
        ref = states[0][k]
        t = merged.get(k)
        if t is None:
            src = base[k] if base is not None else ref
            t = src.clone()
        else:
            if t.shape != ref.shape:
                raise TypeError(
                    f"merge method {plan.info.name} returned shape {tuple(t.shape)} for key "
                    f"{k!r}, expected {tuple(ref.shape)}"
                )
            if t.dtype != ref.dtype:
                t = t.to(ref.dtype)
        out[k] = t
    return out


def _check_align(
    align: Any, k: int, spec: Any, data: Mapping[str, Any]
) -> tuple[str | None, dict[str, Any]]:
    if align is None:
        if spec is not None:
            raise ValueError("spec= is only used with align=; pass align='weight_matching'")
        return None, {}
    if isinstance(align, str):
        name, opts = align, {}
    elif isinstance(align, Mapping) and isinstance(align.get("method"), str):
        opts = dict(align)
        name = opts.pop("method")
    else:
        raise TypeError(
            "align must be one of "
            f"{list(_ALIGN_METHODS)} or a dict {{'method': ..., **options}}, got {align!r}"
        )
    if name not in _ALIGN_METHODS:
        raise ValueError(f"unknown align={name!r}; use one of {list(_ALIGN_METHODS)}")
    if name == "merge_many" and k < 3:
        raise ValueError(
            f"align='merge_many' is for K >= 3 models (got {k}); for two use "
            "align='weight_matching'"
        )
    if name == "activation_matching":
        for need in ("model", "batches"):
            if data.get(need) is None:
                raise ValueError(f"align='activation_matching' needs {need}=")
    elif spec is None and data.get("model") is None:
        raise ValueError(
            f"align={name!r} needs spec= (a PermutationSpec), or model= (and example_inputs= "
            "or batches=) to trace one"
        )
    return name, opts


def _example_inputs(data: Mapping[str, Any]) -> Any:
    if data.get("example_inputs") is not None:
        return data["example_inputs"]
    batches = data.get("batches")
    if batches is None:
        raise ValueError("tracing a spec from model= needs example_inputs= or batches=")
    first = next(iter(batches))
    return first[0] if isinstance(first, (tuple, list)) else first


def _align(
    name: str,
    opts: dict[str, Any],
    states: list[Mapping[str, torch.Tensor]],
    base: Mapping[str, torch.Tensor] | None,
    spec: Any,
    data: Mapping[str, Any],
    progress: bool,
) -> list[Mapping[str, torch.Tensor]]:
    """Every model permuted onto the anchor (the base, else states[0]) or by MergeMany."""
    from pymerge.spec import apply_permutation, spec_from_model

    if spec is None:
        spec = spec_from_model(data["model"], _example_inputs(data))
    anchor = base if base is not None else states[0]
    if name == "activation_matching":
        from pymerge.align import activation_matching

        model = data["model"]
        model_a = _with_state(model, anchor)
        out = []
        for i, s in enumerate(states):
            if base is None and i == 0:
                out.append(s)
                continue
            res = activation_matching(
                spec, model_a, _with_state(model, s), data["batches"], progress=progress, **opts
            )
            out.append(apply_permutation(spec, res.perm, s))
        return out
    if name == "merge_many":
        from pymerge.align import merge_many

        res = merge_many(spec, states, progress=progress, **opts)
        return [apply_permutation(spec, p, s) for p, s in zip(res.perms, states, strict=True)]
    from pymerge.align import weight_matching

    out = []
    for i, s in enumerate(states):
        if base is None and i == 0:
            out.append(s)
            continue
        res = weight_matching(spec, anchor, s, progress=progress, **opts)
        out.append(apply_permutation(spec, res.perm, s))
    return out


def _with_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    m = copy.deepcopy(model)
    m.load_state_dict(dict(state))
    return m
