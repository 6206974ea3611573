"""Scripted worker entry points for pool tests: real spawned processes, no torch."""

from __future__ import annotations

import os
import sys
from multiprocessing.connection import Connection

from tuneforge.workers.messages import JobFinished, Outcome, RunJob, Shutdown, WorkerReady
from tuneforge.workers.pool import WorkerSettings


def echo_worker(worker: str, conn: Connection, settings: WorkerSettings) -> None:
    """Says ready, answers every RunJob with JobFinished(SUCCEEDED), exits on Shutdown."""
    conn.send(WorkerReady(worker=worker, pid=os.getpid(), device="fake"))
    while True:
        command = conn.recv()
        if isinstance(command, Shutdown):
            return
        if isinstance(command, RunJob):
            conn.send(JobFinished(worker, command.job, command.attempt, outcome=Outcome.SUCCEEDED))


def crash_at_start(worker: str, conn: Connection, settings: WorkerSettings) -> None:
    """A worker whose start always fails (a broken install, say)."""
    sys.exit(3)


def report_visible_devices(worker: str, conn: Connection, settings: WorkerSettings) -> None:
    """Says ready with the CUDA_VISIBLE_DEVICES it was started with as its device, then waits for Shutdown."""
    conn.send(WorkerReady(worker=worker, pid=os.getpid(), device=os.environ.get("CUDA_VISIBLE_DEVICES", "unset")))
    while not isinstance(conn.recv(), Shutdown):
        pass
