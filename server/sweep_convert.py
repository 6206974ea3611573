"""Sweep records <-> API messages, and the events that tell of a sweep's changes."""

from __future__ import annotations

from google.protobuf import struct_pb2

from tuneforge.server.convert import timestamp
from tuneforge.server.records import EventRecord, NewEvent
from tuneforge.server.sweep_records import SweepRecord, SweepState, TrialRecord
from tuneforge.v1 import jobs_pb2, sweeps_pb2


def trial_to_proto(trial: TrialRecord) -> sweeps_pb2.Trial:
    message = sweeps_pb2.Trial(
        number=trial.number,
        job=f"jobs/{trial.job_id}" if trial.job_id else "",
        state=sweeps_pb2.Trial.State.Value(trial.state.value),
        value=trial.value if trial.value is not None else (trial.reports[-1][1] if trial.reports else 0.0),
        evaluations=len(trial.reports),
    )
    for name, value in trial.params.items():
        message.params[name].CopyFrom(_value(value))
    if trial.error_reason:
        message.error.CopyFrom(jobs_pb2.JobError(reason=trial.error_reason, message=trial.error_message))
    return message


def sweep_to_proto(record: SweepRecord) -> sweeps_pb2.Sweep:
    sweep = sweeps_pb2.Sweep(
        name=f"sweeps/{record.id}",
        display_name=record.display_name,
        tenant=record.tenant,
        state=sweeps_pb2.Sweep.State.Value(record.state.value),
        create_time=timestamp(record.create_time),
        end_time=timestamp(record.end_time),
        trials=[trial_to_proto(t) for t in record.trials],
        last_event_sequence=record.last_event_sequence,
    )
    sweep.spec.ParseFromString(record.spec)
    sweep.worker_time_used.FromNanoseconds(int(record.worker_seconds * 1e9))
    if record.best_trial is not None:
        sweep.best_trial.CopyFrom(trial_to_proto(record.trials[record.best_trial]))
    if record.error_reason:
        sweep.error.CopyFrom(jobs_pb2.JobError(reason=record.error_reason, message=record.error_message))
    return sweep


def state_event(before: SweepState | None, after: SweepState) -> NewEvent:
    change = sweeps_pb2.SweepStateChange(
        from_state=sweeps_pb2.Sweep.State.Value(before.value) if before else sweeps_pb2.Sweep.STATE_UNSPECIFIED,
        to_state=sweeps_pb2.Sweep.State.Value(after.value),
    )
    return _new(sweeps_pb2.SweepEvent(state_change=change))


def trial_event(trial: TrialRecord) -> NewEvent:
    return _new(sweeps_pb2.SweepEvent(trial=trial_to_proto(trial)))


def best_trial_event(trial: TrialRecord) -> NewEvent:
    return _new(sweeps_pb2.SweepEvent(best_trial=trial_to_proto(trial)))


def sweep_event_to_proto(record: EventRecord) -> sweeps_pb2.SweepEvent:
    event = sweeps_pb2.SweepEvent.FromString(record.payload)
    event.sequence = record.sequence
    event.time.FromNanoseconds(int(record.time * 1e9))
    return event


def _new(event: sweeps_pb2.SweepEvent) -> NewEvent:
    return NewEvent(kind=event.WhichOneof("payload") or "unknown", payload=event.SerializeToString())


def _value(value: object) -> struct_pb2.Value:
    message = struct_pb2.Value()
    if isinstance(value, bool):
        message.bool_value = value
    elif isinstance(value, int | float):
        message.number_value = float(value)
    else:
        message.string_value = str(value)
    return message
