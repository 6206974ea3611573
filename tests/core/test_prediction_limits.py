"""The worker's Predict side under load and hostile input: tenants are served in turn, a batch whose callers gave
up is dropped before any of its work, large decoded inputs are split over several forward passes, and a text
longer than the model's positions is truncated to them (not an index error)."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.tiny import make_tiny_bert
from tuneforge.workers.core.prediction import DECODED_BUDGET_BYTES, PredictionServer, as_loaded
from tuneforge.workers.messages import PredictBatch, PredictionsReady, WorkerEvent


class FakeModel:
    """Counts what the server decodes and runs; each decoded input is an `image` of the given size."""

    def __init__(self, side: int = 10) -> None:
        self.side = side
        self.decoded: list[Any] = []
        self.passes: list[int] = []

    def decode(self, item: tuple[str, Any]) -> Any:
        self.decoded.append(item[1])
        return SimpleNamespace(size=(self.side, self.side), value=item[1])

    def answer(self, decoded: list[Any], top_k: int) -> list[dict[str, Any]]:
        self.passes.append(len(decoded))
        return [{"labels": [(str(d.value), 1.0)]} for d in decoded]


class FakeCache:
    def __init__(self, model: FakeModel) -> None:
        self.model = model

    def get(self, artifact: str, sha256: str) -> FakeModel:
        return self.model


def server_with(model: FakeModel) -> tuple[PredictionServer, list[WorkerEvent]]:
    sent: list[WorkerEvent] = []
    return PredictionServer("worker-1", sent.append, FakeCache(model), start=False), sent  # type: ignore[arg-type]


def batch(number: int, tenant: str, inputs: int = 1, deadline: float = 0.0) -> PredictBatch:
    items: list[tuple[str, str | bytes]] = [("image", f"{tenant}-{number}-{i}") for i in range(inputs)]
    return PredictBatch(number, "ft-1", "a.tar", "sha", items, 1, tenant=tenant, deadline=deadline)


def test_tenants_are_served_in_turn_not_first_come() -> None:
    model = FakeModel()
    server, sent = server_with(model)
    for number in range(1, 6):
        server.submit(batch(number, "busy"))
    server.submit(batch(6, "quiet"))
    for _ in range(6):
        server.serve_one()
    answered = [event.batch for event in sent if isinstance(event, PredictionsReady)]
    assert answered == [1, 6, 2, 3, 4, 5]  # first come, first served would answer the quiet tenant last


def test_a_batch_past_its_deadline_is_dropped_unworked() -> None:
    model = FakeModel()
    server, sent = server_with(model)
    server.submit(batch(1, "late", inputs=12, deadline=time.time() - 1))
    server.submit(batch(2, "on-time", deadline=time.time() + 60))
    server.serve_one()
    server.serve_one()
    late, on_time = sent
    assert isinstance(late, PredictionsReady) and late.error_reason == "DEADLINE_EXCEEDED" and not late.results
    assert isinstance(on_time, PredictionsReady) and on_time.results == [{"labels": [("on-time-2-0", 1.0)]}]
    assert model.decoded == ["on-time-2-0"] and model.passes == [1], "nothing of the late batch was decoded or run"


def test_large_decoded_inputs_are_run_a_memory_budget_at_a_time() -> None:
    side = 5000  # 75 MB as RGB
    per_pass = DECODED_BUDGET_BYTES // (side * side * 3)
    model = FakeModel(side)
    server, sent = server_with(model)
    server.submit(batch(1, "t", inputs=7))
    server.serve_one()
    assert per_pass == 3 and model.passes == [3, 3, 1]
    answer = sent[0]
    assert isinstance(answer, PredictionsReady) and answer.forward_passes == 3 and len(answer.results) == 7


def test_a_text_longer_than_the_model_is_truncated_to_its_positions(tmp_path: Path) -> None:
    folder = make_tiny_bert(tmp_path / "bert")
    model = AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=True)
    assert model.config.max_position_embeddings == 64
    loaded = as_loaded(model, AutoTokenizer.from_pretrained(folder), {"task": "text_classification", "data": {}})
    long_text = " ".join(["alpha"] * 100)
    assert loaded.batch([long_text])["input_ids"].shape == (1, 64)
    (answer,) = loaded.answer([loaded.decode(("text", long_text))], top_k=1)
    assert len(answer["labels"]) == 1 and 0.0 < answer["labels"][0][1] <= 1.0
