"""Feature recording helpers shared by activation matching and REPAIR.

Small pieces, one job each: turning a user's ``batches`` into model inputs, running a
model with its modules in eval mode (restoring each module's flag afterwards),
recording module outputs with forward hooks that are always removed, streaming
per-channel statistics in float64, and finding the order in which modules run.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pymerge._util.checks import check_state_pair

__all__ = [
    "StopForward",
    "call_counts",
    "call_model",
    "check_same_architecture",
    "eval_mode",
    "execution_order",
    "features_2d",
    "iter_inputs",
    "model_device",
    "model_on",
    "record_outputs",
    "reiterable",
    "resolve_module",
    "to_device",
]


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (caught by the caller)."""


# --------------------------------------------------------------------------- inputs


def batch_input(batch: Any) -> Any:
    """The model input of one batch: a tensor, or the first item of an ``(x, y)`` pair.

    A mapping is passed to the model as keyword arguments.
    """
    if isinstance(batch, torch.Tensor | Mapping):
        return batch
    if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) > 0:
        return batch[0]
    raise TypeError(
        "each batch must be a tensor, an (inputs, targets) tuple/list or a mapping of keyword "
        f"inputs; got {type(batch).__name__}"
    )


def to_device(x: Any, device: torch.device | None) -> Any:
    """Move a tensor, or the tensors in a mapping/tuple/list, to ``device`` (None: as is)."""
    if device is None:
        return x
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, tuple | list):
        return type(x)(to_device(v, device) for v in x)
    return x


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(inputs)``, or ``model(**inputs)`` for a mapping."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def reiterable(batches: Iterable[Any], max_batches: int | None = None) -> Iterable[Any]:
    """``batches`` in a form that can be iterated several times.

    Lists, tuples and objects whose ``__iter__`` returns a fresh iterator (a ``DataLoader``)
    are kept; a one-shot iterator or generator is drawn into a list (at most ``max_batches``).
    """
    if isinstance(batches, torch.Tensor):
        raise TypeError(
            "batches must be an iterable of batches (e.g. a list of tensors or a DataLoader), "
            "not a single tensor; wrap it in a list"
        )
    if iter(batches) is batches:  # one-shot iterator
        return list(itertools.islice(batches, max_batches))
    return batches


def iter_inputs(
    batches: Iterable[Any], max_batches: int | None = None, device: torch.device | None = None
) -> Iterator[Any]:
    """Model inputs of the first ``max_batches`` batches, moved to ``device``."""
    if isinstance(batches, torch.Tensor):
        raise TypeError(
            "batches must be an iterable of batches (e.g. a list of tensors or a DataLoader), "
            "not a single tensor; wrap it in a list"
        )
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
    for batch in itertools.islice(batches, max_batches):
        yield to_device(batch_input(batch), device)


# --------------------------------------------------------------------------- models


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a stateless module)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def model_on(model: nn.Module, device: torch.device | str | None) -> nn.Module:
    """``model`` itself when it already lives on ``device`` (or ``device`` is None), else a
    copy moved there: the caller's module is never moved."""
    if device is None:
        return model
    device = torch.device(device)
    tensors = list(itertools.chain(model.parameters(), model.buffers()))
    if all(t.device == device for t in tensors):
        return model
    return copy.deepcopy(model).to(device)


def resolve_module(model: nn.Module, name: str, what: str = "module") -> nn.Module:
    """The submodule called ``name`` (``""`` is the model itself); ValueError naming it."""
    modules = dict(model.named_modules())
    if name not in modules:
        raise ValueError(f"{what} {name!r} is not a submodule of {type(model).__name__}")
    return modules[name]


def check_same_architecture(**models: nn.Module) -> None:
    """Raise ValueError naming the first state-dict key or shape on which the models differ
    (the one state-dict checker, :func:`pymerge._util.checks.check_state_pair`)."""
    items = list(models.items())
    ref_name, ref = items[0]
    ref_state = ref.state_dict()
    for name, other in items[1:]:
        check_state_pair(ref_state, other.state_dict(), ref_name, name)


@contextlib.contextmanager
def eval_mode(model: nn.Module, train: Callable[[nn.Module], bool] | None = None) -> Iterator[None]:
    """Every module in eval mode (or in train mode where ``train(module)`` is true) for the
    duration; each module's own ``training`` flag is restored afterwards, even on error."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        for m, _ in saved:
            m.training = bool(train(m)) if train is not None else False
        yield
    finally:
        for m, flag in saved:
            m.training = flag


# --------------------------------------------------------------------------- features


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]  # e.g. nn.MultiheadAttention returns (out, weights)
    raise TypeError(f"module output of type {type(output).__name__} is not a tensor")


def features_2d(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Features along ``dim`` as a ``[samples, d]`` matrix (every other axis is a sample axis:
    batch, conv spatial positions, sequence positions)."""
    if t.dim() == 0:
        raise ValueError("cannot take features of a 0-d output")
    if not -t.dim() <= dim < t.dim():
        raise ValueError(
            f"feature dim {dim} is out of range for an output of shape {tuple(t.shape)}"
        )
    d = t.shape[dim]
    return t.movedim(dim, -1).reshape(-1, d)


@contextlib.contextmanager
def record_outputs(
    model: nn.Module,
    points: Mapping[str, tuple[str, int]],
    sink: dict[str, list[torch.Tensor]],
    *,
    what: str = "activation point",
) -> Iterator[None]:
    """Record, for each ``key -> (module name, dim)``, the module's output as ``[samples, d]``
    features (detached) into ``sink[key]`` (a list: one entry per call of the module).

    Hooks are registered once per module and removed on exit, even on error.
    """
    by_module: dict[str, list[tuple[str, int]]] = {}
    for key, (name, dim) in points.items():
        by_module.setdefault(name, []).append((key, dim))
    modules = {name: resolve_module(model, name, f"{what} module") for name in by_module}
    handles = []

    def make_hook(entries: list[tuple[str, int]]):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            out = _first_tensor(output).detach()
            for key, dim in entries:
                sink.setdefault(key, []).append(features_2d(out, dim))

        return hook

    try:
        for name, entries in by_module.items():
            handles.append(modules[name].register_forward_hook(make_hook(entries)))
        yield
    finally:
        for h in handles:
            h.remove()


def execution_order(model: nn.Module, inputs: Any) -> tuple[list[str], dict[str, int]]:
    """Names of the leaf modules in the order they first run on ``inputs``, and how many
    times each ran. Modules whose ``forward`` never runs (e.g. ``MultiheadAttention.out_proj``,
    used through its weights) do not appear."""
    order: list[str] = []
    calls: dict[str, int] = {}
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if name not in calls:
                order.append(name)
                calls[name] = 0
            calls[name] += 1

        return hook

    try:
        for name, m in model.named_modules():
            if name and next(iter(m.children()), None) is None:
                handles.append(m.register_forward_hook(make_hook(name)))
        with torch.no_grad():
            call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return order, calls


def call_counts(model: nn.Module, names: Iterable[str], inputs: Any) -> dict[str, int]:
    """How many times each named module runs in one forward pass on ``inputs`` (no grad)."""
    modules = dict(model.named_modules())
    counts = dict.fromkeys(names, 0)
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            counts[name] += 1

        return hook

    try:
        for name in counts:
            handles.append(modules[name].register_forward_hook(make_hook(name)))
        with torch.no_grad():
            call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return counts
