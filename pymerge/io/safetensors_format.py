"""The safetensors format, read and written tensor by tensor with ``pread``/``pwrite``.

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``),
then the tensor data, each tensor at ``8 + n + begin``.

Why not ``safetensors.safe_open``: it memory-maps the whole file, and every page a merge
touches stays resident in the process (counted in its RSS) until the file is closed, so a
streaming merge of three 1 GiB checkpoints would end with 3 GiB resident. Reading each
tensor with ``os.preadv`` into a fresh buffer keeps the process's memory at the tensors in
flight (the kernel's page cache still serves repeated reads, outside the RSS), releases the
GIL while the bytes arrive (so a reader thread overlaps with compute), and lets the header
be checked completely up front: a truncated or corrupt file fails when it is opened, naming
the file and what is wrong, not minutes into a merge. The files written here are ordinary
safetensors files (``safetensors.torch.load_file`` reads them; tested).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["TensorInfo", "SafetensorsReader", "SafetensorsShardWriter", "DTYPES", "dtype_name"]

# safetensors dtype name -> torch dtype (those this torch has)
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in {
        "F64": "float64",
        "F32": "float32",
        "F16": "float16",
        "BF16": "bfloat16",
        "I64": "int64",
        "I32": "int32",
        "I16": "int16",
        "I8": "int8",
        "U8": "uint8",
        "U16": "uint16",
        "U32": "uint32",
        "U64": "uint64",
        "BOOL": "bool",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
        "C64": "complex64",
    }.items()
    if hasattr(torch, attr)
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``ValueError`` for one it cannot hold)."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ValueError(f"safetensors cannot hold dtype {dtype}") from None


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and byte range in the file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _bad(path: Path, what: str) -> ValueError:
    return ValueError(f"{str(path)!r} is not a readable safetensors file: {what}")


def _parse_entry(path: Path, name: str, entry: object) -> tuple[str, list, int, int]:
    if not isinstance(entry, dict):
        raise _bad(path, f"header entry {name!r} is not an object (the file may be corrupt)")
    dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPES:
        raise _bad(path, f"tensor {name!r} has dtype {dtype!r}, which pymerge cannot read")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise _bad(path, f"tensor {name!r} has a bad shape {shape!r}")
    if (
        not isinstance(offs, list)
        or len(offs) != 2
        or not all(isinstance(o, int) for o in offs)
        or not 0 <= offs[0] <= offs[1]
    ):
        raise _bad(path, f"tensor {name!r} has bad data_offsets {offs!r}")
    return dtype, shape, offs[0], offs[1]


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors of one safetensors file and its ``__metadata__``, checked against the
    file's size (``ValueError`` naming the file: truncated, corrupt header, overlapping or
    out-of-range tensors, sizes that do not match dtype and shape)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise _bad(path, f"it has {size} bytes, fewer than the 8 of a header length")
        n = int.from_bytes(head, "little")
        if n > _MAX_HEADER or 8 + n > size:
            what = "truncated" if n <= _MAX_HEADER else "corrupt"
            raise _bad(
                path,
                f"the header length says {n} bytes but the file has {size - 8} after it "
                f"(it is {what})",
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _bad(path, "its header is not valid JSON (the file is corrupt)") from None
    if not isinstance(header, dict):
        raise _bad(path, "its header is not a JSON object (the file is corrupt)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise _bad(path, "its __metadata__ is not an object")
    data_len = size - 8 - n
    out: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        dtype, shape, begin, end = _parse_entry(path, name, entry)
        tdtype = DTYPES[dtype]
        expected = math.prod(shape) * torch.empty((), dtype=tdtype).element_size()
        if end - begin != expected:
            raise _bad(
                path,
                f"tensor {name!r} ({dtype}, shape {shape}) needs {expected} bytes but its "
                f"data_offsets span {end - begin} (the header is corrupt)",
            )
        if end > data_len:
            raise _bad(
                path,
                f"tensor {name!r} ends at byte {end} of the data but the file holds only "
                f"{data_len} bytes of data (it is truncated)",
            )
        spans.append((begin, end, name))
        out[name] = TensorInfo(path, tdtype, tuple(shape), 8 + n + begin, end - begin)
    spans.sort()
    for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:], strict=False):
        if b1 < e0:
            raise _bad(path, f"tensors {n0!r} and {n1!r} overlap (the header is corrupt)")
    return out, {str(k): str(v) for k, v in meta.items()}


def _pread_into(fd: int, buf: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(buf):
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got == 0:
            raise _bad(path, "the file ended early while reading (was it truncated since?)")
        done += got


class SafetensorsReader:
    """One open safetensors file: its header, checked on open, and tensors read on demand.

    ``read(name)`` returns a fresh CPU tensor (its own memory: nothing keeps the file
    mapped). Reading from several threads is safe (``pread`` has no shared file position).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.tensors, self.metadata = read_header(self.path)
        self._fd: int | None = os.open(self.path, os.O_RDONLY)

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        return read_tensor(info, self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:  # pragma: no cover (best effort)
        try:
            self.close()
        except Exception:
            pass


def read_tensor(info: TensorInfo, fd: int | None = None) -> torch.Tensor:
    """Read one tensor described by ``info`` (from ``fd`` when given, else opening the file)."""
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    if info.nbytes:
        own = fd is None
        if own:
            fd = os.open(info.file, os.O_RDONLY)
        try:
            _pread_into(fd, memoryview(buf.numpy()), info.offset, info.file)  # type: ignore[arg-type]
        finally:
            if own:
                os.close(fd)  # type: ignore[arg-type]
    return buf.view(info.dtype).reshape(info.shape) if info.nbytes else _empty(info)


def _empty(info: TensorInfo) -> torch.Tensor:
    return torch.empty(info.shape, dtype=info.dtype)


class SafetensorsShardWriter:
    """A safetensors file whose layout (names, dtypes, shapes) is fixed up front, so each
    tensor can be written the moment it is computed, in any order, with ``pwrite``.

    ``entries``: ``(name, dtype, shape)`` in file order. The header is written on creation
    and the file extended to its full size; :meth:`write` puts one tensor's bytes in place;
    :meth:`close` checks that every tensor was written and flushes to disk.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self.layout: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        pos = 0
        for name, dtype, shape in entries:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {
                "dtype": dtype_name(dtype),
                "shape": list(shape),
                "data_offsets": [pos, pos + nbytes],
            }
            self.layout[name] = (dtype, tuple(shape), pos, nbytes)
            pos += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self.data_start = 8 + len(raw)
        self.size = self.data_start + pos
        self.written: set[str] = set()
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.pwrite(self._fd, len(raw).to_bytes(8, "little") + raw, 0)
        os.ftruncate(self._fd, self.size)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` (dtype and shape as declared) at its place in the file."""
        dtype, shape, pos, nbytes = self.layout[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(
                f"{name!r}: expected {dtype} {list(shape)}, got {tensor.dtype} {list(tensor.shape)}"
            )
        assert self._fd is not None, "the shard is closed"
        if nbytes:
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            view = memoryview(data)
            done = 0
            while done < nbytes:
                done += os.pwrite(self._fd, view[done:], self.data_start + pos + done)
        self.written.add(name)

    def close(self, *, check: bool = True) -> None:
        """Flush to disk and close; with ``check``, ``RuntimeError`` if a tensor is missing."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if check:
                missing = [n for n in self.layout if n not in self.written]
                if missing:
                    raise RuntimeError(
                        f"{self.path.name}: {len(missing)} tensor(s) never written, first "
                        f"{missing[0]!r}"
                    )
                os.fsync(fd)
        finally:
            os.close(fd)
