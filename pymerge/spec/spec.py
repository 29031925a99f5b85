"""PermutationSpec: which axes of which parameters each permutation group acts on.

Plain data (Git Re-Basin's ``perm_to_axes``) plus validation against a state dict.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["AxisRef", "HeadStructure", "ActivationPoint", "PermutationSpec"]


@dataclass(frozen=True)
class AxisRef:
    """One permuted axis (or a segment of one) of one parameter/buffer.

    A group of size ``n`` acts on the segment ``[start, stop)`` of axis ``axis`` of the
    state-dict entry ``param``; the segment has length ``n * inner`` and index
    ``start + c * inner + j`` is taken from ``start + perm[c] * inner + j``
    (``inner > 1``: conv channels flattened into a Linear's input).
    """

    param: str
    axis: int
    start: int = 0
    stop: int | None = None
    inner: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.param, str) or not self.param:
            raise TypeError(f"AxisRef.param must be a non-empty str, got {self.param!r}")
        for name in ("axis", "start", "inner"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise TypeError(f"AxisRef.{name} of {self.param!r} must be an int")
        if self.stop is not None and (not isinstance(self.stop, int) or self.stop < self.start):
            raise ValueError(f"AxisRef of {self.param!r}: bad segment [{self.start}, {self.stop})")
        if self.start < 0:
            raise ValueError(f"AxisRef of {self.param!r}: negative segment start {self.start}")
        if self.inner < 1:
            raise ValueError(f"AxisRef of {self.param!r}: inner must be >= 1, got {self.inner}")

    def resolved_axis(self, ndim: int) -> int:
        """Non-negative axis for a tensor with ``ndim`` dims (ValueError if out of range)."""
        ax = self.axis + ndim if self.axis < 0 else self.axis
        if not 0 <= ax < ndim:
            raise ValueError(f"axis {self.axis} out of range for {self.param!r} with {ndim} dims")
        return ax

    def segment(self, axis_len: int) -> tuple[int, int]:
        """``(start, stop)`` with ``stop`` resolved for an axis of length ``axis_len``."""
        stop = axis_len if self.stop is None else self.stop
        return self.start, stop

    def to_list(self) -> list[Any]:
        return [self.param, self.axis, self.start, self.stop, self.inner]

    @classmethod
    def coerce(cls, obj: Any) -> AxisRef:
        """Accept an AxisRef, a ``(param, axis[, start, stop, inner])`` tuple/list or a dict."""
        if isinstance(obj, AxisRef):
            return obj
        if isinstance(obj, Mapping):
            return cls(**obj)
        if isinstance(obj, (tuple, list)) and 2 <= len(obj) <= 5:
            return cls(*obj)
        raise TypeError(f"cannot make an AxisRef from {obj!r}; use (param, axis) or AxisRef")


@dataclass(frozen=True)
class HeadStructure:
    """Groups whose permutation must keep heads (blocks) whole.

    Each group in ``groups`` has size ``num_heads * head_dim``; all of them share ONE
    permutation of the heads, and each group has its own permutation of units within each
    head: ``perm[h*head_dim + j] = head_perm[h]*head_dim + within[h][j]``. Used for attention
    (q/k rows share group 'qk', v rows and out_proj columns share 'vo') and for GroupNorm
    (channel groups are blocks).
    """

    num_heads: int
    head_dim: int
    groups: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.num_heads < 1 or self.head_dim < 1:
            raise ValueError(
                f"HeadStructure needs positive sizes, got {self.num_heads}x{self.head_dim}"
            )
        object.__setattr__(self, "groups", tuple(self.groups))
        if not self.groups:
            raise ValueError("HeadStructure.groups must not be empty")


@dataclass(frozen=True)
class ActivationPoint:
    """Where a group's features can be observed: the output of submodule ``module``
    (dotted name as in ``model.named_modules()``), features along ``dim`` (1 for NCHW /
    ``[N, d]``; -1 for ``[N, T, d]``)."""

    module: str
    dim: int


def _as_str_set(keys: Iterable[str] | str, what: str) -> frozenset[str]:
    if isinstance(keys, str):
        keys = (keys,)
    out = frozenset(keys)
    for k in out:
        if not isinstance(k, str):
            raise TypeError(f"{what} keys must be str, got {k!r}")
    return out


class PermutationSpec:
    """Permutation groups -> the (segments of) axes of state-dict entries they act on.

    Attributes:
        perm_to_axes: group -> list of :class:`AxisRef`.
        axes_to_perm: param -> list of ``(AxisRef, group)`` (derived).
        free: keys declared unpermuted (e.g. final classifier bias, ``num_batches_tracked``).
        no_cost: keys excluded from matching costs (BN running stats, ``num_batches_tracked``);
            they may still be permuted.
        heads: name -> :class:`HeadStructure`.
        activation_points: group -> :class:`ActivationPoint` (may be partial).
        report: human-readable notes (e.g. what tracing could not handle).
    """

    def __init__(
        self,
        perm_to_axes: Mapping[str, Iterable[Any]],
        *,
        free: Iterable[str] = (),
        no_cost: Iterable[str] = (),
        heads: Mapping[str, HeadStructure] | None = None,
        activation_points: Mapping[str, ActivationPoint | tuple[str, int]] | None = None,
        report: Sequence[str] = (),
    ) -> None:
        self.perm_to_axes: dict[str, list[AxisRef]] = _coerce_groups(perm_to_axes)
        a2p: dict[str, list[tuple[AxisRef, str]]] = {}
        for group, refs in self.perm_to_axes.items():
            for r in refs:
                a2p.setdefault(r.param, []).append((r, group))
        self.axes_to_perm: dict[str, list[tuple[AxisRef, str]]] = a2p
        self.free: frozenset[str] = _as_str_set(free, "free")
        self.no_cost: frozenset[str] = _as_str_set(no_cost, "no_cost")
        self.heads: dict[str, HeadStructure] = _coerce_heads(heads or {}, self.perm_to_axes)
        self.activation_points: dict[str, ActivationPoint] = _coerce_points(
            activation_points or {}, self.perm_to_axes
        )
        self.report: list[str] = list(report)
        both = self.free & set(a2p)
        if both:
            raise ValueError(f"key {sorted(both)[0]!r} is declared free but a group permutes it")

    # ------------------------------------------------------------------ basics
    def groups(self) -> list[str]:
        """Sorted group names."""
        return sorted(self.perm_to_axes)

    def head_of(self, group: str) -> HeadStructure | None:
        """The head structure containing ``group``, if any."""
        for h in self.heads.values():
            if group in h.groups:
                return h
        return None

    def __repr__(self) -> str:
        return (
            f"PermutationSpec({len(self.perm_to_axes)} groups, {len(self.axes_to_perm)} "
            f"permuted keys, {len(self.free)} free, {len(self.heads)} head structures)"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PermutationSpec):
            return NotImplemented
        return self.to_dict(include_report=False) == other.to_dict(include_report=False)

    __hash__ = None  # type: ignore[assignment]

    # ------------------------------------------------------------------ sizes / validation
    def group_sizes(self, state: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Size ``n`` of each group, read from its first axis (``segment length // inner``)."""
        out = {}
        for g, refs in self.perm_to_axes.items():
            out[g] = _ref_size(refs[0], state, g)
        return out

    def validate(self, state: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Check the spec against ``state``; raise ValueError naming the first problem.

        Checks: every referenced key exists and is a tensor, axes and segments are in range,
        segment lengths are multiples of ``inner``, segments on one axis do not overlap, each
        group has one size, every state key is permuted or declared free/no_cost, free keys
        exist, head structures fit their groups. Returns the group sizes.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping of str -> Tensor, got {type(state)}")
        sizes = self._sizes(state)
        self._check_overlaps(state)
        for key, val in state.items():
            if not isinstance(val, torch.Tensor):
                raise TypeError(f"state[{key!r}] is {type(val).__name__}, not a Tensor")
            if key not in self.axes_to_perm and key not in self.free and key not in self.no_cost:
                raise ValueError(f"key {key!r} is neither permuted by a group nor declared free")
        for key in sorted(self.free | self.no_cost):
            if key not in state:
                raise ValueError(f"key {key!r} is declared free/no_cost but missing from state")
        for name, h in self.heads.items():
            for g in h.groups:
                if sizes[g] != h.num_heads * h.head_dim:
                    raise ValueError(
                        f"head structure {name!r}: group {g!r} has size {sizes[g]}, expected "
                        f"num_heads*head_dim = {h.num_heads}*{h.head_dim}"
                    )
        return sizes

    def _sizes(self, state: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Each group's size, checked to agree on every axis it acts on."""
        sizes: dict[str, int] = {}
        for g in self.groups():
            for r in self.perm_to_axes[g]:
                n = _ref_size(r, state, g)
                if g in sizes and sizes[g] != n:
                    first = self.perm_to_axes[g][0]
                    raise ValueError(
                        f"group {g!r} has inconsistent sizes: {sizes[g]} on "
                        f"{first.param!r} axis {first.axis} but {n} on {r.param!r} axis {r.axis}"
                    )
                sizes[g] = n
        return sizes

    def _check_overlaps(self, state: Mapping[str, torch.Tensor]) -> None:
        """Segments of different groups on one axis must not overlap."""
        for key, lst in self.axes_to_perm.items():
            t = state[key]
            by_axis: dict[int, list[tuple[int, int, str]]] = {}
            for r, g in lst:
                ax = r.resolved_axis(t.ndim)
                s, e = r.segment(t.shape[ax])
                by_axis.setdefault(ax, []).append((s, e, g))
            for ax, segs in by_axis.items():
                segs.sort()
                for (s0, e0, g0), (s1, e1, g1) in zip(segs, segs[1:], strict=False):
                    if s1 < e0:
                        raise ValueError(
                            f"{key!r} axis {ax}: segments [{s0},{e0}) of group {g0!r} and "
                            f"[{s1},{e1}) of group {g1!r} overlap"
                        )

    def normalized(self, state: Mapping[str, torch.Tensor]) -> PermutationSpec:
        """Copy with non-negative axes and explicit segment stops, resolved against ``state``."""
        p2a = {}
        for g, refs in self.perm_to_axes.items():
            lst = []
            for r in refs:
                t = _get(state, r.param, g)
                ax = r.resolved_axis(t.ndim)
                s, e = r.segment(t.shape[ax])
                lst.append(AxisRef(r.param, ax, s, e, r.inner))
            p2a[g] = lst
        return self._replace(perm_to_axes=p2a)

    # ------------------------------------------------------------------ editing
    def _replace(self, **kw: Any) -> PermutationSpec:
        args: dict[str, Any] = dict(
            perm_to_axes=self.perm_to_axes,
            free=self.free,
            no_cost=self.no_cost,
            heads=self.heads,
            activation_points=self.activation_points,
            report=self.report,
        )
        args.update(kw)
        p2a = args.pop("perm_to_axes")
        return PermutationSpec(p2a, **args)

    def without_groups(self, groups: Iterable[str] | str) -> PermutationSpec:
        """Freeze ``groups`` (identity permutation). Keys left with no permuted axis become free.

        Freezing one group of a head structure freezes every group of that structure (the shared
        head permutation must then be the identity).
        """
        drop = set(_as_str_set(groups, "group"))
        for g in drop:
            if g not in self.perm_to_axes:
                raise ValueError(f"unknown group {g!r}")
        changed = True
        while changed:
            changed = False
            for h in self.heads.values():
                if drop & set(h.groups) and not set(h.groups) <= drop:
                    drop |= set(h.groups)
                    changed = True
        p2a = {g: refs for g, refs in self.perm_to_axes.items() if g not in drop}
        still = {r.param for refs in p2a.values() for r in refs}
        newly_free = {k for k in self.axes_to_perm if k not in still}
        heads = {n: h for n, h in self.heads.items() if not set(h.groups) & drop}
        aps = {g: a for g, a in self.activation_points.items() if g not in drop}
        return self._replace(
            perm_to_axes=p2a, free=self.free | newly_free, heads=heads, activation_points=aps
        )

    def with_free(self, keys: Iterable[str] | str) -> PermutationSpec:
        """Declare ``keys`` unpermuted: every group acting on one of them is frozen."""
        keys = _as_str_set(keys, "free")
        groups = {g for k in keys for _, g in self.axes_to_perm.get(k, [])}
        out = self.without_groups(groups) if groups else self
        return out._replace(free=out.free | keys)

    def merge_groups(self, groups: Sequence[str], name: str | None = None) -> PermutationSpec:
        """Make ``groups`` share one permutation (named ``name``, default the first)."""
        groups = list(groups)
        if len(groups) < 2:
            raise ValueError("merge_groups needs at least two groups")
        for g in groups:
            if g not in self.perm_to_axes:
                raise ValueError(f"unknown group {g!r}")
        name = name or groups[0]
        if name in self.perm_to_axes and name not in groups:
            raise ValueError(f"group name {name!r} already exists")
        if any(self.head_of(g) is not None for g in groups):
            raise ValueError(f"cannot merge head-structured groups {groups}")
        p2a: dict[str, list[AxisRef]] = {}
        for g, refs in self.perm_to_axes.items():
            if g in groups:
                p2a.setdefault(name, []).extend(refs)
            else:
                p2a[g] = refs
        aps = {g: a for g, a in self.activation_points.items() if g not in groups}
        for g in groups:
            if g in self.activation_points:
                aps.setdefault(name, self.activation_points[g])
        return self._replace(perm_to_axes=p2a, activation_points=aps)

    def with_groups(self, groups: Mapping[str, Iterable[Any]]) -> PermutationSpec:
        """Add or replace groups (``name -> axis refs``). A replaced group keeps its head
        structure / activation point. Keys they permute are removed from ``free``."""
        p2a = dict(self.perm_to_axes)
        for g, refs in groups.items():
            p2a[g] = [AxisRef.coerce(r) for r in refs]
        covered = {r.param for refs in p2a.values() for r in refs}
        return self._replace(perm_to_axes=p2a, free=self.free - covered)

    def override(self, overrides: Mapping[str, Any]) -> PermutationSpec:
        """Apply user overrides: ``{group: None}`` freezes the group; ``{group: [refs]}``
        adds/replaces it; ``{"__free__": [keys]}`` declares keys unpermuted;
        ``{"__merge__": [[g1, g2, ...], ...]}`` merges groups."""
        spec = self
        frozen = [g for g, v in overrides.items() if v is None and not g.startswith("__")]
        if frozen:
            spec = spec.without_groups(frozen)
        repl = {g: v for g, v in overrides.items() if v is not None and not g.startswith("__")}
        if repl:
            spec = spec.with_groups(repl)
        if "__free__" in overrides:
            spec = spec.with_free(overrides["__free__"])
        for gs in overrides.get("__merge__", ()):
            spec = spec.merge_groups(gs)
        unknown = [
            k for k in overrides if k.startswith("__") and k not in ("__free__", "__merge__")
        ]
        if unknown:
            raise ValueError(f"unknown override key {unknown[0]!r}")
        return spec

    # ------------------------------------------------------------------ serialisation
    def to_dict(self, include_report: bool = True) -> dict[str, Any]:
        """Plain JSON-able data (lists, dicts, str, int, None)."""
        d: dict[str, Any] = {
            "version": 1,
            "perm_to_axes": {g: [r.to_list() for r in self.perm_to_axes[g]] for g in self.groups()},
            "free": sorted(self.free),
            "no_cost": sorted(self.no_cost),
            "heads": {
                n: {"num_heads": h.num_heads, "head_dim": h.head_dim, "groups": list(h.groups)}
                for n, h in sorted(self.heads.items())
            },
            "activation_points": {
                g: {"module": a.module, "dim": a.dim}
                for g, a in sorted(self.activation_points.items())
            },
        }
        if include_report:
            d["report"] = list(self.report)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PermutationSpec:
        """Inverse of :meth:`to_dict`."""
        if d.get("version", 1) != 1:
            raise ValueError(f"unsupported spec version {d.get('version')!r}")
        return cls(
            {g: [AxisRef(*r) for r in refs] for g, refs in d["perm_to_axes"].items()},
            free=d.get("free", ()),
            no_cost=d.get("no_cost", ()),
            heads={
                n: HeadStructure(h["num_heads"], h["head_dim"], tuple(h["groups"]))
                for n, h in d.get("heads", {}).items()
            },
            activation_points={
                g: ActivationPoint(a["module"], a["dim"])
                for g, a in d.get("activation_points", {}).items()
            },
            report=d.get("report", ()),
        )


def _coerce_groups(perm_to_axes: Mapping[str, Iterable[Any]]) -> dict[str, list[AxisRef]]:
    p2a: dict[str, list[AxisRef]] = {}
    for group, refs in perm_to_axes.items():
        if not isinstance(group, str) or not group:
            raise TypeError(f"group names must be non-empty str, got {group!r}")
        lst = [AxisRef.coerce(r) for r in refs]
        if not lst:
            raise ValueError(f"group {group!r} acts on no axis")
        p2a[group] = lst
    return p2a


def _coerce_heads(heads: Mapping[str, Any], groups: Mapping[str, Any]) -> dict[str, HeadStructure]:
    hs: dict[str, HeadStructure] = {}
    seen: dict[str, str] = {}
    for name, h in heads.items():
        if isinstance(h, Mapping):
            h = HeadStructure(**h)
        if not isinstance(h, HeadStructure):
            raise TypeError(f"heads[{name!r}] must be a HeadStructure, got {h!r}")
        for g in h.groups:
            if g not in groups:
                raise ValueError(f"head structure {name!r} names unknown group {g!r}")
            if g in seen:
                raise ValueError(f"group {g!r} is in two head structures: {seen[g]!r} and {name!r}")
            seen[g] = name
        hs[name] = h
    return hs


def _coerce_points(
    points: Mapping[str, Any], groups: Mapping[str, Any]
) -> dict[str, ActivationPoint]:
    aps: dict[str, ActivationPoint] = {}
    for g, ap in points.items():
        if isinstance(ap, (tuple, list)):
            ap = ActivationPoint(*ap)
        elif isinstance(ap, Mapping):
            ap = ActivationPoint(**ap)
        if g not in groups:
            raise ValueError(f"activation point given for unknown group {g!r}")
        aps[g] = ap
    return aps


def _get(state: Mapping[str, torch.Tensor], key: str, group: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"group {group!r} refers to key {key!r}, which is missing from state")
    t = state[key]
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"state[{key!r}] is {type(t).__name__}, not a Tensor")
    return t


def _ref_size(r: AxisRef, state: Mapping[str, torch.Tensor], group: str) -> int:
    t = _get(state, r.param, group)
    try:
        ax = r.resolved_axis(t.ndim)
    except ValueError as e:
        raise ValueError(f"group {group!r}: {e}") from None
    length = t.shape[ax]
    s, e = r.segment(length)
    if e > length:
        raise ValueError(
            f"group {group!r}: segment [{s}, {e}) of {r.param!r} axis {ax} exceeds "
            f"its length {length}"
        )
    if (e - s) % r.inner:
        raise ValueError(
            f"group {group!r}: segment length {e - s} of {r.param!r} axis {ax} is "
            f"not a multiple of inner={r.inner}"
        )
    n = (e - s) // r.inner
    if n == 0:
        raise ValueError(f"group {group!r}: empty segment on {r.param!r} axis {ax}")
    return n
