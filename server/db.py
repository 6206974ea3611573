"""Runs blocking store calls off the event loop, on a small thread pool (each thread has its own connection)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")
Observer = Callable[[str, float], None]
"""observer(operation, seconds): told how long each store call took."""


class StoreRunner:
    """`await db.call(store.get_job, job_id)`: the store's methods, awaited, each one timed."""

    def __init__(self, threads: int = 4, observe: Observer | None = None):
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="store")
        self._observe = observe

    def _timed(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        began = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            if self._observe is not None:
                self._observe(getattr(fn, "__name__", "call"), time.perf_counter() - began)

    async def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: self._timed(fn, *args, **kwargs))

    def call_blocking(self, fn: Callable[[], T], timeout_s: float = 10.0) -> T:
        """The same from a thread outside the event loop (a metrics scrape): the store's own threads do the work,
        so no other thread opens a connection."""
        return self._executor.submit(self._timed, fn).result(timeout_s)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
