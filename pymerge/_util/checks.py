"""The one state-dict checker: K state dicts that must line up key for key.

:func:`check_states` (lists) and :func:`check_state_pair` (two named dicts) share one
implementation: fast whole-list passes for the valid case (no per-key Python code), and a
per-key diagnosis that runs only to name the offending key when a check failed."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from operator import attrgetter

import torch

StateDict = Mapping[str, torch.Tensor]


_DTYPE = attrgetter("dtype")
_SHAPE = attrgetter("shape")
_GET_DEVICE = torch.Tensor.get_device  # device index (-1: CPU); much cheaper than .device
_IS_META = attrgetter("is_meta")
_PLAIN_DICTS = (dict, OrderedDict)  # .values() gives what [] gives (no custom __getitem__)


def _values(s: StateDict, keys: list[str]) -> list:
    """``[s[k] for k in keys]``, via ``values()`` when a plain dict has the same key order."""
    if type(s) in _PLAIN_DICTS and list(s) == keys:
        return list(s.values())
    return [s[k] for k in keys]


def _all_tensors(values: list) -> bool:
    return all(issubclass(tp, torch.Tensor) for tp in set(map(type, values)))


def check_states(
    states: Sequence[StateDict],
    names: Sequence[str],
    *,
    same_dtype: bool = True,
    same_device: bool = True,
    allow_complex: bool = False,
) -> tuple[list[str], list[list[torch.Tensor]], list[torch.dtype], list[int] | None]:
    """Same keys and shapes (and, by default, dtypes and devices) in every state dict.

    Returns the keys (order of ``states[0]``), per state its tensors in that order, and the
    dtype and device index (``get_device()``, -1 for CPU) of each key of ``states[0]``; the
    device indices are ``None`` when no accelerator is available (every tensor then has
    index -1) or ``same_device`` is off. Key order may differ between the dicts. Raises
    TypeError (non-mapping, non-tensor value, complex dtype) or ValueError (missing/extra
    key, shape, dtype or device mismatch), naming the state dict and the key.
    """
    if len(states) == 0:
        raise ValueError("states is empty: need at least one state dict")
    for s, name in zip(states, names, strict=True):
        if not isinstance(s, Mapping):
            raise TypeError(f"{name} must be a mapping of str -> Tensor, got {type(s).__name__}")
    flags = (same_dtype, same_device, allow_complex)
    ref = states[0]
    keys = list(ref)
    first = _values(ref, keys)
    if not _all_tensors(first):
        _diagnose(states, names, keys, *flags)
    dtypes = list(map(_DTYPE, first))
    if not allow_complex and any(d.is_complex for d in set(dtypes)):
        _diagnose(states, names, keys, *flags)
    # without an accelerator every tensor is on the CPU (or the meta device, which has no
    # index either): comparing device indices would compare lists of -1
    devices = (
        list(map(_GET_DEVICE, first)) if same_device and torch.accelerator.is_available() else None
    )
    shapes = list(map(_SHAPE, first))
    lists = [first]
    for s in states[1:]:
        if len(s) != len(keys):
            _diagnose(states, names, keys, *flags)
        try:
            lst = _values(s, keys)
            # a non-tensor fails here (no such attribute, or a dtype that is not torch's)
            same = (
                list(map(_SHAPE, lst)) == shapes
                and (not same_dtype or list(map(_DTYPE, lst)) == dtypes)
                and (devices is None or list(map(_GET_DEVICE, lst)) == devices)
                and (same_dtype or _all_tensors(lst))
            )
            if same and same_device and devices is None:  # only CPU and meta tensors here
                same = list(map(_IS_META, lst)) == list(map(_IS_META, first))
        except (KeyError, AttributeError, TypeError):
            same = False
        if not same:
            _diagnose(states, names, keys, *flags)
        lists.append(lst)
    return keys, lists, dtypes, devices


def check_state_pair(
    ref: StateDict,
    other: StateDict,
    ref_name: str,
    other_name: str,
    *,
    same_dtype: bool = False,
    same_device: bool = False,
) -> None:
    """Two state dicts with the same keys and shapes (and, when asked, dtypes and devices):
    :func:`check_states` for a pair, with the error naming both dicts and the key."""
    check_states(
        [ref, other],
        [ref_name, other_name],
        same_dtype=same_dtype,
        same_device=same_device,
        allow_complex=True,
    )


def _diagnose(
    states: Sequence[StateDict],
    names: Sequence[str],
    keys: list[str],
    same_dtype: bool,
    same_device: bool,
    allow_complex: bool,
) -> None:
    """Raise the error naming the first offending key (called once a check failed)."""
    ref = states[0]
    for k in keys:
        if not isinstance(ref[k], torch.Tensor):
            raise TypeError(f"{names[0]}[{k!r}] is a {type(ref[k]).__name__}, not a Tensor")
        if not allow_complex and ref[k].is_complex():
            raise TypeError(f"{names[0]}[{k!r}] has complex dtype {ref[k].dtype}; not supported")
    key_set = set(keys)
    for s, name in zip(states[1:], names[1:], strict=True):
        missing = [k for k in keys if k not in s]
        if missing:
            raise ValueError(f"key {missing[0]!r} is in {names[0]} but not in {name}")
        extra = [k for k in s if k not in key_set]
        if extra:
            raise ValueError(f"key {extra[0]!r} is in {name} but not in {names[0]}")
        for k in keys:
            t, r = s[k], ref[k]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{k!r}] is a {type(t).__name__}, not a Tensor")
            if t.shape != r.shape:
                raise ValueError(
                    f"key {k!r} has shape {tuple(r.shape)} in {names[0]} "
                    f"but {tuple(t.shape)} in {name}"
                )
            if same_dtype and t.dtype != r.dtype:
                raise ValueError(
                    f"key {k!r} has dtype {r.dtype} in {names[0]} but {t.dtype} in {name}"
                )
            if same_device and t.device != r.device:
                raise ValueError(
                    f"key {k!r} is on {r.device} in {names[0]} but {t.device} in {name}"
                )
    raise AssertionError("state dicts failed a check but no offending key was found")
