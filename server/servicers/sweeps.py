"""SweepService: create (idempotent), get, list, cancel, watch (resumable). The controller does the work."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias

from tuneforge.v1 import sweeps_pb2, sweeps_pb2_grpc

from server.db import StoreRunner
from server.errors import FieldViolation, invalid_argument, not_found
from server.event_hub import EventHub
from server.names import parse_name
from server.pagination import make_token, parse_page
from server.servicers.errors import streaming, unary
from server.servicers.jobs import check_request_id, missing_files
from server.servicers.streams import follow_events
from server.store.base import JobStore
from server.sweep_convert import sweep_event_to_proto, sweep_to_proto
from server.sweep_records import SWEEP_TERMINAL, SweepRecord
from server.sweeps import SweepController

Context: TypeAlias = Any  # grpc.aio.ServicerContext (grpcio ships no type stubs)


class SweepServicer(sweeps_pb2_grpc.SweepServiceServicer):
    """Thin: validates, reads the store, and asks the controller to act."""

    def __init__(self, store: JobStore, db: StoreRunner, hub: EventHub, controller: SweepController):
        self._store, self._db, self._hub, self._controller = store, db, hub, controller

    @unary
    async def CreateSweep(self, request: sweeps_pb2.CreateSweepRequest, context: Context) -> sweeps_pb2.Sweep:
        if request.request_id:
            check_request_id(request.request_id)
        sweep = request.sweep
        if not sweep.HasField("spec"):
            raise invalid_argument([FieldViolation("sweep.spec", "required")])
        plan, violations = self._controller.plan(sweep.spec)
        if len(sweep.display_name) > 200:
            violations.append(FieldViolation("sweep.display_name", "at most 200 characters"))
        violations += await missing_files(self._store, self._db, sweep.spec.base, "sweep.spec.base")
        if violations or plan is None:
            raise invalid_argument(violations)
        return sweep_to_proto(await self._controller.create(sweep, plan, request.request_id or None))

    @unary
    async def GetSweep(self, request: sweeps_pb2.GetSweepRequest, context: Context) -> sweeps_pb2.Sweep:
        return sweep_to_proto(await self._get(request.name))

    @unary
    async def ListSweeps(
        self, request: sweeps_pb2.ListSweepsRequest, context: Context
    ) -> sweeps_pb2.ListSweepsResponse:
        page = parse_page(request.page_size, request.page_token, "sweeps")
        records, cursor = await self._db.call(self._store.list_sweeps, page.size, page.cursor)
        return sweeps_pb2.ListSweepsResponse(
            sweeps=[sweep_to_proto(r) for r in records], next_page_token=make_token(cursor, "sweeps")
        )

    @unary
    async def CancelSweep(self, request: sweeps_pb2.CancelSweepRequest, context: Context) -> sweeps_pb2.Sweep:
        record = await self._controller.cancel(parse_name(request.name, "sweeps"))
        if record is None:
            raise not_found(request.name)
        return sweep_to_proto(record)

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
        record = await self._db.call(self._store.get_sweep, parse_name(name, "sweeps"))
        if record is None:
            raise not_found(name)
        return record
