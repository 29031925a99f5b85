"""Grouping of aligned tensor lists by (device, dtype) and the small argument checks of the
multi-tensor ops (``pymerge.ops.interpolate``)."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat
from operator import eq, is_
from typing import Any

import torch


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
