"""Input checks shared by the algorithms: state dicts that must line up key for key."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor


def check_state_pair(
    ref: Mapping[str, Tensor],
    other: Mapping[str, Tensor],
    ref_name: str,
    other_name: str,
    *,
    same_device: bool = False,
) -> None:
    """Raise ValueError naming the first key missing from either state dict, or whose shape
    (or, with ``same_device``, device) differs between them. Nothing is modified."""
    for k in ref:
        if k not in other:
            raise ValueError(f"key {k!r} is in {ref_name} but not in {other_name}")
    for k in other:
        if k not in ref:
            raise ValueError(f"key {k!r} is in {other_name} but not in {ref_name}")
    for k, a in ref.items():
        b = other[k]
        if a.shape != b.shape:
            raise ValueError(
                f"key {k!r} has shape {tuple(a.shape)} in {ref_name} "
                f"but {tuple(b.shape)} in {other_name}"
            )
        if same_device and a.device != b.device:
            raise ValueError(
                f"key {k!r} is on {a.device} in {ref_name} but {b.device} in {other_name}"
            )
