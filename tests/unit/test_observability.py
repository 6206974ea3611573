"""The parts behind /metrics and the logs: GPU series, storage sizes, SQLite busy retries, JSON and text log lines,
and worker log lines forwarded as job events."""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import sqlite3
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tuneforge.server.metrics.gpus import GpuSampler
from tuneforge.server.metrics.snapshots import PoolCollector, StorageCollector, WorkerView
from tuneforge.server.store.sqlite import SqliteJobStore
from tuneforge.workers.logs import INTERNAL_MARK, JobFields, job_context, make_formatter
from tuneforge.workers.messages import LogEmitted, Severity
from tuneforge.workers.process import JobLogForwarder, Outbox

GPU = "GPU-5c5e1c2e-0000-4000-8000-000000000001"


class OneGpuNvml:
    """Stands in for NVML, which cannot run on a machine without NVIDIA's driver: one GPU, known by its UUID."""

    def __init__(self) -> None:
        self.initialised = 0

    def nvmlInit(self) -> None:
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self.initialised -= 1

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        if uuid != GPU:
            raise RuntimeError("NVML_ERROR_NOT_FOUND")
        return "handle-0"

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> Any:
        return SimpleNamespace(used=3 << 30, total=80 << 30, free=77 << 30)

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> Any:
        return SimpleNamespace(gpu=87, memory=40)


def samples_of(collector: Any) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_gpu_series_per_worker_joinable_on_uuid() -> None:
    nvml = OneGpuNvml()
    views = [
        WorkerView("worker-0", "busy", 100.0, "cuda:0", GPU, "NVIDIA H200"),
        WorkerView("worker-1", "idle", 101.0, "cpu"),
        WorkerView("worker-2", "busy", 102.0, "cuda:1", "GPU-unknown", "NVIDIA H200"),
    ]
    sampler = GpuSampler(nvml)
    samples = samples_of(PoolCollector(lambda: views, sampler))
    info = (
        "tuneforge_worker_gpu_info",
        frozenset({"worker": "worker-0", "gpu_uuid": GPU, "gpu_name": "NVIDIA H200"}.items()),
    )
    assert samples[info] == 1
    w0 = frozenset({("worker", "worker-0")})
    assert samples[("tuneforge_gpu_memory_used_bytes", w0)] == 3 << 30
    assert samples[("tuneforge_gpu_memory_total_bytes", w0)] == 80 << 30
    assert samples[("tuneforge_gpu_utilization_ratio", w0)] == pytest.approx(0.87)
    names = {name for name, labels in samples if ("worker", "worker-1") in labels}
    assert "tuneforge_gpu_memory_used_bytes" not in names  # a CPU worker has no GPU series
    assert ("tuneforge_gpu_memory_used_bytes", frozenset({("worker", "worker-2")})) not in samples  # unknown UUID
    assert samples[("tuneforge_workers", frozenset({("state", "busy")}))] == 2
    sampler.close()
    assert nvml.initialised == 0


def test_without_nvidia_driver_no_gpu_samples_and_no_error() -> None:
    """The real pynvml on this machine: NVML does not load, so the sampler answers nothing, every time."""
    sampler = GpuSampler()
    assert sampler.sample(GPU) is None
    assert sampler.sample(GPU) is None
    sampler.close()


def test_storage_sizes_follow_the_data_dir(tmp_path: Path) -> None:
    collector = StorageCollector(tmp_path, reuse_factor=0)  # measured at every scrape
    (tmp_path / "files").mkdir()
    key = ("tuneforge_storage_bytes", frozenset({("kind", "files")}))
    assert samples_of(collector)[key] == 0
    (tmp_path / "files" / "file-1").write_bytes(b"x" * 5000)
    assert samples_of(collector)[key] == 5000
    assert samples_of(collector)[("tuneforge_data_dir_free_bytes", frozenset())] > 0


def test_a_locked_database_is_retried_and_counted(tmp_path: Path) -> None:
    retried = threading.Event()
    retries: list[int] = []

    def on_retry() -> None:
        retries.append(1)
        retried.set()

    store = SqliteJobStore(tmp_path / "t.db", busy_timeout_s=30, on_busy_retry=on_retry)
    blocker = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    writer = threading.Thread(target=lambda: store.import_jobs([]))
    writer.start()
    assert retried.wait(30), "the writer never reported waiting for the lock"
    blocker.execute("COMMIT")
    writer.join(30)
    assert not writer.is_alive() and retries
    blocker.close()
    store.close()


def test_a_write_gives_up_after_the_busy_timeout(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "t.db", busy_timeout_s=0.2)
    blocker = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        store.import_jobs([])
    blocker.execute("ROLLBACK")
    blocker.close()
    store.close()


def log_line(log_format: str, **extra: Any) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(JobFields("worker-3"))
    handler.setFormatter(make_formatter(log_format))
    logger = logging.getLogger(f"test.logs.{log_format}")
    logger.propagate = False
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    with job_context("ft-abc", 2):
        logger.warning("loss is %s", "falling", extra=extra)
    logger.info("between jobs")
    return stream.getvalue()


def test_json_lines_carry_job_attempt_and_process() -> None:
    inside, outside = (json.loads(line) for line in log_line("json", **{INTERNAL_MARK: True}).splitlines())
    assert inside["message"] == "loss is falling" and inside["level"] == "WARNING"
    assert (inside["job"], inside["attempt"], inside["process"]) == ("ft-abc", 2, "worker-3")
    assert inside["time"].endswith("+00:00") and inside["logger"] == "test.logs.json"
    assert INTERNAL_MARK not in inside
    assert "job" not in outside and outside["process"] == "worker-3"


def test_text_lines_name_the_job_at_the_end() -> None:
    inside, outside = log_line("text").splitlines()
    assert inside.endswith("worker-3 WARNING test.logs.text: loss is falling [ft-abc attempt 2]")
    assert outside.endswith("between jobs")


def test_explicit_job_fields_win_over_the_context() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    record.job, record.attempt = "ft-other", 7
    with job_context("ft-abc", 2):
        JobFields("server").filter(record)
    assert (record.job, record.attempt) == ("ft-other", 7)


def test_lines_logged_during_a_job_become_its_events() -> None:
    receiver, sender = multiprocessing.Pipe(duplex=False)
    forwarder = JobLogForwarder(Outbox(sender), "worker-0")
    logger = logging.getLogger("test.forwarder.library")
    logger.propagate = False
    logger.handlers[:] = [forwarder]
    logger.setLevel(logging.DEBUG)
    logger.warning("outside any job")  # not a job's
    with job_context("ft-abc", 3):
        logger.debug("too detailed")  # below INFO
        logger.info("already an event", extra={INTERNAL_MARK: True})
        logger.warning("tokenizer truncated %d rows", 4)
    assert receiver.poll(5)
    event = receiver.recv()
    assert event == LogEmitted(
        "worker-0", "ft-abc", 3, severity=Severity.WARNING, message="test.forwarder.library: tokenizer truncated 4 rows"
    )
    assert not receiver.poll(0)
    receiver.close()
    sender.close()
