"""An ``eval_fn`` that knows its data: loss (and accuracy) of a model over fixed batches.

:class:`Evaluator` is what :func:`pymerge.landscape.interpolation_curve` (and anything else
that takes ``eval_fn(model) -> metrics``) calls once per point. Because it holds the batches
and the loss function rather than hiding them in a closure, a curve may also evaluate
several points in one call: :meth:`Evaluator.batched` runs the model's forward once for M
stacked parameter sets with ``torch.func.vmap`` over ``torch.func.functional_call``
(λ stacked as a leading batch dimension of every parameter). Both ways compute the same
metrics with the same reductions (values differ only by float rounding: a batched matmul
sums in another order).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Evaluator"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def _as_batches(batches: Any) -> list[tuple[Any, Tensor]]:
    """``batches`` as a list of ``(inputs, targets)``; one ``(x, y)`` pair of tensors is one
    batch."""
    if (
        isinstance(batches, tuple)
        and len(batches) == 2
        and all(isinstance(t, Tensor) for t in batches)
    ):
        batches = [batches]
    if isinstance(batches, (Tensor, Mapping, str)) or not isinstance(batches, Iterable):
        raise TypeError(
            "batches must be an (inputs, targets) pair of tensors or an iterable of such "
            f"pairs, got {type(batches).__name__}"
        )
    out = []
    for i, b in enumerate(batches):
        if not isinstance(b, Sequence) or isinstance(b, str) or len(b) != 2:
            raise TypeError(
                f"batches[{i}] must be an (inputs, targets) pair, got {type(b).__name__}"
            )
        x, y = b
        if not isinstance(y, Tensor):
            raise TypeError(f"batches[{i}]: targets must be a tensor, got {type(y).__name__}")
        if y.dim() == 0 or y.shape[0] == 0:
            raise ValueError(f"batches[{i}] holds no samples (targets of shape {tuple(y.shape)})")
        out.append((x, y))
    if not out:
        raise ValueError("batches is empty: an evaluation needs data")
    return out


def _move(x: Any, device: torch.device | None) -> Any:
    if device is None:
        return x
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: _move(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_move(v, device) for v in x)
    return x


def _call(model: Callable[..., Any], x: Any) -> Tensor:
    out = model(**x) if isinstance(x, Mapping) else model(x)
    if not isinstance(out, Tensor):
        raise TypeError(
            f"the model returned a {type(out).__name__}; Evaluator needs a tensor of outputs "
            "(wrap the model to return its logits)"
        )
    return out


class Evaluator:
    """``eval_fn(model) -> {"loss": ..., "accuracy": ...}`` over fixed batches.

    Args:
        batches: an ``(inputs, targets)`` pair of tensors, or an iterable of such pairs
            (drawn into a list once); inputs may also be a mapping of keyword arguments.
        loss_fn: ``loss_fn(outputs, targets) -> 0-d tensor``, the *mean* loss of a batch
            (default ``torch.nn.functional.cross_entropy``). Batch means are combined
            weighted by the batch's number of samples (``len(targets)``).
        accuracy: also report ``"accuracy"``, the fraction of samples whose ``argmax`` over
            the last output dimension equals the target (classification).
        device: move each batch there before the forward (default: leave it where it is).

    Calling it runs the model in eval mode without gradients (each module's train flag is
    restored afterwards) and returns plain floats. A loss that is NaN or inf stays NaN or
    inf. Errors name ``loss_fn`` when it returns a non-scalar or a tensor that needs grad.
    """

    def __init__(
        self,
        batches: Any,
        loss_fn: LossFn | None = None,
        *,
        accuracy: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.device = None if device is None else torch.device(device)
        self.batches = [
            (_move(x, self.device), _move(y, self.device)) for x, y in _as_batches(batches)
        ]
        self.loss_fn: LossFn = F.cross_entropy if loss_fn is None else loss_fn
        self.accuracy = bool(accuracy)
        self.num_samples = sum(int(y.shape[0]) for _, y in self.batches)

    def metric_names(self) -> list[str]:
        return ["loss", "accuracy"] if self.accuracy else ["loss"]

    def _loss(self, out: Tensor, y: Tensor) -> Tensor:
        loss = self.loss_fn(out, y)
        if not isinstance(loss, Tensor):
            if isinstance(loss, (int, float)) and not isinstance(loss, bool):
                return torch.tensor(float(loss), dtype=torch.float64)
            raise TypeError(
                f"loss_fn returned a {type(loss).__name__}; it must return a 0-d tensor"
            )
        if loss.numel() != 1:
            raise TypeError(
                f"loss_fn returned a tensor of shape {tuple(loss.shape)}; it must return the "
                "batch's mean loss as a 0-d tensor (use reduction='mean')"
            )
        if loss.requires_grad:
            raise TypeError(
                "loss_fn returned a tensor that requires grad under torch.no_grad(); return a "
                "value computed from the outputs (or .detach() it)"
            )
        return loss.reshape(()).double()

    def _sums(self, out: Tensor, y: Tensor) -> Tensor:
        """``[loss * n, correct]`` of one batch's outputs (float64)."""
        n = int(y.shape[0])
        parts = [self._loss(out, y) * n]
        if self.accuracy:
            if out.dim() < 1 or out.shape[0] != n:
                raise ValueError(
                    f"accuracy needs outputs [N, ..., classes] for {n} targets, got "
                    f"{tuple(out.shape)}"
                )
            parts.append((out.argmax(-1) == y).sum().double())
        return torch.stack(parts)

    def _finish(self, sums: np.ndarray) -> dict[str, float]:
        res = {"loss": float(sums[0]) / self.num_samples}
        if self.accuracy:
            res["accuracy"] = float(sums[1]) / self.num_samples
        return res

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> dict[str, float]:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        flags = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            total = None
            for x, y in self.batches:
                s = self._sums(_call(model, x), y)
                total = s if total is None else total + s
        finally:
            for m, t in flags:
                m.training = t
        return self._finish(total.cpu().numpy())

    @torch.no_grad()
    def batched(
        self, model: nn.Module, params: Mapping[str, Tensor], *, in_dims: Mapping[str, int | None]
    ) -> list[dict[str, float]]:
        """Metrics of ``model`` under M parameter sets at once.

        ``params``: the model's full state (``functional_call`` names), each entry with a
        leading dimension of size M where ``in_dims[name] == 0`` (shared where ``None``).
        Runs ``vmap(functional_call)`` over that dimension in eval mode; returns M metric
        dicts. Raises whatever vmap raises for a model it cannot batch.
        """
        from torch.func import functional_call, vmap

        sizes = {int(params[k].shape[0]) for k, d in in_dims.items() if d == 0}
        if len(sizes) != 1:
            raise ValueError(f"params must share one leading size M, got sizes {sorted(sizes)}")
        (M,) = sizes
        flags = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            total = None
            for x, y in self.batches:
                if isinstance(x, Mapping):

                    def fwd(p, x=x):
                        return functional_call(model, p, (), dict(x))
                else:

                    def fwd(p, x=x):
                        return functional_call(model, p, (x,))

                out = vmap(fwd, in_dims=(dict(in_dims),))(dict(params))
                s = torch.stack([self._sums(out[m], y) for m in range(M)])
                total = s if total is None else total + s
        finally:
            for m, t in flags:
                m.training = t
        arr = total.cpu().numpy()
        return [self._finish(arr[m]) for m in range(M)]

    def __repr__(self) -> str:
        name = getattr(self.loss_fn, "__name__", type(self.loss_fn).__name__)
        return (
            f"Evaluator({len(self.batches)} batches, {self.num_samples} samples, "
            f"loss_fn={name}, accuracy={self.accuracy})"
        )
