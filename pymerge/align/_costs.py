"""The cost builder of weight matching: each group's assignment cost, cached and updated.

With every other group's permutation fixed, the weight-matching objective is linear in one
group's permutation ``P``: ``J = <C_p, P>`` with

    C_p = sum over axes (w, axis) of group p: Wa_w(axis first, (n, -1)) @ Wb_w(other axes
          permuted, axis first, (n, -1)).T

(Git Re-Basin, Ainsworth et al. 2022, Alg. 1). :class:`CostBuilder` precomputes the
operands once per ``(spec, state_a, state_b)`` and returns ``C_p`` for the current
permutation. It caches each group's cost and, when a neighbouring permutation changed at
``c`` of its ``L`` positions, updates it with a rank-``c`` product instead of rebuilding
it (``C += A[:, changed] @ (B_new[:, changed] - B_old[:, changed]).T``); weights with one
other permuted axis are stored with that axis first, so that permuting them is a row
gather. :func:`naive_cost` is the plain definition the tests compare it with.

Numerics: costs are built in ``dtype`` (float64 when either state holds float64 weights,
else float32; fp16/bf16 promoted); objectives are summed in float64.

Out of core (``stream=True``, the default when a state is a lazy state dict: a mapping with a
``meta_state()`` method, such as :class:`pymerge.io.Checkpoint`): nothing is precomputed or
kept but the ``[n, n]`` costs and the index caches. Each group's cost is built by reading the
parameters that touch it one at a time, so memory holds a few tensors, not two models.
The operands are built by the same code from the same values, so the costs, and the
permutations, are bit for bit those of the in-memory builder (tested) while the cached costs
fit ``cost_cache_bytes`` (512 MiB); beyond it the least recently used group costs are dropped
and rebuilt in full when needed (the same values up to round-off: a full build instead of an
incremental update).

Sharded (``owned=``, ``reduce=``; :mod:`pymerge.align.distributed`): a builder holds the
terms of only the parameters it owns; ``reduce`` sums each unit's partial costs over the
shards (one all-reduce per unit solve) and the partial objectives, so every shard sees the
global costs and makes the same choices.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pymerge._util.cache import LRUCache
from pymerge._util.checks import check_state_pair
from pymerge.spec.apply import Permutation, permute_param
from pymerge.spec.spec import PermutationSpec

__all__ = ["CostBuilder", "naive_cost", "check_init", "is_lazy", "meta_view"]


@dataclass
class _Ref:
    param: str
    axis: int
    start: int
    stop: int
    inner: int
    group: str


@dataclass
class _Term:
    """One (param, axis segment) of a group: the cached A-side matrix and what B needs.

    With exactly one other permuted axis (the common case: Linear/conv weights) A and B are
    stored with that axis first and the group's axis last: ``a_t`` as a [K * r, n] matrix
    (a view of A when the strides allow) and ``b_t`` as a contiguous [K, r * n] copy, so
    permuting B is a fast row gather and the cost is ``a_t.T @ b_t[idx].view(-1, n)``.
    Otherwise ``a_mat`` is A's segment as an (n, m) matrix.
    """

    ref: _Ref
    a_mat: Tensor | None  # (n, m): A's segment with the axis first (generic terms)
    other_axes: list[int]  # axes of the param (other than ref.axis) that carry a permutation
    numel: int = 0  # entries of A's segment (work estimate)
    a_t: Tensor | None = None  # [K * r, n], any strides (single other axis)
    b_t: Tensor | None = None  # [K, r * n] (single other axis)


class CostBuilder:
    """Everything precomputed once for a (spec, state_a, state_b) pair: the cost terms of
    every group, the units solved together (a group alone, or the groups of a head
    structure), and caches of axis indices, costs and per-key inner products."""

    def __init__(
        self,
        spec: PermutationSpec,
        state_a: Mapping[str, Tensor],
        state_b: Mapping[str, Tensor],
        dtype: torch.dtype | None,
        *,
        stream: bool | None = None,
        owned: Iterable[str] | None = None,
        reduce: Callable[[Tensor], Tensor] | None = None,
        check_finite: bool = True,
        cost_cache_bytes: int = 512 * 2**20,
    ) -> None:
        self.spec = spec
        lazy = is_lazy(state_a) or is_lazy(state_b)
        self.stream = lazy if stream is None else bool(stream)
        meta_a, meta_b = (meta_view(state_a), meta_view(state_b)) if lazy else (state_a, state_b)
        self.sizes = _validate(spec, meta_a, meta_b)
        self.groups = list(spec.groups())
        no_cost = set(spec.no_cost)
        all_cost_keys = [
            k for k, v in meta_a.items() if k not in no_cost and torch.is_floating_point(v)
        ]
        if dtype is None:
            wide = any(s[k].dtype == torch.float64 for s in (meta_a, meta_b) for k in all_cost_keys)
            dtype = torch.float64 if wide else torch.float32
        self.dtype = dtype
        self.reduce = reduce
        mine = None if owned is None else set(owned)
        self.cost_keys = [k for k in all_cost_keys if mine is None or k in mine]
        self.shapes = {k: tuple(meta_a[k].shape) for k in all_cost_keys}
        if self.stream:
            self.a: Mapping[str, Tensor] = _Converted(state_a, dtype, self.cost_keys)
            self.b: Mapping[str, Tensor] = _Converted(state_b, dtype, self.cost_keys)
        else:
            self.a = {k: state_a[k].detach().to(dtype) for k in self.cost_keys}
            self.b = {k: state_b[k].detach().to(dtype) for k in self.cost_keys}
        if check_finite:
            _check_finite(spec, {"state_a": self.a, "state_b": self.b})
        self._index_refs(spec, meta_a)
        keys = set(self.cost_keys)
        self.terms = {
            g: [self._term(ref) for ref in self.refs_by_group[g] if ref.param in keys]
            for g in self.groups
        }
        # groups with a cost on some shard (all of them with a cost when not sharded)
        every = set(all_cost_keys)
        self.has_cost = {
            g for g in self.groups if any(r.param in every for r in self.refs_by_group[g])
        }
        self._find_units(spec)
        # index cache: (param, axis) -> full-length index or None (identity)
        self._index: dict[tuple[str, int], Tensor | None] = {}
        first = next(iter(meta_a.values()), None) if lazy else next(iter(self.a.values()), None)
        self.device = (
            first.device if first is not None and not first.is_meta else torch.device("cpu")
        )
        # cost cache: group -> summed cost, the other-axis indices each term was built with,
        # and the number of incremental updates since the last full build
        # (streaming: least recently used costs beyond ``cost_cache_bytes`` are dropped and
        # rebuilt in full when needed again; the latest one always stays)
        self._cost = LRUCache(
            max_items=max(1, len(self.groups)),
            max_cost=cost_cache_bytes if self.stream else None,
            cost=lambda entry: entry[0].numel() * entry[0].element_size(),
        )
        # objective cache: key -> (versions of the groups on its axes, <A, pi(B)>)
        self.version: dict[str, int] = {g: 0 for g in self.groups}
        self._groups_of = {
            k: sorted({r.group for refs in axes.values() for r in refs})
            for k, axes in self.refs_by_param.items()
        }
        self._dot: dict[str, tuple[tuple[int, ...], float]] = {}
        self.full_builds = 0
        self.delta_updates = 0

    def _index_refs(self, spec: PermutationSpec, state_a: Mapping[str, Tensor]) -> None:
        """Axis references by group and by (param, axis)."""
        self.refs_by_param: dict[str, dict[int, list[_Ref]]] = {}
        self.refs_by_group: dict[str, list[_Ref]] = {g: [] for g in self.groups}
        for g in self.groups:
            for raw in spec.perm_to_axes[g]:
                ref = _normalise_ref(raw, g, state_a)
                self.refs_by_group[g].append(ref)
                self.refs_by_param.setdefault(ref.param, {}).setdefault(ref.axis, []).append(ref)

    def _term(self, ref: _Ref) -> _Term:
        """The operands of one (param, axis segment) of a group: computed now and cached, or,
        when streaming, only described (:meth:`_operands` builds them when needed)."""
        term = self._describe(ref)
        if self.stream:
            return term
        return self._build_term(ref, term.other_axes, term.numel)

    def _describe(self, ref: _Ref) -> _Term:
        """A term without its operands: its other permuted axes and its size."""
        others = sorted(ax for ax in self.refs_by_param[ref.param] if ax != ref.axis)
        shape = self.shapes[ref.param]
        rest = math.prod(shape) // shape[ref.axis] if shape[ref.axis] else 0
        numel = rest * (ref.stop - ref.start)  # entries of A's segment (work estimate)
        return _Term(ref, None, others, numel)

    def _build_term(self, ref: _Ref, others: list[int], numel: int) -> _Term:
        n = self.sizes[ref.group]
        a, b = self.a[ref.param], self.b[ref.param]
        if len(others) != 1:
            return _Term(ref, _axis_first(a, ref, n), others, numel)
        k = a.shape[others[0]]
        try:
            a_t = _other_first(a, ref, n, others[0]).view(-1, n)  # no copy when strides allow
        except RuntimeError:
            a_t = _other_first_copy(a, ref, n, others[0]).view(-1, n)
        b_t = _other_first_copy(b, ref, n, others[0]).view(k, -1)
        return _Term(ref, None, others, numel, a_t, b_t)

    def _find_units(self, spec: PermutationSpec) -> None:
        """Units solved together: each head structure, every other group alone (sorted by
        name); and the units some key carries on two axes (J is not linear in them)."""
        self.heads = dict(spec.heads)
        self.head_of = {g: name for name, hs in self.heads.items() for g in hs.groups}
        units = [("group", g) for g in self.groups if g not in self.head_of]
        units += [("heads", h) for h in self.heads]
        self.units: list[tuple[str, str]] = sorted(units, key=lambda u: u[1])
        self.nonlinear_units: set[str] = set()
        for unit in self.units:
            members = set(self.members(unit))
            for axes in self.refs_by_param.values():
                hit = [ax for ax, refs in axes.items() if any(r.group in members for r in refs)]
                if len(hit) > 1:
                    self.nonlinear_units.add(unit[1])
                    break

    def members(self, unit: tuple[str, str]) -> tuple[str, ...]:
        """The groups of a unit."""
        kind, name = unit
        return (name,) if kind == "group" else tuple(self.heads[name].groups)

    def unit_costs(
        self, unit: tuple[str, str], perm: Permutation, known: set[str] | None = None
    ) -> dict[str, Tensor]:
        """Cost of every group of ``unit`` that has one (a group touching no weight has
        none). With ``known`` (the greedy sweep): only the terms whose other axes belong to
        groups in ``known``, see :meth:`partial_cost`."""
        out = {}
        for g in self.members(unit):
            c = self.cost(g, perm) if known is None else self.partial_cost(g, perm, known)
            if c is not None:
                out[g] = c
        if self.reduce is None:
            return out
        return self._reduced(unit, out, known)

    def _reduced(
        self, unit: tuple[str, str], local: dict[str, Tensor], known: set[str] | None
    ) -> dict[str, Tensor]:
        """The unit's costs summed over the shards: one reduction of all its groups at once
        (a shard without terms in a group contributes zeros). The cached local costs are
        not modified."""
        assert self.reduce is not None
        names = [g for g in self.members(unit) if g in self.has_cost]
        if known is not None:  # the greedy sweep: groups whose partial cost some shard has
            names = [g for g in names if self._partial_anywhere(g, known)]
        if not names:
            return {}
        parts = []
        for g in names:
            n = self.sizes[g]
            c = local.get(g)
            parts.append(
                torch.zeros(n * n, dtype=self.dtype, device=self.device)
                if c is None
                else c.reshape(-1)
            )
        flat = self.reduce(torch.cat(parts))
        out, pos = {}, 0
        for g in names:
            n = self.sizes[g]
            out[g] = flat[pos : pos + n * n].view(n, n)
            pos += n * n
        return out

    def _partial_anywhere(self, group: str, known: set[str]) -> bool:
        """Whether some shard has a term of ``group`` whose other axes are all ``known``."""
        for ref in self.refs_by_group[group]:
            if ref.param not in self.shapes:
                continue
            others = [ax for ax in self.refs_by_param[ref.param] if ax != ref.axis]
            deps = {r.group for ax in others for r in self.refs_by_param[ref.param][ax]}
            if deps <= known:
                return True
        return False

    # -- indices ---------------------------------------------------------------------

    def invalidate(self, group: str) -> None:
        """Forget the cached axis indices touched by ``group`` (its permutation changed)."""
        self.version[group] += 1
        for ref in self.refs_by_group[group]:
            self._index.pop((ref.param, ref.axis), None)

    def axis_index(self, param: str, axis: int, perm: Permutation) -> Tensor | None:
        """Full-length index along ``axis`` of ``param`` (None: identity), cached."""
        key = (param, axis)
        if key in self._index:
            return self._index[key]
        refs = self.refs_by_param[param][axis]
        length = self.shapes[param][axis] if param in self.shapes else self.b[param].shape[axis]
        idx: Tensor | None = None
        for ref in refs:
            p = perm[ref.group]
            if _is_identity(p):
                continue
            if idx is None:
                idx = torch.arange(length, dtype=torch.long)
            seg = (p.view(-1, 1) * ref.inner + torch.arange(ref.inner)).reshape(-1) + ref.start
            idx[ref.start : ref.stop] = seg
        if idx is not None:
            idx = idx.to(self.device)
        self._index[key] = idx
        return idx

    def _permuted_b(self, param: str, indices: Mapping[int, Tensor | None]) -> Tensor:
        t = self.b[param]
        for ax, idx in indices.items():
            if idx is not None:
                t = t.index_select(ax, idx)
        return t

    # -- costs and objective --------------------------------------------------------

    def _b_mat(self, term: _Term, indices: Mapping[int, Tensor | None], n: int) -> Tensor:
        """B's segment with the other axes permuted by ``indices``, as an (n, -1) matrix;
        indexing the axis-first view directly gives a contiguous result in one copy."""
        ref = term.ref
        t = _moved(self.b[ref.param], ref)
        for ax, idx in indices.items():
            if idx is not None:
                t = t.index_select(_moved_dim(ax, ref), idx)
        return t.reshape(n, -1)

    def _operands(self, term: _Term) -> _Term:
        """``term`` with its operands (streaming: built now from the tensors on disk)."""
        if not self.stream:
            return term
        return self._build_term(term.ref, term.other_axes, term.numel)

    def _with_operands(self, terms: list[tuple[int, _Term]]) -> Iterator[tuple[int, _Term]]:
        """``(i, term with operands)`` in order, one term's operands in memory at a time
        (the caller drops each before asking for the next). No reader thread: a group's cost
        is a matmul of ``n`` by the term's size, which dwarfs reading and converting the
        term (a 4096x4096 bf16 term: 0.23 s to read, convert and transpose, 3.6 s to
        multiply on dev-2c), so overlapping the two would buy little and double the
        operands in memory."""
        for i, t in terms:
            yield i, self._operands(t)

    def _term_cost(self, term: _Term, indices: Mapping[int, Tensor | None], n: int) -> Tensor:
        if self.stream and term.a_t is None and term.a_mat is None:
            term = self._operands(term)
        if term.a_t is not None:
            assert term.b_t is not None
            idx = indices[term.other_axes[0]]
            bt = term.b_t if idx is None else term.b_t.index_select(0, idx)
            return term.a_t.T @ bt.view(-1, n)
        assert term.a_mat is not None
        b_mat = self._b_mat(term, indices, n)
        if b_mat.shape[1] == 1:
            return term.a_mat * b_mat.view(1, n)  # outer product of vectors
        return term.a_mat @ b_mat.T

    def _term_groups(self, term: _Term) -> set[str]:
        return {r.group for ax in term.other_axes for r in self.refs_by_param[term.ref.param][ax]}

    def greedy_order(self) -> list[int]:
        """Unit order of the greedy first sweep: repeatedly the unit whose cost is most
        determined, i.e. with the most A-side entries in terms whose other permuted axes
        belong to groups already visited (ties: by name)."""
        members = {
            i: ([u[1]] if u[0] == "group" else list(self.heads[u[1]].groups))
            for i, u in enumerate(self.units)
        }
        # from every cost key's terms, not only this shard's: every shard the same order
        every = self.terms
        if self.reduce is not None:
            every = {
                g: [self._describe(r) for r in self.refs_by_group[g] if r.param in self.shapes]
                for g in self.groups
            }
        deps = {
            i: [(float(t.numel), self._term_groups(t)) for g in gs for t in every[g]]
            for i, gs in members.items()
        }
        known: set[str] = set()
        left = list(range(len(self.units)))
        order: list[int] = []
        while left:
            best = max(left, key=lambda i: (sum(w for w, d in deps[i] if d <= known), -i))
            order.append(best)
            left.remove(best)
            known.update(members[best])
        return order

    def partial_cost(self, group: str, perm: Permutation, known: set[str]) -> Tensor | None:
        """Cost of ``group`` from only the terms whose other permuted axes belong to groups
        in ``known`` (the greedy first sweep). It seeds the group's cost cache: the left-out
        terms are marked missing and added by the next :meth:`cost` call."""
        n = self.sizes[group]
        total: Tensor | None = None
        used: list[dict[int, Tensor | None] | None] = []
        for term in self.terms[group]:
            if not self._term_groups(term) <= known:
                used.append(None)
                continue
            idx = {ax: self.axis_index(term.ref.param, ax, perm) for ax in term.other_axes}
            used.append(idx)
            c = self._term_cost(term, idx, n)
            total = c if total is None else total.add_(c)
        if total is None:
            return None
        self._cost.put(group, (total, used, 0))
        return total

    def cost(self, group: str, perm: Permutation) -> Tensor | None:
        """Cost matrix [n, n] of ``group`` given the other groups' permutations.

        Cached per group and updated incrementally: when the permutation of another axis of
        a term changed at ``c`` of its ``L`` positions, only those ``c`` slices are re-multiplied
        (``C += A[:, changed] @ (B_new[:, changed] - B_old[:, changed]).T``). The caller must
        not modify the returned tensor.
        """
        terms = self.terms[group]
        if not terms:
            return None
        n = self.sizes[group]
        cur = [{ax: self.axis_index(t.ref.param, ax, perm) for ax in t.other_axes} for t in terms]
        cached = self._cost.get(group)
        if cached is not None and cached[2] < _REFRESH_EVERY:
            total, used, updates = cached
            work: list[tuple[int, dict[int, Tensor]]] = []
            missing: list[int] = []
            delta_flops = 0.0
            full_flops = 0.0
            for i, term in enumerate(terms):
                flops = float(term.numel) * n
                if used[i] is None:
                    missing.append(i)
                    continue
                full_flops += flops
                changed: dict[int, Tensor] = {}
                shape = self.shapes[term.ref.param]
                for ax in term.other_axes:
                    pos = _changed_positions(used[i][ax], cur[i][ax], shape[ax], self.device)
                    if pos.numel():
                        changed[ax] = pos
                if not changed:
                    continue
                work.append((i, changed))
                if len(changed) == 1:
                    ((ax, pos),) = changed.items()
                    delta_flops += flops * pos.numel() / shape[ax]
                else:
                    delta_flops += flops
            if not work and not missing:
                return total
            if delta_flops <= _DELTA_FRACTION * full_flops:
                todo = dict(work)
                order = [i for i, _ in work] + missing  # the deltas first, then what is missing
                for i, term in self._with_operands([(i, terms[i]) for i in order]):
                    if i in todo:
                        self._apply_delta(total, term, used[i], cur[i], todo[i], n)
                    else:
                        total.add_(self._term_cost(term, cur[i], n))
                    del term  # streaming: free the operands before the next are read
                self.delta_updates += 1
                self._cost.put(group, (total, cur, updates + 1))
                return total
        total = None
        for i, term in self._with_operands(list(enumerate(terms))):
            c = self._term_cost(term, cur[i], n)
            total = c if total is None else total.add_(c)
            del term, c  # streaming: free the operands before the next are read
        assert total is not None
        self.full_builds += 1
        self._cost.put(group, (total, cur, 0))
        return total

    def _apply_delta(
        self,
        total: Tensor,
        term: _Term,
        old: Mapping[int, Tensor | None],
        new: Mapping[int, Tensor | None],
        changed: Mapping[int, Tensor],
        n: int,
    ) -> None:
        ref = term.ref
        if term.a_t is not None:
            assert term.b_t is not None
            ((ax, pos),) = changed.items()
            old_idx = pos if old[ax] is None else old[ax][pos]
            new_idx = pos if new[ax] is None else new[ax][pos]
            diff = term.b_t.index_select(0, new_idx)
            diff -= term.b_t.index_select(0, old_idx)
            r = term.a_t.shape[0] // term.b_t.shape[0]
            if r > 1:
                pos = (pos.view(-1, 1) * r + torch.arange(r, device=pos.device)).reshape(-1)
            rows = pos
            total.addmm_(term.a_t.index_select(0, rows).T, diff.view(-1, n))
            return
        if len(changed) == 1:
            ((ax, pos),) = changed.items()
            d = _moved_dim(ax, ref)
            b_base = _moved(self.b[ref.param], ref)
            for a2, idx in new.items():
                if a2 != ax and idx is not None:
                    b_base = b_base.index_select(_moved_dim(a2, ref), idx)
            old_idx = pos if old[ax] is None else old[ax][pos]
            new_idx = pos if new[ax] is None else new[ax][pos]
            a_sel = _moved(self.a[ref.param], ref).index_select(d, pos).reshape(n, -1)
            diff = b_base.index_select(d, new_idx).reshape(n, -1)
            diff -= b_base.index_select(d, old_idx).reshape(n, -1)
            total.addmm_(a_sel, diff.T)
            return
        diff = self._b_mat(term, new, n) - self._b_mat(term, old, n)
        assert term.a_mat is not None
        total.addmm_(term.a_mat, diff.T)

    def objective(self, perm: Permutation) -> float:
        """J(perm): per-key inner products in the compute dtype (float32: cascade sums),
        added in float64; cached by group versions (sharded: summed over the shards)."""
        total = self._local_objective(perm)
        if self.reduce is None:
            return total
        return float(self.reduce(torch.tensor([total], dtype=torch.float64))[0])

    def _local_objective(self, perm: Permutation) -> float:
        total = 0.0
        for k in self.cost_keys:
            groups = self._groups_of.get(k, [])
            key = tuple(self.version[g] for g in groups)
            hit = self._dot.get(k)
            if hit is None or hit[0] != key:
                axes = self.refs_by_param.get(k, {})
                b = self._permuted_b(k, {ax: self.axis_index(k, ax, perm) for ax in sorted(axes)})
                if self.dtype == torch.float64:
                    value = float(torch.vdot(self.a[k].reshape(-1), b.reshape(-1)))
                else:  # float32 products, cascade-summed (torch's float reduction)
                    value = float((self.a[k] * b).sum())
                hit = (key, value)
                self._dot[k] = hit
            total += hit[1]
        return total


_REFRESH_EVERY = 16  # full rebuild of a group's cost after this many incremental updates
_DELTA_FRACTION = 0.6  # incremental update when it needs < this share of a full rebuild


def _changed_positions(
    old: Tensor | None, new: Tensor | None, length: int, device: torch.device
) -> Tensor:
    """Positions where two full-length indices (None: identity) of ``length`` differ."""
    if old is None and new is None:
        return torch.empty(0, dtype=torch.long, device=device)
    if old is new:
        return torch.empty(0, dtype=torch.long, device=device)
    ar = None
    if old is None or new is None:
        ar = torch.arange(length, device=device)
    o = ar if old is None else old
    w = ar if new is None else new
    return torch.nonzero(o != w).view(-1)


def _is_identity(p: Tensor) -> bool:
    return bool(torch.equal(p, torch.arange(p.numel())))


def _normalise_ref(raw: Any, group: str, state: Mapping[str, Tensor]) -> _Ref:
    if isinstance(raw, tuple) and not hasattr(raw, "param"):
        param, axis = raw[0], raw[1]
        start, stop, inner = 0, None, 1
    else:
        param, axis = raw.param, raw.axis
        start, stop, inner = raw.start, raw.stop, raw.inner
    t = state[param]
    axis = axis % t.dim()
    stop = t.shape[axis] if stop is None else stop
    return _Ref(param, axis, int(start), int(stop), int(inner), group)


def _moved(t: Tensor, ref: _Ref) -> Tensor:
    """View of the segment of ``t`` along ``ref.axis`` with that axis first."""
    return t.narrow(ref.axis, ref.start, ref.stop - ref.start).movedim(ref.axis, 0)


def _moved_dim(axis: int, ref: _Ref) -> int:
    """Position of original ``axis`` (!= ref.axis) in the :func:`_moved` view."""
    return axis + 1 if axis < ref.axis else axis


def _other_first(t: Tensor, ref: _Ref, n: int, axis: int) -> Tensor:
    """View of ``t``'s segment as [K, *r, n]: ``axis`` (length K) first, the group's n units
    last, everything else (``inner`` blocks, other dims) in between."""
    m = _moved(t, ref)
    m = m.reshape(n, ref.inner, *m.shape[1:])
    d = _moved_dim(axis, ref) + 1
    order = [d] + [i for i in range(1, m.dim()) if i != d] + [0]
    return m.permute(order)


def _other_first_copy(t: Tensor, ref: _Ref, n: int, axis: int) -> Tensor:
    """Contiguous copy of :func:`_other_first`. For a whole axis without ``inner`` blocks the
    transpose is done on the fewest merged dimensions (a 2-D/3-D transpose copies several
    times faster than the general N-D permute)."""
    whole = ref.start == 0 and ref.stop == t.shape[ref.axis] and ref.inner == 1
    if not (whole and t.is_contiguous()):
        return _other_first(t, ref, n, axis).contiguous()
    rest = [d for d in range(t.dim()) if d not in (axis, ref.axis)]
    order = [axis, *rest, ref.axis]
    groups: list[list[int]] = []
    for d in order:
        if groups and groups[-1][-1] + 1 == d:
            groups[-1].append(d)
        else:
            groups.append([d])
    src = sorted(groups, key=lambda g: g[0])
    sizes = [math.prod(t.shape[d] for d in g) for g in src]
    merged = t.reshape(sizes).permute([src.index(g) for g in groups]).contiguous()
    return merged.reshape([t.shape[d] for d in order])


def _axis_first(t: Tensor, ref: _Ref, n: int) -> Tensor:
    """Segment of ``t`` along ``ref.axis`` as an (n, -1) matrix (blocks of ``inner`` rows)."""
    seg = t.narrow(ref.axis, ref.start, ref.stop - ref.start)
    return seg.movedim(ref.axis, 0).reshape(n, -1)


# --------------------------------------------------------------------------- lazy states


def is_lazy(state: object) -> bool:
    """A lazy state dict: a mapping with ``meta_state()`` (e.g. :class:`pymerge.io.Checkpoint`)."""
    return isinstance(state, Mapping) and callable(getattr(state, "meta_state", None))


def meta_view(state: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """Shapes and dtypes without data: ``state.meta_state()`` for a lazy state, else meta
    copies of the tensors (so two states can be checked against each other)."""
    if is_lazy(state):
        return state.meta_state()  # type: ignore[attr-defined]
    return {
        k: (torch.empty_like(v, device="meta") if isinstance(v, Tensor) else v)
        for k, v in state.items()
    }


class _Converted(Mapping[str, Tensor]):
    """``state[k]`` read on demand and converted to ``dtype`` (the streaming operands)."""

    def __init__(self, state: Mapping[str, Tensor], dtype: torch.dtype, keys: list[str]):
        self._state, self._dtype, self._keys = state, dtype, list(keys)
        self._set = set(self._keys)

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._set:
            raise KeyError(key)
        return self._state[key].detach().to(self._dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._set


# --------------------------------------------------------------------------- validation


def _validate(
    spec: PermutationSpec, state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor]
) -> dict[str, int]:
    if not isinstance(spec, PermutationSpec):
        raise TypeError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
    for name, state in (("state_a", state_a), ("state_b", state_b)):
        if not isinstance(state, Mapping):
            raise TypeError(
                f"{name} must be a mapping of str -> Tensor, got {type(state).__name__}"
            )
        for k, v in state.items():
            if not isinstance(v, Tensor):
                raise TypeError(f"{name}[{k!r}] is a {type(v).__name__}, not a torch.Tensor")
    check_state_pair(state_a, state_b, "state_a", "state_b", same_device=True)  # or meta views
    sizes = spec.validate(state_a)
    spec.validate(state_b)
    return dict(sizes)


def check_init(init: Mapping[str, Tensor], plan: CostBuilder) -> Permutation:
    """The warm start ``init`` as a full permutation (missing groups: identity), validated:
    ValueError naming the group for unknown groups, wrong dtypes/lengths, non-permutations
    and head structures split by it."""
    perm: Permutation = {}
    for g in init:
        if g not in plan.sizes:
            raise ValueError(f"init has group {g!r} that is not in the spec")
    for g in plan.groups:
        n = plan.sizes[g]
        if g not in init:
            perm[g] = torch.arange(n)
            continue
        p = init[g]
        if not isinstance(p, Tensor):
            p = torch.as_tensor(p)
        if p.dtype.is_floating_point or p.dtype == torch.bool or p.dim() != 1:
            raise ValueError(
                f"init[{g!r}] must be a 1-D integer tensor, got dtype {p.dtype} shape "
                f"{tuple(p.shape)}"
            )
        if p.numel() != n:
            raise ValueError(f"init[{g!r}] has length {p.numel()} but group {g!r} has size {n}")
        p = p.detach().to(device="cpu", dtype=torch.long)
        if not torch.equal(torch.sort(p).values, torch.arange(n)):
            raise ValueError(f"init[{g!r}] is not a permutation of range({n})")
        perm[g] = p.clone()
    for name, hs in plan.heads.items():
        for g in hs.groups:
            blocks = perm[g].view(hs.num_heads, hs.head_dim) // hs.head_dim
            if not bool((blocks == blocks[:, :1]).all()):
                raise ValueError(
                    f"init[{g!r}] splits attention heads of head structure {name!r} "
                    f"(every head must map onto one whole head)"
                )
    return perm


def _check_finite(spec: PermutationSpec, states: Mapping[str, Mapping[str, Tensor]]) -> None:
    """ValueError naming the state, key, first bad entry and the groups it feeds when a
    weight that enters the cost is NaN or infinite (the solver would only see a matrix)."""
    for name, state in states.items():
        for key, t in state.items():
            if bool(torch.isfinite(t).all()):
                continue
            bad = torch.nonzero(~torch.isfinite(t))[0].tolist()
            value = float(t[tuple(bad)])
            groups = sorted({g for _, g in spec.axes_to_perm.get(key, ())})
            feeds = f"; it feeds group(s) {', '.join(map(repr, groups))}" if groups else ""
            raise ValueError(
                f"{name}[{key!r}] has a non-finite value ({value}) at index {tuple(bad)}"
                f"{feeds}: weight matching needs finite weights"
            )


def naive_cost(
    spec: PermutationSpec,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    perm: Permutation,
    group: str,
) -> Tensor:
    """The definition of group ``group``'s cost, in float64, with no caching: for every axis
    of the group, B with all *other* groups applied, both moved to ``(n, -1)``, multiplied.
    The reference :class:`CostBuilder` is tested against."""
    n = spec.group_sizes(state_a)[group]
    cost = torch.zeros(n, n, dtype=torch.float64)
    for ref in spec.perm_to_axes[group]:
        if ref.param in spec.no_cost or not torch.is_floating_point(state_a[ref.param]):
            continue
        wb = permute_param(spec, perm, ref.param, state_b[ref.param], skip_groups=(group,))
        cost += _segment_matrix(state_a[ref.param], ref, n) @ _segment_matrix(wb, ref, n).T
    return cost


def _segment_matrix(t: Tensor, ref: Any, n: int) -> Tensor:
    """The segment of ``ref`` along its axis, axis first, as a float64 ``(n, -1)`` matrix."""
    t = t.detach().movedim(ref.resolved_axis(t.dim()), 0)
    start, stop = ref.segment(t.shape[0])
    return t[start:stop].reshape(n, -1).to("cpu", torch.float64)
