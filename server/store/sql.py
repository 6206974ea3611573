"""The job store in SQL, once for every database: SQLite and PostgreSQL differ only in connections, transactions,
locking and a few expressions, which their subclasses give.

Every mutation runs in one transaction that first locks the row it changes (`FOR UPDATE` where the database has
row locks; SQLite's BEGIN IMMEDIATE locks the whole file), so a job's events are numbered without gaps and two
servers sharing one database never claim the same job (`FOR UPDATE SKIP LOCKED`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Any, Protocol, TypeVar

from tuneforge.server.job_states import JobState
from tuneforge.server.records import EventRecord, FileRecord, JobRecord, NewEvent
from tuneforge.server.store.base import ChangeFn, QueueHead, QuotaExceeded, SweepChangeFn
from tuneforge.server.store.rows import (
    Row,
    cursor_of,
    event_from_row,
    file_from_row,
    job_body,
    job_from_row,
    owned,
    sweep_body,
    sweep_from_row,
)
from tuneforge.server.sweep_records import SweepRecord, SweepState

Sequenced = TypeVar("Sequenced", JobRecord, SweepRecord)


class Session(Protocol):
    """Statements on one connection (in a transaction when from `_writing`). Queries use `?` placeholders."""

    def one(self, query: str, params: Sequence[Any] = ()) -> Row | None: ...

    def all(self, query: str, params: Sequence[Any] = ()) -> list[Row]: ...

    def run(self, query: str, params: Sequence[Any] = ()) -> int:
        """Returns the number of rows changed."""

    def many(self, query: str, rows: Iterable[Sequence[Any]]) -> int: ...


class SqlJobStore:
    """Every JobStore method, on the primitives a subclass provides."""

    FOR_UPDATE = ""
    """Appended to a SELECT whose row the transaction will change."""
    SKIP_LOCKED = ""
    """Appended to the claim's SELECT, so concurrent claimers take different jobs."""

    def _reading(self) -> Session:
        raise NotImplementedError

    def _writing(self) -> AbstractContextManager[Session]:
        raise NotImplementedError

    def _json_number(self, key: str) -> str:
        """SQL for a number in the JSON `body` column (NULL when missing)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    @property
    def _ready(self) -> str:
        """A queued job whose restart back-off has passed (parameters: state, now)."""
        return f"state = ? AND COALESCE({self._json_number('not_before')}, 0) <= ?"

    # ------------------------------------------------------------ files

    def create_file(
        self, record: FileRecord, request_id: str | None, max_stored_bytes: int | None = None
    ) -> FileRecord:
        with self._writing() as db:
            if request_id:
                row = db.one("SELECT * FROM files WHERE request_id = ?", (request_id,))
                if row is not None:
                    return file_from_row(row)
            if max_stored_bytes is not None:
                self._lock_tenant(db, record.tenant)
                stored = self._stored_bytes(db, record.tenant)
                if stored + record.size_bytes > max_stored_bytes:
                    raise QuotaExceeded("max_stored_bytes", stored, max_stored_bytes)
            inserted = db.run(
                "INSERT INTO files (id, filename, purpose, size_bytes, sha256, create_time, request_id, tenant) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (request_id) DO NOTHING",
                (
                    record.id,
                    record.filename,
                    record.purpose,
                    record.size_bytes,
                    record.sha256,
                    record.create_time,
                    request_id or None,
                    record.tenant,
                ),
            )
            if not inserted:  # a concurrent create with the same request_id committed first
                row = db.one("SELECT * FROM files WHERE request_id = ?", (request_id,))
                assert row is not None
                return file_from_row(row)
        return record

    def file_for_request(self, request_id: str) -> FileRecord | None:
        row = self._reading().one("SELECT * FROM files WHERE request_id = ?", (request_id,))
        return file_from_row(row) if row else None

    def get_file(self, file_id: str) -> FileRecord | None:
        row = self._reading().one("SELECT * FROM files WHERE id = ?", (file_id,))
        return file_from_row(row) if row else None

    def list_files(
        self, limit: int, before_order: int | None, tenant: str | None = None
    ) -> tuple[list[FileRecord], int | None]:
        query, params = owned("SELECT * FROM files WHERE ord < ?", [cursor_of(before_order)], tenant)
        rows = self._reading().all(query + " ORDER BY ord DESC LIMIT ?", (*params, limit + 1))
        page = rows[:limit]
        return [file_from_row(r) for r in page], (page[-1]["ord"] if len(rows) > limit else None)

    def delete_file(self, file_id: str) -> bool:
        with self._writing() as db:
            return db.run("DELETE FROM files WHERE id = ?", (file_id,)) > 0

    # ------------------------------------------------------------ jobs

    def create_job(
        self, record: JobRecord, events: Sequence[NewEvent], request_id: str | None, max_queued: int | None = None
    ) -> tuple[JobRecord, bool]:
        with self._writing() as db:
            if request_id:
                row = db.one("SELECT * FROM jobs WHERE request_id = ?", (request_id,))
                if row is not None:
                    return job_from_row(row), False
            if max_queued is not None:
                self._lock_tenant(db, record.tenant)
                queued = self._count(db, record.tenant, [JobState.QUEUED])
                if queued + 1 > max_queued:
                    raise QuotaExceeded("max_queued_jobs", queued, max_queued)
            inserted = db.one(
                "INSERT INTO jobs (id, state, priority, request_id, body, spec, tenant) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (request_id) DO NOTHING RETURNING ord",
                (
                    record.id,
                    record.state.value,
                    record.priority,
                    request_id or None,
                    job_body(record),
                    record.spec,
                    record.tenant,
                ),
            )
            if inserted is None:  # a concurrent create with the same request_id committed first
                row = db.one("SELECT * FROM jobs WHERE request_id = ?", (request_id,))
                assert row is not None
                return job_from_row(row), False
            record = replace(record, order=int(inserted["ord"]))
            record, _ = self._append(db, record, events)
            self._save(db, record)
        return record, True

    def import_jobs(self, records: Iterable[JobRecord]) -> int:
        """Writes job records (without events) in one transaction: migrations, restores and load benchmarks.
        Returns how many were written."""
        rows = ((r.id, r.state.value, r.priority, job_body(r), r.spec, r.tenant) for r in records)
        with self._writing() as db:
            return db.many("INSERT INTO jobs (id, state, priority, body, spec, tenant) VALUES (?, ?, ?, ?, ?, ?)", rows)

    def get_job(self, job_id: str) -> JobRecord | None:
        row = self._reading().one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return job_from_row(row) if row else None

    def list_jobs(
        self, states: Sequence[JobState], limit: int, before_order: int | None, tenant: str | None = None
    ) -> tuple[list[JobRecord], int | None]:
        query, params = owned("SELECT * FROM jobs WHERE ord < ?", [cursor_of(before_order)], tenant)
        if states:
            query += f" AND state IN ({','.join('?' * len(states))})"
            params += [s.value for s in states]
        rows = self._reading().all(query + " ORDER BY ord DESC LIMIT ?", (*params, limit + 1))
        page = rows[:limit]
        return [job_from_row(r) for r in page], (page[-1]["ord"] if len(rows) > limit else None)

    def jobs_in_states(self, states: Sequence[JobState]) -> list[JobRecord]:
        marks = ",".join("?" * len(states))
        rows = self._reading().all(
            f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY ord", [s.value for s in states]
        )
        return [job_from_row(r) for r in rows]

    def count_jobs_by_state(self) -> dict[JobState, int]:
        rows = self._reading().all("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        return {JobState(row["state"]): int(row["n"]) for row in rows}

    def update_job(self, job_id: str, change: ChangeFn) -> tuple[JobRecord, list[EventRecord]] | None:
        with self._writing() as db:
            row = db.one(f"SELECT * FROM jobs WHERE id = ?{self.FOR_UPDATE}", (job_id,))
            return self._apply(db, job_from_row(row), change) if row else None

    def claim_next_job(self, change: ChangeFn, tenant: str | None = None) -> tuple[JobRecord, list[EventRecord]] | None:
        query, params = owned(f"SELECT * FROM jobs WHERE {self._ready}", [JobState.QUEUED.value, time.time()], tenant)
        with self._writing() as db:
            row = db.one(query + f" ORDER BY priority DESC, ord LIMIT 1{self.SKIP_LOCKED}", params)
            return self._apply(db, job_from_row(row), change) if row else None

    def queue_heads(self) -> list[QueueHead]:
        """Each tenant's next claimable job (highest priority, then oldest), for fair-share placement."""
        rows = self._reading().all(
            "SELECT tenant, priority, ord, id FROM (SELECT tenant, priority, ord, id, ROW_NUMBER() OVER "
            f"(PARTITION BY tenant ORDER BY priority DESC, ord) AS position FROM jobs WHERE {self._ready}) AS heads "
            "WHERE position = 1",
            (JobState.QUEUED.value, time.time()),
        )
        return [QueueHead(row["tenant"], row["priority"], row["ord"], row["id"]) for row in rows]

    def count_jobs(self, tenant: str, states: Sequence[JobState]) -> int:
        return self._count(self._reading(), tenant, states)

    @staticmethod
    def _count(db: Session, tenant: str, states: Sequence[JobState]) -> int:
        marks = ",".join("?" * len(states))
        row = db.one(
            f"SELECT COUNT(*) AS n FROM jobs WHERE tenant = ? AND state IN ({marks})",
            (tenant, *[s.value for s in states]),
        )
        return int(row["n"]) if row else 0

    def active_jobs_by_tenant(self, states: Sequence[JobState]) -> dict[str, int]:
        marks = ",".join("?" * len(states))
        rows = self._reading().all(
            f"SELECT tenant, COUNT(*) AS n FROM jobs WHERE state IN ({marks}) GROUP BY tenant",
            [s.value for s in states],
        )
        return {row["tenant"]: int(row["n"]) for row in rows}

    def queue_position(self, record: JobRecord) -> int:
        """How many of its tenant's queued jobs come before this one, plus one."""
        row = self._reading().one(
            "SELECT COUNT(*) AS n FROM jobs WHERE tenant = ? AND state = ?"
            " AND (priority > ? OR (priority = ? AND ord < ?))",
            (record.tenant, JobState.QUEUED.value, record.priority, record.priority, record.order),
        )
        return (int(row["n"]) if row else 0) + 1

    def stored_bytes(self, tenant: str) -> int:
        """The tenant's uploaded files and artifacts."""
        return self._stored_bytes(self._reading(), tenant)

    def _stored_bytes(self, session: Session, tenant: str) -> int:
        files = session.one("SELECT COALESCE(SUM(size_bytes), 0) AS n FROM files WHERE tenant = ?", (tenant,))
        artifacts = session.one(
            f"SELECT COALESCE(SUM({self._json_number('artifact_size')}), 0) AS n FROM jobs WHERE tenant = ?", (tenant,)
        )
        return sum(int(row["n"]) for row in (files, artifacts) if row)

    def delete_job(self, job_id: str) -> bool:
        with self._writing() as db:
            db.run("DELETE FROM events WHERE job_id = ?", (job_id,))
            return db.run("DELETE FROM jobs WHERE id = ?", (job_id,)) > 0

    def _apply(self, db: Session, current: JobRecord, change: ChangeFn) -> tuple[JobRecord, list[EventRecord]]:
        result = change(current)
        if result is None:
            return current, []
        record = replace(result.record, update_time=time.time())
        record, stored = self._append(db, record, result.events)
        self._save(db, record)
        return record, stored

    @staticmethod
    def _save(db: Session, record: JobRecord) -> None:
        db.run(
            "UPDATE jobs SET state = ?, priority = ?, body = ? WHERE id = ?",
            (record.state.value, record.priority, job_body(record), record.id),
        )

    def _lock_tenant(self, db: Session, tenant: str) -> None:
        """Serialises a tenant's quota-checked creates until the transaction ends (SQLite's write lock already
        does: a no-op by default)."""

    def _announce(self, db: Session, key: str) -> None:
        """Tells other servers sharing the database that `key` has new events (on commit); a no-op by default."""

    def _append(
        self, db: Session, record: Sequenced, events: Sequence[NewEvent]
    ) -> tuple[Sequenced, list[EventRecord]]:
        """Numbers the events after the job's or sweep's last one (gap-free: same transaction as its row)."""
        stored = []
        sequence = record.last_event_sequence
        now = time.time()
        for event in events:
            sequence += 1
            db.run(
                "INSERT INTO events (job_id, sequence, time, attempt, kind, payload) VALUES (?, ?, ?, ?, ?, ?)",
                (record.id, sequence, now, event.attempt, event.kind, event.payload),
            )
            stored.append(EventRecord(record.id, sequence, now, event.attempt, event.kind, event.payload))
        if stored:
            self._announce(db, record.id)
        return replace(record, last_event_sequence=sequence), stored

    # ------------------------------------------------------------ sweeps

    def create_sweep(
        self, record: SweepRecord, events: Sequence[NewEvent], request_id: str | None
    ) -> tuple[SweepRecord, bool]:
        with self._writing() as db:
            if request_id:
                row = db.one("SELECT * FROM sweeps WHERE request_id = ?", (request_id,))
                if row is not None:
                    return sweep_from_row(row), False
            inserted = db.one(
                "INSERT INTO sweeps (id, state, request_id, body, spec, tenant) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (request_id) DO NOTHING RETURNING ord",
                (record.id, record.state.value, request_id or None, sweep_body(record), record.spec, record.tenant),
            )
            if inserted is None:  # a concurrent create with the same request_id committed first
                row = db.one("SELECT * FROM sweeps WHERE request_id = ?", (request_id,))
                assert row is not None
                return sweep_from_row(row), False
            record = replace(record, order=int(inserted["ord"]))
            record, _ = self._append(db, record, events)
            self._save_sweep(db, record)
        return record, True

    def get_sweep(self, sweep_id: str) -> SweepRecord | None:
        row = self._reading().one("SELECT * FROM sweeps WHERE id = ?", (sweep_id,))
        return sweep_from_row(row) if row else None

    def list_sweeps(
        self, limit: int, before_order: int | None, tenant: str | None = None
    ) -> tuple[list[SweepRecord], int | None]:
        query, params = owned("SELECT * FROM sweeps WHERE ord < ?", [cursor_of(before_order)], tenant)
        rows = self._reading().all(query + " ORDER BY ord DESC LIMIT ?", (*params, limit + 1))
        page = rows[:limit]
        return [sweep_from_row(r) for r in page], (page[-1]["ord"] if len(rows) > limit else None)

    def sweeps_in_states(self, states: Sequence[SweepState]) -> list[SweepRecord]:
        marks = ",".join("?" * len(states))
        rows = self._reading().all(
            f"SELECT * FROM sweeps WHERE state IN ({marks}) ORDER BY ord", [s.value for s in states]
        )
        return [sweep_from_row(r) for r in rows]

    def update_sweep(self, sweep_id: str, change: SweepChangeFn) -> tuple[SweepRecord, list[EventRecord]] | None:
        with self._writing() as db:
            row = db.one(f"SELECT * FROM sweeps WHERE id = ?{self.FOR_UPDATE}", (sweep_id,))
            if row is None:
                return None
            current = sweep_from_row(row)
            result = change(current)
            if result is None:
                return current, []
            updated, events = result
            record, stored = self._append(db, replace(updated, update_time=time.time()), events)
            self._save_sweep(db, record)
            return record, stored

    @staticmethod
    def _save_sweep(db: Session, record: SweepRecord) -> None:
        db.run(
            "UPDATE sweeps SET state = ?, body = ? WHERE id = ?", (record.state.value, sweep_body(record), record.id)
        )

    # ------------------------------------------------------------ events

    def list_events(self, job_id: str, after_sequence: int, limit: int) -> list[EventRecord]:
        rows = self._reading().all(
            "SELECT * FROM events WHERE job_id = ? AND sequence > ? ORDER BY sequence LIMIT ?",
            (job_id, after_sequence, limit),
        )
        return [event_from_row(r) for r in rows]
