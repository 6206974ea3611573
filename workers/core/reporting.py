"""The training core's only way out: typed events sent through a callable, and the cancel flag coming in.

The core knows nothing about how events travel (a pipe to a local worker, a Ray actor call) or what the server makes
of them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from tuneforge.workers.core.errors import TrainingCancelled
from tuneforge.workers.logs import INTERNAL_MARK
from tuneforge.workers.messages import (
    ArtifactWritten,
    AutoChosen,
    CheckpointWritten,
    EvaluationDone,
    JobStarted,
    LogEmitted,
    Severity,
    TrainingProgress,
    WorkerEvent,
)

log = logging.getLogger("tuneforge.workers.job")
LEVELS = {
    Severity.DEBUG: logging.DEBUG,
    Severity.INFO: logging.INFO,
    Severity.WARNING: logging.WARNING,
    Severity.ERROR: logging.ERROR,
}


@dataclass
class Reporter:
    """Stamps every event with the worker, job and attempt, and carries the attempt's cancel flag."""

    send: Callable[[WorkerEvent], None]
    worker: str
    job: str
    attempt: int
    cancel_flag: threading.Event
    checkpoint_flag: threading.Event = field(default_factory=threading.Event)
    """Set before cancel_flag for a pause or a shutdown: the attempt checkpoints before it stops."""

    @property
    def stop_requested(self) -> bool:
        return self.cancel_flag.is_set()

    def check_cancelled(self) -> None:
        """Raises TrainingCancelled once the server asked this attempt to stop."""
        if self.cancel_flag.is_set():
            raise TrainingCancelled()

    def log(self, message: str, severity: Severity = Severity.INFO) -> None:
        """A line of the job's log: an event for watchers, and a line in the process's own log."""
        self.send(LogEmitted(self.worker, self.job, self.attempt, severity=severity, message=message))
        extra = {"job": self.job, "attempt": self.attempt, INTERNAL_MARK: True}
        log.log(LEVELS[severity], message, extra=extra)

    def started(self, total_steps: int, total_epochs: int) -> None:
        self.send(JobStarted(self.worker, self.job, self.attempt, total_steps=total_steps, total_epochs=total_epochs))

    def progress(self, **values: float) -> None:
        self.send(TrainingProgress(self.worker, self.job, self.attempt, **values))  # type: ignore[arg-type]

    def evaluation(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        self.send(EvaluationDone(self.worker, self.job, self.attempt, step=step, epoch=epoch, metrics=metrics))

    def checkpoint(self, step: int, size_bytes: int, path: str, seconds: float = 0.0) -> None:
        self.send(
            CheckpointWritten(
                self.worker, self.job, self.attempt, step=step, size_bytes=size_bytes, path=path, seconds=seconds
            )
        )

    def artifact(self, size_bytes: int, sha256: str, metrics: dict[str, float]) -> None:
        self.send(
            ArtifactWritten(self.worker, self.job, self.attempt, size_bytes=size_bytes, sha256=sha256, metrics=metrics)
        )

    def auto_chosen(self, field: str, value: float, reason: str, evidence: list[tuple[float, float]]) -> None:
        self.send(
            AutoChosen(
                self.worker, self.job, self.attempt, field=field, value=value, reason=reason, evidence=tuple(evidence)
            )
        )
