"""Wakes the watchers of a job when new events are stored. The store stays the source of truth: a watcher woken
reads the store from its last sequence, so no event is lost or doubled however notifications interleave."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Iterator


class EventHub:
    """Per-job wake-ups for WatchJob streams (one event loop)."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)
        self.closing = False

    def close(self) -> None:
        """Shutdown: wakes every watcher so its stream ends now instead of holding up the drain."""
        self.closing = True
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.set()

    def notify(self, job_id: str) -> None:
        for waiter in self._waiters.get(job_id, ()):
            waiter.set()

    @contextlib.contextmanager
    def subscribe(self, job_id: str) -> Iterator[asyncio.Event]:
        waiter = asyncio.Event()
        self._waiters[job_id].add(waiter)
        try:
            yield waiter
        finally:
            self._waiters[job_id].discard(waiter)
            if not self._waiters[job_id]:
                del self._waiters[job_id]
