"""Row and column maps of a gather ``b.index_select(ax0, i0).index_select(ax1, i1)...``.

Shared by the Triton kernel (``pymerge.kernels.permuted_interpolate``) and the C++ CPU loops
(``pymerge._multi_tensor.permuted_lerp``): every tensor is viewed as a matrix ``[R, C]``
(``R = shape[0]``, ``C = prod(shape[1:])``; 1-D tensors are ``[1, n]``, 0-d ones ``[1, 1]``),
so any set of permuted axes splits into a *row map* (source row offset ``row * C`` of each
row, from axis 0) and a *column map* (source column of each column, from the other axes):
``src(r, c) = rowmap[r] + colmap[c]``, ``R + C`` integers per tensor, no division per element.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def matrix_view(shape: Sequence[int]) -> tuple[int, int]:
    """``(R, C)`` of the matrix view used by the kernel."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, int(shape[0])
    c = 1
    for s in shape[1:]:
        c *= int(s)
    return int(shape[0]), c


def build_maps(
    shape: Sequence[int], axes: Sequence[tuple[int, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column maps (int64, CPU) of ``b.index_select(ax, idx)...`` for one tensor.

    ``axes``: ``(axis, index)`` pairs, axes non-negative, indices valid (CPU, int64).
    """
    R, C = matrix_view(shape)
    if len(shape) <= 1:
        col = torch.arange(C, dtype=torch.int64)
        for _, idx in axes:
            col = col.index_select(0, idx)
        return torch.zeros(1, dtype=torch.int64), col
    rowidx = torch.arange(R, dtype=torch.int64)
    grid = None
    for axis, idx in axes:
        if axis == 0:
            rowidx = rowidx.index_select(0, idx)
        else:
            if grid is None:
                grid = torch.arange(C, dtype=torch.int64).reshape(tuple(shape[1:]))
            grid = grid.index_select(axis - 1, idx)
    col = torch.arange(C, dtype=torch.int64) if grid is None else grid.reshape(-1)
    return rowidx * C, col
