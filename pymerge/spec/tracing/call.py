"""What a rule receives: one graph node with its inputs' values and the helpers it may call."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch.fx as fx
from torch import nn

from pymerge.spec.spec import AxisRef
from pymerge.spec.tracing.state import TraceState
from pymerge.spec.tracing.values import Piece, Pieces, Value, iter_values

__all__ = ["Call"]


def _flat_node_vals(args: Any, info: Mapping[fx.Node, Any]) -> list[Any]:
    out: list[Any] = []
    fx.node.map_arg(args, lambda n: out.append(info.get(n)) or n)
    return out


class Call:
    """One ``call_module`` / ``call_function`` / ``call_method`` node, as a rule sees it.

    Attributes:
        node: the ``torch.fx`` node (``node.args`` / ``node.kwargs`` are the raw arguments:
            other nodes or constants).
        module: the called module (``call_module``), else None.
        shape: the output shape from shape propagation: a tuple for a tensor, a list of
            shapes for a tuple of tensors, None otherwise.
        state: the :class:`~pymerge.spec.tracing.state.TraceState` (union-find of groups).
        x: the value of the first positional argument (for a module rule with checked inputs:
            a :class:`Value` whose parameter views were stripped and frozen).
    """

    __slots__ = ("node", "module", "shape", "state", "info", "x")

    def __init__(
        self,
        node: fx.Node,
        module: nn.Module | None,
        shape: Any,
        state: TraceState,
        info: Mapping[fx.Node, Any],
    ) -> None:
        self.node = node
        self.module = module
        self.shape = shape
        self.state = state
        self.info = info
        self.x: Any = self.value(node.args[0]) if node.args else None

    # ------------------------------------------------------------------ reading inputs
    @property
    def name(self) -> str:
        """The module's path for a module call; for an op of an exported graph the path of
        the module it ran in; else the node's name."""
        if self.module is not None:
            return self.node.target  # type: ignore[return-value]
        return self.scope or self.node.name

    @property
    def scope(self) -> str | None:
        """For an op of an exported graph (``torch.export``), the path of the innermost
        module it ran in (where ``torch.fx`` would have had a module call); else None."""
        meta = getattr(self.node, "meta", {})
        if "aten_target" not in meta:
            return None
        stack = meta.get("nn_module_stack") or {}
        if not stack:
            return None
        path = list(stack.values())[-1]
        path = path[0] if isinstance(path, tuple) else str(path)
        return path or None

    def value(self, a: Any) -> Any:
        """The value of argument ``a`` (a :class:`Value`, a list for tuple outputs, or None
        for constants and untracked nodes)."""
        return self.info.get(a) if isinstance(a, fx.Node) else None

    def arg(self, i: int, name: str | None = None, default: Any = None) -> Any:
        """Raw argument: keyword ``name`` if given as one, else positional ``i``."""
        if name is not None and name in self.node.kwargs:
            return self.node.kwargs[name]
        return self.node.args[i] if i < len(self.node.args) else default

    def input(self, i: int, name: str | None = None) -> Any:
        """The value of argument ``i`` / ``name`` (see :meth:`arg`)."""
        return self.value(self.arg(i, name))

    def values(self) -> list[Value]:
        """Every value flowing into the call (all arguments, nested)."""
        return list(iter_values(_flat_node_vals((self.node.args, self.node.kwargs), self.info)))

    def extra_values(self) -> list[Value]:
        """Every value flowing in besides the first positional argument."""
        return list(iter_values(_flat_node_vals((self.node.args[1:], self.node.kwargs), self.info)))

    def key(self, param: str) -> str:
        """State-dict key of the called module's ``param`` (``"<module path>.<param>"``)."""
        return f"{self.node.target}.{param}"

    # ------------------------------------------------------------------ building outputs
    def output(self, tags: Mapping[int, Pieces] | None = None) -> Value | None:
        """A value of the output shape with ``tags`` (None when the output is not a tensor)."""
        return Value(self.shape, dict(tags or {})) if isinstance(self.shape, tuple) else None

    # ------------------------------------------------------------------ feature groups
    def new_group(
        self, size: int, refs: Iterable[AxisRef | tuple] = (), name: str | None = None
    ) -> Pieces:
        """Start a feature group of ``size`` features, permuting the parameter axes ``refs``
        (``AxisRef`` or ``(key, axis[, start, stop, inner])``); named ``name`` (default: the
        module path). Returns its pieces, to put on the output dim that carries it."""
        e = self.state.new(size, self.name if name is None else name)
        for r in refs:
            self.state.refs[e].append(r if isinstance(r, AxisRef) else AxisRef(*r))
        return (Piece(e, 0, size),)

    def join(self, pieces: Pieces, key: str, axis: int) -> None:
        """Axis ``axis`` of state entry ``key`` is permuted by the groups of ``pieces``."""
        self.state.join(pieces, key, axis)

    def freeze(self, value: Any, reason: str) -> None:
        """Freeze every group on ``value`` (values, nested) and its parameters."""
        self.state.freeze_val(value, reason)

    def freeze_pieces(self, pieces: Pieces, reason: str) -> None:
        """Freeze the groups of ``pieces``."""
        for p in pieces:
            self.state.freeze(p.elem, reason)

    def report(self, why: str) -> None:
        """Add an ``unsupported op`` line for this node to the report (and the warning)."""
        node = self.node
        target = (
            node.target
            if isinstance(node.target, str)
            else getattr(node.target, "__name__", str(node.target))
        )
        self.state.report.append(f"unsupported op {node.name} ({node.op} {target}): {why}")

    def unsupported(self, why: str) -> Value | None:
        """The op is not understood: when features or parameters flow in, report it and
        freeze all of them. Returns a plain output (:meth:`output` without tags)."""
        vals = self.values()
        if any(v.active() for v in vals):
            self.report(why)
            self.state.freeze_val(vals, f"flows into {self.node.name}")
        return self.output()
