"""Few-shot mode in the core: K examples per class drawn with the seed, the rest held out for validation, and the
nearest-class-mean baseline measured from the pretrained backbone for text, images and audio."""

from __future__ import annotations

import dataclasses
import json
import tarfile
from pathlib import Path

import pytest

from tests.core.test_audio_task import audio_spec, tiny_wav2vec2  # noqa: F401  (fixture)
from tests.core.test_image_task import image_spec, tiny_vit  # noqa: F401  (fixture)
from tests.core.test_training_core import FAST, make_spec, of_type, run
from tests.media import write_shapes_zip, write_tones_zip
from tests.tiny import keyword_rows, write_jsonl
from tuneforge.workers.core.splits import FEW_SHOT_VALIDATION_CAP, sample_shots, training_split
from tuneforge.workers.messages import ArtifactWritten, AutoChosen, EvaluationDone, JobStarted, LogEmitted, Outcome
from tuneforge.workers.spec import AdaptationMethod, AdaptationSettings, DataSettings


def test_shots_are_drawn_per_class_with_the_seed() -> None:
    items = [(f"x{i}", "abc"[i % 3]) for i in range(60)] + [("rare", "d")]
    shots, rest = sample_shots(items, lambda item: item[1], 4, seed=5)
    assert sorted(label for _, label in shots) == ["a"] * 4 + ["b"] * 4 + ["c"] * 4 + ["d"]
    assert len(rest) == 61 - 13 and not set(shots) & set(rest)
    assert sample_shots(items, lambda item: item[1], 4, seed=5) == (shots, rest), "same seed, same shots"
    assert sample_shots(items, lambda item: item[1], 4, seed=6)[0] != shots


def test_the_rest_validates_when_nothing_else_does() -> None:
    items = [(i, "ab"[i % 2]) for i in range(3000)]
    train, validation = training_split(items, None, lambda item: item[1], 0.0, 8, seed=0)
    assert len(train) == 16 and len(validation) == FEW_SHOT_VALIDATION_CAP
    given = [(-1, "a"), (-2, "b")]
    train, validation = training_split(items, given, lambda item: item[1], 0.0, 8, seed=0)
    assert len(train) == 16 and validation == given, "a validation file stays the validation data"


def saved_metrics(work: Path) -> dict[str, float]:
    with tarfile.open(work / "artifact.tar") as tar:
        member = tar.extractfile("metrics.json")
        assert member is not None
        return dict(json.loads(member.read()))


def test_text_few_shot_trains_on_the_shots_and_reports_the_baseline(
    tiny_bert: Path, keyword_dataset: Path, tmp_path: Path
) -> None:
    spec = make_spec(tiny_bert, adaptation=AdaptationSettings(AdaptationMethod.FROZEN_BACKBONE))
    spec = dataclasses.replace(spec, data=DataSettings(training_file="files/t", shots_per_class=4))
    finished, events = run(spec, keyword_dataset, tmp_path)
    assert finished.outcome is Outcome.SUCCEEDED, finished.message
    assert of_type(events, JobStarted)[0].total_steps == 2 * 8, "12 shots: 2 steps an epoch"
    notes = [e.message for e in of_type(events, LogEmitted)]
    assert "few-shot: training on 12 examples (4 per class at most)" in notes
    assert any(n.startswith("few-shot baseline:") and "on 108 validation examples" in n for n in notes)
    [artifact] = of_type(events, ArtifactWritten)
    assert {"eval_accuracy", "prototype_accuracy"} <= set(artifact.metrics)
    expected = nearest_class_mean_accuracy(tiny_bert, keyword_dataset, 4, 0)  # one example is 1/108
    assert artifact.metrics["prototype_accuracy"] == pytest.approx(expected, abs=1e-6)
    assert saved_metrics(tmp_path)["prototype_accuracy"] == artifact.metrics["prototype_accuracy"]


def nearest_class_mean_accuracy(model_dir: Path, data: Path, shots: int, seed: int) -> float:
    """The baseline recomputed here with plain transformers: mean-pooled (masked) last hidden states of the
    pretrained backbone, unit-normalised; each held-out sentence goes to the class whose normalised mean shot
    vector has the highest cosine."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    train, held_out = training_split(rows, None, lambda row: row["label"], 0.0, shots, seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    backbone = AutoModel.from_pretrained(model_dir).eval()

    def vectors(texts: list[str]) -> torch.Tensor:
        encoded = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            hidden = backbone(**encoded).last_hidden_state
        mask = encoded["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    labels = sorted({row["label"] for row in rows})
    shot_vectors = vectors([row["text"] for row in train])
    means = torch.stack(
        [shot_vectors[[i for i, row in enumerate(train) if row["label"] == label]].mean(0) for label in labels]
    )
    scores = vectors([row["text"] for row in held_out]) @ torch.nn.functional.normalize(means, dim=-1).T
    predicted = [labels[i] for i in scores.argmax(1).tolist()]
    return sum(p == row["label"] for p, row in zip(predicted, held_out, strict=True)) / len(held_out)


def test_the_baseline_works_for_images_and_audio(
    tiny_vit: Path,  # noqa: F811
    tiny_wav2vec2: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    cases = [
        (image_spec(tiny_vit), write_shapes_zip(tmp_path / "shapes.zip", per_class=10)),
        (audio_spec(tiny_wav2vec2), write_tones_zip(tmp_path / "tones.zip", per_class=10)),
    ]
    for index, (spec, archive) in enumerate(cases):
        few = dataclasses.replace(spec, data=dataclasses.replace(spec.data, validation_fraction=0.0, shots_per_class=3))
        few = dataclasses.replace(few, hyperparameters=dataclasses.replace(few.hyperparameters, epochs=2))
        finished, events = run(few, archive, tmp_path / f"work-{index}")
        assert finished.outcome is Outcome.SUCCEEDED, finished.message
        [artifact] = of_type(events, ArtifactWritten)
        assert 0.0 <= artifact.metrics["prototype_accuracy"] <= 1.0, spec.task


def test_with_nothing_left_to_hold_out_k_fold_chooses_the_epochs(tiny_bert: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "tiny.jsonl", keyword_rows(12))  # 4 per class: all of them are shots
    spec = make_spec(tiny_bert, hyperparameters=dataclasses.replace(FAST, epochs=6))
    spec = dataclasses.replace(spec, data=DataSettings(training_file="files/t", shots_per_class=4))
    finished, events = run(spec, data, tmp_path / "work")
    assert finished.outcome is Outcome.SUCCEEDED, finished.message
    [choice] = of_type(events, AutoChosen)
    assert choice.field == "hyperparameters.epochs" and "4-fold cross-validation" in choice.reason
    assert [x for x, _ in choice.evidence] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "the mean curve over the folds"
    assert of_type(events, JobStarted)[0].total_epochs == choice.value
    notes = [e.message for e in of_type(events, LogEmitted)]
    assert sum(n.startswith("k-fold ") for n in notes) == 4
    [artifact] = of_type(events, ArtifactWritten)
    assert {"cross_validated_eval_accuracy", "prototype_accuracy"} <= set(artifact.metrics)
    assert not of_type(events, EvaluationDone), "the final model trains on every shot, with nothing to evaluate"


def test_a_class_with_one_example_leaves_nothing_to_cross_validate(tiny_bert: Path, tmp_path: Path) -> None:
    rows = keyword_rows(12)
    single = next(row for row in rows if row["label"] == rows[0]["label"])
    rows = [row for row in rows if row["label"] != rows[0]["label"]] + [single]
    data = write_jsonl(tmp_path / "lonely.jsonl", rows)
    spec = make_spec(tiny_bert, hyperparameters=dataclasses.replace(FAST, epochs=2))
    spec = dataclasses.replace(spec, data=DataSettings(training_file="files/t", shots_per_class=4))
    finished, events = run(spec, data, tmp_path / "work")
    assert finished.outcome is Outcome.SUCCEEDED, finished.message
    assert "few-shot: a class has a single example, so nothing can be held out" in [
        e.message for e in of_type(events, LogEmitted)
    ]
