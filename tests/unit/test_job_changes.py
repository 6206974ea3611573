"""The pure job changes: restarts with back-off, the fence, pause and resume, and run time over attempts."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from tuneforge.server.job_changes import (
    MAX_BACKOFF_S,
    cancel,
    claim,
    finish,
    held_by,
    lose_attempt,
    pause,
    paused,
    requeue,
    restart_delay,
    resume,
)
from tuneforge.server.job_states import IllegalTransition, JobState
from tuneforge.server.records import JobRecord, NewEvent


def queued() -> JobRecord:
    now = time.time()
    return JobRecord(
        id="j", display_name="", spec=b"", priority=0, state=JobState.QUEUED, create_time=now, update_time=now
    )


def running(worker: str = "worker-0") -> JobRecord:
    return claim(worker)(queued()).record


def test_a_lost_attempt_requeues_with_a_doubling_back_off_then_fails() -> None:
    record = running()
    delays = []
    for restart in range(3):
        change = lose_attempt(record, "WORKER_LOST", "worker-0 died", max_restarts=3, backoff_s=2.0)
        record = change.record
        assert record.state is JobState.QUEUED and record.restarts == restart + 1 and record.worker is None
        assert record.not_before is not None
        delays.append(record.not_before - time.time())
        record = claim("worker-1")(record).record
        assert record.not_before is None, "a claim clears the back-off"
    assert [round(d) for d in delays] == [2, 4, 8]
    final = lose_attempt(record, "WORKER_LOST", "worker-1 died", max_restarts=3, backoff_s=2.0).record
    assert final.state is JobState.FAILED and final.error_reason == "WORKER_LOST"
    assert "gave up after 3 restarts" in final.error_message


def test_back_off_is_capped_and_zero_means_none() -> None:
    assert restart_delay(20, 1.0) == MAX_BACKOFF_S
    assert restart_delay(3, 0.0) == 0.0
    assert lose_attempt(running(), "WORKER_LOST", "gone", 3, 0.0).record.not_before is None


def test_the_fence_admits_only_the_holding_worker_and_attempt() -> None:
    record = running("worker-0")
    assert held_by(record, "worker-0", 1)
    assert not held_by(record, "worker-1", 1)
    assert not held_by(record, "worker-0", 2)
    requeued = lose_attempt(record, "WORKER_LOST", "silent", 3).record
    assert not held_by(requeued, "worker-0", 1), "a job taken away is held by nobody"
    second = claim("worker-1")(requeued).record
    assert not held_by(second, "worker-0", 1) and held_by(second, "worker-1", 2)


def test_pause_and_resume_from_each_state() -> None:
    assert pause(queued()).record.state is JobState.PAUSED
    pausing = pause(running()).record
    assert pausing.state is JobState.PAUSING and pausing.worker == "worker-0"
    stopped = paused(pausing).record
    assert stopped.state is JobState.PAUSED and stopped.worker is None
    assert resume(stopped).record.state is JobState.QUEUED
    assert cancel(stopped).record.state is JobState.CANCELLED, "a paused job can be cancelled"
    assert cancel(pausing).record.state is JobState.CANCELLING
    assert finish(pausing, True, "", "").record.state is JobState.SUCCEEDED, "it finished before it saw the pause"
    note = NewEvent("log", b"")
    assert requeue(pausing, note).record.state is JobState.PAUSED, "a worker lost while pausing leaves it paused"
    with pytest.raises(IllegalTransition):
        resume(running())
    with pytest.raises(IllegalTransition):
        pause(stopped)


def test_run_time_adds_up_over_attempts() -> None:
    record = running()
    record = replace(record, start_time=time.time() - 10)
    record = lose_attempt(record, "WORKER_LOST", "gone", 3).record
    assert 9.5 < record.run_seconds < 11
    record = replace(claim("worker-1")(record).record, start_time=time.time() - 5)
    record = finish(record, True, "", "").record
    assert 14.5 < record.run_seconds < 16.5
