"""The Ray worker pool: each worker is a Ray actor holding the GPUs and CPUs it needs, placed by Ray across the
cluster's nodes. The scheduler sees the same WorkerPool as with local processes.

Actors connect back to this server over an authenticated `multiprocessing.connection` (see workers.ray_actor), so
commands and events take the same road as with spawned workers. A worker is lost when its connection closes or its
actor ends (its node died, or Ray killed it); it is reported and a new actor is asked for, which Ray places wherever
resources are free. Ray's restarts and retries are off (`max_restarts=0`, `max_task_retries=0`): the server's
leases, attempts and checkpoints decide what runs again, as with the local pool. Workers with more than one GPU are
placed through a placement group, so their GPUs are reserved together on one node.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing.connection
import secrets
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, Listener
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from tuneforge.workers.messages import Shutdown, WorkerCommand, WorkerDied, WorkerEvent
from tuneforge.workers.pool import DEFAULT_ENTRY, EventSink, Respawner, WorkerSettings, deliver, emit_to
from tuneforge.workers.ray_actor import WorkerHost

log = logging.getLogger(__name__)

NAMESPACE = "tuneforge"


@dataclass(frozen=True)
class RayPoolSettings:
    """Where the cluster is and what each worker actor holds."""

    address: str
    """`auto`, or HOST:PORT of the cluster's GCS."""
    gpus_per_worker: int = 0
    cpus_per_worker: float = 1.0
    listen_host: str = ""
    """Address actors connect back to; empty: this node's address in the cluster."""


@dataclass
class _Actor:
    handle: Any
    run: Any
    """The ObjectRef of the actor's serve() call: ready when the actor ends, one way or another."""
    started: float
    quick_deaths: int = 0
    group: PlacementGroup | None = None
    conn: Connection | None = None
    """Set once the actor has connected back."""


class RayPool:
    """N worker actors on a Ray cluster."""

    def __init__(
        self,
        num_workers: int,
        settings: WorkerSettings,
        ray_settings: RayPoolSettings,
        entry: str = DEFAULT_ENTRY,
        name_prefix: str = "",
    ):
        self._num_workers = num_workers
        self._settings = settings
        self._ray = ray_settings
        self._entry = entry
        self._prefix = name_prefix
        self._actors: dict[str, _Actor] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._sink: EventSink | None = None
        self._authkey = secrets.token_bytes(32)
        self._listener: Listener | None = None
        self._wake_r, self._wake_w = multiprocessing.Pipe(duplex=False)
        self._threads: list[threading.Thread] = []
        self._respawner = Respawner(self._launch)
        self._host_class: Any = None

    @property
    def worker_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._actors)

    def start(self, sink: EventSink) -> None:
        self._sink = sink
        ray.init(address=self._ray.address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False)
        self._host_class = ray.remote(WorkerHost)
        host = self._ray.listen_host or ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        self._listener = Listener((host, 0), authkey=self._authkey)
        log.info("ray pool: %d workers on %s; actors connect back to %s", self._num_workers, self._ray.address, host)
        for index in range(self._num_workers):
            self._launch(f"{self._prefix}worker-{index}")
        for target, name in ((self._accept, "ray-accept"), (self._watch_connections, "ray-events")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        watcher = threading.Thread(target=self._watch_actors, name="ray-actors", daemon=True)
        watcher.start()
        self._threads.append(watcher)

    def send(self, worker: str, command: WorkerCommand) -> None:
        with self._lock:
            actor = self._actors[worker]
        if actor.conn is None:
            raise KeyError(f"{worker} has not connected yet")
        deliver(actor.conn, worker, command)

    def kill(self, worker: str) -> None:
        with self._lock:
            actor = self._actors.get(worker)
        if actor is not None:
            log.warning("killing %s (its Ray actor)", worker)
            ray.kill(actor.handle, no_restart=True)  # its end comes back through the actor watcher

    def stop(self, timeout_s: float) -> None:
        self._stopping.set()
        self._respawner.cancel()
        with self._lock:
            actors = list(self._actors.values())
        for actor in actors:
            if actor.conn is not None:
                with contextlib.suppress(OSError, EOFError):
                    actor.conn.send(Shutdown())
        runs = [actor.run for actor in actors]
        if runs:
            ray.wait(runs, num_returns=len(runs), timeout=timeout_s)
        for actor in actors:
            with contextlib.suppress(Exception):
                ray.kill(actor.handle, no_restart=True)
            if actor.group is not None:
                with contextlib.suppress(Exception):
                    remove_placement_group(actor.group)
            if actor.conn is not None:
                actor.conn.close()
        if self._listener is not None:
            self._listener.close()
        self._wake_w.send(None)
        for thread in self._threads:
            thread.join(5)
        ray.shutdown()

    # ------------------------------------------------------------ internals

    def _launch(self, worker: str, quick_deaths: int = 0) -> None:
        if self._stopping.is_set():
            return
        assert self._listener is not None
        options: dict[str, Any] = {
            "name": f"{worker}-{secrets.token_hex(3)}",  # a replacement never collides with a dying actor's name
            "num_cpus": self._ray.cpus_per_worker,
            "num_gpus": self._ray.gpus_per_worker,
            "max_restarts": 0,
            "max_task_retries": 0,
        }
        group = None
        if self._ray.gpus_per_worker > 1:  # the worker's GPUs, reserved together on one node
            bundle = {"GPU": self._ray.gpus_per_worker, "CPU": self._ray.cpus_per_worker}
            group = placement_group([bundle], strategy="STRICT_PACK")
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(group, 0)
        handle = self._host_class.options(**options).remote()
        run = handle.serve.remote(worker, self._listener.address, self._authkey, self._settings, self._entry)
        with self._lock:
            self._actors[worker] = _Actor(handle, run, time.monotonic(), quick_deaths, group)
        self._wake_w.send(None)  # the actor watcher watches the new actor
        log.info("asked Ray for %s", worker)

    def _accept(self) -> None:
        """Actors connect back and say which worker they are; their first event (WorkerReady) follows."""
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn = self._listener.accept()
                worker = conn.recv()
            except (OSError, EOFError, multiprocessing.AuthenticationError) as exc:
                if self._stopping.is_set():
                    return
                log.warning("refused a connection to the ray pool: %s", exc)
                continue
            with self._lock:
                actor = self._actors.get(worker)
                if actor is not None and actor.conn is None:
                    actor.conn = conn
                    conn = None  # type: ignore[assignment]
            if conn is not None:
                log.warning("a connection claimed to be %s, which is not waiting for one: closed", worker)
                conn.close()
            self._wake_w.send(None)

    def _watch_connections(self) -> None:
        """One thread reads every actor's connection; a closed one is a lost worker."""
        while not self._stopping.is_set():
            with self._lock:
                by_conn = {a.conn: (name, a) for name, a in self._actors.items() if a.conn is not None}
            ready: list[Any] = multiprocessing.connection.wait([*by_conn, self._wake_r])
            if self._wake_r in ready:
                self._wake_r.recv()
            for conn in ready:
                if conn in by_conn and not self._receive(conn):
                    self._lost(*by_conn[conn], "its connection closed")

    def _watch_actors(self) -> None:
        """An actor that ends (its node died, or it was killed) before its connection closed is lost too."""
        while not self._stopping.is_set():
            with self._lock:
                by_run = {actor.run: (name, actor) for name, actor in self._actors.items()}
            if not by_run:
                self._stopping.wait(1.0)  # a periodic look: every worker is being replaced
                continue
            done, _ = ray.wait(list(by_run), num_returns=1, timeout=1.0)
            for run in done:
                self._lost(*by_run[run], "its Ray actor ended")

    def _receive(self, conn: Connection) -> bool:
        try:
            while conn.poll():
                self._emit(conn.recv())
        except (EOFError, OSError):
            return False
        return True

    def _lost(self, worker: str, actor: _Actor, why: str) -> None:
        """Counts once per actor: its closed connection and its ended run may both report it."""
        with self._lock:
            if self._actors.get(worker) is not actor or self._stopping.is_set():
                return
            del self._actors[worker]
        if actor.conn is not None:
            actor.conn.close()
        with contextlib.suppress(Exception):
            ray.kill(actor.handle, no_restart=True)
        if actor.group is not None:
            with contextlib.suppress(Exception):
                remove_placement_group(actor.group)
        self._emit(WorkerDied(worker=worker, exitcode=None))
        delay_s = self._respawner.replace(worker, actor.started, actor.quick_deaths)
        log.warning("%s is lost (%s); asking Ray for a new one in %.1f s", worker, why, delay_s)

    def _emit(self, event: WorkerEvent) -> None:
        emit_to(self._sink, event)
