"""Applying a change to a job: in the store (one transaction), then to metrics, the job's log line, watchers and
listeners, in that order; an ended job loses its checkpoints and scratch space before anyone hears it ended. Every
change the scheduler makes goes through here, and a worker's report only while its attempt holds the job."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from tuneforge.server.db import StoreRunner
from tuneforge.server.event_hub import EventHub
from tuneforge.server.job_changes import held_by
from tuneforge.server.job_states import ACTIVE, TERMINAL, JobState
from tuneforge.server.metrics.service_metrics import RetryReason, ServiceMetrics
from tuneforge.server.records import EventRecord, JobChange, JobRecord
from tuneforge.server.storage import Storage
from tuneforge.server.store.base import ChangeFn, JobStore
from tuneforge.workers.logs import job_fields

log = logging.getLogger("tuneforge.server.scheduler")

JobListener = Callable[[JobRecord, list[EventRecord]], None]


class JobUpdates:
    """The one way the scheduler changes a job."""

    def __init__(self, store: JobStore, db: StoreRunner, hub: EventHub, storage: Storage, metrics: ServiceMetrics):
        self._store, self._db, self._hub, self._storage, self._metrics = store, db, hub, storage, metrics
        self.listeners: list[JobListener] = []
        """listener(record, events) runs on the loop after every change applied here; it must not block."""

    async def apply(self, job_id: str, change: ChangeFn, retry_reason: RetryReason | None = None) -> JobRecord | None:
        """Applies a change in the store, then tells metrics, watchers and listeners. retry_reason: why a lost
        attempt's job, if this queues it again, is retried."""
        before: list[JobState] = []

        def observed(record: JobRecord) -> JobChange | None:
            before[:] = [record.state]  # the last call counts: the store may run it again
            return change(record)

        result = await self._db.call(self._store.update_job, job_id, observed)
        if result is None:
            return None
        record, events = result
        if before and before[0] is not record.state:
            self.changed(before[0], record)
            if retry_reason is not None and before[0] in ACTIVE and record.state is JobState.QUEUED:
                self._metrics.job_retried(retry_reason)
            if record.state in TERMINAL:  # pruned before anyone hears of the end, so "ended" means "cleaned up"
                await asyncio.to_thread(self._storage.delete_work, record.id)
        self.announce(record, events)
        return record

    async def apply_fenced(
        self, job_id: str, worker: str, attempt: int, change: ChangeFn, retry_reason: RetryReason | None = None
    ) -> None:
        """A change on behalf of one attempt: applied only while that attempt holds the job."""

        def fenced(record: JobRecord) -> JobChange | None:
            if not held_by(record, worker, attempt):
                log.info("ignoring a report from %s for %s attempt %s", worker, job_id, attempt)
                return None
            return change(record)

        await self.apply(job_id, fenced, retry_reason)

    def announce(self, record: JobRecord, events: list[EventRecord]) -> None:
        """New events of a job: to its watchers, then to the listeners (sweeps, webhooks)."""
        if events:
            self._hub.publish(record.id, events, record.state in TERMINAL)
            for listener in self.listeners:
                listener(record, events)

    def changed(self, before: JobState, record: JobRecord) -> None:
        """A committed change of state: counted, and logged as a job line."""
        self._metrics.job_changed(before, record, time.time())
        detail = f" on {record.worker}" if record.state is JobState.RUNNING else ""
        if record.state is JobState.FAILED:
            detail = f": {record.error_reason}: {record.error_message}"
        level = logging.WARNING if record.state is JobState.FAILED else logging.INFO
        fields = job_fields(record.id, record.attempt)
        log.log(level, "%s -> %s%s", before.value, record.state.value, detail, extra=fields)
