"""The whole scheduler with fake workers and no processes: a real SQLite store, real storage in a temporary folder,
and a pool whose workers are this test (it records every command and sends the workers' events itself). Fair share,
lease expiry and kills, fencing of stale reports, and a finished job freeing its worker, each counted exactly."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from tuneforge.server.auth.access import TenantQuota
from tuneforge.server.db import StoreRunner
from tuneforge.server.event_hub import EventHub
from tuneforge.server.job_factory import JobFactory
from tuneforge.server.job_states import JobState
from tuneforge.server.records import FileRecord, JobRecord
from tuneforge.server.scheduler import Scheduler, SchedulerPolicy
from tuneforge.server.spec_validation import validate_spec
from tuneforge.server.storage import LocalStorage
from tuneforge.server.store.sqlite import SqliteJobStore
from tuneforge.v1 import job_spec_pb2 as pb
from tuneforge.workers.messages import (
    CancelJob,
    Heartbeat,
    JobFinished,
    Outcome,
    RunJob,
    TrainingProgress,
    WorkerCommand,
    WorkerDied,
    WorkerEvent,
    WorkerReady,
)
from tuneforge.workers.pool import EventSink


class FakePool:
    """Workers that are the test: commands are recorded, events are sent by the test through the sink."""

    def __init__(self, names: list[str]):
        self._names = names
        self.sink: EventSink | None = None
        self.sent: list[tuple[str, WorkerCommand]] = []
        self.killed: list[str] = []

    @property
    def worker_ids(self) -> list[str]:
        return list(self._names)

    def start(self, sink: EventSink) -> None:
        self.sink = sink

    def send(self, worker: str, command: WorkerCommand) -> None:
        self.sent.append((worker, command))

    def kill(self, worker: str) -> None:
        self.killed.append(worker)

    def stop(self, timeout_s: float) -> None:
        pass

    def emit(self, event: WorkerEvent) -> None:
        assert self.sink is not None
        self.sink(event)

    def runs(self) -> list[tuple[str, str, int]]:
        return [(w, c.job, c.attempt) for w, c in self.sent if isinstance(c, RunJob)]


@dataclass
class Harness:
    scheduler: Scheduler
    pool: FakePool
    store: SqliteJobStore
    jobs: JobFactory
    storage: LocalStorage

    async def submit(self, tenant: str) -> str:
        file = f"file-{tenant}"
        if self.store.get_file(file) is None:
            self.store.create_file(FileRecord(file, "train.jsonl", "dataset", 10, "0" * 64, time.time(), tenant), None)
        spec = pb.JobSpec(
            task=pb.TEXT_CLASSIFICATION, base_model="org/tiny", data=pb.DataSpec(training_file=f"files/{file}")
        )
        spec.data.validation_fraction = 0.2
        resolved = validate_spec(spec, []).spec
        assert resolved is not None
        return (await self.jobs.create(spec, f"{tenant} job", None, tenant=tenant, resolved=resolved)).id

    def job(self, job_id: str) -> JobRecord:
        record = self.store.get_job(job_id)
        assert record is not None
        return record


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Waits for a condition the scheduler's own tasks make true (the condition decides; the pause only yields)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        await asyncio.sleep(0.01)


QUOTAS = {"a": TenantQuota(weight=2.0), "b": TenantQuota()}


def run_with(
    tmp_path: Path, workers: list[str], policy: SchedulerPolicy, scenario: Callable[[Harness], Awaitable[None]]
) -> None:
    """Runs a scenario against a started scheduler on its own event loop, and stops the scheduler after it."""

    async def main() -> None:
        store = SqliteJobStore(tmp_path / "tuneforge.db")
        db, hub, storage, pool = StoreRunner(), EventHub(), LocalStorage(tmp_path / "data"), FakePool(workers)
        quotas = lambda tenant: QUOTAS.get(tenant, TenantQuota())  # noqa: E731
        scheduler = Scheduler(store, db, pool, storage, hub, [], policy, quotas=quotas)
        await scheduler.start()
        try:
            await scenario(Harness(scheduler, pool, store, JobFactory(store, db, hub, scheduler), storage))
        finally:
            await scheduler.stop(1.0)

    asyncio.run(main())


def ready(pool: FakePool) -> None:
    for name in pool.worker_ids:
        pool.emit(WorkerReady(worker=name, pid=1, device="cpu"))


def test_three_free_workers_go_two_to_the_double_weight_tenant(tmp_path: Path) -> None:
    run_with(tmp_path, ["w-0", "w-1", "w-2"], SchedulerPolicy(), fair_share)


async def fair_share(harness: Harness) -> None:
    b_jobs = [await harness.submit("b") for _ in range(3)]  # b's jobs are older: b wins the first tie
    a_jobs = [await harness.submit("a") for _ in range(3)]
    ready(harness.pool)
    await until(lambda: len(harness.pool.runs()) == 3)
    started = {job for _, job, _ in harness.pool.runs()}
    assert started == {b_jobs[0], a_jobs[0], a_jobs[1]}
    assert [harness.job(j).state for j in a_jobs + b_jobs].count(JobState.RUNNING) == 3
    queued = harness.job(a_jobs[2])
    assert await harness.scheduler.wait_reason(queued, 1) == "every worker is busy (3 in the pool)"


FAST_LEASES = SchedulerPolicy(lease_timeout_s=0.3, kill_grace_s=0.3, restart_backoff_s=0.0)


def test_a_silent_worker_loses_its_job_is_killed_and_the_job_runs_again(tmp_path: Path) -> None:
    run_with(tmp_path, ["w-0"], FAST_LEASES, silent_worker)


async def silent_worker(harness: Harness) -> None:
    job = await harness.submit("a")
    ready(harness.pool)
    await until(lambda: len(harness.pool.runs()) == 1)
    await until(lambda: harness.pool.killed == ["w-0"])  # silent for a lease, then deaf for the grace
    assert [type(c).__name__ for _, c in harness.pool.sent] == ["RunJob", "CancelJob"]
    cancel = harness.pool.sent[1][1]
    assert isinstance(cancel, CancelJob) and (cancel.job, cancel.attempt) == (job, 1)
    record = harness.job(job)
    assert (record.state, record.attempt, record.restarts) == (JobState.QUEUED, 1, 1)

    harness.pool.emit(TrainingProgress(worker="w-0", job=job, attempt=1, step=5, total_steps=10))  # too late
    harness.pool.emit(WorkerDied(worker="w-0", exitcode=-9))
    harness.pool.emit(WorkerReady(worker="w-0", pid=2, device="cpu"))
    await until(lambda: len(harness.pool.runs()) == 2)
    assert harness.pool.runs() == [("w-0", job, 1), ("w-0", job, 2)]
    kinds = [event.kind for event in harness.store.list_events(job, 0, 1000)]
    assert "training_metrics" not in kinds, "the lost attempt's late report was fenced out"


def test_a_finished_job_frees_its_worker_for_the_next_and_keeps_its_artifact(tmp_path: Path) -> None:
    run_with(tmp_path, ["w-0"], SchedulerPolicy(), finished_job)


async def finished_job(harness: Harness) -> None:
    first, second = await harness.submit("a"), await harness.submit("a")
    ready(harness.pool)
    await until(lambda: len(harness.pool.runs()) == 1)
    harness.pool.emit(Heartbeat(worker="w-0", job=first, attempt=1))
    artifact = harness.storage.attempt_artifact_path(first, 1)
    artifact.parent.mkdir(parents=True, exist_ok=True)
    artifact.write_bytes(b"model")
    harness.pool.emit(JobFinished(worker="w-0", job=first, attempt=1, outcome=Outcome.SUCCEEDED))
    await until(lambda: len(harness.pool.runs()) == 2)
    assert harness.pool.runs() == [("w-0", first, 1), ("w-0", second, 1)]
    assert (
        harness.job(first).state is JobState.SUCCEEDED and harness.storage.artifact_path(first).read_bytes() == b"model"
    )
    assert harness.job(second).state is JobState.RUNNING
