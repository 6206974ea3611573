"""Frozen backbone without waste: its output is computed once and the head trains on it, with the same result as
recomputing it every step; whenever an example's input can change between epochs, nothing is kept."""

from __future__ import annotations

import dataclasses
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.core.test_training_core import FAST, make_spec, of_type, run
from tests.media import make_tiny_vit, make_tiny_wav2vec2, write_shapes_zip, write_tones_zip
from tests.tiny import keyword_rows, write_jsonl
from tuneforge.workers.core.feature_cache import BUDGET_ENV, length_sorted_batches
from tuneforge.workers.messages import EvaluationDone, LogEmitted, Outcome, TrainingProgress
from tuneforge.workers.spec import (
    AdaptationMethod,
    AdaptationSettings,
    AugmentationSettings,
    DataSettings,
    HeadSettings,
    TrainingSpec,
)

FROZEN = AdaptationSettings(method=AdaptationMethod.FROZEN_BACKBONE)
KEPT = "kept its output"
RECOMPUTED = "recomputed every step"


@contextmanager
def counting_calls(kind: str) -> Iterator[list[int]]:
    """Counts forward calls of modules whose class is named `kind` (inside the backbone: a replayed backbone is
    still called, but nothing inside it runs), through a global hook."""
    calls = [0]

    def hook(module: nn.Module, _args: object, _output: object) -> None:
        if type(module).__name__ == kind:
            calls[0] += 1

    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


@dataclasses.dataclass
class Trained:
    """What one run showed: its losses, evaluation accuracies, artifact weights, job log and backbone calls."""

    losses: list[float]
    accuracies: list[float]
    weights: dict[str, torch.Tensor]
    log: list[str]
    backbone_calls: int

    def logged(self, text: str) -> bool:
        return any(text in line for line in self.log)


def train(spec: TrainingSpec, data: Path, work: Path, backbone: str) -> Trained:
    with counting_calls(backbone) as calls:
        finished, events = run(spec, data, work)
    assert finished.outcome is Outcome.SUCCEEDED, finished.message
    with tarfile.open(work / "artifact.tar") as tar:
        tar.extract("model.safetensors", work / "unpacked", filter="data")
    return Trained(
        [e.loss for e in of_type(events, TrainingProgress)],
        [e.metrics["eval_accuracy"] for e in of_type(events, EvaluationDone)],
        load_file(work / "unpacked" / "model.safetensors"),
        [e.message for e in of_type(events, LogEmitted)],
        calls[0],
    )


def compare(
    spec: TrainingSpec, data: Path, tmp_path: Path, backbone: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[Trained, Trained]:
    """Trains with the cache, then without it: the same losses, accuracies and weights."""
    kept = train(spec, data, tmp_path / "kept", backbone)
    monkeypatch.setenv(BUDGET_ENV, "0")
    recomputed = train(spec, data, tmp_path / "recomputed", backbone)
    assert kept.logged(KEPT) and not recomputed.logged(KEPT), kept.log
    assert kept.losses == pytest.approx(recomputed.losses, rel=1e-4, abs=1e-5)
    assert kept.accuracies == recomputed.accuracies
    assert kept.weights.keys() == recomputed.weights.keys()
    for name, value in kept.weights.items():
        torch.testing.assert_close(value, recomputed.weights[name], rtol=1e-4, atol=1e-5, msg=name)
    assert 0 < kept.backbone_calls < recomputed.backbone_calls / 2, (kept.backbone_calls, recomputed.backbone_calls)
    return kept, recomputed


def media_spec(model: Path, task: str, epochs: int, clip_seconds: float = 0.0) -> TrainingSpec:
    hyperparameters = dataclasses.replace(FAST, epochs=epochs, learning_rate=3e-3)
    data = DataSettings(training_file="files/t", validation_fraction=0.25, clip_seconds=clip_seconds)
    return make_spec(model, task=task, adaptation=FROZEN, hyperparameters=hyperparameters, data=data)


def test_text_head_trains_on_kept_output_exactly_as_when_recomputed(
    tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sentences of varied length (kept cut to their own length, padded per batch) and a head with dropout."""
    data = write_jsonl(tmp_path / "train.jsonl", keyword_rows(120, seed=3))
    head = HeadSettings(hidden_sizes=(16,), dropout=0.3)
    spec = make_spec(tiny_bert, adaptation=FROZEN, head=head, hyperparameters=dataclasses.replace(FAST, epochs=5))
    kept, recomputed = compare(spec, data, tmp_path, "BertEmbeddings", monkeypatch)
    # 90 training and 30 validation sentences, in batches of 16: the backbone ran only in the one pass (and twice on
    # four sentences, checking the first-position last block)
    assert kept.backbone_calls == 6 + 2 + 2
    # the head reads BERT's pooled output only: no token's hidden state is kept
    assert kept.logged("kept its output (pooler_output: what the head reads)"), kept.log
    assert recomputed.backbone_calls > 5 * 12


def test_without_validation_data_the_head_still_finds_what_it_reads(
    tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The empty validation pass must not forget which fields the head reads (BERT's head indexes its input)."""
    data = write_jsonl(tmp_path / "train.jsonl", keyword_rows(48, seed=5))
    spec = make_spec(tiny_bert, adaptation=FROZEN, hyperparameters=dataclasses.replace(FAST, epochs=3))
    spec = dataclasses.replace(spec, data=dataclasses.replace(spec.data, validation_fraction=0.0))
    kept, _ = compare(spec, data, tmp_path, "BertEmbeddings", monkeypatch)
    assert kept.logged("kept its output (pooler_output: what the head reads) for 48 training and 0 validation")


def test_image_and_audio_heads_train_on_kept_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vit = make_tiny_vit(tmp_path / "vit")
    spec = media_spec(vit, "image_classification", epochs=3)
    images = write_shapes_zip(tmp_path / "shapes.zip", per_class=8)
    image, _ = compare(spec, images, tmp_path / "image", "ViTEmbeddings", monkeypatch)
    assert image.logged("kept its output (last_hidden_state: what the head reads)"), image.log
    monkeypatch.delenv(BUDGET_ENV)
    wav2vec2 = make_tiny_wav2vec2(tmp_path / "wav2vec2")
    spec = media_spec(wav2vec2, "audio_classification", epochs=3, clip_seconds=0.5)
    tones = write_tones_zip(tmp_path / "tones.zip", per_class=6)
    audio, _ = compare(spec, tones, tmp_path / "audio", "Wav2Vec2FeatureEncoder", monkeypatch)
    # wav2vec2's head pools its hidden states; the convolutional features (extract_features) are not kept
    assert audio.logged("kept its output (last_hidden_state: what the head reads)"), audio.log


def test_the_feature_pass_runs_longest_first_in_batches_of_similar_length() -> None:
    lengths = [5, 40, 7, 33, 12, 40, 6]
    dataset = [{"input_ids": [0] * n} for n in lengths]
    batches = length_sorted_batches(dataset, "input_ids", 3)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert [[lengths[i] for i in batch] for batch in batches] == [[40, 40, 33], [12, 7, 6], [5]]
    # media of one size keep file order
    assert length_sorted_batches(list(range(4)), "input_values", 3) == [[0, 1, 2], [3]]


def test_nothing_is_kept_when_inputs_change_between_epochs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Random crops of longer clips, augmentation, and outputs over the memory budget all recompute."""
    wav2vec2 = make_tiny_wav2vec2(tmp_path / "wav2vec2")
    tones = write_tones_zip(tmp_path / "tones.zip", per_class=4)  # 0.5 s clips, cut to 0.25 s at random offsets
    cropped = media_spec(wav2vec2, "audio_classification", epochs=2, clip_seconds=0.25)
    cropped_run = train(cropped, tones, tmp_path / "cropped", "Wav2Vec2FeatureEncoder")
    assert cropped_run.logged(RECOMPUTED) and not cropped_run.logged(KEPT)
    augmented = dataclasses.replace(
        cropped, data=dataclasses.replace(cropped.data, clip_seconds=0.5, augmentation=AugmentationSettings())
    )
    assert not train(augmented, tones, tmp_path / "augmented", "Wav2Vec2FeatureEncoder").logged(KEPT)
    monkeypatch.setenv(BUDGET_ENV, "0.01")  # 10 KiB
    over_budget = dataclasses.replace(cropped, data=dataclasses.replace(cropped.data, clip_seconds=0.5))
    over_run = train(over_budget, tones, tmp_path / "over", "Wav2Vec2FeatureEncoder")
    assert over_run.logged(RECOMPUTED) and not over_run.logged(KEPT)
