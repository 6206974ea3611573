"""The Predict batching window with a fake worker: calls for one model and tenant that arrive within the window
go out as one batch (64 inputs at most), each call gets exactly its own answers, and calls for another model or
tenant, or after the window, are batched apart. Counted exactly: a batching bug cannot pass as "fewer than 50"."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tuneforge.server.metrics.service_metrics import ServiceMetrics
from tuneforge.server.predictions import MAX_BATCH_INPUTS, Predictions
from tuneforge.workers.messages import PredictBatch, PredictionsReady


class FakeWorker:
    """Answers every batch on the next loop turn with one answer per input that names the input, so a call that got
    another call's slice is caught."""

    def __init__(self) -> None:
        self.batches: list[PredictBatch] = []
        self.predictions: Predictions | None = None

    def send(self, worker: str, batch: PredictBatch) -> None:
        self.batches.append(batch)
        answers = [{"labels": [(f"echo:{value!s}", 1.0), ("other", 0.0)]} for _, value in batch.inputs]
        ready = PredictionsReady(worker, batch.batch, answers, forward_passes=1)
        assert self.predictions is not None
        asyncio.get_running_loop().call_soon(self.predictions.on_answer, ready)


@pytest.fixture
def fake() -> tuple[FakeWorker, Predictions, ServiceMetrics]:
    worker, metrics = FakeWorker(), ServiceMetrics()
    worker.predictions = Predictions(worker.send, lambda: "worker-0", metrics)
    return worker, worker.predictions, metrics


def call(predictions: Predictions, text: str, job: str = "jobs/a", tenant: str = "t", top_k: int = 1) -> Any:
    return predictions.predict(job, f"/artifacts/{job}", f"sha-{job}", [("text", text)], top_k, 30.0, tenant=tenant)


def labels(answers: list[dict[str, Any]]) -> list[str]:
    return [answer["labels"][0][0] for answer in answers]


def test_fifty_concurrent_calls_are_one_batch_and_each_gets_its_own_answer(
    fake: tuple[FakeWorker, Predictions, ServiceMetrics],
) -> None:
    worker, predictions, metrics = fake

    async def scenario() -> list[list[dict[str, Any]]]:
        return await asyncio.gather(*(call(predictions, f"text {i}") for i in range(50)))

    answers = asyncio.run(scenario())
    assert len(worker.batches) == 1
    assert [value for _, value in worker.batches[0].inputs] == [f"text {i}" for i in range(50)]
    assert [labels(a) for a in answers] == [[f"echo:text {i}"] for i in range(50)]
    assert all(len(a[0]["labels"]) == 1 for a in answers), "top_k=1 trims each call's labels"
    assert metrics.prediction_batches._value.get() == 1
    assert metrics.prediction_inputs._value.get() == 50


def test_a_full_batch_goes_at_once_and_the_rest_follows(fake: tuple[FakeWorker, Predictions, ServiceMetrics]) -> None:
    worker, predictions, _ = fake

    async def scenario() -> list[list[dict[str, Any]]]:
        return await asyncio.gather(*(call(predictions, f"text {i}") for i in range(MAX_BATCH_INPUTS + 6)))

    answers = asyncio.run(scenario())
    assert [len(b.inputs) for b in worker.batches] == [MAX_BATCH_INPUTS, 6]
    assert [labels(a)[0] for a in answers] == [f"echo:text {i}" for i in range(MAX_BATCH_INPUTS + 6)]


def test_other_models_tenants_and_later_calls_are_batched_apart(
    fake: tuple[FakeWorker, Predictions, ServiceMetrics],
) -> None:
    worker, predictions, _ = fake

    async def scenario() -> None:
        together = [call(predictions, "a1"), call(predictions, "a2"), call(predictions, "b1", job="jobs/b")]
        together.append(call(predictions, "a3", tenant="u"))
        await asyncio.gather(*together)
        await call(predictions, "a4")  # after the first window closed: its own batch
        await call(predictions, "a5", top_k=2)

    asyncio.run(scenario())
    batches = [(b.job, b.tenant, [value for _, value in b.inputs], b.top_k) for b in worker.batches]
    assert sorted(batches[:3]) == [
        ("jobs/a", "t", ["a1", "a2"], 1),
        ("jobs/a", "u", ["a3"], 1),
        ("jobs/b", "t", ["b1"], 1),
    ]
    assert batches[3:] == [("jobs/a", "t", ["a4"], 1), ("jobs/a", "t", ["a5"], 2)]
