"""Permuted axes of ``permuted_interpolate``: ``param -> ((axis, index), ...)`` validated into
int64 CPU permutations, each distinct index checked once and cached while it is unchanged."""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch

from pymerge._util.cache import LRUCache
from pymerge._util.checks import StateDict

# id(index) -> (weakref, version, axis size, validated int64 CPU copy)
_INDEX = LRUCache(4096)


def clear_cache() -> None:
    """Forget validated indices."""
    _INDEX.clear()


def normalise_axes(
    spec_axes: Mapping[str, Any],
    perm: Mapping[str, Any] | None,
    state: StateDict,
) -> dict[str, list[tuple[int, torch.Tensor]]]:
    """Validated ``key -> [(axis, int64 CPU index)]`` (indices checked to be permutations)."""
    if not isinstance(spec_axes, Mapping):
        hint = (
            "; for a PermutationSpec call pymerge.spec.aligned_interpolate(spec, perm, a, b, alpha)"
            if hasattr(spec_axes, "perm_to_axes")
            else ""
        )
        raise TypeError(
            "spec_axes must be a mapping param -> ((axis, index), ...), "
            f"got {type(spec_axes).__name__}{hint}"
        )
    raw: dict[str, list[tuple[int, Any, str]]] = {}
    for key, entries in spec_axes.items():
        if key not in state:
            raise ValueError(f"spec_axes names key {key!r}, which is not in the state dicts")
        t = state[key]
        if not t.is_floating_point():
            raise TypeError(f"spec_axes permutes {key!r}, whose dtype {t.dtype} is not floating")
        if (
            isinstance(entries, tuple)
            and len(entries) == 2
            and isinstance(entries[0], int)
            and not isinstance(entries[1], int)
        ):
            entries = (entries,)  # a single (axis, index) pair
        lst = []
        for entry in entries:
            try:
                axis, idx = entry
            except (TypeError, ValueError):
                raise TypeError(
                    f"spec_axes[{key!r}] entries must be (axis, index) pairs, got {entry!r}"
                ) from None
            if not isinstance(axis, int) or isinstance(axis, bool):
                raise TypeError(f"spec_axes[{key!r}]: axis {axis!r} is not an int")
            nd = t.dim()
            if not -nd <= axis < nd:
                raise ValueError(
                    f"spec_axes[{key!r}]: axis {axis} out of range for shape {tuple(t.shape)}"
                )
            axis %= nd
            label: Any = (key, axis, None)  # formatted only for an error message
            if perm is not None:
                if not isinstance(idx, str):
                    raise TypeError(
                        f"spec_axes[{key!r}]: with perm given, entries are (axis, group name); "
                        f"got {type(idx).__name__}"
                    )
                if idx not in perm:
                    raise ValueError(f"{_label(label)}: group {idx!r} is not in perm")
                label = (key, axis, idx)
                idx = perm[idx]
            lst.append((axis, idx, label))
        raw[key] = lst
    # validate each distinct index object once (a group's index serves many params)
    checked: dict[tuple[int, int], torch.Tensor] = {}
    out: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for key, lst in raw.items():
        t = state[key]
        res = []
        for axis, idx, label in lst:
            n = t.shape[axis]
            ck = (id(idx), n)
            if ck not in checked:
                checked[ck] = _check_index(idx, n, label)
            res.append((axis, checked[ck]))
        if res:
            out[key] = res
    return out


def _label(label: Any) -> str:
    if isinstance(label, str):
        return label
    key, axis, group = label
    return f"key {key!r} axis {axis}" + (f" (group {group!r})" if group is not None else "")


def _check_index(idx: Any, n: int, label: Any) -> torch.Tensor:
    """Validated int64 CPU copy of ``idx`` (a permutation of ``range(n)``).

    Cached per live index tensor and its version counter: a repeated call with the same
    indices neither re-validates nor copies them off the GPU again (no sync)."""
    version = None
    if isinstance(idx, torch.Tensor):
        try:
            version = idx._version
        except RuntimeError:  # inference tensors have no version counter
            version = None
    if version is not None:
        hit = _INDEX.get(id(idx))
        if hit is not None and hit[0]() is idx and hit[1] == version and hit[2] == n:
            return hit[3]
    cpu = _validate_index(idx, n, label)
    if version is not None:
        _INDEX.put(id(idx), (weakref.ref(idx), version, n, cpu))
    return cpu


def _validate_index(idx: Any, n: int, label: Any) -> torch.Tensor:
    label = _label(label)
    if not isinstance(idx, torch.Tensor):
        try:
            idx = torch.as_tensor(idx)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{label}: index is not a tensor or sequence of ints") from None
    if idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex():
        raise TypeError(f"{label}: index dtype {idx.dtype} is not an integer dtype")
    if idx.dim() != 1:
        raise ValueError(f"{label}: index must be 1-D, got shape {tuple(idx.shape)}")
    if idx.numel() != n:
        raise ValueError(f"{label}: index has length {idx.numel()}, the axis has size {n}")
    cpu = idx.detach().to("cpu", torch.int64, copy=True)
    if n:
        lo, hi = int(cpu.min()), int(cpu.max())
        if lo < 0 or hi >= n:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{label}: index value {bad} out of range [0, {n})")
        counts = torch.bincount(cpu, minlength=n)
        if bool((counts != 1).any()):
            dup = int(torch.nonzero(counts > 1)[0])
            raise ValueError(f"{label}: index is not a permutation (value {dup} repeated)")
    return cpu
