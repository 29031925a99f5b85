"""State dicts and permutations on disk.

``.safetensors`` files are read and written with safetensors; anything else with
``torch.load(weights_only=True)`` / ``torch.save``. Writes are atomic (a temporary file in
the target folder, then ``os.replace``) and refuse to overwrite a file the caller named as
an input, so nothing the user gave is lost.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

__all__ = ["load_state_dict", "save_state_dict", "save_permutation", "load_permutation"]


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a state dict (``key -> Tensor``) from ``.safetensors`` or a torch checkpoint.

    A torch checkpoint holding ``{"state_dict": {...}}`` (as Lightning writes) is unwrapped.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no state-dict file at {str(p)!r}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(p)))
    obj = torch.load(str(p), map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{str(p)!r} does not hold a state dict of tensors")
    return dict(obj)


def _atomic_write(path: Path, write, protect: Iterable[str | os.PathLike[str]]) -> None:
    target = path.resolve()
    for other in protect:
        if Path(other).resolve() == target:
            raise ValueError(f"refusing to write {str(path)!r}: it is one of the inputs")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_state_dict(
    state: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    protect: Iterable[str | os.PathLike[str]] = (),
) -> None:
    """Write ``state`` atomically to ``path`` (``.safetensors`` or a torch checkpoint).

    ``protect``: paths that must not be overwritten (the inputs); ValueError if ``path`` is one.
    """
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        _atomic_write(p, lambda tmp: save_file(tensors, tmp), protect)
    else:
        tensors = {k: v.detach().cpu() for k, v in state.items()}
        _atomic_write(p, lambda tmp: torch.save(tensors, tmp), protect)


def save_permutation(
    perm: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    protect: Iterable[str | os.PathLike[str]] = (),
) -> None:
    """Write a permutation (group -> index tensor) as JSON ``{group: [indices]}``, atomically."""
    data = {g: [int(i) for i in idx.tolist()] for g, idx in perm.items()}

    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            json.dump(data, fh)

    _atomic_write(Path(path), write, protect)


def load_permutation(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a permutation written by :func:`save_permutation`."""
    with open(path) as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} does not hold a JSON object of group -> indices")
    return {g: torch.as_tensor(v, dtype=torch.long) for g, v in data.items()}
