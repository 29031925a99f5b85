"""Single files: state dicts, permutations and specs, read with clear errors, written atomically.

Reading: ``.safetensors`` files (the suffix in any case: ``.SAFETENSORS`` too) are read with
safetensors, anything else with ``torch.load(weights_only=True)``. A file that cannot be read
(missing, a folder, empty, truncated, corrupt, holding objects other than tensors) gives one
``FileNotFoundError`` or ``ValueError`` that names the file and says what is wrong with it.

Writing is atomic and all-or-nothing:

* :func:`check_output_paths` checks a set of output paths before any work is done: each is a
  non-empty file name (not a folder), in an existing folder where a file can be created, and
  distinct from every other output and from every input (symbolic and hard links included).
* :func:`write_all` writes several outputs so that either all of them are written or none is:
  each is first written to a temporary file beside its target (flushed to disk), and only when
  every one has been written are they moved into place (``os.replace``); a failure while moving
  puts back the files that were there before.
* New files get the mode a plain ``open(path, "w")`` would give them (``0o666`` less the
  umask); a file that is replaced keeps its mode.

:func:`save_state_dict` and :func:`save_permutation` are :func:`write_all` with one output.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "load_state_dict",
    "save_state_dict",
    "load_permutation",
    "save_permutation",
    "load_spec",
    "check_output_paths",
    "write_all",
    "state_dict_writer",
    "permutation_writer",
    "is_safetensors_path",
]

PathLike = str | os.PathLike[str]
Writer = Callable[[str], None]  # writes the payload to the (temporary) path it is given


def is_safetensors_path(path: PathLike) -> bool:
    """True when ``path`` ends in ``.safetensors`` (in any case)."""
    return Path(path).suffix.lower() == ".safetensors"


# --------------------------------------------------------------------------- reading


def _input_file(path: PathLike, what: str) -> Path:
    """``path`` as a Path to an existing, non-empty regular file, else a clear error."""
    if str(os.fspath(path)) == "":
        raise ValueError(f"empty path given for the {what}")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no {what} file at {str(p)!r}")
    if p.is_dir():
        raise ValueError(f"{str(p)!r} is a folder, not a {what} file")
    if not p.is_file():
        raise ValueError(f"{str(p)!r} is not a regular file (expected a {what} file)")
    if p.stat().st_size == 0:
        raise ValueError(f"{str(p)!r} is empty (0 bytes), not a {what} file")
    return p


def _looks_like_safetensors(p: Path) -> bool:
    """An 8-byte little-endian header length followed by a JSON object."""
    try:
        with open(p, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 0 < int.from_bytes(head[:8], "little") <= p.stat().st_size - 8


def _looks_like_torch(p: Path) -> bool:
    """A zip archive (torch.save since 1.6) or a pickle (protocol 2+)."""
    try:
        with open(p, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_tensors(obj: Any, p: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"{str(p)!r} holds a {type(obj).__name__}, not a state dict (a dict of name -> "
            f"tensor); save one with torch.save(model.state_dict(), path)"
        )
    if not obj:
        raise ValueError(f"{str(p)!r} holds an empty state dict")
    for key, value in obj.items():
        if not isinstance(key, str):
            raise ValueError(f"{str(p)!r}: state-dict key {key!r} is not a string")
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{str(p)!r} is not a state dict of tensors: {key!r} holds a "
                f"{type(value).__name__} (keys: {_key_list(obj)}); save the state dict itself "
                f"with torch.save(model.state_dict(), path)"
            )
    return dict(obj)


def _key_list(obj: Mapping, limit: int = 5) -> str:
    keys = [repr(k) for k in list(obj)[:limit]]
    return ", ".join(keys) + (", ..." if len(obj) > limit else "")


def _load_safetensors(p: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(p)))
    except Exception as exc:  # SafetensorError, a bad header, an unknown dtype
        hint = (
            " (it looks like a torch checkpoint: rename it to .pt)" if _looks_like_torch(p) else ""
        )
        raise ValueError(
            f"{str(p)!r} is not a readable safetensors file ({_short(exc)}): it may be truncated "
            f"or corrupt{hint}"
        ) from None


def _weights_only_reason(exc: BaseException) -> str | None:
    """The line of torch's weights_only refusal that says what it met, if that is the error."""
    text = str(exc)
    if "Weights only load failed" not in text:
        return None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("WeightsUnpickler error:"):
            reason = line.removeprefix("WeightsUnpickler error:").strip()
            return _short(reason.split(" was not an allowed global")[0])
    return "objects other than tensors"


def _load_torch(p: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (zip), EOFError, KeyError, ...
        if _looks_like_safetensors(p):
            raise ValueError(
                f"{str(p)!r} looks like a safetensors file but lacks the .safetensors suffix: "
                f"rename it"
            ) from None
        reason = _weights_only_reason(exc) if _looks_like_torch(p) else None
        if reason is not None and "Unsupported" in reason:
            raise ValueError(
                f"{str(p)!r} holds objects other than tensors, which a weights-only load refuses "
                f"({reason}); save the state dict itself with torch.save(model.state_dict(), path)"
            ) from None
        raise ValueError(
            f"{str(p)!r} is not a readable torch checkpoint ({type(exc).__name__}: "
            f"{_short(exc, 100)}): it may be truncated or corrupt"
        ) from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]  # as Lightning writes
    return _check_tensors(obj, p)


def load_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict (``name -> Tensor``, on CPU) from ``.safetensors`` or a torch file,
    or from a checkpoint folder or shard index (a Hugging Face model folder, sharded
    safetensors with ``model.safetensors.index.json``: see :func:`pymerge.io.open_checkpoint`,
    whose lazy mapping this reads in full).

    A torch checkpoint holding ``{"state_dict": {...}}`` (as Lightning writes) is unwrapped.
    Raises ``FileNotFoundError`` when there is no file, ``ValueError`` (naming the file and
    what is wrong) when it is a folder holding no checkpoint, empty, truncated, corrupt, or
    holds anything but a non-empty dict of tensors.
    """
    if _is_checkpoint_folder_or_index(path):
        from pymerge.io.checkpoint import open_checkpoint

        with open_checkpoint(path) as ck:
            return dict(ck)
    p = _input_file(path, "state-dict")
    return _load_safetensors(p) if is_safetensors_path(p) else _load_torch(p)


def _is_checkpoint_folder_or_index(path: PathLike) -> bool:
    if not os.fspath(path):
        return False
    p = Path(path)
    if p.is_file():
        return p.name.endswith(".index.json")
    from pymerge.io.checkpoint import is_checkpoint_folder

    return is_checkpoint_folder(p)


def _load_json(path: PathLike, what: str) -> Any:
    p = _input_file(path, what)
    try:
        with open(p, encoding="utf-8") as fh:
            return json.load(fh)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        msg = f"{str(p)!r} is not valid JSON ({_short(exc)}); expected a {what}"
        raise ValueError(msg) from None


def load_permutation(path: PathLike) -> dict[str, torch.Tensor]:
    """Read a permutation written by :func:`save_permutation` (``{group: [indices]}``)."""
    data = _load_json(path, "permutation")
    if not isinstance(data, dict):
        raise ValueError(
            f"{str(path)!r} holds a JSON {type(data).__name__}, expected an object of "
            f"group -> list of indices"
        )
    out: dict[str, torch.Tensor] = {}
    for group, idx in data.items():
        if not isinstance(idx, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in idx
        ):
            raise ValueError(f"{str(path)!r}: group {group!r} is not a list of integer indices")
        out[group] = torch.as_tensor(idx, dtype=torch.long)
    return out


def load_spec(path: PathLike):
    """Read a :class:`~pymerge.spec.PermutationSpec` from the JSON of its ``to_dict()``.

    ``ValueError`` naming the file when it is not JSON, not an object, or not a spec.
    """
    from pymerge.spec import PermutationSpec

    data = _load_json(path, "spec JSON")
    if not isinstance(data, dict):
        raise ValueError(
            f"{str(path)!r} holds a JSON {type(data).__name__}, expected the object written by "
            f"json.dump(spec.to_dict(), f)"
        )
    if not isinstance(data.get("perm_to_axes"), dict):
        raise ValueError(
            f"{str(path)!r} is not a permutation spec: it has no 'perm_to_axes' object "
            f"(write one with json.dump(spec.to_dict(), f))"
        )
    try:
        return PermutationSpec.from_dict(data)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ValueError(f"{str(path)!r} is not a valid permutation spec: {_short(exc)}") from None


# --------------------------------------------------------------------------- output checks


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def _label(labels: Mapping[str, str], key: str, path: str) -> str:
    name = labels.get(key)
    return f"{name} {path!r}" if name else repr(path)


def _as_labelled(paths: Mapping[str, PathLike | None] | Iterable[PathLike | None]):
    """``[(label or None, path)]`` for a mapping label -> path or a plain iterable of paths."""
    if isinstance(paths, Mapping):
        return [(str(k), v) for k, v in paths.items() if v is not None]
    return [(None, v) for v in paths if v is not None]


def _probe_folder(folder: Path, shown: str) -> None:
    """Fail clearly unless a file can be created in ``folder`` (works as root too)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".pymerge-probe.", dir=folder)
    except OSError as exc:
        raise ValueError(
            f"cannot write {shown}: cannot create a file in folder {str(folder)!r} "
            f"({exc.strerror or exc})"
        ) from None
    os.close(fd)
    os.unlink(probe)


def _output_path(label: str | None, raw: PathLike) -> tuple[str, Path]:
    """``(how to name it in messages, Path)`` for one output, after the checks that need
    nothing but the path itself and its folder."""
    text = os.fspath(raw)
    shown = f"{label} {text!r}" if label else repr(text)
    if text == "" or text.isspace():
        raise ValueError(f"{label or 'output path'}: empty path; name the file to write")
    if text.endswith(("/", os.sep)):
        raise ValueError(f"{shown} names a folder; name a file to write in it")
    p = Path(text)
    if p.is_dir():
        raise ValueError(f"{shown} is an existing folder; name a file to write in it")
    if p.exists() and not p.is_file():
        raise ValueError(f"{shown} exists and is not a regular file")
    folder = p.parent
    if not folder.exists():
        raise ValueError(f"cannot write {shown}: folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise ValueError(f"cannot write {shown}: {str(folder)!r} is not a folder")
    return shown, p


def _check_distinct(
    shown: str, p: Path, ins: list[tuple[str | None, PathLike]], seen: list[tuple[str, Path]]
) -> None:
    """``p`` is none of the inputs and none of the outputs already checked."""
    for in_label, in_raw in ins:
        if os.fspath(in_raw) and _same_file(p, Path(in_raw)):
            what = f"input {in_label} {os.fspath(in_raw)!r}" if in_label else "input"
            raise ValueError(
                f"refusing to write {shown}: it is one of the inputs ({what}); name another file"
            )
    for other_shown, other in seen:
        if _same_file(p, other):
            raise ValueError(
                f"{shown} and {other_shown} name the same file; give each output its own path"
            )


def check_output_paths(
    outputs: Mapping[str, PathLike | None] | Iterable[PathLike | None],
    *,
    inputs: Mapping[str, PathLike | None] | Iterable[PathLike | None] = (),
) -> dict[str, Path] | list[Path]:
    """Check output paths before any work is done; ``ValueError`` on the first problem.

    ``outputs`` and ``inputs`` are mappings label -> path (the labels, such as ``"--out"``,
    are used in messages; ``None`` values are skipped) or plain iterables of paths. Each
    output must be a non-empty path that does not end in a separator and is not an existing
    folder, its folder must exist and accept a new file, and it must differ from every other
    output and from every input (after resolving links; hard links count as the same file).

    Returns the outputs as ``Path`` objects: a dict label -> Path for a mapping, else a list.
    """
    outs = _as_labelled(outputs)
    ins = _as_labelled(inputs)
    seen: list[tuple[str, Path]] = []
    probed: set[Path] = set()
    for label, raw in outs:
        shown, p = _output_path(label, raw)
        _check_distinct(shown, p, ins, seen)
        if p.parent.resolve() not in probed:
            _probe_folder(p.parent, shown)
            probed.add(p.parent.resolve())
        seen.append((shown, p))
    paths = [p for _, p in seen]
    if isinstance(outputs, Mapping):
        return {label: p for (label, _), p in zip(outs, paths, strict=True)}
    return paths


# --------------------------------------------------------------------------- writing


def _umask() -> int:
    """The process umask, read without changing it where the system says it."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    old = os.umask(0o022)
    os.umask(old)
    return old


def _mode_for(target: Path) -> int:
    """The mode ``open(target, "w")`` would leave: the existing file's, else 0o666 & ~umask."""
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _fsync_path(path: str | Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _backup(target: Path) -> str | None:
    """Keep the file at ``target`` (if any) under a temporary name beside it."""
    if not target.exists():
        return None
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.old.", dir=target.parent)
    os.close(fd)
    os.unlink(name)
    try:
        os.link(target, name)
    except OSError:  # no hard links here: copy it
        import shutil

        shutil.copy2(target, name)
    return name


def _stage(targets: list[Path], writers: list[Writer]) -> list[str]:
    """Write each payload to a temporary file beside its target (mode set, flushed to disk);
    on failure remove the temporary files and raise."""
    staged: list[str] = []
    try:
        for target, write in zip(targets, writers, strict=True):
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            os.close(fd)
            staged.append(tmp)
            write(tmp)
            os.chmod(tmp, _mode_for(target))
            _fsync_path(tmp)
    except BaseException:
        _remove(staged)
        raise
    return staged


def _remove(paths: Iterable[str]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _commit(targets: list[Path], staged: list[str]) -> None:
    """Move the staged files into place; if one move fails, put back what was there."""
    replaced: list[tuple[Path, str | None]] = []
    try:
        for target, tmp in zip(targets, staged, strict=True):
            backup = _backup(target)
            os.replace(tmp, target)
            replaced.append((target, backup))
    except BaseException:
        for target, backup in reversed(replaced):
            with contextlib.suppress(OSError):
                if backup is None:
                    os.unlink(target)
                else:
                    os.replace(backup, target)
        _remove(staged)
        raise
    _remove(backup for _, backup in replaced if backup is not None)
    for folder in {t.parent for t in targets}:
        _fsync_path(folder, directory=True)


def write_all(
    outputs: Mapping[PathLike, Writer],
    *,
    protect: Mapping[str, PathLike | None] | Iterable[PathLike | None] = (),
    labels: Mapping[PathLike, str] | None = None,
) -> None:
    """Write every output or none: ``outputs`` maps path -> ``writer(tmp_path)``.

    The paths are first checked with :func:`check_output_paths` (``protect``: the inputs,
    never written over; ``labels``: path -> name used in messages). Each writer then writes
    its payload to a temporary file beside its target; only when all have succeeded are the
    files moved into place. If anything fails, the temporary files are removed, targets that
    were already replaced get their previous content back, and the error is raised.
    """
    labels = {os.fspath(k): v for k, v in (labels or {}).items()}
    named = {labels.get(os.fspath(path), f"output {i + 1}"): path for i, path in enumerate(outputs)}
    if len(named) != len(outputs):  # two outputs share a label: fall back to positions
        named = {f"output {i + 1}": path for i, path in enumerate(outputs)}
    checked = check_output_paths(named, inputs=protect)
    targets = [checked[label].absolute() for label in named]
    _commit(targets, _stage(targets, list(outputs.values())))


def state_dict_writer(state: Mapping[str, torch.Tensor], path: PathLike) -> Writer:
    """A writer for :func:`write_all`: ``state`` as safetensors when ``path`` ends in
    ``.safetensors`` (any case), else with ``torch.save``. Tensors are moved to CPU;
    safetensors gets contiguous tensors, and copies of tensors that share memory."""
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"cannot save {key!r}: it is a {type(value).__name__}, not a tensor")
    if is_safetensors_path(path):
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for k, v in state.items():
            t = v.detach().cpu().contiguous()
            ptr = t.untyped_storage().data_ptr() if t.numel() else 0
            if ptr and ptr in seen:
                t = t.clone()  # safetensors refuses tensors that share memory
            seen.add(ptr)
            tensors[k] = t
        return lambda tmp: save_file(tensors, tmp)
    plain = {k: v.detach().cpu() for k, v in state.items()}
    return lambda tmp: torch.save(plain, tmp)


def permutation_writer(perm: Mapping[str, torch.Tensor]) -> Writer:
    """A writer for :func:`write_all`: ``perm`` as JSON ``{group: [indices]}``."""
    data = {
        g: [int(i) for i in torch.as_tensor(idx).reshape(-1).tolist()] for g, idx in perm.items()
    }

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh)

    return write


def save_state_dict(
    state: Mapping[str, torch.Tensor],
    path: PathLike,
    *,
    protect: Iterable[PathLike | None] = (),
) -> None:
    """Write ``state`` atomically to ``path`` (``.safetensors``, any case, or torch format).

    ``protect``: paths that must not be overwritten (the inputs); ``ValueError`` if ``path``
    is one of them, names a folder, or cannot be created (see :func:`check_output_paths`).
    """
    write_all({path: state_dict_writer(state, path)}, protect=protect)


def save_permutation(
    perm: Mapping[str, torch.Tensor],
    path: PathLike,
    *,
    protect: Iterable[PathLike | None] = (),
) -> None:
    """Write a permutation (group -> index tensor) as JSON ``{group: [indices]}``, atomically."""
    write_all({path: permutation_writer(perm)}, protect=protect)
