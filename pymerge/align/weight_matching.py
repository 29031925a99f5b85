"""Weight matching: Git Re-Basin coordinate descent over permutation groups.

Maximises the summed inner product between model A's weights and the permuted
weights of model B,

    J(pi) = sum over state keys w (except ``spec.no_cost``) of <W_w^A, pi(W_w^B)>_F,

one group at a time: with every other group fixed, the best permutation of one
group is a linear assignment problem on

    A_p = sum over axes (w, axis) of group p: Wa_w(axis first, (n, -1)) @ Wb_w(other axes
          permuted, axis first, (n, -1)).T

solved with :func:`pymerge.linear_sum_assignment` (``maximize=True``), warm-started from
the previous duals of the same group. Groups under a :class:`~pymerge.spec.HeadStructure`
are solved jointly: for every pair of heads the within-head assignment of each member
group, then one head-to-head assignment on the summed within-head optima.

Numerics (``dtype=None``): costs are built and solved in float64 when either state holds
float64 weights, else in float32 (float16/bfloat16 weights are promoted to float32), like the
paper's reference code; scores are always summed in float64. The stopping tolerance follows
(``tol=None``: 1e-12 relative in float64, 1e-7 in float32, so round-off does not count as
progress). Pass ``dtype=torch.float64`` for float64 arithmetic on float32 weights (about
twice the time on CPU).

Speed: each group's cost is cached and, when a neighbouring permutation changes at ``c`` of
its ``L`` positions, updated with a rank-``c`` product instead of rebuilt; weights with one
other permuted axis are stored with that axis first so that permuting them is a row gather.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from pymerge._util.checks import check_state_pair
from pymerge.spec import PermutationSpec

Permutation = dict[str, Tensor]

__all__ = ["MatchingHistory", "WeightMatchingResult", "weight_matching", "matching_objective"]


@dataclass
class MatchingHistory:
    """What happened during coordinate descent.

    ``objective[i]`` is J after iteration ``i`` (``initial_objective`` before the first);
    ``solves[i]`` the number of assignment problems solved in iteration ``i`` (a head
    structure counts its within-head problems too); ``seconds[i]`` wall time of iteration
    ``i``; ``improved[i]`` the number of groups (or head structures) whose permutation
    changed for the better.
    """

    initial_objective: float = float("nan")
    objective: list[float] = field(default_factory=list)
    solves: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    improved: list[int] = field(default_factory=list)
    setup_seconds: float = 0.0

    @property
    def iterations(self) -> int:
        return len(self.objective)

    @property
    def total_solves(self) -> int:
        return int(sum(self.solves))

    @property
    def total_seconds(self) -> float:
        return float(self.setup_seconds + sum(self.seconds))


@dataclass
class WeightMatchingResult:
    """Result of :func:`weight_matching`.

    ``perm`` maps group -> LongTensor [n] (CPU): ``apply_permutation(spec, perm, state_b)``
    looks like ``state_a``. ``converged`` is True when the last iteration improved no group.
    Passing a result as ``init=`` to a later call also reuses its assignment duals.
    """

    perm: Permutation
    history: MatchingHistory
    converged: bool
    _duals: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def objective(self) -> float:
        """Final objective J (float64 arithmetic)."""
        if self.history.objective:
            return self.history.objective[-1]
        return self.history.initial_objective


# --------------------------------------------------------------------------- solver


def _assignment_api():
    from pymerge.ops import assignment as _asg

    return _asg


def _solve(cost: Tensor, prev: Any, backend: str | None) -> tuple[Tensor, Any]:
    """Maximising assignment of a square float cost; returns (col_ind LongTensor, state)."""
    res = _assignment_api().solve_assignment(cost, True, init=prev, backend=backend)
    return torch.as_tensor(res.col_ind, dtype=torch.long).cpu(), res


def _solve_batch(costs: Tensor, backend: str | None) -> Tensor:
    """Maximising assignments of a batch [B, d, d] of square costs -> col_ind [B, d]."""
    _, col = _assignment_api().linear_sum_assignment_batch(costs, True, backend=backend)
    return torch.as_tensor(col, dtype=torch.long).cpu().reshape(costs.shape[0], costs.shape[1])


# --------------------------------------------------------------------------- plan


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


class _Plan:
    """Everything precomputed once for a (spec, state_a, state_b) pair."""

    def __init__(
        self,
        spec: PermutationSpec,
        state_a: Mapping[str, Tensor],
        state_b: Mapping[str, Tensor],
        dtype: torch.dtype | None,
    ) -> None:
        self.spec = spec
        self.sizes = _validate(spec, state_a, state_b)
        self.groups = list(spec.groups())
        no_cost = set(spec.no_cost)
        self.cost_keys = [
            k for k, v in state_a.items() if k not in no_cost and torch.is_floating_point(v)
        ]
        if dtype is None:
            wide = any(
                s[k].dtype == torch.float64 for s in (state_a, state_b) for k in self.cost_keys
            )
            dtype = torch.float64 if wide else torch.float32
        self.dtype = dtype
        self.a = {k: state_a[k].detach().to(dtype) for k in self.cost_keys}
        self.b = {k: state_b[k].detach().to(dtype) for k in self.cost_keys}
        # refs by param and axis
        self.refs_by_param: dict[str, dict[int, list[_Ref]]] = {}
        self.refs_by_group: dict[str, list[_Ref]] = {g: [] for g in self.groups}
        for g in self.groups:
            for raw in spec.perm_to_axes[g]:
                ref = _normalise_ref(raw, g, state_a)
                self.refs_by_group[g].append(ref)
                self.refs_by_param.setdefault(ref.param, {}).setdefault(ref.axis, []).append(ref)
        # cost terms per group
        self.terms: dict[str, list[_Term]] = {g: [] for g in self.groups}
        for g in self.groups:
            n = self.sizes[g]
            for ref in self.refs_by_group[g]:
                if ref.param not in self.a:
                    continue
                others = sorted(ax for ax in self.refs_by_param[ref.param] if ax != ref.axis)
                numel = _moved(self.a[ref.param], ref).numel()
                if len(others) == 1:
                    k = self.a[ref.param].shape[others[0]]
                    a_view = _other_first(self.a[ref.param], ref, n, others[0])
                    try:
                        a_t = a_view.view(-1, n)  # no copy when the strides allow
                    except RuntimeError:
                        a_t = _other_first_copy(self.a[ref.param], ref, n, others[0])
                        a_t = a_t.view(-1, n)
                    b_t = _other_first_copy(self.b[ref.param], ref, n, others[0]).view(k, -1)
                    self.terms[g].append(_Term(ref, None, others, numel, a_t, b_t))
                else:
                    a_mat = _axis_first(self.a[ref.param], ref, n)
                    self.terms[g].append(_Term(ref, a_mat, others, numel))
        # groups of each head structure; the other groups solve alone
        self.head_of: dict[str, str] = {}
        self.heads = dict(getattr(spec, "heads", {}) or {})
        for name, hs in self.heads.items():
            for g in hs.groups:
                self.head_of[g] = name
        units: list[tuple[str, str]] = [("group", g) for g in self.groups if g not in self.head_of]
        units += [("heads", h) for h in self.heads]
        self.units = sorted(units, key=lambda u: u[1])
        # units some key carries on two different axes (J is then not linear in the unit)
        self.nonlinear_units: set[str] = set()
        for kind, name in self.units:
            members = {name} if kind == "group" else set(self.heads[name].groups)
            for axes in self.refs_by_param.values():
                hit = [ax for ax, refs in axes.items() if any(r.group in members for r in refs)]
                if len(hit) > 1:
                    self.nonlinear_units.add(name)
                    break
        # index cache: (param, axis) -> full-length index or None (identity)
        self._index: dict[tuple[str, int], Tensor | None] = {}
        self.device = next(iter(self.a.values())).device if self.a else torch.device("cpu")
        # cost cache: group -> summed cost, the other-axis indices each term was built with,
        # and the number of incremental updates since the last full build
        self._cost: dict[str, tuple[Tensor, list[Any], int]] = {}
        # objective cache: key -> (versions of the groups on its axes, <A, pi(B)>)
        self.version: dict[str, int] = {g: 0 for g in self.groups}
        self._groups_of = {
            k: sorted({r.group for refs in axes.values() for r in refs})
            for k, axes in self.refs_by_param.items()
        }
        self._dot: dict[str, tuple[tuple[int, ...], float]] = {}
        self.full_builds = 0
        self.delta_updates = 0

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
        length = self.b[param].shape[axis]
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

    def _term_cost(self, term: _Term, indices: Mapping[int, Tensor | None], n: int) -> Tensor:
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
        deps = {
            i: [(float(t.numel), self._term_groups(t)) for g in gs for t in self.terms[g]]
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
        self._cost[group] = (total, used, 0)
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
                for ax in term.other_axes:
                    pos = _changed_positions(used[i][ax], cur[i][ax], self.b[term.ref.param], ax)
                    if pos.numel():
                        changed[ax] = pos
                if not changed:
                    continue
                work.append((i, changed))
                if len(changed) == 1:
                    ((ax, pos),) = changed.items()
                    delta_flops += flops * pos.numel() / self.b[term.ref.param].shape[ax]
                else:
                    delta_flops += flops
            if not work and not missing:
                return total
            if delta_flops <= _DELTA_FRACTION * full_flops:
                for i, changed in work:
                    self._apply_delta(total, terms[i], used[i], cur[i], changed, n)
                for i in missing:
                    total.add_(self._term_cost(terms[i], cur[i], n))
                self.delta_updates += 1
                self._cost[group] = (total, cur, updates + 1)
                return total
        total = None
        for i, term in enumerate(terms):
            c = self._term_cost(term, cur[i], n)
            total = c if total is None else total.add_(c)
        assert total is not None
        self.full_builds += 1
        self._cost[group] = (total, cur, 0)
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
        added in float64; cached by group versions."""
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


def _changed_positions(old: Tensor | None, new: Tensor | None, t: Tensor, axis: int) -> Tensor:
    """Positions along ``axis`` where two full-length indices (None: identity) differ."""
    if old is None and new is None:
        return torch.empty(0, dtype=torch.long, device=t.device)
    if old is new:
        return torch.empty(0, dtype=torch.long, device=t.device)
    ar = None
    if old is None or new is None:
        ar = torch.arange(t.shape[axis], device=t.device)
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
    check_state_pair(state_a, state_b, "state_a", "state_b", same_device=True)
    sizes = spec.validate(state_a)
    spec.validate(state_b)
    return dict(sizes)


def _check_perm(init: Mapping[str, Tensor], plan: _Plan) -> Permutation:
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


# --------------------------------------------------------------------------- main loop


def weight_matching(
    spec: PermutationSpec,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    max_iter: int = 100,
    init: Mapping[str, Tensor] | WeightMatchingResult | None = None,
    seed: int = 0,
    progress: bool = False,
    backend: str | None = None,
    *,
    tol: float | None = None,
    dtype: torch.dtype | None = None,
    greedy: bool = True,
) -> WeightMatchingResult:
    """Git Re-Basin weight matching (Ainsworth et al. 2022, Alg. 1) by coordinate descent.

    Args:
        spec: permutation spec validated against both state dicts.
        state_a: reference state dict (key -> Tensor); never modified.
        state_b: state dict to permute towards ``state_a``; same keys and shapes.
        max_iter: maximum number of sweeps over all groups.
        init: warm start, a Permutation (missing groups start at identity) or a previous
            :class:`WeightMatchingResult` (its assignment duals are reused too).
        seed: seeds the random group order of each sweep (``torch.randperm`` on a
            ``torch.Generator`` seeded with ``seed``): same seed, same result.
        progress: show a tqdm bar over sweeps.
        backend: assignment backend (``"native"``, ``"torch"`` or None for auto).
        tol: a group counts as improved when its score rises by more than
            ``tol * max(1, |old score|)``; the loop stops after a sweep with no improvement.
            An assignment that does not improve keeps the old permutation. ``None``: 1e-12
            when computing in float64, 1e-7 in float32.
        dtype: arithmetic of the costs, ``torch.float64`` or ``torch.float32``; ``None``
            (default): float64 if either state has float64 weights, else float32.
        greedy: when starting from the identity (no ``init``), make the first sweep a greedy
            initialisation: groups are visited most-determined-first (the group with the most
            weight entries whose other permuted axes are already fixed goes next, ties by
            name) and each cost uses only the terms whose other axes are fixed, so no
            assignment is driven by the still-arbitrary identity of unvisited neighbours. On
            an MLP this is a forward layer-by-layer pass. It is kept only if it beats the
            identity's objective; the seeded random-order sweeps of the paper follow.
            ``greedy=False`` runs the paper's algorithm exactly.

    Returns:
        :class:`WeightMatchingResult` with ``perm`` (group -> LongTensor [n] on CPU), the
        ``history`` and ``converged``.
    """
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 0:
        raise ValueError(f"max_iter must be a non-negative int, got {max_iter!r}")
    if dtype not in (None, torch.float64, torch.float32):
        raise ValueError(f"dtype must be torch.float64, torch.float32 or None, got {dtype}")
    if tol is not None and not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    t0 = time.perf_counter()
    plan = _Plan(spec, state_a, state_b, dtype)
    if tol is None:
        tol = 1e-12 if plan.dtype == torch.float64 else 1e-7
    duals: dict[str, Any] = {}
    if isinstance(init, WeightMatchingResult):
        duals = dict(init._duals)
        init = init.perm
    perm = _check_perm(init or {}, plan)
    start_identity = not init
    history = MatchingHistory()
    history.initial_objective = plan.objective(perm)
    history.setup_seconds = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(int(seed))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_iter, desc="weight matching", unit="sweep")
    converged = False
    try:
        for it in range(max_iter):
            t_it = time.perf_counter()
            solves = 0
            improved = 0
            order = torch.randperm(len(plan.units), generator=gen).tolist()
            known: set[str] | None = None
            if it == 0 and greedy and start_identity:
                known = set()
                order = plan.greedy_order()
            gain = 0.0
            exact = known is not None
            for u in order:
                kind, name = plan.units[u]
                if kind == "group":
                    ok, s, dj = _step_group(plan, name, perm, duals, backend, tol, known)
                else:
                    ok, s, dj = _step_heads(plan, name, perm, backend, tol, known)
                solves += s
                improved += int(ok)
                gain += dj
                exact |= ok and name in plan.nonlinear_units
            # J is linear in one unit's permutation (unless a key carries the unit on two
            # axes), so the sweep's gain is the sum of the assignment gains
            previous = history.objective[-1] if history.objective else history.initial_objective
            objective = plan.objective(perm) if exact else previous + gain
            if known is not None and objective < history.initial_objective:
                # the greedy sweep ignores couplings; never let it lose against identity
                for g in plan.groups:
                    if not _is_identity(perm[g]):
                        perm[g] = torch.arange(plan.sizes[g])
                        plan.invalidate(g)
                objective = plan.objective(perm)
                improved = 0
            history.objective.append(objective)
            history.solves.append(solves)
            history.improved.append(improved)
            history.seconds.append(time.perf_counter() - t_it)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(objective=f"{history.objective[-1]:.6g}", improved=improved)
            if improved == 0 and known is None:  # a greedy sweep is always followed by another
                converged = True
                break
    finally:
        if bar is not None:
            bar.close()
    if history.objective:
        history.objective[-1] = plan.objective(perm)  # the final value evaluated exactly
    return WeightMatchingResult(perm=perm, history=history, converged=converged, _duals=duals)


def _improves(new: float, old: float, tol: float) -> bool:
    return new > old + tol * max(1.0, abs(old))


def _score(cost: Tensor, p: Tensor) -> float:
    n = cost.shape[0]
    picked = cost[torch.arange(n, device=cost.device), p.to(cost.device)]
    return float(picked.sum(dtype=torch.float64))


def _step_group(
    plan: _Plan,
    g: str,
    perm: Permutation,
    duals: dict[str, Any],
    backend: str | None,
    tol: float,
    known: set[str] | None = None,
) -> tuple[bool, int, float]:
    """One coordinate step on group ``g``: (improved, assignments solved, objective gain)."""
    if known is not None:
        cost = plan.partial_cost(g, perm, known)
        known.add(g)
        if cost is None:
            return False, 0, 0.0
        new, _ = _solve(cost, None, backend)
        changed = not torch.equal(new, perm[g])
        if changed:
            perm[g] = new
            plan.invalidate(g)
        return changed, 1, 0.0
    cost = plan.cost(g, perm)
    if cost is None:
        return False, 0, 0.0
    new, state = _solve(cost, duals.get(g), backend)
    duals[g] = state
    if torch.equal(new, perm[g]):
        return False, 1, 0.0
    new_score, old_score = _score(cost, new), _score(cost, perm[g])
    if _improves(new_score, old_score, tol):
        perm[g] = new
        plan.invalidate(g)
        return True, 1, new_score - old_score
    return False, 1, 0.0


def _step_heads(
    plan: _Plan,
    name: str,
    perm: Permutation,
    backend: str | None,
    tol: float,
    known: set[str] | None = None,
) -> tuple[bool, int, float]:
    """Joint step on the groups of head structure ``name`` (see :func:`_step_group`)."""
    hs = plan.heads[name]
    h, d = hs.num_heads, hs.head_dim
    if known is not None:
        costs = {g: plan.partial_cost(g, perm, known) for g in hs.groups}
        known.update(hs.groups)
        tol = -float("inf")
    else:
        costs = {g: plan.cost(g, perm) for g in hs.groups}
    costs = {g: c for g, c in costs.items() if c is not None}
    if not costs:
        return False, 0, 0.0
    solves = 0
    head_score = None
    within: dict[str, Tensor] = {}
    for g, c in costs.items():
        blocks = c.reshape(h, d, h, d).permute(0, 2, 1, 3).reshape(h * h, d, d)
        if d == 1:
            cols = torch.zeros(h * h, 1, dtype=torch.long)
        else:
            cols = _solve_batch(blocks.contiguous(), backend)
            solves += h * h
        within[g] = cols
        sc = blocks.gather(2, cols.to(blocks.device).view(h * h, d, 1)).sum(dim=(1, 2))
        sc = sc.reshape(h, h)
        head_score = sc if head_score is None else head_score + sc
    assert head_score is not None
    sigma, _ = _solve(head_score, None, backend)
    solves += 1
    new_perm: dict[str, Tensor] = {}
    rows = torch.arange(h)
    for g in costs:
        w = within[g].view(h, h, d)[rows, sigma]  # (h, d): within-head perm for pair (i, sigma_i)
        new_perm[g] = (sigma.view(h, 1) * d + w).reshape(-1)
    old = sum(_score(costs[g], perm[g]) for g in costs)
    new = sum(_score(costs[g], new_perm[g]) for g in costs)
    if all(torch.equal(new_perm[g], perm[g]) for g in costs):
        return False, solves, 0.0
    if _improves(new, old, tol):
        for g, p in new_perm.items():
            perm[g] = p
            plan.invalidate(g)
        return True, solves, new - old
    return False, solves, 0.0


def matching_objective(
    spec: PermutationSpec,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    perm: Mapping[str, Tensor] | None = None,
) -> float:
    """J(perm) = sum over keys (except ``spec.no_cost``) of <A_w, perm(B)_w>, in float64."""
    plan = _Plan(spec, state_a, state_b, torch.float64)
    return plan.objective(_check_perm(perm or {}, plan))  # float64 products
