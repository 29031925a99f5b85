"""Checkpoints on disk as lazy state dicts: one file, a sharded set with its index, or a
Hugging Face model folder.

:func:`open_checkpoint` accepts

* a ``.safetensors`` file (any case of the suffix);
* a ``model.safetensors.index.json`` (or ``pytorch_model.bin.index.json``) shard index;
* a PyTorch ``.pt``/``.bin``/``.pth`` state dict (``torch.load(weights_only=True)``, never
  unpickling code; memory-mapped when it is a zip archive);
* a folder: a Hugging Face model folder (``config.json`` and the weights as
  ``model.safetensors``, ``model.safetensors.index.json`` + shards, ``pytorch_model.bin`` or
  its index), or a folder holding exactly one checkpoint file.

and returns a :class:`Checkpoint`: a ``Mapping[str, Tensor]`` whose ``ckpt[key]`` reads that
one tensor from disk (safetensors: a fresh CPU tensor in its own memory; a torch zip file:
the memory-mapped tensor ``torch.load(mmap=True)`` gave, to be read, not modified). Shapes,
dtypes and sizes are known without reading any tensor (``ckpt.info(key)``,
``ckpt.meta_state()``), so whole configurations can be checked before any work. Every
problem found when opening (a missing shard, an index that names a tensor its shard lacks, a
truncated or corrupt file) raises one ``ValueError`` or ``FileNotFoundError`` naming the
file and what is wrong.

The lazy state-dict protocol the layers below rely on (they cannot import this module):
a ``Mapping`` with a ``meta_state()`` method returning ``{key: tensor on the meta device}``
(same shapes and dtypes). :mod:`pymerge.align` and :mod:`pymerge.merge` check and plan with
``meta_state()`` and read tensors one at a time.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from pymerge.io.files import _input_file, _load_json, _short, is_safetensors_path
from pymerge.io.safetensors_format import SafetensorsReader, TensorInfo

__all__ = ["Checkpoint", "open_checkpoint", "HF_SIDE_FILES", "is_checkpoint_folder"]

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"

# files of a Hugging Face folder that travel with the weights (copied to merged outputs)
HF_SIDE_FILES: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
)
TOKENIZER_FILES: tuple[str, ...] = tuple(
    f for f in HF_SIDE_FILES if f not in ("config.json", "generation_config.json")
)
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class Checkpoint(Mapping[str, torch.Tensor]):
    """A checkpoint's tensors, read one at a time (see the module docstring).

    Attributes:
        path: what was opened (file, index or folder).
        folder: the model folder (``None`` for a lone file outside one).
        files: the files holding tensors (what must never be written over).
        config: ``config.json`` of the folder as a dict, or ``None``.
        metadata: the ``__metadata__`` of the (first) safetensors file.
    """

    def __init__(
        self,
        path: Path,
        infos: dict[str, TensorInfo],
        *,
        folder: Path | None = None,
        config: dict[str, Any] | None = None,
        metadata: dict[str, str] | None = None,
        readers: dict[Path, SafetensorsReader] | None = None,
        loaded: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.path = path
        self.folder = folder
        self.config = config
        self.metadata = dict(metadata or {})
        # file order (shard, then offset): reading in this order reads each file front to back
        self._infos = dict(sorted(infos.items(), key=lambda kv: (str(kv[1].file), kv[1].offset)))
        self._readers = dict(readers or {})
        self._loaded = loaded  # torch files: tensors (memory-mapped when possible)
        self.files: list[Path] = sorted({i.file for i in infos.values()})
        self._lock = threading.Lock()

    # -- the Mapping interface ----------------------------------------------------------
    def __getitem__(self, key: str) -> torch.Tensor:
        info = self._infos.get(key)
        if info is None:
            raise KeyError(key)
        if self._loaded is not None:
            return self._loaded[key]
        reader = self._readers.get(info.file)
        if reader is None:
            with self._lock:
                reader = self._readers.get(info.file)
                if reader is None:
                    reader = SafetensorsReader(info.file)
                    self._readers[info.file] = reader
        return reader.read(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def __contains__(self, key: object) -> bool:
        return key in self._infos

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self)} tensors, {self.nbytes() / 1e9:.3g} GB)"

    # -- what is known without reading tensors ------------------------------------------
    def info(self, key: str) -> TensorInfo:
        """File, dtype, shape and byte range of ``key``."""
        return self._infos[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._infos[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self._infos[key].dtype

    def nbytes(self, key: str | None = None) -> int:
        """Bytes of ``key``'s data, or of every tensor."""
        if key is not None:
            return self._infos[key].nbytes
        return sum(i.nbytes for i in self._infos.values())

    def num_params(self) -> int:
        """Elements over all tensors."""
        return sum(i.numel for i in self._infos.values())

    def meta_state(self) -> dict[str, torch.Tensor]:
        """``{key: empty tensor on the meta device}`` with each tensor's shape and dtype: the
        lazy state-dict protocol (checks and plans read this, not the tensors)."""
        return {
            k: torch.empty(i.shape, dtype=i.dtype, device="meta") for k, i in self._infos.items()
        }

    # -- life cycle ---------------------------------------------------------------------
    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_checkpoint_folder(path: str | os.PathLike[str]) -> bool:
    """A folder :func:`open_checkpoint` can read (a model folder or one checkpoint file)."""
    p = Path(path)
    if not p.is_dir():
        return False
    try:
        _weights_in_folder(p)
    except (ValueError, FileNotFoundError):
        return False
    return True


def open_checkpoint(path: str | os.PathLike[str], *, what: str = "checkpoint") -> Checkpoint:
    """Open a checkpoint file, shard index or model folder lazily (see the module docstring).

    ``what`` names the checkpoint in error messages (e.g. ``"model 'ft1'"``).
    """
    if str(os.fspath(path)) == "":
        raise ValueError(f"empty path given for the {what}")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no {what} at {str(p)!r}")
    folder = None
    if p.is_dir():
        folder = p
        target = _weights_in_folder(p)
    else:
        target = p
        if p.name in (SAFETENSORS_INDEX, BIN_INDEX) or p.name.endswith(".index.json"):
            folder = p.parent
    config = _folder_config(folder) if folder is not None else None
    if target.name.endswith(".index.json"):
        infos, meta, readers, loaded = _open_index(target, what)
    elif is_safetensors_path(target):
        _input_file(target, what)
        reader = SafetensorsReader(target)
        infos, meta, readers, loaded = reader.tensors, reader.metadata, {target: reader}, None
    else:
        infos, loaded = _open_torch(target, what)
        meta, readers = {}, {}
    if not infos:
        raise ValueError(f"{what} {str(p)!r} holds no tensors")
    return Checkpoint(
        p, infos, folder=folder, config=config, metadata=meta, readers=readers, loaded=loaded
    )


def _folder_config(folder: Path) -> dict[str, Any] | None:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    data = _load_json(cfg, "model config")
    if not isinstance(data, dict):
        raise ValueError(f"{str(cfg)!r} holds a JSON {type(data).__name__}, not an object")
    return data


def _weights_in_folder(folder: Path) -> Path:
    """The file to open for a folder: its index, its single weights file, or the one
    checkpoint file it holds; ``ValueError`` saying what the folder holds otherwise."""
    for name in (SAFETENSORS_INDEX, "model.safetensors", BIN_INDEX, "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    files = sorted(x for x in folder.iterdir() if x.is_file())
    st = [x for x in files if is_safetensors_path(x)]
    indexes = [x for x in files if x.name.endswith(".safetensors.index.json")]
    if len(indexes) == 1:
        return indexes[0]
    if len(st) == 1:
        return st[0]
    if len(st) > 1:
        names = ", ".join(x.name for x in st[:4]) + (", ..." if len(st) > 4 else "")
        raise ValueError(
            f"folder {str(folder)!r} holds {len(st)} safetensors files ({names}) but no "
            f"{SAFETENSORS_INDEX} saying which tensor is where; add the index or name one file"
        )
    pt = [x for x in files if x.suffix.lower() in _TORCH_SUFFIXES]
    if len(pt) == 1:
        return pt[0]
    shown = ", ".join(x.name for x in files[:6]) + (", ..." if len(files) > 6 else "")
    raise ValueError(
        f"folder {str(folder)!r} holds no checkpoint pymerge can read (expected "
        f"model.safetensors, {SAFETENSORS_INDEX} with its shards, pytorch_model.bin, or one "
        f".safetensors/.pt file); it holds: {shown or 'nothing'}"
    )


def _open_index(index: Path, what: str):
    data = _load_json(index, "shard index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(
            f"{str(index)!r} is not a shard index: it has no 'weight_map' object of tensor "
            f"name -> shard file"
        )
    by_file: dict[str, list[str]] = {}
    for key, fname in weight_map.items():
        if not isinstance(fname, str) or "/" in fname or fname in ("", ".", ".."):
            raise ValueError(f"{str(index)!r}: tensor {key!r} names a bad shard {fname!r}")
        by_file.setdefault(fname, []).append(key)
    missing = [f for f in by_file if not (index.parent / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{what}: shard {missing[0]!r} named by {str(index)!r} is missing from "
            f"{str(index.parent)!r} ({len(missing)} of {len(by_file)} shards missing)"
        )
    infos: dict[str, TensorInfo] = {}
    readers: dict[Path, SafetensorsReader] = {}
    loaded: dict[str, torch.Tensor] | None = None
    meta: dict[str, str] = {}
    for fname, keys in by_file.items():
        shard = index.parent / fname
        _input_file(shard, "shard")
        if is_safetensors_path(shard):
            reader = SafetensorsReader(shard)
            readers[shard] = reader
            have, meta = reader.tensors, meta or reader.metadata
        else:
            have, tensors = _open_torch(shard, f"shard {fname!r}")
            loaded = loaded or {}
            loaded.update(tensors)
        absent = [k for k in keys if k not in have]
        if absent:
            raise ValueError(
                f"{what}: {str(index)!r} says tensor {absent[0]!r} is in shard {fname!r}, but "
                f"that shard does not hold it ({len(absent)} such tensors)"
            )
        for k in keys:
            infos[k] = have[k]
    if loaded is not None and readers:
        raise ValueError(f"{str(index)!r} mixes safetensors and torch shards")
    return infos, meta, readers, loaded


def _open_torch(p: Path, what: str) -> tuple[dict[str, TensorInfo], dict[str, torch.Tensor]]:
    """A torch state dict, memory-mapped when it is a zip archive (torch >= 1.6)."""
    from pymerge.io.files import _load_torch, _looks_like_torch

    _input_file(p, what)
    state = None
    if _looks_like_torch(p):
        try:
            with open(p, "rb") as fh:
                zipped = fh.read(4) == b"PK\x03\x04"
            if zipped:
                obj = torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
                if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
                    obj = obj["state_dict"]
                if isinstance(obj, Mapping) and all(
                    isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
                ):
                    state = dict(obj)
        except Exception:  # fall back to the checked loader, which names the problem
            state = None
    if state is None:
        state = _load_torch(p)
    if not state:
        raise ValueError(f"{str(p)!r} holds an empty state dict")
    infos = {
        k: TensorInfo(p, v.dtype, tuple(v.shape), 0, v.numel() * v.element_size())
        for k, v in state.items()
    }
    return infos, state


def describe_config(config: Mapping[str, Any] | None) -> str:
    """``"llama (LlamaForCausalLM)"``-style summary of a ``config.json``."""
    if not config:
        return "unknown (no config.json)"
    mt = config.get("model_type", "?")
    arch = config.get("architectures") or []
    return f"{mt} ({', '.join(map(str, arch))})" if arch else str(mt)


def read_json_safely(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{str(path)!r} is not valid JSON ({_short(exc)})") from None
