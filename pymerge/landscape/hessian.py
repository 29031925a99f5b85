"""Hessian spectra of the training loss: top eigenvalues, trace and spectral density.

The Hessian is never formed. Every method is built on Hessian-vector products (HVPs)

    H v = Σ_b (n_b / N) ∇²L_b(θ) v,

the Hessian of the **mean loss over all the data** (``loss_fn`` returns the mean over its
batch of ``n_b`` samples; N = Σ n_b), streamed batch by batch, so the data need not fit in
memory at once: one HVP is one pass over ``batches``.

* **HVPs** are forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad`` of
  ``torch.func.functional_call``): no ``create_graph`` double backward, and several vectors
  share one pass where that pays (``torch.func.vmap`` over the tangents: the trace's probes and
  the density's lanes). Double backward (``torch.autograd.grad(..., create_graph=True)``) is
  the fallback, used only when forward-mode AD fails on the model (e.g. a custom
  ``autograd.Function`` without a ``jvp``); ``hvp="double"`` forces it. The result's
  ``extras["hvp"]`` says which ran.
* **Top eigenvalues** (:func:`hessian_eigenvalues`): Lanczos with full reorthogonalisation
  (every new vector orthogonalised twice against all earlier ones, so the Ritz values stay
  clean of ghost copies) or power iteration with deflation (as PyHessian, Yao et al. 2020).
  Both stop when every wanted eigenvalue estimate changed by less than ``tol`` relative to
  the previous iteration, ``|λ_j − λ_{j-1}| / (|λ_{j-1}| + 1e-6) < tol`` (PyHessian's rule),
  or at ``max_iter``; Lanczos also reports the residual bound ``‖Hv − λv‖`` of each Ritz pair.
* **Trace** (:func:`hessian_trace`): Hutchinson's estimator E[vᵀHv] with Rademacher probes,
  with its standard error; it stops when the standard error falls below ``tol`` times the
  estimate, or at ``max_iter`` probes.
* **Density** (:func:`hessian_density`): stochastic Lanczos quadrature (Ghorbani et al.
  2019): per Rademacher probe, the eigenvalues (nodes) of the Lanczos tridiagonal matrix and
  the squared first components of its eigenvectors (weights), and a Gaussian-smoothed density
  on a grid.

Every function works on the whole model or on a part of it: ``params=`` selects the
parameters (the Hessian block of those parameters, the others held fixed), and a dict
``name -> selection`` computes several blocks at once (``result.per_group``).
:func:`layer_groups` gives one group per layer. The model runs in eval mode (as PyHessian
does: BatchNorm uses its running statistics, dropout is off) on its own device; the user's
model is never modified: its parameters, buffers, ``.grad`` and training flags are as they
were.
"""

from __future__ import annotations

import fnmatch
import math
import re
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

from pymerge._util.args import check_int, check_seed
from pymerge._util.progress import progress_bar
from pymerge.align._hooks import eval_mode, model_device, to_device
from pymerge.spec.spec import PermutationSpec

__all__ = [
    "HessianResult",
    "hessian_eigenvalues",
    "hessian_trace",
    "hessian_density",
    "hessian_vector_product",
    "layer_groups",
]

ParamSelection = str | Sequence[str] | None
Which = Literal["largest", "smallest", "magnitude"]
_WHICH = ("largest", "smallest", "magnitude")
_HVP_MODES = ("auto", "forward", "double")
# the trace's probes and the density's lanes share one pass over the data this many at a time
_PROBES_PER_PASS = 4
# with cache=None (auto), batches' linearisations are kept when their estimated graphs take
# at most this many bytes on the CPU (a quarter of the free memory on a GPU)
_CACHE_BYTES = 2 << 30


@dataclass
class HessianResult:
    """What :func:`hessian_eigenvalues`, :func:`hessian_trace` and :func:`hessian_density`
    return.

    Attributes:
        values: float64 array: the eigenvalues (``[k]``, in the order ``which`` asks for:
            largest first for ``"largest"`` and ``"magnitude"``, smallest first for
            ``"smallest"``), the trace estimate (``[1]``), or the density's nodes of all
            probes, concatenated (``[probes * steps]``). Empty for a dict of groups.
        vectors: the eigenvectors, one ``name -> Tensor`` dict (parameter shapes, unit norm
            over the selected parameters) per eigenvalue; ``None`` for trace and density.
        std_err: the trace's standard error (``[1]``); for eigenvalues, the residual bound
            ``‖Hv − λv‖`` of each (``[k]``, an upper bound on the eigenvalue's error); ``None``
            for the density.
        iterations: Lanczos steps, power iterations (all eigenvalues together) or probes.
        seconds: wall time.
        method: ``"lanczos"``, ``"power"``, ``"hutchinson"`` or ``"slq"``.
        converged: the tolerance was met before the iteration cap.
        params: the parameter names of the block.
        per_group: group name -> :class:`HessianResult` when ``params`` was a dict.
        grid, density: the density's grid and Gaussian-smoothed density (same length).
        nodes, weights: the density's quadrature, ``[probes, steps]`` each (weights of each
            probe sum to 1).
        samples: the trace's per-probe values vᵀHv.
        extras: ``hvp`` (``"forward-over-reverse"`` or ``"double backward"``), ``hvps`` (HVP
            evaluations, each one pass over the data), ``samples_seen`` (N), ``sigma``
            (density), ``dim`` (number of parameters in the block).
    """

    values: np.ndarray
    vectors: list[dict[str, Tensor]] | None = None
    std_err: np.ndarray | None = None
    iterations: int = 0
    seconds: float = 0.0
    method: str = ""
    converged: bool = True
    params: list[str] = field(default_factory=list)
    per_group: dict[str, HessianResult] = field(default_factory=dict)
    grid: np.ndarray | None = None
    density: np.ndarray | None = None
    nodes: np.ndarray | None = None
    weights: np.ndarray | None = None
    samples: np.ndarray | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, group: str) -> HessianResult:
        return self.per_group[group]

    @property
    def value(self) -> float:
        """The first value (the top eigenvalue, or the trace)."""
        if self.values.size == 0:
            raise ValueError("this result has one result per group: use result.per_group")
        return float(self.values[0])


# --------------------------------------------------------------------------- parameters


def layer_groups(model: nn.Module, *, trainable_only: bool = True) -> dict[str, list[str]]:
    """One group per module that owns parameters directly: ``module name -> its parameter
    names`` (``params=layer_groups(model)`` gives per-layer spectra)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    groups: dict[str, list[str]] = {}
    for mod_name, module in model.named_modules():
        names = [
            f"{mod_name}.{n}" if mod_name else n
            for n, p in module.named_parameters(recurse=False)
            if p.requires_grad or not trainable_only
        ]
        if names:
            groups[mod_name or "(model)"] = names
    return groups


def _match(pattern: str, names: Sequence[str]) -> list[str]:
    hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    if hits:
        return hits
    try:
        rx = re.compile(pattern)
    except re.error:
        return []
    return [n for n in names if rx.fullmatch(n)]


def _resolve_one(
    sel: str, names: Sequence[str], spec: PermutationSpec | None, what: str
) -> list[str]:
    """One string: a parameter name, a spec group (with ``spec``), a module name, a glob or
    a regex, tried in that order."""
    if not isinstance(sel, str) or not sel:
        raise TypeError(f"{what}: expected a non-empty str, got {sel!r}")
    if sel in names:
        return [sel]
    if spec is not None and sel in spec.perm_to_axes:  # with spec=, group names come first
        keys = {r.param for r in spec.perm_to_axes[sel]}
        hits = [n for n in names if n in keys]
        if hits:
            return hits
    prefix = [n for n in names if n.startswith(sel + ".")]
    if prefix:
        return prefix
    hits = _match(sel, names)
    if hits:
        return hits
    shown = ", ".join(repr(n) for n in names[:6]) + (", ..." if len(names) > 6 else "")
    raise ValueError(
        f"{what} {sel!r} matches no parameter of the model (not a parameter name, module "
        f"name{', spec group' if spec is not None else ''}, glob or regex); parameters: {shown}"
    )


def _resolve(
    sel: ParamSelection, model: nn.Module, spec: PermutationSpec | None, what: str = "params"
) -> list[str]:
    named = dict(model.named_parameters())
    names = list(named)
    if sel is None:
        out = [n for n, p in named.items() if p.requires_grad and p.is_floating_point()]
        if not out:
            raise ValueError("the model has no trainable floating-point parameters")
        return out
    if isinstance(sel, str):
        chosen = set(_resolve_one(sel, names, spec, what))
    elif isinstance(sel, Iterable) and not isinstance(sel, Mapping):
        items = list(sel)
        if not items:
            raise ValueError(f"{what} is an empty list: name at least one parameter")
        chosen = set()
        for i, s in enumerate(items):
            chosen.update(_resolve_one(s, names, spec, f"{what}[{i}]"))
    else:
        raise TypeError(
            f"{what} must be None, a str (name, module, spec group, glob or regex), a list of "
            f"them, or a dict group -> selection; got {type(sel).__name__}"
        )
    out = [n for n in names if n in chosen]
    bad = [n for n in out if not named[n].is_floating_point()]
    if bad:
        raise TypeError(f"parameter {bad[0]!r} is not floating point: it has no Hessian")
    return out


def _groups(
    params: ParamSelection | Mapping[str, ParamSelection],
    model: nn.Module,
    spec: PermutationSpec | None,
) -> dict[str, list[str]] | None:
    if not isinstance(params, Mapping):
        return None
    if not params:
        raise ValueError("params is an empty dict: give at least one group")
    return {str(g): _resolve(sel, model, spec, f"params[{g!r}]") for g, sel in params.items()}


# --------------------------------------------------------------------------- batches


def _split_batch(batch: Any, i: int) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        f"batch {i} must be an (inputs, targets) pair, got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )


def _batch_size(x: Any, y: Any, i: int) -> int:
    for t in (x, y):
        if isinstance(t, Tensor) and t.dim() > 0:
            n = int(t.shape[0])
            if n == 0:
                raise ValueError(f"batch {i} is empty (0 samples)")
            return n
    return 1


def reiterable_batches(batches: Iterable[Any], what: str = "batches") -> Iterable[Any]:
    """``batches`` as something that can be iterated again (a one-shot iterator is drawn
    into a list); an empty one, or a bare tensor, is refused with a clear error."""
    if isinstance(batches, Tensor) or not isinstance(batches, Iterable):
        raise TypeError(
            f"{what} must be an iterable of (inputs, targets) pairs (a list or a DataLoader), "
            f"got {type(batches).__name__}"
        )
    if iter(batches) is batches:
        batches = list(batches)
    for _ in batches:
        return batches
    raise ValueError(f"{what} is empty: need at least one (inputs, targets) pair")


def iter_batches(batches: Iterable[Any], device: torch.device):
    """``(i, x, y, n)`` for each batch, moved to ``device``."""
    for i, batch in enumerate(batches):
        x, y = _split_batch(batch, i)
        n = _batch_size(x, y, i)
        yield i, to_device(x, device), to_device(y, device), n


def check_loss(loss: Any, i: int, *, need_grad: bool = False) -> Tensor:
    """``loss`` must be a scalar tensor (connected to the parameters when ``need_grad``)."""
    if not isinstance(loss, Tensor):
        raise TypeError(
            f"loss_fn must return a scalar Tensor, got a {type(loss).__name__} on batch {i}"
            + (" (do not call .item() inside loss_fn)" if isinstance(loss, float) else "")
        )
    if loss.dim() != 0:
        raise TypeError(
            f"loss_fn must return a scalar Tensor, got a tensor of shape {tuple(loss.shape)} "
            f"on batch {i} (reduce it, e.g. with reduction='mean')"
        )
    if need_grad and not loss.requires_grad:
        raise ValueError(
            f"loss_fn returned a tensor that does not require grad on batch {i}: it does not "
            f"depend on the parameters (was it detached, or computed under torch.no_grad()?)"
        )
    return loss


def call(model: nn.Module, tensors: Any, x: Any) -> Any:
    """``functional_call(model, tensors, x)`` (a mapping ``x`` as keyword inputs)."""
    if isinstance(x, Mapping):
        return functional_call(model, tensors, (), dict(x), strict=False)
    return functional_call(model, tensors, (x,), strict=False)


# --------------------------------------------------------------------------- operator


class _Operator:
    """v -> H v for the block of ``names`` (flat vectors of the block's length).

    Products are streamed (``"forward"``: ``jvp`` of ``grad``; ``"double"``: autograd double
    backward), recomputing each batch's forward and backward every time, or cached
    (``cache``): each batch's gradient with its graph (``autograd.grad(L_b, θ,
    create_graph=True)``) is built once and differentiated again for every vector
    (``H v = d(g·v)/dθ``), which skips the forward pass and the gradient itself on every
    product at the cost of keeping each batch's graph.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        loss_fn: Callable[[Any, Any], Tensor],
        names: list[str],
        hvp: str,
        cache: bool | None = None,
    ) -> None:
        if hvp not in _HVP_MODES:
            raise ValueError(f"hvp must be one of {_HVP_MODES}, got {hvp!r}")
        if cache not in (None, True, False):
            raise TypeError(f"cache must be None (auto), True or False, got {cache!r}")
        self.model = model
        self.batches = batches
        self.loss_fn = loss_fn
        self.names = names
        self.device = model_device(model)
        named = {k: v.detach() for k, v in model.named_parameters()}
        buffers = {k: v.detach() for k, v in model.named_buffers()}
        self.primal = {n: named[n] for n in names}
        chosen = set(names)
        self.fixed = {**{k: v for k, v in named.items() if k not in chosen}, **buffers}
        dtypes = {t.dtype for t in self.primal.values()}
        if len(dtypes) != 1:
            raise TypeError(
                f"the selected parameters mix dtypes {sorted(map(str, dtypes))}: select "
                f"parameters of one dtype"
            )
        self.dtype = dtypes.pop()
        self.shapes = [self.primal[n].shape for n in names]
        self.numels = [self.primal[n].numel() for n in names]
        self.dim = int(sum(self.numels))
        self.mode = "forward" if hvp == "auto" else hvp
        self.auto = hvp == "auto"
        # auto: cache the linearisations when the batches are in memory and their graphs fit
        self.want_cache = cache if cache is not None else (hvp == "auto")
        self.cache_forced = cache is True
        self.cached: list[tuple[Callable, int]] | None = None
        self.passes = 0
        self.samples: int | None = None
        self._vmap_ok = True
        self._checked = False

    # ---- flat <-> dict
    def unflat(self, vec: Tensor) -> dict[str, Tensor]:
        parts = torch.split(vec, self.numels, dim=-1)
        lead = vec.shape[:-1]
        return {
            n: p.reshape(*lead, *s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)
        }

    def flat(self, d: Mapping[str, Tensor], lead: tuple[int, ...] = ()) -> Tensor:
        return torch.cat([d[n].reshape(*lead, -1) for n in self.names], dim=-1)

    # ---- losses
    def _loss(self, p: Mapping[str, Tensor], x: Any, y: Any, i: int = -1) -> Tensor:
        loss = self.loss_fn(call(self.model, (p, self.fixed), x), y)
        if i == 0 and not self._checked:
            # inside the transforms: a loss that does not depend on p has requires_grad False
            check_loss(loss, 0, need_grad=True)
        return loss

    def _diagnose(self) -> None:
        """Called when an HVP is not finite: name the batch whose loss is not."""
        with torch.no_grad():
            for i, x, y, _ in iter_batches(self.batches, self.device):
                loss = float(self._loss(self.primal, x, y))
                if not math.isfinite(loss):
                    raise ValueError(f"the loss is {loss} on batch {i}: the Hessian is undefined")
        raise ValueError(
            "a Hessian-vector product is not finite although every batch's loss is: the "
            "Hessian overflows the parameters' dtype (try float64)"
        )

    # ---- vectors
    def _many(self, one: Callable, v: dict[str, Tensor]) -> dict[str, Tensor]:
        """``one`` applied to each row of ``v`` (vmapped where the model allows it)."""
        if self._vmap_ok:
            try:
                return vmap(one)(v)
            except (RuntimeError, NotImplementedError):
                self._vmap_ok = False  # an op without a batching rule: one vector at a time
        count = next(iter(v.values())).shape[0]
        outs = [one({n: t[i] for n, t in v.items()}) for i in range(count)]
        return {n: torch.stack([o[n] for o in outs]) for n in self.names}

    # ---- one batch, streamed
    def _fwd(self, x: Any, y: Any, i: int, v: dict[str, Tensor], many: bool) -> dict[str, Tensor]:
        g = grad(lambda p: self._loss(p, x, y, i))

        def one(t: dict[str, Tensor]) -> dict[str, Tensor]:
            return jvp(g, (self.primal,), (t,))[1]

        return self._many(one, v) if many else one(v)

    def _double(
        self, x: Any, y: Any, i: int, v: dict[str, Tensor], many: bool
    ) -> dict[str, Tensor]:
        leaves = {n: t.clone().requires_grad_(True) for n, t in self.primal.items()}
        ps = [leaves[n] for n in self.names]
        with torch.enable_grad():
            loss = self._loss(leaves, x, y, i)
            g = torch.autograd.grad(loss, ps, create_graph=True, allow_unused=True)
            idx = [i for i, gi in enumerate(g) if gi is not None and gi.requires_grad]
            vs = [v[n] for n in self.names]
            count = vs[0].shape[0] if many else 1
            res = []
            for j in range(count):
                full = [torch.zeros_like(p) for p in ps]
                if idx:
                    hv = torch.autograd.grad(
                        [g[i] for i in idx],
                        [ps[i] for i in idx],
                        grad_outputs=[vs[i][j] if many else vs[i] for i in idx],
                        retain_graph=True,
                        allow_unused=True,
                    )
                    for i, h in zip(idx, hv, strict=True):
                        if h is not None:
                            full[i] = h.detach()
                res.append(full)
        if many:
            return {n: torch.stack([r[i] for r in res]) for i, n in enumerate(self.names)}
        return {n: res[0][i] for i, n in enumerate(self.names)}

    def _batch_hvp(
        self, x: Any, y: Any, i: int, v: dict[str, Tensor], many: bool
    ) -> dict[str, Tensor]:
        if self.mode == "double":
            return self._double(x, y, i, v, many)
        try:
            return self._fwd(x, y, i, v, many)
        except (RuntimeError, NotImplementedError) as exc:
            if not self.auto:
                raise
            try:
                out = self._double(x, y, i, v, many)
            except Exception:
                raise exc from None
            self.mode = "double"
            warnings.warn(
                f"forward-mode AD failed on this model ({str(exc).splitlines()[0][:160]}); "
                f"Hessian-vector products fall back to double backward (slower)",
                RuntimeWarning,
                stacklevel=4,
            )
            return out

    # ---- cached linearisations
    def _linearise(self, x: Any, y: Any, i: int, measure: bool = False) -> tuple[Callable, int]:
        """``(vf, bytes of the leaf modules' outputs)``: ``vf(v)`` is ``(H_b v,)`` from the
        batch's gradient graph, kept; the bytes are counted (forward hooks) only with
        ``measure``."""
        seen = [0]

        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, Tensor):
                    seen[0] += t.numel() * t.element_size()

        mods = [m for m in self.model.modules() if not list(m.children())] if measure else []
        handles = [m.register_forward_hook(hook) for m in mods]
        names = list(self.primal)
        leaves = [self.primal[n].detach().requires_grad_(True) for n in names]
        try:
            with torch.enable_grad():
                loss = self._loss(dict(zip(names, leaves, strict=True)), x, y, i)
                grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        # the gradient's graph, kept: H v = d(g . v)/dθ by one backward through it (what
        # torch.func.vjp of grad computes; plain autograd measured ~6% faster on CPU, and it
        # also runs old-style autograd.Functions, which torch.func refuses)
        live = [k for k, g in enumerate(grads) if g is not None and g.requires_grad]
        outs = [grads[k] for k in live]

        def vf(t: dict[str, Tensor], batched: bool = False) -> tuple[dict[str, Tensor]]:
            if not outs:
                return ({n: torch.zeros_like(t[n]) for n in names},)
            hv = torch.autograd.grad(
                outs,
                leaves,
                grad_outputs=[t[names[k]] for k in live],
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=batched,
            )
            return (
                {
                    n: (h.detach() if h is not None else torch.zeros_like(t[n]))
                    for n, h in zip(names, hv, strict=True)
                },
            )

        return vf, seen[0]

    def _budget(self) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(0.25 * free)
        return _CACHE_BYTES

    def _build_cache(self) -> None:
        """Linearise every batch once, if caching is on and (auto) the graphs fit: the
        estimate is four copies of the leaf modules' outputs (measured on batch 0, scaled
        by the batch sizes) and three of the parameters."""
        self.want_cache = False  # decided once
        if not isinstance(self.batches, (list, tuple)) and not self.cache_forced:
            return  # a DataLoader or other stream: keep streaming
        sizes = [_batch_size(*_split_batch(b, i), i) for i, b in enumerate(self.batches)]
        params = sum(t.numel() * t.element_size() for t in self.primal.values())
        cached: list[tuple[Callable, int]] = []
        try:
            for i, x, y, n in iter_batches(self.batches, self.device):
                vf, act = self._linearise(x, y, i, measure=i == 0 and not self.cache_forced)
                if i == 0:
                    self._checked = True
                    need = 4 * act / max(n, 1) * sum(sizes) + 3 * params
                    if not self.cache_forced and need > self._budget():
                        return
                cached.append((vf, n))
        except (RuntimeError, NotImplementedError):
            if self.cache_forced:
                raise
            return  # this model cannot be linearised so: stream
        self.cached = cached
        self.mode = "cached"

    def _cached_hvp(self, vf: Callable, v: dict[str, Tensor], many: bool) -> dict[str, Tensor]:
        if not many:
            return vf(v)[0]
        if self._vmap_ok:
            try:
                return vf(v, batched=True)[0]
            except (RuntimeError, NotImplementedError):
                self._vmap_ok = False  # an op without a batching rule: one vector at a time
        count = next(iter(v.values())).shape[0]
        outs = [vf({n: t[r] for n, t in v.items()})[0] for r in range(count)]
        return {n: torch.stack([o[n] for o in outs]) for n in self.names}

    # ---- the operator
    def _products(self, v: dict[str, Tensor], many: bool):
        """``(H_b v, n_b)`` for each batch."""
        if self.cached is not None:
            for vf, n in self.cached:
                yield self._cached_hvp(vf, v, many), n
            return
        for i, x, y, n in iter_batches(self.batches, self.device):
            yield self._batch_hvp(x, y, i, v, many), n
            if i == 0:
                self._checked = True

    def __call__(self, vec: Tensor) -> Tensor:
        """H vec for a flat ``[dim]`` vector, or each row of ``[P, dim]``."""
        if self.want_cache:
            self._build_cache()
        many = vec.dim() == 2
        v = self.unflat(vec)
        acc = None
        total = 0
        for hv_dict, n in self._products(v, many):
            hv = self.flat(hv_dict, tuple(vec.shape[:-1]))
            acc = hv.mul_(n) if acc is None else acc.add_(hv, alpha=n)
            total += n
            del hv, hv_dict
        if acc is None:
            raise ValueError("batches is empty: need at least one (inputs, targets) pair")
        if self.samples is None:
            self.samples = total
        elif total != self.samples:
            raise ValueError(
                f"batches held {self.samples} samples in the first pass but {total} now: "
                f"they must be the same on every pass"
            )
        acc.div_(total)
        self.passes += 1
        if not bool(torch.isfinite(acc).all()):
            self._diagnose()
        return acc

    @property
    def hvp_name(self) -> str:
        return {
            "double": "double backward",
            "cached": "cached linearisation (the gradient's graph kept per batch)",
        }.get(self.mode, "forward-over-reverse")


# --------------------------------------------------------------------------- helpers


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(check_seed(seed))


def _randn(op: _Operator, gen: torch.Generator, *lead: int) -> Tensor:
    return torch.randn(*lead, op.dim, generator=gen, dtype=op.dtype).to(op.device)


def _rademacher(op: _Operator, gen: torch.Generator, *lead: int) -> Tensor:
    bits = torch.randint(0, 2, (*lead, op.dim), generator=gen, dtype=torch.int8)
    return (bits.to(op.dtype) * 2 - 1).to(op.device)


def _check_common(model: Any, loss_fn: Any, tol: float, max_iter: int) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    check_int(max_iter, "max_iter", minimum=1)


def _run(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[Any, Any], Tensor],
    params: ParamSelection | Mapping[str, ParamSelection],
    spec: PermutationSpec | None,
    hvp: str,
    cache: bool | None,
    one: Callable[[_Operator], HessianResult],
    method: str,
) -> HessianResult:
    """Run ``one`` on the block (or each group's block) with the model in eval mode."""
    batches = reiterable_batches(batches)
    t0 = time.perf_counter()
    groups = _groups(params, model, spec)
    with eval_mode(model):
        if groups is None:
            names = _resolve(params, model, spec)  # type: ignore[arg-type]
            op = _Operator(model, batches, loss_fn, names, hvp, cache)
            res = one(op)
            res.params = names
            res.extras.update(hvp=op.hvp_name, hvps=op.passes, samples_seen=op.samples, dim=op.dim)
            res.seconds = time.perf_counter() - t0
            return res
        per: dict[str, HessianResult] = {}
        for g, names in groups.items():
            op = _Operator(model, batches, loss_fn, names, hvp, cache)
            t1 = time.perf_counter()
            r = one(op)
            r.params = names
            r.extras.update(hvp=op.hvp_name, hvps=op.passes, samples_seen=op.samples, dim=op.dim)
            r.seconds = time.perf_counter() - t1
            per[g] = r
    return HessianResult(
        values=np.empty(0),
        iterations=sum(r.iterations for r in per.values()),
        seconds=time.perf_counter() - t0,
        method=method,
        converged=all(r.converged for r in per.values()),
        per_group=per,
    )


def _order(theta: np.ndarray, which: str) -> np.ndarray:
    """Indices of Ritz values in the order ``which`` wants them."""
    if which == "largest":
        return np.argsort(-theta, kind="stable")
    if which == "smallest":
        return np.argsort(theta, kind="stable")
    return np.argsort(-np.abs(theta), kind="stable")


def _rel_change(new: np.ndarray, old: np.ndarray) -> float:
    return float(np.max(np.abs(new - old) / (np.abs(old) + 1e-6)))


def _tridiag(alphas: Sequence[float], betas: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    m = len(alphas)
    T = np.diag(np.asarray(alphas, dtype=np.float64))
    if m > 1:
        off = np.asarray(betas[: m - 1], dtype=np.float64)
        T += np.diag(off, 1) + np.diag(off, -1)
    return np.linalg.eigh(T)


class _Basis:
    """Lanczos vectors ``[lanes, m, dim]``, grown by doubling (no fixed cap on memory)."""

    def __init__(self, op: _Operator, lanes: int, first: Tensor) -> None:
        self.buf = torch.empty(lanes, 8, op.dim, dtype=op.dtype, device=op.device)
        self.m = 0
        self.push(first)

    def push(self, q: Tensor) -> None:
        if self.m == self.buf.shape[1]:
            bigger = torch.empty(
                self.buf.shape[0],
                2 * self.m,
                self.buf.shape[2],
                dtype=self.buf.dtype,
                device=self.buf.device,
            )
            bigger[:, : self.m] = self.buf
            self.buf = bigger
        self.buf[:, self.m] = q
        self.m += 1

    @property
    def Q(self) -> Tensor:
        return self.buf[:, : self.m]

    def orthogonalise(self, w: Tensor) -> Tensor:
        """``w`` [lanes, dim] less its projection on the basis, twice (CGS2)."""
        Q = self.Q
        for _ in range(2):
            w = w - torch.einsum("lm,lmd->ld", torch.einsum("lmd,ld->lm", Q, w), Q)
        return w


def _lanczos(
    op: _Operator,
    start: Tensor,
    steps: int,
    *,
    stop: Callable[[int, list[list[float]], list[list[float]]], bool] | None = None,
    bar: Any = None,
) -> tuple[list[list[float]], list[list[float]], _Basis, bool]:
    """Lanczos with full reorthogonalisation on ``lanes`` start vectors at once.

    Returns per lane its alphas and betas, the basis, and whether ``stop`` ended it early.
    A lane whose new vector vanishes (an invariant subspace: its Ritz values are exact)
    stops growing; its later HVPs are on a zero vector and are ignored.
    """
    lanes = start.shape[0]
    q = start / start.norm(dim=1, keepdim=True)
    basis = _Basis(op, lanes, q)
    alphas: list[list[float]] = [[] for _ in range(lanes)]
    betas: list[list[float]] = [[] for _ in range(lanes)]
    active = [True] * lanes
    prev = torch.zeros_like(q)
    beta = torch.zeros(lanes, dtype=op.dtype, device=op.device)
    for j in range(steps):
        w = op(q if lanes > 1 else q[0]).reshape(lanes, op.dim)
        alpha = (w * q).sum(dim=1)
        w = w - alpha[:, None] * q - beta[:, None] * prev
        w = basis.orthogonalise(w)
        beta = w.norm(dim=1)
        a_host, b_host = alpha.double().cpu().tolist(), beta.double().cpu().tolist()
        scale = max(abs(a) for a in a_host) + 1e-30
        for lane in range(lanes):
            if active[lane]:
                alphas[lane].append(a_host[lane])
                betas[lane].append(b_host[lane])
                if b_host[lane] <= 1e-10 * scale or len(alphas[lane]) >= op.dim:
                    active[lane] = False
        if bar is not None:
            bar.update(1)
        if stop is not None and stop(j, alphas, betas):
            return alphas, betas, basis, True
        if not any(active) or j == steps - 1:
            break
        prev = q
        safe = torch.where(beta > 0, beta, torch.ones_like(beta))
        mask = torch.tensor(active, device=op.device)[:, None]
        q = torch.where(mask, w / safe[:, None], torch.zeros_like(w))
        basis.push(q)
    return alphas, betas, basis, False


# --------------------------------------------------------------------------- eigenvalues


def _eig_lanczos(
    op: _Operator, k: int, which: str, tol: float, max_iter: int, seed: int, progress: bool
) -> HessianResult:
    steps = min(max_iter, op.dim)
    if steps < k:
        raise ValueError(f"max_iter={max_iter} Lanczos steps cannot give k={k} eigenvalues")
    gen = _generator(seed)
    history: list[np.ndarray] = []

    def stop(j: int, alphas: list[list[float]], betas: list[list[float]]) -> bool:
        theta, _ = _tridiag(alphas[0], betas[0])
        if theta.size < k:
            return False
        top = theta[_order(theta, which)[:k]]
        history.append(top)
        return len(history) >= 2 and _rel_change(top, history[-2]) < tol

    with progress_bar(progress, total=steps, desc="Hessian (Lanczos)", unit="HVP") as bar:
        alphas, betas, basis, early = _lanczos(op, _randn(op, gen, 1), steps, stop=stop, bar=bar)
    a, b = alphas[0], betas[0]
    theta, S = _tridiag(a, b)
    idx = _order(theta, which)[:k]
    m = len(a)
    exhausted = m >= op.dim or (len(b) == m and b[-1] <= 1e-10 * (max(map(abs, a)) + 1e-30))
    if theta.size < k:
        raise ValueError(
            f"k={k} is more than the {theta.size} eigenvalues the Krylov space of this block "
            f"holds (dimension {op.dim})"
        )
    Q = basis.Q[0, :m]
    coeff = torch.as_tensor(S[:, idx], dtype=op.dtype, device=op.device)
    vecs = (coeff.T @ Q).contiguous()
    vecs = vecs / vecs.norm(dim=1, keepdim=True)
    residual = np.abs(b[m - 1] * S[m - 1, idx]) if len(b) >= m else np.zeros(k)
    return HessianResult(
        values=theta[idx].astype(np.float64),
        vectors=[{n: t.clone() for n, t in op.unflat(v).items()} for v in vecs],
        std_err=residual.astype(np.float64),
        iterations=m,
        method="lanczos",
        converged=bool(early or exhausted),
    )


def _eig_power(
    op: _Operator, k: int, which: str, tol: float, max_iter: int, seed: int, progress: bool
) -> HessianResult:
    gen = _generator(seed)
    found: list[Tensor] = []
    values: list[float] = []
    residuals: list[float] = []
    total = 0
    converged_all = True
    shift = 0.0
    with progress_bar(progress, total=k * max_iter, desc="Hessian (power)", unit="HVP") as bar:
        i = 0
        while i < k:
            v = _randn(op, gen)
            v = v / v.norm()
            lam: float | None = None
            ok = False
            hv = v
            for _ in range(max_iter):
                for u in found:  # deflation: stay orthogonal to the eigenvectors found
                    v = v - (v @ u) * u
                v = v / v.norm()
                hv = op(v)
                if shift:
                    hv = hv - shift * v
                est = float(hv @ v)
                total += 1
                bar.update(1)
                norm = hv.norm()
                if not float(norm) > 0:  # H v = 0: an eigenvalue 0 (of the shifted operator)
                    lam, ok = est, True
                    break
                v_next = hv / norm
                if lam is not None and abs(est - lam) / (abs(lam) + 1e-6) < tol:
                    lam, ok = est, True
                    v = v_next
                    break
                lam = est
                v = v_next
            assert lam is not None
            value = lam + shift
            if (
                i == 0
                and shift == 0.0
                and ((which == "largest" and value < 0) or (which == "smallest" and value > 0))
            ):
                # the dominant eigenvalue has the wrong sign: iterate on H - value * I, whose
                # dominant eigenvalue is the one wanted (minus value)
                shift = value
                continue
            converged_all &= ok
            found.append(v)
            values.append(value)
            residuals.append(float((op(v) - value * v).norm()))
            total += 1
            i += 1
    vals = np.asarray(values, dtype=np.float64)
    return HessianResult(
        values=vals,
        vectors=[{n: t.clone() for n, t in op.unflat(u).items()} for u in found],
        std_err=np.asarray(residuals, dtype=np.float64),
        iterations=total,
        method="power",
        converged=converged_all,
    )


def hessian_eigenvalues(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[Any, Any], Tensor],
    *,
    k: int = 1,
    params: ParamSelection | Mapping[str, ParamSelection] = None,
    spec: PermutationSpec | None = None,
    method: Literal["lanczos", "power"] = "lanczos",
    which: Which = "largest",
    tol: float = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
    hvp: Literal["auto", "forward", "double"] = "auto",
    cache: bool | None = None,
    progress: bool = False,
) -> HessianResult:
    """The ``k`` top eigenvalues (and eigenvectors) of the Hessian of the mean loss.

    Args:
        model: the network, at the point where the Hessian is taken (never modified; run in
            eval mode on its own device).
        batches: re-iterable ``(inputs, targets)`` pairs (a list or a DataLoader; a one-shot
            iterator is drawn into a list); the Hessian is that of the mean loss over all of
            them, each batch weighted by its size.
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar Tensor`` (the batch mean).
        k: how many eigenvalues (at most the number of selected parameters).
        params: the block: ``None`` (all trainable parameters), a parameter name, a spec
            group (with ``spec=``: the parameters whose axes it permutes), a module name (its
            parameters), a glob or regex over parameter names (tried in that order), a list
            of these, or a dict group -> selection for several blocks at once
            (``result.per_group``).
        spec: the :class:`PermutationSpec` whose group names ``params`` may use.
        method: ``"lanczos"`` (default; full reorthogonalisation) or ``"power"`` (power
            iteration with deflation, as PyHessian).
        which: ``"largest"`` (algebraic; default), ``"smallest"`` or ``"magnitude"``
            (largest ``|λ|``: what plain power iteration finds).
        tol: stop when each wanted estimate changed by less than ``tol`` relative to the
            previous iteration (PyHessian's rule, ``|Δλ| / (|λ| + 1e-6)``).
        max_iter: Lanczos steps in all (``"lanczos"``), or iterations per eigenvalue
            (``"power"``, as PyHessian's ``maxIter``).
        seed: seed of the start vectors (drawn on the CPU: the same on every device).
        hvp: how streamed products are computed: ``"auto"`` (forward-over-reverse, double
            backward where forward mode fails), ``"forward"`` or ``"double"``.
        cache: keep each batch's linearisation of the gradient and reuse it for every
            product (``True``); stream every product (``False``); ``None`` (auto, with
            ``hvp="auto"``): cache when ``batches`` is a list or tuple whose graphs are
            estimated to fit (2 GiB on the CPU, a quarter of the free memory on a GPU).
        progress: a progress bar over Hessian-vector products.

    Returns:
        A :class:`HessianResult`: ``values`` ``[k]``, ``vectors`` (k dicts), ``std_err``
        the residual bound ``‖Hv − λv‖`` of each pair, ``iterations``, ``converged``.

    Raises:
        ValueError: ``k`` larger than the number of parameters, empty batches, a NaN/inf
            loss (naming the batch), an unknown ``params`` entry or ``method``.
        TypeError: ``loss_fn`` returning a non-scalar or a non-tensor.
    """
    _check_common(model, loss_fn, tol, max_iter)
    check_int(k, "k", minimum=1)
    check_seed(seed)
    if method not in ("lanczos", "power"):
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}, got {which!r}")
    algo = _eig_lanczos if method == "lanczos" else _eig_power

    def one(op: _Operator) -> HessianResult:
        if k > op.dim:
            raise ValueError(
                f"k={k} is larger than the number of parameters in the block ({op.dim})"
            )
        return algo(op, k, which, tol, max_iter, seed, progress)

    return _run(model, batches, loss_fn, params, spec, hvp, cache, one, method)


# --------------------------------------------------------------------------- trace


def hessian_trace(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[Any, Any], Tensor],
    *,
    params: ParamSelection | Mapping[str, ParamSelection] = None,
    spec: PermutationSpec | None = None,
    tol: float = 1e-2,
    max_iter: int = 100,
    min_iter: int = 8,
    probes_per_pass: int = _PROBES_PER_PASS,
    seed: int = 0,
    hvp: Literal["auto", "forward", "double"] = "auto",
    cache: bool | None = None,
    progress: bool = False,
) -> HessianResult:
    """Hutchinson's estimate of the Hessian's trace, E[vᵀHv] over Rademacher vectors v.

    Stops when the standard error ``std(vᵀHv) / sqrt(m)`` of the mean of ``m`` probes falls
    below ``tol · |estimate|`` (checked from ``min_iter`` probes on), or at ``max_iter``
    probes (``converged=False``). ``probes_per_pass`` probes share one pass over the data
    (vmapped tangents; more memory, less time). Other arguments as
    :func:`hessian_eigenvalues`.

    Returns:
        A :class:`HessianResult`: ``values`` ``[1]`` the estimate, ``std_err`` ``[1]``,
        ``samples`` the per-probe values, ``iterations`` the probes used.
    """
    _check_common(model, loss_fn, tol, max_iter)
    check_int(min_iter, "min_iter", minimum=2)
    check_int(probes_per_pass, "probes_per_pass", minimum=1)
    check_seed(seed)

    def one(op: _Operator) -> HessianResult:
        gen = _generator(seed)
        samples: list[float] = []
        ok = False
        with progress_bar(progress, total=max_iter, desc="Hessian trace", unit="probe") as bar:
            while len(samples) < max_iter:
                count = min(probes_per_pass, max_iter - len(samples))
                V = _rademacher(op, gen, count)
                HV = op(V if count > 1 else V[0]).reshape(count, op.dim)
                samples.extend((V * HV).sum(dim=1).double().cpu().tolist())
                bar.update(count)
                if len(samples) >= min_iter:
                    s = np.asarray(samples)
                    se = s.std(ddof=1) / math.sqrt(s.size)
                    bar.set_postfix(trace=f"{s.mean():.4g}", se=f"{se:.2g}")
                    if se <= tol * abs(s.mean()):
                        ok = True
                        break
        s = np.asarray(samples, dtype=np.float64)
        se = float(s.std(ddof=1) / math.sqrt(s.size)) if s.size > 1 else math.inf
        return HessianResult(
            values=np.asarray([s.mean()]),
            std_err=np.asarray([se]),
            iterations=int(s.size),
            method="hutchinson",
            converged=ok,
            samples=s,
        )

    return _run(model, batches, loss_fn, params, spec, hvp, cache, one, "hutchinson")


# --------------------------------------------------------------------------- density


def hessian_density(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[Any, Any], Tensor],
    *,
    params: ParamSelection | Mapping[str, ParamSelection] = None,
    spec: PermutationSpec | None = None,
    steps: int = 80,
    probes: int = 1,
    probes_per_pass: int = _PROBES_PER_PASS,
    grid: int | Sequence[float] | np.ndarray = 1000,
    sigma: float | None = None,
    seed: int = 0,
    hvp: Literal["auto", "forward", "double"] = "auto",
    cache: bool | None = None,
    progress: bool = False,
) -> HessianResult:
    """Spectral density by stochastic Lanczos quadrature (Ghorbani et al. 2019).

    For each of ``probes`` Rademacher start vectors, ``steps`` Lanczos steps (full
    reorthogonalisation; at most the number of parameters) give a tridiagonal T; its
    eigenvalues are the quadrature nodes and the squared first components of its
    eigenvectors the weights. The density is
    ``φ(t) = mean over probes of Σ_i w_i N(t; node_i, sigma²)`` on ``grid`` (a number of
    points spanning the nodes with a margin, or the points themselves); ``sigma`` defaults to
    1% of the nodes' range. Probes run ``probes_per_pass`` at a time in one pass over the
    data. Other arguments as :func:`hessian_eigenvalues`.

    Returns:
        A :class:`HessianResult`: ``nodes`` and ``weights`` ``[probes, m]``, ``grid`` and
        ``density``, ``values`` the nodes of all probes (flattened).
    """
    _check_common(model, loss_fn, 1.0, steps)
    check_int(probes, "probes", minimum=1)
    check_int(probes_per_pass, "probes_per_pass", minimum=1)
    check_seed(seed)
    if sigma is not None and not (isinstance(sigma, (int, float)) and sigma > 0):
        raise ValueError(f"sigma must be a positive number or None, got {sigma!r}")
    if isinstance(grid, (int, np.integer)) and not isinstance(grid, bool):
        check_int(grid, "grid", minimum=2)
    else:
        g = np.asarray(grid, dtype=np.float64).reshape(-1)
        if g.size < 2 or not np.all(np.isfinite(g)):
            raise ValueError("grid must be a number of points (>= 2) or >= 2 finite values")

    def one(op: _Operator) -> HessianResult:
        gen = _generator(seed)
        m = min(steps, op.dim)
        nodes: list[np.ndarray] = []
        weights: list[np.ndarray] = []
        total = probes * m
        with progress_bar(progress, total=total, desc="Hessian density", unit="HVP") as bar:
            done = 0
            while done < probes:
                lanes = min(probes_per_pass, probes - done)
                alphas, betas, _, _ = _lanczos(op, _rademacher(op, gen, lanes), m, bar=bar)
                for a, b in zip(alphas, betas, strict=True):
                    theta, S = _tridiag(a, b)
                    nodes.append(theta)
                    weights.append(S[0] ** 2)
                done += lanes
        width = max(len(n) for n in nodes)
        N = np.full((probes, width), np.nan)
        W = np.zeros((probes, width))
        for i, (n, w) in enumerate(zip(nodes, weights, strict=True)):
            N[i, : n.size], W[i, : w.size] = n, w
        flat = np.concatenate(nodes)
        lo, hi = float(flat.min()), float(flat.max())
        span = hi - lo if hi > lo else max(abs(hi), 1.0)
        s = float(sigma) if sigma is not None else 0.01 * span
        if isinstance(grid, (int, np.integer)):
            g = np.linspace(lo - 0.05 * span - 3 * s, hi + 0.05 * span + 3 * s, int(grid))
        else:
            g = np.asarray(grid, dtype=np.float64).reshape(-1)
        dens = np.zeros_like(g)
        for n, w in zip(nodes, weights, strict=True):
            z = (g[:, None] - n[None, :]) / s
            dens += (np.exp(-0.5 * z**2) / (s * math.sqrt(2 * math.pi))) @ w
        dens /= probes
        return HessianResult(
            values=flat,
            iterations=int(sum(n.size for n in nodes)),
            method="slq",
            converged=True,
            grid=g,
            density=dens,
            nodes=N,
            weights=W,
            extras={"sigma": s},
        )

    return _run(model, batches, loss_fn, params, spec, hvp, cache, one, "slq")


# --------------------------------------------------------------------------- one product


def hessian_vector_product(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[Any, Any], Tensor],
    vector: Mapping[str, Tensor],
    *,
    hvp: Literal["auto", "forward", "double"] = "auto",
) -> dict[str, Tensor]:
    """``H v`` for ``vector`` (a dict parameter name -> tensor of its shape; the block is
    the parameters it names), the Hessian of the mean loss over ``batches``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(vector, Mapping) or not vector:
        raise TypeError("vector must be a non-empty dict parameter name -> Tensor")
    named = dict(model.named_parameters())
    for key, t in vector.items():
        if key not in named:
            raise ValueError(f"vector key {key!r} is not a parameter of the model")
        if not isinstance(t, Tensor) or t.shape != named[key].shape:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(
                f"vector[{key!r}] has shape {shape}, the parameter {tuple(named[key].shape)}"
            )
    batches = reiterable_batches(batches)
    names = [n for n in named if n in vector]
    with eval_mode(model):
        op = _Operator(model, batches, loss_fn, names, hvp)
        v = op.flat({n: vector[n].to(device=op.device, dtype=op.dtype) for n in names})
        out = op(v)
    return {n: t.clone() for n, t in op.unflat(out).items()}
