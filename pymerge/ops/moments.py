"""Streaming per-feature moments: the one Chan et al. merge of the library.

Chan, Golub and LeVeque's parallel update combines the count, mean and sum of squared
deviations ``M2`` of two sets of samples without revisiting them::

    n = n_a + n_b,   delta = mean_b - mean_a
    mean = mean_a + delta * n_b / n
    M2   = M2_a + M2_b + delta^2 * n_a n_b / n

No quantity of size ``n * mean^2`` is formed, so it stays accurate where ``|mean| >> std``
(the naive ``E[x^2] - E[x]^2`` does not). :func:`chan_merge` is that update for tensors of
per-feature moments; :class:`ChannelStats` streams per-channel mean and variance with it
(REPAIR's statistics), and :class:`pymerge.ops.CorrelationAccumulator` merges its
per-feature moments with it (its cross co-moment has its own, matrix-shaped, merge).
"""

from __future__ import annotations

import torch

__all__ = ["ChannelStats", "chan_merge"]


def chan_merge(
    n_a: int,
    mean_a: torch.Tensor,
    m2_a: torch.Tensor,
    n_b: int,
    mean_b: torch.Tensor,
    m2_b: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge the moments of ``n_a`` samples with those of ``n_b`` more (``n_b >= 1``).

    Args:
        n_a, n_b: sample counts (``n_a`` may be 0: the result is the second set's moments).
        mean_a, mean_b: per-feature means (same shape, broadcastable).
        m2_a, m2_b: per-feature sums of squared deviations about those means.

    Returns:
        ``(mean, m2, delta)`` of all ``n_a + n_b`` samples, new tensors; ``delta`` is
        ``mean_b - mean_a`` (what a co-moment merge needs too).
    """
    n = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n)
    m2 = m2_a + (m2_b + delta * delta * (n_a * n_b / n))
    return mean, m2, delta


class ChannelStats:
    """Streaming per-channel count, mean and variance in float64 (:func:`chan_merge` of
    per-batch statistics, stable for large counts).

    Args:
        d: number of channels.
        device: where the statistics live (``None``: the default device).
    """

    def __init__(self, d: int, device: torch.device | str | None = None) -> None:
        self.d = d
        self.count = 0
        self.mean = torch.zeros(d, dtype=torch.float64, device=device)
        self._m2 = torch.zeros(d, dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor, dim: int = -1) -> None:
        """Add the samples of ``x``: channels along ``dim`` (size ``d``), every other axis a
        sample axis (``[samples, d]``, ``[N, C, H, W]`` with ``dim=1``, ``[N, T, d]``).

        Each batch is reduced in its own dtype (fp16/bf16 in float32) without a copy, then
        merged in float64.
        """
        if x.dim() == 0 or not -x.dim() <= dim < x.dim() or x.shape[dim] != self.d:
            raise ValueError(
                f"expected {self.d} channels along dim {dim}, got shape {tuple(x.shape)}"
            )
        dim = dim % x.dim()
        nb = x.numel() // self.d
        if nb == 0:
            return
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        axes = [a for a in range(x.dim()) if a != dim]
        var_b, mean_b = torch.var_mean(x, dim=axes, correction=0)
        mean_b = mean_b.to(device=self.mean.device, dtype=torch.float64)
        m2_b = var_b.to(device=self.mean.device, dtype=torch.float64) * nb
        self.mean, self._m2, _ = chan_merge(self.count, self.mean, self._m2, nb, mean_b, m2_b)
        self.count += nb

    def var(self, unbiased: bool = False) -> torch.Tensor:
        """Per-channel variance ``[d]`` (float64); biased (divide by count) by default."""
        if self.count == 0:
            raise ValueError("no samples were recorded")
        denom = self.count - 1 if unbiased else self.count
        if denom <= 0:
            raise ValueError("an unbiased variance needs at least two samples")
        return self._m2 / denom

    def std(self) -> torch.Tensor:
        """Per-channel (biased) standard deviation ``[d]`` (float64)."""
        return self.var().sqrt()

    def __repr__(self) -> str:
        return f"ChannelStats(d={self.d}, count={self.count}, device={self.mean.device})"
