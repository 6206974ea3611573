"""Predict calls, batched: calls for the same model that arrive within a few milliseconds of each other (or fill a
batch) go to one worker as one PredictBatch, so fifty concurrent calls cost a handful of forward passes.

Each call waits for its own answers until its deadline; a batch whose worker dies fails its calls with UNAVAILABLE.
The worker is chosen among the ready ones, idle ones first (a busy worker answers on a side thread while it trains).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from tuneforge.server.call_gathering import CallGatherer, Gathered, ModelKey, model_key
from tuneforge.server.errors import ApiError
from tuneforge.server.metrics.service_metrics import ServiceMetrics
from tuneforge.workers.messages import CallCommand, PredictBatch, PredictionsReady, WorkerCall

log = logging.getLogger(__name__)

MAX_BATCH_INPUTS = 64
BATCH_ERROR_CODES = {"INTERNAL": grpc.StatusCode.INTERNAL, "DEADLINE_EXCEEDED": grpc.StatusCode.DEADLINE_EXCEEDED}


@dataclass
class _Call:
    inputs: list[tuple[str, str | bytes]]
    top_k: int
    answer: asyncio.Future[list[dict[str, Any]]]
    deadline: float
    """Wall-clock time the caller gives up."""


@dataclass
class _InFlight:
    worker: str
    calls: list[_Call]


class Predictions:
    """Gathers calls per model, sends batches to workers, and hands each call its answers."""

    def __init__(
        self,
        send: Callable[[str, CallCommand], None],
        pick_worker: Callable[[], str | None],
        metrics: ServiceMetrics,
    ):
        self._send = send
        self._pick_worker = pick_worker
        self._metrics = metrics
        self._gathering = CallGatherer[_Call](MAX_BATCH_INPUTS, self._dispatch)
        self._in_flight: dict[int, _InFlight] = {}
        self._ids = itertools.count(1)

    async def predict(
        self,
        job: str,
        artifact: str,
        sha256: str,
        inputs: list[tuple[str, str | bytes]],
        top_k: int,
        timeout_s: float,
        checkpoint: str = "",
        tenant: str = "",
    ) -> list[dict[str, Any]]:
        """This call's answers, in order. ApiError: DEADLINE_EXCEEDED, UNAVAILABLE, or the batch's failure.
        With `checkpoint`, `artifact` is the job's checkpoint folder. `tenant` is the caller's: workers serve tenants'
        batches in turn."""
        call = _Call(inputs, top_k, asyncio.get_running_loop().create_future(), time.time() + timeout_s)
        self._gathering.add(model_key(job, sha256, checkpoint, tenant), artifact, checkpoint, call, len(inputs))
        try:
            return await asyncio.wait_for(asyncio.shield(call.answer), timeout_s)
        except TimeoutError:
            raise ApiError(
                grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", "the prediction did not finish in time"
            ) from None

    def _dispatch(self, key: ModelKey, gathering: Gathered[_Call]) -> None:
        calls = [call for call in gathering.calls if not call.answer.done()]
        if not calls:
            return
        worker = self._pick_worker()
        if worker is None:
            self._fail(calls, ApiError(grpc.StatusCode.UNAVAILABLE, "NO_WORKER", "no worker is ready to predict"))
            return
        batch_id = next(self._ids)
        inputs = [item for call in calls for item in call.inputs]
        top_k = max(c.top_k for c in calls)
        deadline = max(call.deadline for call in calls)  # the worker drops the batch once every caller gave up
        command = PredictBatch(
            batch_id,
            key[0],
            gathering.artifact,
            key[1],
            inputs,
            top_k,
            gathering.checkpoint,
            gathering.tenant,
            deadline,
        )
        self._in_flight[batch_id] = _InFlight(worker, calls)
        try:
            self._send(worker, command)
        except KeyError as exc:
            self._in_flight.pop(batch_id, None)
            self._fail(calls, ApiError(grpc.StatusCode.UNAVAILABLE, "WORKER_UNREACHABLE", str(exc)))
            return
        self._metrics.prediction_batches.inc()
        self._metrics.prediction_inputs.inc(len(inputs))

    def on_answer(self, event: WorkerCall) -> None:
        """A worker's answers: each call gets its slice (or the batch's error)."""
        if not isinstance(event, PredictionsReady):
            return
        flight = self._in_flight.pop(event.batch, None)
        if flight is None:
            return
        self._metrics.prediction_forward_passes.inc(event.forward_passes)
        if event.error_reason:
            code = BATCH_ERROR_CODES.get(event.error_reason, grpc.StatusCode.FAILED_PRECONDITION)
            self._fail(flight.calls, ApiError(code, event.error_reason, event.error_message))
            return
        offset = 0
        for call in flight.calls:
            answers = event.results[offset : offset + len(call.inputs)]
            offset += len(call.inputs)
            if not call.answer.done():
                k = call.top_k
                call.answer.set_result([{**a, "labels": a["labels"][:k]} if "labels" in a else a for a in answers])

    def on_worker_lost(self, worker: str) -> None:
        for batch_id, flight in list(self._in_flight.items()):
            if flight.worker == worker:
                del self._in_flight[batch_id]
                message = f"{worker} was lost while predicting; try again"
                self._fail(flight.calls, ApiError(grpc.StatusCode.UNAVAILABLE, "WORKER_LOST", message))

    @staticmethod
    def _fail(calls: list[_Call], error: ApiError) -> None:
        for call in calls:
            if not call.answer.done():
                call.answer.set_exception(error)
