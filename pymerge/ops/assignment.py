"""Linear sum assignment: a scipy-compatible front over the C++ solver and a NumPy fallback.

``linear_sum_assignment(cost, maximize)`` returns ``(row_ind, col_ind)`` exactly as
``scipy.optimize.linear_sum_assignment`` does. ``solve_assignment`` returns an
:class:`AssignmentResult` that also carries the solver's duals; pass it back as ``init=`` to
warm-start the next solve of a problem of the same shape and sense (weight matching solves
hundreds of closely related problems). ``linear_sum_assignment_batch`` solves a ``[B, n, m]``
stack in one call.

Inputs: NumPy arrays, anything array-like, or torch tensors on any device (a torch input gives
torch ``int64`` outputs on its device). float64 stays float64 and float32 stays float32 (the
native solver keeps float32 costs with float64 duals); float16/bfloat16 become float32, integers
and bools become float64. The caller's array is never modified.

Backends: ``"native"`` (``pymerge._lap``) when built, else ``"numpy"`` (the pure-NumPy fallback
in :mod:`pymerge.ops._lap_fallback`); force one with ``backend=`` or ``$PYMERGE_BACKEND``
(``"torch"``, the fallback's former name, is an alias of ``"numpy"``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pymerge import _backend
from pymerge.ops import _lap_fallback as fallback

__all__ = [
    "AssignmentResult",
    "linear_sum_assignment",
    "linear_sum_assignment_batch",
    "solve_assignment",
    "resolve_backend",
]

Array = Any  # np.ndarray | torch.Tensor | array-like


@dataclass(frozen=True, eq=False)
class AssignmentResult:
    """One solved assignment problem, reusable as a warm start.

    Attributes:
        row_ind, col_ind: int64 ``[k]`` (``k = min(n_rows, n_cols)``), as scipy returns them;
            torch tensors on the input's device for torch input, else NumPy arrays.
        total: sum of ``cost[row_ind, col_ind]`` as a Python float (of the original costs,
            also when maximising).
        shape: ``(n_rows, n_cols)`` of the cost matrix.
        maximize: the sense that was solved.
        backend: ``"native"`` or ``"numpy"``.
        col_duals: float64 column duals of the problem the solver saw (the transposed
            problem for a tall matrix, negated costs when maximising); opaque, only for
            warm starts.
    """

    row_ind: Array
    col_ind: Array
    total: float
    shape: tuple[int, int]
    maximize: bool
    backend: str
    col_duals: np.ndarray | None = field(default=None, repr=False)

    def __iter__(self):  # ``row, col = solve_assignment(...)`` works like scipy's tuple
        return iter((self.row_ind, self.col_ind))


# --------------------------------------------------------------------------- backend


def _forced_native(backend: str | None) -> bool:
    value = backend if backend is not None else os.environ.get(_backend.BACKEND_ENV, "auto")
    return (value or "auto").strip().lower() == "native"


def resolve_backend(backend: str | None = None) -> str:
    """The assignment backend that runs: ``"native"`` or ``"numpy"``.

    Uses :func:`pymerge._backend.choose_assignment`; a native module without ``solve``
    (a placeholder build) counts as missing.
    """
    choice = _backend.choose_assignment(backend)
    if choice == "native" and not hasattr(_backend.native_lap(), "solve"):
        if _forced_native(backend):
            raise RuntimeError(
                "backend 'native' was requested but pymerge._lap has no solver "
                "(placeholder build); reinstall pymerge with a C++17 compiler available"
            )
        choice = "numpy"
    return choice


# --------------------------------------------------------------------------- inputs


def _to_numpy(cost: Array, what: str = "cost matrix") -> tuple[np.ndarray, torch.device | None]:
    """Return a NumPy view/copy of ``cost`` (never written to) and the torch device, if any."""
    if isinstance(cost, torch.Tensor):
        device = cost.device
        t = cost.detach()
        if t.is_complex():
            raise TypeError(f"{what} must be real, got torch dtype {t.dtype}")
        if t.dtype in (torch.float16, torch.bfloat16):
            t = t.to(torch.float32)
        return t.cpu().resolve_neg().numpy(), device
    try:
        arr = np.asarray(cost)
    except (ValueError, TypeError) as exc:  # ragged nesting, odd objects: same error type
        raise type(exc)(f"{what} could not be converted to an array: {exc}") from None
    return arr, None


def _prepare(arr: np.ndarray, ndim: int, what: str) -> np.ndarray:
    if arr.ndim != ndim:
        kind = "matrix (2-D array)" if ndim == 2 else "stack of matrices (3-D array [B, n, m])"
        raise ValueError(
            f"expected a {kind} for the {what}, got a {arr.ndim}-D array of shape {arr.shape}"
        )
    kind = arr.dtype.kind
    if kind == "f":
        if arr.dtype == np.float16:
            return arr.astype(np.float32)
        if arr.dtype not in (np.float32, np.float64):  # float128 and friends
            return arr.astype(np.float64)
        return arr
    if kind in "biu":
        return arr.astype(np.float64)
    if kind == "c":
        raise TypeError(f"{what} must be real-valued, got complex dtype {arr.dtype}")
    raise TypeError(f"{what} must contain numbers (float, int or bool), got dtype {arr.dtype}")


def _out(x: np.ndarray, device: torch.device | None) -> Array:
    if device is None:
        return x
    return torch.from_numpy(np.ascontiguousarray(x)).to(device)


# --------------------------------------------------------------------------- warm start


def _as_int_vector(x: Array, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().resolve_neg().numpy()
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"init: {name} must be 1-D, got shape {x.shape}")
    if x.dtype.kind not in "iu" and x.size:
        raise ValueError(f"init: {name} must hold integers, got dtype {x.dtype}")
    return x.astype(np.int64)


def _warm_start(
    init: Any, shape: tuple[int, int], maximize: bool, transposed: bool
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Validate ``init`` and return ``(init_col4row, init_v)`` for the solved orientation."""
    if init is None:
        return None, None
    n, m = shape
    k = min(n, m)
    v = None
    if isinstance(init, AssignmentResult):
        if tuple(init.shape) != (n, m):
            raise ValueError(
                f"init: warm start is for a cost matrix of shape {tuple(init.shape)}, "
                f"this one has shape {(n, m)}"
            )
        if bool(init.maximize) != maximize:
            raise ValueError(
                f"init: warm start solved maximize={init.maximize}, this call has "
                f"maximize={maximize}"
            )
        rows = _as_int_vector(init.row_ind, "row_ind")
        cols = _as_int_vector(init.col_ind, "col_ind")
        if init.col_duals is not None:
            v = np.asarray(init.col_duals, dtype=np.float64)
            inner_cols = n if transposed else m
            if v.shape != (inner_cols,):
                raise ValueError(f"init: col_duals must have shape ({inner_cols},), got {v.shape}")
            if not np.isfinite(v).all():
                raise ValueError("init: col_duals must be finite")
            v = np.ascontiguousarray(v)
    elif isinstance(init, tuple) and len(init) == 2:
        rows = _as_int_vector(init[0], "row_ind")
        cols = _as_int_vector(init[1], "col_ind")
    else:
        cols = _as_int_vector(init, "col_ind")
        if n > m:
            raise ValueError(
                "init: a plain col_ind array is ambiguous for a tall cost matrix "
                f"{(n, m)}; pass the (row_ind, col_ind) pair or an AssignmentResult"
            )
        rows = np.arange(cols.size, dtype=np.int64)
    if rows.shape != (k,) or cols.shape != (k,):
        raise ValueError(
            f"init: expected row_ind and col_ind of length {k} for a cost matrix of shape "
            f"{(n, m)}, got lengths {rows.size} and {cols.size}"
        )
    if k and (rows.min() < 0 or rows.max() >= n):
        raise ValueError(f"init: row_ind entries must lie in [0, {n})")
    if k and (cols.min() < 0 or cols.max() >= m):
        raise ValueError(f"init: col_ind entries must lie in [0, {m})")
    if np.unique(rows).size != k:
        raise ValueError("init: row_ind repeats a row")
    if np.unique(cols).size != k:
        raise ValueError("init: col_ind assigns a column to more than one row")
    if transposed:  # solver rows are the original columns
        col4row = np.empty(m, dtype=np.int64)
        col4row[cols] = rows
    else:
        col4row = np.full(n, -1, dtype=np.int64)
        col4row[rows] = cols
    return col4row, v


# --------------------------------------------------------------------------- solving


def _native_solve(lap, c, maximize, hint, v):
    try:
        return lap.solve(c, maximize, hint, v)
    except ValueError as exc:
        _reraise(exc, c, maximize)
        raise


def _reraise(exc: Exception, c: np.ndarray, maximize: bool, index: int | None = None) -> None:
    """Turn a native ValueError into the fallback's wording (same text from both backends)."""
    suffix = "" if index is None else f" (problem {index} of the batch)"
    try:
        fallback.check_costs(c, maximize)
    except ValueError as mine:
        raise ValueError(f"{mine}{suffix}") from None
    if "infeasible" in str(exc):
        raise ValueError(f"{fallback.INFEASIBLE}{suffix}") from None


def _reraise_batch(exc: Exception, c: np.ndarray, maximize: bool) -> None:
    """Name the offending problem of a stack the native batch solver rejected."""
    for b in range(c.shape[0]):
        try:
            fallback.check_costs(c[b], maximize)
        except ValueError as mine:
            raise ValueError(f"{mine} (problem {b} of the batch)") from None
    if "infeasible" in str(exc):
        lap = _backend.native_lap()
        for b in range(c.shape[0]):
            try:
                lap.solve(c[b], maximize)
            except ValueError:
                raise ValueError(f"{fallback.INFEASIBLE} (problem {b} of the batch)") from None


def _solve(cost: Array, maximize: bool, init: Any, backend: str | None):
    """Solve; returns ``(rows, cols, col_duals, backend, cost as NumPy, torch device)``."""
    arr, device = _to_numpy(cost)
    arr = _prepare(arr, 2, "cost matrix")
    maximize = bool(maximize)
    which = resolve_backend(backend)
    n, m = arr.shape
    transposed = n > m
    hint, v = _warm_start(init, (n, m), maximize, transposed)
    c = arr.T if transposed else arr
    if c.shape[0] == 0:
        col4row, v_out = np.empty(0, dtype=np.int64), np.zeros(c.shape[1])
    elif which == "native":
        c = np.ascontiguousarray(c)  # native reads C-contiguous float32/float64
        col4row, _, v_out = _native_solve(_backend.native_lap(), c, maximize, hint, v)
    else:
        col4row, _, v_out = fallback.solve(c, maximize, hint, v)
    col4row = np.asarray(col4row, dtype=np.int64)
    if transposed:
        order = np.argsort(col4row, kind="stable")
        rows, cols = col4row[order], order.astype(np.int64)
    else:
        rows, cols = np.arange(n, dtype=np.int64), col4row
    return rows, cols, v_out, which, arr, device


def _result(cost: Array, maximize: bool, init: Any, backend: str | None) -> AssignmentResult:
    rows, cols, v_out, which, arr, device = _solve(cost, maximize, init, backend)
    total = float(arr[rows, cols].sum(dtype=np.float64)) if rows.size else 0.0
    return AssignmentResult(
        row_ind=_out(rows, device),
        col_ind=_out(cols, device),
        total=total,
        shape=arr.shape,
        maximize=bool(maximize),
        backend=which,
        col_duals=np.asarray(v_out, dtype=np.float64),
    )


def solve_assignment(
    cost: Array,
    maximize: bool = False,
    *,
    init: AssignmentResult | Array | tuple[Array, Array] | None = None,
    backend: str | None = None,
) -> AssignmentResult:
    """Solve one assignment problem and keep what a warm start needs.

    Args:
        cost: ``[n, m]`` real costs (NumPy, array-like or torch on any device). ``+inf``
            (``-inf`` when maximising) forbids a pair.
        maximize: maximise the total instead of minimising it.
        init: warm start: a previous :class:`AssignmentResult` for a cost of the same shape
            and sense (its duals and assignment are reused), a ``(row_ind, col_ind)`` pair, or
            a ``col_ind`` array (``n <= m``). It only speeds the solve up: the optimum is the
            same.
        backend: ``"native"``, ``"numpy"`` (alias ``"torch"``) or ``None``
            (``$PYMERGE_BACKEND``, else auto).

    Returns:
        :class:`AssignmentResult` (``row_ind``/``col_ind`` as scipy returns them).

    Raises:
        ValueError: not 2-D, NaN, ``-inf`` (``+inf`` when maximising), infeasible, or a
            malformed warm start. TypeError: non-numeric or complex dtype.
    """
    return _result(cost, maximize, init, backend)


def linear_sum_assignment(
    cost: Array,
    maximize: bool = False,
    *,
    init: AssignmentResult | Array | tuple[Array, Array] | None = None,
    backend: str | None = None,
) -> tuple[Array, Array]:
    """Drop-in for ``scipy.optimize.linear_sum_assignment``: ``(row_ind, col_ind)``.

    ``row_ind`` and ``col_ind`` are int64 ``[min(n, m)]``: ``row_ind`` sorted, and
    ``cost[row_ind, col_ind].sum()`` is optimal. Torch input gives torch output on the same
    device. ``init`` and ``backend`` as in :func:`solve_assignment`.
    """
    rows, cols, _, _, _, device = _solve(cost, maximize, init, backend)
    return _out(rows, device), _out(cols, device)


_MAX_THREADS = 1024  # as pymerge._lap.solve_batch checks it


def _check_threads(threads: Any) -> int:
    """``threads`` as an int in ``[0, _MAX_THREADS]`` (``None``: 0, all cores)."""
    if threads is None:
        return 0
    if isinstance(threads, bool) or not isinstance(threads, int | np.integer):
        raise TypeError(f"threads must be an int in [0, {_MAX_THREADS}] or None, got {threads!r}")
    if not 0 <= int(threads) <= _MAX_THREADS:
        raise ValueError(
            f"threads={int(threads)} is out of range [0, {_MAX_THREADS}] (0 or None: all cores)"
        )
    return int(threads)


def linear_sum_assignment_batch(
    costs: Array,
    maximize: bool = False,
    *,
    init: Sequence[Any] | None = None,
    backend: str | None = None,
    threads: int | None = None,
) -> tuple[Array, Array]:
    """Solve a stack ``costs [B, n, m]``: ``(row_ind, col_ind)``, each int64 ``[B, k]``.

    ``k = min(n, m)``; problem ``b`` gets exactly what :func:`linear_sum_assignment` gives for
    ``costs[b]``. ``threads`` caps the native solver's threads, an int in ``[0, 1024]``
    (``None``/``0``: all cores).
    ``init``, when given, is a sequence of ``B`` warm starts (see :func:`solve_assignment`);
    the problems are then solved one by one.
    """
    arr, device = _to_numpy(costs, "cost stack")
    arr = _prepare(arr, 3, "cost stack")
    maximize = bool(maximize)
    which = resolve_backend(backend)
    threads = _check_threads(threads)
    B, n, m = arr.shape
    k = min(n, m)
    if init is not None:
        if len(init) != B:
            raise ValueError(f"init: expected {B} warm starts, got {len(init)}")
        rows = np.empty((B, k), dtype=np.int64)
        cols = np.empty((B, k), dtype=np.int64)
        for b in range(B):
            try:
                rows[b], cols[b] = _solve(arr[b], maximize, init[b], which)[:2]
            except ValueError as exc:
                raise ValueError(f"{exc} (problem {b} of the batch)") from None
        return _out(rows, device), _out(cols, device)
    transposed = n > m
    c = arr.transpose(0, 2, 1) if transposed else arr
    if B == 0 or k == 0:
        col4row = np.empty((B, c.shape[1]), dtype=np.int64)
    elif which == "native":
        c = np.ascontiguousarray(c)
        try:
            col4row = _backend.native_lap().solve_batch(c, maximize, threads)
        except ValueError as exc:
            _reraise_batch(exc, c, maximize)
            raise
    else:
        col4row = fallback.solve_batch(c, maximize)
    col4row = np.asarray(col4row, dtype=np.int64)
    if transposed:
        order = np.argsort(col4row, axis=1, kind="stable")
        rows = np.take_along_axis(col4row, order, axis=1)
        cols = order.astype(np.int64)
    else:
        rows = np.broadcast_to(np.arange(n, dtype=np.int64), (B, n)).copy()
        cols = col4row
    return _out(rows, device), _out(cols, device)
