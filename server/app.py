"""Builds and runs the gRPC server: store, storage, pool, scheduler and sweeps, the services, health and reflection.

Start-up: the store opens (and recovers), half-written uploads are discarded, the workers spawn; health turns
SERVING once every worker reported ready. SIGTERM: health goes NOT_SERVING, in-flight calls get `grace_s` to finish,
then the workers stop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tuneforge.server.auth.access import AccessFile, quotas_of, webhooks_of
from tuneforge.server.auth.interceptor import AuthInterceptor, CallLimits
from tuneforge.server.change_feed import ChangeFeed
from tuneforge.server.db import StoreRunner
from tuneforge.server.event_hub import EventHub
from tuneforge.server.exports import Exports
from tuneforge.server.generations import Generations
from tuneforge.server.gpu_partition import partition, visible_gpus
from tuneforge.server.job_factory import JobFactory
from tuneforge.server.memory_estimate import physical_memory_bytes
from tuneforge.server.metrics.exposition import MetricsEndpoint
from tuneforge.server.metrics.gpus import GpuSampler
from tuneforge.server.metrics.grpc_metrics import GrpcMetrics
from tuneforge.server.metrics.service_metrics import ServiceMetrics
from tuneforge.server.metrics.snapshots import JobsCollector, PoolCollector, StorageCollector
from tuneforge.server.object_storage import ObjectStorage
from tuneforge.server.predictions import Predictions
from tuneforge.server.scheduler import Scheduler, SchedulerPolicy
from tuneforge.server.servicers.files import FileServicer
from tuneforge.server.servicers.jobs import JobServicer
from tuneforge.server.servicers.sweeps import SweepServicer
from tuneforge.server.settings import ServerSettings, SettingsError
from tuneforge.server.storage import LocalStorage, Storage
from tuneforge.server.store.sql import SqlJobStore
from tuneforge.server.store.sqlite import SqliteJobStore
from tuneforge.server.sweeps import SweepController
from tuneforge.server.transport import server_credentials
from tuneforge.server.webhooks import WebhookNotifier, WebhookSettings, load_secret
from tuneforge.v1 import files_pb2, files_pb2_grpc, jobs_pb2, jobs_pb2_grpc, sweeps_pb2, sweeps_pb2_grpc
from tuneforge.workers.pool import LocalProcessPool, WorkerPool, WorkerSettings

log = logging.getLogger(__name__)
SERVICES = (
    files_pb2.DESCRIPTOR.services_by_name["FileService"],
    jobs_pb2.DESCRIPTOR.services_by_name["JobService"],
    sweeps_pb2.DESCRIPTOR.services_by_name["SweepService"],
)
SERVICE_NAMES = tuple(service.full_name for service in SERVICES)
HEALTH_HEADROOM_RPCS = 200
"""Calls gRPC admits beyond the API's limit: room that probes always find, however busy the API is."""


@dataclass
class RunningServer:
    """A started server and the parts a shutdown must stop."""

    server: grpc.aio.Server
    port: int
    scheduler: Scheduler
    sweeps: SweepController
    health: health.aio.HealthServicer
    store: SqlJobStore
    db: StoreRunner
    settings: ServerSettings
    readiness: asyncio.Task[None]
    hub: EventHub
    metrics: ServiceMetrics
    metrics_endpoint: MetricsEndpoint | None
    gpus: GpuSampler
    change_feed: ChangeFeed | None = None
    notifier: WebhookNotifier | None = None

    async def stop(self) -> None:
        self.readiness.cancel()
        await self.health.enter_graceful_shutdown()
        stopping = asyncio.create_task(self.server.stop(self.settings.grace_s))  # no new calls from here on
        await asyncio.sleep(0)  # let stop() begin refusing new calls before the watchers are told to leave
        self.hub.close()  # watch streams end at once with UNAVAILABLE; clients resume after the restart
        await stopping
        await self.sweeps.stop()
        await self.scheduler.stop(self.settings.worker_stop_s)
        if self.notifier is not None:
            await self.notifier.close()
        if self.change_feed is not None:
            self.change_feed.stop()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.stop()
        self.gpus.close()
        self.db.close()
        self.store.close()


def open_store(settings: ServerSettings, metrics: ServiceMetrics) -> SqlJobStore:
    """SQLite in the data dir, or PostgreSQL when --store names it (imported only then)."""
    if settings.store.startswith(("postgresql://", "postgres://")):
        from tuneforge.server.store.postgres import PostgresJobStore

        return PostgresJobStore(settings.store)
    if settings.store:
        raise SettingsError(f"--store must be empty (SQLite) or a postgresql:// URL, not {settings.store!r}")
    return SqliteJobStore(settings.data_dir / "tuneforge.db", on_busy_retry=metrics.store_busy_retries.inc)


def make_pool(settings: ServerSettings) -> WorkerPool:
    worker_settings = WorkerSettings(
        device=settings.device,
        torch_threads=settings.threads_per_worker(),
        heartbeat_interval_s=settings.heartbeat_interval_s,
        model_cache_mb=settings.model_cache_mb,
        nice=settings.worker_nice,
        log_level=settings.log_level,
        log_format=settings.log_format,
        storage_options=dict(settings.storage_options),
    )
    prefix = f"{settings.replica}-" if settings.replica else ""
    if settings.pool == "ray":
        from tuneforge.server.ray_pool import RayPool, RayPoolSettings  # Ray is imported only by servers that use it

        ray_settings = RayPoolSettings(
            address=settings.ray_address,
            gpus_per_worker=settings.ray_gpus_per_worker,
            cpus_per_worker=settings.ray_cpus_per_worker,
            listen_host=settings.ray_listen_host,
        )
        ray_pool: WorkerPool = RayPool(settings.workers, worker_settings, ray_settings, name_prefix=prefix)
        return ray_pool
    try:
        shares = partition(settings.workers, settings.gpus_per_worker, visible_gpus())
    except ValueError as exc:
        raise SettingsError(f"--gpus-per-worker: {exc}") from exc
    return LocalProcessPool(settings.workers, worker_settings, name_prefix=prefix, visible_devices=shares)


def webhook_settings(settings: ServerSettings) -> WebhookSettings:
    secret_file = settings.webhook_secret_file or settings.data_dir / "webhook.key"
    try:
        secret = load_secret(secret_file)
    except (OSError, ValueError) as exc:
        raise SettingsError(f"--webhook-secret-file: {exc}") from exc
    return WebhookSettings(
        secret, settings.webhook_allow_private, max(1, settings.webhook_max_attempts), settings.webhook_backoff_s
    )


def open_storage(settings: ServerSettings) -> Storage:
    """The data dir, or object storage at --storage (checked now: a wrong endpoint or bucket stops the start)."""
    if not settings.storage:
        return LocalStorage(settings.data_dir)
    if "://" not in settings.storage:
        raise SettingsError(f"--storage must be an fsspec URL such as s3://bucket/prefix, not {settings.storage!r}")
    try:
        storage = ObjectStorage(settings.storage, dict(settings.storage_options), settings.data_dir)
        storage.check()
    except (OSError, ValueError, ImportError) as exc:
        raise SettingsError(f"--storage {settings.storage} cannot be used: {exc}") from exc
    return storage


async def start_server(settings: ServerSettings, pool: WorkerPool | None = None) -> RunningServer:
    """Opens everything, binds the port and starts the workers; returns once the port listens. SettingsError for
    settings that cannot be used (before anything starts)."""
    credentials = server_credentials(settings)
    access = AccessFile(settings.access_file) if settings.access_file is not None else None
    quotas = quotas_of(access)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if settings.pool == "ray" and not settings.ray_address:
        raise SettingsError("--pool ray needs --ray-address (auto, or the GCS HOST:PORT of the cluster)")
    storage = open_storage(settings)
    dropped = storage.discard_partial_uploads()
    if dropped:
        log.warning("discarded %d half-written uploads", dropped)
    metrics = ServiceMetrics()
    store = open_store(settings, metrics)
    db = StoreRunner(observe=lambda operation, seconds: metrics.store_latency.labels(operation).observe(seconds))
    hub = EventHub(keep_tails=not settings.replica, recheck_s=1.0 if settings.replica else 30.0)
    feed = None
    listen = getattr(store, "listen", None)
    if settings.replica and listen is not None:
        feed = ChangeFeed(listen, hub, asyncio.get_running_loop())
        if feed.start():
            hub.recheck_s = 5.0  # other replicas' events now wake watchers; the timer is only a safety net
    roots = list(settings.model_roots)
    if settings.replica and not settings.store:
        raise SettingsError("--replica needs a shared --store postgresql://...: SQLite serves one server")
    policy = SchedulerPolicy(
        replica=settings.replica,
        max_restarts=settings.max_restarts,
        restart_backoff_s=settings.restart_backoff_s,
        lease_timeout_s=settings.lease_timeout_s,
        kill_grace_s=settings.kill_grace_s,
        worker_memory_bytes=settings.worker_memory_bytes(physical_memory_bytes()),
    )
    scheduler = Scheduler(store, db, pool or make_pool(settings), storage, hub, roots, policy, metrics, quotas)
    predictions = Predictions(scheduler.send_call, scheduler.worker_for_calls, metrics)
    exports = Exports(scheduler.send_call, scheduler.worker_for_calls)
    generations = Generations(scheduler.send_call, scheduler.worker_for_calls, metrics)
    scheduler.worker_calls += [predictions, exports, generations]
    notifier = WebhookNotifier(webhook_settings(settings), webhooks_of(access), metrics)
    scheduler.add_listener(notifier.on_change)
    gpus = GpuSampler()
    grpc_metrics = GrpcMetrics(metrics.registry, (*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"]))
    metrics.registry.register(JobsCollector(lambda: db.call_blocking(store.count_jobs_by_state)))
    metrics.registry.register(PoolCollector(scheduler.worker_views, gpus))
    metrics.registry.register(StorageCollector(settings.data_dir))

    limits = CallLimits(settings.max_concurrent_rpcs, settings.max_tenant_rpcs)
    server = grpc.aio.server(
        interceptors=[grpc_metrics, AuthInterceptor(access, quotas, limits)],
        # The interceptor refuses API calls over the limits at once; the headroom above them is for health checks.
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs + HEALTH_HEADROOM_RPCS,
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ],
    )
    files_pb2_grpc.add_FileServiceServicer_to_server(
        FileServicer(store, db, storage, settings.max_upload_bytes, metrics, quotas, settings.upload_idle_timeout_s),
        server,
    )
    jobs = JobFactory(store, db, hub, scheduler, metrics, quotas)
    sweeps = SweepController(store, db, scheduler, jobs, hub, roots, quotas, settings.replica, settings.lease_timeout_s)
    jobs_pb2_grpc.add_JobServiceServicer_to_server(
        JobServicer(store, db, storage, scheduler, hub, roots, jobs, predictions, exports, generations, quotas),
        server,
    )
    sweeps_pb2_grpc.add_SweepServiceServicer_to_server(SweepServicer(store, db, hub, sweeps, scheduler, quotas), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    address = f"{settings.host}:{settings.port}"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    endpoint = None
    if settings.metrics_port >= 0:
        metrics_host = settings.metrics_host or settings.host
        endpoint = MetricsEndpoint.start(metrics.registry, metrics_host, settings.metrics_port)
        print(f"tuneforge metrics on {endpoint.url}", flush=True)  # read by scripts and tests
    await server.start()
    await scheduler.start()
    await sweeps.start()
    readiness = asyncio.create_task(_serve_when_ready(scheduler, health_servicer), name="health-ready")
    if settings.port_file is not None:
        settings.port_file.write_text(str(port))
    print(f"tuneforge listening on {settings.host}:{port}", flush=True)  # read by scripts and tests
    log.info("tuneforge listening on %s:%d with %d workers", settings.host, port, settings.workers)
    return RunningServer(
        server, port, scheduler, sweeps, health_servicer, store, db, settings, readiness, hub, metrics, endpoint, gpus,
        feed, notifier,
    )  # fmt: skip


async def _serve_when_ready(scheduler: Scheduler, health_servicer: health.aio.HealthServicer) -> None:
    await scheduler.all_ready.wait()
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("all workers ready: SERVING")


async def serve(settings: ServerSettings) -> None:
    """Runs until SIGTERM or SIGINT, then shuts down gracefully."""
    running = await start_server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining calls for up to %.0f s", settings.grace_s)
    await running.stop()
    log.info("stopped")
