"""The streaming merge driver: tensor by tensor, from lazy state dicts to a sink.

:func:`stream_merge` merges checkpoints that need not fit in memory. For each output key
it reads that key's tensor from every model (and the base), runs the method's per-tensor
function through :meth:`~pymerge.merge.registry.MergePlan.merge_tensor` (the same function
``pymerge.merge`` uses in memory, so both paths give the same tensors), casts the result
and hands it to ``sink(key, tensor)`` (e.g. :meth:`pymerge.io.CheckpointWriter.write`).
Memory holds the tensors of the key being merged, of the keys a reader thread has already
read ahead (``prefetch``, bounded by ``prefetch_bytes``), and of the one being written.

Overlap: a reader thread reads (and prepares: casts, permutes) the next keys while the
main thread computes; a writer thread writes the previous result. Reading from a lazy
checkpoint is ``pread`` into fresh buffers and writing is ``pwrite``, both of which release
the GIL, so on a machine with spare cores the three stages run at once.

This module knows nothing of files (layer 4 sits below :mod:`pymerge.io`): inputs are any
``Mapping[str, Tensor]`` (a lazy one reads on ``[]``), outputs go to a callable.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from pymerge._util.progress import progress_bar
from pymerge.merge.registry import MergePlan

__all__ = ["Source", "OutputKey", "StreamStats", "stream_merge"]

Prepare = Callable[[int, str, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Source:
    """Where one input of an output key comes from: ``states[model][key]``."""

    model: int
    key: str


@dataclass(frozen=True)
class OutputKey:
    """One tensor of the output and how to make it.

    Attributes:
        key: the output key.
        sources: the K inputs merged into it (model index into ``states``, input key).
        base: the base's input, or None.
        plan: the method and its settings for this key (slices may differ in both).
        params: the key's resolved parameters (``plan.resolve``: resolved up front so every
            error comes before any work).
        t: the key's layer position (mergekit's gradient ``t``).
        nbytes: bytes of one input tensor (for the read-ahead budget).
    """

    key: str
    sources: tuple[Source, ...]
    base: Source | None
    plan: MergePlan
    params: Mapping[str, object]
    t: float = 0.0
    nbytes: int = 0


@dataclass
class StreamStats:
    """Where the time went (seconds, summed over keys; the stages overlap, so the sum can
    exceed the wall time) and how much was moved."""

    keys: int = 0
    read_seconds: float = 0.0
    merge_seconds: float = 0.0
    write_seconds: float = 0.0
    wall_seconds: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    per_key: dict[str, float] = field(default_factory=dict)


def _read(
    item: OutputKey,
    states: Sequence[Mapping[str, torch.Tensor]],
    prepare: Prepare | None,
    stats: StreamStats,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    t0 = time.perf_counter()

    def get(src: Source) -> torch.Tensor:
        t = states[src.model][src.key]
        stats.bytes_read += t.numel() * t.element_size()
        return prepare(src.model, src.key, t) if prepare is not None else t

    tensors = [get(s) for s in item.sources]
    base = get(item.base) if item.base is not None else None
    stats.read_seconds += time.perf_counter() - t0
    return tensors, base


def _read_ahead(
    items: Sequence[OutputKey],
    read: Callable[[OutputKey], tuple[list[torch.Tensor], torch.Tensor | None]],
    depth: int,
    budget: int,
) -> Iterator[tuple[OutputKey, tuple[list[torch.Tensor], torch.Tensor | None]]]:
    """``(item, inputs)`` in order, a reader thread keeping up to ``depth`` keys read ahead
    while the inputs of the key being merged plus those read ahead stay within ``budget``
    bytes (a key is always read when it is the next one needed)."""
    if depth <= 0 or len(items) < 2:
        for item in items:
            yield item, read(item)
        return
    pool = ThreadPoolExecutor(1, thread_name_prefix="pymerge-read")
    pending: list[tuple[OutputKey, Future, int]] = []
    nxt = 0

    def cost(item: OutputKey) -> int:
        return item.nbytes * (len(item.sources) + (item.base is not None))

    try:
        for _ in range(len(items)):
            held = sum(c for _, _, c in pending)
            while nxt < len(items) and len(pending) <= depth:
                c = cost(items[nxt])
                if pending and held + c > budget:
                    break
                pending.append((items[nxt], pool.submit(read, items[nxt]), c))
                held += c
                nxt += 1
            item, fut, _ = pending.pop(0)
            yield item, fut.result()
    finally:
        for _, fut, _ in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


class _Writer:
    """A writer thread with a one-deep queue: the previous result is written while the next
    one is computed; an error in the sink is raised in the caller at the next put/close."""

    def __init__(self, sink: Callable[[str, torch.Tensor], None], stats: StreamStats) -> None:
        self._sink, self._stats = sink, stats
        self._q: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pymerge-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            if self._error is not None:
                continue
            key, tensor = job
            t0 = time.perf_counter()
            try:
                self._sink(key, tensor)
            except BaseException as exc:  # handed to the main thread
                self._error = exc
            self._stats.write_seconds += time.perf_counter() - t0
            self._stats.bytes_written += tensor.numel() * tensor.element_size()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, key: str, tensor: torch.Tensor) -> None:
        self._raise()
        self._q.put((key, tensor))

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()
        self._raise()

    def abandon(self) -> None:
        """Stop after the job in hand (on an error or Ctrl-C in the main thread)."""
        self._error = self._error or RuntimeError("abandoned")
        while True:
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        self._q.put(None)
        self._thread.join()


def stream_merge(
    items: Sequence[OutputKey],
    states: Sequence[Mapping[str, torch.Tensor]],
    sink: Callable[[str, torch.Tensor], None],
    *,
    out_dtype: torch.dtype | None = None,
    prepare: Prepare | None = None,
    prefetch: int = 2,
    prefetch_bytes: int = 256 << 20,
    threads: bool = True,
    progress: bool = False,
) -> StreamStats:
    """Merge ``items`` one key at a time and pass each result to ``sink(key, tensor)``.

    Args:
        items: the output keys and how to make each (:class:`OutputKey`), in write order.
        states: the input state dicts, lazy or not (``Source.model`` indexes this list; the
            base is one of them). Never modified.
        sink: receives each merged tensor (``out_dtype``, or the first input's dtype).
        out_dtype: the output dtype of floating tensors (integer buffers keep theirs).
        prepare: ``prepare(model, key, tensor) -> tensor`` applied to every input as it is
            read (on the reader thread): a dtype cast, a permutation (``align:``).
        prefetch: keys read ahead (0: read on the main thread, no reader thread).
        prefetch_bytes: at most this many bytes of inputs in flight on the reader's side,
            counting the key being merged (the default, 256 MiB, reads small keys ahead and
            never reads a large key while another large one is merged).
        threads: use the reader and writer threads (False: everything in order on the
            caller's thread; the same tensors).
        progress: a progress bar over the keys.

    Returns:
        :class:`StreamStats`. Raises what the method, a read or the sink raised (the
        threads are stopped first); Ctrl-C stops them too.
    """
    stats = StreamStats()
    t_start = time.perf_counter()

    def read(item: OutputKey) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        return _read(item, states, prepare, stats)

    writer = _Writer(sink, stats) if threads else None
    total_bytes = sum(i.nbytes for i in items)
    ok = False
    try:
        with progress_bar(progress, total=total_bytes, desc="merge", unit="B") as bar:
            if hasattr(bar, "unit_scale"):
                bar.unit_scale = True
            stream = _read_ahead(items, read, prefetch if threads else 0, prefetch_bytes)
            for item, (tensors, base) in stream:
                t0 = time.perf_counter()
                out = item.plan.merge_tensor(item.key, tensors, base, t=item.t, params=item.params)
                if out_dtype is not None and out.is_floating_point() and out.dtype != out_dtype:
                    out = out.to(out_dtype)
                dt = time.perf_counter() - t0
                stats.merge_seconds += dt
                stats.per_key[item.key] = dt
                del tensors, base
                if writer is not None:
                    writer.put(item.key, out)
                else:
                    t1 = time.perf_counter()
                    sink(item.key, out)
                    stats.write_seconds += time.perf_counter() - t1
                    stats.bytes_written += out.numel() * out.element_size()
                del out
                stats.keys += 1
                bar.update(item.nbytes)
        if writer is not None:
            writer.close()
        ok = True
    finally:
        if writer is not None and not ok:
            writer.abandon()
    stats.wall_seconds = time.perf_counter() - t_start
    return stats
