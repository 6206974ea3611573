"""SweepService: create (idempotent), get, list, cancel, watch (resumable). The controller does the work."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias

from tuneforge.server.auth.access import QuotaLookup, no_quotas
from tuneforge.server.auth.caller import current_caller
from tuneforge.server.db import StoreRunner
from tuneforge.server.errors import FieldViolation, invalid_argument
from tuneforge.server.event_hub import EventHub
from tuneforge.server.job_files import missing_file_choices, missing_files
from tuneforge.server.names import parse_name
from tuneforge.server.pagination import fit_page, make_token, parse_page
from tuneforge.server.scheduler import Scheduler
from tuneforge.server.servicers.errors import streaming, unary
from tuneforge.server.servicers.jobs import check_job_admission
from tuneforge.server.servicers.streams import follow_events
from tuneforge.server.servicers.tenancy import check_request_id, scoped_request_id, visible
from tuneforge.server.store.base import JobStore
from tuneforge.server.sweep_convert import sweep_event_to_proto, sweep_to_proto
from tuneforge.server.sweep_records import SWEEP_TERMINAL, SweepRecord
from tuneforge.server.sweeps import SweepController
from tuneforge.v1 import sweeps_pb2, sweeps_pb2_grpc

Context: TypeAlias = Any  # grpc.aio.ServicerContext (grpcio ships no type stubs)


class SweepServicer(sweeps_pb2_grpc.SweepServiceServicer):
    """Thin: validates, reads the store, and asks the controller to act."""

    def __init__(
        self,
        store: JobStore,
        db: StoreRunner,
        hub: EventHub,
        controller: SweepController,
        scheduler: Scheduler,
        quotas: QuotaLookup = no_quotas,
    ):
        self._store, self._db, self._hub, self._controller = store, db, hub, controller
        self._scheduler, self._quotas = scheduler, quotas

    @unary
    async def CreateSweep(self, request: sweeps_pb2.CreateSweepRequest, context: Context) -> sweeps_pb2.Sweep:
        if request.request_id:
            check_request_id(request.request_id)
        sweep = request.sweep
        if not sweep.HasField("spec"):
            raise invalid_argument([FieldViolation("sweep.spec", "required")])
        plan, violations = await self._controller.plan(sweep.spec)
        if len(sweep.display_name) > 200:
            violations.append(FieldViolation("sweep.display_name", "at most 200 characters"))
        tenant = current_caller().tenant
        violations += await missing_files(self._store, self._db, sweep.spec.base, "sweep.spec.base", tenant)
        violations += await missing_file_choices(self._store, self._db, sweep.spec, tenant)
        if violations or plan is None:
            raise invalid_argument(violations)
        admission = (self._store, self._db, self._scheduler, self._quotas, tenant, sweep.spec.base)
        await check_job_admission(*admission, queued_jobs=1)
        created = await self._controller.create(sweep, plan, scoped_request_id(request.request_id), tenant)
        return sweep_to_proto(created)

    @unary
    async def GetSweep(self, request: sweeps_pb2.GetSweepRequest, context: Context) -> sweeps_pb2.Sweep:
        return sweep_to_proto(await self._get(request.name))

    @unary
    async def ListSweeps(
        self, request: sweeps_pb2.ListSweepsRequest, context: Context
    ) -> sweeps_pb2.ListSweepsResponse:
        page = parse_page(request.page_size, request.page_token, "sweeps")
        scope = current_caller().scope
        records, cursor = await self._db.call(self._store.list_sweeps, page.size, page.cursor, scope)
        sweeps, cursor = fit_page([sweep_to_proto(r) for r in records], [r.order for r in records], cursor)
        return sweeps_pb2.ListSweepsResponse(sweeps=sweeps, next_page_token=make_token(cursor, "sweeps"))

    @unary
    async def CancelSweep(self, request: sweeps_pb2.CancelSweepRequest, context: Context) -> sweeps_pb2.Sweep:
        record = await self._controller.cancel((await self._get(request.name)).id)
        return sweep_to_proto(visible(record, request.name))

    @streaming
    async def WatchSweep(
        self, request: sweeps_pb2.WatchSweepRequest, context: Context
    ) -> AsyncIterator[sweeps_pb2.SweepEvent]:
        record = await self._get(request.name)
        events = follow_events(
            self._store, self._db, self._hub, record.id, request.after_sequence, self._store.get_sweep, SWEEP_TERMINAL
        )
        async for event in events:
            yield sweep_event_to_proto(event)

    async def _get(self, name: str) -> SweepRecord:
        return visible(await self._db.call(self._store.get_sweep, parse_name(name, "sweeps")), name)
