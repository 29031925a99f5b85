"""Backend discovery and choice: the one place that says which native path runs.

Two families of fast paths exist:

* ``assignment``: the C++ solver ``pymerge._lap`` ("native") or the pure NumPy
  fallback ("numpy").
* ``kernels``: Triton kernels in ``pymerge.kernels`` ("triton"), C++ loops over CPU
  buffers in ``pymerge._multi_tensor`` and ``pymerge._task_vectors`` ("native", for the
  ops that have them: ``interpolate``, ``permuted_interpolate``, ``merge_task_vectors``) or
  plain torch ("torch"). Triton is used automatically only for
  CUDA tensors (under ``TRITON_INTERPRET=1`` it can be forced on CPU tensors: the
  test suite does), native for CPU tensors when built, torch otherwise.

The environment variable ``PYMERGE_BACKEND`` (``auto`` | ``numpy`` | ``torch`` |
``native`` | ``triton``) or a ``backend=`` argument forces a choice. ``numpy`` and
``torch`` are the same request, every fallback: the NumPy assignment solver and torch
ops (``torch`` was the assignment fallback's name before it was ``numpy``: both stay
accepted everywhere). ``native`` forces the C++ code (the solver, and the CPU loops of
the ops that have them; other ops use torch); ``triton`` forces the Triton kernels.
Forcing a backend that is not available raises ``RuntimeError``.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Literal

import torch

BACKEND_ENV = "PYMERGE_BACKEND"
_VALID = ("auto", "numpy", "torch", "native", "triton")
#: requests for the fallbacks (the NumPy assignment solver, torch ops): the same request
FALLBACKS = ("numpy", "torch")

AssignmentBackend = Literal["native", "numpy"]
KernelBackend = Literal["triton", "native", "torch"]


def _requested(backend: str | None) -> str:
    value = backend if backend is not None else os.environ.get(BACKEND_ENV, "auto")
    value = (value or "auto").strip().lower()
    if value not in _VALID:
        source = "backend argument" if backend is not None else f"${BACKEND_ENV}"
        raise ValueError(f"{source}={value!r} is not one of {', '.join(_VALID)}")
    return value


@functools.cache
def _compiled(name: str):
    """The compiled module ``pymerge.<name>``, or ``None`` when it is not built."""
    try:
        return importlib.import_module(f"pymerge.{name}")
    except ImportError:
        return None


def native_lap():
    """The compiled assignment module, or ``None`` when it is not built."""
    return _compiled("_lap")


def native_multi_tensor():
    """The compiled multi-tensor CPU loops, or ``None`` when they are not built."""
    return _compiled("_multi_tensor")


def native_task_vectors():
    """The compiled task-vector merges (TIES, DARE, ...), or ``None`` when not built."""
    return _compiled("_task_vectors")


@functools.lru_cache(maxsize=1)
def triton_error() -> str | None:
    """Why Triton cannot be used here (``None`` when it imports)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"{type(exc).__name__}: {exc}"
    return None


def triton_interpret() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def choose_assignment(backend: str | None = None) -> AssignmentBackend:
    """Pick the assignment backend: ``"native"`` when built, else ``"numpy"`` (also for the
    requests ``"numpy"`` and its alias ``"torch"``)."""
    req = _requested(backend)
    if req in FALLBACKS:
        return "numpy"
    if native_lap() is None:
        if req == "native":
            raise RuntimeError(
                "backend 'native' was requested but pymerge._lap is not built; "
                "reinstall pymerge with a C++17 compiler available"
            )
        return "numpy"
    return "native"


def choose_kernels(
    backend: str | None = None,
    *tensors: torch.Tensor,
    native: bool = False,
    module: str = "_multi_tensor",
) -> KernelBackend:
    """Pick the kernel backend for ``tensors``.

    ``auto`` gives Triton when every tensor is on a CUDA device and Triton imports; for
    CPU tensors the C++ loops when the op has them (``native=True``) and they are built;
    torch otherwise (``module``: the compiled module of the op's C++ loops, e.g.
    ``"_task_vectors"``). ``triton`` forces Triton (CPU tensors need ``TRITON_INTERPRET=1``);
    ``native`` forces the C++ loops of an op that has them (CPU tensors only) and means
    torch for an op that has none; ``torch`` and ``numpy`` force torch.
    """
    req = _requested(backend)
    if req in FALLBACKS:
        return "torch"
    if req == "native":
        if not native:
            return "torch"
        if _compiled(module) is None:
            raise RuntimeError(
                f"backend 'native' was requested but pymerge.{module} is not built; "
                "reinstall pymerge with a C++17 compiler available"
            )
        if not all(t.is_cpu for t in tensors):
            raise RuntimeError(
                "backend 'native' runs on CPU tensors only; use 'triton' or 'torch' for "
                "tensors on other devices"
            )
        return "native"
    on_cuda = bool(tensors) and all(t.is_cuda for t in tensors)
    if req == "auto":
        if on_cuda:
            return "triton" if triton_error() is None else "torch"
        if native and _compiled(module) is not None and all(t.is_cpu for t in tensors):
            return "native"
        return "torch"
    # forced triton
    if triton_error() is not None:
        raise RuntimeError(
            f"backend 'triton' was requested but triton does not import: {triton_error()}"
        )
    if not on_cuda and not triton_interpret():
        raise RuntimeError(
            "backend 'triton' was requested for CPU tensors; set TRITON_INTERPRET=1 "
            "(before importing triton) to run the kernels in the interpreter, "
            "or move the tensors to CUDA"
        )
    return "triton"


def backends() -> dict[str, str]:
    """What this installation can run and what ``auto`` picks.

    Returns a dict with ``assignment`` (``native``/``numpy``), ``assignment_native``,
    ``kernels`` for CUDA tensors (``triton``/``torch``), ``kernels_cpu`` for CPU tensors
    of the ops with C++ loops (``native``/``torch``), ``multi_tensor_native``
    (``built (simd)``/``missing``), ``task_vectors_native`` (the same for the task-vector
    merges' ``pymerge._task_vectors``), ``cuda`` (device name or ``none``), ``triton``
    (version or the import error) and ``forced`` (the value of ``$PYMERGE_BACKEND``).
    """
    err = triton_error()
    if err is None:
        import triton

        triton_desc = triton.__version__ + (" (interpreter)" if triton_interpret() else "")
    else:
        triton_desc = f"unavailable ({err})"
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    req = _requested(None)
    lap = native_lap()
    mt = native_multi_tensor()
    tv = native_task_vectors()
    return {
        "assignment": choose_assignment(),
        "assignment_native": "built" + (f" ({lap.__simd__})" if hasattr(lap, "__simd__") else "")
        if lap is not None
        else "missing",
        "kernels": "torch"
        if req in (*FALLBACKS, "native")
        else ("triton" if err is None and torch.cuda.is_available() else "torch"),
        "kernels_cpu": "native" if mt is not None and req in ("auto", "native") else "torch",
        "multi_tensor_native": f"built ({mt.__simd__})" if mt is not None else "missing",
        "task_vectors_native": f"built ({tv.__simd__})" if tv is not None else "missing",
        "cuda": cuda,
        "triton": triton_desc,
        "forced": req,
    }
