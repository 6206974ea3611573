"""The server's side of Generate with a fake worker: calls that arrive together are one batch with a row each,
each call receives exactly its own row's pieces in order, a call that ends early (its caller went away) tells the
worker to stop its row, a dead worker ends its calls with UNAVAILABLE, and one tenant cannot hold more than
MAX_TENANT_ROWS calls at once (another tenant still can)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from tuneforge.server.errors import ApiError
from tuneforge.server.generations import MAX_TENANT_ROWS, Generations
from tuneforge.server.metrics.service_metrics import ServiceMetrics
from tuneforge.workers.messages import (
    CallCommand,
    GenerateBatch,
    GeneratedPiece,
    GenerationRequest,
    StopGeneration,
    TextGenerated,
)


class FakeWorker:
    """Writes each row's prompt back a character per step, ending the row with `stop`; `hold` keeps it silent."""

    def __init__(self, hold: bool = False) -> None:
        self.commands: list[CallCommand] = []
        self.hold = hold
        self.generations: Generations | None = None

    def send(self, worker: str, command: CallCommand) -> None:
        self.commands.append(command)
        if isinstance(command, GenerateBatch) and not self.hold:
            asyncio.get_running_loop().create_task(self.write(worker, command))

    async def write(self, worker: str, batch: GenerateBatch) -> None:
        assert self.generations is not None
        longest = max(len(request.prompt) for request in batch.requests)
        for step in range(longest):
            pieces = tuple(
                GeneratedPiece(row, request.prompt[step], step + 1, "stop" if step == len(request.prompt) - 1 else "")
                for row, request in enumerate(batch.requests)
                if step < len(request.prompt)
            )
            self.generations.on_answer(TextGenerated(worker, batch.batch, pieces))
            await asyncio.sleep(0)


def generations(worker: FakeWorker) -> Generations:
    worker.generations = Generations(worker.send, lambda: "worker-0", ServiceMetrics())
    return worker.generations


def call(
    generating: Generations, prompt: str, tenant: str = "t", timeout_s: float = 30
) -> AsyncIterator[GeneratedPiece]:
    return generating.generate(
        "jobs/a", "/artifacts/a", "sha", GenerationRequest(prompt=prompt), timeout_s, tenant=tenant
    )


async def sent_for(worker: FakeWorker, tenant: str, rows: int) -> None:
    """Waits until the worker was sent batches holding `rows` of the tenant's calls."""
    while sum(len(c.requests) for c in worker.commands if isinstance(c, GenerateBatch) and c.tenant == tenant) < rows:
        await asyncio.sleep(0.005)


async def collect(pieces: AsyncIterator[GeneratedPiece]) -> list[GeneratedPiece]:
    return [piece async for piece in pieces]


def test_calls_that_arrive_together_are_one_batch_and_each_streams_its_own_row() -> None:
    worker = FakeWorker()
    generating = generations(worker)
    prompts = ["abc", "hello world", "xy"]

    async def scenario() -> list[list[GeneratedPiece]]:
        return await asyncio.gather(*(collect(call(generating, prompt)) for prompt in prompts))

    streams = asyncio.run(scenario())
    batches = [command for command in worker.commands if isinstance(command, GenerateBatch)]
    assert len(batches) == 1 and [r.prompt for r in batches[0].requests] == prompts
    for prompt, pieces in zip(prompts, streams, strict=True):
        assert "".join(piece.text for piece in pieces) == prompt and pieces[-1].finish == "stop"
    assert not any(isinstance(command, StopGeneration) for command in worker.commands)


def test_a_call_that_ends_early_stops_its_row_on_the_worker() -> None:
    worker = FakeWorker()
    generating = generations(worker)

    async def scenario() -> None:
        pieces = call(generating, "a long answer")
        first = await anext(pieces)
        assert first.text == "a"
        await pieces.aclose()  # what grpc.aio does to a handler whose caller cancelled

    asyncio.run(scenario())
    assert [c for c in worker.commands if isinstance(c, StopGeneration)] == [StopGeneration(1, (0,))]


def test_a_lost_worker_ends_its_calls_with_unavailable_and_the_deadline_holds() -> None:
    worker = FakeWorker(hold=True)
    generating = generations(worker)

    async def lost() -> None:
        pieces = collect(call(generating, "abc"))
        task = asyncio.create_task(pieces)
        while not worker.commands:
            await asyncio.sleep(0.005)
        generating.on_worker_lost("worker-0")
        with pytest.raises(ApiError) as error:
            await task
        assert error.value.code == grpc.StatusCode.UNAVAILABLE and error.value.reason == "WORKER_LOST"
        with pytest.raises(ApiError) as late:
            await collect(call(generating, "abc", timeout_s=0.05))
        assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED

    asyncio.run(lost())


def test_one_tenant_holds_at_most_max_tenant_rows_calls() -> None:
    worker = FakeWorker(hold=True)
    generating = generations(worker)

    async def scenario() -> None:
        held = [asyncio.create_task(collect(call(generating, "abc", tenant="greedy"))) for _ in range(MAX_TENANT_ROWS)]
        await sent_for(worker, "greedy", MAX_TENANT_ROWS)
        with pytest.raises(ApiError) as error:
            await collect(call(generating, "abc", tenant="greedy"))
        assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.value.reason == "TOO_MANY_GENERATIONS"
        other = asyncio.create_task(collect(call(generating, "abc", tenant="modest")))
        await sent_for(worker, "modest", 1)  # another tenant's call is admitted

        for task in [*held, other]:
            task.cancel()
        await asyncio.gather(*held, other, return_exceptions=True)
        admitted = asyncio.create_task(collect(call(generating, "abc", tenant="greedy")))
        await sent_for(worker, "greedy", MAX_TENANT_ROWS + 1)  # the tenant's ended calls no longer count
        admitted.cancel()
        await asyncio.gather(admitted, return_exceptions=True)

    asyncio.run(scenario())
