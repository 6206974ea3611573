"""The SQLite job store (the default): WAL, BEGIN IMMEDIATE for every write with counted busy retries, one
connection per thread. The SQL itself is shared with PostgreSQL (server/store/sql.py)."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tuneforge.server.store.connections import ThreadConnections
from tuneforge.server.store.rows import Row
from tuneforge.server.store.sql import SqlJobStore

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

BUSY_WAIT_S = 0.05
"""How long SQLite itself waits for a lock before the store counts a busy retry and asks again."""


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    return (exc.sqlite_errorcode & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)  # extended codes too


class _Session:
    """Statements on one SQLite connection."""

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn

    def one(self, query: str, params: Sequence[Any] = ()) -> Row | None:
        row: Row | None = self._conn.execute(query, params).fetchone()
        return row

    def all(self, query: str, params: Sequence[Any] = ()) -> list[Row]:
        return list(self._conn.execute(query, params).fetchall())

    def run(self, query: str, params: Sequence[Any] = ()) -> int:
        return self._conn.execute(query, params).rowcount

    def many(self, query: str, rows: Iterable[Sequence[Any]]) -> int:
        return self._conn.executemany(query, rows).rowcount


class SqliteJobStore(SqlJobStore):
    """JobStore on one SQLite file. Safe to call from many threads of one process."""

    def __init__(self, path: Path, busy_timeout_s: float = 10.0, on_busy_retry: Callable[[], None] | None = None):
        """A write waits up to busy_timeout_s for the database lock; on_busy_retry is called each time it found
        the lock taken and tries again (contention made visible)."""
        self._path = path
        self._busy_timeout_s = busy_timeout_s
        self._on_busy_retry = on_busy_retry
        self._connections = ThreadConnections(self._open)
        self._migrate()

    def _migrate(self) -> None:
        conn = self._conn()
        conn.executescript(SCHEMA)
        with self._writing() as db:
            for table, column, statement in MIGRATIONS:
                if column not in {row["name"] for row in db.all(f"PRAGMA table_info({table})")}:
                    db.run(statement)
        conn.executescript(INDEXES)

    # ------------------------------------------------------------ connections and transactions

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, timeout=self._busy_timeout_s, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA busy_timeout={int(BUSY_WAIT_S * 1000)}")  # writes retry in _begin_immediate
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def _conn(self) -> sqlite3.Connection:
        return self._connections.get()

    def _reading(self) -> _Session:
        return _Session(self._conn())

    @contextlib.contextmanager
    def _writing(self) -> Iterator[_Session]:
        """BEGIN IMMEDIATE: take the write lock up front, so the busy timeout applies instead of failing later."""
        conn = self._conn()
        self._begin_immediate(conn)
        try:
            yield _Session(conn)
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

    def _json_number(self, key: str) -> str:
        return f"json_extract(body, '$.{key}')"

    def close(self) -> None:
        self._connections.close_all()

    def integrity_check(self) -> str:
        return str(self._conn().execute("PRAGMA integrity_check").fetchone()[0])
