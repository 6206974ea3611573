"""Audio classification: archive of clips -> mono, resampled, cropped or padded, augmented -> the model's feature
extractor -> AutoModelForAudioClassification (wav2vec2, HuBERT, WavLM, AST, Whisper encoder ...)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

from workers.core.adapters import Batch, PreparedTask
from workers.core.archives import archive_limits
from workers.core.audio import AUDIO_EXTENSIONS, augment_wave, check_audio, crop_or_pad, load_mono, spec_augment
from workers.core.media_data import MediaExample, load_media_dataset
from workers.core.models import load_classifier, load_pretrained
from workers.messages import RunJob
from workers.spec import AugmentationSettings

DEFAULT_CLIP_SECONDS = 1.0
SPECTROGRAM_INPUT = "input_features"


class AudioDataset(torch.utils.data.Dataset[dict[str, Any]]):
    """Decodes lazily; training crops at random offsets and augments, evaluation does neither."""

    def __init__(
        self,
        examples: list[MediaExample],
        extractor: Any,
        clip_seconds: float,
        augmentation: AugmentationSettings | None,
        train: bool,
    ):
        self.examples = examples
        self.extractor = extractor
        self.rate = int(extractor.sampling_rate)
        self.length = int(clip_seconds * self.rate)
        self.augmentation = augmentation
        self.train = train
        self.cropped_at_random = False
        """Set once a training clip longer than the clip length was cut at a random offset."""

    @property
    def varies_per_epoch(self) -> bool:
        return self.augmentation is not None or self.cropped_at_random

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        wave = load_mono(example.path, example.source, self.rate)
        self.cropped_at_random |= self.train and wave.shape[0] > self.length
        wave = crop_or_pad(wave, self.length, self.train, None)
        if self.augmentation is not None:
            wave = augment_wave(wave, self.augmentation, self.rate)
        features = self.extractor(wave.numpy(), sampling_rate=self.rate, return_tensors="pt")
        item = {key: value[0] for key, value in features.items()}
        if self.augmentation is not None and self.augmentation.spec_augment and SPECTROGRAM_INPUT in item:
            item[SPECTROGRAM_INPUT] = spec_augment(item[SPECTROGRAM_INPUT])
        item["labels"] = example.label
        return item


def collate_audio(items: list[dict[str, Any]]) -> Batch:
    """Every clip has the same length, so inputs stack."""
    batch = {key: torch.stack([item[key] for item in items]) for key in items[0] if key != "labels"}
    batch["labels"] = torch.tensor([item["labels"] for item in items], dtype=torch.long)
    return batch


class AudioClassificationAdapter:
    """Any transformers audio classifier, at its feature extractor's sample rate."""

    def prepare(self, job: RunJob, log: Callable[[str], None]) -> PreparedTask:
        spec = job.spec
        clip_seconds = spec.data.clip_seconds or DEFAULT_CLIP_SECONDS
        data = load_media_dataset(
            job.training_data,
            job.validation_data,
            spec.data,
            spec.hyperparameters.seed,
            Path(job.work_dir),
            AUDIO_EXTENSIONS,
            check_audio,
            archive_limits(job),
        )
        log(
            f"read {len(data.train)} training and {len(data.validation)} validation clips with "
            f"{len(data.labels)} labels; clips are {clip_seconds:g} s"
        )
        extractor = load_pretrained(AutoFeatureExtractor, spec.base_model)
        model = load_classifier(AutoModelForAudioClassification, spec.base_model, data.labels)
        augmentation = spec.data.augmentation
        return PreparedTask(
            model=model,
            processor=extractor,
            train_set=AudioDataset(data.train, extractor, clip_seconds, augmentation, True),  # type: ignore[arg-type]
            validation_set=AudioDataset(data.validation, extractor, clip_seconds, None, False),  # type: ignore[arg-type]
            collate=collate_audio,
            labels=data.labels,
            train_labels=[example.label for example in data.train],
        )
