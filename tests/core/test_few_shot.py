"""Few-shot mode in the core: K examples per class drawn with the seed, the rest held out for validation, and the
nearest-class-mean baseline measured from the pretrained backbone for text, images and audio."""

from __future__ import annotations

import dataclasses
import json
import tarfile
from pathlib import Path

from tests.core.test_audio_task import audio_spec, tiny_wav2vec2  # noqa: F401  (fixture)
from tests.core.test_image_task import image_spec, tiny_vit  # noqa: F401  (fixture)
from tests.core.test_training_core import make_spec, of_type, run
from tests.media import write_shapes_zip, write_tones_zip
from workers.core.splits import FEW_SHOT_VALIDATION_CAP, sample_shots, training_split
from workers.messages import ArtifactWritten, JobStarted, LogEmitted, Outcome
from workers.spec import AdaptationMethod, AdaptationSettings, DataSettings


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
    assert 0.0 <= artifact.metrics["prototype_accuracy"] <= 1.0
    assert saved_metrics(tmp_path)["prototype_accuracy"] == artifact.metrics["prototype_accuracy"]


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
