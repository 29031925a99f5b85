"""The rule registry: which rule handles a module type, a function or a tensor method.

Module rules are found by the module's *semantics*, not by ``isinstance``: the exact type
first, then its bases along the MRO, but a base's rule is only inherited while ``forward`` is
the base's own and the subclass redefines no other method of the base (a subclass that
overrides ``forward``, e.g. a channels-first ``LayerNorm2d`` derived from ``nn.LayerNorm``, or
a helper ``forward`` calls, e.g. ``Conv2d._conv_forward``, computes something else and gets
no rule: the tracer traces through it, or treats it as opaque when it is a user-declared
leaf). A module type has a rule exactly when the tracer keeps it as a leaf.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

__all__ = [
    "FunctionRule",
    "ModuleRule",
    "function_rule_for",
    "module_rule_for",
    "qualified_name",
    "register_function_rule",
    "register_module_rule",
    "registered_module_types",
]

Rule = Callable[..., Any]
R = TypeVar("R", bound=Rule)

#: ``kind`` values of module rules (where activation matching prefers to hook)
MODULE_KINDS = ("activation", "norm", "layer")


@dataclass(frozen=True)
class ModuleRule:
    """A registered module rule: ``rule(call)``; ``owner`` is the type it was registered for."""

    rule: Rule
    owner: type
    kind: str = "layer"
    checked_inputs: bool = True


@dataclass(frozen=True)
class FunctionRule:
    """A registered function or method rule: ``rule(call)``."""

    rule: Rule
    key: Any
    checked_inputs: bool = True


_MODULES: dict[type, ModuleRule] = {}
_FUNCTIONS: dict[Any, FunctionRule] = {}  # call_function targets (callables)
_METHODS: dict[str, FunctionRule] = {}  # call_method targets (method names)
_QUALNAMES: dict[str, FunctionRule] = {}  # functions by "<module>.<qualname>" (dotted names)
_RESOLVED: dict[type, ModuleRule | None] = {}  # lookup cache, cleared on registration


def _as_list(keys: Any, what: type | tuple[type, ...]) -> list:
    items = list(keys) if isinstance(keys, (list, tuple, set, frozenset)) else [keys]
    if not items:
        raise ValueError("nothing to register")
    for k in items:
        if not isinstance(k, what):
            raise TypeError(f"cannot register a rule for {k!r}")
    return items


def _check_rule(rule: Any) -> None:
    if not callable(rule):
        raise TypeError(f"a rule must be callable, got {type(rule).__name__}")


def register_module_rule(
    module_type: type[nn.Module] | Iterable[type[nn.Module]],
    rule: R | None = None,
    *,
    kind: str = "layer",
    checked_inputs: bool = True,
    replace: bool = False,
) -> Any:
    """Register ``rule(call)`` for calls of modules of ``module_type`` (a type or several).

    The module becomes a leaf of the ``torch.fx`` trace and the rule says how the call moves,
    joins or freezes feature groups (see ``docs/tracing.md``). Subclasses inherit the rule
    unless they override ``forward``.

    Args:
        module_type: an ``nn.Module`` subclass, or a tuple/list of them.
        rule: ``rule(call: Call) -> Value | list | None``; omit it to use this as a decorator.
        kind: ``"activation"``, ``"norm"`` or ``"layer"``: where activation matching prefers
            to read a group's features (activations first, then whole blocks, norms, layers).
        checked_inputs: when True (the default) the rule is called only when the module gets
            one traced tensor ``call.x`` (parameter views stripped and frozen) and no other
            input carries features; anything else is reported and frozen for it. False: the
            rule reads every input itself (e.g. attention with query, key, value and masks).
        replace: allow replacing an existing rule (built-in ones included).

    Returns:
        ``rule`` (or, without it, a decorator registering the function it decorates).
    """
    if kind not in MODULE_KINDS:
        raise ValueError(f"kind must be one of {MODULE_KINDS}, got {kind!r}")
    types = _as_list(module_type, type)
    for t in types:
        if not issubclass(t, nn.Module):
            raise TypeError(f"{t.__name__} is not an nn.Module subclass")

    def register(fn: R) -> R:
        _check_rule(fn)
        taken = [t.__name__ for t in types if t in _MODULES]
        if taken and not replace:
            raise ValueError(f"a rule for {taken[0]} is already registered (pass replace=True)")
        for t in types:
            _MODULES[t] = ModuleRule(fn, t, kind, checked_inputs)
        _RESOLVED.clear()
        return fn

    return register if rule is None else register(rule)


def register_function_rule(
    fn_or_method: Any,
    rule: R | None = None,
    *,
    checked_inputs: bool = True,
    replace: bool = False,
) -> Any:
    """Register ``rule(call)`` for a function (``call_function`` node target, e.g. ``torch.cat``,
    ``F.linear``, ``operator.add``) or a tensor method by name (``call_method``, e.g.
    ``"view"``), or a tuple/list mixing both. A dotted name registers a function by its
    qualified name ``"<module>.<qualname>"`` without importing it (e.g.
    ``"torchvision.ops.stochastic_depth.stochastic_depth"``).

    Args:
        fn_or_method: a callable, a method name or a dotted function name, or several.
        rule: ``rule(call: Call) -> Value | list | None``; omit it to use this as a decorator.
        checked_inputs: when True (the default) the rule is called only when the first
            positional argument is a traced tensor (``call.x``); otherwise anything carrying
            features is reported and frozen. False: the rule handles any arguments (e.g.
            ``2 * x``, where the first operand is a constant).
        replace: allow replacing an existing rule (built-in ones included).

    Returns:
        ``rule`` (or, without it, a decorator registering the function it decorates).
    """
    keys = _as_list(fn_or_method, object)
    for k in keys:
        if not (isinstance(k, str) or callable(k)):
            raise TypeError(f"register a function or a method name, got {k!r}")

    def register(fn: R) -> R:
        _check_rule(fn)
        taken = [k for k in keys if k in _table(k)]
        if taken and not replace:
            raise ValueError(f"a rule for {taken[0]!r} is already registered (pass replace=True)")
        for k in keys:
            _table(k)[k] = FunctionRule(fn, k, checked_inputs)
        return fn

    return register if rule is None else register(rule)


def _table(key: Any) -> dict:
    if isinstance(key, str):
        return _QUALNAMES if "." in key else _METHODS
    return _FUNCTIONS


def module_rule_for(module_type: type) -> ModuleRule | None:
    """The rule for ``module_type``: its own, else the nearest base's along the MRO as long as
    ``forward`` is that base's own; None when there is none (the module is traced through)."""
    try:
        return _RESOLVED[module_type]
    except KeyError:
        pass
    found = None
    for i, base in enumerate(module_type.__mro__):
        entry = _MODULES.get(base)
        if entry is not None:
            found = entry if not _overrides(module_type.__mro__[:i], base) else None
            break
    _RESOLVED[module_type] = found
    return found


#: what a subclass may redefine and still compute its base's function
_HARMLESS = frozenset(
    {
        "__init__",
        "__repr__",
        "__str__",
        "__setstate__",
        "__getstate__",
        "__init_subclass__",
        "__class_getitem__",
        "extra_repr",
        "reset_parameters",
        "_reset_parameters",
        "_load_from_state_dict",
        "_save_to_state_dict",
    }
)


def _overrides(subclasses: tuple[type, ...], base: type) -> bool:
    """Whether a class between the module type and ``base`` redefines ``forward`` or a
    method or property ``base`` has (``_conv_forward``, ``_check_input_dim``...): then its
    computation may differ and the base's rule does not apply."""
    for cls in subclasses:
        for name, attr in vars(cls).items():
            if name in _HARMLESS or not hasattr(base, name):
                continue
            if name == "forward" or callable(attr) or isinstance(attr, (property, classmethod)):
                return True
    return False


def function_rule_for(op: str, target: Any) -> FunctionRule | None:
    """The rule for a ``call_function`` target or a ``call_method`` name (an ATen overload
    falls back to its overload packet, so one rule can serve ``aten.x.default`` and
    ``aten.x.Tensor``; a function falls back to a rule registered for its qualified name)."""
    if op == "call_method":
        return _METHODS.get(target) if isinstance(target, str) else None
    try:
        entry = _FUNCTIONS.get(target)
    except TypeError:  # unhashable target
        return None
    if entry is None and hasattr(target, "overloadpacket"):
        entry = _FUNCTIONS.get(target.overloadpacket)
    if entry is None and _QUALNAMES:
        entry = _QUALNAMES.get(qualified_name(target))
    return entry


def qualified_name(fn: Any) -> str:
    """``"<module>.<qualname>"`` of a function (how a rule for a function of a package that
    is not imported, e.g. ``"torchvision.ops.stochastic_depth.stochastic_depth"``, is
    registered)."""
    return f"{getattr(fn, '__module__', None)}.{getattr(fn, '__qualname__', None)}"


def registered_module_types() -> tuple[type, ...]:
    """The module types registered so far (built-in and user rules), in registration order."""
    return tuple(_MODULES)
