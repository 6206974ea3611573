"""Watch streams over a real SQLite store with the hub's recent events: every event exactly once and in order, however
publications interleave; the store is read only when memory cannot answer; ended jobs end their streams."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from tests.unit.test_store import job, note
from tuneforge.server.db import StoreRunner
from tuneforge.server.event_hub import TAIL_EVENTS, EventHub
from tuneforge.server.job_states import TERMINAL, JobState
from tuneforge.server.records import EventRecord, JobChange, JobRecord
from tuneforge.server.servicers.streams import follow_events
from tuneforge.server.store.sqlite import SqliteJobStore


class CountingStore(SqliteJobStore):
    """The real store, counting how often watchers read events from it."""

    event_reads = 0
    state_reads = 0

    def get_job(self, job_id: str) -> JobRecord | None:
        self.state_reads += 1
        return super().get_job(job_id)

    def list_events(self, job_id: str, after_sequence: int, limit: int) -> list[EventRecord]:
        self.event_reads += 1
        return super().list_events(job_id, after_sequence, limit)


@pytest.fixture
def store(tmp_path: Path) -> CountingStore:
    opened = CountingStore(tmp_path / "store.db")
    yield opened
    opened.close()


def append(
    store: SqliteJobStore, job_id: str, count: int, state: JobState = JobState.RUNNING
) -> tuple[JobRecord, list[EventRecord]]:
    """`count` events committed in one change that also sets the state."""
    result = store.update_job(
        job_id, lambda r: JobChange(replace(r, state=state), [note(f"n{i}") for i in range(count)])
    )
    assert result is not None
    return result


async def watch(store: SqliteJobStore, db: StoreRunner, hub: EventHub, job_id: str) -> list[int]:
    return [e.sequence async for e in follow_events(store, db, hub, job_id, 0, store.get_job, TERMINAL)]


def test_the_tail_is_gap_free_and_knows_what_it_cannot_answer(store: CountingStore) -> None:
    store.create_job(job("j"), [note("created")], None)
    hub = EventHub()
    assert hub.events_after("j", 0) is None and hub.ended_by("j", 0) is None
    _, first = append(store, "j", 3)  # sequences 2-4
    _, second = append(store, "j", 2)  # 5-6
    _, third = append(store, "j", 1, JobState.SUCCEEDED)  # 7, terminal
    hub.publish("j", second, ended=False)  # out of order: the later commit is published first
    hub.publish("j", first, ended=False)  # older than the tail: ignored
    assert hub.events_after("j", 4) is not None and hub.events_after("j", 3) is None
    assert [e.sequence for e in hub.events_after("j", 4) or []] == [5, 6]
    hub.publish("j", third, ended=True)
    assert [e.sequence for e in hub.events_after("j", 5) or []] == [6, 7]
    assert hub.ended_by("j", 6) is False and hub.ended_by("j", 7) is True
    hub.forget("j")
    assert hub.events_after("j", 6) is None


def test_the_tail_keeps_the_newest_events(store: CountingStore) -> None:
    store.create_job(job("j"), [note("created")], None)
    hub = EventHub()
    for _ in range(5):
        record, events = append(store, "j", TAIL_EVENTS)
        hub.publish("j", events, ended=False)
    assert hub.events_after("j", record.last_event_sequence - TAIL_EVENTS) is not None
    assert hub.events_after("j", 1) is None, "the oldest were let go; the store answers for them"


def test_watchers_get_every_event_once_in_order_and_read_the_store_little(store: CountingStore) -> None:
    asyncio.run(watch_while_publishing_out_of_order(store))


async def until(condition: Callable[[], bool], timeout_s: float = 10) -> None:
    """Waits for a condition on the store's counters, with a deadline."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def watch_while_publishing_out_of_order(store: CountingStore) -> None:
    store.create_job(job("j"), [note("created")], None)
    hub, db = EventHub(), StoreRunner()
    watchers = [asyncio.ensure_future(watch(store, db, hub, "j")) for _ in range(50)]
    await until(lambda: store.state_reads == 50)  # each read the store, found the job running, and waits
    assert store.event_reads == 100  # the created event, then nothing more
    batches = []
    for i in range(40):
        record, events = await db.call(append, store, "j", 2, JobState.SUCCEEDED if i == 39 else JobState.RUNNING)
        batches.append((events, record.state in TERMINAL))
    # published in a shuffled order, as concurrent commits can be
    for index in [1, 0, 3, 2, *range(4, 40)]:
        hub.publish("j", *batches[index])
    results = await asyncio.wait_for(asyncio.gather(*watchers), 30)
    assert all(result == list(range(1, 82)) for result in results)
    # woken once: the kept tail starts after the hole the late publications left, so each read the store once for
    # sequences 2-81 and learnt from the hub that the job had ended (not once per publication, 40)
    assert (store.event_reads, store.state_reads) == (150, 50)
    late = await asyncio.wait_for(watch(store, db, hub, "j"), 10)
    assert late == list(range(1, 82))
    db.close()
