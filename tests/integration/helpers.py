"""Spec builders and event-driven waits for the integration tests (no sleeps: every wait follows a stream)."""

from __future__ import annotations

import os
import select
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.processes import processes
from tuneforge.clients.client import TuneforgeClient, TuneforgeError
from tuneforge.v1 import job_spec_pb2 as pb
from tuneforge.v1 import jobs_pb2

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


def refused(call: object) -> TuneforgeError:
    """The TuneforgeError a call fails with (the test fails if it succeeds)."""
    assert callable(call)
    with pytest.raises(TuneforgeError) as error:
        call()
    return error.value


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


def worker_pids(server_pid: int) -> dict[str, int]:
    """The server's worker processes by worker name (each names itself `tf-worker-N` in /proc)."""
    return {
        p.name.removeprefix("tf-"): p.pid
        for p in processes()
        if p.parent == server_pid and p.name.startswith("tf-worker-")
    }


def wait_for_exit(pid: int, timeout_s: float) -> bool:
    """Waits (on a pidfd, no polling) until the process is gone; False if it outlived timeout_s."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout_s)
        return bool(readable)
    finally:
        os.close(fd)


def state_changes(events: list[jobs_pb2.JobEvent]) -> list[int]:
    return [e.state_change.to_state for e in events if e.WhichOneof("payload") == "state_change"]


def log_lines(events: list[jobs_pb2.JobEvent]) -> list[str]:
    return [e.log.message for e in events if e.WhichOneof("payload") == "log"]


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> tuple[str, Samples]:
    """The exposition text at url and its samples by (name, labels)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return text, samples


def sample(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when the series does not exist yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


POLL_PAUSE_S = 0.05


def poll_pause() -> None:
    """A short pause between two polls of a condition that has its own deadline (the check decides; the pause only
    keeps the loop from spinning a core the server needs)."""
    time.sleep(POLL_PAUSE_S)


def scrape_until(url: str, done: Callable[[Samples], bool], timeout_s: float) -> tuple[str, Samples]:
    """Scrapes until done(samples) holds; the last scrape, whatever it says, once timeout_s has passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        text, samples = scrape(url)
        if done(samples) or time.monotonic() > deadline:
            return text, samples
        poll_pause()


def wait_for_state(client: TuneforgeClient, name: str, state: int, timeout_s: float = 120) -> jobs_pb2.Job:
    """The job once it reached `state` (its events replayed and followed until the change shows)."""
    for event in client.watch(name, timeout_s=timeout_s):
        if event.state_change.to_state == state:
            return client.get_job(name)
    raise AssertionError(f"{name} ended without reaching state {state}")
