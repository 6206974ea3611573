"""The adaptation toolbox through the real runner on a tiny BERT: LoRA artifacts, early stopping with the best
checkpoint, class reports, and every optimisation option trains."""

from __future__ import annotations

import dataclasses
import json
import re
import tarfile
from pathlib import Path

import pytest
import torch

from tests.core.test_training_core import FAST, make_spec, of_type, run
from tests.tiny import keyword_rows, write_jsonl
from workers.messages import EvaluationDone, LogEmitted, Outcome, TrainingProgress
from workers.spec import (
    AdaptationMethod,
    AdaptationSettings,
    ClassBalance,
    EvaluationSettings,
    LoraSettings,
    OptimizerKind,
    Precision,
    ScheduleKind,
    ScheduleSettings,
)


def unpack(work: Path) -> Path:
    with tarfile.open(work / "artifact.tar") as tar:
        tar.extractall(work / "model", filter="data")
    return work / "model"


def predictions(model: torch.nn.Module, folder: Path, texts: list[str]) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.inference_mode():
        return model(**tokenizer(texts, padding=True, return_tensors="pt")).logits


def test_lora_artifact_loads_merged_and_as_an_adapter(tiny_bert: Path, keyword_dataset: Path, tmp_path: Path) -> None:
    spec = make_spec(
        tiny_bert,
        adaptation=AdaptationSettings(AdaptationMethod.LORA, lora=LoraSettings(rank=4, alpha=8, dropout=0.0)),
        hyperparameters=dataclasses.replace(FAST, learning_rate=1e-2),
    )
    finished, events = run(spec, keyword_dataset, tmp_path)
    assert finished.outcome is Outcome.SUCCEEDED, finished.message
    assert any("lora" in e.message and "parameters train" in e.message for e in of_type(events, LogEmitted))
    assert of_type(events, EvaluationDone)[-1].metrics["eval_accuracy"] >= 0.8
    folder = unpack(tmp_path)
    assert (folder / "adapter" / "adapter_config.json").exists()

    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=True).eval()
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert, num_labels=3, ignore_mismatched_sizes=True, use_safetensors=True
    )
    adapted = PeftModel.from_pretrained(base, folder / "adapter").eval()
    texts = [row["text"] for row in keyword_rows(20, seed=9)]
    assert torch.allclose(predictions(merged, folder, texts), predictions(adapted, folder, texts), atol=1e-4)


def test_early_stopping_keeps_the_best_model(tiny_bert: Path, keyword_dataset: Path, tmp_path: Path) -> None:
    spec = make_spec(
        tiny_bert,
        hyperparameters=dataclasses.replace(FAST, epochs=30),
        evaluation=EvaluationSettings(log_every_steps=4, best_metric="eval_accuracy", early_stopping_patience=2),
    )
    finished, events = run(spec, keyword_dataset, tmp_path)
    assert finished.outcome is Outcome.SUCCEEDED
    evaluations = of_type(events, EvaluationDone)
    assert len(evaluations) < 30, "stopped early"
    assert any(e.message.startswith("early stop at step") for e in of_type(events, LogEmitted))
    metrics = json.loads((unpack(tmp_path) / "metrics.json").read_text())
    best = max(e.metrics["eval_accuracy"] for e in evaluations)
    assert metrics["stopped_early"] and metrics["best"]["eval_accuracy"] == best
    assert metrics["best_step"] == min(e.step for e in evaluations if e.metrics["eval_accuracy"] == best)
    report = metrics["classes"]
    assert report["labels"] == ["finance", "sport", "weather"]
    assert sum(map(sum, report["confusion_matrix"])) == 30
    assert set(report["per_class"]["sport"]) == {"precision", "recall", "f1", "support"}


@pytest.mark.parametrize(
    "changes",
    [
        {"optimizer": OptimizerKind.SGD, "learning_rate": 0.05, "nesterov": True},
        {"optimizer": OptimizerKind.ADAM},
        {"label_smoothing": 0.2, "class_balance": ClassBalance.WEIGHTED_LOSS},
        {"class_balance": ClassBalance.BALANCED_SAMPLING, "precision": Precision.BF16},
        {"schedule": ScheduleSettings(kind=ScheduleKind.ONE_CYCLE), "layer_decay": 0.8, "head_learning_rate": 5e-3},
        {"schedule": ScheduleSettings(kind=ScheduleKind.COSINE_WITH_RESTARTS, num_cycles=2, warmup_ratio=0.1)},
    ],
    ids=["sgd-nesterov", "adam", "smoothing-weights", "balanced-bf16", "one-cycle-decay", "restarts"],
)
def test_optimisation_options_train(tiny_bert: Path, keyword_dataset: Path, tmp_path: Path, changes: dict) -> None:  # type: ignore[type-arg]
    spec = make_spec(tiny_bert, hyperparameters=dataclasses.replace(FAST, **changes))
    finished, events = run(spec, keyword_dataset, tmp_path)
    assert finished.outcome is Outcome.SUCCEEDED, finished.message
    losses = [e.loss for e in of_type(events, TrainingProgress)]
    assert losses[-1] < losses[0], losses
    assert max(e.metrics["eval_accuracy"] for e in of_type(events, EvaluationDone)) >= 0.6  # chance is 1/3


def test_gradual_unfreezing_and_plateau_report_their_steps(
    tiny_bert: Path, keyword_dataset: Path, tmp_path: Path
) -> None:
    spec = make_spec(
        tiny_bert,
        adaptation=AdaptationSettings(AdaptationMethod.GRADUAL_UNFREEZING, unfreeze_every_epochs=2),
        hyperparameters=dataclasses.replace(
            FAST, epochs=6, schedule=ScheduleSettings(kind=ScheduleKind.REDUCE_ON_PLATEAU, patience=1, gamma=0.5)
        ),
    )
    finished, events = run(spec, keyword_dataset, tmp_path)
    assert finished.outcome is Outcome.SUCCEEDED
    messages = [e.message for e in of_type(events, LogEmitted)]
    assert [m.split(":")[0] for m in messages if m.startswith("epoch ")] == [f"epoch {i}" for i in range(1, 7)]
    assert "epoch 1: 0 top blocks unfrozen" in " ".join(messages)
    assert "epoch 5: 2 top blocks unfrozen" in " ".join(messages)


def test_imbalanced_weights_and_sampling_favour_the_rare_class(tiny_bert: Path, tmp_path: Path) -> None:
    from workers.core.optimization import class_weights

    weights = class_weights([0] * 90 + [1] * 10, 2)
    assert weights.tolist() == pytest.approx([100 / 180, 100 / 20])
    rows = [r for r in keyword_rows(150) if r["label"] != "weather"][:60] + [
        r for r in keyword_rows(150) if r["label"] == "weather"
    ][:6]
    data = write_jsonl(tmp_path / "imbalanced.jsonl", rows)
    spec = make_spec(tiny_bert, hyperparameters=dataclasses.replace(FAST, class_balance=ClassBalance.BALANCED_SAMPLING))
    finished, _ = run(spec, data, tmp_path / "work")
    assert finished.outcome is Outcome.SUCCEEDED


def test_sentence_pairs_reach_the_model(tiny_bert: Path, tmp_path: Path) -> None:
    """The label is the topic of the second text; the first is a distractor from another topic."""
    first, second = keyword_rows(120, seed=1), keyword_rows(120, seed=2)
    rows = [
        {"text": a["text"], "text_pair": b["text"], "label": b["label"]}
        for a, b in zip(first[1:] + first[:1], second, strict=True)
    ]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    spec = make_spec(tiny_bert)
    spec = dataclasses.replace(spec, data=dataclasses.replace(spec.data, text_pair_column="text_pair"))
    finished, events = run(spec, data, tmp_path / "work")
    assert finished.outcome is Outcome.SUCCEEDED, finished.message
    assert max(e.metrics["eval_accuracy"] for e in of_type(events, EvaluationDone)) >= 0.7  # chance is 1/3


def test_a_diverging_run_fails_with_the_step(tiny_bert: Path, keyword_dataset: Path, tmp_path: Path) -> None:
    spec = make_spec(
        tiny_bert,
        hyperparameters=dataclasses.replace(FAST, learning_rate=1e30, max_grad_norm=0.0),
    )
    finished, _ = run(spec, keyword_dataset, tmp_path)
    assert (finished.outcome, finished.reason) == (Outcome.FAILED, "NON_FINITE_LOSS"), finished
    # without skips allowed, the first report with a non-finite mean fails the job (test_faults covers skipping)
    pattern = r"the training loss became (nan|inf|-inf) at step \d+; lower the learning rate or enable clipping"
    assert re.fullmatch(pattern, finished.message), finished.message
