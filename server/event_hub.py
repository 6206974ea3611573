"""Wakes the watchers of a job (or sweep) when new events are stored, and keeps each one's newest stored events in
memory so that hundreds of watchers of a busy job do not each read the store for every event.

The store stays the source of truth. Only events already committed are published, and the kept tail is always a
gap-free run of sequences: a publication that does not continue it (two commits published out of order) starts a new
tail, and a watcher whose position the tail does not reach reads the store instead. So no event is lost or doubled
however publications interleave.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from tuneforge.server.records import EventRecord

TAIL_EVENTS = 1000
"""Newest events kept per job or sweep."""
TAIL_KEYS = 2000
"""Jobs and sweeps with a kept tail (least recently published first out)."""


@dataclass
class _Tail:
    events: list[EventRecord] = field(default_factory=list)
    """Consecutive sequences, oldest first (trimmed to TAIL_EVENTS once it holds twice that)."""
    ended_at: int | None = None
    """The last sequence, once the job or sweep has ended (its final events are published with that news)."""

    def after(self, sequence: int) -> list[EventRecord] | None:
        """The kept events after `sequence`; None when the tail does not reach back that far."""
        if not self.events or self.events[0].sequence > sequence + 1:
            return None
        return self.events[max(0, sequence + 1 - self.events[0].sequence) :]

    def add(self, events: Sequence[EventRecord]) -> None:
        if self.events and events[0].sequence <= self.events[-1].sequence:
            return  # older than what is kept (published late): watchers that need it read the store
        if self.events and events[0].sequence != self.events[-1].sequence + 1:
            self.events.clear()  # a gap: start again from these
        self.events.extend(events)
        if len(self.events) > 2 * TAIL_EVENTS:
            del self.events[:-TAIL_EVENTS]


class EventHub:
    """Per-key wake-ups and recent events for WatchJob and WatchSweep streams (one event loop)."""

    def __init__(self, keep_tails: bool = True, recheck_s: float = 30.0) -> None:
        """Replicas sharing a store see only their own publications: they keep no tails (every read goes to the
        store) and recheck often (`recheck_s`), since another replica's events wake nobody here."""
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._tails: OrderedDict[str, _Tail] = OrderedDict()
        self._keep_tails = keep_tails
        self.recheck_s = recheck_s
        self.closing = False

    def close(self) -> None:
        """Shutdown: wakes every watcher so its stream ends now instead of holding up the drain."""
        self.closing = True
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.set()

    def publish(self, key: str, events: Sequence[EventRecord], ended: bool) -> None:
        """Committed events of `key`, and whether it has now ended; wakes its watchers."""
        if events and self._keep_tails:
            tail = self._tails.get(key) or _Tail()
            tail.add(events)
            if ended:
                tail.ended_at = max(tail.ended_at or 0, events[-1].sequence)
            self._tails[key] = tail
            self._tails.move_to_end(key)
            while len(self._tails) > TAIL_KEYS:
                self._tails.popitem(last=False)
        for waiter in self._waiters.get(key, ()):
            waiter.set()

    def forget(self, key: str) -> None:
        """The job or sweep is gone: its watchers ask the store, which says so."""
        self._tails.pop(key, None)
        for waiter in self._waiters.get(key, ()):
            waiter.set()

    def events_after(self, key: str, sequence: int) -> list[EventRecord] | None:
        """Kept events after `sequence` (maybe none yet); None when only the store can answer."""
        tail = self._tails.get(key)
        return tail.after(sequence) if tail is not None else None

    def ended_by(self, key: str, sequence: int) -> bool | None:
        """Whether `key` has ended with no event after `sequence`; None when the hub cannot tell (ask the store)."""
        tail = self._tails.get(key)
        if tail is None:
            return None
        return tail.ended_at is not None and tail.ended_at <= sequence

    @contextlib.contextmanager
    def subscribe(self, key: str) -> Iterator[asyncio.Event]:
        waiter = asyncio.Event()
        self._waiters[key].add(waiter)
        try:
            yield waiter
        finally:
            self._waiters[key].discard(waiter)
            if not self._waiters[key]:
                del self._waiters[key]
