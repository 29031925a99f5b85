"""Least-recently-used bookkeeping on an ``OrderedDict`` (the ops' small caches)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any


def lru_get(cache: OrderedDict, key: Any) -> Any:
    """``cache[key]`` (marked most recently used) or ``None``."""
    hit = cache.get(key)
    if hit is not None:
        cache.move_to_end(key)
    return hit


def lru_put(cache: OrderedDict, key: Any, value: Any, size: int) -> None:
    """Store ``value`` as most recently used; drop the least recently used beyond ``size``."""
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > size:
        cache.popitem(last=False)
