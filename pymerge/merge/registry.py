"""The merge-method registry: declared parameters, per-key resolution, one per-tensor contract.

A merge method is a small module under ``pymerge/merge/`` that declares its parameters and
registers a per-tensor function::

    from pymerge.merge.registry import Param, TensorContext, register_method

    @register_method(
        name="linear",
        params=(Param("weight", 1.0, per_model=True, doc="..."), Param("normalize", True)),
        min_models=1,
        reference="Wortsman et al. 2022 (model soups); mergekit 'linear'",
    )
    def merge_tensor(ctx: TensorContext) -> torch.Tensor:
        ...

The function sees one key at a time (:class:`TensorContext`), so the same code serves
:func:`pymerge.merge` on in-memory state dicts and a tensor-by-tensor streaming driver over
files. Everything a driver needs besides loading and saving lives here:

* :func:`get_method` / :func:`merge_methods`: look a method up (unknown names raise with the
  closest known name) or list them all (:class:`MethodInfo`).
* :class:`MergePlan` (built by :func:`plan_merge`): the user's settings validated once, before
  any work; :meth:`MergePlan.resolve` gives one key's parameter values (defaults, per-model
  lists, mergekit-style ``filter`` overrides, layer gradients) and
  :meth:`MergePlan.merge_tensor` runs the method on one key's tensors.
* :func:`layer_positions`: mergekit's gradient position ``t`` of every key.

**Parameter settings** (the values a user passes for one parameter) take mergekit's forms:

* a scalar: every key (and, for a per-model parameter, every model);
* a gradient, a list of numbers: interpolated over the layers (``t = i / (n_layers - 1)`` for
  layer ``i``, ``t = 0`` for keys outside the layer stack, e.g. embeddings and the final norm),
  as mergekit does for ``t: [0, 0.5, 1]``;
* a filter list, ``[{"filter": "self_attn", "value": 0.3}, {"value": 0.5}]``: the first entry
  whose ``filter`` is a substring of the key (``None`` or ``"*"`` match every key) gives the
  value, itself a scalar or a gradient; no match falls back to the default;
* for a per-model parameter, also a list or tuple of K settings, one per model
  (``weight=[0.3, 0.7]``; ``weight=[[0, 1], 0.5]`` gives model 0 a gradient). A flat list of
  exactly K numbers is read as one value per model, never as a gradient; to give every model
  the same gradient use the filter form ``[{"value": [0, 0.5, 1]}]``.

``overrides=[{"filter": "mlp", "density": 0.5, "weight": [1, 2]}, ...]`` (mergekit's
per-slice/per-filter parameters) apply on top: for each parameter, the first override whose
filter matches the key and that names the parameter wins over the parameter's own setting.
"""

from __future__ import annotations

import difflib
import importlib
import math
import numbers
import pkgutil
import re
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "REQUIRED",
    "Param",
    "MethodInfo",
    "TensorContext",
    "StateContext",
    "MergePlan",
    "register_method",
    "get_method",
    "merge_methods",
    "method_names",
    "plan_merge",
    "layer_positions",
    "compute_dtype",
]


class _Required:
    """Marks a parameter without a default (the user must set it)."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()

_KINDS = ("float", "int", "bool", "str")


@dataclass(frozen=True)
class Param:
    """A declared parameter of a merge method.

    Args:
        name: the keyword (mergekit's name where mergekit has the method).
        default: the value when the user sets none; :data:`REQUIRED` for none.
        per_model: one value per model (mergekit's per-model ``parameters``: ``weight``,
            ``density``...); the method then sees a list of K values.
        doc: one line for :func:`merge_methods` and the docs.
        kind: ``"float"``, ``"int"``, ``"bool"`` or ``"str"``; inferred from the default
            when omitted (an int default of a float-like parameter: pass ``kind="float"``).
        low, high: inclusive bounds for numbers (``open_low`` / ``open_high`` make them
            exclusive); ``choices``: the allowed values of a ``str`` parameter.
        nullable: ``None`` is an allowed value (e.g. passthrough's ``scale``).
    """

    name: str
    default: Any = REQUIRED
    per_model: bool = False
    doc: str = ""
    kind: str | None = None
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple[str, ...] | None = None
    nullable: bool = False

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"parameter name {self.name!r} is not an identifier")
        if self.kind is None:
            d = self.default
            if isinstance(d, bool):
                kind = "bool"
            elif isinstance(d, numbers.Integral):
                kind = "int"
            elif isinstance(d, numbers.Real):
                kind = "float"
            elif isinstance(d, str):
                kind = "str"
            else:
                kind = "float"  # REQUIRED or None defaults: numbers unless told otherwise
            object.__setattr__(self, "kind", kind)
        if self.kind not in _KINDS:
            raise ValueError(f"parameter {self.name!r}: kind must be one of {_KINDS}")
        if self.default is not REQUIRED and not (self.default is None and self.nullable):
            self.check(self.default, "the default")

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def check(self, value: Any, where: str = "") -> Any:
        """``value`` as this parameter's type, or a TypeError/ValueError naming the
        parameter (and ``where``: the method, the key, the model)."""
        at = f" ({where})" if where else ""
        if value is None and self.nullable:
            return None
        kind = self.kind
        if kind == "bool":
            if not isinstance(value, bool):
                raise TypeError(f"parameter {self.name!r}{at} must be a bool, got {value!r}")
            return value
        if kind == "str":
            if not isinstance(value, str):
                raise TypeError(f"parameter {self.name!r}{at} must be a str, got {value!r}")
            if self.choices is not None and value not in self.choices:
                raise ValueError(
                    f"parameter {self.name!r}{at} must be one of {list(self.choices)}, "
                    f"got {value!r}"
                )
            return value
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"parameter {self.name!r}{at} must be a number, got {value!r}")
        if kind == "int":
            if not isinstance(value, numbers.Integral):
                if not float(value).is_integer():
                    raise TypeError(f"parameter {self.name!r}{at} must be an int, got {value!r}")
            v: float | int = int(value)
        else:
            v = float(value)
            if not math.isfinite(v):
                raise ValueError(f"parameter {self.name!r}{at} must be finite, got {v!r}")
        lo_bad = self.low is not None and (v <= self.low if self.open_low else v < self.low)
        hi_bad = self.high is not None and (v >= self.high if self.open_high else v > self.high)
        if lo_bad or hi_bad:
            lo = "-inf" if self.low is None else f"{self.low:g}"
            hi = "inf" if self.high is None else f"{self.high:g}"
            lb = "(" if self.open_low or self.low is None else "["
            hb = ")" if self.open_high or self.high is None else "]"
            raise ValueError(
                f"parameter {self.name!r}{at} must be in {lb}{lo}, {hi}{hb}, got {v!r}"
            )
        return v

    def describe(self) -> str:
        d = "required" if self.required else f"default {self.default!r}"
        pm = ", per model" if self.per_model else ""
        return f"{self.name} ({self.kind}, {d}{pm})" + (f": {self.doc}" if self.doc else "")


@dataclass(frozen=True)
class TensorContext:
    """What a per-tensor method sees for one key.

    Attributes:
        key: the state-dict key.
        tensors: the K models' tensors for this key, in the order of ``states`` (after
            alignment when ``align=`` was given); never to be modified.
        base: the base model's tensor, or None.
        params: this key's resolved parameters: a per-model parameter as a list of K values,
            a global one as a scalar (after defaults, gradients and ``filter`` overrides).
        seed: the seed of a stochastic method (draw every random number with
            ``pymerge.ops.rng.uniform(ctx.seed, ctx.key, numel)``); 0 for the others.
        method: the method's name (for error messages).
        t: the key's layer position in [0, 1] (mergekit's gradient ``t``).
    """

    key: str
    tensors: tuple[torch.Tensor, ...]
    base: torch.Tensor | None
    params: Mapping[str, Any]
    seed: int = 0
    method: str = ""
    t: float = 0.0

    @property
    def k(self) -> int:
        return len(self.tensors)

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors[0].dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        """float64 for float64 inputs, float32 otherwise (how pymerge's methods compute)."""
        return compute_dtype(self.dtype)

    def upcast(self) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The tensors and the base in :attr:`compute_dtype` (copies only where needed)."""
        dt = self.compute_dtype
        base = None if self.base is None else self.base.to(dt)
        return [t.to(dt) for t in self.tensors], base


@dataclass(frozen=True)
class StateContext:
    """What a whole-state function sees: a method's optional ``merge_state`` fast path and
    the data-aware methods (``needs_data=True``: ``model`` and ``batches`` are set).

    ``states`` and ``base`` are the (aligned) inputs, never to be modified; ``plan`` resolves
    each key's parameters (``plan.resolve(key)``) and runs the per-tensor function
    (:meth:`tensor_context`, ``plan.merge_tensor``); ``keys`` are the keys to merge (floating
    point ones; the driver copies the others).
    """

    keys: list[str]
    states: list[Mapping[str, torch.Tensor]]
    base: Mapping[str, torch.Tensor] | None
    plan: MergePlan
    params: Mapping[str, Mapping[str, Any]]
    positions: Mapping[str, float]
    progress: bool = False
    model: Any = None
    batches: Any = None

    @property
    def seed(self) -> int:
        return self.plan.seed

    def tensor_context(self, key: str) -> TensorContext:
        return TensorContext(
            key=key,
            tensors=tuple(s[key] for s in self.states),
            base=None if self.base is None else self.base[key],
            params=self.params[key],
            seed=self.plan.seed,
            method=self.plan.info.name,
            t=self.positions.get(key, 0.0),
        )


TensorFn = Callable[[TensorContext], torch.Tensor]
StateFn = Callable[[StateContext], dict]
CheckFn = Callable[[Mapping[str, Any], str, int], None]


@dataclass(frozen=True)
class MethodInfo:
    """A registered method, as :func:`merge_methods` lists it.

    Attributes:
        name: the method's name (``pymerge.merge(name, ...)``).
        params: its declared parameters (:class:`Param`, defaults and docs).
        base: ``"required"``, ``"optional"`` or ``"none"`` (``base=`` refused).
        min_models, max_models: how many models ``states`` must hold (``max_models`` None:
            no limit); the base is not counted.
        reference: the paper and, where it has the method, mergekit's name for it.
        needs_data: a data-aware method (``model=`` and ``batches=`` required).
        stochastic: draws random numbers (a ``seed`` parameter is added).
        doc: the first paragraph of the method function's docstring.
        merge_tensor: the per-tensor function (None for whole-model data-aware methods).
        merge_state: an optional whole-state function (fast path, or the data-aware merge).
        check: an optional per-key validation of resolved parameters (``(params, key, k)``),
            run for every key before any work.
        module: the module that registered it.
    """

    name: str
    params: tuple[Param, ...]
    base: str
    min_models: int
    max_models: int | None
    reference: str
    needs_data: bool
    stochastic: bool
    doc: str
    merge_tensor: TensorFn | None = field(repr=False, default=None)
    merge_state: StateFn | None = field(repr=False, default=None)
    check: CheckFn | None = field(repr=False, default=None)
    module: str = ""

    @property
    def needs_base(self) -> bool:
        return self.base == "required"

    @property
    def param_names(self) -> list[str]:
        return [p.name for p in self.params]

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def describe(self) -> str:
        lines = [f"{self.name}: {self.doc}" if self.doc else self.name]
        if self.reference:
            lines.append(f"  reference: {self.reference}")
        models = f"{self.min_models}" + (
            f"..{self.max_models}" if self.max_models != self.min_models else ""
        )
        if self.max_models is None:
            models = f">= {self.min_models}"
        lines.append(f"  models: {models}; base: {self.base}; data: {self.needs_data}")
        lines += [f"  {p.describe()}" for p in self.params]
        return "\n".join(lines)


_REGISTRY: dict[str, MethodInfo] = {}
_LOCK = threading.RLock()
_DISCOVERED = False
_BROKEN: dict[str, str] = {}  # method modules that failed to import -> the error
# modules of this package that are not merge methods (imported by discovery all the same is
# harmless, but these are skipped to keep the first lookup fast)
_NOT_METHODS = frozenset({"registry", "api", "analysis", "stream"})

_SEED = Param("seed", 0, doc="seed of the counter-based random stream (pymerge.ops.rng)", low=0)


def register_method(
    *,
    name: str,
    params: Sequence[Param] = (),
    needs_base: bool | None = None,
    base: str | None = None,
    min_models: int = 1,
    max_models: int | None = None,
    reference: str = "",
    needs_data: bool = False,
    stochastic: bool = False,
    merge_state: StateFn | None = None,
    check: CheckFn | None = None,
    replace: bool = False,
) -> Callable[[Callable], Callable]:
    """Register the decorated function as merge method ``name``; returns it unchanged.

    For ``needs_data=False`` the decorated function is the per-tensor function
    (``fn(ctx: TensorContext) -> Tensor``, returning this key's merged tensor in any floating
    dtype: the driver casts it to the input dtype); ``merge_state`` may add a whole-state fast
    path that must give the same tensors. For ``needs_data=True`` the decorated function is
    the whole-model merge, ``fn(ctx: StateContext) -> dict[str, Tensor]`` (``ctx.model``,
    ``ctx.batches``). ``base``: ``"required"`` / ``"optional"`` / ``"none"``
    (``needs_base=True`` is shorthand for ``"required"``; the default is ``"none"``).
    A stochastic method gets a ``seed`` parameter (``ctx.seed``). Registering a taken name
    raises unless ``replace=True``.
    """
    if base is None:
        base = "required" if needs_base else "none"
    elif needs_base is not None and needs_base != (base == "required"):
        raise ValueError(f"register_method({name!r}): needs_base and base disagree")
    if base not in ("required", "optional", "none"):
        raise ValueError(f"register_method({name!r}): base must be required/optional/none")
    if min_models < 1 or (max_models is not None and max_models < min_models):
        raise ValueError(f"register_method({name!r}): bad model counts")
    params = tuple(params)
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        raise ValueError(f"register_method({name!r}): duplicate parameter names {names}")
    if stochastic and "seed" not in names:
        params = (*params, _SEED)
    if "seed" in names and not stochastic:
        raise ValueError(f"register_method({name!r}): 'seed' is reserved for stochastic methods")

    def decorate(fn: Callable) -> Callable:
        doc = (fn.__doc__ or "").strip().split("\n\n")[0]
        info = MethodInfo(
            name=name,
            params=params,
            base=base,
            min_models=min_models,
            max_models=max_models,
            reference=reference,
            needs_data=needs_data,
            stochastic=stochastic,
            doc=" ".join(doc.split()),
            merge_tensor=None if needs_data else fn,
            merge_state=fn if needs_data else merge_state,
            check=check,
            module=getattr(fn, "__module__", ""),
        )
        with _LOCK:
            old = _REGISTRY.get(name)
            if old is not None and not replace and old.module != info.module:
                raise ValueError(f"merge method {name!r} is already registered by {old.module}")
            _REGISTRY[name] = info
        return fn

    return decorate


def _discover() -> None:
    """Import every method module of this package once (they register on import)."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    with _LOCK:
        if _DISCOVERED:
            return
        package = importlib.import_module(__name__.rpartition(".")[0])
        for mod in pkgutil.iter_modules(package.__path__):
            if mod.name.startswith("_") or mod.name in _NOT_METHODS:
                continue
            name = f"{package.__name__}.{mod.name}"
            try:
                importlib.import_module(name)
            except Exception as e:  # one broken module must not hide every other method
                _BROKEN[name] = f"{type(e).__name__}: {e}"
                warnings.warn(
                    f"{name} failed to import ({_BROKEN[name]}); its merge methods are unavailable",
                    RuntimeWarning,
                    stacklevel=3,
                )
        _DISCOVERED = True


def method_names() -> list[str]:
    """The registered methods' names, sorted."""
    _discover()
    return sorted(_REGISTRY)


def get_method(name: Any) -> MethodInfo:
    """The :class:`MethodInfo` of ``name``; an unknown name raises a ValueError listing the
    known methods and the closest one."""
    _discover()
    if not isinstance(name, str):
        raise TypeError(f"method must be a str (one of {method_names()}), got {name!r}")
    info = _REGISTRY.get(name)
    if info is None:
        norm = name.strip().lower().replace("-", "_")
        info = _REGISTRY.get(norm)
    if info is None:
        known = method_names()
        close = difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        broken = (
            f" (modules that failed to import: {', '.join(sorted(_BROKEN))})" if _BROKEN else ""
        )
        raise ValueError(
            f"unknown merge method {name!r}{hint} Known methods: {', '.join(known)}{broken}"
        )
    return info


def merge_methods() -> list[MethodInfo]:
    """Every registered merge method (:class:`MethodInfo`: name, parameters with defaults and
    docs, base policy, model counts, reference, whether it needs data), sorted by name."""
    _discover()
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------
# parameter settings


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, numbers.Real, str))


def _is_conditional(v: Any) -> bool:
    return isinstance(v, Mapping) or (
        isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(e, Mapping) for e in v)
    )


def _is_gradient(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(_is_scalar(e) for e in v)


def _check_setting(p: Param, setting: Any, where: str) -> Any:
    """Validate a single-model setting (scalar, gradient or filter list) and return it in a
    normalised form: a scalar, ``("grad", values)`` or ``("cond", [(filter, setting)...])``."""
    if _is_conditional(setting):
        items = [setting] if isinstance(setting, Mapping) else list(setting)
        out = []
        for i, c in enumerate(items):
            extra = set(c) - {"filter", "value"}
            if extra or "value" not in c:
                raise ValueError(
                    f"parameter {p.name!r} ({where}): a filter entry takes the keys "
                    f"'filter' and 'value', got {sorted(c)} in entry {i}"
                )
            flt = c.get("filter")
            if flt is not None and not isinstance(flt, str):
                raise TypeError(f"parameter {p.name!r} ({where}): filter must be a str or None")
            value = c["value"]
            if _is_conditional(value):
                raise ValueError(f"parameter {p.name!r} ({where}): filter entries do not nest")
            out.append((flt, _check_setting(p, value, where)))
        return ("cond", out)
    if _is_gradient(setting):
        values = [p.check(e, where) for e in setting]
        return ("grad", values)
    if _is_scalar(setting):
        return p.check(setting, where)
    raise TypeError(
        f"parameter {p.name!r} ({where}): expected a value, a list of values (a gradient over "
        f"the layers) or filter entries [{{'filter': ..., 'value': ...}}], got {setting!r}"
    )


_UNSET: Any = object()


def _evaluate(setting: Any, key: str, t: float) -> Any:
    """One normalised setting at ``key`` / layer position ``t``; ``_UNSET`` when no filter
    matched."""
    if isinstance(setting, tuple) and len(setting) == 2 and setting[0] == "cond":
        for flt, value in setting[1]:
            if flt is None or flt == "*" or flt in key:
                return _evaluate(value, key, t)
        return _UNSET
    if isinstance(setting, tuple) and len(setting) == 2 and setting[0] == "grad":
        values = setting[1]
        numeric = all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values)
        if not numeric:
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * values[i0] + frac * values[i1]
    return setting


def _close(name: str, names: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(names), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


class MergePlan:
    """A method with the user's settings, validated once: the per-key parameter resolution
    every driver (in-memory or streaming) calls.

    Built by :func:`plan_merge`. :meth:`resolve` gives one key's parameter values,
    :meth:`context` a :class:`TensorContext`, :meth:`merge_tensor` runs the method on one
    key's tensors (checks, resolution, the call, the cast back to the input dtype).
    """

    def __init__(
        self,
        info: MethodInfo,
        settings: Mapping[str, Any],
        overrides: list[tuple[str | None, dict[str, Any]]],
        n_models: int,
        has_base: bool,
    ) -> None:
        self.info = info
        self.n_models = n_models
        self.has_base = has_base
        self._settings = dict(settings)  # name -> normalised setting (per model: a list of K)
        self._overrides = overrides
        self._params = {p.name: p for p in info.params}
        self.seed = int(self._scalar_seed()) if info.stochastic else 0

    def _scalar_seed(self) -> int:
        s = self._settings.get("seed", _UNSET)
        if s is _UNSET:
            return 0
        if isinstance(s, tuple):
            raise ValueError(f"{self.info.name}: seed must be one int, not a gradient or filter")
        return s

    def _value(self, p: Param, setting: Any, key: str, t: float) -> Any:
        if p.per_model:
            out = []
            for i, s in enumerate(setting):
                v = _evaluate(s, key, t)
                if v is _UNSET:
                    v = self._default(p, key, f"model {i}")
                out.append(p.check(v, f"{self.info.name}, key {key!r}, model {i}"))
            return out
        v = _evaluate(setting, key, t)
        if v is _UNSET:
            v = self._default(p, key, "")
        return p.check(v, f"{self.info.name}, key {key!r}")

    def _default(self, p: Param, key: str, who: str) -> Any:
        if p.required:
            at = f" for {who}" if who else ""
            raise ValueError(
                f"{self.info.name}: parameter {p.name!r} is required{at} and no setting "
                f"matched key {key!r}"
            )
        return p.default

    def resolve(self, key: str, t: float = 0.0) -> dict[str, Any]:
        """The parameters of ``key`` (layer position ``t``, see :func:`layer_positions`):
        per-model parameters as lists of K values, global ones as scalars. Raises a
        ValueError naming the key and parameter for a missing required value or an override
        that resolves out of range."""
        out: dict[str, Any] = {}
        for p in self.info.params:
            setting = _UNSET
            for flt, values in self._overrides:
                if p.name in values and (flt is None or flt == "*" or flt in key):
                    setting = values[p.name]
                    break
            if setting is _UNSET:
                setting = self._settings.get(p.name, _UNSET)
            if setting is _UNSET:
                if p.required:
                    raise ValueError(
                        f"{self.info.name}: parameter {p.name!r} is required "
                        f"(key {key!r}); the method's parameters: {self.describe_params()}"
                    )
                v = p.default
                out[p.name] = [v] * self.n_models if p.per_model else v
                continue
            out[p.name] = self._value(p, setting, key, t)
        if self.info.check is not None:
            self.info.check(out, key, self.n_models)
        return out

    def describe_params(self) -> str:
        return ", ".join(p.describe() for p in self.info.params) or "(none)"

    def context(
        self,
        key: str,
        tensors: Sequence[torch.Tensor],
        base: torch.Tensor | None = None,
        *,
        t: float = 0.0,
        params: Mapping[str, Any] | None = None,
    ) -> TensorContext:
        """The :class:`TensorContext` of one key (``params``: already resolved ones)."""
        return TensorContext(
            key=key,
            tensors=tuple(tensors),
            base=base,
            params=self.resolve(key, t) if params is None else params,
            seed=self.seed,
            method=self.info.name,
            t=t,
        )

    def merge_tensor(
        self,
        key: str,
        tensors: Sequence[torch.Tensor],
        base: torch.Tensor | None = None,
        *,
        t: float = 0.0,
        params: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        """Merge one key: the method's per-tensor function on ``tensors`` (and ``base``),
        cast to the input dtype. A non-floating tensor (an integer buffer) is not merged:
        it is copied from the base when there is one, else from the first model. The result
        never shares memory with an input."""
        fn = self.info.merge_tensor
        if fn is None:
            raise TypeError(
                f"{self.info.name} is a whole-model (data-aware) method: it has no per-tensor "
                "function; call pymerge.merge(...) with model= and batches="
            )
        first = tensors[0]
        if not (first.is_floating_point() or first.is_complex()):
            src = base if base is not None else first
            return src.clone()
        out = fn(self.context(key, tensors, base, t=t, params=params))
        if not isinstance(out, torch.Tensor) or out.shape != first.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise TypeError(
                f"merge method {self.info.name} returned {got} for key {key!r}, expected a "
                f"tensor of shape {tuple(first.shape)}"
            )
        if out.dtype != first.dtype:
            out = out.to(first.dtype)
        if _shares_memory(out, tensors, base):
            out = out.clone()
        return out


def _shares_memory(out: torch.Tensor, tensors: Sequence[torch.Tensor], base: Any) -> bool:
    if out.numel() == 0:
        return False
    ptr = out.untyped_storage().data_ptr()
    ins = [*tensors, *([base] if base is not None else [])]
    return any(t.numel() and t.untyped_storage().data_ptr() == ptr for t in ins)


def plan_merge(
    method: str | MethodInfo,
    n_models: int,
    *,
    has_base: bool = False,
    weights: Any = None,
    overrides: Any = None,
    **params: Any,
) -> MergePlan:
    """Validate a method's settings for ``n_models`` models (and a base or not) before any
    work, and return the :class:`MergePlan` that resolves them per key.

    ``weights`` is shorthand for the per-model parameter ``weight`` (methods without one
    refuse it). Errors (all before any tensor is touched): an unknown method or parameter
    (naming it, the closest name and the method's parameters), a missing required parameter,
    a per-model list of the wrong length, a value of the wrong type or out of range
    (non-finite weights, densities outside (0, 1]...), a missing or unwanted base, too few or
    too many models, malformed overrides.
    """
    info = method if isinstance(method, MethodInfo) else get_method(method)
    name = info.name
    if info.max_models is not None and info.min_models == info.max_models:
        need = f"exactly {info.min_models}"
    elif info.max_models is None:
        need = f"at least {info.min_models}"
    else:
        need = f"{info.min_models} to {info.max_models}"
    if n_models < info.min_models or (info.max_models is not None and n_models > info.max_models):
        base_note = " (the base is passed separately as base=)" if info.base != "none" else ""
        raise ValueError(f"{name} needs {need} models in states{base_note}, got {n_models}")
    if info.base == "required" and not has_base:
        raise ValueError(f"{name} needs a base model: pass base=<state dict of the base model>")
    if info.base == "none" and has_base:
        raise ValueError(f"{name} takes no base model (base=); put every model in states")
    by_name = {p.name: p for p in info.params}
    if weights is not None:
        if "weight" not in by_name:
            raise ValueError(
                f"{name} has no per-model 'weight' parameter, so weights= does not apply; its "
                f"parameters: {', '.join(by_name) or '(none)'}"
            )
        if "weight" in params:
            raise ValueError(f"{name}: pass weights= or weight=, not both")
        params["weight"] = weights
    settings: dict[str, Any] = {}
    for pname, value in params.items():
        p = by_name.get(pname)
        if p is None:
            raise ValueError(
                f"unknown parameter {pname!r} for merge method {name}{_close(pname, by_name)} "
                f"Its parameters: {', '.join(f'{q.name}={q.default!r}' for q in info.params)}"
                if info.params
                else f"unknown parameter {pname!r}: merge method {name} takes no parameters"
            )
        settings[pname] = _normalise(p, value, n_models, name)
    for p in info.params:
        if p.required and p.name not in settings and not _overridden(overrides, p.name):
            raise ValueError(
                f"{name}: parameter {p.name!r} is required; its parameters: "
                + ", ".join(q.describe() for q in info.params)
            )
    ovs = _check_overrides(overrides, by_name, n_models, name)
    return MergePlan(info, settings, ovs, n_models, has_base)


def _normalise(p: Param, value: Any, n_models: int, method: str) -> Any:
    where = method
    if not p.per_model:
        return _check_setting(p, value, where)
    if isinstance(value, (list, tuple)) and not _is_conditional(value):
        if len(value) != n_models:
            raise ValueError(
                f"parameter {p.name!r} of {method} takes one value for all models or one per "
                f"model ({n_models}); got a list of {len(value)}"
            )
        return [_check_setting(p, v, f"{where}, model {i}") for i, v in enumerate(value)]
    s = _check_setting(p, value, where)
    return [s] * n_models


def _overridden(overrides: Any, name: str) -> bool:
    return isinstance(overrides, (list, tuple)) and any(
        isinstance(o, Mapping) and name in o for o in overrides
    )


def _check_overrides(
    overrides: Any, by_name: Mapping[str, Param], n_models: int, method: str
) -> list[tuple[str | None, dict[str, Any]]]:
    if overrides is None:
        return []
    if isinstance(overrides, Mapping) or not isinstance(overrides, (list, tuple)):
        raise TypeError(
            "overrides must be a list of dicts like [{'filter': 'self_attn', 'density': 0.5}], "
            f"got {type(overrides).__name__}"
        )
    out = []
    for i, o in enumerate(overrides):
        if not isinstance(o, Mapping):
            raise TypeError(f"overrides[{i}] must be a dict, got {type(o).__name__}")
        flt = o.get("filter")
        if flt is not None and not isinstance(flt, str):
            raise TypeError(f"overrides[{i}]['filter'] must be a str, got {flt!r}")
        values = {}
        for pname, value in o.items():
            if pname == "filter":
                continue
            p = by_name.get(pname)
            if p is None:
                raise ValueError(
                    f"overrides[{i}]: unknown parameter {pname!r} for merge method "
                    f"{method}{_close(pname, by_name)} Its parameters: "
                    f"{', '.join(by_name) or '(none)'}"
                )
            if pname == "seed":
                raise ValueError(f"overrides[{i}]: the seed is one value for the whole merge")
            values[pname] = _normalise(p, value, n_models, f"{method}, overrides[{i}]")
        out.append((flt, values))
    return out


_LAYER = re.compile(r"^(.*?)\.(\d+)(?:\.|$)")


def layer_positions(keys: Iterable[str]) -> dict[str, float]:
    """mergekit's gradient position ``t`` of every key: ``i / (n - 1)`` for a key of layer
    ``i`` of ``n`` (the first dotted integer of the key, e.g. ``model.layers.3.mlp...``;
    ``n`` counts the layers under the same prefix; a single layer gets ``t = 1`` as in
    mergekit), and ``0`` for keys outside a layer stack (embeddings, final norm, head)."""
    keys = list(keys)
    found: dict[str, tuple[str, int]] = {}
    top: dict[str, int] = {}
    for k in keys:
        m = _LAYER.match(k)
        if m:
            prefix, idx = m.group(1), int(m.group(2))
            found[k] = (prefix, idx)
            top[prefix] = max(top.get(prefix, -1), idx)
    out = {}
    for k in keys:
        if k not in found:
            out[k] = 0.0
            continue
        prefix, idx = found[k]
        n = top[prefix] + 1
        out[k] = idx / (n - 1) if n > 1 else 1.0
    return out
