"""The one cache helper: a least-recently-used mapping with an item limit and, optionally,
a cost budget (the ops' caches of weights, validated indices, gather maps and kernel launch
tables all use it)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["LRUCache"]

_MISSING = object()


class LRUCache:
    """Least-recently-used mapping of at most ``max_items`` entries.

    Args:
        max_items: entries kept at most (>= 1).
        max_cost: when given, the total ``cost(value)`` kept at most; the most recent entry
            stays even when it alone exceeds the budget (a cache that drops what it was just
            given would rebuild it on every call).
        cost: the cost of a value (e.g. its bytes); needed with ``max_cost``.

    ``get`` marks a hit as most recently used; ``put`` inserts (or replaces) and evicts the
    least recently used entries beyond the limits.
    """

    __slots__ = ("_data", "max_items", "max_cost", "_cost", "total_cost")

    def __init__(
        self,
        max_items: int,
        max_cost: int | None = None,
        cost: Callable[[Any], int] | None = None,
    ) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        if max_cost is not None and cost is None:
            raise ValueError("max_cost needs cost (the cost of one value)")
        self._data: OrderedDict[Hashable, Any] = OrderedDict()
        self.max_items = max_items
        self.max_cost = max_cost
        self._cost = cost
        self.total_cost = 0

    def get(self, key: Hashable, default: Any = None) -> Any:
        """``self[key]`` (now the most recently used), or ``default``."""
        hit = self._data.get(key, _MISSING)
        if hit is _MISSING:
            return default
        self._data.move_to_end(key)
        return hit

    def put(self, key: Hashable, value: Any) -> None:
        """Store ``value`` as the most recently used entry; evict beyond the limits."""
        data = self._data
        old = data.pop(key, _MISSING)
        cost = self._cost
        if cost is not None:
            if old is not _MISSING:
                self.total_cost -= cost(old)
            self.total_cost += cost(value)
        data[key] = value
        while len(data) > self.max_items or (
            self.max_cost is not None and self.total_cost > self.max_cost and len(data) > 1
        ):
            _, dropped = data.popitem(last=False)
            if cost is not None:
                self.total_cost -= cost(dropped)

    def clear(self) -> None:
        """Forget every entry."""
        self._data.clear()
        self.total_cost = 0

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._data

    def __repr__(self) -> str:
        budget = "" if self.max_cost is None else f", cost {self.total_cost}/{self.max_cost}"
        return f"LRUCache({len(self._data)}/{self.max_items} items{budget})"
