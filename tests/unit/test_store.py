"""The job store, on SQLite (a real file) and on a real PostgreSQL server, with the same tests: idempotency,
ordering, atomic changes, gap-free events, durability; and on PostgreSQL, two processes claiming at once never take
the same job."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tuneforge.server.job_changes import cancel, claim, transition
from tuneforge.server.job_states import IllegalTransition, JobState
from tuneforge.server.records import FileRecord, JobChange, JobRecord, NewEvent
from tuneforge.server.store.base import QuotaExceeded
from tuneforge.server.store.postgres import PostgresJobStore
from tuneforge.server.store.sql import SqlJobStore
from tuneforge.server.store.sqlite import SqliteJobStore


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


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlJobStore]:
    opened: SqlJobStore
    if request.param == "sqlite":
        opened = SqliteJobStore(tmp_path / "store.db")
    else:
        opened = PostgresJobStore(request.getfixturevalue("postgres").new_database())
    yield opened
    opened.close()


def test_wal_mode_and_integrity(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "store.db")
    assert store._conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.integrity_check() == "ok"
    store.close()


def test_create_job_is_idempotent_by_request_id(store: SqlJobStore) -> None:
    _first, created = store.create_job(job("a"), [note("q")], "req-1")
    again, created_again = store.create_job(job("b"), [note("q")], "req-1")
    assert created and not created_again
    assert again.id == "a"
    assert store.get_job("b") is None
    assert [r.id for r in store.list_jobs([], 10, None)[0]] == ["a"]


def test_claim_order_is_priority_then_fifo(store: SqlJobStore) -> None:
    for job_id, priority in [("low", 0), ("high", 5), ("low2", 0), ("high2", 5)]:
        store.create_job(job(job_id, priority), [], None)
    claimed = []
    while (result := store.claim_next_job(claim("w0"))) is not None:
        claimed.append(result[0].id)
        assert result[0].state is JobState.RUNNING and result[0].attempt == 1 and result[0].worker == "w0"
    assert claimed == ["high", "high2", "low", "low2"]


def test_events_are_numbered_without_gaps_across_threads(store: SqlJobStore) -> None:
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


def test_a_failing_change_leaves_nothing_behind(store: SqlJobStore) -> None:
    store.create_job(job("a"), [], None)
    store.update_job("a", lambda r: cancel(r))
    with pytest.raises(IllegalTransition):
        store.update_job("a", lambda r: transition(r, JobState.RUNNING))
    record = store.get_job("a")
    assert record is not None and record.state is JobState.CANCELLED
    assert len(store.list_events("a", 0, 100)) == 1


def test_list_pages_newest_first_with_state_filter(store: SqlJobStore) -> None:
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


def test_tenants_queues_and_counts(store: SqlJobStore) -> None:
    for job_id, tenant, priority in [("a1", "a", 0), ("a2", "a", 5), ("b1", "b", 0), ("b2", "b", 0)]:
        store.create_job(replace(job(job_id, priority), tenant=tenant), [], None)
    store.create_file(FileRecord("fa", "x.jsonl", "DATASET", 100, "ab" * 32, 1.0, "a"), None)
    store.update_job("a1", lambda r: JobChange(replace(r, artifact_size=50)))
    heads = {head.tenant: head.job_id for head in store.queue_heads()}
    assert heads == {"a": "a2", "b": "b1"}
    claimed = store.claim_next_job(claim("w0"), "b")
    assert claimed is not None and claimed[0].id == "b1"
    assert store.active_jobs_by_tenant([JobState.RUNNING]) == {"b": 1}
    assert store.count_jobs("a", [JobState.QUEUED]) == 2
    assert store.count_jobs_by_state() == {JobState.QUEUED: 3, JobState.RUNNING: 1}
    a1, a2 = store.get_job("a1"), store.get_job("a2")
    assert a1 is not None and a2 is not None
    assert (store.queue_position(a2), store.queue_position(a1)) == (1, 2)
    assert store.stored_bytes("a") == 150 and store.stored_bytes("b") == 0
    assert [r.id for r in store.list_jobs([], 10, None, "b")[0]] == ["b2", "b1"]
    assert len(store.list_jobs([], 10, None)[0]) == 4
    assert [f.id for f in store.list_files(10, None, "b")[0]] == []


def test_concurrent_creates_with_one_request_id_make_one_job(store: SqlJobStore) -> None:
    results: list[tuple[str, bool]] = []
    lock = threading.Lock()

    def create(n: int) -> None:
        record, created = store.create_job(job(f"r{n}"), [note("q")], "same-request")
        with lock:
            results.append((record.id, created))

    threads = [threading.Thread(target=create, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({job_id for job_id, _ in results}) == 1 and sum(created for _, created in results) == 1
    assert len(store.list_jobs([], 10, None)[0]) == 1


def _at_once(count: int, action: Any) -> list[Any]:
    """Runs action(n) on `count` threads released together; the results (or the exceptions raised)."""
    results: list[Any] = []
    lock, barrier = threading.Lock(), threading.Barrier(count)

    def run(n: int) -> None:
        barrier.wait(30)
        try:
            result: Any = action(n)
        except Exception as exc:
            result = exc
        with lock:
            results.append(result)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_queued_jobs_quota_holds_under_concurrent_creates(store: SqlJobStore) -> None:
    tenant_job = lambda n: replace(job(f"q{n}"), tenant="team-q")  # noqa: E731
    store.create_job(replace(job("other"), tenant="team-free"), [], None, max_queued=1)  # another tenant's queue
    results = _at_once(8, lambda n: store.create_job(tenant_job(n), [note("q")], None, max_queued=1))
    refused = [r for r in results if isinstance(r, QuotaExceeded)]
    assert len(refused) == 7 and {(r.quota, r.used, r.limit) for r in refused} == {("max_queued_jobs", 1, 1)}
    assert store.count_jobs("team-q", [JobState.QUEUED]) == 1
    assert store.count_jobs("team-free", [JobState.QUEUED]) == 1


def test_stored_bytes_quota_holds_under_concurrent_creates(store: SqlJobStore) -> None:
    def upload(n: int) -> FileRecord:
        record = FileRecord(f"f{n}", "x.jsonl", "DATASET", 4_000_000, "0" * 64, time.time(), "team-q")
        return store.create_file(record, None, max_stored_bytes=10_000_000)

    results = _at_once(6, upload)
    assert sum(isinstance(r, QuotaExceeded) for r in results) == 4
    assert store.stored_bytes("team-q") == 8_000_000


def _claim_all(dsn: str, worker: str, ready: Any, start: Any, out: Any) -> None:
    """One replica's scheduler: claims until nothing is left (in its own process, with its own connection)."""
    replica = PostgresJobStore(dsn)
    ready.put(worker)
    start.wait(60)
    claimed = []
    while (result := replica.claim_next_job(claim(worker))) is not None:
        claimed.append(result[0].id)
    replica.close()
    out.put((worker, claimed))


def test_two_replicas_claiming_at_once_never_take_the_same_job(postgres: Any) -> None:
    dsn = postgres.new_database()
    store = PostgresJobStore(dsn)
    store.import_jobs(job(f"j{i:03d}") for i in range(300))
    context = multiprocessing.get_context("spawn")
    ready, start, out = context.Queue(), context.Event(), context.Queue()
    replicas = [context.Process(target=_claim_all, args=(dsn, f"replica-{n}", ready, start, out)) for n in range(2)]
    for process in replicas:
        process.start()
    for _ in replicas:
        ready.get(timeout=60)  # both connected: they start claiming together
    start.set()
    claims = dict(out.get(timeout=120) for _ in replicas)
    for process in replicas:
        process.join(30)
    first, second = claims["replica-0"], claims["replica-1"]
    assert not set(first) & set(second), "a job was claimed twice"
    assert sorted(first + second) == [f"j{i:03d}" for i in range(300)]
    assert first and second, "one replica took everything: the claims did not run concurrently"
    running = store.jobs_in_states([JobState.RUNNING])
    assert len(running) == 300 and {r.attempt for r in running} == {1}
    store.close()


def test_postgresql_announces_committed_events_to_every_listener(postgres: Any) -> None:
    """What wakes one replica's watchers when another replica stores a job's events (LISTEN/NOTIFY on commit)."""
    dsn = postgres.new_database()
    listener, writer = PostgresJobStore(dsn), PostgresJobStore(dsn)
    heard: list[str] = []
    got = threading.Event()
    stop, ready = threading.Event(), threading.Event()

    def on_change(key: str) -> None:
        heard.append(key)
        got.set()

    thread = threading.Thread(target=listener.listen, args=(on_change, stop, ready))
    thread.start()
    try:
        assert ready.wait(30)
        writer.create_job(job("quiet"), [], None)  # no events: nothing to announce
        writer.create_job(job("a"), [note("created")], None)
        assert got.wait(30)
        assert heard == ["a"]
        got.clear()
        with pytest.raises(IllegalTransition):  # a change that fails commits nothing, so announces nothing
            writer.update_job("a", lambda r: transition(r, JobState.SUCCEEDED, [note("never")]))
        writer.update_job("a", lambda r: JobChange(r, [note("one"), note("two")]))
        assert got.wait(30) and heard == ["a", "a"]
    finally:
        stop.set()
        thread.join(10)
        listener.close()
        writer.close()
