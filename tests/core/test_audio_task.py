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
from tuneforge.workers.messages import EvaluationDone, Outcome, TrainingProgress
from tuneforge.workers.spec import AugmentationSettings, DataSettings


@pytest.fixture(scope="module")
def tiny_wav2vec2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_wav2vec2(tmp_path_factory.mktemp("models") / "tiny-wav2vec2")


def audio_spec(model: Path, **data: object):  # type: ignore[no-untyped-def]
    spec = make_spec(
        model,
        task="audio_classification",
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


def unpacked_tones(tmp_path: Path, per_class: int, seconds: float) -> list:  # type: ignore[type-arg]
    from tuneforge.workers.core.media_data import MediaExample

    rng = random.Random(3)
    folder = tmp_path / "clips"
    folder.mkdir(parents=True)
    examples = []
    for i in range(per_class * 2):
        path = folder / f"{i:03d}.wav"
        path.write_bytes(tone_wav(220.0 if i % 2 else 880.0, rng, seconds=seconds))
        examples.append(MediaExample(path, i % 2, path.name))
    return examples


def test_clips_are_decoded_once_ahead_and_only_when_nothing_is_random(
    tiny_wav2vec2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clips of the clip length are decoded ahead on threads (the same inputs as one by one) and served from memory
    afterwards; clips that need random crops are never kept, and looking ahead draws no random numbers."""
    from transformers import AutoFeatureExtractor

    from tuneforge.workers.core import processed_cache
    from tuneforge.workers.tasks.audio_classification.runtime import AudioDataset

    monkeypatch.setattr(processed_cache, "THREADED_FROM_S", 0.0)  # these short clips would stay on one thread
    extractor = AutoFeatureExtractor.from_pretrained(tiny_wav2vec2)
    examples = unpacked_tones(tmp_path / "exact", per_class=12, seconds=0.5)
    ahead = AudioDataset(examples, extractor, 0.5, None, True)
    assert ahead.process_ahead(threads=3) == len(examples)
    one_by_one = AudioDataset(examples, extractor, 0.5, None, True)
    for index in range(len(examples)):
        assert torch.equal(ahead[index]["input_values"], one_by_one[index]["input_values"])
    examples[0].path.unlink()  # a second read could not decode it: it must come from memory
    assert torch.equal(ahead[0]["input_values"], one_by_one[0]["input_values"])
    assert not ahead.varies_per_epoch

    long_clips = unpacked_tones(tmp_path / "long", per_class=2, seconds=0.5)
    cropped = AudioDataset(long_clips, extractor, 0.25, None, True)
    state = torch.random.get_rng_state()
    assert cropped.process_ahead(threads=2) == 0
    assert torch.equal(torch.random.get_rng_state(), state), "looking ahead must not draw random numbers"
    assert cropped.varies_per_epoch
    assert not torch.equal(cropped[0]["input_values"], cropped[0]["input_values"]), "a new window every time"
    augmented = AudioDataset(examples[1:], extractor, 0.5, AugmentationSettings(), True)
    assert augmented.process_ahead(threads=2) == 0
