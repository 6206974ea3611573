"""Server settings: one frozen dataclass, filled from the command line."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class SettingsError(ValueError):
    """Settings the server cannot start with; the message says what to change (`serve` exits 2 with it)."""


@dataclass(frozen=True)
class ServerSettings:
    """Everything `tuneforge serve` can be told."""

    data_dir: Path
    """Where the store, uploaded files, work dirs and artifacts live."""
    host: str = "127.0.0.1"
    """Address to bind; the default keeps the server private to this machine."""
    port: int = 50051
    """Port to bind; 0 picks a free one (see port_file)."""
    workers: int = 1
    """Worker processes in the local pool."""
    gpus_per_worker: int = -1
    """Local pool: GPUs each worker gets to itself; -1 splits the visible GPUs evenly (when there are at least as
    many as workers), 0 lets every worker see every GPU."""
    device: str = "auto"
    """Workers' device: auto (CUDA when present), cpu, or cuda:N."""
    model_roots: tuple[Path, ...] = ()
    """Folders under which local base models may be read."""
    store: str = ""
    """Where jobs live: empty for SQLite in the data dir, or a `postgresql://` URL (replicas may share it)."""
    replica: str = ""
    """This server's name among replicas sharing one store; empty when it is the only server."""
    storage: str = ""
    """Where files, checkpoints and artifacts live: empty for the data dir, or an fsspec URL (`s3://bucket/prefix`)
    that workers on other machines reach too."""
    storage_options: tuple[tuple[str, Any], ...] = ()
    """fsspec options for `storage` (`endpoint_url`...); credentials come from the environment, not from here."""
    pool: str = "local"
    """`local`: spawned worker processes on this machine; `ray`: Ray actors placed across a cluster."""
    ray_address: str = ""
    """The Ray cluster to join (`auto`, or HOST:PORT of its GCS); the ray pool needs it."""
    ray_gpus_per_worker: int = 0
    """GPUs each Ray worker actor holds (a job's ranks train one per GPU on one worker)."""
    ray_cpus_per_worker: float = 1.0
    ray_listen_host: str = ""
    """Address Ray workers connect back to for commands and events; empty: this node's address in the cluster."""
    max_upload_bytes: int = 2 << 30
    """Largest accepted upload."""
    max_message_bytes: int = 4 << 20
    """Largest gRPC message either way (upload chunks are at most 1 MiB)."""
    max_concurrent_rpcs: int = 1000
    """API calls in flight before new ones are refused with RESOURCE_EXHAUSTED (health checks are never counted)."""
    max_tenant_rpcs: int = 250
    """With an access file: API calls one tenant may have in flight, so the rest stays for the others."""
    upload_idle_timeout_s: float = 30.0
    """An upload that sends no message for this long is dropped (DEADLINE_EXCEEDED), freeing its call."""
    grace_s: float = 10.0
    """On SIGTERM: how long in-flight calls may finish before they are cancelled."""
    worker_stop_s: float = 20.0
    """On SIGTERM: how long workers get to stop before they are terminated."""
    max_restarts: int = 3
    """Times a job whose worker died or hung is queued again to resume from its checkpoint before it fails."""
    restart_backoff_s: float = 5.0
    """Wait before a lost job's next attempt; doubles with each restart."""
    lease_timeout_s: float = 30.0
    """A worker that sends nothing (not even a heartbeat) this long loses its job."""
    heartbeat_interval_s: float = 2.0
    """How often a busy worker says it is alive; keep it well under lease_timeout_s."""
    kill_grace_s: float = 15.0
    """How long a worker may ignore a cancel or an expired lease before it is killed."""
    port_file: Path | None = None
    """If set, the bound port is written here once the server listens (useful with port 0)."""
    torch_threads: int = field(default=0)
    """CPU threads per worker; 0 divides the machine's cores among the workers."""
    worker_memory_mb: int = 0
    """Memory one worker can give a job: a job whose estimate is larger is refused at creation (NEVER_FITS). 0: this
    machine's memory shared among the local workers (no check for Ray workers); -1: no check."""
    model_cache_mb: int = 2048
    """Memory each worker may keep recently used base models in (warm starts); 0 keeps none."""
    worker_nice: int = 10
    """CPU niceness added to workers: where training and the API share cores, the API answers first."""
    metrics_host: str | None = None
    """Address of the /metrics endpoint; None: the same as host."""
    metrics_port: int = 9464
    """Port of the /metrics endpoint; 0 picks a free one, -1 turns it off."""
    tls_cert: Path | None = None
    """PEM certificate chain: with tls_key, the server speaks only TLS."""
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    """PEM CA bundle: with it, every client must present a certificate it signed (mutual TLS)."""
    allow_plaintext: bool = False
    """Plaintext on an address other than loopback (behind a proxy or mesh that terminates TLS)."""
    access_file: Path | None = None
    """TOML file of hashed tokens, certificate names and quotas; None turns authentication off."""
    webhook_secret_file: Path | None = None
    """The key webhooks are signed with; None: `webhook.key` in the data dir, made at first start."""
    webhook_allow_private: bool = False
    """Let webhooks call private, loopback and link-local addresses (the server's own network)."""
    webhook_max_attempts: int = 8
    webhook_backoff_s: float = 1.0
    """Wait before a webhook's first retry; it doubles with each retry."""
    log_level: str = "INFO"
    log_format: str = "text"
    """`text` or `json` (one object per line, with job and attempt on every job line)."""

    def worker_memory_bytes(self, physical_bytes: int) -> int:
        """The per-worker memory budget in bytes; 0 means none is enforced."""
        if self.worker_memory_mb > 0:
            return self.worker_memory_mb << 20
        if self.worker_memory_mb < 0 or self.pool != "local":
            return 0
        return physical_bytes // max(1, self.workers)

    def threads_per_worker(self) -> int:
        if self.torch_threads:
            return self.torch_threads
        return max(1, (os.cpu_count() or 1) // max(1, self.workers))
