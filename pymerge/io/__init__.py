"""Checkpoints on disk: files, shards, Hugging Face folders, lazy state dicts, atomic writes.

* :mod:`pymerge.io.files`: single files (``.safetensors``, ``.pt``/``.bin`` with
  ``weights_only=True``), permutations and specs, read with errors that name the file;
  :func:`check_output_paths` and :func:`write_all` (all-or-nothing atomic writes).
* :mod:`pymerge.io.checkpoint`: :func:`open_checkpoint` opens a file, a sharded set
  (``model.safetensors.index.json``) or a model folder as a :class:`Checkpoint`, a lazy
  ``Mapping[str, Tensor]`` that reads one tensor at a time.
* :mod:`pymerge.io.output`: :class:`CheckpointWriter` writes a model folder (sharded at a
  configurable size, with its index, side files and metadata) atomically, tensor by tensor.
* :mod:`pymerge.io.safetensors_format`: the format itself, read and written with
  ``pread``/``pwrite``.
* :mod:`pymerge.io.merge_files`: merges and weight matching from files to files, streaming.
"""

from pymerge.io.checkpoint import (
    HF_SIDE_FILES,
    Checkpoint,
    is_checkpoint_folder,
    open_checkpoint,
)
from pymerge.io.files import (
    PathLike,
    Writer,
    check_output_paths,
    is_safetensors_path,
    load_permutation,
    load_spec,
    load_state_dict,
    permutation_writer,
    save_permutation,
    save_state_dict,
    state_dict_writer,
    write_all,
)
from pymerge.io.output import (
    DEFAULT_SHARD_SIZE,
    CheckpointWriter,
    check_output_folder,
    parse_size,
    plan_shards,
)

# the modules tests and callers patch (``pymerge.io.os.replace``, ``pymerge.io.tempfile``)
import os  # noqa: E402, F401  isort: skip
import tempfile  # noqa: E402, F401  isort: skip

__all__ = [
    "HF_SIDE_FILES",
    "DEFAULT_SHARD_SIZE",
    "Checkpoint",
    "CheckpointWriter",
    "PathLike",
    "Writer",
    "check_output_folder",
    "check_output_paths",
    "is_checkpoint_folder",
    "is_safetensors_path",
    "load_permutation",
    "load_spec",
    "load_state_dict",
    "open_checkpoint",
    "parse_size",
    "permutation_writer",
    "plan_shards",
    "save_permutation",
    "save_state_dict",
    "state_dict_writer",
    "write_all",
]
