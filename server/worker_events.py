"""Applying what workers say: a worker ready, a worker dead (its job's attempt lost), a job finished (its artifact
promoted only for the attempt that holds the job), a progress report (fenced on its attempt), and answers to
Predict and export calls. One event at a time, on the event loop, in the order each worker sent them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from tuneforge.server.db import StoreRunner
from tuneforge.server.errors import is_disk_full
from tuneforge.server.job_changes import finish as finish_change
from tuneforge.server.job_changes import held_by, paused
from tuneforge.server.job_states import TERMINAL
from tuneforge.server.job_updates import JobUpdates
from tuneforge.server.metrics.service_metrics import RetryReason, ServiceMetrics
from tuneforge.server.records import JobChange, JobRecord
from tuneforge.server.storage import Storage
from tuneforge.server.store.base import ChangeFn, JobStore
from tuneforge.server.worker_reports import death_reason, report_change
from tuneforge.server.worker_slots import WorkerSlot, WorkerSlots
from tuneforge.workers.messages import (
    CheckpointWritten,
    ExportReady,
    JobEventBase,
    JobFinished,
    JobStarted,
    Outcome,
    PredictionsReady,
    TextGenerated,
    TrainingProgress,
    WorkerCall,
    WorkerDied,
    WorkerEvent,
    WorkerReady,
)

log = logging.getLogger("tuneforge.server.scheduler")


class WorkerCalls(Protocol):
    """Requests answered by workers outside any job (Predict, ExportModel): their answers and lost workers."""

    def on_answer(self, event: WorkerCall) -> None: ...
    def on_worker_lost(self, worker: str) -> None: ...


class WorkerEvents:
    """Turns each worker event into slot bookkeeping, metrics and fenced job changes."""

    def __init__(
        self,
        slots: WorkerSlots,
        updates: JobUpdates,
        store: JobStore,
        db: StoreRunner,
        storage: Storage,
        metrics: ServiceMetrics,
        lose: Callable[[str], ChangeFn],
        dispatch: Callable[[], Awaitable[None]],
    ):
        self.slots = slots
        self._updates, self._store, self._db, self._storage, self._metrics = updates, store, db, storage, metrics
        self._lose, self._dispatch = lose, dispatch
        self.all_ready = asyncio.Event()
        self.calls: list[WorkerCalls] = []
        """Where answers to Predict and ExportModel requests, and worker losses, go."""

    async def handle(self, event: WorkerEvent) -> None:
        slot = self.slots.get(event.worker)
        if slot is not None:
            slot.last_heard = time.monotonic()
            self._observe(event, slot)
        match event:
            case WorkerReady():
                log.info("%s ready on %s, %s (pid %s)", event.worker, event.host, event.device, event.pid)
                if self.slots.ready(event):
                    self.all_ready.set()
                await self._dispatch()
            case WorkerDied():
                for calls in self.calls:
                    calls.on_worker_lost(event.worker)
                await self._worker_died(event)
            case PredictionsReady() | ExportReady() | TextGenerated():
                for calls in self.calls:
                    calls.on_answer(event)
            case JobFinished():
                await self._job_finished(event)
            case JobEventBase():
                await self._job_report(event)

    def _observe(self, event: WorkerEvent, slot: WorkerSlot) -> None:
        """What a worker's event says about throughput and start-up, for metrics."""
        match event:
            case TrainingProgress():
                self._metrics.training_window(
                    event.worker, event.window_steps, event.window_samples, event.window_seconds
                )
            case CheckpointWritten():
                self._metrics.checkpoint_saved(event.seconds, event.size_bytes)
            case JobStarted() if slot.holds(event.job, event.attempt) and not slot.loop_started:
                slot.loop_started = True
                self._metrics.startup.observe(time.monotonic() - slot.dispatched_at)
            case WorkerDied():
                self._metrics.worker_restarts.labels(death_reason(event, slot.killed)).inc()

    async def _worker_died(self, event: WorkerDied) -> None:
        slot = self.slots.restarting(event.worker)
        if slot.job is not None:
            await asyncio.to_thread(self._storage.delete_work_dir, slot.job, slot.attempt)
            message = f"{event.worker} exited (code {event.exitcode}) during the job"
            await self._updates.apply_fenced(
                slot.job, event.worker, slot.attempt, self._lose(message), RetryReason.WORKER_EXITED
            )
            await self._dispatch()  # a requeued job can go to an idle worker at once

    async def _job_finished(self, event: JobFinished) -> None:
        succeeded, reason, message = event.outcome is Outcome.SUCCEEDED, event.reason, event.message
        if succeeded:
            record = await self._db.call(self._store.get_job, event.job)
            if record is not None and held_by(record, event.worker, event.attempt):
                try:  # only the holding attempt's artifact becomes the job's; a stale one is dropped with its dir
                    await asyncio.to_thread(self._storage.promote_artifact, event.job, event.attempt)
                except OSError as exc:
                    succeeded, reason = False, "DISK_FULL" if is_disk_full(exc) else "INTERNAL"
                    message = f"could not store the artifact on the server: {exc}"
        await asyncio.to_thread(self._storage.delete_work_dir, event.job, event.attempt)  # the attempt is over
        change: ChangeFn = (
            paused if event.outcome is Outcome.PAUSED else lambda r: finish_change(r, succeeded, reason, message)
        )
        await self._updates.apply_fenced(event.job, event.worker, event.attempt, change)
        await self._prune_if_ended(event.job)  # also when fenced out: a stale attempt may have written checkpoints
        slot = self.slots.get(event.worker)
        if slot is not None and slot.job == event.job:
            self.slots.freed(event.worker)
        await self._dispatch()

    async def _job_report(self, event: JobEventBase) -> None:
        def change(record: JobRecord) -> JobChange | None:
            return report_change(record, event)

        await self._updates.apply_fenced(event.job, event.worker, event.attempt, change)

    async def _prune_if_ended(self, job_id: str) -> None:
        """An ended job resumes no more: its checkpoints and scratch space go (the artifact stays)."""
        record = await self._db.call(self._store.get_job, job_id)
        if record is not None and record.state in TERMINAL:
            await asyncio.to_thread(self._storage.delete_work, job_id)
