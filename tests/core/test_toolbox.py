"""The adaptation toolbox through the real runner on a tiny BERT: LoRA artifacts, early stopping with the best
checkpoint, class reports, gradual unfreezing and plateau scheduling checked by their effect on weights and rates,
balanced sampling by the labels it draws, and the optimisation options combined into runs that learn."""

from __future__ import annotations

import dataclasses
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.core.test_training_core import FAST, make_spec, of_type, run
from tests.tiny import keyword_rows, write_jsonl
from tuneforge.workers.messages import CheckpointWritten, EvaluationDone, LogEmitted, Outcome, TrainingProgress
from tuneforge.workers.spec import (
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
        {
            "optimizer": OptimizerKind.SGD,
            "learning_rate": 0.05,
            "nesterov": True,
            "schedule": ScheduleSettings(kind=ScheduleKind.ONE_CYCLE),
            "layer_decay": 0.8,
            "head_learning_rate": 0.1,
        },
        {
            "optimizer": OptimizerKind.ADAM,
            "label_smoothing": 0.2,
            "class_balance": ClassBalance.WEIGHTED_LOSS,
            "precision": Precision.BF16,
            "schedule": ScheduleSettings(kind=ScheduleKind.COSINE_WITH_RESTARTS, num_cycles=2, warmup_ratio=0.1),
        },
    ],
    ids=["sgd-nesterov-one-cycle-decay", "adam-smoothing-weights-bf16-restarts"],
)
def test_optimisation_options_together_learn_the_task(
    tiny_bert: Path,
    keyword_dataset: Path,
    tmp_path: Path,
    changes: dict,  # type: ignore[type-arg]
) -> None:
    """That the options combine into a run that learns; each one's own effect is checked where it is built
    (tests/unit/test_optimizer_settings.py)."""
    spec = make_spec(tiny_bert, hyperparameters=dataclasses.replace(FAST, **changes))
    finished, events = run(spec, keyword_dataset, tmp_path)
    assert finished.outcome is Outcome.SUCCEEDED, finished.message
    assert max(e.metrics["eval_accuracy"] for e in of_type(events, EvaluationDone)) >= 0.8  # chance is 1/3


def pretrained_weights(tiny_bert: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(tiny_bert / "model.safetensors")


def test_gradual_unfreezing_leaves_each_block_untouched_until_its_epoch(
    tiny_bert: Path, keyword_dataset: Path, tmp_path: Path
) -> None:
    """Every epoch's checkpoint is compared with the pretrained weights: a block changes only once its epoch came
    (blocks from the top, one more every 2 epochs; the embeddings never)."""
    from safetensors.torch import load_file

    saved: dict[int, dict[str, torch.Tensor]] = {}

    def keep_weights(event: object) -> None:
        if isinstance(event, CheckpointWritten):
            position = json.loads((Path(event.path) / "trainer_state.json").read_text())
            assert position["epoch_complete"], "checkpoints here come at epoch ends only"
            saved[position["epoch"]] = load_file(Path(event.path) / "model.safetensors")

    spec = make_spec(
        tiny_bert,
        adaptation=AdaptationSettings(AdaptationMethod.GRADUAL_UNFREEZING, unfreeze_every_epochs=2),
        hyperparameters=dataclasses.replace(FAST, epochs=6),
    )
    finished, events = run(spec, keyword_dataset, tmp_path, on_event=keep_weights)
    assert finished.outcome is Outcome.SUCCEEDED, finished.message
    messages = [e.message for e in of_type(events, LogEmitted)]
    assert [m.split(";")[0] for m in messages if m.startswith("epoch ")] == [
        f"epoch {epoch}: {(epoch - 1) // 2} top blocks unfrozen" for epoch in range(1, 7)
    ]
    pretrained = pretrained_weights(tiny_bert)
    parts = {
        "embeddings": "bert.embeddings.",
        "block 0": "bert.encoder.layer.0.",
        "block 1": "bert.encoder.layer.1.",
        "pooler": "bert.pooler.",
    }

    def changed(weights: dict[str, torch.Tensor]) -> set[str]:
        return {
            part
            for part, prefix in parts.items()
            if any(not torch.equal(weights[n], pretrained[n]) for n in pretrained if n.startswith(prefix))
        }

    assert sorted(saved) == [1, 2, 3, 4, 5, 6]
    expected = {1: set(), 2: set(), 3: {"pooler", "block 1"}, 4: {"pooler", "block 1"}}
    expected |= {5: {"pooler", "block 1", "block 0"}, 6: {"pooler", "block 1", "block 0"}}
    assert {epoch: changed(weights) for epoch, weights in saved.items()} == expected
    assert not torch.equal(saved[1]["classifier.weight"], saved[2]["classifier.weight"]), "the head trains from epoch 1"


def test_reduce_on_plateau_lowers_the_rate_as_torch_would(
    tiny_bert: Path, keyword_dataset: Path, tmp_path: Path
) -> None:
    """The learning rate of every report, replayed against torch's own ReduceLROnPlateau fed the same evaluations
    (patience p here is torch's p - 1: ours reduces on the p-th evaluation without improvement)."""
    gamma, patience, rate = 0.5, 1, 1e-2
    schedule = ScheduleSettings(kind=ScheduleKind.REDUCE_ON_PLATEAU, patience=patience, gamma=gamma)
    hyperparameters = dataclasses.replace(FAST, epochs=4, learning_rate=rate, schedule=schedule)
    evaluation = EvaluationSettings(log_every_steps=2, eval_every_steps=4)  # 12 evaluations: some fail to improve
    spec = make_spec(tiny_bert, hyperparameters=hyperparameters, evaluation=evaluation)
    finished, events = run(spec, keyword_dataset, tmp_path)
    assert finished.outcome is Outcome.SUCCEEDED, finished.message

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=rate)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=gamma, patience=patience - 1, threshold=0.0
    )
    reported, expected = [], []
    for event in events:
        if isinstance(event, EvaluationDone):
            reference.step(event.metrics["eval_loss"])
        elif isinstance(event, TrainingProgress):
            reported.append(event.learning_rate)
            expected.append(optimizer.param_groups[0]["lr"])
    assert reported == pytest.approx(expected, rel=1e-9)
    assert min(expected) <= rate * gamma**2, "the run hit a plateau at least twice"


def test_balanced_sampling_draws_every_class_equally_often(
    tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """66 rows, 6 of them `weather`: the training loader's real sampler is watched, and the labels it draws are
    counted (a spy; the real sampler answers)."""
    from tuneforge.workers.core import trainer
    from tuneforge.workers.core.optimization import balanced_sampler

    drawn: list[int] = []

    def watched(labels: list[int], generator: torch.Generator) -> object:
        sampler = balanced_sampler(labels, generator)

        class Counted:
            def __iter__(self) -> object:
                for index in sampler:
                    drawn.append(labels[index])
                    yield index

            def __len__(self) -> int:
                return len(sampler)

        return Counted()

    monkeypatch.setattr(trainer, "balanced_sampler", watched)
    rows = [r for r in keyword_rows(150) if r["label"] != "weather"][:60]
    rows += [r for r in keyword_rows(150) if r["label"] == "weather"][:6]
    data = write_jsonl(tmp_path / "imbalanced.jsonl", rows)
    hp = dataclasses.replace(FAST, epochs=6, class_balance=ClassBalance.BALANCED_SAMPLING)
    finished, _ = run(make_spec(tiny_bert, hyperparameters=hp), data, tmp_path / "work")
    assert finished.outcome is Outcome.SUCCEEDED, finished.message
    counts = Counter(drawn)
    assert len(counts) == 3 and sum(counts.values()) >= 250
    # the rare class is 6 rows in 66 (9%); balanced, each class is a third (4 standard deviations either way)
    assert all(0.24 < count / len(drawn) < 0.43 for count in counts.values()), counts


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
