"""Merge methods behind one registry (layer 4: imports ops, spec, align, wsa; nothing above).

``pymerge.merge(method, states, *, base=None, weights=None, overrides=None, align=None,
spec=None, progress=False, **params)`` merges K state dicts with a registered method;
``pymerge.merge_methods()`` lists them (:class:`~pymerge.merge.registry.MethodInfo`).
One small module per method lives in this package and registers itself with
:func:`~pymerge.merge.registry.register_method` (modules are discovered on the first
lookup: adding a method is adding a file). The per-tensor contract, the parameter forms
(per-model lists, gradients, mergekit ``filter`` overrides) and the one per-key resolution
function streaming drivers call (:class:`~pymerge.merge.registry.MergePlan`) are documented
in :mod:`pymerge.merge.registry`.

**The name** ``pymerge.merge`` **is one object: this subpackage, callable as the merge
function.** ``pymerge.merge(...)``, ``from pymerge import merge``, ``import pymerge.merge``
and ``from pymerge.merge import merge`` all give this module, and calling it calls
:func:`pymerge.merge.api.merge` (same signature: ``inspect.signature(pymerge.merge)``; same
docstring: ``help(pymerge.merge.api.merge)``). So the package's contents stay reachable
under the name (``pymerge.merge.register_method``, ``pymerge.merge.linear``) whichever way
it was imported first, which a plain function bound over the subpackage's name could not
promise (``import pymerge.merge as m`` would then give the function or the module
depending on import order). Type checkers see the function.
"""

from __future__ import annotations

import inspect
import sys
import types
from typing import TYPE_CHECKING, Any

from pymerge.merge import api as _api
from pymerge.merge.registry import (
    REQUIRED,
    MergePlan,
    MethodInfo,
    Param,
    StateContext,
    TensorContext,
    get_method,
    layer_positions,
    merge_methods,
    method_names,
    plan_merge,
    register_method,
)

__all__ = [
    "REQUIRED",
    "MergePlan",
    "MethodInfo",
    "Param",
    "StateContext",
    "TensorContext",
    "get_method",
    "layer_positions",
    "merge",
    "merge_methods",
    "method_names",
    "plan_merge",
    "register_method",
    "task_vector_similarity",
    "TaskVectorSimilarity",
]

# the analysis module is imported on first use (it is not needed to merge)
_LAZY = {
    "task_vector_similarity": "pymerge.merge.analysis",
    "TaskVectorSimilarity": "pymerge.merge.analysis",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pymerge.merge' has no attribute {name!r}")


class _CallableModule(types.ModuleType):
    """``pymerge.merge`` the subpackage, callable as the merge function."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return _api.merge(*args, **kwargs)

    __call__.__doc__ = _api.merge.__doc__


sys.modules[__name__].__class__ = _CallableModule
__signature__ = inspect.signature(_api.merge)

if TYPE_CHECKING:
    from pymerge.merge.api import merge
else:
    merge = sys.modules[__name__]  # the callable module itself (see the docstring)
