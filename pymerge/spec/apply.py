"""Permutations: apply, check, make (random/identity), invert, compose, index maps.

A permutation is ``dict[str, torch.LongTensor]``: group -> indices of shape ``[n]``.
Convention (Git Re-Basin): ``new = old.index_select(axis, perm[group])``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from pymerge._util.args import check_seed
from pymerge.spec.spec import AxisRef, PermutationSpec

__all__ = [
    "Permutation",
    "apply_permutation",
    "permute_param",
    "random_permutation",
    "identity_permutation",
    "invert_permutation",
    "compose_permutations",
    "permutation_index_map",
    "check_permutation",
]

#: The one permutation type: group name -> int64 index tensor ``[n]``; applying it to a
#: parameter is ``new = old.index_select(axis, perm[group])`` along every axis of the group.
Permutation = dict[str, torch.Tensor]


def _is_perm(p: torch.Tensor, n: int) -> bool:
    return bool(torch.equal(torch.sort(p).values, torch.arange(n, device=p.device)))


def check_permutation(
    spec: PermutationSpec, perm: Mapping[str, torch.Tensor], sizes: Mapping[str, int]
) -> dict[str, torch.Tensor]:
    """Validate ``perm`` against the spec's groups and ``sizes``; return int64 CPU copies.

    ValueError naming the group for: missing group, unknown group, wrong shape, not a
    permutation, head structure broken (heads not kept whole or head perms not shared).
    """
    if not isinstance(perm, Mapping):
        raise TypeError(f"perm must be a dict group -> LongTensor, got {type(perm).__name__}")
    out: dict[str, torch.Tensor] = {}
    for g in spec.groups():
        if g not in perm:
            raise ValueError(f"permutation is missing group {g!r}")
        p = perm[g]
        if not isinstance(p, torch.Tensor):
            p = torch.as_tensor(p)
        if p.dtype.is_floating_point or p.dtype == torch.bool or p.is_complex():
            raise ValueError(f"permutation of group {g!r} must be integer, got {p.dtype}")
        n = sizes[g]
        if p.ndim != 1 or p.shape[0] != n:
            raise ValueError(
                f"permutation of group {g!r} has shape {tuple(p.shape)}, expected ({n},)"
            )
        p = p.detach().to("cpu", torch.long)
        if not _is_perm(p, n):
            raise ValueError(f"permutation of group {g!r} is not a permutation of range({n})")
        out[g] = p
    extra = set(perm) - set(out)
    if extra:
        raise ValueError(f"permutation has unknown group {sorted(extra)[0]!r}")
    for name, h in spec.heads.items():
        head_perm = None
        for g in h.groups:
            blocks = out[g].view(h.num_heads, h.head_dim) // h.head_dim
            if not bool((blocks == blocks[:, :1]).all()):
                raise ValueError(f"permutation of group {g!r} splits heads of structure {name!r}")
            hp = blocks[:, 0]
            if head_perm is None:
                head_perm = hp
            elif not torch.equal(hp, head_perm):
                raise ValueError(
                    f"permutation of group {g!r} moves heads differently from "
                    f"{h.groups[0]!r} (head structure {name!r})"
                )
    return out


def _axis_index(
    length: int, refs: Iterable[tuple[AxisRef, torch.Tensor]], device: torch.device | None = None
) -> torch.Tensor:
    """Full-length index along one axis from the (ref, group perm) pairs acting on it."""
    idx = torch.arange(length)
    for r, p in refs:
        s, _ = r.segment(length)
        if r.inner == 1:
            seg = p + s
        else:
            seg = (p[:, None] * r.inner + torch.arange(r.inner)).reshape(-1) + s
        idx[s : s + seg.numel()] = seg
    return idx if device is None else idx.to(device)


def _param_indices(
    spec: PermutationSpec,
    perm: Mapping[str, torch.Tensor],
    name: str,
    t: torch.Tensor,
    skip_groups: Iterable[str] = (),
) -> list[tuple[int, torch.Tensor]]:
    skip = set(skip_groups)
    by_axis: dict[int, list[tuple[AxisRef, torch.Tensor]]] = {}
    for r, g in spec.axes_to_perm.get(name, ()):
        if g in skip:
            continue
        if g not in perm:
            raise ValueError(f"permutation is missing group {g!r} (needed by {name!r})")
        ax = r.resolved_axis(t.ndim)
        p = perm[g]
        if not isinstance(p, torch.Tensor):
            p = torch.as_tensor(p)
        by_axis.setdefault(ax, []).append((r, p.to("cpu", torch.long)))
    return [(ax, _axis_index(t.shape[ax], lst)) for ax, lst in sorted(by_axis.items())]


def _index(t: torch.Tensor, indices: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    for ax, idx in indices:
        t = t.index_select(ax, idx.to(t.device))
    return t


def apply_permutation(
    spec: PermutationSpec, perm: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """New state dict with every permuted axis reindexed: ``new = old.index_select(axis, p)``.

    ``perm`` is validated (ValueError naming the group). Keys the spec does not permute are
    returned as the same tensor objects (the input is never modified).
    """
    sizes = spec.validate(state)
    p = check_permutation(spec, perm, sizes)
    out: dict[str, torch.Tensor] = {}
    for k, t in state.items():
        if k in spec.axes_to_perm:
            out[k] = _index(t, _param_indices(spec, p, k, t))
        else:
            out[k] = t
    return out


def permute_param(
    spec: PermutationSpec,
    perm: Mapping[str, torch.Tensor],
    name: str,
    tensor: torch.Tensor,
    *,
    skip_groups: Iterable[str] = (),
) -> torch.Tensor:
    """Permute one tensor along all its axes, except those of groups in ``skip_groups``.

    Light checks only (missing group); use :func:`apply_permutation` for full validation.
    Returns ``tensor`` itself when no axis is permuted.
    """
    indices = _param_indices(spec, perm, name, tensor, skip_groups)
    return _index(tensor, indices) if indices else tensor


def permutation_index_map(
    spec: PermutationSpec, perm: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]
) -> dict[str, tuple[tuple[int, torch.Tensor], ...]]:
    """param -> ``((axis, full-length LongTensor index), ...)`` for every permuted param.

    ``t.index_select(a0, i0).index_select(a1, i1)...`` equals
    ``apply_permutation(spec, perm, state)[param]``. Indices live on the param's device.
    """
    sizes = spec.validate(state)
    p = check_permutation(spec, perm, sizes)
    out = {}
    for k in spec.axes_to_perm:
        t = state[k]
        out[k] = tuple((ax, idx.to(t.device)) for ax, idx in _param_indices(spec, p, k, t))
    return out


def identity_permutation(spec: PermutationSpec, state: Mapping[str, torch.Tensor]) -> Permutation:
    """``{group: arange(n)}`` for every group."""
    return {g: torch.arange(n) for g, n in spec.validate(state).items()}


def random_permutation(
    spec: PermutationSpec, state: Mapping[str, torch.Tensor], *, seed: int = 0
) -> Permutation:
    """A uniformly random permutation of every group, deterministic for ``seed``.

    Head structures are respected: one head permutation shared by the structure's groups,
    and an independent within-head permutation per group and head.
    """
    sizes = spec.validate(state)
    gen = torch.Generator().manual_seed(check_seed(seed))
    out: Permutation = {}
    for name in sorted(spec.heads):
        h = spec.heads[name]
        hp = torch.randperm(h.num_heads, generator=gen)
        for g in h.groups:
            within = torch.stack(
                [torch.randperm(h.head_dim, generator=gen) for _ in range(h.num_heads)]
            )
            out[g] = (hp[:, None] * h.head_dim + within).reshape(-1)
    for g in spec.groups():
        if g not in out:
            out[g] = torch.randperm(sizes[g], generator=gen)
    return out


def _as_index(p: object, where: str) -> torch.Tensor:
    """``p`` as a 1-D int64 tensor holding a permutation of ``range(len(p))``; ValueError /
    TypeError naming ``where`` for floats, bools, wrong ranks, out-of-range or repeated
    entries (nothing is truncated or wrapped)."""
    t = p if isinstance(p, torch.Tensor) else torch.as_tensor(p)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{where} must hold integers, got dtype {t.dtype}")
    if t.ndim != 1:
        raise ValueError(f"{where} must be 1-D, got shape {tuple(t.shape)}")
    t = t.to(torch.long)
    n = t.numel()
    if n and (int(t.min()) < 0 or int(t.max()) >= n):
        bad = int(t.min()) if int(t.min()) < 0 else int(t.max())
        raise ValueError(f"{where} has entry {bad} outside range({n})")
    if not _is_perm(t, n):
        raise ValueError(f"{where} is not a permutation of range({n}) (repeated entries)")
    return t


def invert_permutation(perm: Mapping[str, torch.Tensor]) -> Permutation:
    """``inv[g][perm[g][i]] = i``: applying ``perm`` then ``inv`` is the identity.

    Every entry must be a permutation of ``range(n)`` (integers, no repeats, in range):
    anything else is a ValueError/TypeError naming the group.
    """
    out = {}
    for g, p in perm.items():
        p = _as_index(p, f"permutation of group {g!r}")
        inv = torch.empty_like(p)
        inv[p] = torch.arange(p.numel(), device=p.device)
        out[g] = inv
    return out


def compose_permutations(
    spec: PermutationSpec, first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor]
) -> Permutation:
    """The permutation equal to applying ``first`` and then ``second``: ``first[g][second[g]]``.

    Both must hold a permutation of the same length for every group of ``spec``
    (ValueError/TypeError naming the group and which argument is wrong).
    """
    out = {}
    for g in spec.groups():
        for which, p in (("first", first), ("second", second)):
            if g not in p:
                raise ValueError(f"{which} permutation is missing group {g!r}")
        a = _as_index(first[g], f"first permutation of group {g!r}")
        b = _as_index(second[g], f"second permutation of group {g!r}")
        if a.shape != b.shape:
            raise ValueError(
                f"group {g!r}: permutations of lengths {a.numel()} and {b.numel()} "
                "cannot be composed"
            )
        out[g] = a[b.to(a.device)]
    return out
