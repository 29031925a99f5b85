"""The self-check of a traced spec: a random permutation must not change the model's outputs.

With stock initialisation (norm scales 1, biases and running means 0, layer scales 1e-6) a
wrongly permuted norm or scale changes nothing, so the check runs a float64 copy whose 1-D
state entries (norm scales and biases, running statistics, biases, layer scales) are
re-randomised first. It compares the copy's outputs on the example inputs before and after
applying a random permutation of every group; on a difference it tries each group (a head
structure's groups together) alone, in model order, to name the ones at fault.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pymerge.spec.apply import apply_permutation, identity_permutation, random_permutation
from pymerge.spec.spec import ActivationPoint, PermutationSpec

__all__ = ["SpecCheckError", "check_spec", "perturb_state", "split_inputs"]

#: a float64 output may differ by this much relative to the output scale (a wrong permutation
#: changes outputs by a sizeable fraction of it; models computing parts in float32 inside,
#: like Hugging Face's RMSNorm, reorder float32 sums by ~1e-7)
RTOL = 1e-5
#: when the model cannot run in float64 (its own dtype: float32; half precision 5e-2)
RTOL_LOW = 1e-3
#: the largest copy of the model the check makes (float64 first, else the model's dtype)
MAX_COPY = 4 * 2**30


class SpecCheckError(ValueError):
    """A traced spec failed its self-check: permuting ``groups`` changes the outputs.

    Attributes:
        groups: every group whose random permutation alone changes the outputs, in model
            order (head structures: their groups together); empty when only the groups
            together do.
        spec: the spec that failed (use it at your own risk, or freeze ``groups``).
    """

    def __init__(self, message: str, groups: list[str], spec: PermutationSpec) -> None:
        super().__init__(message)
        self.groups = groups
        self.spec = spec


def split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """Example inputs as ``(args, kwargs)``: a tensor is one positional input, a tuple or
    list the positional inputs, a dict the keyword inputs."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def perturb_state(model: nn.Module, seed: int = 0) -> None:
    """Re-randomise every floating 1-D entry of ``model``'s state dict in place: running
    variances to ``U(0.5, 1.5)``, everything else (norm scales and biases, running means,
    biases, layer scales) by ``U(-1, 1)`` (stock values hide wrongly permuted norms)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point() or t.ndim != 1 or t.is_meta:
                continue
            noise = torch.rand(t.shape, generator=g, dtype=torch.float64).to(t.dtype)
            t.copy_(0.5 + noise if name.endswith("running_var") else t + 2 * noise - 1)


def _tensors(out: Any) -> list[torch.Tensor]:
    """The floating tensors of an output (tensors, tuples, lists, dicts, model outputs)."""
    found: list[torch.Tensor] = []
    stack = [out]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            if x.is_floating_point() or x.is_complex():
                found.append(x)
        elif isinstance(x, Mapping):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return found


class _Runner:
    """A perturbed copy of the model, its reference outputs, and comparisons."""

    def __init__(
        self, model: nn.Module, args: tuple, kwargs: dict, seed: int, watch: list[str]
    ) -> None:
        self.error: str | None = None
        self.ref: list[torch.Tensor] | None = None
        self.watch = watch
        self.seen: dict[str, list[Any]] = {}
        size = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
        dtypes = [d for d in (torch.float64, None) if size * _itemsize(d, model) <= MAX_COPY]
        if not dtypes:
            self.error = (
                f"a {size * _itemsize(None, model) / 2**30:.1f} GiB copy is over the "
                f"{MAX_COPY / 2**30:.0f} GiB the check may take: run pymerge.spec.check_spec "
                "on a small configuration of the same architecture"
            )
            return
        for dtype in dtypes:
            try:
                self._setup(model, args, kwargs, dtype, seed)
                self.rtol = _rtol(dtype or _model_dtype(model))
                return
            except Exception as e:  # noqa: BLE001 - the model may not run in float64
                why = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                self.error = f"the model could not run on the example inputs ({why})"
        self.ref = None

    def _setup(self, model: nn.Module, args: tuple, kwargs: dict, dtype: Any, seed: int) -> None:
        m = copy.deepcopy(model).eval()
        if dtype is not None:
            m = m.to(dtype)

        def cast(x: Any) -> Any:
            if isinstance(x, torch.Tensor) and x.is_floating_point() and dtype is not None:
                return x.to(dtype)
            return x

        self.args = tuple(cast(a) for a in args)
        self.kwargs = {k: cast(v) for k, v in kwargs.items()}
        stock = {k: v.clone() for k, v in m.state_dict().items()}
        perturb_state(m, seed)
        self.model = m
        self.state = {k: v.clone() for k, v in m.state_dict().items()}
        ref = self._run()
        if not all(bool(torch.isfinite(t).all()) for t in ref):  # too perturbed: stock values
            m.load_state_dict(stock)
            self.state = stock
            ref = self._run()
        self.ref = ref
        self._watch_outputs()
        self.scale = max((float(t.abs().max()) for t in ref if t.numel()), default=0.0)

    def _watch_outputs(self) -> None:
        """One more forward with hooks on the ``watch`` modules: what each one returns."""
        handles = []
        for name in self.watch:
            try:
                mod = self.model.get_submodule(name)
            except AttributeError:
                continue

            def hook(_m: nn.Module, _i: Any, out: Any, name: str = name) -> None:
                self.seen.setdefault(name, []).append(
                    tuple(out.shape) if isinstance(out, torch.Tensor) else None
                )

            handles.append(mod.register_forward_hook(hook))
        if not handles:
            return
        try:
            self._run()
        finally:
            for h in handles:
                h.remove()

    def _run(self) -> list[torch.Tensor]:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)
            return [t.detach().clone() for t in _tensors(self.model(*self.args, **self.kwargs))]

    def diff(self, spec: PermutationSpec, perm: dict) -> float:
        """Max abs difference of the outputs after applying ``perm`` (inf: shapes differ)."""
        self.model.load_state_dict(apply_permutation(spec, perm, self.state))
        try:
            out = self._run()
        finally:
            self.model.load_state_dict(self.state)
        if [a.shape for a in out] != [b.shape for b in self.ref]:
            return math.inf
        d = [float((a - b).abs().max()) for a, b in zip(out, self.ref, strict=True) if a.numel()]
        return max(d, default=0.0)

    def bad(self, d: float) -> bool:
        return not d <= self.rtol * max(self.scale, 1e-12)


def _choose_points(
    spec: PermutationSpec, points: Mapping[str, list[ActivationPoint]], runner: _Runner
) -> None:
    sizes = spec.group_sizes(runner.state)
    for g, cands in points.items():
        if g not in spec.perm_to_axes:
            continue
        spec.activation_points.pop(g, None)
        for p in cands:
            seen = runner.seen.get(p.module, [])
            shp = seen[0] if len(seen) == 1 else None
            if shp is not None and -len(shp) <= p.dim < len(shp) and shp[p.dim] == sizes[g]:
                spec.activation_points[g] = p
                break


def _units(spec: PermutationSpec, state: Mapping[str, Any]) -> list[list[str]]:
    """Groups in model order (of their first parameter); a head structure's groups together."""
    order = {k: i for i, k in enumerate(state)}
    first = {
        g: min((order.get(r.param, len(order)) for r in refs), default=len(order))
        for g, refs in spec.perm_to_axes.items()
    }
    units: list[list[str]] = []
    seen: set[str] = set()
    for g in sorted(spec.perm_to_axes, key=lambda g: (first[g], g)):
        if g in seen:
            continue
        h = spec.head_of(g)
        unit = sorted(h.groups, key=lambda x: (first[x], x)) if h is not None else [g]
        seen.update(unit)
        units.append(unit)
    return units


def _itemsize(dtype: torch.dtype | None, model: nn.Module) -> int:
    return (dtype or _model_dtype(model)).itemsize


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _rtol(dtype: torch.dtype) -> float:
    if dtype == torch.float64:
        return RTOL
    return RTOL_LOW if dtype == torch.float32 else 5e-2


def run_check(
    model: nn.Module,
    spec: PermutationSpec,
    args: tuple,
    kwargs: dict,
    *,
    seed: int = 0,
    points: Mapping[str, list[ActivationPoint]] | None = None,
) -> tuple[list[str], str]:
    """``(failing groups, description)``: groups empty and description ``""`` when the spec
    passes; description starting ``"skipped"`` when the model could not be run. With
    ``points`` (each group's activation point candidates, best first), the spec's
    activation points become the first candidate whose module is called once and returns a
    tensor with the group's features on the point's dim (none: no point)."""
    watch = sorted({p.module for lst in (points or {}).values() for p in lst})
    runner = _Runner(model, args, kwargs, seed, watch)
    if runner.ref is None:
        return [], f"skipped: {runner.error}"
    if points is not None:
        _choose_points(spec, points, runner)
    if not spec.perm_to_axes:
        return [], ""
    perm = random_permutation(spec, runner.state, seed=seed + 1)
    d = runner.diff(spec, perm)
    if not runner.bad(d):
        return [], ""
    ident = identity_permutation(spec, runner.state)
    failing: list[str] = []
    first_d = d
    for unit in _units(spec, runner.state):
        one = dict(ident)
        one.update({g: perm[g] for g in unit})
        du = runner.diff(spec, one)
        if runner.bad(du):
            if not failing:
                first_d = du
            failing.extend(unit)
    what = (
        f"permuting group {failing[0]!r} alone changes the outputs by {first_d:.3g}"
        if failing
        else f"a random permutation of all groups changes the outputs by {d:.3g} (no group "
        "does alone)"
    )
    return failing, f"{what} (output scale {runner.scale:.3g})"


def check_spec(
    model: nn.Module, spec: PermutationSpec, example_inputs: Any, *, seed: int = 0
) -> list[str]:
    """The groups of ``spec`` whose random permutation changes ``model``'s outputs on
    ``example_inputs`` (a tensor, a tuple of positional inputs or a dict of keyword inputs),
    in model order (a head structure's groups together); ``[]`` when a random permutation of
    all groups keeps them (float64, relative tolerance 1e-5, 1-D state entries re-randomised
    first on a copy; ``model`` is not modified). When only all groups together change them,
    every group is returned. Raises ``ValueError`` when the check cannot run (the model
    fails on the inputs, or a copy would exceed 4 GiB)."""
    args, kwargs = split_inputs(example_inputs)
    failing, what = run_check(model, spec, args, kwargs, seed=seed)
    if what.startswith("skipped"):
        raise ValueError(f"check_spec: {what}")
    if what and not failing:
        return sorted(spec.perm_to_axes)
    return failing
