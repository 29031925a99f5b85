"""The solve step shared by weight matching and activation matching.

Given the score matrix of one permutation group (``score[i, j]``: how well unit ``j`` of
model B fits position ``i`` of model A), the best permutation is the maximising linear
assignment. Groups under a :class:`~pymerge.spec.HeadStructure` keep heads whole: for
every pair of heads ``(a, b)`` the units are matched within the block (a batch of small
assignments), the within-head optima are summed over the structure's groups into an
``[H, H]`` head score, and one assignment over heads picks the head permutation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from pymerge.spec.spec import HeadStructure

__all__ = ["Solver", "score", "improves"]


def score(cost: Tensor, p: Tensor) -> float:
    """``sum_i cost[i, p[i]]`` in float64 (never through a dense permutation matrix)."""
    n = cost.shape[0]
    picked = cost[torch.arange(n, device=cost.device), p.to(cost.device)]
    return float(picked.sum(dtype=torch.float64))


def improves(new: float, old: float, tol: float) -> bool:
    """``new`` beats ``old`` by more than ``tol`` relative (absolute below 1)."""
    return new > old + tol * max(1.0, abs(old))


class Solver:
    """Maximising assignments through :mod:`pymerge.ops.assignment`, counting solves and
    keeping each group's duals for warm starts (``warm=True``)."""

    def __init__(self, backend: str | None, duals: Mapping[str, Any] | None = None) -> None:
        from pymerge.ops import assignment

        self._api = assignment
        self.backend = backend
        self.duals: dict[str, Any] = dict(duals or {})
        self.solves = 0

    def group(self, name: str, cost: Tensor, *, warm: bool = False) -> Tensor:
        """Column assignment (int64 CPU ``[n]``) maximising ``sum_i cost[i, col[i]]``;
        warm-started from (and updating) the duals of ``name`` when ``warm``."""
        prev = self.duals.get(name) if warm else None
        res = self._api.solve_assignment(cost, True, init=prev, backend=self.backend)
        if warm:
            self.duals[name] = res
        self.solves += 1
        return torch.as_tensor(res.col_ind, dtype=torch.long).cpu()

    def batch(self, costs: Tensor) -> Tensor:
        """Column assignments ``[B, d]`` of a stack ``[B, d, d]`` (threaded in C++)."""
        _, col = self._api.linear_sum_assignment_batch(costs, True, backend=self.backend)
        self.solves += costs.shape[0]
        return torch.as_tensor(col, dtype=torch.long).cpu().reshape(costs.shape[0], -1)

    def heads(self, hs: HeadStructure, costs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Whole-head assignment of the groups in ``costs`` (each ``[H*D, H*D]``), which
        share one head permutation: see the module docstring."""
        h, d = hs.num_heads, hs.head_dim
        within: dict[str, Tensor] = {}
        head_score: Tensor | None = None
        for g, c in costs.items():
            blocks = c.reshape(h, d, h, d).permute(0, 2, 1, 3).reshape(h * h, d, d)
            if d == 1:
                cols = torch.zeros(h * h, 1, dtype=torch.long)
            else:
                cols = self.batch(blocks.contiguous())
            within[g] = cols.view(h, h, d)
            sc = blocks.gather(2, cols.to(blocks.device).view(h * h, d, 1)).sum(dim=(1, 2))
            sc = sc.reshape(h, h)
            head_score = sc if head_score is None else head_score + sc
        assert head_score is not None
        sigma = self.group("", head_score.cpu())
        rows = torch.arange(h)
        return {g: (sigma.view(h, 1) * d + w[rows, sigma]).reshape(-1) for g, w in within.items()}
