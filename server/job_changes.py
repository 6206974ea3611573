"""Pure changes to a job record, each returning the new record and the events that tell of it.

The store applies them atomically; nothing here does I/O. Changes that come from a worker are fenced: they apply only
to the attempt and worker that currently hold the job, so a stale worker cannot change it.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from server.convert import log_event, state_change_event
from server.job_states import ACTIVE, JobState, check_transition
from server.records import JobChange, JobRecord, NewEvent
from workers.messages import Severity


def transition(record: JobRecord, target: JobState, extra: list[NewEvent] | None = None, **fields: Any) -> JobChange:
    """Moves the job to target (IllegalTransition if the table forbids it), with a state-change event last."""
    check_transition(record.state, target)
    now = time.time()
    if target in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED):
        fields.setdefault("end_time", now)
        fields.setdefault("worker", None)
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
        )

    return change


def held_by(record: JobRecord, worker: str, attempt: int) -> bool:
    """The fence: is this worker's attempt the one that currently holds the job?"""
    return record.state in ACTIVE and record.worker == worker and record.attempt == attempt


def cancel(record: JobRecord) -> JobChange:
    """QUEUED -> CANCELLED at once; RUNNING -> CANCELLING until the worker stops."""
    if record.state is JobState.QUEUED:
        return transition(record, JobState.CANCELLED)
    return transition(record, JobState.CANCELLING)


def finish(record: JobRecord, succeeded: bool, reason: str, message: str) -> JobChange:
    """The worker ended the attempt. A job being cancelled ends CANCELLED whatever the worker managed."""
    if record.state is JobState.CANCELLING:
        return transition(record, JobState.CANCELLED)
    if succeeded:
        return transition(record, JobState.SUCCEEDED)
    return transition(record, JobState.FAILED, error_reason=reason, error_message=message)


def lose_attempt(record: JobRecord, reason: str, message: str, max_restarts: int) -> JobChange:
    """The worker vanished mid-attempt: the job is queued again to resume from its newest checkpoint, until it has
    been restarted max_restarts times; then it fails with the reason."""
    restarts = record.attempt - 1
    if record.state is JobState.RUNNING and restarts >= max_restarts:
        return finish(record, False, reason, f"{message}; gave up after {restarts} restarts")
    note = log_event(
        Severity.WARNING,
        f"{message}; queued again to resume from the newest checkpoint (restart {restarts + 1} of {max_restarts})",
        record.attempt,
    )
    return requeue(record, note)


def requeue(record: JobRecord, note: NewEvent) -> JobChange:
    """A lost attempt: a RUNNING job waits for a new one (resuming from its checkpoint); a CANCELLING one is
    cancelled."""
    if record.state is JobState.CANCELLING:
        return transition(record, JobState.CANCELLED)
    return transition(record, JobState.QUEUED, extra=[note], worker=None, start_time=None)
