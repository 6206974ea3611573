"""Pure changes to a job record, each returning the new record and the events that tell of it.

The store applies them atomically; nothing here does I/O. Changes that come from a worker are fenced: they apply only
to the attempt and worker that currently hold the job, so a stale worker cannot change it.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from tuneforge.server.bounded import MAX_REASON_CHARS, bounded
from tuneforge.server.convert import log_event, state_change_event
from tuneforge.server.job_states import ACTIVE, IllegalTransition, JobState, check_transition
from tuneforge.server.records import JobChange, JobRecord, NewEvent
from tuneforge.workers.messages import Severity


def transition(record: JobRecord, target: JobState, extra: list[NewEvent] | None = None, **fields: Any) -> JobChange:
    """Moves the job to target (IllegalTransition if the table forbids it), with a state-change event last."""
    check_transition(record.state, target)
    now = time.time()
    if record.state in ACTIVE and target not in ACTIVE and record.start_time is not None:
        fields.setdefault("run_seconds", record.run_seconds + max(0.0, now - record.start_time))
    if target is JobState.QUEUED:
        fields.setdefault("queued_time", now)
    if target in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED):
        fields.setdefault("end_time", now)
        fields.setdefault("worker", None)
    if "error_message" in fields:  # the worker's message may quote the tenant's data: stored bounded
        fields["error_message"] = bounded(str(fields["error_message"]))
        fields["error_reason"] = bounded(str(fields.get("error_reason", "")), MAX_REASON_CHARS)
    updated = replace(record, state=target, **fields)
    return JobChange(updated, [*(extra or []), state_change_event(record, updated)])


def claim(worker: str) -> Any:
    """QUEUED -> RUNNING on `worker`, as a new attempt."""

    def change(record: JobRecord) -> JobChange:
        now = time.time()
        return transition(
            record,
            JobState.RUNNING,
            attempt=record.attempt + 1,
            worker=worker,
            start_time=now,
            heartbeat_time=now,
            step=0,
            epoch=0,
            error_reason="",
            error_message="",
            not_before=None,
        )

    return change


def held_by(record: JobRecord, worker: str, attempt: int) -> bool:
    """The fence: is this worker's attempt the one that currently holds the job?"""
    return record.state in ACTIVE and record.worker == worker and record.attempt == attempt


def cancel(record: JobRecord) -> JobChange:
    """QUEUED or PAUSED -> CANCELLED at once; RUNNING or PAUSING -> CANCELLING until the worker stops."""
    if record.state in (JobState.QUEUED, JobState.PAUSED):
        return transition(record, JobState.CANCELLED)
    return transition(record, JobState.CANCELLING)


def pause(record: JobRecord) -> JobChange:
    """QUEUED -> PAUSED at once; RUNNING -> PAUSING until the worker has checkpointed and let go."""
    if record.state is JobState.QUEUED:
        return transition(record, JobState.PAUSED, not_before=None)
    return transition(record, JobState.PAUSING)


def resume(record: JobRecord) -> JobChange:
    """PAUSED -> QUEUED: the next attempt resumes from the checkpoint taken when it paused."""
    if record.state is not JobState.PAUSED:  # RUNNING -> QUEUED exists, but only for a lost attempt
        raise IllegalTransition(record.state, JobState.QUEUED)
    return transition(record, JobState.QUEUED, not_before=None)


def paused(record: JobRecord) -> JobChange:
    """The worker checkpointed and let go of the job."""
    if record.state is JobState.CANCELLING:
        return transition(record, JobState.CANCELLED)
    if record.state is JobState.PAUSING:
        return transition(record, JobState.PAUSED, worker=None, start_time=None)
    note = log_event(Severity.WARNING, "the worker stopped the attempt on its own; queued again", record.attempt)
    return transition(record, JobState.QUEUED, extra=[note], worker=None, start_time=None)


def finish(record: JobRecord, succeeded: bool, reason: str, message: str) -> JobChange:
    """The worker ended the attempt. A job being cancelled ends CANCELLED whatever the worker managed."""
    if record.state is JobState.CANCELLING:
        return transition(record, JobState.CANCELLED)
    if succeeded:
        return transition(record, JobState.SUCCEEDED)
    return transition(
        record,
        JobState.FAILED,
        error_reason=reason,
        error_message=message,
        artifact_size=0,
        artifact_sha256="",
        artifact_metrics={},
    )


MAX_BACKOFF_S = 300.0


def restart_delay(restarts_so_far: int, backoff_s: float) -> float:
    """Back-off before the next restart: backoff_s, then doubling, capped at five minutes."""
    return min(MAX_BACKOFF_S, backoff_s * 2**restarts_so_far) if backoff_s > 0 else 0.0


def lose_attempt(record: JobRecord, reason: str, message: str, max_restarts: int, backoff_s: float = 0.0) -> JobChange:
    """The worker died or hung mid-attempt: the job is queued again to resume from its newest checkpoint, after a
    growing back-off (a job that kills every worker must not keep the pool busy), until it has been restarted
    max_restarts times; then it fails with the reason."""
    restarts = record.restarts
    if record.state is JobState.RUNNING and restarts >= max_restarts:
        return finish(record, False, reason, f"{message}; gave up after {restarts} restarts")
    delay_s = restart_delay(restarts, backoff_s)
    wait = f" in {delay_s:.0f} s" if delay_s >= 1 else ""
    note = log_event(
        Severity.WARNING,
        f"{message}; queued again to resume from the newest checkpoint{wait} (restart {restarts + 1} of "
        f"{max_restarts})",
        record.attempt,
    )
    return requeue(record, note, restarts=restarts + 1, not_before=time.time() + delay_s if delay_s else None)


def requeue(record: JobRecord, note: NewEvent, **fields: Any) -> JobChange:
    """A lost attempt: a RUNNING job waits for a new one (resuming from its checkpoint); a CANCELLING one is
    cancelled; a PAUSING one is paused (it resumes from its newest checkpoint)."""
    if record.state is JobState.CANCELLING:
        return transition(record, JobState.CANCELLED)
    if record.state is JobState.PAUSING:
        return transition(record, JobState.PAUSED, extra=[note], worker=None, start_time=None, **fields)
    return transition(record, JobState.QUEUED, extra=[note], worker=None, start_time=None, **fields)
