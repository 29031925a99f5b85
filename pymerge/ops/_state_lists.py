"""State dicts as aligned lists of tensors: the checks and grouping every multi-tensor op
runs first (``pymerge.ops.interpolate``; fast whole-list passes, per-key diagnosis only to
name the offending key when a check failed)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from itertools import repeat
from operator import attrgetter, eq, is_
from typing import Any

import torch

StateDict = Mapping[str, torch.Tensor]


_DTYPE = attrgetter("dtype")
_SHAPE = attrgetter("shape")
_GET_DEVICE = torch.Tensor.get_device  # device index (-1: CPU); much cheaper than .device
_PLAIN_DICTS = (dict, OrderedDict)  # .values() gives what [] gives (no custom __getitem__)


def _values(s: StateDict, keys: list[str]) -> list:
    """``[s[k] for k in keys]``, via ``values()`` when a plain dict has the same key order."""
    if type(s) in _PLAIN_DICTS and list(s) == keys:
        return list(s.values())
    return [s[k] for k in keys]


def _all_tensors(values: list) -> bool:
    return all(issubclass(tp, torch.Tensor) for tp in set(map(type, values)))


def check_states(
    states: Sequence[StateDict], names: Sequence[str]
) -> tuple[list[str], list[list[torch.Tensor]], list[torch.dtype], list[int] | None]:
    """Same keys, shapes, dtypes and devices in every state dict.

    Returns the keys (order of ``states[0]``), per state its tensors in that order, and the
    dtype and device index (``get_device()``, -1 for CPU) of each key; the device indices
    are ``None`` when no accelerator is available (every tensor then has index -1).
    The common (valid) case is checked with C-level passes over whole lists (one per
    property and state, no per-key Python code); the slow per-key diagnosis only runs to
    name the offending key.
    """
    if len(states) == 0:
        raise ValueError("states is empty: need at least one state dict")
    for s, name in zip(states, names, strict=True):
        if not isinstance(s, Mapping):
            raise TypeError(f"{name} must be a mapping of str -> Tensor, got {type(s).__name__}")
    ref = states[0]
    keys = list(ref)
    first = _values(ref, keys)
    if not _all_tensors(first):
        _diagnose(states, names, keys)
    dtypes = list(map(_DTYPE, first))
    if any(d.is_complex for d in set(dtypes)):
        _diagnose(states, names, keys)
    # without an accelerator every tensor is on the CPU (or the meta device, which has no
    # index either): comparing device indices would compare lists of -1
    devices = list(map(_GET_DEVICE, first)) if torch.accelerator.is_available() else None
    shapes = list(map(_SHAPE, first))
    lists = [first]
    for s in states[1:]:
        if len(s) != len(keys):
            _diagnose(states, names, keys)
        try:
            lst = _values(s, keys)
            # a non-tensor fails here (no such attribute, or a dtype that is not torch's)
            same = (
                list(map(_DTYPE, lst)) == dtypes
                and list(map(_SHAPE, lst)) == shapes
                and (devices is None or list(map(_GET_DEVICE, lst)) == devices)
            )
        except (KeyError, AttributeError, TypeError):
            same = False
        if not same:
            _diagnose(states, names, keys)
        lists.append(lst)
    return keys, lists, dtypes, devices


def _diagnose(states: Sequence[StateDict], names: Sequence[str], keys: list[str]) -> None:
    """Raise the error naming the first offending key (called once a check failed)."""
    ref = states[0]
    for k in keys:
        if not isinstance(ref[k], torch.Tensor):
            raise TypeError(f"{names[0]}[{k!r}] is a {type(ref[k]).__name__}, not a Tensor")
        if ref[k].is_complex():
            raise TypeError(f"{names[0]}[{k!r}] has complex dtype {ref[k].dtype}; not supported")
    key_set = set(keys)
    for s, name in zip(states[1:], names[1:], strict=True):
        if set(s.keys()) != key_set:
            missing = [k for k in keys if k not in s]
            extra = [k for k in s if k not in key_set]
            parts = []
            if missing:
                parts.append(f"missing key(s) {missing[:5]}")
            if extra:
                parts.append(f"extra key(s) {extra[:5]}")
            raise ValueError(f"{name} does not match {names[0]}: " + ", ".join(parts))
        for k in keys:
            t, r = s[k], ref[k]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{k!r}] is a {type(t).__name__}, not a Tensor")
            if t.shape != r.shape:
                raise ValueError(
                    f"shape mismatch for key {k!r}: {names[0]} has {tuple(r.shape)}, "
                    f"{name} has {tuple(t.shape)}"
                )
            if t.dtype != r.dtype:
                raise ValueError(
                    f"dtype mismatch for key {k!r}: {names[0]} has {r.dtype}, {name} has {t.dtype}"
                )
            if t.device != r.device:
                raise ValueError(
                    f"device mismatch for key {k!r}: {names[0]} on {r.device}, {name} on {t.device}"
                )
    raise AssertionError("state dicts failed a check but no offending key was found")


def as_floats(values: Any, what: str) -> list[float]:
    if isinstance(values, torch.Tensor):
        if values.dim() > 1:
            raise ValueError(f"{what} must be 1-D, got shape {tuple(values.shape)}")
        if values.is_complex():
            raise TypeError(f"{what} must be real, got {values.dtype}")
        return [float(v) for v in values.detach().reshape(-1).cpu().double().tolist()]
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        try:
            values = list(values)
        except TypeError:
            raise TypeError(
                f"{what} must be a sequence of floats, got {type(values).__name__}"
            ) from None
    out = []
    for i, v in enumerate(values):
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            raise TypeError(f"{what}[{i}] = {v!r} is not a number") from None
    return out


def check_out_dtype(out_dtype: torch.dtype | None) -> None:
    if out_dtype is not None and (
        not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point
    ):
        raise TypeError(f"out_dtype must be a floating torch.dtype, got {out_dtype!r}")


Mask = list[bool]


def group(
    dtypes: Sequence[torch.dtype],
    devices: Sequence[int] | None,
    tensors: Sequence[torch.Tensor],
    out_dtype,
) -> tuple[list[tuple[tuple, Mask | None]], list[Mask]]:
    """Floating tensors grouped by (device, dtype, output dtype), each group as a mask over
    the keys (``None`` when it holds every tensor: the common case of one dtype on one
    device), and masks of the non-floating tensors. ``devices=None``: all on one device."""
    dtype_set, device_set = set(dtypes), {-1} if devices is None else set(devices)
    if len(dtype_set) == 1 and len(device_set) == 1:
        (dt,) = dtype_set
        if dt.is_floating_point:
            return [((tensors[0].device, dt, out_dtype or dt), None)], []
        return [], [[True] * len(tensors)]
    if len(device_set) == 1:  # one device: group by dtype alone (identity: dtypes are unique)
        masks = {dt: list(map(is_, dtypes, repeat(dt))) for dt in dict.fromkeys(dtypes)}
    else:
        pairs = list(zip(devices, dtypes, strict=True))
        masks = {p: list(map(eq, pairs, repeat(p))) for p in dict.fromkeys(pairs)}
    groups, others = [], []
    for key, mask in masks.items():
        dt = key if isinstance(key, torch.dtype) else key[1]
        if dt.is_floating_point:
            device = tensors[mask.index(True)].device
            groups.append(((device, dt, out_dtype or dt), mask))
        else:
            others.append(mask)
    return groups, others


def copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Clones of non-floating tensors: ``maximum(t, t)`` is an exact copy, and one foreach
    call is cheaper than a ``clone`` per tensor; ``clone`` where torch has no maximum."""
    try:
        return list(torch._foreach_maximum(tensors, tensors))
    except (RuntimeError, NotImplementedError, TypeError):
        return [t.clone() for t in tensors]
