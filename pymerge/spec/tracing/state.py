"""Union-find over feature elements, with the axis references collected for each."""

from __future__ import annotations

from typing import Any

from pymerge.spec.spec import AxisRef
from pymerge.spec.tracing.values import Piece, Pieces, Value, iter_values

__all__ = ["TraceState", "NodeValues", "head_block", "same_layout"]


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
        self.pinned: dict[tuple[str, int], str] = {}  # (key, axis) that must not be permuted
        self.report: list[str] = []
        self.no_cost: set[str] = set()
        self.refined: dict[int, list[tuple[int, int, int]]] = {}
        self.coarse: dict[int, tuple[int, int]] = {}  # element -> (block element, block size)
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
        """Element ``e`` stays unpermuted (as do its chunks or blocks when it was refined or
        coarsened since a value carrying it was read)."""
        todo = [e]
        while todo:
            x = todo.pop()
            self.frozen.setdefault(x, reason)
            if x in self.coarse:
                todo.append(self.coarse[x][0])
            todo.extend(c for c, _, _ in self.refined.get(x, ()))

    def pin(self, key: str, axis: int, reason: str) -> None:
        """Axis ``axis`` of state entry ``key`` is used where no permutation follows it: a
        group permuting it freezes."""
        self.pinned.setdefault((key, axis), reason)

    def join(self, pieces: Pieces, key: str, axis: int) -> None:
        """Axis ``axis`` of state entry ``key`` is permuted by ``pieces`` (segments). A head
        piece makes its group move whole heads (:meth:`coarsen`) and joins at head level; a
        unit piece makes the units within heads stay in place (nothing left to join)."""
        if any(p.role == "unit" for p in pieces):  # units stay in place: so does this axis
            self.pin(key, axis, "meets the units of attention heads")
        for p in self.resolve(self.to_heads(pieces, f"used by {key!r}")):
            self.refs[p.elem].append(AxisRef(key, axis, p.start, p.start + p.n * p.inner, p.inner))

    def to_heads(self, pieces: Pieces, why: str) -> Pieces:
        """``pieces`` with every head-split element coarsened to whole heads (head pieces
        become plain pieces of heads, unit pieces vanish); an element that cannot be
        coarsened is frozen and dropped."""
        if all(p.role == "full" for p in pieces):
            return pieces
        failed: set[int] = set()
        while True:
            todo = [p for p in self.resolve(pieces) if p.role != "full" and p.elem not in failed]
            if not todo:
                break
            p = todo[0]
            if not self.coarsen(p.elem, head_block(p)):
                self.freeze(p.elem, f"head-split features {why}")
                failed.add(p.elem)
        return tuple(p for p in self.resolve(pieces) if p.elem not in failed)

    def coarsen(self, e: int, block: int) -> bool:
        """Let element ``e`` (with everything sharing its permutation: its union-find class
        and the elements linked to it by head structures) move only in blocks of ``block``
        consecutive features: each becomes an element of ``size // block`` blocks whose
        references take ``inner * block``. Always sound (fewer permutations are allowed);
        used where units within attention heads must stay in place (RoPE, a per-head
        parameter, a head dim merged with others) and where grouped query heads move with
        their key/value head. Returns False (nothing changed) when the sizes do not divide
        or a head structure's head size does not divide ``block``."""
        if block == 1:
            return True
        roots = self._head_component(self.find(e))
        members = [x for x in range(len(self.parent)) if self.find(x) in roots]
        structs = [h for h in self.heads if any(self.find(x) in roots for x in h[2])]
        if any(self.size[m] % block for m in members) or any(block % h[1] for h in structs):
            return False
        blocks: dict[int, int] = {}
        for m in members:
            c = self.new(self.size[m] // block, self.names[m])
            self.names[c] = self.names[m]
            self.refs[c] = [
                AxisRef(r.param, r.axis, r.start, r.stop, r.inner * block) for r in self.refs[m]
            ]
            self.refs[m] = []
            if m in self.frozen:
                self.freeze(c, self.frozen[m])
            self.coarse[m] = (c, block)
            blocks[m] = c
        first = blocks[members[0]]
        for m in members:  # one class, and linked heads share their (now block) permutation
            self.union(first, blocks[m])
        self.heads = [h for h in self.heads if h not in structs]
        return True

    def _head_component(self, root: int) -> set[int]:
        """Roots of the elements sharing a head permutation with ``root`` (itself included)."""
        seen, todo = {root}, [root]
        while todo:
            r = todo.pop()
            for _, _, els, _ in self.heads:
                rs = {self.find(x) for x in els}
                if r in rs:
                    for x in rs - seen:
                        seen.add(x)
                        todo.append(x)
        return seen

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

    def refine_at(self, pieces: Pieces, cuts: list[int]) -> Pieces | None:
        """``pieces`` with every element straddling a position in ``cuts`` refined there
        (into consecutive feature chunks), so that no piece crosses a cut; None when a cut
        falls inside a feature block (``inner``), a head-split piece or a head-structured
        group."""
        work = list(self.resolve(pieces))
        out: list[Piece] = []
        while work:
            p = work.pop(0)
            r = self.resolve((p,))
            if r != (p,):
                work[:0] = list(r)
                continue
            lo, hi = p.start, p.start + p.n * p.inner
            inside = sorted({c for c in cuts if lo < c < hi})
            if not inside:
                out.append(p)
                continue
            if p.role != "full" or any((c - lo) % p.inner for c in inside):
                return None
            feats = [(c - lo) // p.inner for c in inside]
            sizes = [b - a for a, b in zip([0, *feats], [*feats, p.n], strict=True)]
            if self.refine(p.elem, sizes, "") is None:
                return None
            work.insert(0, p)
        return tuple(out)

    def align(self, a: Pieces, b: Pieces) -> tuple[Pieces, Pieces] | None:
        """Make two layouts of one dim identical, if a sound restriction can: refine both at
        each other's piece boundaries, then let a piece move in the blocks of the coarser one
        it meets (whole heads meeting head-split features, a key/value head repeated for its
        query heads, a pair of shuffled channels). Returns the aligned layouts or None."""
        a, b = self.resolve(a), self.resolve(b)
        if same_layout(a, b):
            return a, b
        if {p.role for p in (*a, *b)} <= {"full"}:
            ra = self.refine_at(a, [q.start for q in b] + [q.start + q.n * q.inner for q in b])
            rb = self.refine_at(b, [q.start for q in a] + [q.start + q.n * q.inner for q in a])
            if ra is None or rb is None:
                return None
            a, b = self.resolve(ra), self.resolve(rb)
        if len(a) != len(b):
            return None
        for pa, pb in zip(a, b, strict=True):
            if not same_layout((pa,), (pb,)) and not self._coarsen_pair(pa, pb):
                return None
        a, b = self.resolve(a), self.resolve(b)
        return (a, b) if same_layout(a, b) else None

    def _coarsen_pair(self, pa: Piece, pb: Piece) -> bool:
        """Same start and span, one a blocking of the other: coarsen the finer."""
        if "unit" in (pa.role, pb.role) or pa.start != pb.start:
            return False
        if pa.n * pa.inner != pb.n * pb.inner or (pa.n % pb.n and pb.n % pa.n):
            return False
        if pa.n < pb.n:
            pa, pb = pb, pa
        done = self.coarsen(pa.elem, pa.n // pb.n * (pa.hd if pa.role == "head" else 1))
        if done and pb.role == "head":
            done = self.coarsen(pb.elem, pb.hd)
        return done

    def share_blocks(self, pieces: Pieces, count: int, block: int) -> Pieces | None:
        """Features along a dim of ``count`` blocks of ``block`` positions, every block to be
        permuted alike: refine the groups at the block boundaries, align the blocks' layouts
        and unify them. Returns the layout of one block (or None: impossible)."""
        for _ in range(3):  # aligning one pair can refine what an earlier pair aligned
            cut = self.refine_at(pieces, [k * block for k in range(1, count)])
            if cut is None:
                return None
            blocks: list[list[Piece]] = [[] for _ in range(count)]
            for p in cut:
                k = p.start // block
                blocks[k].append(p.shifted(-k * block))
            local = tuple(blocks[0])
            for other in blocks[1:]:
                pair = self.align(local, tuple(other))
                if pair is None:
                    return None
                local = pair[0]
            if all(same_layout(self.resolve(local), self.resolve(tuple(o))) for o in blocks[1:]):
                for other in blocks[1:]:
                    for pa, pb in zip(self.resolve(local), self.resolve(tuple(other)), strict=True):
                        self.union(pa.elem, pb.elem)
                return self.resolve(local)
        return None

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
        """Pieces with refined (split) elements replaced by their chunks and coarsened ones
        by their blocks (unit pieces of a coarsened element vanish)."""
        if not any(p.elem in self.refined or p.elem in self.coarse for p in pieces):
            return pieces
        out: list[Piece] = []
        stack = list(reversed(pieces))
        while stack:
            p = stack.pop()
            if p.elem in self.coarse:
                c, block = self.coarse[p.elem]
                if p.role == "full":
                    stack.append(Piece(c, p.start, p.n // block, p.inner * block))
                elif p.role == "head":
                    k = block // p.hd
                    stack.append(Piece(c, p.start, p.n // k, p.inner * k))
                continue  # a unit piece: units stay in place, nothing to carry
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
        if isinstance(v, Value) and (self.refined or self.coarse) and v.tags:
            tags = {d: self.resolve(p) for d, p in v.tags.items()}
            return Value(v.shape, {d: p for d, p in tags.items() if p}, v.params)
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


def same_layout(a: Pieces, b: Pieces) -> bool:
    """Whether two layouts of a dim have the same pieces up to their elements."""
    return len(a) == len(b) and all(
        (p.start, p.n, p.inner, p.role, p.hd) == (q.start, q.n, q.inner, q.role, q.hd)
        for p, q in zip(a, b, strict=True)
    )


def head_block(p: Piece) -> int:
    """The block size that turns a head or unit piece into whole heads."""
    return p.hd if p.role == "head" else p.n


class NodeValues(dict):
    """node -> value, reading through element refinements (splits) recorded in ``st``."""

    def __init__(self, st: TraceState) -> None:
        super().__init__()
        self.st = st

    def get(self, key: Any, default: Any = None) -> Any:
        return self.st.resolve_val(dict.get(self, key, default))
