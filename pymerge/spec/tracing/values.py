"""What the tracer attaches to each graph node: feature tags and parameter views.

A tensor node carries a :class:`Value`: for each dimension holding permutable features, the
:class:`Piece` s of union-find elements (feature groups) laid out along it, and the views of
state-dict entries it is (``get_attr`` nodes and what shape ops make of them).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

__all__ = ["Piece", "Pieces", "Value", "iter_values", "meta_dtype", "meta_shape"]


@dataclass(frozen=True)
class Piece:
    """``n`` features of element ``elem`` at ``start + c*inner + j`` along one dimension.

    ``role`` is ``"full"`` for ordinary features; a dimension split into attention heads
    carries a ``"head"`` piece (``n`` = number of heads, ``hd`` = head size) and a ``"unit"``
    piece (``n`` = head size, ``hd`` = number of heads) of the same element."""

    elem: int
    start: int
    n: int
    inner: int = 1
    role: str = "full"
    hd: int = 1

    def scaled(self, m: int) -> Piece:
        return Piece(self.elem, self.start * m, self.n, self.inner * m)

    def shifted(self, off: int) -> Piece:
        return Piece(self.elem, self.start + off, self.n, self.inner)


Pieces = tuple[Piece, ...]


@dataclass
class Value:
    """What a tensor node carries: tagged dims and parameter views.

    ``tags``: dim -> the pieces of feature groups along it (untagged dims carry nothing a
    permutation touches). ``params``: ``(state key, node dim -> param axis, or None where the
    dim was sliced)`` for each state entry this tensor is a view of."""

    shape: tuple[int, ...]
    tags: dict[int, Pieces] = field(default_factory=dict)
    params: list[tuple[str, dict[int, int | None]]] = field(default_factory=list)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def active(self) -> bool:
        """Whether a permutation could touch this tensor (features or parameters)."""
        return bool(self.tags or self.params)


def iter_values(v: Any) -> Iterable[Value]:
    """Every :class:`Value` inside ``v`` (nested lists, tuples, dicts)."""
    stack = [v]
    while stack:
        x = stack.pop()
        if isinstance(x, Value):
            yield x
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif isinstance(x, dict):
            stack.extend(x.values())


def _shape_of(t: Any) -> Any:
    if hasattr(t, "shape") and hasattr(t, "dtype"):
        try:
            return tuple(int(s) for s in t.shape)
        except (TypeError, ValueError):  # unbacked symbolic sizes
            return None
    if isinstance(t, (list, tuple)):
        return [_shape_of(u) for u in t]
    return None


def _meta(node: Any) -> Any:
    if not isinstance(node, fx.Node):
        return None
    tm = node.meta.get("tensor_meta")
    return tm if tm is not None else node.meta.get("val")


def meta_shape(node: Any) -> Any:
    """Shape tuple (tensor), list of shapes (tuple output) or None, from shape propagation
    (``torch.fx``) or the fake values of an exported graph."""
    m = _meta(node)
    return None if m is None else _shape_of(m)


def meta_dtype(node: Any) -> Any:
    """The dtype of a tensor node, or None."""
    return getattr(_meta(node), "dtype", None)
