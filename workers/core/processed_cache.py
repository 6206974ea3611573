"""Media decoded once and off the training loop's critical path: when nothing random happens to an example
(no augmentation, no random crop), its processed tensors are the same every epoch, so they are kept in memory (up
to a budget per data set) and made ahead of training, on parallel threads when examples are slow enough to decode
for threads to pay (decoding and resampling release the GIL; the processors' Python code does not).
Images and audio clips share it."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

PROCESSED_CACHE_BYTES = 1 << 30
"""Processed inputs kept per data set."""
PROBE_EXAMPLES = 16
THREADED_FROM_S = 0.004
"""Seconds an example must take (over the first PROBE_EXAMPLES) for the rest to be processed on threads."""

Processed = dict[str, torch.Tensor]


class ProcessedCache:
    """Processed examples by index, within a byte budget."""

    def __init__(self, budget_bytes: int | None = None):
        self.budget_bytes = PROCESSED_CACHE_BYTES if budget_bytes is None else budget_bytes
        self.items: dict[int, Processed] = {}
        self.nbytes = 0

    def get(self, index: int) -> Processed | None:
        return self.items.get(index)

    def get_or_process(self, index: int, process: Callable[[int], Processed], keep: Callable[[], bool]) -> Processed:
        """The kept example, or a newly processed one, kept when `keep()` says so once it is made (processing can
        show that the example varies, as a clip needing a random crop does)."""
        item = self.items.get(index)
        if item is None:
            item = process(index)
            if keep():
                self.keep(index, item)
        return item

    def keep(self, index: int, item: Processed) -> bool:
        """Keeps an example's tensors unless the budget is spent; returns whether they were kept."""
        size = sum(value.element_size() * value.nelement() for value in item.values())
        if self.nbytes + size > self.budget_bytes:
            return False
        self.items[index] = item
        self.nbytes += size
        return True

    def clear(self) -> None:
        self.items.clear()
        self.nbytes = 0

    def fill(
        self, count: int, process: Callable[[int], Processed], threads: int, keep_going: Callable[[], bool]
    ) -> int:
        """Processes examples 0..count-1, keeping each, until the budget is spent or `keep_going()` turns false (an
        example turned out to vary). Returns how many were kept. The first examples run on this thread; the rest
        go to `threads` threads only when an example takes long enough (THREADED_FROM_S) for threads to pay: small
        files decode faster one after another than through a pool (measured in bench/media_decoding.py)."""
        kept, started = 0, time.perf_counter()
        for index in range(count):
            slow = index == PROBE_EXAMPLES and (time.perf_counter() - started) / index >= THREADED_FROM_S
            if slow and threads > 1:
                return kept + self._fill_on_threads(range(index, count), process, threads, keep_going)
            if not keep_going() or not self.keep(index, process(index)):
                return kept
            kept += 1
        return kept

    def _fill_on_threads(
        self, indices: range, process: Callable[[int], Processed], threads: int, keep_going: Callable[[], bool]
    ) -> int:
        kept, chunk = 0, threads * 8
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode") as pool:
            for start in range(indices.start, indices.stop, chunk):
                batch = [i for i in range(start, min(start + chunk, indices.stop)) if i not in self.items]
                for index, item in zip(batch, pool.map(process, batch), strict=True):
                    if not keep_going() or not self.keep(index, item):
                        return kept
                    kept += 1
        return kept
