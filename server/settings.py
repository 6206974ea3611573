"""Server settings: one frozen dataclass, filled from the command line."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class SettingsError(ValueError):
    """Settings the server cannot start with; the message says what to change (`serve` exits 2 with it)."""


def setting(
    default: Any,
    help: str,
    *,
    metavar: str | None = None,
    choices: tuple[str, ...] = (),
    repeatable: bool = False,
    flag: bool = True,
) -> Any:
    """One setting's whole definition: its default and what it means. `tuneforge serve`'s flag (`--name-with-dashes`),
    its --help and the README's flag table are all made from it (server/settings_cli.py), so they cannot drift.
    `flag=False` keeps an internal setting off the command line."""
    metadata = {"help": help, "metavar": metavar, "choices": choices, "repeatable": repeatable, "flag": flag}
    if isinstance(default, list | dict):
        raise TypeError("settings are frozen: use a tuple")
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ServerSettings:
    """Everything `tuneforge serve` can be told."""

    data_dir: Path = setting(Path("data"), "the store (`tuneforge.db`, SQLite in WAL mode), uploaded files, work dirs "
                             "and artifacts")  # fmt: skip
    host: str = setting("127.0.0.1", "address to listen on; the default keeps the server private to this machine")
    port: int = setting(50051, "port to listen on; 0 picks a free one, printed as `tuneforge listening on HOST:PORT`")
    workers: int = setting(1, "worker processes (or Ray actors); each takes one job at a time")
    gpus_per_worker: int = setting(
        -1,
        "local pool: GPUs each worker gets to itself through `CUDA_VISIBLE_DEVICES` (-1: the visible GPUs split "
        "evenly when there are at least as many as workers; 0: every worker sees every GPU)",
    )
    device: str = setting("auto", "workers' device: `auto` (CUDA when present, bf16 autocast and TF32), `cpu` or "
                          "`cuda:N`")  # fmt: skip
    model_roots: tuple[Path, ...] = setting(
        (),
        "a folder from which local base models may be read (repeatable); hub ids are accepted too",
        metavar="DIR",
        repeatable=True,
    )
    store: str = setting(
        "",
        "the job store: empty for SQLite in the data dir, or `postgresql://USER@HOST:PORT/DB` (row locks; claims use "
        "`FOR UPDATE SKIP LOCKED`, so replicas sharing the database never start a job twice)",
        metavar="URL",
    )
    replica: str = setting(
        "",
        "this server's name among replicas sharing one PostgreSQL `--store` and one storage location: its workers are "
        "`NAME-worker-N`, it recovers only its own jobs after a restart, and it takes over another replica's jobs "
        "once they go a lease without a report",
        metavar="NAME",
    )
    storage: str = setting(
        "",
        "where files, checkpoints and artifacts live: the data dir (empty) or an fsspec URL such as "
        "`s3://bucket/prefix`, which workers on other machines read and write too",
        metavar="URL",
    )
    storage_options: tuple[tuple[str, Any], ...] = setting(
        (),
        "an fsspec option for `--storage`, such as `endpoint_url=http://minio:9000` (repeatable; JSON values allowed; "
        "credentials come from the environment, not from here)",
        metavar="KEY=VALUE",
        repeatable=True,
    )
    pool: str = setting(
        "local",
        "`local`: worker processes on this machine, started with `spawn`; `ray`: one Ray actor per worker, placed "
        "across the cluster at `--ray-address` (see docs/scaling.md)",
        choices=("local", "ray"),
    )
    ray_address: str = setting("", "the Ray cluster for `--pool ray`: `auto`, or HOST:PORT of its GCS")
    ray_gpus_per_worker: int = setting(0, "GPUs each Ray worker actor holds (a job's ranks train one per GPU)")
    ray_cpus_per_worker: float = setting(1.0, "CPUs each Ray worker actor holds")
    ray_listen_host: str = setting(
        "", "address Ray workers connect back to for commands and events (empty: this node's address in the cluster)"
    )
    max_upload_bytes: int = setting(2 << 30, "the largest upload any tenant may send")
    max_message_bytes: int = setting(
        4 << 20, "largest gRPC message either way (upload chunks are at most 1 MiB)", flag=False
    )
    max_concurrent_rpcs: int = setting(
        1000,
        "API calls in flight before new ones are refused `RESOURCE_EXHAUSTED` (`SERVER_BUSY`); health checks are "
        "never counted and always answered",
    )
    max_tenant_rpcs: int = setting(
        250,
        "with an access file: API calls one tenant may have in flight (`TENANT_BUSY`), so the rest stays for the "
        "others",
    )
    upload_idle_timeout_s: float = setting(
        30.0, "an upload that sends nothing for this long is dropped with `DEADLINE_EXCEEDED` (`UPLOAD_IDLE`)"
    )
    grace_s: float = setting(10.0, "on SIGTERM: how long in-flight calls may finish before the workers stop")
    worker_stop_s: float = setting(
        20.0, "on SIGTERM: how long workers get to stop before they are terminated", flag=False
    )
    max_restarts: int = setting(
        3,
        "times a job whose worker died or hung is queued again to resume from its checkpoint before it fails "
        "`WORKER_LOST`",
    )
    restart_backoff_s: float = setting(
        5.0,
        "wait before such a job's next attempt, doubling with each restart up to 5 minutes, so a job that kills "
        "every worker cannot hog the pool",
    )
    lease_timeout_s: float = setting(30.0, "a worker that sends nothing, not even a heartbeat, for this long loses "
                                     "its job")  # fmt: skip
    heartbeat_interval_s: float = setting(
        2.0, "how often a busy worker reports that it is alive; keep it well under the lease timeout"
    )
    kill_grace_s: float = setting(
        15.0, "a worker still holding a job this long after a cancel, pause or expired lease is killed and replaced"
    )
    port_file: Path | None = setting(None, "write the bound port here once listening (useful with `--port 0`)",
                                     metavar="PATH")  # fmt: skip
    torch_threads: int = setting(0, "CPU threads per worker (0: the machine's cores divided among the workers)")
    worker_memory_mb: int = setting(
        0,
        "memory a worker can give one job: a job whose estimate (base weights, custom head, data-parallel ranks) is "
        "larger is refused at creation with `NEVER_FITS` and the estimate (0: this machine's memory divided among the "
        "local workers, no check for Ray workers; -1: no check)",
    )
    model_cache_mb: int = setting(
        2048,
        "memory each worker keeps recently used base models in, so the next job on the same model starts warm "
        "(0: none)",
    )
    worker_nice: int = setting(
        10, "CPU niceness added to the workers, so that where training and the API share cores the API answers first"
    )
    metrics_host: str | None = setting(None, "address of the Prometheus `/metrics` endpoint (default: `--host`)",
                                       metavar="HOST")  # fmt: skip
    metrics_port: int = setting(
        9464,
        "port of the Prometheus `/metrics` endpoint (0 picks a free one, printed as `tuneforge metrics on URL`; -1 "
        "turns it off)",
    )
    tls_cert: Path | None = setting(None, "PEM certificate chain: with `--tls-key`, the server speaks only TLS",
                                    metavar="PATH")  # fmt: skip
    tls_key: Path | None = setting(None, "PEM private key of `--tls-cert`", metavar="PATH")
    tls_client_ca: Path | None = setting(
        None, "PEM CA bundle: every client must present a certificate it signed (mutual TLS)", metavar="PATH"
    )
    allow_plaintext: bool = setting(
        False, "serve plaintext on an address other than loopback (behind a TLS-terminating proxy or mesh)"
    )
    access_file: Path | None = setting(
        None,
        "TOML file of hashed bearer tokens, certificate names, tenant quotas and webhooks: turns authentication on "
        "(see Security)",
        metavar="PATH",
    )
    webhook_secret_file: Path | None = setting(
        None, "the key webhooks are signed with (default: `webhook.key` in the data dir, made at first start)",
        metavar="PATH",
    )  # fmt: skip
    webhook_allow_private: bool = setting(
        False, "let webhooks call private, loopback and link-local addresses (the server's own network)"
    )
    webhook_max_attempts: int = setting(8, "tries per webhook before it is given up")
    webhook_backoff_s: float = setting(1.0, "wait before a webhook's first retry; it doubles with each retry")
    log_level: str = setting("INFO", "`DEBUG`, `INFO`, `WARNING` or `ERROR`")
    log_format: str = setting(
        "text", "`text` or `json` log lines on stderr (JSON: one object per line, with job and attempt on job lines)",
        choices=("text", "json"),
    )  # fmt: skip

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
