"""Restarting the server on the same data dir keeps every file, job and event; a watcher rides through the restart;
a job that was running gets a new attempt; SIGTERM ends the process cleanly."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
from pathlib import Path

import grpc
import pytest

from tests.integration.conftest import SERVER_ARGS
from tests.integration.helpers import (
    STATE,
    log_lines,
    long_spec,
    state_changes,
    text_spec,
    wait_for_end,
    watch_until,
    worker_pids,
)
from tuneforge.clients.client import TuneforgeClient, TuneforgeError
from tuneforge.clients.local_server import start_local_server
from tuneforge.v1 import jobs_pb2

pytestmark = pytest.mark.integration


def port_of(target: str) -> int:
    return int(target.rsplit(":", 1)[1])


def test_restart_keeps_everything_and_watchers_resume(
    tmp_path: Path, model_root: Path, tiny_bert: Path, keyword_dataset: Path
) -> None:
    data_dir = tmp_path / "data"
    # First life: no workers, so the job waits in the queue while the server goes down.
    first = start_local_server(data_dir, workers=0, model_roots=[model_root], extra_args=SERVER_ARGS)
    client = TuneforgeClient(first.target)
    try:
        client.wait_until_serving(60)
        file = client.upload_file(keyword_dataset)
        job = client.create_job(text_spec(tiny_bert, file.name), display_name="survivor")
        seen: list[jobs_pb2.JobEvent] = []
        first_event = threading.Event()

        def watch() -> None:
            for event in client.watch(job.name, reconnect_for_s=90, timeout_s=240):
                seen.append(event)
                first_event.set()

        watcher = threading.Thread(target=watch)
        watcher.start()
        assert first_event.wait(30), "the watcher saw the QUEUED event"
        assert first.stop() == 0
        with sqlite3.connect(data_dir / "tuneforge.db") as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

        # Second life on the same port and data dir, now with a worker: the job runs and the watcher resumes.
        second = start_local_server(
            data_dir, workers=1, model_roots=[model_root], extra_args=SERVER_ARGS, port=port_of(first.target)
        )
        try:
            watcher.join(240)
            assert not watcher.is_alive()
            assert [e.sequence for e in seen] == list(range(1, len(seen) + 1)), "no event lost or repeated"
            assert seen[-1].state_change.to_state == STATE.SUCCEEDED
            assert client.get_file(file.name).sha256 == file.sha256
            restored = client.get_job(job.name)
            assert restored.display_name == "survivor" and restored.create_time == job.create_time
            assert restored.state == STATE.SUCCEEDED
            assert [e.sequence for e in client.list_job_events(job.name)] == [e.sequence for e in seen]
        finally:
            assert second.stop() == 0
    finally:
        client.close()


def test_a_job_running_at_shutdown_checkpoints_and_resumes(
    tmp_path: Path, model_root: Path, tiny_bert: Path, keyword_dataset: Path
) -> None:
    data_dir = tmp_path / "data"
    first = start_local_server(data_dir, workers=1, model_roots=[model_root], extra_args=SERVER_ARGS)
    with TuneforgeClient(first.target) as client:
        client.wait_until_serving(60)
        file = client.upload_file(keyword_dataset)
        job = client.create_job(long_spec(tiny_bert, file.name))
        seen = watch_until(client, job.name, "training_metrics").training_metrics.step
    assert first.stop() == 0, "SIGTERM stops the server and its busy worker cleanly"

    second = start_local_server(data_dir, workers=1, model_roots=[model_root], extra_args=SERVER_ARGS)
    try:
        with TuneforgeClient(second.target) as client:
            client.wait_until_serving(60)
            for event in client.watch(job.name, timeout_s=120):
                if event.attempt == 2 and event.WhichOneof("payload") == "training_metrics":
                    break
            events = client.list_job_events(job.name)
            notes = log_lines(events)
            assert any("server restarted during attempt 1" in n for n in notes)
            resumed = [n for n in notes if n.startswith("resumed from the checkpoint at step")]
            assert resumed, "the worker checkpointed on SIGTERM and the new attempt resumed from it"
            assert int(resumed[0].split("step ")[1].split(" ")[0]) >= seen
            assert state_changes(events) == [STATE.QUEUED, STATE.RUNNING, STATE.QUEUED, STATE.RUNNING]
            assert client.get_job(job.name).attempt == 2
            client.cancel_job(job.name)
            assert wait_for_end(client, job.name).state == STATE.CANCELLED
    finally:
        assert second.stop() == 0


def test_a_killed_worker_fails_its_job_when_no_restarts_are_allowed(
    tmp_path: Path, model_root: Path, tiny_bert: Path, keyword_dataset: Path
) -> None:
    server = start_local_server(
        tmp_path / "data", workers=1, model_roots=[model_root], extra_args=[*SERVER_ARGS, "--max-restarts", "0"]
    )
    try:
        with TuneforgeClient(server.target) as client:
            client.wait_until_serving(60)
            file = client.upload_file(keyword_dataset)
            job = client.create_job(long_spec(tiny_bert, file.name))
            watch_until(client, job.name, "training_metrics")
            [worker_pid] = worker_pids(server.process.pid).values()
            os.kill(worker_pid, signal.SIGKILL)
            final = wait_for_end(client, job.name)
            assert final.state == STATE.FAILED and final.error.reason == "WORKER_LOST"
            assert "exited (code -9) during the job; gave up after 0 restarts" in final.error.message
            # The pool started a replacement: the next job runs to the end.
            after = client.create_job(text_spec(tiny_bert, file.name, epochs=1))
            assert wait_for_end(client, after.name).state == STATE.SUCCEEDED
            assert list(worker_pids(server.process.pid).values()) != [worker_pid]
    finally:
        assert server.stop() == 0


def test_a_killed_worker_s_job_resumes_from_its_checkpoint(
    tmp_path: Path, model_root: Path, tiny_bert: Path, keyword_dataset: Path
) -> None:
    server = start_local_server(tmp_path / "data", workers=1, model_roots=[model_root], extra_args=SERVER_ARGS)
    try:
        with TuneforgeClient(server.target) as client:
            client.wait_until_serving(60)
            file = client.upload_file(keyword_dataset)
            spec = text_spec(tiny_bert, file.name, epochs=10)  # 120 steps: most of them after the kill
            spec.evaluation.checkpoint_every_steps = 8
            job = client.create_job(spec)
            saved = watch_until(client, job.name, "checkpoint_saved")
            [worker_pid] = worker_pids(server.process.pid).values()
            os.kill(worker_pid, signal.SIGKILL)
            final = wait_for_end(client, job.name, timeout_s=180)
            assert final.state == STATE.SUCCEEDED and final.attempt == 2, final.error
            events = client.list_job_events(job.name)
            assert [e.sequence for e in events] == list(range(1, len(events) + 1))
            notes = log_lines(events)
            assert any("queued again to resume from the newest checkpoint in 5 s (restart 1 of 3)" in n for n in notes)
            resumed = [n for n in notes if n.startswith("resumed from the checkpoint at step")]
            assert resumed and int(resumed[0].split("step ")[1].split(" ")[0]) >= saved.checkpoint_saved.step
            second = [
                e.training_metrics.step
                for e in events
                if e.WhichOneof("payload") == "training_metrics" and e.attempt == 2
            ]
            assert second[0] > saved.checkpoint_saved.step, "the second attempt did not start from step 0"
            assert not (server.data_dir / "work" / job.name.removeprefix("jobs/")).exists(), "checkpoints pruned"
    finally:
        assert server.stop() == 0


def test_an_accepted_job_trains_its_accepted_spec_after_a_restart_with_other_model_roots(
    tmp_path: Path, model_root: Path, tiny_bert: Path, keyword_dataset: Path
) -> None:
    """Accepted while the tiny model's folder is under a model root, queued (no workers), then the server restarts
    with another model root: the job still trains what was accepted, while a new job naming that folder is refused."""
    data_dir = tmp_path / "data"
    first = start_local_server(data_dir, workers=0, model_roots=[model_root], extra_args=SERVER_ARGS)
    try:
        with TuneforgeClient(first.target) as client:
            client.wait_until_serving(60)
            file = client.upload_file(keyword_dataset).name
            job = client.create_job(text_spec(tiny_bert, file, epochs=1)).name
            assert client.get_job(job).state == STATE.QUEUED
    finally:
        assert first.stop() == 0
    elsewhere = tmp_path / "other-models"
    elsewhere.mkdir()
    second = start_local_server(data_dir, workers=1, model_roots=[elsewhere], extra_args=SERVER_ARGS)
    try:
        with TuneforgeClient(second.target) as client:
            client.wait_until_serving(120)
            final = wait_for_end(client, job)
            assert final.state == STATE.SUCCEEDED, final.error
            with pytest.raises(TuneforgeError) as refused:
                client.create_job(text_spec(tiny_bert, file, epochs=1))
            assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert set(refused.value.field_violations) == {"job.spec.base_model"}
    finally:
        assert second.stop() == 0
