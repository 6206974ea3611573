"""Data-parallel training over gloo on the CPU: two ranks take the same steps as one rank with the same global batch
and seed, and a checkpoint written by two ranks resumes on one."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest
import torch

from tests.core.test_resume import artifact_state
from tests.core.test_training_core import FAST, make_spec, of_type, run
from tests.tiny import make_tiny_bert
from tuneforge.workers.messages import LogEmitted, Outcome, TrainingProgress, WorkerEvent
from tuneforge.workers.spec import EvaluationSettings, ScheduleKind, ScheduleSettings, TrainingSpec


@pytest.fixture(scope="module")
def bert_without_dropout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Dropout draws differ with the rows a process holds; without it two ranks must match one exactly."""
    return make_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert-plain", num_labels=3, dropout=0.0)


def spec_on(model: Path, ranks: int) -> TrainingSpec:
    hyperparameters = dataclasses.replace(
        FAST,
        epochs=2,
        batch_size=8,
        gradient_accumulation_steps=2,  # micro-batches of 4 rows, each split 2 + 2 over two ranks
        seed=5,
        schedule=ScheduleSettings(kind=ScheduleKind.COSINE, warmup_ratio=0.1),
    )
    evaluation = EvaluationSettings(log_every_steps=1, eval_every_steps=6, checkpoint_every_steps=4)
    return dataclasses.replace(make_spec(model, hyperparameters=hyperparameters, evaluation=evaluation), ranks=ranks)


NOISE_ONLY = "attention.self.key.bias"
"""Softmax ignores a bias added to every key, so its true gradient is zero: what it gets is rounding noise, which
Adam scales up to full steps. It differs between any two summation orders and says nothing about the ranks."""


def assert_same_weights(a: Path, b: Path) -> None:
    weights_a, metrics_a = artifact_state(a)
    weights_b, metrics_b = artifact_state(b)
    assert weights_a.keys() == weights_b.keys()
    compared = [name for name in weights_a if not name.endswith(NOISE_ONLY)]
    assert len(compared) > 30
    for name in compared:
        assert torch.allclose(weights_a[name], weights_b[name], atol=2e-5), name
    assert metrics_a["steps"] == metrics_b["steps"]
    assert metrics_a["final"] == pytest.approx(metrics_b["final"], abs=1e-4)


def test_two_gloo_ranks_match_one_rank(bert_without_dropout: Path, keyword_dataset: Path, tmp_path: Path) -> None:
    single, single_events = run(spec_on(bert_without_dropout, 1), keyword_dataset, tmp_path / "one")
    double, double_events = run(spec_on(bert_without_dropout, 2), keyword_dataset, tmp_path / "two")
    assert single.outcome is Outcome.SUCCEEDED, single.message
    assert double.outcome is Outcome.SUCCEEDED, double.message
    messages = [e.message for e in of_type(double_events, LogEmitted)]
    assert any("data-parallel over 2 ranks (gloo)" in m for m in messages), messages
    # the same global batches: rank 0 reports the loss and the sample count of the whole step
    losses_one = [(e.step, e.loss, e.window_samples) for e in of_type(single_events, TrainingProgress)]
    losses_two = [(e.step, e.loss, e.window_samples) for e in of_type(double_events, TrainingProgress)]
    assert [s for s, _, n in losses_one] == [s for s, _, n in losses_two]
    assert [n for _, _, n in losses_one] == [n for _, _, n in losses_two]
    assert [loss for _, loss, _ in losses_one] == pytest.approx([loss for _, loss, _ in losses_two], abs=1e-4)
    assert_same_weights(tmp_path / "one", tmp_path / "two")
    assert not (tmp_path / "two" / "rank-1" / "artifact.tar").exists()  # only rank 0 writes


def test_checkpoint_of_two_ranks_resumes_on_one(
    bert_without_dropout: Path, keyword_dataset: Path, tmp_path: Path
) -> None:
    single, _ = run(spec_on(bert_without_dropout, 1), keyword_dataset, tmp_path / "plain")
    assert single.outcome is Outcome.SUCCEEDED
    cancel = threading.Event()

    def stop(event: WorkerEvent) -> None:
        if isinstance(event, TrainingProgress) and event.step >= 10:
            cancel.set()

    stopped, _ = run(spec_on(bert_without_dropout, 2), keyword_dataset, tmp_path / "moved", cancel, stop)
    assert stopped.outcome is Outcome.CANCELLED, stopped.message
    checkpoints = sorted(p.name for p in (tmp_path / "moved" / "checkpoints").glob("step-*"))
    assert checkpoints == ["step-000008"]
    resumed, events = run(spec_on(bert_without_dropout, 1), keyword_dataset, tmp_path / "moved")
    assert resumed.outcome is Outcome.SUCCEEDED, resumed.message
    assert "resumed from the checkpoint at step 8 (attempt 1)" in [e.message for e in of_type(events, LogEmitted)]
    assert_same_weights(tmp_path / "plain", tmp_path / "moved")
