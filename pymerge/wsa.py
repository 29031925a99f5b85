"""Weight Scope Alignment (Xu, Li, Gan and Zhan 2024, arXiv 2408.12237).

The *scope* of a layer is the normal distribution ``N(mu, sigma^2)`` fitted to its weights:
``mu`` their mean and ``sigma`` their population standard deviation (``ddof=0``: the
empirical distribution of the layer's entries, not an estimate of a larger population).
Training randomness and non-IID data give models different scopes, which hurts averaging;
WSA pulls each layer's scope toward a target during training and fuses the scopes of
several models into that target.

* :func:`weight_scope` -- per-layer ``(mean, std)`` of a model or state dict.
* :class:`ScopeRegularizer` -- ``lam * sum_l KL(N(mu_l, sigma_l^2) || N(mu~_l, sigma~_l^2))``,
  a differentiable loss term to add to the task loss, with the closed form
  ``KL = log(sigma~/sigma) + (sigma^2 + (mu - mu~)^2) / (2 sigma~^2) - 1/2``.
* :func:`fuse_scopes` -- the target from several scopes: ``how="mean"`` (the paper's:
  ``mu~ = mean mu_k``, ``sigma~ = mean sigma_k``) or ``how="pooled"``.
* :func:`fuse_stages` -- multi-stage fusion over a tree of models.
* :func:`rescale_to_scope` -- affinely map each layer onto a target scope (what the
  registry's ``method="wsa"`` does to every model before averaging).

Which layers: by default the weights of ``nn.Linear`` and ``nn.Conv1d/2d/3d`` modules of a
model; for a state dict (no module types known) every key ending in ``weight`` whose tensor
has at least two dimensions (the shape of Linear and Conv weights; note that this includes
``nn.Embedding`` weights, and excludes norm-layer weights and biases). ``layers=`` chooses
explicitly: a sequence of state-dict keys, or a predicate ``(key, tensor) -> bool``.

**[unverified]** (``../shared/PAPERS.md``): the pooled fusion, the federated choices (the
weight ``lam``, the layer set, the target schedule) and the meaning of multi-stage fusion
could not be checked against the paper's full text; they are documented, configurable
defaults here.

Level 3 of the house: this module imports only :mod:`pymerge._util` (and torch).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from pymerge._util.args import check_fraction

__all__ = [
    "LayerScope",
    "ScopeRegularizer",
    "fuse_scopes",
    "fuse_stages",
    "rescale_to_scope",
    "scope_kl",
    "weight_scope",
]

_SCOPE_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_HOWS = ("mean", "pooled")

LayerSelector = Sequence[str] | Callable[[str, torch.Tensor], bool] | None


class LayerScope(NamedTuple):
    """The scope of one layer: mean and population std (``ddof=0``) of its weights."""

    mean: float
    std: float


Scopes = dict[str, LayerScope]


# --------------------------------------------------------------------------- layer choice


def _default_keys(obj: nn.Module | Mapping[str, torch.Tensor]) -> list[str]:
    if isinstance(obj, nn.Module):
        return [
            f"{name}.weight" if name else "weight"
            for name, m in obj.named_modules()
            if isinstance(m, _SCOPE_MODULES) and getattr(m, "weight", None) is not None
        ]
    return [
        k
        for k, v in obj.items()
        if k.rpartition(".")[2].endswith("weight") and isinstance(v, torch.Tensor) and v.ndim >= 2
    ]


def _tensors_of(obj: Any, what: str) -> dict[str, torch.Tensor]:
    """name -> tensor of a module (parameters, then buffers) or a mapping of tensors."""
    if isinstance(obj, nn.Module):
        out = dict(obj.named_parameters())
        out.update((k, v) for k, v in obj.named_buffers() if k not in out)
        return out
    if isinstance(obj, Mapping):
        return dict(obj)
    raise TypeError(f"{what} must be an nn.Module or a state dict, got {type(obj).__name__}")


def _select(obj: Any, layers: LayerSelector, what: str) -> dict[str, torch.Tensor]:
    """The chosen layers' tensors, checked: present, floating, >= 2 entries."""
    tensors = _tensors_of(obj, what)
    if layers is None:
        keys = _default_keys(obj)
    elif callable(layers):
        keys = [k for k, v in tensors.items() if isinstance(v, torch.Tensor) and layers(k, v)]
    elif isinstance(layers, str):
        raise TypeError("layers must be a sequence of keys or a predicate, not a single string")
    else:
        keys = list(layers)
        for k in keys:
            if not isinstance(k, str):
                raise TypeError(f"layers must hold state-dict keys (str), got {k!r}")
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise ValueError(f"layer {missing[0]!r} is not in {what}")
    if not keys:
        raise ValueError(f"no layers selected in {what} (pass layers= to choose them)")
    out = {}
    for k in keys:
        t = tensors[k]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}[{k!r}] is a {type(t).__name__}, not a Tensor")
        if not t.is_floating_point():
            raise TypeError(f"{what}[{k!r}] has dtype {t.dtype}; a scope needs floating weights")
        if t.numel() < 2:
            raise ValueError(f"{what}[{k!r}] has {t.numel()} entries; a scope needs at least 2")
        out[k] = t
    return out


def _moments(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population std of all entries (fp16/bf16 computed in float32)."""
    if w.dtype in (torch.float16, torch.bfloat16):
        w = w.float()
    var, mean = torch.var_mean(w.reshape(-1), correction=0)
    return mean, var.sqrt()


# --------------------------------------------------------------------------- scopes


def weight_scope(
    model_or_state: nn.Module | Mapping[str, torch.Tensor], *, layers: LayerSelector = None
) -> Scopes:
    """Per-layer scope ``(mean, std)`` of a model or state dict.

    Args:
        model_or_state: an ``nn.Module`` or a state dict (``name -> Tensor``); never modified.
        layers: which tensors (module doc): ``None`` for the default set, a sequence of keys,
            or a predicate ``(key, tensor) -> bool``.

    Returns:
        ``key -> LayerScope(mean, std)`` as Python floats, computed in float64; ``std`` is
        the population std (``ddof=0``).

    Raises:
        TypeError: not a module/mapping, a non-floating or non-tensor layer.
        ValueError: a requested key is missing, a layer has fewer than 2 entries or non-finite
            weights (naming it), or no layer was selected.
    """
    out: Scopes = {}
    for k, t in _select(model_or_state, layers, "model_or_state").items():
        w = t.detach().double()
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"layer {k!r} has non-finite weights; its scope is undefined")
        mean, std = _moments(w)
        out[k] = LayerScope(float(mean), float(std))
    return out


def _check_scopes(scopes: Any, what: str, *, positive: bool = True) -> Scopes:
    if not isinstance(scopes, Mapping) or not scopes:
        raise TypeError(f"{what} must be a non-empty mapping key -> (mean, std)")
    out: Scopes = {}
    for k, v in scopes.items():
        try:
            mean, std = v
            mean, std = float(mean), float(std)
        except (TypeError, ValueError):
            raise TypeError(f"{what}[{k!r}] must be a (mean, std) pair, got {v!r}") from None
        if not (math.isfinite(mean) and math.isfinite(std)) or std < 0:
            raise ValueError(f"{what}[{k!r}] = ({mean}, {std}) is not a finite scope")
        if positive and std == 0:
            raise ValueError(f"{what}[{k!r}] has std 0; a target scope needs std > 0")
        out[k] = LayerScope(mean, std)
    return out


def _is_scopes(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(v, LayerScope | tuple | list) for v in obj.values())
    )


def scope_kl(scope: tuple[float, float], target: tuple[float, float]) -> float:
    """``KL(N(mean, std^2) || N(target_mean, target_std^2))`` in closed form (float64)."""
    (mu, sd), (mt, st) = (map(float, scope)), (map(float, target))
    if sd <= 0 or st <= 0:
        raise ValueError(f"scope_kl needs positive stds, got {sd} and {st}")
    return math.log(st / sd) + (sd * sd + (mu - mt) ** 2) / (2 * st * st) - 0.5


def _weights(weights: Any, k: int) -> list[float]:
    if weights is None:
        return [1.0 / k] * k
    if isinstance(weights, torch.Tensor):
        weights = weights.tolist()
    w = list(weights)
    if len(w) != k:
        raise ValueError(f"got {len(w)} weights for {k} scopes")
    for i, x in enumerate(w):
        if isinstance(x, bool) or not isinstance(x, numbers.Real):
            raise TypeError(f"weights[{i}] must be a number, got {x!r}")
        if not math.isfinite(float(x)) or x < 0:
            raise ValueError(f"weights[{i}] must be finite and >= 0, got {x}")
    total = float(sum(w))
    if total <= 0:
        raise ValueError("weights sum to 0; fusion needs a positive total weight")
    return [float(x) / total for x in w]


def fuse_scopes(
    scopes: Sequence[Any],
    how: str = "mean",
    *,
    weights: Sequence[float] | None = None,
    layers: LayerSelector = None,
) -> Scopes:
    """Fuse the scopes of K models into one target scope, layer by layer.

    Args:
        scopes: K >= 1 entries, each a scope mapping (from :func:`weight_scope`), or a model
            or state dict whose scope is taken with ``layers``. All must have the same keys.
        how: ``"mean"`` (the paper's default): ``mu~ = sum_k w_k mu_k``,
            ``sigma~ = sum_k w_k sigma_k``. ``"pooled"`` **[unverified]**: ``sigma~`` is the
            std of all K models' weights of the layer put together (same-size layers, each
            model's entries weighted ``w_k``): ``sigma~^2 = sum_k w_k (sigma_k^2 +
            (mu_k - mu~)^2)``, the within-model variance plus the spread of the means
            between models (law of total variance), so ``sigma~`` is never below the mean
            std and grows when the models' means disagree.
        weights: K non-negative finite weights (normalised to sum 1); default equal.
        layers: layer choice for entries given as models/state dicts.

    Returns:
        ``key -> LayerScope`` (key order of the first entry).
    """
    if how not in _HOWS:
        raise ValueError(f"how must be one of {_HOWS}, got {how!r}")
    if isinstance(scopes, Mapping) or isinstance(scopes, nn.Module):
        raise TypeError("scopes must be a sequence (one entry per model), not a single one")
    entries = list(scopes)
    if not entries:
        raise ValueError("scopes is empty: fusion needs at least one scope")
    parsed = [
        _check_scopes(s, f"scopes[{i}]", positive=False)
        if _is_scopes(s)
        else weight_scope(s, layers=layers)
        for i, s in enumerate(entries)
    ]
    w = _weights(weights, len(parsed))
    keys = list(parsed[0])
    for i, s in enumerate(parsed[1:], 1):
        if set(s) != set(keys):
            diff = sorted(set(keys) ^ set(s))[0]
            where = "scopes[0]" if diff in parsed[0] else f"scopes[{i}]"
            raise ValueError(f"layer {diff!r} is only in {where}: scopes must have the same keys")
    out: Scopes = {}
    for k in keys:
        mus = [s[k].mean for s in parsed]
        sds = [s[k].std for s in parsed]
        mu = math.fsum(wi * m for wi, m in zip(w, mus, strict=True))
        if how == "mean":
            sd = math.fsum(wi * s for wi, s in zip(w, sds, strict=True))
        else:
            var = math.fsum(
                wi * (s * s + (m - mu) ** 2) for wi, m, s in zip(w, mus, sds, strict=True)
            )
            sd = math.sqrt(var)
        out[k] = LayerScope(mu, sd)
    return out


def _leaves(tree: Any) -> int:
    if _is_leaf(tree):
        return 1
    return sum(_leaves(t) for t in tree)


def _is_leaf(tree: Any) -> bool:
    return isinstance(tree, Mapping | nn.Module) or not isinstance(tree, Iterable)


def fuse_stages(
    tree: Sequence[Any],
    how: str = "mean",
    *,
    weights: str = "count",
    layers: LayerSelector = None,
) -> Scopes:
    """Multi-stage fusion: fuse a tree of models stage by stage, bottom up.

    ``tree`` is a nested sequence whose leaves are scopes, models or state dicts; each inner
    node's scope is :func:`fuse_scopes` of its children's. ``[[a, b], [c, d, e]]`` fuses
    ``a, b`` and ``c, d, e`` first (stage 1), then the two results (stage 2); the paper's
    use is a merged model that is merged again later, whose target must stand for every
    model it came from **[unverified: our reading of "multi-stage fusion"]**.

    Args:
        how: ``"mean"`` or ``"pooled"`` (see :func:`fuse_scopes`).
        weights: ``"count"`` (default): a child weighs as many leaves as it holds, so the
            result equals one flat :func:`fuse_scopes` of all leaves (exactly, for both
            ``how``: linear for ``"mean"``, the law of total variance for ``"pooled"``);
            ``"equal"``: every child of a node weighs the same (an earlier fused model
            counts as one model).
        layers: layer choice for leaves given as models/state dicts.
    """
    if weights not in ("count", "equal"):
        raise ValueError(f"weights must be 'count' or 'equal', got {weights!r}")
    if _is_leaf(tree):
        raise TypeError("tree must be a (nested) sequence of scopes, models or state dicts")

    def fuse(node: Any, path: str) -> Scopes:
        if _is_leaf(node):
            if _is_scopes(node):
                return _check_scopes(node, path, positive=False)
            return weight_scope(node, layers=layers)
        children = list(node)
        if not children:
            raise ValueError(f"tree{path} is an empty stage")
        fused = [fuse(c, f"{path}[{i}]") for i, c in enumerate(children)]
        w = [float(_leaves(c)) for c in children] if weights == "count" else None
        return fuse_scopes(fused, how, weights=w)

    return fuse(tree, "")


# --------------------------------------------------------------------------- rescaling


def rescale_to_scope(
    state: Mapping[str, torch.Tensor],
    target: Mapping[str, tuple[float, float]],
) -> dict[str, torch.Tensor]:
    """Map each target layer of ``state`` affinely onto its target scope.

    ``w' = mu~ + (w - mu) * sigma~ / sigma`` (float64 math, rounded to ``w``'s dtype), so
    ``weight_scope(w') == target`` up to rounding; keys not in ``target`` are cloned. The
    layer's function changes unless a normalisation follows it.

    Raises:
        ValueError: a target key missing from ``state``, a layer with non-finite weights or
            zero std (a constant layer cannot be rescaled), a malformed target.
    """
    tgt = _check_scopes(target, "target")
    tensors = _select(state, list(tgt), "state")
    out = {}
    for k, v in state.items():
        if k not in tgt:
            out[k] = v.clone() if isinstance(v, torch.Tensor) else v
            continue
        w = tensors[k].detach().double()
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"layer {k!r} has non-finite weights; it cannot be rescaled")
        mean, std = _moments(w)
        if float(std) == 0:
            raise ValueError(f"layer {k!r} is constant (std 0); it cannot be rescaled")
        mt, st = tgt[k]
        out[k] = ((w - mean) * (st / std) + mt).to(v.dtype)
    return out


# --------------------------------------------------------------------------- regulariser


class ScopeRegularizer(nn.Module):
    """``lam * sum_l KL(N(mu_l, sigma_l^2) || N(mu~_l, sigma~_l^2))`` over the target's layers.

    Call it on a model (its parameters) or on a mapping ``name -> tensor`` (e.g. the
    parameters given to ``torch.func.functional_call``) and add the result to the task
    loss: it is differentiable in the weights (``mu``, ``sigma`` are the layer's mean and
    population std, recomputed at every call). The paper's loss is
    ``L = task loss + lam * sum_l KL``; ``lam`` and the layer set are **[unverified]**,
    configurable choices.

    Args:
        target: ``key -> (mean, std)`` (e.g. :func:`fuse_scopes` of the clients), every std
            > 0; the keys are the regularised layers.
        lam: the weight of the term (finite, >= 0).
        reduction: ``"sum"`` over layers (the paper's) or ``"mean"``.

    The target is kept in two float64 buffers (it moves with ``.to(device)``);
    :meth:`set_target` replaces it (e.g. each federated round) with the same keys.
    """

    def __init__(
        self,
        target: Mapping[str, tuple[float, float]],
        lam: float = 1.0,
        *,
        reduction: str = "sum",
    ) -> None:
        super().__init__()
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.lam = check_fraction(lam, "lam", high=math.inf)
        self.reduction = reduction
        tgt = _check_scopes(target, "target")
        self.keys: list[str] = list(tgt)
        f64 = torch.float64
        self.register_buffer("target_mean", torch.tensor([s.mean for s in tgt.values()], dtype=f64))
        self.register_buffer("target_std", torch.tensor([s.std for s in tgt.values()], dtype=f64))

    def set_target(self, target: Mapping[str, tuple[float, float]]) -> None:
        """Replace the target scope (same layers)."""
        tgt = _check_scopes(target, "target")
        if list(tgt) != self.keys:
            missing = sorted(set(self.keys) ^ set(tgt))
            what = f"layer {missing[0]!r} differs" if missing else "the key order differs"
            raise ValueError(f"set_target needs the same layers as before: {what}")
        mean = torch.tensor([s.mean for s in tgt.values()], dtype=torch.float64)
        std = torch.tensor([s.std for s in tgt.values()], dtype=torch.float64)
        self.target_mean.copy_(mean)
        self.target_std.copy_(std)

    @property
    def target(self) -> Scopes:
        """The current target, ``key -> LayerScope``."""
        return {
            k: LayerScope(float(m), float(s))
            for k, m, s in zip(self.keys, self.target_mean, self.target_std, strict=True)
        }

    def _stats(self, model: Any) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = _select(model, self.keys, "model")
        mus, sds = zip(*(_moments(tensors[k]) for k in self.keys), strict=True)
        dtype = torch.promote_types(mus[0].dtype, torch.float32)
        return torch.stack([m.to(dtype) for m in mus]), torch.stack([s.to(dtype) for s in sds])

    def layer_kl(self, model: Any) -> torch.Tensor:
        """The per-layer KL divergences ``[L]`` (differentiable; order of :attr:`keys`)."""
        mu, sd = self._stats(model)
        mt = self.target_mean.to(device=mu.device, dtype=mu.dtype)
        st = self.target_std.to(device=mu.device, dtype=mu.dtype)
        return torch.log(st / sd) + (sd * sd + (mu - mt) ** 2) / (2 * st * st) - 0.5

    def forward(self, model: Any) -> torch.Tensor:
        kl = self.layer_kl(model)
        total = kl.sum() if self.reduction == "sum" else kl.mean()
        return self.lam * total

    def extra_repr(self) -> str:
        return f"layers={len(self.keys)}, lam={self.lam:g}, reduction={self.reduction!r}"
