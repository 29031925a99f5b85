"""One progress-bar helper: every long loop in pymerge reports through :func:`progress_bar`.

``tqdm`` is imported only when a bar is shown; a disabled bar is a no-op object with the
same methods, so loops are written once::

    with progress_bar(progress, total=max_iter, desc="weight matching", unit="sweep") as bar:
        for ...:
            bar.update(1)
            bar.set_postfix(objective=f"{j:.6g}")
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["progress_bar", "track"]


class _NoBar:
    """Stands in for a tqdm bar when progress is off."""

    def update(self, n: float = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_description(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


@contextlib.contextmanager
def progress_bar(
    enabled: bool, *, total: float | None = None, desc: str = "", unit: str = "it"
) -> Iterator[Any]:
    """A tqdm bar (``tqdm.auto``) when ``enabled``, else a no-op; closed on exit, even on
    error."""
    if not enabled:
        yield _NoBar()
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit)
    try:
        yield bar
    finally:
        bar.close()


def track(
    items: Iterable[T],
    enabled: bool,
    *,
    total: float | None = None,
    desc: str = "",
    unit: str = "it",
) -> Iterator[T]:
    """Iterate ``items`` with a bar when ``enabled`` (``total`` defaults to ``len(items)``
    where it has one); the bar is closed when the loop ends or is left."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress_bar(enabled, total=total, desc=desc, unit=unit) as bar:
        for item in items:
            yield item
            bar.update(1)
