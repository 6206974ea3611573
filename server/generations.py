"""Generate calls, batched and streamed: calls for the same model that arrive within a few milliseconds of each other
go to one worker as one GenerateBatch (a row each), and the worker's TextGenerated pieces are handed to each call as
they come. A call that ends early (its caller cancelled, or its deadline passed) tells the worker to stop its row;
a batch whose worker dies ends its calls with UNAVAILABLE. One tenant has at most MAX_TENANT_ROWS calls in flight,
since each holds a worker's compute for as long as it writes."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from tuneforge.server.call_gathering import CallGatherer, Gathered, ModelKey, model_key
from tuneforge.server.errors import ApiError
from tuneforge.server.metrics.service_metrics import ServiceMetrics
from tuneforge.workers.messages import (
    CallCommand,
    GenerateBatch,
    GeneratedPiece,
    GenerationRequest,
    StopGeneration,
    TextGenerated,
    WorkerCall,
)

MAX_BATCH_ROWS = 16
"""Calls one batch holds: each row's key-value cache grows with every token, so a batch stays small."""
MAX_TENANT_ROWS = 16
BATCH_ERROR_CODES = {
    "INTERNAL": grpc.StatusCode.INTERNAL,
    "NOT_GENERATIVE": grpc.StatusCode.FAILED_PRECONDITION,
    "CHECKPOINT_NOT_FOUND": grpc.StatusCode.FAILED_PRECONDITION,
}


@dataclass
class _Row:
    request: GenerationRequest
    deadline: float
    pieces: asyncio.Queue[GeneratedPiece | ApiError] = field(default_factory=asyncio.Queue)
    batch: int = 0
    index: int = 0
    tokens: int = 0
    """Tokens written so far (for the metric)."""
    finished: bool = False
    """The worker sent the row's last piece: it writes no more for it."""
    ended: bool = False
    """The call is over: it took its last piece, failed, or its caller went away."""


class Generations:
    """Gathers calls per model, sends batches to workers, and streams each call its pieces."""

    def __init__(
        self, send: Callable[[str, CallCommand], None], pick_worker: Callable[[], str | None], metrics: ServiceMetrics
    ):
        self._send = send
        self._pick_worker = pick_worker
        self._metrics = metrics
        self._gathering = CallGatherer[_Row](MAX_BATCH_ROWS, self._dispatch)
        self._in_flight: dict[int, tuple[str, list[_Row]]] = {}
        self._per_tenant: dict[str, int] = defaultdict(int)
        self._ids = itertools.count(1)

    async def generate(
        self,
        job: str,
        artifact: str,
        sha256: str,
        request: GenerationRequest,
        timeout_s: float,
        checkpoint: str = "",
        tenant: str = "",
    ) -> AsyncIterator[GeneratedPiece]:
        """The call's pieces as the worker writes them, the last with its finish reason. ApiError:
        RESOURCE_EXHAUSTED over the tenant's calls in flight, DEADLINE_EXCEEDED, UNAVAILABLE, or the batch's
        failure. With `checkpoint`, `artifact` is the job's checkpoint folder."""
        if self._per_tenant[tenant] >= MAX_TENANT_ROWS:
            raise ApiError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "TOO_MANY_GENERATIONS",
                f"at most {MAX_TENANT_ROWS} Generate calls may run at once per tenant; wait for one to end",
                {"limit": str(MAX_TENANT_ROWS)},
            )
        self._per_tenant[tenant] += 1
        row = _Row(request, time.time() + timeout_s)
        ending = "cancelled"  # unless the stream reaches its end or fails
        try:
            self._gathering.add(model_key(job, sha256, checkpoint, tenant), artifact, checkpoint, row, 1)
            while True:
                remaining = row.deadline - time.time()
                try:
                    piece = await asyncio.wait_for(row.pieces.get(), max(0.0, remaining))
                except TimeoutError:
                    ending = "deadline"
                    raise ApiError(
                        grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", "the generation did not finish in time"
                    ) from None
                if isinstance(piece, ApiError):
                    ending = "failed"
                    raise piece
                self._metrics.generated_tokens.inc(max(0, piece.generated_tokens - row.tokens))
                row.tokens = max(row.tokens, piece.generated_tokens)
                if piece.finish:
                    ending = piece.finish
                    row.ended = True
                yield piece
                if piece.finish:
                    return
        finally:
            self._metrics.generate_calls.labels(ending).inc()
            self._per_tenant[tenant] -= 1
            if not self._per_tenant[tenant]:
                del self._per_tenant[tenant]
            self._let_go(row)

    def _dispatch(self, key: ModelKey, gathering: Gathered[_Row]) -> None:
        rows = [row for row in gathering.calls if not row.ended]
        if not rows:
            return
        worker = self._pick_worker()
        if worker is None:
            self._fail(rows, ApiError(grpc.StatusCode.UNAVAILABLE, "NO_WORKER", "no worker is ready to generate"))
            return
        batch = next(self._ids)
        for index, row in enumerate(rows):
            row.batch, row.index = batch, index
        command = GenerateBatch(
            batch,
            key[0],
            gathering.artifact,
            "" if gathering.checkpoint else key[1],
            [row.request for row in rows],
            gathering.checkpoint,
            gathering.tenant,
            max(row.deadline for row in rows),
        )
        self._in_flight[batch] = (worker, rows)
        try:
            self._send(worker, command)
        except KeyError as exc:
            self._in_flight.pop(batch, None)
            self._fail(rows, ApiError(grpc.StatusCode.UNAVAILABLE, "WORKER_UNREACHABLE", str(exc)))
            return
        self._metrics.generation_batches.inc()

    def _let_go(self, row: _Row) -> None:
        """A call that ended before its last piece: its worker stops writing its row (or the batch never goes)."""
        if row.ended:
            return
        row.ended = True
        flight = self._in_flight.get(row.batch)  # none while still gathering: _dispatch leaves the row out
        if flight is None:
            return
        worker, rows = flight
        if all(other.ended or other.finished for other in rows):
            del self._in_flight[row.batch]
        if row.finished:
            return
        with contextlib.suppress(KeyError):  # a worker that is gone took its batch with it
            self._send(worker, StopGeneration(row.batch, (row.index,)))

    def on_answer(self, event: WorkerCall) -> None:
        """A worker's pieces: each goes to its row's call (or the batch's error to every call)."""
        if not isinstance(event, TextGenerated):
            return
        flight = self._in_flight.get(event.batch)
        if flight is None:
            return
        _, rows = flight
        if event.error_reason:
            del self._in_flight[event.batch]
            code = BATCH_ERROR_CODES.get(event.error_reason, grpc.StatusCode.FAILED_PRECONDITION)
            self._fail(rows, ApiError(code, event.error_reason, event.error_message))
            return
        for piece in event.pieces:
            if 0 <= piece.row < len(rows) and not rows[piece.row].ended:
                rows[piece.row].finished = rows[piece.row].finished or bool(piece.finish)
                rows[piece.row].pieces.put_nowait(piece)
        if all(row.ended or row.finished for row in rows):
            del self._in_flight[event.batch]

    def on_worker_lost(self, worker: str) -> None:
        for batch, (holder, rows) in list(self._in_flight.items()):
            if holder == worker:
                del self._in_flight[batch]
                message = f"{worker} was lost while generating; try again"
                self._fail(rows, ApiError(grpc.StatusCode.UNAVAILABLE, "WORKER_LOST", message))

    @staticmethod
    def _fail(rows: list[_Row], error: ApiError) -> None:
        for row in rows:
            if not row.ended:
                row.pieces.put_nowait(error)
