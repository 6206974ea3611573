"""The SQLite job store: WAL, a busy timeout, BEGIN IMMEDIATE for every write, one connection per thread."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from server.job_states import JobState
from server.records import EventRecord, FileRecord, JobRecord, NewEvent
from server.store.base import ChangeFn, QueueHead, SweepChangeFn
from server.sweep_records import SweepRecord, SweepState, TrialRecord, TrialState

Sequenced = TypeVar("Sequenced", JobRecord, SweepRecord)

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    ord INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    create_time REAL NOT NULL,
    request_id TEXT UNIQUE,
    tenant TEXT NOT NULL DEFAULT 'default'
);
CREATE TABLE IF NOT EXISTS jobs (
    ord INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    priority INTEGER NOT NULL,
    request_id TEXT UNIQUE,
    body TEXT NOT NULL,
    spec BLOB NOT NULL,
    tenant TEXT NOT NULL DEFAULT 'default'
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (state, priority DESC, ord);
CREATE TABLE IF NOT EXISTS sweeps (
    ord INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    request_id TEXT UNIQUE,
    body TEXT NOT NULL,
    spec BLOB NOT NULL,
    tenant TEXT NOT NULL DEFAULT 'default'
);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    time REAL NOT NULL,
    attempt INTEGER NOT NULL,
    kind TEXT NOT NULL,
    payload BLOB NOT NULL,
    PRIMARY KEY (job_id, sequence)
) WITHOUT ROWID;
"""

# Stores made before tenants existed gain the column; their data belongs to the default tenant.
MIGRATIONS = [
    ("files", "tenant", "ALTER TABLE files ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default'"),
    ("jobs", "tenant", "ALTER TABLE jobs ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default'"),
    ("sweeps", "tenant", "ALTER TABLE sweeps ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default'"),
]
INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_tenant_queue ON jobs (tenant, state, priority DESC, ord);
CREATE INDEX IF NOT EXISTS files_tenant ON files (tenant, ord);
CREATE INDEX IF NOT EXISTS sweeps_tenant ON sweeps (tenant, ord);
"""

# Job columns queried directly; everything else of a JobRecord lives in the JSON `body`.
_COLUMNS = {"id", "state", "priority", "spec", "order", "tenant"}


def _job_body(record: JobRecord) -> str:
    return json.dumps({k: v for k, v in asdict(record).items() if k not in _COLUMNS})


def _job_from_row(row: sqlite3.Row) -> JobRecord:
    body: dict[str, Any] = json.loads(row["body"])
    known = {f.name for f in fields(JobRecord)}
    return JobRecord(
        id=row["id"],
        state=JobState(row["state"]),
        priority=row["priority"],
        spec=bytes(row["spec"]),
        order=row["ord"],
        tenant=row["tenant"],
        **{k: v for k, v in body.items() if k in known},
    )


def _file_from_row(row: sqlite3.Row) -> FileRecord:
    return FileRecord(
        row["id"], row["filename"], row["purpose"], row["size_bytes"], row["sha256"], row["create_time"], row["tenant"]
    )


def _event_from_row(row: sqlite3.Row) -> EventRecord:
    return EventRecord(row["job_id"], row["sequence"], row["time"], row["attempt"], row["kind"], bytes(row["payload"]))


_SWEEP_COLUMNS = {"id", "state", "spec", "order", "tenant"}


def _sweep_body(record: SweepRecord) -> str:
    return json.dumps({k: v for k, v in asdict(record).items() if k not in _SWEEP_COLUMNS})


def _sweep_from_row(row: sqlite3.Row) -> SweepRecord:
    body: dict[str, Any] = json.loads(row["body"])
    trials = [
        TrialRecord(**{**t, "state": TrialState(t["state"]), "reports": [(int(i), float(v)) for i, v in t["reports"]]})
        for t in body.pop("trials", [])
    ]
    known = {f.name for f in fields(SweepRecord)}
    return SweepRecord(
        id=row["id"],
        state=SweepState(row["state"]),
        spec=bytes(row["spec"]),
        order=row["ord"],
        tenant=row["tenant"],
        trials=trials,
        **{k: v for k, v in body.items() if k in known},
    )


BUSY_WAIT_S = 0.05
"""How long SQLite itself waits for a lock before the store counts a busy retry and asks again."""


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    return (exc.sqlite_errorcode & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)  # extended codes too


_READY = "state = ? AND COALESCE(json_extract(body, '$.not_before'), 0) <= ?"
"""A queued job whose restart back-off has passed."""


def _cursor(before_order: int | None) -> int:
    return before_order if before_order is not None else 2**62


def _owned(query: str, params: list[Any], tenant: str | None) -> tuple[str, list[Any]]:
    """Adds `AND tenant = ?` unless tenant is None (an admin's view of every tenant)."""
    if tenant is None:
        return query, params
    return query + " AND tenant = ?", [*params, tenant]


class SqliteJobStore:
    """JobStore on one SQLite file. Safe to call from many threads of one process."""

    def __init__(self, path: Path, busy_timeout_s: float = 10.0, on_busy_retry: Callable[[], None] | None = None):
        """A write waits up to busy_timeout_s for the database lock; on_busy_retry is called each time it found
        the lock taken and tries again (contention made visible)."""
        self._path = path
        self._busy_timeout_s = busy_timeout_s
        self._on_busy_retry = on_busy_retry
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        self._migrate()

    def _migrate(self) -> None:
        conn = self._conn()
        conn.executescript(SCHEMA)
        with self._write() as db:
            for table, column, statement in MIGRATIONS:
                if column not in {row["name"] for row in db.execute(f"PRAGMA table_info({table})")}:
                    db.execute(statement)
        conn.executescript(INDEXES)

    # ------------------------------------------------------------ connections and transactions

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self._path, timeout=self._busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA busy_timeout={int(BUSY_WAIT_S * 1000)}")  # writes retry in _begin_immediate
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
            with self._all_lock:
                self._all.append(conn)
        return conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE: take the write lock up front, so the busy timeout applies instead of failing later."""
        conn = self._conn()
        self._begin_immediate(conn)
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _begin_immediate(self, conn: sqlite3.Connection) -> None:
        """Takes the write lock, asking again every BUSY_WAIT_S until busy_timeout_s has passed."""
        deadline = time.monotonic() + self._busy_timeout_s
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() >= deadline:
                    raise
            if self._on_busy_retry is not None:
                self._on_busy_retry()

    def close(self) -> None:
        with self._all_lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()

    def integrity_check(self) -> str:
        return str(self._conn().execute("PRAGMA integrity_check").fetchone()[0])

    # ------------------------------------------------------------ files

    def create_file(self, record: FileRecord, request_id: str | None) -> FileRecord:
        with self._write() as db:
            if request_id:
                row = db.execute("SELECT * FROM files WHERE request_id = ?", (request_id,)).fetchone()
                if row is not None:
                    return _file_from_row(row)
            db.execute(
                "INSERT INTO files (id, filename, purpose, size_bytes, sha256, create_time, request_id, tenant) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
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
        return record

    def file_for_request(self, request_id: str) -> FileRecord | None:
        row = self._conn().execute("SELECT * FROM files WHERE request_id = ?", (request_id,)).fetchone()
        return _file_from_row(row) if row else None

    def get_file(self, file_id: str) -> FileRecord | None:
        row = self._conn().execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        return _file_from_row(row) if row else None

    def list_files(
        self, limit: int, before_order: int | None, tenant: str | None = None
    ) -> tuple[list[FileRecord], int | None]:
        query, params = _owned("SELECT * FROM files WHERE ord < ?", [_cursor(before_order)], tenant)
        rows = self._conn().execute(query + " ORDER BY ord DESC LIMIT ?", (*params, limit + 1)).fetchall()
        page = rows[:limit]
        return [_file_from_row(r) for r in page], (page[-1]["ord"] if len(rows) > limit else None)

    def delete_file(self, file_id: str) -> bool:
        with self._write() as db:
            return db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount > 0

    # ------------------------------------------------------------ jobs

    def create_job(
        self, record: JobRecord, events: Sequence[NewEvent], request_id: str | None
    ) -> tuple[JobRecord, bool]:
        with self._write() as db:
            if request_id:
                row = db.execute("SELECT * FROM jobs WHERE request_id = ?", (request_id,)).fetchone()
                if row is not None:
                    return _job_from_row(row), False
            cursor = db.execute(
                "INSERT INTO jobs (id, state, priority, request_id, body, spec, tenant) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.state.value,
                    record.priority,
                    request_id or None,
                    _job_body(record),
                    record.spec,
                    record.tenant,
                ),
            )
            record = replace(record, order=int(cursor.lastrowid or 0))
            record, _ = self._append(db, record, events)
            self._save(db, record)
        return record, True

    def import_jobs(self, records: Iterable[JobRecord]) -> int:
        """Writes job records (without events) in one transaction: migrations, restores and load benchmarks.
        Returns how many were written."""
        rows = ((r.id, r.state.value, r.priority, _job_body(r), r.spec, r.tenant) for r in records)
        with self._write() as db:
            cursor = db.executemany(
                "INSERT INTO jobs (id, state, priority, body, spec, tenant) VALUES (?, ?, ?, ?, ?, ?)", rows
            )
        return cursor.rowcount

    def get_job(self, job_id: str) -> JobRecord | None:
        row = self._conn().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job_from_row(row) if row else None

    def list_jobs(
        self, states: Sequence[JobState], limit: int, before_order: int | None, tenant: str | None = None
    ) -> tuple[list[JobRecord], int | None]:
        query, params = _owned("SELECT * FROM jobs WHERE ord < ?", [_cursor(before_order)], tenant)
        if states:
            query += f" AND state IN ({','.join('?' * len(states))})"
            params += [s.value for s in states]
        rows = self._conn().execute(query + " ORDER BY ord DESC LIMIT ?", (*params, limit + 1)).fetchall()
        page = rows[:limit]
        return [_job_from_row(r) for r in page], (page[-1]["ord"] if len(rows) > limit else None)

    def jobs_in_states(self, states: Sequence[JobState]) -> list[JobRecord]:
        rows = (
            self._conn()
            .execute(
                f"SELECT * FROM jobs WHERE state IN ({','.join('?' * len(states))}) ORDER BY ord",
                [s.value for s in states],
            )
            .fetchall()
        )
        return [_job_from_row(r) for r in rows]

    def count_jobs_by_state(self) -> dict[JobState, int]:
        rows = self._conn().execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {JobState(state): count for state, count in rows}

    def update_job(self, job_id: str, change: ChangeFn) -> tuple[JobRecord, list[EventRecord]] | None:
        with self._write() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return self._apply(db, _job_from_row(row), change) if row else None

    def claim_next_job(self, change: ChangeFn, tenant: str | None = None) -> tuple[JobRecord, list[EventRecord]] | None:
        query, params = _owned(f"SELECT * FROM jobs WHERE {_READY}", [JobState.QUEUED.value, time.time()], tenant)
        with self._write() as db:
            row = db.execute(query + " ORDER BY priority DESC, ord LIMIT 1", params).fetchone()
            return self._apply(db, _job_from_row(row), change) if row else None

    def queue_heads(self) -> list[QueueHead]:
        """Each tenant's next claimable job (highest priority, then oldest), for fair-share placement."""
        rows = self._conn().execute(
            "SELECT tenant, priority, ord, id FROM (SELECT tenant, priority, ord, id, ROW_NUMBER() OVER "
            f"(PARTITION BY tenant ORDER BY priority DESC, ord) AS position FROM jobs WHERE {_READY}) "
            "WHERE position = 1",
            (JobState.QUEUED.value, time.time()),
        )
        return [QueueHead(row["tenant"], row["priority"], row["ord"], row["id"]) for row in rows]

    def count_jobs(self, tenant: str, states: Sequence[JobState]) -> int:
        marks = ",".join("?" * len(states))
        row = (
            self._conn()
            .execute(
                f"SELECT COUNT(*) FROM jobs WHERE tenant = ? AND state IN ({marks})",
                (tenant, *[s.value for s in states]),
            )
            .fetchone()
        )
        return int(row[0])

    def active_jobs_by_tenant(self, states: Sequence[JobState]) -> dict[str, int]:
        marks = ",".join("?" * len(states))
        rows = self._conn().execute(
            f"SELECT tenant, COUNT(*) FROM jobs WHERE state IN ({marks}) GROUP BY tenant", [s.value for s in states]
        )
        return {tenant: count for tenant, count in rows}

    def queue_position(self, record: JobRecord) -> int:
        """How many of its tenant's queued jobs come before this one, plus one."""
        row = (
            self._conn()
            .execute(
                "SELECT COUNT(*) FROM jobs WHERE tenant = ? AND state = ?"
                " AND (priority > ? OR (priority = ? AND ord < ?))",
                (record.tenant, JobState.QUEUED.value, record.priority, record.priority, record.order),
            )
            .fetchone()
        )
        return int(row[0]) + 1

    def stored_bytes(self, tenant: str) -> int:
        """The tenant's uploaded files and artifacts."""
        files = self._conn().execute("SELECT COALESCE(SUM(size_bytes), 0) FROM files WHERE tenant = ?", (tenant,))
        artifacts = self._conn().execute(
            "SELECT COALESCE(SUM(json_extract(body, '$.artifact_size')), 0) FROM jobs WHERE tenant = ?", (tenant,)
        )
        return int(files.fetchone()[0]) + int(artifacts.fetchone()[0])

    def delete_job(self, job_id: str) -> bool:
        with self._write() as db:
            db.execute("DELETE FROM events WHERE job_id = ?", (job_id,))
            return db.execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount > 0

    def _apply(
        self, db: sqlite3.Connection, current: JobRecord, change: ChangeFn
    ) -> tuple[JobRecord, list[EventRecord]]:
        result = change(current)
        if result is None:
            return current, []
        record = replace(result.record, update_time=time.time())
        record, stored = self._append(db, record, result.events)
        self._save(db, record)
        return record, stored

    @staticmethod
    def _save(db: sqlite3.Connection, record: JobRecord) -> None:
        db.execute(
            "UPDATE jobs SET state = ?, priority = ?, body = ? WHERE id = ?",
            (record.state.value, record.priority, _job_body(record), record.id),
        )

    @staticmethod
    def _append(
        db: sqlite3.Connection, record: Sequenced, events: Sequence[NewEvent]
    ) -> tuple[Sequenced, list[EventRecord]]:
        """Numbers the events after the job's or sweep's last one (gap-free: same transaction as its row)."""
        stored = []
        sequence = record.last_event_sequence
        now = time.time()
        for event in events:
            sequence += 1
            db.execute(
                "INSERT INTO events (job_id, sequence, time, attempt, kind, payload) VALUES (?, ?, ?, ?, ?, ?)",
                (record.id, sequence, now, event.attempt, event.kind, event.payload),
            )
            stored.append(EventRecord(record.id, sequence, now, event.attempt, event.kind, event.payload))
        return replace(record, last_event_sequence=sequence), stored

    # ------------------------------------------------------------ sweeps

    def create_sweep(
        self, record: SweepRecord, events: Sequence[NewEvent], request_id: str | None
    ) -> tuple[SweepRecord, bool]:
        with self._write() as db:
            if request_id:
                row = db.execute("SELECT * FROM sweeps WHERE request_id = ?", (request_id,)).fetchone()
                if row is not None:
                    return _sweep_from_row(row), False
            cursor = db.execute(
                "INSERT INTO sweeps (id, state, request_id, body, spec, tenant) VALUES (?, ?, ?, ?, ?, ?)",
                (record.id, record.state.value, request_id or None, _sweep_body(record), record.spec, record.tenant),
            )
            record = replace(record, order=int(cursor.lastrowid or 0))
            record, _ = self._append(db, record, events)
            self._save_sweep(db, record)
        return record, True

    def get_sweep(self, sweep_id: str) -> SweepRecord | None:
        row = self._conn().execute("SELECT * FROM sweeps WHERE id = ?", (sweep_id,)).fetchone()
        return _sweep_from_row(row) if row else None

    def list_sweeps(
        self, limit: int, before_order: int | None, tenant: str | None = None
    ) -> tuple[list[SweepRecord], int | None]:
        query, params = _owned("SELECT * FROM sweeps WHERE ord < ?", [_cursor(before_order)], tenant)
        rows = self._conn().execute(query + " ORDER BY ord DESC LIMIT ?", (*params, limit + 1)).fetchall()
        page = rows[:limit]
        return [_sweep_from_row(r) for r in page], (page[-1]["ord"] if len(rows) > limit else None)

    def sweeps_in_states(self, states: Sequence[SweepState]) -> list[SweepRecord]:
        marks = ",".join("?" * len(states))
        rows = self._conn().execute(f"SELECT * FROM sweeps WHERE state IN ({marks}) ORDER BY ord", states).fetchall()
        return [_sweep_from_row(r) for r in rows]

    def update_sweep(self, sweep_id: str, change: SweepChangeFn) -> tuple[SweepRecord, list[EventRecord]] | None:
        with self._write() as db:
            row = db.execute("SELECT * FROM sweeps WHERE id = ?", (sweep_id,)).fetchone()
            if row is None:
                return None
            current = _sweep_from_row(row)
            result = change(current)
            if result is None:
                return current, []
            updated, events = result
            record, stored = self._append(db, replace(updated, update_time=time.time()), events)
            self._save_sweep(db, record)
            return record, stored

    @staticmethod
    def _save_sweep(db: sqlite3.Connection, record: SweepRecord) -> None:
        db.execute(
            "UPDATE sweeps SET state = ?, body = ? WHERE id = ?", (record.state.value, _sweep_body(record), record.id)
        )

    # ------------------------------------------------------------ events

    def list_events(self, job_id: str, after_sequence: int, limit: int) -> list[EventRecord]:
        rows = (
            self._conn()
            .execute(
                "SELECT * FROM events WHERE job_id = ? AND sequence > ? ORDER BY sequence LIMIT ?",
                (job_id, after_sequence, limit),
            )
            .fetchall()
        )
        return [_event_from_row(r) for r in rows]
