"""The worker process: waits for RunJob commands and runs each through the training core, reporting events.

A reader thread receives commands while training runs (so a cancel lands at the next step), a heartbeat thread
proves liveness, and the main thread trains. Every failure becomes a JobFinished event with a reason; the process
itself only exits on Shutdown or when the server goes away.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import shutil
import socket
import tempfile
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from tuneforge.workers.logs import INTERNAL_MARK, configure_logging, current_job, job_context
from tuneforge.workers.messages import (
    CallCommand,
    CancelJob,
    ExportArtifact,
    GenerateBatch,
    Heartbeat,
    JobFinished,
    LogEmitted,
    Outcome,
    PredictBatch,
    RunJob,
    Severity,
    Shutdown,
    StopGeneration,
    WorkerCommand,
    WorkerEvent,
    WorkerReady,
)
from tuneforge.workers.pool import WorkerSettings
from tuneforge.workers.remote_storage import localize

SEVERITIES = ((logging.ERROR, Severity.ERROR), (logging.WARNING, Severity.WARNING), (logging.INFO, Severity.INFO))


class Outbox:
    """Thread-safe sender of events to the server."""

    def __init__(self, conn: Connection):
        self._conn = conn
        self._lock = threading.Lock()

    def send(self, event: WorkerEvent) -> None:
        with self._lock:
            self._conn.send(event)


class JobLogForwarder(logging.Handler):
    """Lines logged in the worker while a job runs (by any library) also become the job's log events, so
    `tuneforge watch` shows them; the core's own lines are already events and are not sent twice."""

    def __init__(self, outbox: Outbox, worker: str):
        super().__init__(logging.INFO)
        self._outbox = outbox
        self._worker = worker

    def emit(self, record: logging.LogRecord) -> None:
        context = current_job()
        if context is None or getattr(record, INTERNAL_MARK, False):
            return
        severity = next(severity for level, severity in (*SEVERITIES, (0, Severity.DEBUG)) if record.levelno >= level)
        job, attempt = context
        try:
            message = f"{record.name}: {record.getMessage()}"
            self._outbox.send(LogEmitted(self._worker, job, attempt, severity=severity, message=message))
        except Exception:
            self.handleError(record)


@dataclass(frozen=True)
class StopFlags:
    """How the server asks one attempt to stop; the trainer looks at them between steps."""

    stop: threading.Event = field(default_factory=threading.Event)
    checkpoint_first: threading.Event = field(default_factory=threading.Event)
    """Set before `stop` for a pause or a shutdown: save a checkpoint to resume from, then stop."""


class StopRegistry:
    """Stop flags keyed by (job, attempt), set by the reader thread and read by the trainer."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flags: dict[tuple[str, int], StopFlags] = {}
        self._shutting_down = False

    def flags_for(self, job: str, attempt: int) -> StopFlags:
        with self._lock:
            flags = self._flags.setdefault((job, attempt), StopFlags())
            if self._shutting_down:
                flags.checkpoint_first.set()
                flags.stop.set()
            return flags

    def request_stop(self, job: str, attempt: int, checkpoint_first: bool) -> None:
        flags = self.flags_for(job, attempt)
        if checkpoint_first:
            flags.checkpoint_first.set()
        flags.stop.set()

    def shutdown_all(self) -> None:
        """Shutdown: the job in hand checkpoints at its next step and stops (the server requeues it)."""
        with self._lock:
            self._shutting_down = True
            for flags in self._flags.values():
                flags.checkpoint_first.set()
                flags.stop.set()

    def forget(self, job: str, attempt: int) -> None:
        with self._lock:
            self._flags.pop((job, attempt), None)


def _read_commands(
    conn: Connection,
    inbox: queue.Queue[WorkerCommand],
    stops: StopRegistry,
    predict: Callable[[CallCommand], None],
) -> None:
    """Reader thread: cancels act at once, predictions go to their own thread, everything else queues for the
    main loop."""
    while True:
        try:
            command: WorkerCommand = conn.recv()
        except (EOFError, OSError):
            # The server died (a graceful stop sends Shutdown first). Stop at once rather than at the next step:
            # a restarted server will resume the job elsewhere, and two processes must not train it together.
            logging.getLogger(__name__).warning("the server went away: exiting")
            os._exit(0)
        if isinstance(command, CancelJob):
            stops.request_stop(command.job, command.attempt, command.checkpoint_first)
        elif isinstance(command, PredictBatch | ExportArtifact | GenerateBatch | StopGeneration):
            predict(command)
        else:
            inbox.put(command)
        if isinstance(command, Shutdown):
            stops.shutdown_all()
            return


def _heartbeat(outbox: Outbox, worker: str, job: RunJob, stop: threading.Event, interval_s: float) -> None:
    while not stop.wait(interval_s):
        try:
            outbox.send(Heartbeat(worker=worker, job=job.job, attempt=job.attempt))
        except (OSError, EOFError):
            return


def worker_host() -> str:
    """The machine (and, in a Ray pool, the node) this worker runs on."""
    return os.environ.get("TUNEFORGE_WORKER_HOST") or socket.gethostname()


def _name_process(worker: str) -> None:
    """`ps`, `top` and operators see which worker a process is (Linux; 15 characters at most)."""
    try:
        with open("/proc/self/comm", "w") as comm:
            comm.write(f"tf-{worker}"[:15])
    except OSError:
        pass


def _run_with_storage(
    command: RunJob, worker: str, device: Any, outbox: Outbox, flags: StopFlags, settings: WorkerSettings
) -> JobFinished:
    """Runs the attempt on local copies of whatever lives in object storage, and uploads what it writes."""
    from tuneforge.workers.core.runner import run_job

    where = f"attempt {command.attempt} runs on {worker} at {worker_host()}"
    outbox.send(LogEmitted(worker, command.job, command.attempt, severity=Severity.INFO, message=where))

    def failed(message: str) -> JobFinished:
        return JobFinished(worker, command.job, command.attempt, Outcome.FAILED, "STORAGE_UNAVAILABLE", message)

    try:
        attempt = localize(command, settings.storage_options, settings.scratch_dir)
    except OSError as exc:
        return failed(f"could not read the job's data or checkpoints from storage: {exc}")
    try:
        send = attempt.send_through(outbox.send)
        finished = run_job(attempt.job, worker, device, send, flags.stop, flags.checkpoint_first)
        if finished.outcome is Outcome.SUCCEEDED:
            try:
                attempt.push_artifact()
            except OSError as exc:
                return failed(f"could not upload the artifact to storage: {exc}")
        return finished
    finally:
        attempt.close()


def _crashed(worker: str, command: RunJob, exc: Exception) -> JobFinished:
    """A bug, not the tenant's doing: the traceback (with the server's paths) goes to the operators' log under an
    incident id; the tenant learns the kind of error and that id, nothing more."""
    incident = secrets.token_hex(4)
    extra = {"job": command.job, "attempt": command.attempt, INTERNAL_MARK: True}
    logging.getLogger(__name__).error(
        "the job crashed (incident %s):\n%s", incident, traceback.format_exc(), extra=extra
    )
    message = (
        f"the worker crashed ({type(exc).__name__}); this is a fault in the service, not in the job: the operators' "
        f"log has the details under incident {incident}"
    )
    return JobFinished(worker, command.job, command.attempt, Outcome.FAILED, "INTERNAL", message)


def run_worker(worker: str, conn: Connection, settings: WorkerSettings) -> None:
    """Entry point of a spawned worker process."""
    _name_process(worker)
    if settings.nice:
        os.nice(settings.nice)
    configure_logging(settings.log_level, settings.log_format, worker)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Imported here, in the child: loading torch, transformers and every task runtime once per worker is the warm-up.
    import torch

    from tuneforge.workers.core.device import configure_torch, gpu_identity, select_device
    from tuneforge.workers.core.model_cache import configure
    from tuneforge.workers.core.prediction import ModelCache, PredictionServer
    from tuneforge.workers.tasks.runtime import import_every_runtime

    import_every_runtime()
    configure(settings.model_cache_mb * 2**20)
    configure_torch(settings.torch_threads)
    device = select_device(settings.device)
    outbox = Outbox(conn)
    logging.getLogger().addHandler(JobLogForwarder(outbox, worker))
    inbox: queue.Queue[WorkerCommand] = queue.Queue()
    stops = StopRegistry()
    models = Path(tempfile.mkdtemp(prefix=f"{worker}-models-"))
    cache = ModelCache(settings.predict_cache_models, models, settings.storage_options)
    predictions = PredictionServer(worker, outbox.send, cache)
    reader_args = (conn, inbox, stops, predictions.submit)
    threading.Thread(target=_read_commands, args=reader_args, daemon=True, name="commands").start()
    gpu_uuid, gpu_name = gpu_identity(device)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    ready = WorkerReady(worker, os.getpid(), str(device), gpu_uuid, gpu_name, gpus, worker_host())
    outbox.send(ready)

    while True:
        command = inbox.get()
        if isinstance(command, Shutdown):
            stops.shutdown_all()
            shutil.rmtree(models, ignore_errors=True)  # the unpacked models kept for Predict
            return
        if not isinstance(command, RunJob):
            continue
        flags = stops.flags_for(command.job, command.attempt)
        stop_beat = threading.Event()
        beat = threading.Thread(
            target=_heartbeat,
            args=(outbox, worker, command, stop_beat, settings.heartbeat_interval_s),
            daemon=True,
        )
        beat.start()
        try:
            with job_context(command.job, command.attempt):
                finished = _run_with_storage(command, worker, device, outbox, flags, settings)
        except Exception as exc:  # last resort: the per-job boundary
            finished = _crashed(worker, command, exc)
        finally:
            stop_beat.set()
            beat.join()
            stops.forget(command.job, command.attempt)
        outbox.send(finished)
