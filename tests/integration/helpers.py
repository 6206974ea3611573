"""Spec builders and event-driven waits for the integration tests (no sleeps: every wait follows a stream)."""

from __future__ import annotations

from pathlib import Path

from tuneforge.v1 import job_spec_pb2 as pb
from tuneforge.v1 import jobs_pb2

from clients.client import TuneforgeClient

STATE = jobs_pb2.Job.State


def text_spec(model: Path, training_file: str, epochs: int = 8, **data: object) -> pb.JobSpec:
    """A job on the tiny BERT that learns the keyword data in a few seconds."""
    return pb.JobSpec(
        task=pb.TEXT_CLASSIFICATION,
        base_model=str(model),
        data=pb.DataSpec(training_file=training_file, validation_fraction=0.25, **data),  # type: ignore[arg-type]
        hyperparameters=pb.Hyperparameters(
            epochs=epochs, batch_size=8, learning_rate=2e-3, seed=1, schedule=pb.Schedule(kind=pb.Schedule.CONSTANT)
        ),
        evaluation=pb.EvaluationSpec(log_every_steps=4),
    )


def long_spec(model: Path, training_file: str) -> pb.JobSpec:
    """A job that trains until cancelled (well, for 1000 epochs)."""
    spec = text_spec(model, training_file, epochs=1000)
    spec.evaluation.log_every_steps = 1
    return spec


def watch_until(client: TuneforgeClient, name: str, payload: str, timeout_s: float = 120) -> jobs_pb2.JobEvent:
    """Follows the job's stream until an event with this payload arrives."""
    for event in client.watch(name, timeout_s=timeout_s):
        if event.WhichOneof("payload") == payload:
            return event
    raise AssertionError(f"{name} ended without a {payload} event")


def wait_for_end(client: TuneforgeClient, name: str, timeout_s: float = 120) -> jobs_pb2.Job:
    """Follows the job's stream to its end and returns the final job."""
    for _ in client.watch(name, timeout_s=timeout_s):
        pass
    return client.get_job(name)
