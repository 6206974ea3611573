"""The one job state machine: the states, the allowed moves, and the error for an illegal one."""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    """Where a job is in its life."""

    QUEUED = "QUEUED"
    """Waiting for a worker."""
    RUNNING = "RUNNING"
    """A worker holds the job's lease and trains it."""
    SUCCEEDED = "SUCCEEDED"
    """Finished with an artifact."""
    FAILED = "FAILED"
    """Ended with an error (reason and message on the job)."""
    CANCELLING = "CANCELLING"
    """Cancel requested; waiting for the worker to stop."""
    CANCELLED = "CANCELLED"
    """Cancelled."""
    PAUSING = "PAUSING"
    """Pause requested; waiting for the worker to checkpoint and let go."""
    PAUSED = "PAUSED"
    """Holds no worker; ResumeJob queues it again."""


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
ACTIVE = frozenset({JobState.RUNNING, JobState.CANCELLING, JobState.PAUSING})
"""States in which a worker holds the job."""

ALLOWED: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.FAILED, JobState.PAUSED}),
    # RUNNING -> QUEUED: the attempt was lost (dead or hung worker, server restart) and waits for a new one.
    JobState.RUNNING: frozenset(
        {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLING, JobState.QUEUED, JobState.PAUSING}
    ),
    JobState.CANCELLING: frozenset({JobState.CANCELLED}),
    # PAUSING -> SUCCEEDED or FAILED: the attempt ended on its own before it saw the pause.
    JobState.PAUSING: frozenset({JobState.PAUSED, JobState.CANCELLING, JobState.SUCCEEDED, JobState.FAILED}),
    JobState.PAUSED: frozenset({JobState.QUEUED, JobState.CANCELLED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


class IllegalTransition(Exception):
    """A move the table does not allow (FAILED_PRECONDITION at the API edge)."""

    def __init__(self, current: StrEnum, target: StrEnum, kind: str = "job"):
        super().__init__(f"a {kind} in state {current.value} cannot become {target.value}")
        self.current = current
        self.target = target


def check_transition(current: JobState, target: JobState) -> None:
    """Raises IllegalTransition unless current -> target is allowed."""
    if target not in ALLOWED[current]:
        raise IllegalTransition(current, target)
