"""Audio classification through the runner: tones of three pitches on a tiny wav2vec2, resampling, augmentation,
and precise failures for bad audio."""

from __future__ import annotations

import dataclasses
import io
import random
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from tests.core.test_training_core import FAST, make_spec, of_type, run
from tests.media import make_tiny_wav2vec2, tone_wav, write_tones_zip
from workers.messages import EvaluationDone, Outcome, TrainingProgress
from workers.spec import AugmentationSettings, DataSettings, TaskKind


@pytest.fixture(scope="module")
def tiny_wav2vec2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_wav2vec2(tmp_path_factory.mktemp("models") / "tiny-wav2vec2")


def audio_spec(model: Path, **data: object):  # type: ignore[no-untyped-def]
    spec = make_spec(
        model,
        task=TaskKind.AUDIO_CLASSIFICATION,
        hyperparameters=dataclasses.replace(FAST, epochs=6, learning_rate=3e-3),
    )
    return dataclasses.replace(
        spec, data=DataSettings(training_file="files/t", validation_fraction=0.25, clip_seconds=0.5, **data)
    )


def test_tones_are_learned_and_the_artifact_reloads(tiny_wav2vec2: Path, tmp_path: Path) -> None:
    archive = write_tones_zip(tmp_path / "tones.zip", per_class=16, rates=(16000, 8000, 22050))
    finished, events = run(audio_spec(tiny_wav2vec2), archive, tmp_path / "work")
    assert finished.outcome is Outcome.SUCCEEDED, finished.message
    losses = [e.loss for e in of_type(events, TrainingProgress)]
    assert losses[-1] < losses[0] * 0.7, losses
    assert max(e.metrics["eval_accuracy"] for e in of_type(events, EvaluationDone)) >= 0.8  # chance is 1/3
    with tarfile.open(tmp_path / "work" / "artifact.tar") as tar:
        tar.extractall(tmp_path / "model", filter="data")
    from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

    model = AutoModelForAudioClassification.from_pretrained(tmp_path / "model", use_safetensors=True).eval()
    extractor = AutoFeatureExtractor.from_pretrained(tmp_path / "model")
    rng = random.Random(7)
    names = ["low", "mid", "high"] * 4
    waves = [
        soundfile.read(io.BytesIO(tone_wav({"low": 220.0, "mid": 660.0, "high": 1760.0}[n], rng)))[0] for n in names
    ]
    with torch.inference_mode():
        inputs = extractor([w.astype(np.float32) for w in waves], sampling_rate=16000, return_tensors="pt")
        predicted = model(**inputs).logits.argmax(-1).tolist()
    assert sum(model.config.id2label[p] == n for p, n in zip(predicted, names, strict=True)) >= 9, predicted


def test_augmented_training_runs(tiny_wav2vec2: Path, tmp_path: Path) -> None:
    archive = write_tones_zip(tmp_path / "tones.zip", per_class=8)
    spec = audio_spec(tiny_wav2vec2, augmentation=AugmentationSettings())
    finished, _ = run(spec, archive, tmp_path / "work")
    assert finished.outcome is Outcome.SUCCEEDED, finished.message


def failure_of(model: Path, archive: Path, tmp_path: Path) -> str:
    finished, _ = run(audio_spec(model), archive, tmp_path / "work")
    assert finished.outcome is Outcome.FAILED and finished.reason == "INVALID_DATASET", finished
    return finished.message


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("low/cut.wav", lambda rng: tone_wav(220.0, rng)[:2000], "truncated: the header declares 8000 frames"),
        ("low/noise.wav", lambda rng: b"RIFF not really a wav file", "not a readable audio file"),
        ("low/slow.wav", lambda rng: tone_wav(220.0, rng, rate=1000), "sample rate 1000 Hz is outside"),
    ],
    ids=["truncated", "corrupt", "sample-rate"],
)
def test_bad_audio_fails_with_the_file(tiny_wav2vec2: Path, tmp_path: Path, name: str, content, message: str) -> None:  # type: ignore[no-untyped-def]
    archive = write_tones_zip(tmp_path / "tones.zip", per_class=3)
    with zipfile.ZipFile(archive, "a") as zipped:
        zipped.writestr(name, content(random.Random(0)))
    assert f"tones.zip:{name}: {message}" in failure_of(tiny_wav2vec2, archive, tmp_path)
