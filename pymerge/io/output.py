"""Checkpoint folders written atomically, shard by shard, tensor by tensor.

:class:`CheckpointWriter` writes a Hugging Face style folder: the weights as
``model.safetensors`` (one shard) or ``model-0000i-of-0000n.safetensors`` plus
``model.safetensors.index.json``, and side files (``config.json``, the tokenizer files)
copied from a source folder. Its layout is fixed up front from the names, dtypes and shapes
of what will be written (:func:`plan_shards`, at most ``max_shard_size`` bytes a shard), so
each tensor goes to disk the moment it is computed and memory holds only tensors in flight.

All or nothing: everything is written into a staging folder beside the output
(``.<name>.pymerge-tmp-*``), flushed to disk, and renamed into place only when every tensor
has been written; an error or Ctrl-C (``KeyboardInterrupt``) removes the staging folder, so
no partial output is ever left. An existing non-empty output folder is replaced only with
``overwrite=True`` (atomically: the old one is moved aside, the new one renamed in, the old
one removed). :func:`check_output_folder` refuses, before any work, an output that is an
input, lies inside an input folder or contains an input, an output whose parent folder is
missing or not writable, and one whose disk lacks the space the output needs.

Metadata: every shard's ``__metadata__`` and the index's ``metadata`` record ``format: pt``,
``pymerge_version`` and what the caller passes (e.g. the merge method and its options).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from pymerge import __version__
from pymerge.io.files import _fsync_path, _mode_for
from pymerge.io.safetensors_format import SafetensorsShardWriter

__all__ = [
    "CheckpointWriter",
    "plan_shards",
    "check_output_folder",
    "parse_size",
    "DEFAULT_SHARD_SIZE",
]

Entry = tuple[str, torch.dtype, tuple[int, ...]]
DEFAULT_SHARD_SIZE = 5 * 1000**3  # Hugging Face's default (5 GB)
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
    "TIB": 1024**4,
}


def parse_size(value: int | str) -> int:
    """Bytes from ``5GB``, ``500MB``, ``2GiB``, ``1.5G`` or a plain integer."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(f"a size must be at least 1 byte, got {value}")
        return value
    text = str(value).strip().upper().replace(" ", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)([KMGT]?I?B?)", text)
    if not m:
        raise ValueError(f"cannot read size {value!r}; write e.g. 5GB, 500MB, 2GiB or 1000000")
    unit = m.group(2)
    if unit and not unit.endswith("B"):
        unit += "B"
    if unit not in _UNITS:
        raise ValueError(f"cannot read size {value!r}; write e.g. 5GB, 500MB, 2GiB or 1000000")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size < 1:
        raise ValueError(f"a size must be at least 1 byte, got {value!r}")
    return size


def _entry_bytes(entry: Entry) -> int:
    _, dtype, shape = entry
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def plan_shards(
    entries: Sequence[Entry], max_shard_size: int = DEFAULT_SHARD_SIZE, *, min_shards: int = 1
) -> list[list[Entry]]:
    """Split ``entries`` (in order) into shards of at most ``max_shard_size`` bytes (a tensor
    larger than that gets a shard of its own), and into at least ``min_shards`` when there
    are that many tensors (so every rank of a distributed merge has a shard to write)."""
    total = sum(map(_entry_bytes, entries))
    limit = max_shard_size
    if min_shards > 1 and len(entries) >= min_shards:
        limit = min(limit, max(1, math.ceil(total / min_shards)))
    shards: list[list[Entry]] = []
    size = 0
    for e in entries:
        nb = _entry_bytes(e)
        if shards and size + nb <= limit and shards[-1]:
            shards[-1].append(e)
            size += nb
        else:
            shards.append([e])
            size = nb
    while min_shards > 1 and len(shards) < min(min_shards, len(entries)):
        big = max(range(len(shards)), key=lambda i: len(shards[i]))
        half = len(shards[big]) // 2
        shards[big : big + 1] = [shards[big][:half], shards[big][half:]]
    return shards


def shard_names(n: int) -> list[str]:
    """``model.safetensors`` for one shard, else Hugging Face's numbered names."""
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


# --------------------------------------------------------------------------- checks


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
    except ValueError:
        return False
    return True


def check_output_folder(
    out_dir: str | os.PathLike[str],
    *,
    inputs: Mapping[str, str | os.PathLike[str] | None] | Iterable[str | os.PathLike[str]] = (),
    overwrite: bool = False,
    need_bytes: int | None = None,
) -> Path:
    """Check an output folder before any work; ``ValueError`` naming the problem.

    ``inputs``: label -> path (files or folders; ``None`` skipped) or plain paths. The
    output must not be an input, lie inside an input folder, or contain an input; its parent
    must exist and accept a new folder; an existing non-empty folder needs ``overwrite``;
    with ``need_bytes`` the disk must have that much free space.
    """
    text = os.fspath(out_dir)
    if not text or text.isspace():
        raise ValueError("empty output folder name")
    out = Path(text)
    res = out.resolve()
    labelled = (
        [(str(k), v) for k, v in inputs.items() if v is not None]
        if isinstance(inputs, Mapping)
        else [(None, v) for v in inputs if v is not None]
    )
    for label, raw in labelled:
        ip = Path(raw).resolve()
        name = f"{label} {os.fspath(raw)!r}" if label else repr(os.fspath(raw))
        if res == ip:
            raise ValueError(f"refusing to write to {text!r}: it is the input {name}")
        if _inside(res, ip):
            raise ValueError(
                f"refusing to write to {text!r}: it is inside the input {name}; write the "
                f"output outside every input folder"
            )
        if _inside(ip, res):
            raise ValueError(
                f"refusing to write to {text!r}: it contains the input {name}, which "
                f"replacing it would destroy"
            )
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {text!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(
            f"output folder {text!r} exists and is not empty; choose another folder or "
            f"pass --overwrite to replace it"
        )
    parent = res.parent
    if not parent.is_dir():
        raise ValueError(f"cannot write {text!r}: folder {str(out.parent)!r} does not exist")
    try:
        probe = tempfile.mkdtemp(prefix=".pymerge-probe.", dir=parent)
    except OSError as exc:
        raise ValueError(
            f"cannot write {text!r}: cannot create a folder in {str(out.parent)!r} "
            f"({exc.strerror or exc})"
        ) from None
    os.rmdir(probe)
    if need_bytes:
        free = shutil.disk_usage(parent).free
        if free < need_bytes:
            raise ValueError(
                f"cannot write {text!r}: the output needs {need_bytes / 1e9:.2f} GB and "
                f"{str(out.parent)!r} has {free / 1e9:.2f} GB free"
            )
    return out


# --------------------------------------------------------------------------- writer


class CheckpointWriter:
    """Write a checkpoint folder atomically (see the module docstring).

    Args:
        out_dir: the folder to create (or replace, with ``overwrite``).
        entries: ``(name, dtype, shape)`` of every tensor, in file order.
        max_shard_size: bytes per shard at most (an int or ``"5GB"``-style string).
        metadata: recorded in every shard header and the index (values made strings/JSON).
        side_files: name in the output -> source file path, or ``bytes``/``str`` content
            (``config.json``, tokenizer files).
        inputs: paths never written over or into (see :func:`check_output_folder`).
        overwrite: replace an existing non-empty ``out_dir``.
        rank, world_size, staging: a distributed write. Every rank makes a writer with the
            same entries and the ``staging`` folder rank 0 created (:meth:`create_staging`);
            each writes the shards it owns (shard ``i`` belongs to rank ``i % world_size``)
            and calls :meth:`finish_rank`; after a barrier rank 0 calls :meth:`commit`.

    Use as a context manager (single process): the folder is committed when the block ends
    normally and removed when it raises.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        entries: Sequence[Entry],
        *,
        max_shard_size: int | str = DEFAULT_SHARD_SIZE,
        metadata: Mapping[str, object] | None = None,
        side_files: Mapping[str, str | os.PathLike[str] | bytes] | None = None,
        inputs: Mapping[str, str | os.PathLike[str] | None] | Iterable = (),
        overwrite: bool = False,
        rank: int = 0,
        world_size: int = 1,
        staging: str | os.PathLike[str] | None = None,
        check: bool = True,
    ) -> None:
        self.entries = list(entries)
        names = [e[0] for e in self.entries]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"tensor {dup!r} is listed twice for the output")
        self.total_bytes = sum(map(_entry_bytes, self.entries))
        self.out = Path(os.fspath(out_dir))
        if check and rank == 0:
            check_output_folder(
                out_dir, inputs=inputs, overwrite=overwrite, need_bytes=self.total_bytes
            )
        self.overwrite = overwrite
        self.rank, self.world_size = rank, world_size
        self.shards = plan_shards(self.entries, parse_size(max_shard_size), min_shards=world_size)
        self.names = shard_names(len(self.shards))
        self.shard_of = {e[0]: i for i, shard in enumerate(self.shards) for e in shard}
        self.metadata = {"format": "pt", "pymerge_version": __version__}
        for k, v in (metadata or {}).items():
            self.metadata[str(k)] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
        self.side_files = dict(side_files or {})
        if staging is None:
            if world_size != 1:
                raise ValueError("a distributed write needs the staging folder rank 0 made")
            staging = self.create_staging(self.out)
        self.staging = Path(staging)
        self._writers: dict[int, SafetensorsShardWriter] = {}
        self._done = False
        try:
            for i in self.owned_shards():
                self._writers[i] = SafetensorsShardWriter(
                    self.staging / self.names[i],
                    self.shards[i],
                    {k: str(v) for k, v in self.metadata.items()},
                )
        except BaseException:
            self.abort()
            raise

    @staticmethod
    def create_staging(out: str | os.PathLike[str]) -> Path:
        """A fresh staging folder beside ``out`` (rank 0 makes it and shares its name)."""
        out = Path(out).absolute()
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.pymerge-tmp-", dir=out.parent))

    def owned_shards(self) -> list[int]:
        return [i for i in range(len(self.shards)) if i % self.world_size == self.rank]

    def owns(self, key: str) -> bool:
        """Whether this rank writes ``key``."""
        return self.shard_of[key] % self.world_size == self.rank

    def owned_keys(self) -> list[str]:
        return [e[0] for i in self.owned_shards() for e in self.shards[i]]

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Write one tensor (its dtype and shape as declared)."""
        i = self.shard_of.get(key)
        if i is None:
            raise KeyError(f"{key!r} is not one of the output's tensors")
        w = self._writers.get(i)
        if w is None:
            raise ValueError(f"{key!r} belongs to rank {i % self.world_size}, not {self.rank}")
        w.write(key, tensor)

    def finish_rank(self) -> None:
        """Close this rank's shards (each checked complete and flushed to disk)."""
        for w in self._writers.values():
            w.close()

    def _write_side_files(self) -> None:
        for name, src in self.side_files.items():
            dst = self.staging / name
            if isinstance(src, (bytes, str)) and not isinstance(src, os.PathLike):
                data = src.encode("utf-8") if isinstance(src, str) else src
                dst.write_bytes(data)
            else:
                shutil.copyfile(src, dst)
            _fsync_path(dst)

    def _write_index(self) -> None:
        if len(self.shards) == 1:
            return
        index = {
            "metadata": {"total_size": self.total_bytes, **self.metadata},
            "weight_map": {e[0]: self.names[i] for i, s in enumerate(self.shards) for e in s},
        }
        path = self.staging / "model.safetensors.index.json"
        path.write_text(json.dumps(index, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        _fsync_path(path)

    def commit(self) -> Path:
        """Rank 0, after every rank finished: write the index and side files, check every
        shard is there, and move the folder into place. Returns the output folder."""
        if self.rank != 0:
            raise RuntimeError("only rank 0 commits a distributed write")
        try:
            self.finish_rank()
            for name in self.names:
                if not (self.staging / name).is_file():
                    raise RuntimeError(f"shard {name} was not written (did a rank fail?)")
            self._write_index()
            self._write_side_files()
            mode = _mode_for(self.out) if self.out.exists() else 0o777 & ~_umask_dir()
            os.chmod(self.staging, mode)
            for name in os.listdir(self.staging):
                os.chmod(self.staging / name, 0o666 & ~_umask_dir())
            _fsync_path(self.staging, directory=True)
            self._move_into_place()
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.out

    def _move_into_place(self) -> None:
        out = self.out
        old = None
        if out.is_dir() and any(out.iterdir()):
            if not self.overwrite:
                raise ValueError(f"output folder {str(out)!r} appeared while merging; not replaced")
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.pymerge-old-", dir=out.parent))
            os.rmdir(old)
            os.rename(out, old)
        try:
            os.replace(self.staging, out)  # onto a missing or empty folder
        except BaseException:
            if old is not None:
                os.rename(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_path(out.absolute().parent, directory=True)

    def abort(self) -> None:
        """Remove the staging folder and everything in it (safe to call twice)."""
        for w in self._writers.values():
            with contextlib.suppress(Exception):
                w.close(check=False)
        if self.rank == 0 and not self._done:
            shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def _umask_dir() -> int:
    from pymerge.io.files import _umask

    return _umask()
