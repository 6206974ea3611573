"""The PostgreSQL job store (`--store postgresql://...`): several server replicas can share one database.

Row locks replace SQLite's file lock: a change locks its job's row (`FOR UPDATE`), and claiming takes the first
queued job no one else has locked (`FOR UPDATE SKIP LOCKED`), so two replicas never start the same job. The SQL is
shared with SQLite (server/store/sql.py); only connections, the schema and a JSON expression differ.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import psycopg
from psycopg.rows import dict_row

from tuneforge.server.store.connections import ThreadConnections
from tuneforge.server.store.rows import Row
from tuneforge.server.store.sql import Session, SqlJobStore

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    ord BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    size_bytes BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    create_time DOUBLE PRECISION NOT NULL,
    request_id TEXT UNIQUE,
    tenant TEXT NOT NULL DEFAULT 'default'
);
CREATE TABLE IF NOT EXISTS jobs (
    ord BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    priority INTEGER NOT NULL,
    request_id TEXT UNIQUE,
    body TEXT NOT NULL,
    spec BYTEA NOT NULL,
    tenant TEXT NOT NULL DEFAULT 'default'
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (state, priority DESC, ord);
CREATE INDEX IF NOT EXISTS jobs_tenant_queue ON jobs (tenant, state, priority DESC, ord);
CREATE TABLE IF NOT EXISTS sweeps (
    ord BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    request_id TEXT UNIQUE,
    body TEXT NOT NULL,
    spec BYTEA NOT NULL,
    tenant TEXT NOT NULL DEFAULT 'default'
);
CREATE INDEX IF NOT EXISTS files_tenant ON files (tenant, ord);
CREATE INDEX IF NOT EXISTS sweeps_tenant ON sweeps (tenant, ord);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    sequence BIGINT NOT NULL,
    time DOUBLE PRECISION NOT NULL,
    attempt INTEGER NOT NULL,
    kind TEXT NOT NULL,
    payload BYTEA NOT NULL,
    PRIMARY KEY (job_id, sequence)
);
"""
SCHEMA_LOCK = 7_465_307  # any constant: replicas starting together create the schema one at a time
TENANT_LOCK = 7_465_308
"""First key of the advisory lock that serialises one tenant's quota-checked creates (the second is the tenant)."""
CHANNEL = "tuneforge_events"
"""NOTIFY channel: the payload is the id of a job or sweep with new events (sent when its transaction commits)."""


def _dialect(query: str) -> str:
    """The shared SQL uses `?` placeholders; psycopg wants `%s` (no query uses a literal `?` or `%`)."""
    return query.replace("?", "%s")


class _Session:
    def __init__(self, conn: psycopg.Connection[Any]):
        self._conn = conn

    def one(self, query: str, params: Sequence[Any] = ()) -> Row | None:
        row: Row | None = self._conn.execute(_dialect(query), params).fetchone()
        return row

    def all(self, query: str, params: Sequence[Any] = ()) -> list[Row]:
        return list(self._conn.execute(_dialect(query), params).fetchall())

    def run(self, query: str, params: Sequence[Any] = ()) -> int:
        return self._conn.execute(_dialect(query), params).rowcount

    def many(self, query: str, rows: Iterable[Sequence[Any]]) -> int:
        with self._conn.cursor() as cursor:
            cursor.executemany(_dialect(query), list(rows))
            return cursor.rowcount


class PostgresJobStore(SqlJobStore):
    """JobStore on a PostgreSQL database; one connection per thread (the server's store threads)."""

    FOR_UPDATE = " FOR UPDATE"
    SKIP_LOCKED = " FOR UPDATE SKIP LOCKED"

    def __init__(self, dsn: str):
        self._dsn = dsn
        self._connections: ThreadConnections[psycopg.Connection[Any]] = ThreadConnections(
            lambda: psycopg.connect(dsn, autocommit=True, row_factory=dict_row), usable=lambda conn: not conn.closed
        )
        with self._writing() as db:
            db.run(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK})")
            for statement in filter(str.strip, SCHEMA.split(";")):
                db.run(statement)

    def _conn(self) -> psycopg.Connection[Any]:
        return self._connections.get()

    def _reading(self) -> _Session:
        return _Session(self._conn())

    @contextlib.contextmanager
    def _writing(self) -> Iterator[_Session]:
        conn = self._conn()
        with conn.transaction():
            yield _Session(conn)

    def _json_number(self, key: str) -> str:
        return f"((body::jsonb) ->> '{key}')::double precision"

    def _lock_tenant(self, db: Session, tenant: str) -> None:
        db.run("SELECT pg_advisory_xact_lock(CAST(? AS INTEGER), hashtext(?))", (TENANT_LOCK, tenant))

    def _announce(self, db: Session, key: str) -> None:
        db.run("SELECT pg_notify(?, ?)", (CHANNEL, key))

    def listen(self, on_change: Callable[[str], None], stop: threading.Event, ready: threading.Event) -> None:
        """Blocks, calling on_change(key) for every commit with new events, from any server on this database,
        until stop is set (checked every second). Sets ready once listening. Reconnects after a lost connection."""
        while not stop.is_set():
            try:
                with psycopg.connect(self._dsn, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    ready.set()
                    while not stop.is_set():
                        for notice in conn.notifies(timeout=1.0):
                            on_change(notice.payload)
            except psycopg.OperationalError as exc:
                log.warning("lost the change feed (%s); listening again", exc)
                stop.wait(1.0)

    def close(self) -> None:
        self._connections.close_all()
