"""An attempt's RunJob from the stored job, or exactly why it cannot run: the spec accepted at creation, the tenant's
own files only, max_runtime left over from earlier attempts."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

from tuneforge.server.auth.access import TenantQuota
from tuneforge.server.db import StoreRunner
from tuneforge.server.job_states import JobState
from tuneforge.server.records import FileRecord, JobRecord
from tuneforge.server.run_commands import CannotRun, RunCommands
from tuneforge.server.spec_validation import validate_spec
from tuneforge.server.storage import LocalStorage
from tuneforge.server.store.sqlite import SqliteJobStore
from tuneforge.v1 import job_spec_pb2 as pb
from tuneforge.workers.messages import RunJob
from tuneforge.workers.spec_json import spec_to_json


def job(tenant: str = "t", max_runtime_s: int = 0, run_seconds: float = 0.0) -> JobRecord:
    spec = pb.JobSpec(task=pb.TEXT_CLASSIFICATION, base_model="org/tiny", data=pb.DataSpec(training_file="files/f1"))
    spec.data.validation_fraction = 0.2
    spec.resources.max_runtime.seconds = max_runtime_s
    resolved = validate_spec(spec, []).spec
    assert resolved is not None
    return JobRecord(id="ft-1", display_name="", spec=spec.SerializeToString(), priority=0, state=JobState.RUNNING,
                     create_time=0.0, update_time=0.0, attempt=2, tenant=tenant, run_seconds=run_seconds,
                     resolved_spec=spec_to_json(resolved))  # fmt: skip


def build(tmp_path: Path, record: JobRecord, file_tenant: str | None = "t") -> RunJob | CannotRun:
    tmp_path.mkdir(parents=True, exist_ok=True)
    store = SqliteJobStore(tmp_path / "tuneforge.db")
    if file_tenant is not None:
        store.create_file(FileRecord("f1", "train.jsonl", "dataset", 10, "0" * 64, time.time(), file_tenant), None)
    quota = TenantQuota(max_stored_bytes=5 << 20)
    commands = RunCommands(store, StoreRunner(), LocalStorage(tmp_path / "data"), [], lambda tenant: quota)
    return asyncio.run(commands.build(record))


def test_a_runnable_job_gets_its_accepted_spec_files_folders_and_time_left(tmp_path: Path) -> None:
    command = build(tmp_path, job(max_runtime_s=100, run_seconds=40.0))
    assert isinstance(command, RunJob)
    assert (command.job, command.attempt, command.time_limit_s, command.max_unpacked_bytes) == (
        "ft-1",
        2,
        60.0,
        5 << 20,
    )
    assert command.training_data.filename == "train.jsonl" and command.validation_data is None
    assert command.spec.base_model == "org/tiny" and Path(command.work_dir).is_dir()
    assert command.artifact_path.endswith("attempt-2/artifact.tar")


def test_jobs_that_cannot_run_say_why(tmp_path: Path) -> None:
    assert build(tmp_path / "gone", job(), file_tenant=None) == CannotRun(
        "INVALID_INPUT", "files/f1 was deleted before the job started"
    )
    assert build(tmp_path / "other", job(), file_tenant="someone-else") == CannotRun(
        "INVALID_INPUT", "files/f1 was deleted before the job started"
    ), "another tenant's file is as good as missing"
    assert build(tmp_path / "late", job(max_runtime_s=30, run_seconds=31.0)) == CannotRun(
        "DEADLINE_EXCEEDED", "max_runtime of 30 s is used up"
    )
    unresolved = replace(job(), resolved_spec="", spec=pb.JobSpec(task=pb.TEXT_CLASSIFICATION).SerializeToString())
    refused = build(tmp_path / "old", unresolved)
    assert isinstance(refused, CannotRun) and refused.reason == "INVALID_INPUT"
    assert refused.message.startswith("job.spec.base_model: required"), "a job stored before specs were kept"
