"""Following a job's or a sweep's event stream: the store is the truth, the hub only wakes the reader."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from server.db import StoreRunner
from server.errors import ApiError
from server.event_hub import EventHub
from server.records import EventRecord
from server.store.base import JobStore

WATCH_BATCH = 500
WATCH_RECHECK_S = 30.0
"""A woken watcher reads the store; this only bounds how long a missed wake-up could delay it."""


async def follow_events(
    store: JobStore,
    db: StoreRunner,
    hub: EventHub,
    key: str,
    after_sequence: int,
    finished: Callable[[int], Awaitable[bool]],
) -> AsyncIterator[EventRecord]:
    """Every stored event after after_sequence, then new ones as they are stored, until `finished(last)` says the
    resource ended and nothing newer remains. Ends with UNAVAILABLE when the server shuts down."""
    last = after_sequence
    with hub.subscribe(key) as woken:
        while True:
            woken.clear()  # before reading: a notification during the read wakes the next wait
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
            if await finished(last):
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), WATCH_RECHECK_S)
