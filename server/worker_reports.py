"""What one worker report does to its job, as pure functions: progress, evaluations, logs, checkpoints, automatic
choices and the artifact update the job record and add events; a worker's death gets its metrics label. The
scheduler applies these in the store, fenced on the attempt that holds the job."""

from __future__ import annotations

import time
from dataclasses import replace

from tuneforge.server import convert
from tuneforge.server.records import JobChange, JobRecord
from tuneforge.workers.messages import (
    ArtifactWritten,
    AutoChosen,
    CheckpointWritten,
    EvaluationDone,
    Heartbeat,
    JobEventBase,
    JobStarted,
    LogEmitted,
    TrainingProgress,
    WorkerDied,
)


def report_change(record: JobRecord, event: JobEventBase) -> JobChange | None:
    """How a progress report from the holding worker changes the job (no state change)."""
    match event:
        case JobStarted():
            return JobChange(replace(record, total_steps=event.total_steps, total_epochs=event.total_epochs))
        case Heartbeat():
            return JobChange(replace(record, heartbeat_time=time.time()))
        case TrainingProgress():
            latest = {
                **record.latest_metrics,
                "loss": event.loss,
                "learning_rate": event.learning_rate,
                "samples_per_second": event.samples_per_second,
            }
            return JobChange(
                replace(
                    record,
                    step=event.step,
                    total_steps=event.total_steps,
                    epoch=event.epoch,
                    latest_metrics=latest,
                    heartbeat_time=time.time(),
                ),
                [convert.training_metrics_event(event)],
            )
        case EvaluationDone():
            best = record.best_metrics
            if not best or event.metrics.get("eval_loss", float("inf")) < best.get("eval_loss", float("inf")):
                best = dict(event.metrics)
            return JobChange(
                replace(record, latest_metrics={**record.latest_metrics, **event.metrics}, best_metrics=best),
                [convert.evaluation_event(event)],
            )
        case LogEmitted():
            return JobChange(record, [convert.log_event(event.severity, event.message, event.attempt)])
        case CheckpointWritten():
            return JobChange(record, [convert.checkpoint_event(event)])
        case AutoChosen():
            choices = {**record.auto_choices, event.field: event.value}
            return JobChange(replace(record, auto_choices=choices), [convert.auto_choice_event(event)])
        case ArtifactWritten():
            updated = replace(
                record, artifact_size=event.size_bytes, artifact_sha256=event.sha256, artifact_metrics=event.metrics
            )
            return JobChange(updated, [convert.artifact_event(updated)])
    return None


def death_reason(event: WorkerDied, killed_by_server: bool) -> str:
    """The `reason` label of a worker restart."""
    if killed_by_server:
        return "killed_by_server"
    if event.exitcode is None or event.exitcode < 0:
        return "signal"
    return "error_exit" if event.exitcode else "clean_exit"
