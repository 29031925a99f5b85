"""Pure-NumPy linear sum assignment: the fallback behind ``pymerge.linear_sum_assignment``.

Shortest augmenting paths on a rectangular cost matrix, after D. F. Crouse, "On implementing
2D rectangular assignment algorithms", IEEE Trans. Aerospace and Electronic Systems 52(4),
2016 (the algorithm scipy uses), preceded by a row reduction that assigns every row whose
cheapest column is still free (the cheap part of Jonker & Volgenant's initialisation). Each
Dijkstra step is vectorised over the columns, so the cost is O(n^2) NumPy calls of length m.

Same contract as the compiled ``pymerge._lap.solve``:

``solve(cost, maximize=False, init_col4row=None, init_v=None) -> (col4row, u, v)`` for a
2-D float cost with ``n_rows <= n_cols``. ``+inf`` (``-inf`` when maximising) forbids a pair;
NaN or the other infinity raises ``ValueError``; no complete finite assignment raises
``ValueError("cost matrix is infeasible ...")``. The duals ``u``/``v`` are those of the
minimisation problem actually solved (the negated costs when maximising): opaque values to
pass back as ``init_v`` to warm-start a following solve of the same shape and sense.
"""

from __future__ import annotations

import numpy as np

__all__ = ["solve", "solve_batch", "check_costs", "INVALID_NAN", "INVALID_INF", "INFEASIBLE"]

INVALID_NAN = "cost matrix contains invalid numeric entries: NaN"
INVALID_INF = "cost matrix contains invalid numeric entries: {sign}inf"
INFEASIBLE = "cost matrix is infeasible: no complete assignment has a finite total cost"


def check_costs(cost: np.ndarray, maximize: bool) -> None:
    """Raise ``ValueError`` naming the first NaN, or ``-inf`` (``+inf`` when maximising)."""
    if cost.dtype.kind != "f" or cost.size == 0:
        return
    bad = np.isnan(cost)
    if bad.any():
        where = tuple(int(k) for k in np.argwhere(bad)[0])
        raise ValueError(f"{INVALID_NAN} at index {where}")
    wrong = np.inf if maximize else -np.inf
    bad = cost == wrong
    if bad.any():
        where = tuple(int(k) for k in np.argwhere(bad)[0])
        sign, allowed = ("+", "-inf") if maximize else ("-", "+inf")
        raise ValueError(
            f"{INVALID_INF.format(sign=sign)} at index {where} "
            f"(when {'maximising' if maximize else 'minimising'}, forbid a pair with {allowed})"
        )


def _as_cost(cost: np.ndarray) -> np.ndarray:
    cost = np.asarray(cost)
    if cost.ndim != 2:
        raise ValueError(f"expected a 2-D cost matrix, got shape {cost.shape}")
    if cost.dtype.kind not in "biuf":
        raise TypeError(f"cost matrix must be numeric (float/int/bool), got dtype {cost.dtype}")
    if cost.shape[0] > cost.shape[1]:
        raise ValueError(
            f"solve needs n_rows <= n_cols, got shape {cost.shape}; transpose the problem"
        )
    return cost


def _initial_assignment(
    red: np.ndarray, u: np.ndarray, hint: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Assign tight pairs (reduced cost 0) greedily: the hint first, then each row's argmin."""
    n, m = red.shape
    col4row = np.full(n, -1, dtype=np.int64)
    row4col = np.full(m, -1, dtype=np.int64)
    rows = np.arange(n)
    if hint is not None:
        ok = hint >= 0
        cand_rows = rows[ok]
        cand_cols = hint[ok]
        tight = red[cand_rows, cand_cols] == u[cand_rows]
        cand_rows, cand_cols = cand_rows[tight], cand_cols[tight]
        # keep the first row naming each column (a validated hint has no repeats)
        _, first = np.unique(cand_cols, return_index=True)
        col4row[cand_rows[first]] = cand_cols[first]
        row4col[cand_cols[first]] = cand_rows[first]
    free_rows = np.flatnonzero(col4row < 0)
    if free_rows.size:
        best = np.argmin(red[free_rows], axis=1)
        usable = row4col[best] < 0
        free_rows, best = free_rows[usable], best[usable]
        _, first = np.unique(best, return_index=True)
        col4row[free_rows[first]] = best[first]
        row4col[best[first]] = free_rows[first]
    return col4row, row4col


def _augment(
    c: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    col4row: np.ndarray,
    row4col: np.ndarray,
    root: int,
) -> None:
    """One Dijkstra search from free row ``root``, then dual update and augmentation."""
    m = c.shape[1]
    dist = np.full(m, np.inf)
    path = np.full(m, -1, dtype=np.int64)
    unscanned = np.ones(m, dtype=bool)
    free = row4col < 0  # fixed during one search
    masked = np.full(m, np.inf)  # dist on unscanned columns, +inf on scanned ones
    reduced = np.empty(m)
    better = np.empty(m, dtype=bool)
    tie = np.empty(m, dtype=bool)
    scanned: list[int] = []
    min_val = 0.0
    i = root
    while True:
        np.subtract(c[i], v, out=reduced)
        reduced += min_val - u[i]
        np.less(reduced, masked, out=better)
        better &= unscanned
        np.copyto(masked, reduced, where=better)
        np.copyto(path, i, where=better)
        j = int(masked.argmin())
        lowest = masked[j]
        if lowest == np.inf:
            raise ValueError(INFEASIBLE)
        if not free[j]:
            # prefer a free column among ties: it ends the search (scipy does the same)
            np.equal(masked, lowest, out=tie)
            tie &= free
            k = int(tie.argmax())
            if tie[k]:
                j = k
        min_val = float(lowest)
        dist[j] = lowest
        masked[j] = np.inf
        unscanned[j] = False
        if free[j]:
            sink = j
            break
        scanned.append(j)
        i = int(row4col[j])
    # dual update: rows reached through scanned columns, and the scanned columns
    u[root] += min_val
    if scanned:
        cols = np.asarray(scanned, dtype=np.int64)
        delta = min_val - dist[cols]
        u[row4col[cols]] += delta
        v[cols] -= delta
    # augment along the path back to the root
    j = sink
    while True:
        i = int(path[j])
        row4col[j] = i
        col4row[i], j = j, int(col4row[i])
        if i == root:
            break


def solve(
    cost: np.ndarray,
    maximize: bool = False,
    init_col4row: np.ndarray | None = None,
    init_v: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Solve one ``[n, m]`` problem (``n <= m``): ``(col4row int64[n], u f64[n], v f64[m])``.

    ``init_v`` (column duals of a previous solve of the same shape and sense) and
    ``init_col4row`` (a previous assignment, ``-1`` for "none") only speed the solve up;
    the optimum is the same. Column duals are used for square problems only (a rectangular
    problem needs zero duals on unassigned columns, which a stale ``v`` does not give).
    """
    cost = _as_cost(cost)
    maximize = bool(maximize)
    check_costs(cost, maximize)
    n, m = cost.shape
    c = np.array(cost, dtype=np.float64, order="C", copy=True)
    if maximize:
        np.negative(c, out=c)
    v = np.zeros(m)
    if init_v is not None and n == m:
        init_v = np.asarray(init_v, dtype=np.float64)
        if init_v.shape != (m,):
            raise ValueError(f"init_v must have shape ({m},), got {init_v.shape}")
        if not np.isfinite(init_v).all():
            raise ValueError("init_v must be finite")
        v[:] = init_v
    hint = None
    if init_col4row is not None:
        hint = np.asarray(init_col4row)
        if hint.shape != (n,) or hint.dtype.kind not in "iu":
            raise ValueError(
                f"init_col4row must be an integer array of shape ({n},), "
                f"got {hint.dtype} {hint.shape}"
            )
        hint = hint.astype(np.int64)
        if ((hint < -1) | (hint >= m)).any():
            raise ValueError(f"init_col4row entries must lie in [-1, {m})")
        used = hint[hint >= 0]
        if np.unique(used).size != used.size:
            raise ValueError("init_col4row assigns a column to more than one row")
    if n == 0:
        return np.empty(0, np.int64), np.empty(0), v
    red = c - v
    u = red.min(axis=1)
    if np.isinf(u).any():
        raise ValueError(INFEASIBLE)
    col4row, row4col = _initial_assignment(red, u, hint)
    del red
    for root in np.flatnonzero(col4row < 0):
        _augment(c, u, v, col4row, row4col, int(root))
    return col4row, u, v


_BATCH_CHUNK = 1 << 22  # cost entries per lockstep chunk (32 MiB of float64)


class _BatchInfeasible(Exception):
    def __init__(self, index: int):
        self.index = index


def _lockstep(c: np.ndarray) -> np.ndarray:
    """Solve a float64 ``[B, n, m]`` minimisation stack with every problem in lockstep.

    The same steps, tie-breaks and arithmetic as :func:`solve` (so the same answers), but each
    NumPy call works on all ``B`` problems at once: one augmentation stage per free row.
    """
    B, n, m = c.shape
    u = c.min(axis=2)
    bad = np.isinf(u).any(axis=1)
    if bad.any():
        raise _BatchInfeasible(int(np.argmax(bad)))
    col4row = np.full((B, n), -1, dtype=np.int64)
    row4col = np.full((B, m), -1, dtype=np.int64)
    v = np.zeros((B, m))
    # greedy row reduction: each row takes its argmin column unless a lower row took it
    best = c.argmin(axis=2)
    _, first = np.unique((np.arange(B)[:, None] * m + best).ravel(), return_index=True)
    bb, rr = np.divmod(first, n)
    col4row[bb, rr] = best[bb, rr]
    row4col[bb, best[bb, rr]] = rr
    while True:
        unassigned = col4row < 0
        A = np.flatnonzero(unassigned.any(axis=1))
        if A.size == 0:
            return col4row
        K = A.size
        r = np.arange(K)
        roots = unassigned[A].argmax(axis=1)
        vA = v[A]
        free = row4col[A] < 0
        masked = np.full((K, m), np.inf)
        dist = np.full((K, m), np.inf)
        path = np.full((K, m), -1, dtype=np.int64)
        unscanned = np.ones((K, m), dtype=bool)
        done = np.zeros(K, dtype=bool)
        sink = np.full(K, -1, dtype=np.int64)
        min_val = np.zeros(K)
        i = roots.copy()
        while not done.all():
            reduced = c[A, i] - vA
            reduced += (min_val - u[A, i])[:, None]
            better = reduced < masked
            better &= unscanned
            better[done] = False
            np.copyto(masked, reduced, where=better)
            np.copyto(path, i[:, None], where=better)
            j = masked.argmin(axis=1)
            lowest = masked[r, j]
            going = ~done
            stuck = going & (lowest == np.inf)
            if stuck.any():
                raise _BatchInfeasible(int(A[np.argmax(stuck)]))
            taken = going & ~free[r, j]
            if taken.any():
                tie = masked == lowest[:, None]
                tie &= free
                k = tie.argmax(axis=1)
                use = taken & tie[r, k]
                j = np.where(use, k, j)
            g = np.flatnonzero(going)
            jg = j[g]
            min_val[g] = lowest[g]
            dist[g, jg] = lowest[g]
            masked[g, jg] = np.inf
            unscanned[g, jg] = False
            at_sink = free[g, jg]
            sink[g[at_sink]] = jg[at_sink]
            done[g[at_sink]] = True
            cont = g[~at_sink]
            i[cont] = row4col[A[cont], j[cont]]
        # dual update over the scanned columns (not the sinks)
        u[A, roots] += min_val
        scanned = ~unscanned
        scanned[r, sink] = False
        sb, sc = np.nonzero(scanned)
        delta = min_val[sb] - dist[sb, sc]
        u[A[sb], row4col[A[sb], sc]] += delta
        v[A[sb], sc] -= delta
        # augment every problem along its path, in lockstep
        j = sink.copy()
        walking = np.ones(K, dtype=bool)
        while walking.any():
            w = np.flatnonzero(walking)
            bw, jw = A[w], j[w]
            iw = path[w, jw]
            row4col[bw, jw] = iw
            j[w] = col4row[bw, iw]
            col4row[bw, iw] = jw
            walking[w] = iw != roots[w]


def solve_batch(costs: np.ndarray, maximize: bool = False, threads: int = 0) -> np.ndarray:
    """Solve a ``[B, n, m]`` (``n <= m``) stack; returns ``col4row int64 [B, n]``.

    Problems are solved in lockstep chunks (each NumPy call covers a whole chunk), with the
    same answers as :func:`solve` on each. ``threads`` is accepted for signature parity with
    the native module and ignored.
    """
    costs = np.asarray(costs)
    if costs.ndim != 3:
        raise ValueError(f"expected a 3-D stack of costs [B, n, m], got shape {costs.shape}")
    if costs.dtype.kind not in "biuf":
        raise TypeError(f"cost stack must be numeric (float/int/bool), got dtype {costs.dtype}")
    B, n, m = costs.shape
    if n > m:
        raise ValueError(f"solve_batch needs n <= m, got shape {costs.shape}; transpose it")
    maximize = bool(maximize)
    if costs.dtype.kind == "f" and (
        np.isnan(costs).any() or (costs == (np.inf if maximize else -np.inf)).any()
    ):
        for b in range(B):
            try:
                check_costs(costs[b], maximize)
            except ValueError as exc:
                raise ValueError(f"{exc} (problem {b} of the batch)") from None
    out = np.empty((B, n), dtype=np.int64)
    if n == 0 or B == 0:
        return out
    chunk = max(1, min(B, _BATCH_CHUNK // (n * m)))
    for start in range(0, B, chunk):
        block = np.array(costs[start : start + chunk], dtype=np.float64, copy=True)
        if maximize:
            np.negative(block, out=block)
        try:
            out[start : start + chunk] = _lockstep(block)
        except _BatchInfeasible as exc:
            raise ValueError(f"{INFEASIBLE} (problem {start + exc.index} of the batch)") from None
    return out
