"""Runs blocking store calls off the event loop, on a small thread pool (each thread has its own connection)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class StoreRunner:
    """`await db.call(store.get_job, job_id)`: the store's methods, awaited."""

    def __init__(self, threads: int = 4):
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="store")

    async def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    def close(self) -> None:
        self._executor.shutdown(wait=True)
