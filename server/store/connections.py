"""One database connection per thread (the store's threads each keep theirs), all closed together."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar


class Closable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=Closable)


class ThreadConnections(Generic[C]):
    """`get()` gives this thread's connection, opening it on first use (or again once `usable` says no)."""

    def __init__(self, open_connection: Callable[[], C], usable: Callable[[C], bool] = lambda conn: True):
        self._open = open_connection
        self._usable = usable
        self._local = threading.local()
        self._all: list[C] = []
        self._lock = threading.Lock()

    def get(self) -> C:
        conn: C | None = getattr(self._local, "conn", None)
        if conn is None or not self._usable(conn):
            conn = self._open()
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def close_all(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()
