"""Creating a job: the one path for the API and for sweeps, so both get the same record, first event and wake-up."""

from __future__ import annotations

import logging
import time

from tuneforge.server import convert
from tuneforge.server.auth.access import UNLIMITED, QuotaLookup, no_quotas
from tuneforge.server.db import StoreRunner
from tuneforge.server.errors import quota_exceeded
from tuneforge.server.event_hub import EventHub
from tuneforge.server.job_states import JobState
from tuneforge.server.metrics.service_metrics import ServiceMetrics
from tuneforge.server.names import new_id
from tuneforge.server.records import DEFAULT_TENANT, JobRecord
from tuneforge.server.scheduler import Scheduler
from tuneforge.server.store.base import JobStore, QuotaExceeded
from tuneforge.v1 import job_spec_pb2
from tuneforge.workers.logs import job_fields
from tuneforge.workers.spec import TrainingSpec
from tuneforge.workers.spec_json import spec_to_json

log = logging.getLogger(__name__)


class JobFactory:
    """Stores a new QUEUED job (idempotently with a request_id) and tells the scheduler."""

    def __init__(
        self,
        store: JobStore,
        db: StoreRunner,
        hub: EventHub,
        scheduler: Scheduler,
        metrics: ServiceMetrics | None = None,
        quotas: QuotaLookup = no_quotas,
    ):
        self._store, self._db, self._hub, self._scheduler = store, db, hub, scheduler
        self._metrics = metrics or ServiceMetrics()
        self._quotas = quotas

    async def create(
        self,
        spec: job_spec_pb2.JobSpec,
        display_name: str,
        request_id: str | None,
        job_id: str | None = None,
        sweep_id: str = "",
        trial_number: int = 0,
        tenant: str = DEFAULT_TENANT,
        resolved: TrainingSpec | None = None,
    ) -> JobRecord:
        """The spec must already be valid, and `resolved` is what it resolved to (stored: every attempt trains it).
        Returns the stored job (the first one for a repeated request_id).
        RESOURCE_EXHAUSTED when the tenant's queued jobs would pass its quota (counted in the insert's transaction,
        so concurrent creates cannot all slip under it)."""
        now = time.time()
        record = JobRecord(
            id=job_id or new_id("ft"),
            display_name=display_name,
            spec=spec.SerializeToString(),
            priority=spec.priority,
            state=JobState.QUEUED,
            create_time=now,
            update_time=now,
            queued_time=now,
            sweep_id=sweep_id,
            trial_number=trial_number,
            tenant=tenant,
            resolved_spec=spec_to_json(resolved) if resolved is not None else "",
        )
        first = convert.created_event(record)
        limit = self._quotas(tenant).max_queued_jobs
        try:
            stored, created = await self._db.call(
                self._store.create_job, record, [first], request_id, limit if limit < UNLIMITED else None
            )
        except QuotaExceeded as exceeded:
            message = f"tenant {tenant} has {exceeded.used} queued jobs, its quota is {limit}; wait for some to start"
            raise quota_exceeded(tenant, "max_queued_jobs", limit, message) from None
        if created:
            self._metrics.job_submitted("sweep" if sweep_id else "api")
            origin = f"as trial {trial_number} of {sweep_id}" if sweep_id else "through the API"
            log.info("created %s for %s (priority %d)", origin, tenant, spec.priority, extra=job_fields(stored.id, 0))
            self._hub.publish(stored.id, [], ended=False)
            self._scheduler.wake()
        return stored
