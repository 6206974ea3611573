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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tuneforge.v1 import job_spec_pb2

from server import convert
from server.auth.access import UNLIMITED, QuotaLookup, no_quotas
from server.db import StoreRunner
from server.errors import is_disk_full
from server.event_hub import EventHub
from server.fair_share import next_tenant, wait_reason
from server.job_changes import cancel as cancel_change
from server.job_changes import claim, held_by, lose_attempt, pause, paused, requeue, resume, transition
from server.job_changes import finish as finish_change
from server.job_states import ACTIVE, TERMINAL, JobState
from server.leases import due, taken_over
from server.metrics.service_metrics import RetryReason, ServiceMetrics
from server.metrics.snapshots import WorkerView
from server.records import EventRecord, JobChange, JobRecord, NewEvent
from server.settings import ServerSettings
from server.spec_validation import validate_spec
from server.storage import AttemptPlaces, Storage
from server.store.base import ChangeFn, JobStore
from server.worker_reports import death_reason, report_change
from server.worker_slots import WorkerSlot, WorkerSlots
from workers.logs import job_context, job_fields
from workers.messages import (
    CancelJob,
    CheckpointWritten,
    DataFile,
    ExportArtifact,
    ExportReady,
    JobEventBase,
    JobFinished,
    JobStarted,
    Outcome,
    PredictBatch,
    PredictionsReady,
    RunJob,
    Severity,
    TrainingProgress,
    WorkerDied,
    WorkerEvent,
    WorkerReady,
)
from workers.pool import WorkerPool
from workers.spec import TrainingSpec
from workers.spec_json import spec_from_json

log = logging.getLogger(__name__)


JobListener = Callable[[JobRecord, list[EventRecord]], None]


class WorkerCalls(Protocol):
    """Requests answered by workers outside any job (Predict, ExportModel): their answers and lost workers."""

    def on_answer(self, event: PredictionsReady | ExportReady) -> None: ...
    def on_worker_lost(self, worker: str) -> None: ...


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
    """Owns the pool: dispatch, cancel, and the application of every worker event."""

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
        self._store = store
        self._db = db
        self._pool = pool
        self._storage = storage
        self._hub = hub
        self._model_roots = model_roots
        self._policy = policy or SchedulerPolicy()
        self._metrics = metrics or ServiceMetrics()
        self._quotas = quotas
        self._last_served: dict[str, float] = {}
        """When each tenant last had a job started (monotonic): the fair-share tie-break."""
        self._slots = WorkerSlots()
        self._inbox: asyncio.Queue[WorkerEvent] = asyncio.Queue()
        self._dispatch_lock = asyncio.Lock()
        self._consumer: asyncio.Task[None] | None = None
        self._maintainer: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks
        self._stopping = False
        self._listeners: list[JobListener] = []
        self.all_ready = asyncio.Event()
        self.worker_calls: list[WorkerCalls] = []
        """Where answers to Predict and ExportModel requests, and worker losses, go."""

    def worker_views(self) -> list[WorkerView]:
        """The pool as it is now, for metrics (safe to call from any thread: it copies the slots first)."""
        return self._slots.views()

    def add_listener(self, listener: JobListener) -> None:
        """listener(record, events) runs on the loop after every job change the scheduler applies; it must not
        block (queue the work)."""
        self._listeners.append(listener)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self._recover()
        loop = asyncio.get_running_loop()

        def sink(event: WorkerEvent) -> None:  # called on the pool's thread
            loop.call_soon_threadsafe(self._inbox.put_nowait, event)

        self._pool.start(sink)
        self._slots = WorkerSlots(self._pool.worker_ids)
        if not len(self._slots):
            self.all_ready.set()
        self._consumer = asyncio.create_task(self._consume(), name="scheduler-events")
        self._maintainer = asyncio.create_task(self._maintain(), name="scheduler-leases")

    async def stop(self, timeout_s: float) -> None:
        """Stops applying events (running jobs stay RUNNING and are requeued at the next start), then the pool."""
        self._stopping = True
        for task in (self._consumer, self._maintainer):
            if task is not None:
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
            await self._apply(record.id, _requeue_if_active(note), RetryReason.SERVER_RESTARTED)

    def _owns(self, worker: str | None) -> bool:
        return worker is not None and worker.startswith(f"{self._policy.replica}-worker-")

    async def _expire_remote_leases(self) -> None:
        """Replicas: a job held by another replica's worker that has not reported for a lease is that replica's
        loss (it died or was cut off): the job is queued again, fenced on the holder and attempt read here."""
        active = await self._db.call(self._store.jobs_in_states, list(ACTIVE))
        for record, silent_s in taken_over(active, time.time(), self._policy.lease_timeout_s, self._owns):
            assert record.worker is not None
            message = f"{record.worker} (another replica) sent nothing for {silent_s:.0f} s: its lease expired"
            log.warning("%s", message, extra=job_fields(record.id, record.attempt))
            await self._apply_fenced(
                record.id, record.worker, record.attempt, self._lose(message), RetryReason.LEASE_EXPIRED
            )

    # ------------------------------------------------------------ API-facing actions

    async def cancel(self, job_id: str) -> JobRecord | None:
        """Cancels a job (IllegalTransition when it already ended); tells its worker to stop."""
        record = await self._apply(job_id, cancel_change)
        if record is None:
            return None
        if record.state is JobState.CANCELLING:
            self._stop_worker_of(record, checkpoint_first=False)
        return record

    async def pause(self, job_id: str) -> JobRecord | None:
        """Pauses a job (IllegalTransition unless QUEUED or RUNNING); its worker checkpoints and lets go."""
        record = await self._apply(job_id, pause)
        if record is not None and record.state is JobState.PAUSING:
            self._stop_worker_of(record, checkpoint_first=True)
        return record

    async def resume(self, job_id: str) -> JobRecord | None:
        """Queues a PAUSED job again (IllegalTransition otherwise)."""
        record = await self._apply(job_id, resume)
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
                self._changed(JobState.QUEUED, record)
                self._publish(record, events)
                self._tell_listeners(record, events)  # a job left the queue: a sweep waiting for room may go on
                await self._start_on(worker, record)

    async def _next_tenant(self) -> str | None:
        """Whose job starts next (weighted fair share, server/fair_share.py)."""
        heads = await self._db.call(self._store.queue_heads)
        if not heads:
            return None
        running = await self._db.call(self._store.active_jobs_by_tenant, list(ACTIVE))
        return next_tenant(heads, running, self._quotas, self._last_served)

    def worker_for_calls(self) -> str | None:
        """A ready worker for a Predict batch or an export: an idle one first (the same one, so its loaded models
        get used)."""
        return self._slots.for_calls()

    def send_call(self, worker: str, command: PredictBatch | ExportArtifact) -> None:
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

    async def _start_on(self, worker: str, record: JobRecord) -> None:
        slot = self._slots.get(worker)
        assert slot is not None
        slot.state, slot.job, slot.attempt, slot.last_heard = "busy", record.id, record.attempt, time.monotonic()
        slot.dispatched_at, slot.loop_started = slot.last_heard, False
        command = await self._run_command(record)
        if command is None:
            slot.state, slot.job = "idle", None
            return
        try:
            self._pool.send(worker, command)
        except KeyError as exc:
            slot.state, slot.job = "starting", None
            message = f"could not reach {worker}: {exc}"
            await self._apply_fenced(
                record.id, worker, record.attempt, self._lose(message), RetryReason.WORKER_UNREACHABLE
            )

    async def _accepted_spec(
        self, record: JobRecord, spec_proto: job_spec_pb2.JobSpec
    ) -> tuple[TrainingSpec | None, str]:
        """The job's resolved spec as stored at creation, so a restart with other model roots or defaults changes
        nothing for it; a job stored before specs were kept is validated now, as it used to be."""
        if record.resolved_spec:
            return spec_from_json(record.resolved_spec), ""
        result = await asyncio.to_thread(validate_spec, spec_proto, self._model_roots)  # reads model folders
        return result.spec, "; ".join(f"{v.field}: {v.description}" for v in result.violations)

    async def _run_command(self, record: JobRecord) -> RunJob | None:
        """Builds the worker's command from the spec resolved when the job was accepted; a job whose data files
        vanished fails here with the reason."""
        spec_proto = job_spec_pb2.JobSpec.FromString(record.spec)
        spec, problem = await self._accepted_spec(record, spec_proto)
        files: dict[str, DataFile] = {}
        for resource in filter(None, [spec_proto.data.training_file, spec_proto.data.validation_file]):
            file = await self._db.call(self._store.get_file, resource.removeprefix("files/"))
            if file is None or file.tenant != record.tenant:  # another tenant's file is as good as missing
                problem = problem or f"{resource} was deleted before the job started"
            else:
                files[resource] = DataFile(self._storage.file_location(file.id), file.filename)
        reason = "INVALID_INPUT"
        time_limit_s = 0.0
        if spec is not None and spec.max_runtime_s:
            time_limit_s = spec.max_runtime_s - record.run_seconds
            if time_limit_s <= 0 and not problem:
                reason, problem = "DEADLINE_EXCEEDED", f"max_runtime of {spec.max_runtime_s:g} s is used up"
        folders: AttemptPlaces | None = None
        if not problem and spec is not None:
            try:
                folders = await asyncio.to_thread(self._storage.prepare_attempt, record.id, record.attempt)
            except OSError as exc:  # a full disk must fail the job, not the scheduler
                reason = "DISK_FULL" if is_disk_full(exc) else "INTERNAL"
                problem = f"could not create the job's folders on the server: {exc}"
        if problem or spec is None or folders is None:
            await self._apply(
                record.id,
                lambda r: (
                    transition(r, JobState.FAILED, error_reason=reason, error_message=problem)
                    if r.state in ACTIVE
                    else None
                ),
            )
            return None
        return RunJob(
            job=record.id,
            attempt=record.attempt,
            spec=spec,
            training_data=files[spec.data.training_file],
            validation_data=files.get(spec.data.validation_file or ""),
            work_dir=folders.work_dir,
            checkpoint_dir=folders.checkpoint_dir,
            artifact_path=folders.artifact,
            time_limit_s=time_limit_s,
            max_unpacked_bytes=self._unpack_cap(record.tenant),
        )

    def _unpack_cap(self, tenant: str) -> int:
        """What the job's archives may unpack to: its tenant's storage quota (0: the worker's own cap)."""
        quota = self._quotas(tenant).max_stored_bytes
        return quota if quota < UNLIMITED else 0

    # ------------------------------------------------------------ worker events

    async def _consume(self) -> None:
        while True:
            event = await self._inbox.get()
            if self._stopping:
                continue
            try:
                if isinstance(event, JobEventBase):
                    with job_context(event.job, event.attempt):
                        await self._handle(event)
                else:
                    await self._handle(event)
            except Exception:  # one bad event must not stop the scheduler
                log.exception("failed to apply %r", event)

    async def _handle(self, event: WorkerEvent) -> None:
        slot = self._slots.get(event.worker)
        if slot is not None:
            slot.last_heard = time.monotonic()
            self._observe(event, slot)
        match event:
            case WorkerReady():
                log.info("%s ready on %s, %s (pid %s)", event.worker, event.host, event.device, event.pid)
                if self._slots.ready(event):
                    self.all_ready.set()
                await self.dispatch()
            case WorkerDied():
                for calls in self.worker_calls:
                    calls.on_worker_lost(event.worker)
                await self._worker_died(event)
            case PredictionsReady() | ExportReady():
                for calls in self.worker_calls:
                    calls.on_answer(event)
            case JobFinished():
                await self._job_finished(event)
            case _:
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
        slot = self._slots.restarting(event.worker)
        if slot.job is not None:
            await asyncio.to_thread(self._storage.delete_work_dir, slot.job, slot.attempt)
            message = f"{event.worker} exited (code {event.exitcode}) during the job"
            await self._apply_fenced(
                slot.job, event.worker, slot.attempt, self._lose(message), RetryReason.WORKER_EXITED
            )
            await self.dispatch()  # a requeued job can go to an idle worker at once

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
        await self._apply_fenced(event.job, event.worker, event.attempt, change)
        await self._prune_if_ended(event.job)  # also when fenced out: a stale attempt may have written checkpoints
        slot = self._slots.get(event.worker)
        if slot is not None and slot.job == event.job:
            self._slots.freed(event.worker)
        await self.dispatch()

    async def _job_report(self, event: JobEventBase) -> None:
        def change(record: JobRecord) -> JobChange | None:
            return report_change(record, event)

        await self._apply_fenced(event.job, event.worker, event.attempt, change)

    # ------------------------------------------------------------ leases

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
        await self._apply_fenced(job, worker, attempt, self._lose(message), RetryReason.LEASE_EXPIRED)
        self._send(worker, CancelJob(job=job, attempt=attempt))
        await self.dispatch()

    def _lose(self, message: str) -> ChangeFn:
        policy = self._policy
        return lambda r: lose_attempt(r, "WORKER_LOST", message, policy.max_restarts, policy.restart_backoff_s)

    # ------------------------------------------------------------ store helpers

    async def _prune_if_ended(self, job_id: str) -> None:
        """An ended job resumes no more: its checkpoints and scratch space go (the artifact stays)."""
        record = await self._db.call(self._store.get_job, job_id)
        if record is not None and record.state in TERMINAL:
            await asyncio.to_thread(self._storage.delete_work, job_id)

    async def _apply(self, job_id: str, change: ChangeFn, retry_reason: RetryReason | None = None) -> JobRecord | None:
        """Applies a change in the store, then tells metrics, watchers and listeners; a job that ended loses its
        checkpoints and scratch space first (it resumes no more; the artifact stays). retry_reason: why a lost
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
            self._changed(before[0], record)
            if retry_reason is not None and before[0] in ACTIVE and record.state is JobState.QUEUED:
                self._metrics.job_retried(retry_reason)
            if record.state in TERMINAL:  # pruned before anyone hears of the end, so "ended" means "cleaned up"
                await asyncio.to_thread(self._storage.delete_work, record.id)
        self._publish(record, events)
        self._tell_listeners(record, events)
        return record

    def _tell_listeners(self, record: JobRecord, events: list[EventRecord]) -> None:
        if events:
            for listener in self._listeners:
                listener(record, events)

    def _changed(self, before: JobState, record: JobRecord) -> None:
        """A committed change of state: counted, and logged as a job line."""
        self._metrics.job_changed(before, record, time.time())
        detail = f" on {record.worker}" if record.state is JobState.RUNNING else ""
        if record.state is JobState.FAILED:
            detail = f": {record.error_reason}: {record.error_message}"
        level = logging.WARNING if record.state is JobState.FAILED else logging.INFO
        fields = job_fields(record.id, record.attempt)
        log.log(level, "%s -> %s%s", before.value, record.state.value, detail, extra=fields)

    async def _apply_fenced(
        self, job_id: str, worker: str, attempt: int, change: ChangeFn, retry_reason: RetryReason | None = None
    ) -> None:
        def fenced(record: JobRecord) -> JobChange | None:
            if not held_by(record, worker, attempt):
                log.info("ignoring a report from %s for %s attempt %s", worker, job_id, attempt)
                return None
            return change(record)

        await self._apply(job_id, fenced, retry_reason)

    def _publish(self, record: JobRecord, events: list[EventRecord]) -> None:
        if events:
            self._hub.publish(record.id, events, record.state in TERMINAL)

    def _send(self, worker: str, command: CancelJob) -> None:
        try:
            self._pool.send(worker, command)
        except KeyError:
            log.warning("could not deliver %r to %s", command, worker)


def _requeue_if_active(note: NewEvent) -> ChangeFn:
    def change(record: JobRecord) -> JobChange | None:
        return requeue(record, note) if record.state in ACTIVE else None

    return change
