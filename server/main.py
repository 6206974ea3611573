"""`tuneforge serve`: the server's command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from server.app import serve
from server.settings import ServerSettings, SettingsError
from workers.logs import configure_logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=50051, help="port to bind; 0 picks a free one")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="store, files and artifacts")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda:N (default auto)")
    parser.add_argument(
        "--gpus-per-worker",
        type=int,
        default=-1,
        help="local pool: GPUs each worker gets to itself (-1: split evenly, 0: all workers see all GPUs)",
    )
    parser.add_argument(
        "--model-root",
        type=Path,
        action="append",
        default=[],
        help="folder under which local base models may be read (repeatable)",
    )
    parser.add_argument(
        "--store", default="", help="job store: SQLite in the data dir (default) or a postgresql://USER@HOST/DB URL"
    )
    parser.add_argument(
        "--replica", default="", help="this server's name among replicas sharing one PostgreSQL store and data dir"
    )
    parser.add_argument(
        "--storage",
        default="",
        help="files, checkpoints, artifacts: the data dir (default) or an fsspec URL (s3://...)",
    )
    parser.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec option for --storage, e.g. endpoint_url=http://minio:9000 (repeatable; JSON values allowed)",
    )
    parser.add_argument("--pool", choices=["local", "ray"], default="local", help="worker pool backend")
    parser.add_argument("--ray-address", default="", help="Ray cluster for --pool ray (auto, or GCS HOST:PORT)")
    parser.add_argument("--ray-gpus-per-worker", type=int, default=0, help="GPUs each Ray worker actor holds")
    parser.add_argument("--ray-cpus-per-worker", type=float, default=1.0, help="CPUs each Ray worker actor holds")
    parser.add_argument(
        "--ray-listen-host", default="", help="address Ray workers connect back to (default: this node's Ray address)"
    )
    parser.add_argument("--max-upload-bytes", type=int, default=2 << 30)
    parser.add_argument(
        "--max-concurrent-rpcs", type=int, default=1000, help="API calls in flight (health checks are not counted)"
    )
    parser.add_argument(
        "--max-tenant-rpcs", type=int, default=250, help="with --access-file: API calls one tenant may have in flight"
    )
    parser.add_argument(
        "--upload-idle-timeout-s", type=float, default=30.0, help="drop an upload that sends nothing for this long"
    )
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=3,
        help="times a job whose worker died resumes from its checkpoint before it fails",
    )
    parser.add_argument(
        "--restart-backoff-s", type=float, default=5.0, help="wait before a lost job's next attempt (doubles)"
    )
    parser.add_argument(
        "--lease-timeout-s", type=float, default=30.0, help="a silent worker loses its job after this long"
    )
    parser.add_argument("--heartbeat-interval-s", type=float, default=2.0, help="how often busy workers report")
    parser.add_argument(
        "--kill-grace-s", type=float, default=15.0, help="a worker that ignores a cancel is killed after this long"
    )
    parser.add_argument("--grace-s", type=float, default=10.0, help="SIGTERM: time for in-flight calls")
    parser.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    parser.add_argument("--torch-threads", type=int, default=0, help="CPU threads per worker (0: share cores)")
    parser.add_argument(
        "--worker-memory-mb",
        type=int,
        default=0,
        help="memory a worker can give one job; larger estimates are refused (0: RAM / workers, -1: no check)",
    )
    parser.add_argument(
        "--model-cache-mb", type=int, default=2048, help="memory per worker for recently used base models (0: none)"
    )
    parser.add_argument(
        "--worker-nice", type=int, default=10, help="CPU niceness added to workers, so the API answers first (0: none)"
    )
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve TLS only (with --tls-key)")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument("--tls-client-ca", type=Path, help="PEM CA: require client certificates it signed (mTLS)")
    parser.add_argument(
        "--allow-plaintext", action="store_true", help="serve without TLS on an address other than loopback"
    )
    parser.add_argument(
        "--access-file", type=Path, help="TOML: hashed bearer tokens, certificate names, tenant quotas (auth on)"
    )
    parser.add_argument(
        "--webhook-secret-file", type=Path, help="key that signs webhooks (default: DATA_DIR/webhook.key, made once)"
    )
    parser.add_argument(
        "--webhook-allow-private", action="store_true", help="let webhooks call private and loopback addresses"
    )
    parser.add_argument("--webhook-max-attempts", type=int, default=8, help="tries per webhook before giving up")
    parser.add_argument("--webhook-backoff-s", type=float, default=1.0, help="first retry wait, doubling")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", choices=["text", "json"], default="text", help="log lines as text or JSON")
    parser.add_argument("--metrics-host", help="address of the /metrics endpoint (default: --host)")
    parser.add_argument(
        "--metrics-port", type=int, default=9464, help="Prometheus /metrics port (0: a free one, -1: off)"
    )


def parse_option(text: str) -> tuple[str, Any]:
    """`KEY=VALUE`; the value is read as JSON when it parses (numbers, booleans, objects), else kept as text."""
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise SystemExit(f"tuneforge serve: --storage-option wants KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level, args.log_format, "server")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    settings = ServerSettings(
        data_dir=args.data_dir,
        host=args.host,
        port=args.port,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        device=args.device,
        model_roots=tuple(args.model_root),
        store=args.store,
        replica=args.replica,
        storage=args.storage,
        storage_options=tuple(parse_option(option) for option in args.storage_option),
        pool=args.pool,
        ray_address=args.ray_address,
        ray_gpus_per_worker=args.ray_gpus_per_worker,
        ray_cpus_per_worker=args.ray_cpus_per_worker,
        ray_listen_host=args.ray_listen_host,
        max_upload_bytes=args.max_upload_bytes,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        max_tenant_rpcs=args.max_tenant_rpcs,
        upload_idle_timeout_s=args.upload_idle_timeout_s,
        grace_s=args.grace_s,
        port_file=args.port_file,
        max_restarts=args.max_restarts,
        restart_backoff_s=args.restart_backoff_s,
        lease_timeout_s=args.lease_timeout_s,
        heartbeat_interval_s=args.heartbeat_interval_s,
        kill_grace_s=args.kill_grace_s,
        torch_threads=args.torch_threads,
        model_cache_mb=args.model_cache_mb,
        worker_memory_mb=args.worker_memory_mb,
        worker_nice=args.worker_nice,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        allow_plaintext=args.allow_plaintext,
        access_file=args.access_file,
        webhook_secret_file=args.webhook_secret_file,
        webhook_allow_private=args.webhook_allow_private,
        webhook_max_attempts=args.webhook_max_attempts,
        webhook_backoff_s=args.webhook_backoff_s,
        log_level=args.log_level.upper(),
        log_format=args.log_format,
    )
    try:
        asyncio.run(serve(settings))
    except SettingsError as exc:
        print(f"tuneforge serve: {exc}", file=sys.stderr)
        return 2
    return 0
