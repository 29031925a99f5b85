"""ZipIt! (Stoica et al. 2024): merge K models by zipping correlated features, within models too.

For every permutation group ``g`` of the spec (a hidden feature space of width ``n``), the
features of all K models are observed at the group's activation point on the same batches;
their Pearson correlation over the concatenated ``K n`` features is streamed with
:class:`pymerge.ops.CorrelationAccumulator` (float64) and its diagonal set to ``-inf``.
Greedy matching then repeatedly merges the most correlated pair of features -- two
features of one model may merge as well, at most ``floor(beta * floor((K n - m) / K))``
times per model -- until ``m = int(K n (1 - r))`` features remain (``r`` is the fraction of
the concatenated width removed, as in the reference code: with K = 2, ``r = 0.5`` gives
back the original width ``n``; ``r = 0``: no reduction, the models side by side). After a
merge the new feature's correlation with every other is ``alpha * min`` of its two parts'
(``alpha > 0``; it makes features that merged before less likely to merge again), or, with
``alpha <= 0``, the new feature cannot merge again with features of either model it came
from. Defaults ``r = 0.5, alpha = 0.3, beta = 0.125``, the paper's.

The clusters give the **merge** matrix ``M`` (``[m, K n]``: each merged feature the mean of
its members) and the **unmerge** matrix ``U`` (``[K n, m]``: each original feature a copy
of its cluster's). Writing ``M_k``, ``U_k`` for model ``k``'s block:

* an axis that indexes a group's *outputs* (axis 0 of a weight or of a 1-D parameter,
  axis 1 of an ``nn.Embedding`` or ``ConvTranspose`` weight) gets ``M_k``;
* an axis that *reads* a group (the other axes of a weight, conv channels flattened into a
  Linear with ``inner > 1`` included) gets ``U_k``;
* the merged entry is ``sum_k`` of the transformed ``theta_k`` when some axis got ``M``
  (``M`` already averages), else ``(1/K) sum_k`` (e.g. the classifier, whose outputs are
  shared, is averaged); entries no group touches are averaged; non-floating entries
  (``num_batches_tracked``) come from the first model.

So ``W* = sum_k M_k^out W_k U_k^in`` and ``b* = sum_k M_k b_k``, exact when ``r = 0`` (the
merged network is then the K models side by side and computes the mean of their outputs).

**Partial zipping.** ``groups=`` zips only the listed groups; every other group is kept
apart (``r = 0`` there: M = U = identity over its ``K n`` features). Zipping the early
layers and keeping the later ones apart is the paper's partial zip, expressed in one
network of the same layer structure: the later layers are block-diagonal (each model's
own), and the shared output averages the models' outputs. Widths change wherever ``m !=
n``: the merged state dict then needs a model of those widths (:attr:`ZipResult.model`
is one: a copy of ``model`` with its tensors replaced, and the usual size attributes
updated).

**REPAIR** (``repair=True``, default): BatchNorm layers get their running statistics reset
on the batches (:func:`pymerge.align.reset_bn_stats`); a Linear/Conv layer that produces a
zipped group and is not followed by a norm layer (no norm parameters in its group) is
REPAIRed: its merged output channels are rescaled, one layer at a time in execution order,
to the goal ``mu*_c = sum_j M[c, j] mu_j``, ``sigma*_c = sum_j M[c, j] sigma_j`` over the
cluster's members' pre-activation statistics in their own models (with two models and one
member from each this is REPAIR's ``(mu_A + mu_B) / 2``; :func:`pymerge.align.repair`
itself needs channel-aligned endpoints, which zipped clusters are not). The correction
``y -> sigma* (y - mu) / sqrt(sigma^2 + eps) + mu*`` is folded into the layer's weight and
bias (a layer without a bias gets the scale only).

Supported specs: groups without head structures, whose axes are whole (no segments), each
with an activation point (MLP, CNN and VGG builders, or traced specs of such models).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from pymerge._util.args import check_fraction
from pymerge._util.progress import track
from pymerge.align import _hooks, reset_bn_stats
from pymerge.merge import _data
from pymerge.merge.registry import Param, StateContext, register_method
from pymerge.ops import CorrelationAccumulator
from pymerge.ops.moments import ChannelStats
from pymerge.spec import PermutationSpec, spec_from_model

__all__ = ["ZipResult", "merge_model", "resized_model", "zip_matching", "zipit", "zipit_merge"]

_PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (_BatchNorm, nn.LayerNorm, nn.GroupNorm)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass
class ZipResult:
    """``state`` (the merged state dict), ``merge`` / ``unmerge`` (group -> ``M [m, K n]``,
    ``U [K n, m]``, float64), ``widths`` (group -> m), ``model`` (a module of the merged
    widths holding ``state``), ``correlations`` (group -> the ``[K n, K n]`` Pearson
    matrix the matching used)."""

    state: dict[str, torch.Tensor]
    merge: dict[str, torch.Tensor]
    unmerge: dict[str, torch.Tensor]
    widths: dict[str, int]
    model: nn.Module | None = None
    correlations: dict[str, torch.Tensor] = field(default_factory=dict)


# --------------------------------------------------------------------------- matching


def zip_matching(
    corr: torch.Tensor,
    num_models: int,
    *,
    r: float = 0.5,
    alpha: float = 0.3,
    beta: float = 0.125,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ZipIt!'s greedy matching on a ``[K n, K n]`` correlation matrix (module doc).

    Features ``k n .. (k + 1) n - 1`` belong to model ``k``. Returns ``(M, U)``:
    ``M [m, K n]`` (rows sum to 1) and ``U [K n, m]`` (0/1, one 1 per row), float64 on
    the CPU (the greedy loop is sequential); merged features are ordered by their first
    member. If every remaining pair is blocked
    (by ``alpha <= 0`` or the budget) before ``m`` is reached, the most correlated remaining
    pair merges anyway.
    """
    o = corr.shape[0]
    if corr.dim() != 2 or corr.shape[1] != o or o % num_models:
        raise ValueError(f"corr must be [K n, K n] for K={num_models}, got {tuple(corr.shape)}")
    r = check_fraction(r, "r", high=1.0)
    m = int(o * (1 - r) + 1e-4)
    if m < 1:
        raise ValueError(f"r={r} leaves no features (K n = {o})")
    n = o // num_models
    neg = -math.inf
    base = corr.detach().to("cpu", torch.float64).clone()  # a sequential loop: on the CPU
    base.fill_diagonal_(neg)
    v = base.clone()
    origin = torch.arange(o) // n
    members: list[list[int]] = [[i] for i in range(o)]
    alive = torch.ones(o, dtype=torch.bool)
    blocked = torch.zeros(o, o, dtype=torch.bool)
    budget = [int((o - m) // num_models * beta + 1e-4)] * num_models
    for k in range(num_models):
        if budget[k] <= 0:
            blocked |= (origin == k)[:, None] & (origin == k)[None, :]
    count = o
    while count > m:
        i, j = _best_pair(v.masked_fill(blocked, neg), v, base, alive)
        members[i] += members[j]
        alive[j] = False
        count -= 1
        oi, oj = int(origin[i]), int(origin[j])
        new = torch.minimum(v[i], v[j])
        if alpha > 0:
            new = new * alpha
        else:
            new[(origin == oi) | (origin == oj)] = neg
        new[i] = neg
        new[~alive] = neg
        v[i, :] = new
        v[:, i] = new
        v[j, :] = neg
        v[:, j] = neg
        if oi == oj:
            budget[oi] -= 1
            if budget[oi] <= 0:
                blocked |= (origin == oi)[:, None] & (origin == oi)[None, :]
    keep = [i for i in range(o) if alive[i]]
    u = torch.zeros(o, len(keep), dtype=torch.float64)
    for c, i in enumerate(keep):
        u[members[i], c] = 1.0
    merge = (u / u.sum(0, keepdim=True)).T.contiguous()
    return merge, u


def _best_pair(scores, v, base, alive) -> tuple[int, int]:
    o = scores.shape[0]
    for mat in (scores, v):
        idx = int(mat.argmax())
        if mat.reshape(-1)[idx] > -math.inf:
            break
    else:  # everything blocked: the most correlated remaining pair
        pair = alive[:, None] & alive[None, :]
        pair.fill_diagonal_(False)
        idx = int(torch.where(pair, base.nan_to_num(neginf=-1e300), -math.inf).argmax())
    i, j = divmod(idx, o)
    return (i, j) if i < j else (j, i)


# --------------------------------------------------------------------------- features


def _check_spec(spec: PermutationSpec, groups: list[str], state) -> None:
    spec.validate(state)
    for h in spec.heads.values():
        if set(h.groups) & set(spec.perm_to_axes):
            raise NotImplementedError(
                f"ZipIt! does not support head-structured groups ({sorted(h.groups)[0]!r})"
            )
    for g, refs in spec.perm_to_axes.items():
        for ref in refs:
            ax = ref.resolved_axis(state[ref.param].dim())
            if ref.start != 0 or ref.stop not in (None, state[ref.param].shape[ax]):
                raise NotImplementedError(
                    f"ZipIt! needs whole axes: group {g!r} acts on a segment of {ref.param!r}"
                )
    for g in groups:
        if g not in spec.activation_points:
            raise ValueError(
                f"group {g!r} has no activation point in the spec: ZipIt! cannot observe its "
                "features (pass groups= to zip only the others; they are kept apart)"
            )


def _producers(spec, groups, modules) -> dict[str, str]:
    """group -> the one Linear/Conv module whose output axis is the group, where the group
    holds no norm parameters (those groups are fixed by the BatchNorm reset, or need none)."""
    out = {}
    for g in groups:
        mods = {ref.param.rpartition(".")[0] for ref in spec.perm_to_axes[g]}
        if any(isinstance(modules.get(mn), _NORMS) for mn in mods):
            continue
        prod = [
            ref.param.rpartition(".")[0]
            for ref in spec.perm_to_axes[g]
            if ref.axis == 0
            and ref.param.endswith("weight")
            and isinstance(modules.get(ref.param.rpartition(".")[0]), _PRODUCERS)
        ]
        if len(prod) == 1:
            out[g] = prod[0]
    return out


def _channel_dim(module: nn.Module) -> int:
    return -1 if isinstance(module, nn.Linear) else 1


def _observe(work, states, sets, spec, groups, producers, num_batches, progress):
    """One pass per batch over all K models: joint correlations per zipped group and the
    producers' pre-activation statistics per model."""
    k = len(states)
    points = {g: (spec.activation_points[g].module, spec.activation_points[g].dim) for g in groups}
    modules = dict(work.named_modules())
    accs: dict[str, CorrelationAccumulator] = {}
    stats: list[dict[str, ChannelStats]] = [{} for _ in range(k)]
    device = _data.state_device(states)
    tensors = [{n: t.detach() for n, t in s.items()} for s in states]

    def stat_hook(i: int, name: str):
        def hook(module, args, output):
            out = output.detach()
            dim = _channel_dim(module)
            if name not in stats[i]:
                stats[i][name] = ChannelStats(out.shape[dim], out.device)
            stats[i][name].update(out, dim)

        return hook

    batches = list(zip(*[_data.iter_batches(b, num_batches) for b in sets], strict=False))
    for group_batches in track(batches, progress, desc="ZipIt! features", unit="batch"):
        feats: list[dict[str, torch.Tensor]] = []
        for i in range(k):
            x, _ = _data.split_batch(group_batches[i], device)
            sink: dict[str, list[torch.Tensor]] = {}
            handles = [
                modules[p].register_forward_hook(stat_hook(i, p)) for p in producers.values()
            ]
            try:
                with torch.no_grad(), _hooks.record_outputs(work, points, sink):
                    functional_call(work, tensors[i], (x,))
            finally:
                for h in handles:
                    h.remove()
            feats.append({g: torch.cat(sink[g]) for g in groups})
        for g in groups:
            joint = torch.cat([f[g] for f in feats], dim=1)
            if g not in accs:
                accs[g] = CorrelationAccumulator(joint.shape[1], dtype=torch.float64)
            accs[g].update(joint)
    if not accs and groups:
        raise ValueError("batches hold no samples: ZipIt! needs data")
    return {g: a.correlation() for g, a in accs.items()}, stats


# --------------------------------------------------------------------------- apply


def _role(modules, key: str, axis: int) -> str:
    mod = modules.get(key.rpartition(".")[0])
    if isinstance(mod, nn.Embedding) or isinstance(mod, _TRANSPOSED):
        return "out" if axis == 1 else "in"
    return "out" if axis == 0 else "in"


def _along(t: torch.Tensor, axis: int, mat: torch.Tensor, inner: int) -> torch.Tensor:
    """Apply ``mat [new, old]`` along ``axis`` (length ``old * inner``)."""
    new, old = mat.shape
    x = t.movedim(axis, 0)
    rest = x.shape[1:]
    x = x.reshape(old, inner, -1)
    x = torch.einsum("no,oir->nir", mat, x)
    return x.reshape(new * inner, *rest).movedim(0, axis)


def _apply(states, spec, merge, unmerge, n, modules) -> dict[str, torch.Tensor]:
    k = len(states)
    out = {}
    for key, ref in states[0].items():
        refs = spec.axes_to_perm.get(key, [])
        if not refs or not ref.is_floating_point():
            out[key] = _data.weighted_average([s[key] for s in states], [1.0] * k)
            continue
        total = None
        has_out = False
        for i, s in enumerate(states):
            t = s[key].double()
            for axref, g in refs:
                ax = axref.resolved_axis(t.dim())
                lo, hi = i * n[g], (i + 1) * n[g]
                if _role(modules, key, ax) == "out":
                    has_out = True
                    t = _along(t, ax, merge[g][:, lo:hi].to(t.device), axref.inner)
                else:
                    t = _along(t, ax, unmerge[g][lo:hi, :].T.to(t.device), axref.inner)
            total = t if total is None else total + t
        if not has_out:
            total = total / k
        out[key] = total.to(ref.dtype).contiguous()
    return out


_SIZE_ATTRS = {
    nn.Linear: {"weight": (("out_features", 0), ("in_features", 1))},
    nn.Embedding: {"weight": (("num_embeddings", 0), ("embedding_dim", 1))},
    _BatchNorm: {"weight": (("num_features", 0),), "running_mean": (("num_features", 0),)},
    nn.GroupNorm: {"weight": (("num_channels", 0),)},
}


def resized_model(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """A deep copy of ``model`` holding ``state``, whose tensors may have other sizes: each
    parameter/buffer is replaced, and the size attributes of Linear, Conv, Embedding, norm
    layers are updated (``in_features``, ``out_channels``, ``num_features``, ...)."""
    out = copy.deepcopy(model)
    modules = dict(out.named_modules())
    for key, t in state.items():
        mname, _, attr = key.rpartition(".")
        mod = modules[mname]
        if attr in mod._parameters and mod._parameters[attr] is not None:
            old = mod._parameters[attr]
            mod._parameters[attr] = nn.Parameter(t.detach().clone(), old.requires_grad)
        elif attr in mod._buffers:
            mod._buffers[attr] = t.detach().clone()
        else:
            raise ValueError(f"{key!r} is neither a parameter nor a buffer of the model")
        _update_sizes(mod, attr, t)
    return out


def _update_sizes(mod: nn.Module, attr: str, t: torch.Tensor) -> None:
    if isinstance(mod, nn.modules.conv._ConvNd) and attr == "weight":
        a, b = (1, 0) if isinstance(mod, _TRANSPOSED) else (0, 1)
        mod.out_channels = t.shape[a] * (mod.groups if a == 1 else 1)
        mod.in_channels = t.shape[b] * (mod.groups if b == 1 else 1)
        return
    if isinstance(mod, nn.LayerNorm) and attr == "weight":
        mod.normalized_shape = tuple(t.shape)
        return
    for cls, attrs in _SIZE_ATTRS.items():
        if isinstance(mod, cls):
            for name, dim in attrs.get(attr, ()):
                setattr(mod, name, t.shape[dim])


def _repair(merged, batches, producers, goal, num_batches, eps) -> None:
    """Fold REPAIR's correction into each producer, in execution order; BN reset around."""
    has_bn = any(isinstance(m, _BatchNorm) for m in merged.modules())
    if has_bn:
        reset_bn_stats(merged, batches, num_batches=num_batches, inplace=True)
    if not producers:
        return
    modules = dict(merged.named_modules())
    first = next(iter(_hooks.iter_inputs(batches, 1, _hooks.model_device(merged))))
    with _hooks.eval_mode(merged):
        order, _ = _hooks.execution_order(merged, first)
    for name in sorted(producers, key=lambda p: order.index(p) if p in order else len(order)):
        mod = modules[name]
        holder: dict[str, ChannelStats] = {}

        def hook(module, args, output, holder=holder):
            out = output.detach()
            dim = _channel_dim(module)
            if "s" not in holder:
                holder["s"] = ChannelStats(out.shape[dim], out.device)
            holder["s"].update(out, dim)
            raise _hooks.StopForward

        h = mod.register_forward_hook(hook)
        try:
            with torch.no_grad(), _hooks.eval_mode(merged):
                for x in _hooks.iter_inputs(batches, num_batches, _hooks.model_device(merged)):
                    try:
                        _hooks.call_model(merged, x)
                    except _hooks.StopForward:
                        pass
        finally:
            h.remove()
        s = holder["s"]
        mu_g, sd_g = goal[name]
        scale = sd_g.to(s.mean.device) / (s.var() + eps).sqrt()
        shift = mu_g.to(s.mean.device) - scale * s.mean
        w = mod.weight
        with torch.no_grad():
            w.copy_((w.double() * scale.view((-1,) + (1,) * (w.dim() - 1))).to(w.dtype))
            if mod.bias is not None:
                mod.bias.copy_((mod.bias.double() * scale + shift).to(mod.bias.dtype))
    if has_bn:
        reset_bn_stats(merged, batches, num_batches=num_batches, inplace=True)


def _check_options(r, alpha, beta, eps) -> tuple[float, float, float]:
    r = check_fraction(r, "r", high=1.0)
    if r == 1.0:
        raise ValueError("r=1 would remove every feature; r is in [0, 1) (0: no reduction)")
    beta = check_fraction(beta, "beta")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    if not (isinstance(eps, int | float) and eps >= 0):
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    return r, float(alpha), beta


def zipit(
    spec: PermutationSpec | None,
    model: nn.Module,
    states: Sequence[Mapping[str, torch.Tensor]],
    batches: Any,
    *,
    r: float = 0.5,
    alpha: float = 0.3,
    beta: float = 0.125,
    groups: Sequence[str] | None = None,
    repair: bool = True,
    per_model: bool = False,
    num_batches: int | None = None,
    eps: float = 1e-5,
    keep_widths: bool = False,
    progress: bool = False,
) -> ZipResult:
    """Zip K >= 2 models of ``model``'s architecture (module doc).

    Args:
        spec: the permutation spec (groups and activation points); ``None`` traces
            ``model`` with :func:`pymerge.spec.spec_from_model` on the first batch.
        model: the architecture (never modified); states: K state dicts (never modified).
        batches: inputs or ``(inputs, targets)``; with ``per_model=True`` K iterables of
            batches of equal sizes (model ``k`` sees ``batches[k]``).
        r, alpha, beta: the matching (module doc); ``r`` in ``[0, 1)``.
        groups: the groups to zip (default: all); the others are kept apart.
        repair: BN reset and REPAIR of the zipped layers (module doc).
        num_batches: at most this many batches; eps: REPAIR's variance epsilon.
        keep_widths: refuse (before any work) settings whose merged widths differ from the
            models' (what ``pymerge.merge("zipit", ...)`` needs: the same keys and shapes).
    """
    r, alpha, beta = _check_options(r, alpha, beta, eps)
    states, model, _ = _data.check_merge_inputs(states, model, "ZipIt!", min_models=2)
    sets = _data.prepare_batches(
        batches, len(states), per_model=per_model, num_batches=num_batches, method="ZipIt!"
    )
    if spec is None:
        first = next(iter(_hooks.iter_inputs(sets[0], 1, _data.state_device(states))))
        spec = spec_from_model(model, first)
    if not isinstance(spec, PermutationSpec):
        raise TypeError(f"spec must be a PermutationSpec or None, got {type(spec).__name__}")
    zip_groups = spec.groups() if groups is None else list(groups)
    unknown = [g for g in zip_groups if g not in spec.perm_to_axes]
    if unknown:
        raise ValueError(f"group {unknown[0]!r} is not in the spec (groups: {spec.groups()})")
    _check_spec(spec, zip_groups, states[0])
    k = len(states)
    n = spec.group_sizes(states[0])
    if keep_widths:
        for g in spec.groups():
            m = int(k * n[g] * (1 - r) + 1e-4) if g in zip_groups else k * n[g]
            if m != n[g]:
                raise ValueError(
                    f"ZipIt! with K={k}, r={r:g} gives group {g!r} width {m}, not the models' "
                    f"{n[g]}: a state dict of another architecture. Through pymerge.merge use "
                    f"r = 1 - 1/K; for other widths call pymerge.merge.zipit.zipit (its "
                    "result carries a model of the merged widths)"
                )
    work = _data.work_copy(model, _data.state_device(states))
    modules = dict(work.named_modules())
    producers = _producers(spec, zip_groups, modules) if repair else {}
    corrs, stats = _observe(work, states, sets, spec, zip_groups, producers, num_batches, progress)
    merge, unmerge = {}, {}
    for g in spec.groups():
        if g in corrs:
            merge[g], unmerge[g] = zip_matching(corrs[g], k, r=r, alpha=alpha, beta=beta)
        else:  # kept apart
            merge[g] = unmerge[g] = torch.eye(k * n[g], dtype=torch.float64)
    state = _apply(states, spec, merge, unmerge, n, modules)
    merged = resized_model(model, state)
    if repair:
        goal = {}
        for g, p in producers.items():
            mu = torch.cat([stats[i][p].mean for i in range(k)])
            sd = torch.cat([stats[i][p].std() for i in range(k)])
            mg = merge[g].to(mu.device)
            goal[p] = (mg @ mu, mg @ sd)
        merged = merged.to(_data.state_device(states))
        _repair(merged, sets[0], producers, goal, num_batches, eps)
        new = merged.state_dict()
        state = {key: new[key].detach().clone() for key in state}
    widths = {g: merge[g].shape[0] for g in merge}
    return ZipResult(state, merge, unmerge, widths, merged, corrs)


def zipit_merge(
    states: Sequence[Mapping[str, torch.Tensor]],
    *,
    model: nn.Module,
    batches: Any,
    spec: PermutationSpec | None = None,
    r: float = 0.5,
    alpha: float = 0.3,
    beta: float = 0.125,
    groups: Sequence[str] | None = None,
    repair: bool = True,
    per_model: bool = False,
    num_batches: int | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """The merged state dict of :func:`zipit` (data-aware: ``model`` and ``batches``)."""
    return zipit(
        spec,
        model,
        states,
        batches,
        r=r,
        alpha=alpha,
        beta=beta,
        groups=groups,
        repair=repair,
        per_model=per_model,
        num_batches=num_batches,
        progress=progress,
    ).state


@register_method(
    name="zipit",
    params=(
        Param(
            "r",
            0.5,
            low=0.0,
            high=1.0,
            open_high=True,
            doc="fraction of the K models' concatenated width removed (K = 2: 0.5 keeps the width)",
        ),
        Param("alpha", 0.3, doc="a merged feature's correlations scale (<= 0: no re-merge)"),
        Param("beta", 0.125, low=0.0, high=1.0, doc="budget of same-model merges"),
        Param("repair", True, doc="BatchNorm reset and REPAIR of the zipped layers"),
        Param("per_model", False, doc="batches is a list of K batch sets, one per model"),
        Param("num_batches", None, kind="int", low=1, nullable=True, doc="batches to use"),
    ),
    needs_data=True,
    min_models=2,
    reference="Stoica et al. 2024, ZipIt! Merging Models from Different Tasks without "
    "Training (ICLR 2024, arXiv 2305.03053); REPAIR: Jordan et al. 2023",
)
def merge_model(ctx: StateContext) -> dict[str, torch.Tensor]:
    """ZipIt!: zip the models' correlated features (within models too) with merge and
    unmerge matrices, then REPAIR (data-aware: ``model=`` and ``batches=``; the spec is
    traced from ``model`` on the first batch; see :mod:`pymerge.merge.zipit`).

    Through ``pymerge.merge`` the merged widths must equal the models' (``r = 1 - 1/K``,
    every group zipped); other widths, partial zipping (``groups=``), a given spec and the
    merge/unmerge matrices: :func:`zipit`.
    """
    names = ("r", "alpha", "beta", "repair", "per_model", "num_batches")
    g = _data.global_params(ctx, names, "zipit")
    res = zipit(
        None,
        ctx.model,
        ctx.states,
        ctx.batches,
        r=g["r"],
        alpha=g["alpha"],
        beta=g["beta"],
        repair=g["repair"],
        per_model=g["per_model"],
        num_batches=g["num_batches"],
        keep_widths=True,
        progress=ctx.progress,
    )
    return {k: res.state[k] for k in ctx.keys}
