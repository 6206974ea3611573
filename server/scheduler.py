"""The scheduler: places queued jobs on idle workers and turns worker events into stored job changes.

Its parts live beside it, each with its own unit tests: whose job starts next and why a job waits
(`fair_share.py`: weighted fair share, ties to the tenant served least recently, then priority and age), what the
scheduler knows of each worker and which one answers Predict and export calls (`worker_slots.py`), when a silent
worker loses its lease or a deaf one is killed (`leases.py`), and what one worker report does to its job
(`worker_reports.py`). What stays here is the order of things: dispatch, starting an attempt from the spec stored
when the job was accepted, applying events one at a time on the event loop (in the order each worker sent them,
fenced on the attempt that holds the job), and the lease clock. The server decides every state; a worker only
reports. tests/unit/test_scheduler_with_fake_workers.py drives all of it with fake workers and no processes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from tuneforge.server import convert
from tuneforge.server.auth.access import QuotaLookup, no_quotas
from tuneforge.server.db import StoreRunner
from tuneforge.server.event_hub import EventHub
from tuneforge.server.fair_share import next_tenant, wait_reason
from tuneforge.server.job_changes import cancel as cancel_change
from tuneforge.server.job_changes import claim, lose_attempt, pause, requeue, resume, transition
from tuneforge.server.job_states import ACTIVE, JobState
from tuneforge.server.job_updates import JobListener, JobUpdates
from tuneforge.server.leases import due, taken_over
from tuneforge.server.metrics.service_metrics import RetryReason, ServiceMetrics
from tuneforge.server.metrics.snapshots import WorkerView
from tuneforge.server.records import JobChange, JobRecord, NewEvent
from tuneforge.server.run_commands import CannotRun, RunCommands
from tuneforge.server.settings import ServerSettings
from tuneforge.server.storage import Storage
from tuneforge.server.store.base import ChangeFn, JobStore
from tuneforge.server.worker_events import WorkerEvents
from tuneforge.server.worker_slots import WorkerSlot, WorkerSlots
from tuneforge.workers.logs import job_context, job_fields
from tuneforge.workers.messages import CallCommand, CancelJob, JobEventBase, Severity, WorkerEvent
from tuneforge.workers.pool import WorkerPool

log = logging.getLogger(__name__)

_DEFAULTS = ServerSettings()


@dataclass(frozen=True)
class SchedulerPolicy:
    """How hard the scheduler tries, and how long it waits, before it gives up on a worker or a job. The defaults
    and meanings are the settings' (server/settings.py), defined there once."""

    max_restarts: int = _DEFAULTS.max_restarts
    replica: str = _DEFAULTS.replica
    restart_backoff_s: float = _DEFAULTS.restart_backoff_s
    lease_timeout_s: float = _DEFAULTS.lease_timeout_s
    kill_grace_s: float = _DEFAULTS.kill_grace_s
    worker_memory_bytes: int = 0
    """Memory a worker can give one job (0: not checked); larger estimates are refused at creation."""


class Scheduler:
    """Owns the pool: dispatch, cancel, pause and resume, the lease clock, and the order worker events apply in."""

    def __init__(
        self,
        store: JobStore,
        db: StoreRunner,
        pool: WorkerPool,
        storage: Storage,
        hub: EventHub,
        model_roots: list[Path],
        policy: SchedulerPolicy | None = None,
        metrics: ServiceMetrics | None = None,
        quotas: QuotaLookup = no_quotas,
    ):
        self._store, self._db, self._pool, self._storage = store, db, pool, storage
        self._policy = policy or SchedulerPolicy()
        self._metrics = metrics or ServiceMetrics()
        self._quotas = quotas
        self._last_served: dict[str, float] = {}
        """When each tenant last had a job started (monotonic): the fair-share tie-break."""
        self._slots = WorkerSlots()
        self._updates = JobUpdates(store, db, hub, storage, self._metrics)
        self._commands = RunCommands(store, db, storage, model_roots, quotas)
        self._events = WorkerEvents(self._slots, self._updates, store, db, storage, self._metrics, self._lose,
                                    self.dispatch)  # fmt: skip
        self._inbox: asyncio.Queue[WorkerEvent] = asyncio.Queue()
        self._dispatch_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks
        self._stopping = False
        self.all_ready = self._events.all_ready
        self.worker_calls = self._events.calls
        """Where answers to Predict and ExportModel requests, and worker losses, go."""

    def worker_views(self) -> list[WorkerView]:
        """The pool as it is now, for metrics (safe to call from any thread: it copies the slots first)."""
        return self._slots.views()

    def add_listener(self, listener: JobListener) -> None:
        """listener(record, events) runs on the loop after every job change the scheduler applies; it must not
        block (queue the work)."""
        self._updates.listeners.append(listener)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self._recover()
        loop = asyncio.get_running_loop()

        def sink(event: WorkerEvent) -> None:  # called on the pool's thread
            loop.call_soon_threadsafe(self._inbox.put_nowait, event)

        self._pool.start(sink)
        self._slots.reset(self._pool.worker_ids)
        if not len(self._slots):
            self.all_ready.set()
        self._tasks = [
            asyncio.create_task(self._consume(), name="scheduler-events"),
            asyncio.create_task(self._maintain(), name="scheduler-leases"),
        ]

    async def stop(self, timeout_s: float) -> None:
        """Stops applying events (running jobs stay RUNNING and are requeued at the next start), then the pool."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.to_thread(self._pool.stop, timeout_s)

    async def _recover(self) -> None:
        """Jobs a previous run of this server left running get a new attempt. With replicas, only this replica's
        own; another's are left to it, or to the lease check should that replica be gone."""
        for record in await self._db.call(self._store.jobs_in_states, list(ACTIVE)):
            if self._policy.replica and not self._owns(record.worker):
                continue
            note = convert.log_event(
                Severity.WARNING,
                f"the server restarted during attempt {record.attempt}; the job is queued again",
                record.attempt,
            )
            await self._updates.apply(record.id, _requeue_if_active(note), RetryReason.SERVER_RESTARTED)

    def _owns(self, worker: str | None) -> bool:
        return worker is not None and worker.startswith(f"{self._policy.replica}-worker-")

    # ------------------------------------------------------------ API-facing actions

    async def cancel(self, job_id: str) -> JobRecord | None:
        """Cancels a job (IllegalTransition when it already ended); tells its worker to stop."""
        record = await self._updates.apply(job_id, cancel_change)
        if record is not None and record.state is JobState.CANCELLING:
            self._stop_worker_of(record, checkpoint_first=False)
        return record

    async def pause(self, job_id: str) -> JobRecord | None:
        """Pauses a job (IllegalTransition unless QUEUED or RUNNING); its worker checkpoints and lets go."""
        record = await self._updates.apply(job_id, pause)
        if record is not None and record.state is JobState.PAUSING:
            self._stop_worker_of(record, checkpoint_first=True)
        return record

    async def resume(self, job_id: str) -> JobRecord | None:
        """Queues a PAUSED job again (IllegalTransition otherwise)."""
        record = await self._updates.apply(job_id, resume)
        if record is not None:
            self.wake()
        return record

    def _stop_worker_of(self, record: JobRecord, checkpoint_first: bool) -> None:
        if not record.worker:
            return
        self._send(record.worker, CancelJob(job=record.id, attempt=record.attempt, checkpoint_first=checkpoint_first))
        slot = self._slots.get(record.worker)
        if slot is not None and slot.holds(record.id, record.attempt):
            slot.kill_at = time.monotonic() + self._policy.kill_grace_s  # a worker deaf to the request goes

    def worker_for_calls(self) -> str | None:
        """A ready worker for a Predict or Generate batch or an export (server/worker_slots.py)."""
        return self._slots.for_calls()

    def send_call(self, worker: str, command: CallCommand) -> None:
        """KeyError when the worker cannot be reached."""
        self._pool.send(worker, command)

    @property
    def worker_memory_bytes(self) -> int:
        return self._policy.worker_memory_bytes

    def gpus_per_worker(self) -> int | None:
        """The most GPUs one worker has; None until every worker has said which device it has."""
        return self._slots.gpus_per_worker()

    async def wait_reason(self, record: JobRecord, position: int) -> str:
        """Why a QUEUED job has not started yet, in words (server/fair_share.py)."""
        running = (await self._db.call(self._store.active_jobs_by_tenant, list(ACTIVE))).get(record.tenant, 0)
        quota = self._quotas(record.tenant)
        idle, size = len(self._slots.idle()), len(self._slots)
        return wait_reason(record.not_before, time.time(), record.tenant, running, quota, position, idle, size)

    # ------------------------------------------------------------ placing jobs

    def wake(self) -> None:
        """A job was queued: try to place it."""
        if not self._stopping:
            task = asyncio.get_running_loop().create_task(self.dispatch())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def dispatch(self) -> None:
        """Gives each idle worker the next queued job of the tenant whose turn it is."""
        async with self._dispatch_lock:
            for worker in self._slots.idle():
                slot = self._slots.get(worker)
                if self._stopping or slot is None or slot.state != "idle":  # it may have died meanwhile
                    continue
                tenant = await self._next_tenant()
                if tenant is None:
                    return
                claimed = await self._db.call(self._store.claim_next_job, claim(worker), tenant)
                if claimed is None:
                    return
                self._last_served[tenant] = time.monotonic()
                record, events = claimed
                self._updates.changed(JobState.QUEUED, record)
                self._updates.announce(record, events)  # a job left the queue: a sweep waiting for room may go on
                await self._start_on(worker, slot, record)

    async def _next_tenant(self) -> str | None:
        """Whose job starts next (weighted fair share, server/fair_share.py)."""
        heads = await self._db.call(self._store.queue_heads)
        if not heads:
            return None
        running = await self._db.call(self._store.active_jobs_by_tenant, list(ACTIVE))
        return next_tenant(heads, running, self._quotas, self._last_served)

    async def _start_on(self, worker: str, slot: WorkerSlot, record: JobRecord) -> None:
        slot.state, slot.job, slot.attempt, slot.last_heard = "busy", record.id, record.attempt, time.monotonic()
        slot.dispatched_at, slot.loop_started = slot.last_heard, False
        command = await self._commands.build(record)
        if isinstance(command, CannotRun):
            slot.state, slot.job = "idle", None
            reason, message = command.reason, command.message
            await self._updates.apply(
                record.id,
                lambda r: (
                    transition(r, JobState.FAILED, error_reason=reason, error_message=message)
                    if r.state in ACTIVE
                    else None
                ),
            )
            return
        try:
            self._pool.send(worker, command)
        except KeyError as exc:
            slot.state, slot.job = "starting", None
            message = f"could not reach {worker}: {exc}"
            await self._updates.apply_fenced(
                record.id, worker, record.attempt, self._lose(message), RetryReason.WORKER_UNREACHABLE
            )

    # ------------------------------------------------------------ worker events, one at a time

    async def _consume(self) -> None:
        while True:
            event = await self._inbox.get()
            if self._stopping:
                continue
            try:
                if isinstance(event, JobEventBase):
                    with job_context(event.job, event.attempt):
                        await self._events.handle(event)
                else:
                    await self._events.handle(event)
            except Exception:  # one bad event must not stop the scheduler
                log.exception("failed to apply %r", event)

    # ------------------------------------------------------------ the lease clock

    async def _maintain(self) -> None:
        """Every fraction of a lease: expire silent workers, kill those that will not let go, and place jobs
        whose restart back-off has passed."""
        period_s = max(0.1, min(1.0, self._policy.lease_timeout_s / 4))
        while True:
            await asyncio.sleep(period_s)  # a timer, not synchronisation: leases are checked on a clock
            try:
                await self._check_leases()
                if self._policy.replica:
                    await self._expire_remote_leases()
                await self.dispatch()
            except Exception:
                log.exception("lease check failed")

    async def _check_leases(self) -> None:
        for action in due(self._slots.items(), time.monotonic(), self._policy.lease_timeout_s):
            slot = self._slots.get(action.worker)
            assert slot is not None
            if action.kill:
                slot.kill_at, slot.killed = None, True
                log.warning("%s still holds %s attempt %s: killing it", action.worker, slot.job, slot.attempt)
                self._pool.kill(action.worker)  # its death comes back as WorkerDied
            else:
                await self._expire_lease(action.worker, slot, action.silent_s)

    async def _expire_lease(self, worker: str, slot: WorkerSlot, silent_s: float) -> None:
        """The worker went quiet: its job is queued again at once; the worker, should it wake, is told to stop,
        every report it still sends is fenced out, and it is killed if it has not let go after the grace."""
        job, attempt = slot.job, slot.attempt
        assert job is not None
        slot.lease_expired = True
        slot.kill_at = time.monotonic() + self._policy.kill_grace_s
        message = f"{worker} sent nothing for {silent_s:.0f} s (hung, stopped or cut off): its lease expired"
        log.warning("%s on %s attempt %s", message, job, attempt)
        await self._updates.apply_fenced(job, worker, attempt, self._lose(message), RetryReason.LEASE_EXPIRED)
        self._send(worker, CancelJob(job=job, attempt=attempt))
        await self.dispatch()

    async def _expire_remote_leases(self) -> None:
        """Replicas: a job held by another replica's worker that has not reported for a lease is that replica's
        loss (it died or was cut off): the job is queued again, fenced on the holder and attempt read here."""
        active = await self._db.call(self._store.jobs_in_states, list(ACTIVE))
        for record, silent_s in taken_over(active, time.time(), self._policy.lease_timeout_s, self._owns):
            assert record.worker is not None
            message = f"{record.worker} (another replica) sent nothing for {silent_s:.0f} s: its lease expired"
            log.warning("%s", message, extra=job_fields(record.id, record.attempt))
            await self._updates.apply_fenced(
                record.id, record.worker, record.attempt, self._lose(message), RetryReason.LEASE_EXPIRED
            )

    def _lose(self, message: str) -> ChangeFn:
        policy = self._policy
        return lambda r: lose_attempt(r, "WORKER_LOST", message, policy.max_restarts, policy.restart_backoff_s)

    def _send(self, worker: str, command: CancelJob) -> None:
        try:
            self._pool.send(worker, command)
        except KeyError:
            log.warning("could not deliver %r to %s", command, worker)


def _requeue_if_active(note: NewEvent) -> ChangeFn:
    def change(record: JobRecord) -> JobChange | None:
        return requeue(record, note) if record.state in ACTIVE else None

    return change
