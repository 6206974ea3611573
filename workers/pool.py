"""Worker pools: how worker processes are started, talked to and watched.

The server sees only the `WorkerPool` protocol: send a command to a worker, receive every event through one
callback. `LocalProcessPool` spawns one process per slot (never fork: the server has gRPC threads, and CUDA must be
initialised fresh in each child). The worker's code is named by a dotted entry-point string resolved in the child,
so this module, and the server that imports it, never import torch.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Protocol

from tuneforge.workers.messages import Shutdown, WorkerCommand, WorkerDied, WorkerEvent

log = logging.getLogger(__name__)

EventSink = Callable[[WorkerEvent], None]
DEFAULT_ENTRY = "tuneforge.workers.process:run_worker"


class WorkerPool(Protocol):
    """What the scheduler needs from a pool backend."""

    @property
    def worker_ids(self) -> list[str]: ...

    def start(self, sink: EventSink) -> None:
        """Starts the workers; every event (WorkerReady first) goes to sink, from any thread."""

    def send(self, worker: str, command: WorkerCommand) -> None:
        """Delivers a command to one worker. Raises KeyError for an unknown or dead worker."""

    def kill(self, worker: str) -> None:
        """Ends a worker at once (hung, or deaf to a cancel); its death is reported and it is replaced."""

    def stop(self, timeout_s: float) -> None:
        """Asks every worker to shut down, then terminates those still alive after timeout_s."""


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker process needs to know at start."""

    device: str = "auto"
    """`auto` (CUDA when present, else CPU), `cpu`, or `cuda:N`."""
    heartbeat_interval_s: float = 2.0
    torch_threads: int = 0
    """Intra-op threads for torch on CPU; 0 keeps torch's default."""
    model_cache_mb: int = 0
    """Memory for recently used base models, kept between jobs (warm starts); 0 keeps none."""
    nice: int = 0
    """Added to the worker's CPU niceness: with cores shared, the control plane answers first."""
    log_level: str = "INFO"
    log_format: str = "text"
    """`text` or `json`, as the server's."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for object storage (`endpoint_url`...); credentials come from the environment."""
    scratch_dir: str = ""
    """Where a worker unpacks jobs whose data lives in object storage; empty: the system's temp dir."""
    predict_cache_models: int = 2
    """Finished jobs' models a worker keeps loaded for Predict (the least recently used goes first)."""
    visible_devices: str | None = None
    """CUDA_VISIBLE_DEVICES for this worker (its share of the machine's GPUs); None leaves it as inherited."""


def bootstrap(entry: str, worker: str, conn: Connection, settings: WorkerSettings) -> None:
    """Child-side start: resolves the entry point here, so the parent never imports the worker's stack. The
    worker's GPUs are set before anything can initialise CUDA."""
    if settings.visible_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = settings.visible_devices
    module_name, _, func_name = entry.partition(":")
    func = getattr(importlib.import_module(module_name), func_name)
    func(worker, conn, settings)


@dataclass
class _Slot:
    process: BaseProcess
    conn: Connection
    started: float
    quick_deaths: int = 0
    """Consecutive deaths soon after start: a worker that cannot start is retried with growing delays."""


QUICK_DEATH_S = 30.0
MAX_RESPAWN_DELAY_S = 60.0


def respawn_delay(started: float, quick_deaths: int) -> tuple[int, float]:
    """A worker that died soon after it started (monotonic `started`) is replaced after a growing delay, so one
    that cannot start does not spin; returns the new count of quick deaths and the delay."""
    quick = time.monotonic() - started < QUICK_DEATH_S
    deaths = quick_deaths + 1 if quick else 0
    return deaths, min(MAX_RESPAWN_DELAY_S, 0.5 * 2**deaths) if deaths else 0.0


class Respawner:
    """Starts a lost worker's replacement, at once or after respawn_delay; pending starts are cancelled at stop.
    Both pool backends replace workers this way."""

    def __init__(self, start: Callable[[str, int], None]):
        """`start(worker, quick_deaths)` starts one worker."""
        self._start = start
        self._lock = threading.Lock()
        self._timers: list[threading.Timer] = []

    def replace(self, worker: str, started: float, quick_deaths: int) -> float:
        """Schedules the replacement; returns the delay before it starts."""
        deaths, delay_s = respawn_delay(started, quick_deaths)
        if not delay_s:
            self._start(worker, deaths)
            return 0.0
        timer = threading.Timer(delay_s, self._start, args=(worker, deaths))
        timer.daemon = True
        with self._lock:
            self._timers = [t for t in self._timers if t.is_alive()] + [timer]
        timer.start()
        return delay_s

    def cancel(self) -> None:
        with self._lock:
            for timer in self._timers:
                timer.cancel()


def deliver(conn: Connection, worker: str, command: WorkerCommand) -> None:
    """Sends a command over a worker's connection; KeyError (the pool's "no such worker") when it is broken."""
    try:
        conn.send(command)
    except (OSError, EOFError) as exc:
        raise KeyError(f"{worker} is not reachable: {exc}") from exc


def emit_to(sink: EventSink | None, event: WorkerEvent) -> None:
    """Hands an event to the pool's sink; a failing sink is logged, and must not kill the pool's threads."""
    if sink is not None:
        try:
            sink(event)
        except Exception:
            log.exception("event sink failed on %r", event)


class LocalProcessPool:
    """N spawned worker processes on this machine; a worker that dies is reported and replaced."""

    def __init__(
        self,
        num_workers: int,
        settings: WorkerSettings | None = None,
        entry: str = DEFAULT_ENTRY,
        name_prefix: str = "",
        visible_devices: list[str] | None = None,
    ):
        """`name_prefix` makes worker names unique among server replicas that share one store (`r1-worker-0`);
        `visible_devices[i]` is worker i's CUDA_VISIBLE_DEVICES."""
        self._visible_devices = visible_devices
        self._num_workers = num_workers
        self._name_prefix = name_prefix
        self._settings = settings or WorkerSettings()
        self._entry = entry
        self._ctx = multiprocessing.get_context("spawn")
        self._slots: dict[str, _Slot] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._sink: EventSink | None = None
        self._monitor: threading.Thread | None = None
        self._wake_r, self._wake_w = self._ctx.Pipe(duplex=False)
        self._respawner = Respawner(self._spawn)

    @property
    def worker_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._slots)

    def start(self, sink: EventSink) -> None:
        self._sink = sink
        for index in range(self._num_workers):
            self._spawn(f"{self._name_prefix}worker-{index}")
        self._monitor = threading.Thread(target=self._watch, name="pool-monitor", daemon=True)
        self._monitor.start()

    def send(self, worker: str, command: WorkerCommand) -> None:
        with self._lock:
            slot = self._slots[worker]
        deliver(slot.conn, worker, command)

    def kill(self, worker: str) -> None:
        with self._lock:
            slot = self._slots.get(worker)
        if slot is not None and slot.process.is_alive():
            log.warning("killing %s (pid %s)", worker, slot.process.pid)
            slot.process.kill()  # SIGKILL also ends a stopped (SIGSTOP) process

    def stop(self, timeout_s: float) -> None:
        self._stopping.set()
        self._respawner.cancel()
        with self._lock:
            slots = list(self._slots.values())
        for slot in slots:
            with contextlib.suppress(OSError, EOFError):
                slot.conn.send(Shutdown())
        for slot in slots:
            slot.process.join(timeout_s)
            if slot.process.is_alive():
                slot.process.terminate()
                slot.process.join(5)
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join(5)
        self._wake_w.send(None)
        if self._monitor is not None:
            self._monitor.join(10)
        for slot in slots:
            slot.conn.close()

    # ------------------------------------------------------------ internals

    def _spawn(self, worker: str, quick_deaths: int = 0) -> None:
        if self._stopping.is_set():
            return
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        settings = self._settings
        if self._visible_devices is not None:
            index = int(worker.rsplit("-", 1)[1])
            settings = replace(settings, visible_devices=self._visible_devices[index])
        process = self._ctx.Process(
            target=bootstrap,
            args=(self._entry, worker, child_conn, settings),
            name=f"tuneforge-{worker}",
            daemon=False,  # a worker spawns its job's helper ranks; it ends itself when the server's pipe closes
        )
        process.start()
        child_conn.close()
        with self._lock:
            self._slots[worker] = _Slot(process, parent_conn, time.monotonic(), quick_deaths)
        self._wake_w.send(None)  # the monitor starts watching the new process
        log.info("started %s (pid %s)", worker, process.pid)

    def _watch(self) -> None:
        """One thread waits on every worker's pipe and process sentinel: events and deaths take the same road."""
        while not self._stopping.is_set():
            with self._lock:
                by_conn = {slot.conn: name for name, slot in self._slots.items()}
                by_sentinel = {slot.process.sentinel: name for name, slot in self._slots.items()}
            ready: list[Any] = multiprocessing.connection.wait([*by_conn, *by_sentinel, self._wake_r])
            if self._wake_r in ready:
                self._wake_r.recv()
            for item in ready:
                if item in by_conn:
                    self._receive(by_conn[item], item)
            for item in ready:
                if item in by_sentinel and not self._stopping.is_set():
                    self._replace(by_sentinel[item])

    def _receive(self, worker: str, conn: Connection) -> None:
        try:
            while conn.poll():
                self._emit(conn.recv())
        except (EOFError, OSError):
            pass  # the sentinel reports the death

    def _replace(self, worker: str) -> None:
        with self._lock:
            slot = self._slots.pop(worker)
        slot.process.join(1)
        self._receive(worker, slot.conn)  # whatever it said before dying comes first
        slot.conn.close()
        self._emit(WorkerDied(worker=worker, exitcode=slot.process.exitcode))
        delay_s = self._respawner.replace(worker, slot.started, slot.quick_deaths)
        log.warning("%s died with exit code %s; replacing it in %.1f s", worker, slot.process.exitcode, delay_s)

    def _emit(self, event: WorkerEvent) -> None:
        emit_to(self._sink, event)
