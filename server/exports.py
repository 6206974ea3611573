"""ExportModel requests: made once on a worker (which checks the export against the PyTorch model and writes it
to storage with its metadata), then served from storage."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

import grpc

from tuneforge.server.errors import ApiError, failed_precondition
from tuneforge.workers.messages import CallCommand, ExportArtifact, ExportReady, WorkerCall


class Exports:
    """Sends export requests to workers and hands each caller its answer."""

    def __init__(self, send: Callable[[str, CallCommand], None], pick_worker: Callable[[], str | None]):
        self._send = send
        self._pick_worker = pick_worker
        self._waiting: dict[int, tuple[str, asyncio.Future[dict[str, Any]]]] = {}
        self._ids = itertools.count(1)

    async def export(
        self,
        job: str,
        artifact: str,
        sha256: str,
        format: str,
        opset: int,
        destination: str,
        timeout_s: float,
        tenant: str = "",
    ) -> dict[str, Any]:
        """The export's metadata once a worker made and checked it. ApiError with the reason otherwise."""
        worker = self._pick_worker()
        if worker is None:
            raise ApiError(grpc.StatusCode.UNAVAILABLE, "NO_WORKER", "no worker is ready to export")
        request = next(self._ids)
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[request] = (worker, answer)
        try:
            self._send(worker, ExportArtifact(request, job, artifact, sha256, format, opset, destination, tenant))
        except KeyError as exc:
            self._waiting.pop(request, None)
            raise ApiError(grpc.StatusCode.UNAVAILABLE, "WORKER_UNREACHABLE", str(exc)) from exc
        try:
            return await asyncio.wait_for(answer, timeout_s)
        except TimeoutError:
            raise ApiError(grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", "the export took too long") from None
        finally:
            self._waiting.pop(request, None)

    def on_answer(self, event: WorkerCall) -> None:
        if not isinstance(event, ExportReady):
            return
        waiting = self._waiting.pop(event.request, None)
        if waiting is None or waiting[1].done():
            return
        if event.error_reason == "INTERNAL":
            waiting[1].set_exception(ApiError(grpc.StatusCode.INTERNAL, "INTERNAL", event.error_message))
        elif event.error_reason:
            waiting[1].set_exception(failed_precondition(event.error_reason, event.error_message))
        else:
            waiting[1].set_result(event.result)

    def on_worker_lost(self, worker: str) -> None:
        for holder, answer in list(self._waiting.values()):
            if holder == worker and not answer.done():
                message = f"{worker} was lost while exporting; try again"
                answer.set_exception(ApiError(grpc.StatusCode.UNAVAILABLE, "WORKER_LOST", message))
