"""The local pool with scripted workers (real spawned processes): messages both ways, deaths reported, replacements
started with a growing delay when a worker cannot start."""

from __future__ import annotations

import queue
import time

import pytest

from tuneforge.server.gpu_partition import AUTO, partition
from tuneforge.workers.messages import DataFile, JobFinished, RunJob, WorkerDied, WorkerEvent
from tuneforge.workers.pool import LocalProcessPool
from tuneforge.workers.spec import DataSettings, TrainingSpec


def collect(pool: LocalProcessPool) -> queue.Queue[tuple[float, WorkerEvent]]:
    events: queue.Queue[tuple[float, WorkerEvent]] = queue.Queue()
    pool.start(lambda event: events.put((time.monotonic(), event)))
    return events


def test_commands_and_events_cross_the_process_boundary() -> None:
    pool = LocalProcessPool(2, entry="tests.fake_workers:echo_worker")
    events = collect(pool)
    try:
        ready = {events.get(timeout=30)[1].worker for _ in range(2)}
        assert ready == {"worker-0", "worker-1"}
        spec = TrainingSpec("text_classification", "m", DataSettings(training_file="files/f"))
        pool.send("worker-1", RunJob("job-a", 3, spec, DataFile("/x", "x.jsonl"), None, "/w", "/w/c", "/a.tar"))
        _, finished = events.get(timeout=30)
        assert isinstance(finished, JobFinished) and (finished.worker, finished.job, finished.attempt) == (
            "worker-1",
            "job-a",
            3,
        )
    finally:
        pool.stop(10)
    assert all(not slot.process.is_alive() for slot in pool._slots.values())


def test_a_worker_that_cannot_start_is_retried_with_growing_delays() -> None:
    pool = LocalProcessPool(1, entry="tests.fake_workers:crash_at_start")
    events = collect(pool)
    try:
        deaths = []
        while len(deaths) < 3:
            at, event = events.get(timeout=30)
            assert isinstance(event, WorkerDied)
            assert event.exitcode == 3
            deaths.append(at)
        first_gap, second_gap = deaths[1] - deaths[0], deaths[2] - deaths[1]
        assert first_gap >= 1.0 and second_gap >= 2.0, (first_gap, second_gap)
    finally:
        pool.stop(10)


def test_each_worker_sees_only_its_share_of_the_gpus() -> None:
    shares = partition(2, AUTO, ["0", "1", "2", "3"])
    assert shares == ["0,1", "2,3"]
    pool = LocalProcessPool(2, entry="tests.fake_workers:report_visible_devices", visible_devices=shares)
    events = collect(pool)
    try:
        seen = {event.worker: event.device for event in (events.get(timeout=30)[1] for _ in range(2))}
    finally:
        pool.stop(10)
    assert seen == {"worker-0": "0,1", "worker-1": "2,3"}


def test_gpu_partition_rules() -> None:
    assert partition(4, AUTO, ["0", "1"]) is None  # fewer GPUs than workers: they share
    assert partition(2, 0, ["0", "1"]) is None  # partitioning off
    assert partition(3, AUTO, ["4", "5", "6", "7"]) == ["4", "5", "6"]  # the server's own CUDA_VISIBLE_DEVICES ids
    assert partition(1, AUTO, ["0", "1", "2"]) == ["0,1,2"]  # one worker owns every GPU: multi-GPU jobs fit
    assert partition(2, 1, []) is None  # no GPU: CPU workers
    with pytest.raises(ValueError, match="need more than the 2 GPUs"):
        partition(2, 2, ["0", "1"])
