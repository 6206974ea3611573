"""Faults through the real server and real workers: a stopped worker loses its lease and its late reports are
ignored; a worker deaf to a cancel is killed; a poison job backs off and fails without starving others; pause and
resume; max_runtime; a diverging loss; out of memory; a full disk. After each, the server keeps serving."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
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
    wait_for_exit,
    watch_until,
    worker_pids,
)
from tuneforge.clients.client import TuneforgeClient, TuneforgeError
from tuneforge.clients.local_server import LocalServer, start_local_server
from tuneforge.workers.core.faults import ENVIRONMENT_VARIABLE

pytestmark = pytest.mark.integration

POISON = "poison.jsonl"
DIVERGING = "diverging.jsonl"
FULL_DISK = "full-disk.jsonl"
FAULTS = {
    "disk_full_for_training_file": FULL_DISK,
    "exit_when_training_file": POISON,
    "oom_above_micro_batch": 4,
    "non_finite_loss_at_steps": [3],
    "non_finite_only_for_training_file": DIVERGING,
}
FAULT_ARGS = [
    *SERVER_ARGS,
    *("--lease-timeout-s", "3", "--heartbeat-interval-s", "0.3", "--kill-grace-s", "8"),
    *("--restart-backoff-s", "1", "--max-restarts", "2"),
]


@dataclass
class FaultServer:
    server: LocalServer
    work: Path
    """The work folder (checkpoints, scratch), on its own small tmpfs when `small_disk`."""
    small_disk: bool


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory: pytest.TempPathFactory, model_root: Path) -> Iterator[FaultServer]:
    data_dir = tmp_path_factory.mktemp("fault-server")
    work = data_dir / "work"
    work.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(work)]
    small_disk = os.geteuid() == 0 and subprocess.run(mount, check=False).returncode == 0
    running = start_local_server(data_dir, 2, [model_root], FAULT_ARGS, env={ENVIRONMENT_VARIABLE: json.dumps(FAULTS)})
    try:
        with TuneforgeClient(running.target) as client:
            client.wait_until_serving(120)
        yield FaultServer(running, work, small_disk)
    finally:
        code = running.stop()
        if small_disk:
            subprocess.run(["umount", "-l", str(work)], check=True)
        assert code == 0


@pytest.fixture
def fclient(fault_server: FaultServer) -> Iterator[TuneforgeClient]:
    with TuneforgeClient(fault_server.server.target, timeout_s=30) as connected:
        yield connected


@pytest.fixture(scope="module")
def data_file(fault_server: FaultServer, keyword_dataset: Path) -> str:
    with TuneforgeClient(fault_server.server.target) as connected:
        return connected.upload_file(keyword_dataset).name


def holder_pid(fault_server: FaultServer, client: TuneforgeClient, job: str) -> tuple[str, int]:
    holder = client.get_job(job).worker
    return holder, worker_pids(fault_server.server.process.pid)[holder]


def test_a_stopped_worker_loses_its_lease_and_its_late_reports_are_ignored(
    fault_server: FaultServer, fclient: TuneforgeClient, data_file: str, tiny_bert: Path
) -> None:
    job = fclient.create_job(long_spec(tiny_bert, data_file))
    watch_until(fclient, job.name, "training_metrics")
    holder, pid = holder_pid(fault_server, fclient, job.name)
    os.kill(pid, signal.SIGSTOP)
    try:
        for event in fclient.watch(job.name, timeout_s=60):
            if event.attempt == 2 and event.state_change.to_state == STATE.RUNNING:
                moved_at = event.sequence
                break
        moved = fclient.get_job(job.name)
        assert moved.worker not in ("", holder) and moved.restart_count == 1
    finally:
        os.kill(pid, signal.SIGCONT)  # it wakes before the kill grace ends: everything it says is stale

    # Once the woken worker lets go of attempt 1 it is idle again, so this job can only run on it.
    other = fclient.create_job(text_spec(tiny_bert, data_file, epochs=1))
    assert wait_for_end(fclient, other.name).state == STATE.SUCCEEDED
    assert worker_pids(fault_server.server.process.pid)[holder] == pid, "the woken worker was not killed"
    current = fclient.get_job(job.name)
    assert (current.state, current.attempt) == (STATE.RUNNING, 2), "its late finish did not end the job"
    events = fclient.list_job_events(job.name)
    assert [e.sequence for e in events if e.sequence > moved_at and e.attempt == 1] == [], "late reports rejected"
    assert any(f"{holder} sent nothing for" in line and "its lease expired" in line for line in log_lines(events))
    fclient.cancel_job(job.name)
    assert wait_for_end(fclient, job.name).state == STATE.CANCELLED


def test_cancel_frees_a_worker_that_does_not_listen(
    fault_server: FaultServer, fclient: TuneforgeClient, data_file: str, tiny_bert: Path
) -> None:
    job = fclient.create_job(long_spec(tiny_bert, data_file))
    watch_until(fclient, job.name, "training_metrics")
    _, pid = holder_pid(fault_server, fclient, job.name)
    os.kill(pid, signal.SIGSTOP)
    started = time.monotonic()
    assert fclient.cancel_job(job.name).state == STATE.CANCELLING
    assert wait_for_end(fclient, job.name, timeout_s=60).state == STATE.CANCELLED
    assert time.monotonic() - started < 15, "cancelled within seconds although the worker never answered"
    assert wait_for_exit(pid, 30), "the deaf worker was killed"
    after = fclient.create_job(text_spec(tiny_bert, data_file, epochs=1))
    assert wait_for_end(fclient, after.name, timeout_s=180).state == STATE.SUCCEEDED


def test_a_poison_job_backs_off_and_fails_without_starving_others(
    fault_server: FaultServer, fclient: TuneforgeClient, data_file: str, tiny_bert: Path, keyword_dataset: Path
) -> None:
    poison_path = keyword_dataset.parent / POISON
    shutil.copy(keyword_dataset, poison_path)
    poison = fclient.create_job(text_spec(tiny_bert, fclient.upload_file(poison_path).name, epochs=1))
    healthy = [fclient.create_job(text_spec(tiny_bert, data_file, epochs=2)) for _ in range(2)]
    final = wait_for_end(fclient, poison.name, timeout_s=240)
    assert (final.state, final.error.reason) == (STATE.FAILED, "WORKER_LOST")
    assert "gave up after 2 restarts" in final.error.message and final.restart_count == 2
    notes = log_lines(fclient.list_job_events(poison.name))
    assert any("in 1 s (restart 1 of 2)" in n for n in notes) and any("in 2 s (restart 2 of 2)" in n for n in notes)
    for job in healthy:
        assert wait_for_end(fclient, job.name, timeout_s=240).state == STATE.SUCCEEDED


def test_pause_checkpoints_frees_the_worker_and_resume_continues(
    fault_server: FaultServer, fclient: TuneforgeClient, data_file: str, tiny_bert: Path
) -> None:
    spec = text_spec(tiny_bert, data_file, epochs=40)
    spec.evaluation.log_every_steps = 1
    job = fclient.create_job(spec)
    watch_until(fclient, job.name, "training_metrics")
    assert fclient.pause_job(job.name).state == STATE.PAUSING
    for event in fclient.watch(job.name, timeout_s=60):
        if event.state_change.to_state == STATE.PAUSED:
            break
    paused = fclient.get_job(job.name)
    assert paused.state == STATE.PAUSED and paused.worker == "" and paused.restart_count == 0
    with pytest.raises(TuneforgeError) as again:
        fclient.pause_job(job.name)
    assert again.value.code == grpc.StatusCode.FAILED_PRECONDITION
    checkpointed = [n for n in log_lines(fclient.list_job_events(job.name)) if n.startswith("stopping: checkpointed")]
    assert checkpointed, "the worker saved a checkpoint before it let go"
    step = int(checkpointed[0].split("step ")[1].split(" ")[0])

    assert fclient.resume_job(job.name).state == STATE.QUEUED
    final = wait_for_end(fclient, job.name, timeout_s=180)
    assert (final.state, final.attempt, final.restart_count) == (STATE.SUCCEEDED, 2, 0)
    events = fclient.list_job_events(job.name)
    assert f"resumed from the checkpoint at step {step} (attempt 2)" in log_lines(events)
    assert state_changes(events) == [
        STATE.QUEUED,
        STATE.RUNNING,
        STATE.PAUSING,
        STATE.PAUSED,
        STATE.QUEUED,
        STATE.RUNNING,
        STATE.SUCCEEDED,
    ]


def test_max_runtime_fails_with_deadline_exceeded_after_a_checkpoint(
    fault_server: FaultServer, fclient: TuneforgeClient, data_file: str, tiny_bert: Path
) -> None:
    spec = long_spec(tiny_bert, data_file)
    spec.resources.max_runtime.seconds = 4
    final = wait_for_end(fclient, fclient.create_job(spec).name)
    assert (final.state, final.error.reason) == (STATE.FAILED, "DEADLINE_EXCEEDED"), final.error
    assert "a checkpoint was saved" in final.error.message
    assert 4 <= final.run_duration.ToTimedelta().total_seconds() < 30


def test_a_non_finite_loss_fails_with_its_step_and_out_of_memory_backs_off(
    fault_server: FaultServer, fclient: TuneforgeClient, tiny_bert: Path, keyword_dataset: Path
) -> None:
    # The API caps learning_rate at 10, too little to make the tiny model diverge: the NaN is injected at step 3
    # (tests/core/test_faults.py diverges for real with a learning rate of 1e30).
    diverging_path = keyword_dataset.parent / DIVERGING
    shutil.copy(keyword_dataset, diverging_path)
    diverging = text_spec(tiny_bert, fclient.upload_file(diverging_path).name, epochs=2)
    diverging.evaluation.log_every_steps = 1
    final = wait_for_end(fclient, fclient.create_job(diverging).name)
    assert (final.state, final.error.reason) == (STATE.FAILED, "NON_FINITE_LOSS")
    assert "at step 3" in final.error.message

    data_file = fclient.upload_file(keyword_dataset).name
    fine = fclient.create_job(text_spec(tiny_bert, data_file, epochs=1))  # batch 8 > the injected limit of 4
    assert wait_for_end(fclient, fine.name).state == STATE.SUCCEEDED
    notes = log_lines(fclient.list_job_events(fine.name))
    assert any(n.startswith("out of memory with a micro-batch of 8") for n in notes)


def test_an_injected_full_disk_fails_the_job_and_the_server_carries_on(
    fault_server: FaultServer, fclient: TuneforgeClient, tiny_bert: Path, keyword_dataset: Path
) -> None:
    """ENOSPC at the first checkpoint by fault injection, so this runs without root (the test below fills a real
    small file system where it can mount one)."""
    full_path = keyword_dataset.parent / FULL_DISK
    shutil.copy(keyword_dataset, full_path)
    spec = text_spec(tiny_bert, fclient.upload_file(full_path).name, epochs=1)
    spec.evaluation.checkpoint_every_steps = 2
    final = wait_for_end(fclient, fclient.create_job(spec).name)
    assert (final.state, final.error.reason) == (STATE.FAILED, "DISK_FULL"), final.error
    assert re.fullmatch(
        r"the server's disk is full \(\[Errno 28\] No space left on device \(injected\): '[^']+/model\.safetensors'\); "
        r"free space on the server or keep fewer checkpoints",
        final.error.message,
    ), final.error.message
    data_file = fclient.upload_file(keyword_dataset).name
    after = fclient.create_job(text_spec(tiny_bert, data_file, epochs=1))
    assert wait_for_end(fclient, after.name).state == STATE.SUCCEEDED


def test_a_full_disk_fails_the_job_and_the_server_carries_on(
    fault_server: FaultServer, fclient: TuneforgeClient, data_file: str, tiny_bert: Path
) -> None:
    if not fault_server.small_disk:
        pytest.skip("needs root to mount a small tmpfs for the work folder")
    filler = fault_server.work / "filler"
    try:
        with open(filler, "wb") as handle:
            try:
                while True:
                    handle.write(b"\0" * (1 << 20))
                    handle.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
        final = wait_for_end(fclient, fclient.create_job(text_spec(tiny_bert, data_file, epochs=1)).name)
        assert (final.state, final.error.reason) == (STATE.FAILED, "DISK_FULL"), final.error
        assert "disk is full" in final.error.message or "No space left" in final.error.message
    finally:
        filler.unlink(missing_ok=True)
    after = fclient.create_job(text_spec(tiny_bert, data_file, epochs=1))
    assert wait_for_end(fclient, after.name).state == STATE.SUCCEEDED
