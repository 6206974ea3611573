"""Every Prometheus series the server exports, owned by one object per server (one registry, no globals).

Naming follows Prometheus practice: a `tuneforge_` prefix, base units, `_total` on counters, histograms for
durations, and only bounded labels (states, reasons, worker slots; never job ids or user names). Workers report
through their events and the server counts here, so a worker that dies or restarts never takes a counter back.
"""

from __future__ import annotations

import platform
import time
from enum import StrEnum
from importlib import metadata

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from tuneforge.server.job_states import TERMINAL, JobState
from tuneforge.server.records import JobRecord

# Seconds, from well under a step to well over a long fine-tuning run.
SHORT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LONG_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 4 * 3600.0, 12 * 3600.0, 86400.0)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "none"


class RetryReason(StrEnum):
    """Why a job's attempt was lost and the job queued again (the `reason` label of job retries)."""

    WORKER_EXITED = "worker_exited"
    LEASE_EXPIRED = "lease_expired"
    SERVER_RESTARTED = "server_restarted"
    WORKER_UNREACHABLE = "worker_unreachable"


class ServiceMetrics:
    """The server's metrics and the few facts they are computed from."""

    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # `_created` series double the exposition and no dashboard reads them
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # ---- jobs
        self.jobs_submitted = Counter(
            "tuneforge_jobs_submitted", "Jobs created, by origin (api or sweep).", ["origin"], registry=r
        )
        self.jobs_finished = Counter(
            "tuneforge_jobs_finished", "Jobs that reached a terminal state, by that state.", ["state"], registry=r
        )
        self.job_failures = Counter(
            "tuneforge_job_failures", "Failed jobs by error reason (a bounded set).", ["reason"], registry=r
        )
        self.job_retries = Counter(
            "tuneforge_job_retries",
            "Attempts lost to a dead or hung worker or a server restart, after which the job was queued again.",
            ["reason"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "tuneforge_job_queue_wait_seconds",
            "Time a job waited in the queue before a worker claimed it (each attempt).",
            buckets=LONG_BUCKETS,
            registry=r,
        )
        self.run_duration = Histogram(
            "tuneforge_job_run_seconds",
            "Running time of a job that ended (all its attempts), by final state.",
            ["state"],
            buckets=LONG_BUCKETS,
            registry=r,
        )
        self.startup = Histogram(
            "tuneforge_job_startup_seconds",
            "From a worker being given a job to its training loop starting (model load and data preparation).",
            buckets=LONG_BUCKETS,
            registry=r,
        )
        # ---- workers and training
        self.worker_restarts = Counter(
            "tuneforge_worker_restarts",
            "Worker processes that ended unasked and were replaced, by reason.",
            ["reason"],
            registry=r,
        )
        self.training_steps = Counter(
            "tuneforge_training_steps", "Optimizer steps trained, by worker slot.", ["worker"], registry=r
        )
        self.training_samples = Counter(
            "tuneforge_training_samples", "Training examples processed, by worker slot.", ["worker"], registry=r
        )
        self.step_time = Histogram(
            "tuneforge_training_step_seconds",
            "Optimizer step time (each step of a logging window observed at the window's mean).",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.checkpoint_save = Histogram(
            "tuneforge_checkpoint_save_seconds", "Time to write one checkpoint.", buckets=SHORT_BUCKETS, registry=r
        )
        self.checkpoint_bytes = Counter(
            "tuneforge_checkpoint_written_bytes", "Bytes of checkpoints written.", registry=r
        )
        # ---- store, storage, uploads
        self.store_latency = Histogram(
            "tuneforge_store_operation_seconds",
            "Job store operation latency, by operation.",
            ["operation"],
            buckets=SHORT_BUCKETS,
            registry=r,
        )
        self.store_busy_retries = Counter(
            "tuneforge_store_busy_retries",
            "Write transactions that found the database locked and tried again.",
            registry=r,
        )
        self.uploads_rejected = Counter(
            "tuneforge_uploads_rejected", "Uploads refused, by reason.", ["reason"], registry=r
        )
        self.uploaded_bytes = Counter("tuneforge_uploaded_bytes", "Bytes of accepted uploads.", registry=r)
        self.webhook_deliveries = Counter(
            "tuneforge_webhook_deliveries",
            "Webhook calls by outcome: delivered, retried (an attempt failed), failed (gave up), refused (address).",
            ["outcome"],
            registry=r,
        )
        for outcome in ("delivered", "retried", "failed", "refused"):
            self.webhook_deliveries.labels(outcome)
        self.prediction_inputs = Counter(
            "tuneforge_prediction_inputs", "Inputs sent to workers by Predict.", registry=r
        )
        self.prediction_batches = Counter(
            "tuneforge_prediction_batches", "Batches of Predict calls sent to workers.", registry=r
        )
        self.prediction_forward_passes = Counter(
            "tuneforge_prediction_forward_passes", "Forward passes workers ran for Predict.", registry=r
        )
        self.generation_batches = Counter(
            "tuneforge_generation_batches", "Batches of Generate calls sent to workers.", registry=r
        )
        self.generate_calls = Counter(
            "tuneforge_generate_calls",
            "Generate calls by how they ended: stop (end token or stop string), length, cancelled (the caller went "
            "away), deadline, failed.",
            ["end"],
            registry=r,
        )
        for end in ("stop", "length", "cancelled", "deadline", "failed"):
            self.generate_calls.labels(end)
        self.generated_tokens = Counter(
            "tuneforge_generated_tokens", "Tokens workers wrote for Generate calls that received them.", registry=r
        )
        # ---- what is running
        self.build_info = Gauge(
            "tuneforge_build_info",
            "Always 1: the versions of this server and of the libraries it trains with.",
            ["version", "python_version", "grpc_version", "torch_version", "transformers_version"],
            registry=r,
        )
        self.build_info.labels(
            _version("tuneforge"),
            platform.python_version(),
            _version("grpcio"),
            _version("torch"),
            _version("transformers"),
        ).set(1)
        self.start_time = Gauge(
            "tuneforge_server_start_time_seconds", "When this server process started (Unix time).", registry=r
        )
        self.start_time.set(time.time())
        for state in sorted(TERMINAL):
            self.jobs_finished.labels(state.value.lower())
            self.run_duration.labels(state.value.lower())
        for origin in ("api", "sweep"):
            self.jobs_submitted.labels(origin)

    # ------------------------------------------------------------ job life

    def job_submitted(self, origin: str) -> None:
        self.jobs_submitted.labels(origin).inc()

    def job_changed(self, before: JobState, record: JobRecord, now: float) -> None:
        """Counts a committed change of state."""
        if before is record.state:
            return
        if record.state is JobState.RUNNING and before is JobState.QUEUED:
            queued = record.queued_time if record.queued_time is not None else record.create_time
            self.queue_wait.observe(max(0.0, now - queued))
        if record.state in TERMINAL:
            state = record.state.value.lower()
            self.jobs_finished.labels(state).inc()
            self.run_duration.labels(state).observe(record.run_seconds)
            if record.state is JobState.FAILED:
                self.job_failures.labels(record.error_reason or "UNKNOWN").inc()

    def job_retried(self, reason: str) -> None:
        self.job_retries.labels(reason).inc()

    # ------------------------------------------------------------ training, as workers report it

    def training_window(self, worker: str, steps: int, samples: int, seconds: float) -> None:
        """A logging window of `steps` optimizer steps: counted, and each step observed at the window's mean."""
        if steps <= 0:
            return
        self.training_steps.labels(worker).inc(steps)
        self.training_samples.labels(worker).inc(samples)
        mean = seconds / steps
        for _ in range(steps):
            self.step_time.observe(mean)

    def checkpoint_saved(self, seconds: float, size_bytes: int) -> None:
        self.checkpoint_save.observe(seconds)
        self.checkpoint_bytes.inc(size_bytes)
