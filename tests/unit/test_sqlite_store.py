"""The SQLite store on a real file: idempotency, ordering, atomic changes, gap-free events, durability."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from server.job_changes import cancel, claim, transition
from server.job_states import IllegalTransition, JobState
from server.records import FileRecord, JobChange, JobRecord, NewEvent
from server.store.sqlite import SqliteJobStore


def job(job_id: str, priority: int = 0) -> JobRecord:
    now = time.time()
    return JobRecord(
        id=job_id,
        display_name=job_id,
        spec=b"\x08\x01",
        priority=priority,
        state=JobState.QUEUED,
        create_time=now,
        update_time=now,
    )


def note(text: str) -> NewEvent:
    return NewEvent(kind="log", payload=text.encode())


@pytest.fixture
def store(tmp_path: Path) -> SqliteJobStore:
    opened = SqliteJobStore(tmp_path / "store.db")
    yield opened
    opened.close()


def test_wal_mode_and_integrity(store: SqliteJobStore) -> None:
    assert store._conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.integrity_check() == "ok"


def test_create_job_is_idempotent_by_request_id(store: SqliteJobStore) -> None:
    _first, created = store.create_job(job("a"), [note("q")], "req-1")
    again, created_again = store.create_job(job("b"), [note("q")], "req-1")
    assert created and not created_again
    assert again.id == "a"
    assert store.get_job("b") is None
    assert [r.id for r in store.list_jobs([], 10, None)[0]] == ["a"]


def test_claim_order_is_priority_then_fifo(store: SqliteJobStore) -> None:
    for job_id, priority in [("low", 0), ("high", 5), ("low2", 0), ("high2", 5)]:
        store.create_job(job(job_id, priority), [], None)
    claimed = []
    while (result := store.claim_next_job(claim("w0"))) is not None:
        claimed.append(result[0].id)
        assert result[0].state is JobState.RUNNING and result[0].attempt == 1 and result[0].worker == "w0"
    assert claimed == ["high", "high2", "low", "low2"]


def test_events_are_numbered_without_gaps_across_threads(store: SqliteJobStore) -> None:
    store.create_job(job("a"), [note("created")], None)

    def append(n: int) -> None:
        for i in range(25):
            store.update_job("a", lambda r, i=i: JobChange(r, [note(f"{n}-{i}")]))

    threads = [threading.Thread(target=append, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    events = store.list_events("a", 0, 1000)
    assert [e.sequence for e in events] == list(range(1, 102))
    assert store.get_job("a").last_event_sequence == 101  # type: ignore[union-attr]
    assert [e.sequence for e in store.list_events("a", 99, 10)] == [100, 101]


def test_a_failing_change_leaves_nothing_behind(store: SqliteJobStore) -> None:
    store.create_job(job("a"), [], None)
    store.update_job("a", lambda r: cancel(r))
    with pytest.raises(IllegalTransition):
        store.update_job("a", lambda r: transition(r, JobState.RUNNING))
    record = store.get_job("a")
    assert record is not None and record.state is JobState.CANCELLED
    assert len(store.list_events("a", 0, 100)) == 1


def test_list_pages_newest_first_with_state_filter(store: SqliteJobStore) -> None:
    for i in range(7):
        store.create_job(job(f"j{i}"), [], None)
    store.update_job("j3", cancel)
    seen, cursor = [], None
    while True:
        page, cursor = store.list_jobs([JobState.QUEUED], 2, cursor)
        seen += [r.id for r in page]
        if cursor is None:
            break
    assert seen == ["j6", "j5", "j4", "j2", "j1", "j0"]


def test_everything_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    first = SqliteJobStore(path)
    first.create_file(FileRecord("f1", "train.jsonl", "DATASET", 10, "ab" * 32, 1.0), "req")
    _record, _ = first.create_job(job("a"), [note("one")], None)
    first.update_job("a", lambda r: JobChange(replace(r, step=7, latest_metrics={"loss": 0.5}), [note("two")]))
    first.close()
    second = SqliteJobStore(path)
    assert second.get_file("f1") == FileRecord("f1", "train.jsonl", "DATASET", 10, "ab" * 32, 1.0)
    assert second.file_for_request("req") is not None
    reopened = second.get_job("a")
    assert reopened is not None and reopened.step == 7 and reopened.latest_metrics == {"loss": 0.5}
    assert [e.payload for e in second.list_events("a", 0, 10)] == [b"one", b"two"]
    assert second.integrity_check() == "ok"
    second.close()
