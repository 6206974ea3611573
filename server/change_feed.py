"""Wakes this server's watchers when another replica stores events: the shared store announces every commit with
new events (PostgreSQL LISTEN/NOTIFY), and each announcement wakes the watchers of that job or sweep here."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

from tuneforge.server.event_hub import EventHub

log = logging.getLogger(__name__)
Listen = Callable[[Callable[[str], None], threading.Event, threading.Event], None]
"""listen(on_change, stop, ready): blocks, calling on_change(key) per announcement, until stop is set."""


class ChangeFeed:
    """A thread that turns the store's announcements into hub wake-ups on the event loop."""

    def __init__(self, listen: Listen, hub: EventHub, loop: asyncio.AbstractEventLoop):
        self._listen = listen
        self._hub = hub
        self._loop = loop
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="change-feed", daemon=True)

    def start(self, timeout_s: float = 10.0) -> bool:
        """Starts listening; True once the feed is live (False: watchers still recheck the store on a timer)."""
        self._thread.start()
        return self._ready.wait(timeout_s)

    def _run(self) -> None:
        self._listen(self._wake, self._stop, self._ready)

    def _wake(self, key: str) -> None:
        try:
            self._loop.call_soon_threadsafe(self._hub.publish, key, [], False)
        except RuntimeError:  # the loop closed during shutdown
            self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
