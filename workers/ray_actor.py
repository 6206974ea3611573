"""The Ray actor that hosts one Tuneforge worker: it connects back to the server and runs the same worker loop as a
spawned local worker, so the training code and the protocol are the same in both pools.

The connection is a `multiprocessing.connection` over TCP, authenticated with a per-server random key (HMAC
challenge) before anything is unpickled. Ray's own retries stay off: the server's leases and attempts decide what
runs again.
"""

from __future__ import annotations

import multiprocessing.connection
import os
import socket

from tuneforge.workers.pool import WorkerSettings, bootstrap

HOST_VARIABLE = "TUNEFORGE_WORKER_HOST"
"""What a worker reports as its host; a Ray worker names its node, since nodes may share a machine."""


class WorkerHost:
    """One worker in a Ray actor."""

    def serve(self, worker: str, address: tuple[str, int], authkey: bytes, settings: WorkerSettings, entry: str) -> str:
        """Runs the worker loop until Shutdown (or exits with the process when the server goes away)."""
        import ray

        node = ray.get_runtime_context().get_node_id()
        os.environ[HOST_VARIABLE] = f"{socket.gethostname()}/node-{node[:12]}"
        conn = multiprocessing.connection.Client(address, authkey=authkey)
        conn.send(worker)  # who this is, before any event
        bootstrap(entry, worker, conn, settings)
        return worker
