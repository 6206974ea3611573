"""Following a job's or a sweep's event stream: the store is the truth, the hub only wakes the reader."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from enum import StrEnum
from typing import Any, Protocol

import grpc

from tuneforge.server.db import StoreRunner
from tuneforge.server.errors import ApiError, FieldViolation, invalid_argument
from tuneforge.server.event_hub import EventHub
from tuneforge.server.records import EventRecord
from tuneforge.server.store.base import JobStore

WATCH_BATCH = 500


class Streamed(Protocol):
    """A job or a sweep: what following its events needs to know about it."""

    @property
    def state(self) -> StrEnum: ...

    @property
    def last_event_sequence(self) -> int: ...


async def follow_events(
    store: JobStore,
    db: StoreRunner,
    hub: EventHub,
    key: str,
    after_sequence: int,
    current: Callable[[str], Streamed | None],
    terminal: frozenset[Any],
) -> AsyncIterator[EventRecord]:
    """Every stored event after after_sequence, then new ones as they are stored, until the resource (read with the
    store's `current`) is in a terminal state and nothing newer remains. INVALID_ARGUMENT for a negative
    after_sequence; ends with UNAVAILABLE when the server shuts down."""
    if after_sequence < 0:
        raise invalid_argument([FieldViolation("after_sequence", "must not be negative")])
    last = after_sequence
    timed_out = False
    with hub.subscribe(key) as woken:
        while True:
            woken.clear()  # before reading: a notification during the read wakes the next wait
            events = hub.events_after(key, last)
            if events is None:  # the hub's recent events do not reach back to `last`
                events = await db.call(store.list_events, key, last, WATCH_BATCH)
            for event in events:
                yield event
                last = event.sequence
            if events:
                continue
            if hub.closing:
                raise ApiError(
                    grpc.StatusCode.UNAVAILABLE,
                    "SERVER_SHUTTING_DOWN",
                    "the server is restarting; watch again from the last sequence you saw",
                )
            ended = None if timed_out else hub.ended_by(key, last)
            if ended is None:
                resource = await db.call(current, key)
                ended = resource is None or (resource.state in terminal and resource.last_event_sequence <= last)
            if ended:
                return
            try:
                await asyncio.wait_for(woken.wait(), hub.recheck_s)  # bounds a missed (or remote) wake-up
                timed_out = False
            except TimeoutError:
                timed_out = True  # the store, not memory, decides whether it ended
