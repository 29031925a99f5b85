"""Union-find over feature elements, with the axis references collected for each."""

from __future__ import annotations

from typing import Any

from pymerge.spec.spec import AxisRef
from pymerge.spec.tracing.values import Piece, Pieces, Value, iter_values

__all__ = ["TraceState", "NodeValues"]


class TraceState:
    """The tracer's union-find state.

    Every element is a set of ``size`` features that one permutation acts on; ``refs[e]``
    are the parameter axes it permutes (merged by :meth:`union`), ``frozen`` the elements
    that must stay unpermuted (with the first reason), ``heads`` the head structures
    ``(num_heads, head_dim, elements, name)``, ``poisoned`` state keys that must stay
    unpermuted, ``no_cost`` keys matching should not score (running statistics), ``report``
    the human-readable lines of what could not be handled."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.names: list[str] = []
        self.refs: list[list[AxisRef]] = []
        self.frozen: dict[int, str] = {}
        self.heads: list[tuple[int, int, list[int], str]] = []  # (H, d, elems, name)
        self.poisoned: dict[str, str] = {}
        self.report: list[str] = []
        self.no_cost: set[str] = set()
        self.refined: dict[int, list[tuple[int, int, int]]] = {}
        self._name_count: dict[str, int] = {}

    def new(self, n: int, name: str) -> int:
        """A new element of ``n`` features named ``name`` (``name@k`` when taken)."""
        k = self._name_count.get(name, 0)
        self._name_count[name] = k + 1
        self.parent.append(len(self.parent))
        self.size.append(n)
        self.names.append(name if k == 0 else f"{name}@{k}")
        self.refs.append([])
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        """One permutation for ``a`` and ``b`` (both freeze when their sizes differ)."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            self.freeze(ra, f"size mismatch with {self.names[rb]!r}")
            self.freeze(rb, f"size mismatch with {self.names[ra]!r}")
        if rb < ra:
            ra, rb = rb, ra
        self.parent[rb] = ra

    def freeze(self, e: int, reason: str) -> None:
        self.frozen.setdefault(e, reason)

    def join(self, pieces: Pieces, key: str, axis: int) -> None:
        """Axis ``axis`` of state entry ``key`` is permuted by ``pieces`` (segments)."""
        for p in pieces:
            if p.role != "full":
                self.freeze(p.elem, f"head-split features used by {key!r}")
                continue
            self.refs[p.elem].append(AxisRef(key, axis, p.start, p.start + p.n * p.inner, p.inner))

    def link_heads(self, a: int, b: int, num_heads: int, head_dim: int, name: str) -> None:
        """Elements ``a`` and ``b`` must move their heads together."""
        self.heads.append((num_heads, head_dim, [a, b], name))

    def linked(self, a: int, b: int) -> bool:
        """Whether elements ``a`` and ``b`` share a head permutation (same group or linked)."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return True
        seen, todo = {ra}, [ra]
        while todo:
            r = todo.pop()
            for _, _, els, _ in self.heads:
                roots = {self.find(x) for x in els}
                if r in roots:
                    for x in roots - seen:
                        if x == rb:
                            return True
                        seen.add(x)
                        todo.append(x)
        return False

    def refine(self, e: int, sizes: list[int], reason_name: str) -> list[int] | None:
        """Split element ``e`` (and every element unioned with it) into consecutive chunks of
        ``sizes``; their references become segment references. Returns the chunk elements of
        ``e`` or None (refused: the group has a head structure)."""
        root = self.find(e)
        if any(self.find(x) == root for _, _, els, _ in self.heads for x in els):
            return None
        members = [x for x in range(len(self.parent)) if self.find(x) == root]
        if sum(sizes) != self.size[e]:
            return None
        offs = [sum(sizes[:i]) for i in range(len(sizes))]
        chunks = {m: self._split_member(m, sizes, offs) for m in members}
        for m in members:
            for a, b in zip(chunks[e], chunks[m], strict=True):
                self.union(a, b)
        return chunks[e]

    def _split_member(self, m: int, sizes: list[int], offs: list[int]) -> list[int]:
        new = [self.new(k, f"{self.names[m]}[{i}]") for i, k in enumerate(sizes)]
        if m in self.frozen:
            for x in new:
                self.freeze(x, self.frozen[m])
        for r in self.refs[m]:
            for x, off, k in zip(new, offs, sizes, strict=True):
                self.refs[x].append(
                    AxisRef(
                        r.param,
                        r.axis,
                        r.start + off * r.inner,
                        r.start + (off + k) * r.inner,
                        r.inner,
                    )
                )
        self.refs[m] = []
        self.refined[m] = list(zip(new, offs, sizes, strict=True))
        return new

    def resolve(self, pieces: Pieces) -> Pieces:
        """Pieces with refined (split) elements replaced by their chunks."""
        if not self.refined or not any(p.elem in self.refined for p in pieces):
            return pieces
        out: list[Piece] = []
        stack = list(reversed(pieces))
        while stack:
            p = stack.pop()
            if p.elem in self.refined and p.role == "full":
                stack.extend(
                    reversed(
                        [
                            Piece(x, p.start + off * p.inner, k, p.inner)
                            for x, off, k in self.refined[p.elem]
                        ]
                    )
                )
            elif p.elem in self.refined:  # a split of a head-split element: cannot happen
                self.freeze(p.elem, "split after head split")
                out.append(p)
            else:
                out.append(p)
        return tuple(out)

    def resolve_val(self, v: Any) -> Any:
        if isinstance(v, Value) and self.refined and v.tags:
            return Value(v.shape, {d: self.resolve(p) for d, p in v.tags.items()}, v.params)
        if isinstance(v, list):
            return [self.resolve_val(x) for x in v]
        return v

    def freeze_val(self, v: Any, reason: str) -> None:
        """Freeze every group on ``v`` (values, nested) and poison its parameters."""
        for x in iter_values(v):
            for pieces in x.tags.values():
                for p in pieces:
                    self.freeze(p.elem, reason)
            for key, _ in x.params:
                self.poisoned.setdefault(key, reason)


class NodeValues(dict):
    """node -> value, reading through element refinements (splits) recorded in ``st``."""

    def __init__(self, st: TraceState) -> None:
        super().__init__()
        self.st = st

    def get(self, key: Any, default: Any = None) -> Any:
        return self.st.resolve_val(dict.get(self, key, default))
