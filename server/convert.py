"""Store records <-> API messages, and worker events -> stored job events. The one place the two meet."""

from __future__ import annotations

import functools

from google.protobuf import timestamp_pb2

from tuneforge.server.bounded import bounded
from tuneforge.server.job_states import JobState
from tuneforge.server.names import file_name, job_name
from tuneforge.server.records import EventRecord, FileRecord, JobRecord, NewEvent
from tuneforge.v1 import files_pb2, jobs_pb2
from tuneforge.workers.messages import AutoChosen, CheckpointWritten, EvaluationDone, Severity, TrainingProgress

PURPOSES: dict[str, files_pb2.File.Purpose.ValueType] = {"DATASET": files_pb2.File.DATASET}
SEVERITIES = {
    Severity.DEBUG: jobs_pb2.LogLine.DEBUG,
    Severity.INFO: jobs_pb2.LogLine.INFO,
    Severity.WARNING: jobs_pb2.LogLine.WARNING,
    Severity.ERROR: jobs_pb2.LogLine.ERROR,
}


def timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def state_to_proto(state: JobState) -> jobs_pb2.Job.State.ValueType:
    return jobs_pb2.Job.State.Value(state.value)


def state_from_proto(value: int) -> JobState:
    return JobState(jobs_pb2.Job.State.Name(value))  # type: ignore[arg-type]


def file_to_proto(record: FileRecord) -> files_pb2.File:
    return files_pb2.File(
        name=file_name(record.id),
        filename=record.filename,
        purpose=PURPOSES.get(record.purpose, files_pb2.File.PURPOSE_UNSPECIFIED),
        size_bytes=record.size_bytes,
        sha256=record.sha256,
        create_time=timestamp(record.create_time),
        tenant=record.tenant,
    )


def job_to_proto(record: JobRecord) -> jobs_pb2.Job:
    job = jobs_pb2.Job(
        name=job_name(record.id),
        display_name=record.display_name,
        tenant=record.tenant,
        state=state_to_proto(record.state),
        create_time=timestamp(record.create_time),
        start_time=timestamp(record.start_time),
        end_time=timestamp(record.end_time),
        update_time=timestamp(record.update_time),
        progress=jobs_pb2.Progress(
            step=record.step, total_steps=record.total_steps, epoch=record.epoch, total_epochs=record.total_epochs
        ),
        latest_metrics=record.latest_metrics,
        best_metrics=record.best_metrics,
        attempt=record.attempt,
        last_event_sequence=record.last_event_sequence,
        worker=record.worker or "",
        restart_count=record.restarts,
        sweep=f"sweeps/{record.sweep_id}" if record.sweep_id else "",
        trial_number=record.trial_number,
        auto_choices=record.auto_choices,
    )
    job.run_duration.FromNanoseconds(int(record.run_seconds * 1e9))
    job.spec.ParseFromString(record.spec)
    if record.error_reason:
        job.error.CopyFrom(jobs_pb2.JobError(reason=record.error_reason, message=record.error_message))
    if record.artifact_sha256:
        job.artifact.CopyFrom(_artifact(record))
    return job


def _artifact(record: JobRecord) -> jobs_pb2.Artifact:
    return jobs_pb2.Artifact(
        size_bytes=record.artifact_size, sha256=record.artifact_sha256, metrics=record.artifact_metrics
    )


@functools.lru_cache(maxsize=4096)
def shared_event_proto(record: EventRecord) -> jobs_pb2.JobEvent:
    """event_to_proto, made once for all the streams that send the same event (callers must not change it)."""
    return event_to_proto(record)


def event_to_proto(record: EventRecord) -> jobs_pb2.JobEvent:
    event = jobs_pb2.JobEvent.FromString(record.payload)
    event.sequence = record.sequence
    event.attempt = record.attempt
    event.time.FromNanoseconds(int(record.time * 1e9))
    return event


def _new(event: jobs_pb2.JobEvent, attempt: int) -> NewEvent:
    kind = event.WhichOneof("payload") or "unknown"
    return NewEvent(kind=kind, payload=event.SerializeToString(), attempt=attempt)


def state_change_event(before: JobRecord, after: JobRecord) -> NewEvent:
    change = jobs_pb2.StateChange(from_state=state_to_proto(before.state), to_state=state_to_proto(after.state))
    if after.state is JobState.FAILED:
        change.error.CopyFrom(jobs_pb2.JobError(reason=after.error_reason, message=after.error_message))
    return _new(jobs_pb2.JobEvent(state_change=change), after.attempt)


def log_event(severity: Severity, message: str, attempt: int) -> NewEvent:
    line = jobs_pb2.LogLine(severity=SEVERITIES[severity], message=bounded(message))
    return _new(jobs_pb2.JobEvent(log=line), attempt)


def training_metrics_event(event: TrainingProgress) -> NewEvent:
    metrics = jobs_pb2.TrainingMetrics(
        step=event.step,
        total_steps=event.total_steps,
        epoch=event.epoch,
        loss=event.loss,
        learning_rate=event.learning_rate,
        samples_per_second=event.samples_per_second,
        grad_norm=event.grad_norm,
    )
    return _new(jobs_pb2.JobEvent(training_metrics=metrics), event.attempt)


def evaluation_event(event: EvaluationDone) -> NewEvent:
    metrics = jobs_pb2.EvaluationMetrics(step=event.step, epoch=event.epoch, metrics=event.metrics)
    return _new(jobs_pb2.JobEvent(evaluation_metrics=metrics), event.attempt)


def checkpoint_event(event: CheckpointWritten) -> NewEvent:
    saved = jobs_pb2.CheckpointSaved(step=event.step, size_bytes=event.size_bytes)
    return _new(jobs_pb2.JobEvent(checkpoint_saved=saved), event.attempt)


def artifact_event(record: JobRecord) -> NewEvent:
    ready = jobs_pb2.ArtifactReady(artifact=_artifact(record))
    return _new(jobs_pb2.JobEvent(artifact_ready=ready), record.attempt)


def created_event(record: JobRecord) -> NewEvent:
    """The first event of every job: it entered QUEUED."""
    change = jobs_pb2.StateChange(from_state=jobs_pb2.Job.STATE_UNSPECIFIED, to_state=state_to_proto(record.state))
    return _new(jobs_pb2.JobEvent(state_change=change), record.attempt)


def auto_choice_event(event: AutoChosen) -> NewEvent:
    choice = jobs_pb2.AutoChoice(
        field=event.field,
        value=event.value,
        reason=event.reason,
        evidence=[jobs_pb2.EvidencePoint(x=x, y=y) for x, y in event.evidence],
    )
    return _new(jobs_pb2.JobEvent(auto_choice=choice), event.attempt)
