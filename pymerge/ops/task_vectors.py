"""Fused task-vector merges over whole state dicts: task arithmetic, TIES, DARE, Model
Breadcrumbs and DELLA in as few passes over memory as the method allows.

``merge_task_vectors(states, base, params, sparsify=..., consensus=...)`` computes, for every
floating tensor of K state dicts against a base (``n`` elements, model ``k``):

* ``tau_k = rnd(theta_k - theta_0)``: the task vector, the difference rounded to the storage
  dtype (as mergekit's task vector is a tensor of that dtype); fp64 tensors in fp64, others
  with fp32 arithmetic.
* ``keep_k``, the sparsification (``sparsify``; a density ``d >= 1`` keeps everything):

  - ``"none"``: keep all (task arithmetic);
  - ``"magnitude"``: the ``max(1, int(d n))`` largest ``|tau_k|`` (TIES);
  - ``"magnitude_outliers"``: drop the ``int(gamma n)`` largest and the smallest, keeping
    ``int(d n)`` (Model Breadcrumbs);
  - ``"random"``: keep where ``u < d`` (DARE);
  - ``"della_magprune"``: keep where ``u < (d - eps) + 2 eps r / (C - 1)``, ``r`` the rank of
    ``|tau|`` in its row along dim 1 (a 1-D tensor is one row; C = 1, e.g. a 0-d tensor:
    probability ``d``) (DELLA).

  Magnitudes are ordered by (bit pattern of ``|tau|`` in the storage dtype, flat index): ties
  go by position, so exactly the stated number is kept, the same on every backend (mergekit's
  unstable ``argsort`` breaks ties arbitrarily). The selection is a radix select on the bit
  patterns (histogram passes; never a sort or ``topk`` of a whole tensor); DELLA's ranks are
  a stable per-row order (the C++ path: an LSD radix sort of each row).
* ``u``: the counter-based stream of :mod:`pymerge.ops.rng`: model ``k``'s draws for the
  tensor stored under ``key`` are elements ``[k n, (k + 1) n)`` of ``uniform(seed, key, K n)``.
* ``rescale``: ``tau_k keep_k`` times ``S / S'`` with ``S = sum |tau_k|`` and ``S' = sum |tau_k
  keep_k|`` (1 when either is below 1e-7): mergekit's L1 rescale (``RescaleNorm.l1``).
* ``d_k = ((tau_k keep_k) s_k) w_k``; with ``consensus`` (TIES sign election): ``e = sign(sum_k
  d_k)`` (0 counts as +), ``m_k = sign(d_k) == e``, ``mixed = sum_k m_k d_k``, ``div = sum_k m_k
  w_k`` (0 -> 1); without: ``mixed = sum_k d_k``, ``div = sum_k w_k`` (``|div| < 1e-8`` -> 1).
* ``out = rnd(theta_0 + lam (mixed / div if normalize else mixed))``.

Backends (``backend=`` or ``$PYMERGE_BACKEND``, see :mod:`pymerge._backend`): the C++ loops
of ``pymerge._task_vectors`` for CPU fp32/fp16/bf16 tensors ("native": one call per dtype
group; 1 pass over the inputs for task arithmetic and DARE/DELLA without rescale, 2 for TIES
and breadcrumbs on fp16/bf16, 3 on fp32, one more for the rescale sums), the Triton kernels
of ``pymerge.kernels.task_vectors`` for CUDA tensors ("triton"), and torch ("torch", every
dtype; fp64 always). All give the same masks; values agree to float rounding (the paths sum
in the same order in fp32, and tests hold them to a few ulps).

Non-floating entries are copied from the base. Inputs are never modified; outputs never
alias inputs. Not differentiable (computed under ``torch.no_grad()``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import compress

import torch
from torch.utils.dlpack import to_dlpack

from pymerge._backend import _requested, choose_kernels, native_task_vectors
from pymerge._util.checks import StateDict, check_states
from pymerge.ops import rng
from pymerge.ops._groups import check_out_dtype, copies, group

__all__ = [
    "SPARSIFY",
    "TaskVectorParams",
    "merge_task_vectors",
    "merge_task_vector_tensor",
    "della_view",
]

#: the sparsification methods (mergekit's names)
SPARSIFY = ("none", "magnitude", "magnitude_outliers", "random", "della_magprune")
_STOCHASTIC = ("random", "della_magprune")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class TaskVectorParams:
    """Parameters of one tensor's merge: per model ``weights``, ``densities``, ``gammas``
    (breadcrumbs), ``epsilons`` (DELLA); per tensor ``lam``, ``normalize``, ``rescale``."""

    weights: tuple[float, ...]
    densities: tuple[float, ...]
    gammas: tuple[float, ...]
    epsilons: tuple[float, ...]
    lam: float = 1.0
    normalize: bool = False
    rescale: bool = False

    @classmethod
    def make(
        cls,
        k: int,
        *,
        weight: float | Sequence[float] = 1.0,
        density: float | Sequence[float] = 1.0,
        gamma: float | Sequence[float] = 0.01,
        epsilon: float | Sequence[float] = 0.15,
        lam: float = 1.0,
        normalize: bool = False,
        rescale: bool = False,
    ) -> TaskVectorParams:
        """Parameters for ``k`` models, each per-model value a float (all models) or ``k``."""

        def per_model(v, name):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return (float(v),) * k
            if isinstance(v, torch.Tensor):
                v = v.reshape(-1).tolist()
            vals = tuple(float(x) for x in v)
            if len(vals) != k:
                raise ValueError(f"{name} has {len(vals)} values for {k} models")
            return vals

        return cls(
            per_model(weight, "weight"),
            per_model(density, "density"),
            per_model(gamma, "gamma"),
            per_model(epsilon, "epsilon"),
            float(lam),
            bool(normalize),
            bool(rescale),
        )


def check_params(p: TaskVectorParams, k: int, sparsify: str, where: str = "") -> None:
    """Clear errors for parameters the merge cannot use (raised before any work)."""
    at = f" for {where!r}" if where else ""
    if not isinstance(p, TaskVectorParams):
        raise TypeError(f"params{at} must be a TaskVectorParams, got {type(p).__name__}")
    for name in ("weights", "densities", "gammas", "epsilons"):
        vals = getattr(p, name)
        if len(vals) != k:
            raise ValueError(f"params{at}: {name} has {len(vals)} values for {k} models")
        for i, v in enumerate(vals):
            if not math.isfinite(v):
                raise ValueError(f"params{at}: {name}[{i}] = {v!r} is not finite")
    if not math.isfinite(p.lam):
        raise ValueError(f"params{at}: lambda = {p.lam!r} is not finite")
    for i, d in enumerate(p.densities):
        if not 0.0 < d <= 1.0:
            raise ValueError(f"params{at}: densities[{i}] = {d!r} is outside (0, 1]")
    if sparsify == "magnitude_outliers":
        for i, g in enumerate(p.gammas):
            if not 0.0 <= g <= 1.0:
                raise ValueError(f"params{at}: gammas[{i}] = {g!r} is outside [0, 1]")
    if sparsify == "della_magprune":
        for i, (d, e) in enumerate(zip(p.densities, p.epsilons, strict=True)):
            if d < 1.0 and not (0.0 < d - e and d + e < 1.0):
                raise ValueError(
                    f"params{at}: density {d!r} +/- epsilon {e!r} (model {i}) must lie in "
                    "(0, 1) (as mergekit requires)"
                )


def della_view(shape: Sequence[int]) -> tuple[int, int, int]:
    """``(A, C, B)``: DELLA ranks along dim 1 of the tensor viewed as ``[A, C, B]`` (a 1-D
    tensor is one row ``[1, n, 1]``, a 0-d one ``[1, 1, 1]``)."""
    shape = tuple(shape)
    if len(shape) == 0:
        return 1, 1, 1
    if len(shape) == 1:
        return 1, shape[0], 1
    inner = math.prod(shape[2:])
    return shape[0], shape[1], inner


# ----------------------------------------------------------------------------- torch path


def _keys(tau_s: torch.Tensor) -> torch.Tensor:
    """int64 magnitude bit patterns of a storage-dtype tensor (flat)."""
    flat = tau_s.reshape(-1)
    if flat.dtype in (torch.float16, torch.bfloat16):
        return (flat.view(torch.int16).to(torch.int64)) & 0x7FFF
    if flat.dtype == torch.float32:
        return flat.view(torch.int32).to(torch.int64) & 0x7FFFFFFF
    return flat.view(torch.int64) & 0x7FFFFFFFFFFFFFFF


def _key_bits(dtype: torch.dtype) -> int:
    return {torch.float16: 15, torch.bfloat16: 15, torch.float32: 31}.get(dtype, 63)


def _select(keys: torch.Tensor, p: int, bits: int) -> tuple[int, int]:
    """Radix select: the key at ascending position ``p`` of ``keys`` and the count of keys
    below it, by 16-bit digit histograms (``bincount``), most significant digit first."""
    shifts = list(range(((bits - 1) // 16) * 16, -1, -16))
    cand = keys
    prefix, below = 0, 0
    for shift in shifts:
        digit = (cand >> shift) & 0xFFFF
        counts = torch.bincount(digit, minlength=65536)
        cum = counts.cumsum(0)
        b = int(torch.searchsorted(cum, torch.tensor(p - below), right=True))
        if b > 0:
            below += int(cum[b - 1])
        prefix |= b << shift
        if shift:
            cand = cand[digit == b]
    return prefix, below


def _range_keep(keys: torch.Tensor, p0: int, p1: int, bits: int) -> torch.Tensor:
    """Mask of ascending (key, index) positions ``[p0, p1)``."""
    v0, below0 = _select(keys, p0, bits)
    v1, below1 = _select(keys, p1 - 1, bits)
    a0, b1 = p0 - below0, p1 - below1
    eq0 = keys == v0
    ord0 = eq0.cumsum(0) - 1
    if v0 == v1:
        return eq0 & (ord0 >= a0) & (ord0 < b1)
    eq1 = keys == v1
    ord1 = eq1.cumsum(0) - 1
    return ((keys > v0) & (keys < v1)) | (eq0 & (ord0 >= a0)) | (eq1 & (ord1 < b1))


def _della_probs(keys: torch.Tensor, shape, d: float, e: float) -> torch.Tensor:
    A, C, B = della_view(shape)
    f32 = torch.float32
    if C == 1:
        return torch.full((keys.numel(),), d, dtype=f32)
    k3 = keys.view(A, C, B)
    order = torch.sort(k3, dim=1, stable=True).indices
    rank = torch.empty_like(order)
    ar = torch.arange(C, dtype=order.dtype).view(1, C, 1).expand_as(order)
    rank.scatter_(1, order, ar)
    rn = rank.to(f32) / torch.tensor(C - 1, dtype=f32)
    lo = torch.tensor(d - e, dtype=f32)
    return (lo + (rn * torch.tensor(2.0, dtype=f32)) * torch.tensor(e, dtype=f32)).reshape(-1)


def _keep_mask(
    tau_s: torch.Tensor, k: int, K: int, p: TaskVectorParams, sparsify: str, u: torch.Tensor | None
) -> torch.Tensor | None:
    """The keep mask of model ``k`` (flat bool), ``None`` for keep-all."""
    n = tau_s.numel()
    d = p.densities[k]
    if sparsify == "none" or d >= 1.0 or n == 0:
        return None
    if sparsify in ("magnitude", "magnitude_outliers"):
        keys = _keys(tau_s)
        bits = _key_bits(tau_s.dtype)
        if sparsify == "magnitude":
            kc = max(1, int(d * n))
            p0, p1 = n - min(kc, n), n
        else:
            target, top = int(d * n), int(p.gammas[k] * n)
            p0 = max(0, n - target - top)
            p1 = min(n, p0 + target)
            if p0 >= p1:
                return torch.zeros(n, dtype=torch.bool, device=tau_s.device)
        return _range_keep(keys, p0, p1, bits)
    uk = u[k * n : (k + 1) * n]
    if sparsify == "random":
        return uk < torch.tensor(d, dtype=torch.float32)
    probs = _della_probs(_keys(tau_s), tau_s.shape, d, p.epsilons[k])
    return uk < probs.to(uk.device)


def _tensor_torch(
    xs: Sequence[torch.Tensor],
    b: torch.Tensor,
    p: TaskVectorParams,
    sparsify: str,
    consensus: bool,
    stream: tuple[int, str],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    K = len(xs)
    sdt = b.dtype
    cdt = torch.float64 if sdt == torch.float64 else torch.float32
    n = b.numel()
    bf = b.to(cdt)
    u = None
    if sparsify in _STOCHASTIC and n and any(d < 1.0 for d in p.densities):
        u = rng.uniform(stream[0], stream[1], K * n, device=b.device)
    one = torch.tensor(1.0, dtype=cdt)
    deltas = []
    for k, x in enumerate(xs):
        tau_s = (x.to(cdt) - bf).to(sdt)
        tau = tau_s.to(cdt)
        keep = _keep_mask(tau_s, k, K, p, sparsify, u)
        if keep is not None:
            masked = tau * keep.view(tau.shape).to(cdt)
            if p.rescale:
                before = float(tau.abs().sum(dtype=torch.float64))
                after = float(masked.abs().sum(dtype=torch.float64))
                if not (before < 1e-7 or after < 1e-7):
                    masked = masked * torch.tensor(before / after, dtype=cdt)
            tau = masked
        deltas.append(tau * torch.tensor(p.weights[k], dtype=cdt))
    if consensus:
        total = torch.zeros_like(bf)
        for dk in deltas:
            total = total + dk
        up = total >= 0
        mixed = torch.zeros_like(bf)
        div = torch.zeros_like(bf)
        for k, dk in enumerate(deltas):
            on = torch.where(up, dk > 0, dk < 0).to(cdt)
            mixed = mixed + dk * on
            div = div + torch.tensor(p.weights[k], dtype=cdt) * on
        div = torch.where(div == 0, one, div)
    else:
        mixed = torch.zeros_like(bf)
        for dk in deltas:
            mixed = mixed + dk
        ws = torch.zeros((), dtype=cdt)
        for w in p.weights:
            ws = ws + torch.tensor(w, dtype=cdt)
        div = one if bool(ws.abs() < 1e-8) else ws
    if p.normalize:
        mixed = mixed / div
    if p.lam != 1.0:
        mixed = mixed * torch.tensor(p.lam, dtype=cdt)
    return (bf + mixed).to(out_dtype)


# ----------------------------------------------------------------------------- native path

_IS_CONTIGUOUS = torch.Tensor.is_contiguous
_IS_NEG = torch.Tensor.is_neg


def _plain(lst: list[torch.Tensor]) -> list[torch.Tensor]:
    if all(map(_IS_CONTIGUOUS, lst)) and not any(map(_IS_NEG, lst)):
        return lst
    return [t.resolve_neg().contiguous() for t in lst]


def _flat_params(plist: list[TaskVectorParams]):
    w, d, g, e = [], [], [], []
    for p in plist:
        w.extend(p.weights)
        d.extend(p.densities)
        g.extend(p.gammas)
        e.extend(p.epsilons)
    return w, d, g, e


def _streams(keys: Sequence[str], seed: int, sparsify: str) -> list[int]:
    if sparsify not in _STOCHASTIC:
        return [0] * len(keys)
    return [rng.stream_key(seed, k) for k in keys]


def _native(
    lists, base_list, plist, keys, sparsify, consensus, seed, out_dtype
) -> list[torch.Tensor] | None:
    mt = native_task_vectors()
    try:
        lists = [_plain(lst) for lst in lists]
        base_list = _plain(base_list)
        caps = [list(map(to_dlpack, lst)) for lst in lists]
        bcaps = list(map(to_dlpack, base_list))
    except (RuntimeError, BufferError, TypeError):
        return None
    numels = [t.numel() for t in base_list]
    out = torch.empty(sum(numels), dtype=out_dtype)
    w, d, g, e = _flat_params(plist)
    views = [della_view(t.shape) for t in base_list]
    mt.merge(
        caps,
        bcaps,
        to_dlpack(out),
        sparsify,
        consensus,
        w,
        d,
        g,
        e,
        [p.lam for p in plist],
        [int(p.normalize) for p in plist],
        [int(p.rescale) for p in plist],
        _streams(keys, seed, sparsify),
        [v[1] for v in views],
        [v[2] for v in views],
        _DTYPE_NAMES[base_list[0].dtype],
        _DTYPE_NAMES[out_dtype],
        min(torch.get_num_threads(), mt._max_threads),
    )
    return [part.view(t.shape) for part, t in zip(out.split(numels), base_list, strict=True)]


def _triton(lists, base_list, plist, keys, sparsify, consensus, seed, out_dtype, device):
    from pymerge.kernels import task_vectors as kern

    streams = _streams(keys, seed, sparsify)
    res = []
    with torch.cuda.device(device) if device.type == "cuda" else _null():
        for t, b in enumerate(base_list):
            xs = [lst[t].resolve_neg().contiguous() for lst in lists]
            res.append(
                kern.merge_tensor(
                    xs,
                    b.resolve_neg().contiguous(),
                    plist[t],
                    sparsify=sparsify,
                    consensus=consensus,
                    stream=streams[t],
                    view=della_view(b.shape),
                    out_dtype=out_dtype,
                )
            )
    return res


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ----------------------------------------------------------------------------- front


def _resolve_params(
    params: TaskVectorParams | Mapping[str, TaskVectorParams], keys: list[str]
) -> list[TaskVectorParams]:
    if isinstance(params, TaskVectorParams):
        return [params] * len(keys)
    if not isinstance(params, Mapping):
        raise TypeError(
            "params must be a TaskVectorParams or a mapping key -> TaskVectorParams, got "
            f"{type(params).__name__}"
        )
    missing = [k for k in keys if k not in params]
    if missing:
        raise ValueError(f"params has no entry for key {missing[0]!r}")
    return [params[k] for k in keys]


def _check_call(sparsify: str, consensus: bool) -> None:
    if sparsify not in SPARSIFY:
        raise ValueError(f"sparsify must be one of {', '.join(SPARSIFY)}, got {sparsify!r}")
    if not isinstance(consensus, bool):
        raise TypeError(f"consensus must be a bool, got {consensus!r}")


@torch.no_grad()
def merge_task_vectors(
    states: Sequence[StateDict],
    base: StateDict,
    params: TaskVectorParams | Mapping[str, TaskVectorParams],
    *,
    sparsify: str = "none",
    consensus: bool = False,
    seed: int = 0,
    backend: str | None = None,
    out_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The task-vector merge of K state dicts against ``base`` (see the module docstring).

    Args:
        states: K >= 1 state dicts (same keys, shapes, dtypes and devices as ``base``).
        base: the base model's state dict (theta_0).
        params: one :class:`TaskVectorParams` for every key, or a mapping key -> params.
        sparsify: one of :data:`SPARSIFY`; consensus: TIES sign election + disjoint mean.
        seed: the random stream's seed (``"random"`` and ``"della_magprune"``).
        backend: ``None``/``"auto"``, ``"torch"``, ``"native"`` (CPU) or ``"triton"``.
        out_dtype: dtype of the floating outputs (default: each tensor's own).
    Returns:
        A new state dict in ``base``'s key order; non-floating entries are copies of base's.
    Raises:
        ValueError / TypeError before any work: mismatched state dicts (naming the key),
        K = 0, unknown ``sparsify``, parameters of the wrong length, non-finite weights or
        lambda, densities outside (0, 1], gamma outside [0, 1], DELLA's density +/- epsilon
        outside (0, 1).
    """
    if isinstance(states, Mapping):
        raise TypeError("states must be a sequence of state dicts, not a single state dict")
    states = list(states)
    if not states:
        raise ValueError("states is empty: need at least one model besides the base")
    if base is None:
        raise ValueError("a task-vector merge needs base= (the model the task vectors start from)")
    _check_call(sparsify, consensus)
    names = ["base"] + [f"states[{i}]" for i in range(len(states))]
    keys, lists_all, dtypes, devices = check_states([base, *states], names)
    K = len(states)
    plist_all = _resolve_params(params, keys)
    seen: set[int] = set()
    for key, p in zip(keys, plist_all, strict=True):
        if id(p) not in seen:
            check_params(p, K, sparsify, key if not isinstance(params, TaskVectorParams) else "")
            seen.add(id(p))
    check_out_dtype(out_dtype)
    base_all, model_lists = lists_all[0], lists_all[1:]
    groups, others = group(dtypes, devices, base_all, out_dtype)
    out = dict.fromkeys(keys)
    for mask in others:
        out.update(zip(compress(keys, mask), copies(list(compress(base_all, mask))), strict=True))
    for (device, in_dtype, od), mask in groups:
        sel = range(len(keys)) if mask is None else list(compress(range(len(keys)), mask))
        gkeys = [keys[i] for i in sel]
        blist = [base_all[i] for i in sel]
        lists = [[lst[i] for i in sel] for lst in model_lists]
        plist = [plist_all[i] for i in sel]
        use = _choose(backend, in_dtype, od, blist)
        res = None
        if use == "native":
            res = _native(lists, blist, plist, gkeys, sparsify, consensus, seed, od)
        elif use == "triton":
            res = _triton(lists, blist, plist, gkeys, sparsify, consensus, seed, od, device)
        if res is None:
            res = [
                _tensor_torch(
                    [lst[j] for lst in lists],
                    blist[j],
                    plist[j],
                    sparsify,
                    consensus,
                    (seed, gkeys[j]),
                    od,
                )
                for j in range(len(gkeys))
            ]
        out.update(zip(gkeys, res, strict=True))
    return out


def _choose(backend, in_dtype, out_dtype, tensors) -> str:
    _requested(backend)  # a bad value is an error even where only torch can run
    if in_dtype not in _KERNEL_DTYPES or out_dtype not in _KERNEL_DTYPES:
        return "torch"  # fp64 and other dtypes: torch only, whatever was asked
    return choose_kernels(backend, *tensors, native=True, module="_task_vectors")


@torch.no_grad()
def merge_task_vector_tensor(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    params: TaskVectorParams,
    *,
    key: str,
    sparsify: str = "none",
    consensus: bool = False,
    seed: int = 0,
    backend: str | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One tensor's task-vector merge (the streaming form): the same result as
    :func:`merge_task_vectors` gives for ``key`` (``key`` names the random stream)."""
    res = merge_task_vectors(
        [{key: t} for t in tensors],
        {key: base},
        params,
        sparsify=sparsify,
        consensus=consensus,
        seed=seed,
        backend=backend,
        out_dtype=out_dtype,
    )
    return res[key]
