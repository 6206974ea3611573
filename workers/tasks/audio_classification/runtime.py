"""Audio classification's torch side: archive of clips -> mono, resampled, cropped or padded, augmented -> the
model's feature extractor -> AutoModelForAudioClassification (wav2vec2, HuBERT, WavLM, AST, Whisper encoder ...)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

from tuneforge.workers.core.archives import archive_limits
from tuneforge.workers.core.audio import (
    AUDIO_EXTENSIONS,
    augment_wave,
    check_audio,
    crop_or_pad,
    load_mono,
    sample_wav,
    spec_augment,
)
from tuneforge.workers.core.media_data import MediaExample, load_media_dataset
from tuneforge.workers.core.models import load_classifier, load_pretrained
from tuneforge.workers.core.prepared_task import Batch, PreparedTask
from tuneforge.workers.core.processed_cache import ProcessedCache
from tuneforge.workers.messages import RunJob
from tuneforge.workers.spec import AugmentationSettings
from tuneforge.workers.tasks.classifier import ClassifierRuntime, prepared_media

if TYPE_CHECKING:
    from tuneforge.workers.core.prediction import LoadedModel

DEFAULT_CLIP_SECONDS = 1.0
SPECTROGRAM_INPUT = "input_features"


class AudioDataset(torch.utils.data.Dataset[dict[str, Any]]):
    """Decodes lazily; training crops at random offsets and augments, evaluation does neither. A clip nothing
    random happens to (no augmentation, no longer than the clip length) is processed once and kept (see
    processed_cache)."""

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
        self._cache = ProcessedCache()

    @property
    def varies_per_epoch(self) -> bool:
        return self.augmentation is not None or self.cropped_at_random

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self._cache.get_or_process(index, self._process, lambda: not self.varies_per_epoch)
        return {**item, "labels": self.examples[index].label}

    def _process(self, index: int, ahead: bool = False) -> dict[str, torch.Tensor]:
        """The clip's model inputs. Ahead of training (on decode threads) nothing random may run: a clip that
        needs a random crop only marks the data set as varying (and returns nothing)."""
        example = self.examples[index]
        wave = load_mono(example.path, example.source, self.rate)
        if self.train and wave.shape[0] > self.length:
            self.cropped_at_random = True
            self._cache.clear()  # every epoch takes another window of this clip
            if ahead:
                return {}
        wave = crop_or_pad(wave, self.length, self.train, None)
        if self.augmentation is not None:
            wave = augment_wave(wave, self.augmentation, self.rate)
        features = self.extractor(wave.numpy(), sampling_rate=self.rate, return_tensors="pt")
        item = {key: value[0] for key, value in features.items()}
        if self.augmentation is not None and self.augmentation.spec_augment and SPECTROGRAM_INPUT in item:
            item[SPECTROGRAM_INPUT] = spec_augment(item[SPECTROGRAM_INPUT])
        return item

    def process_ahead(self, threads: int) -> int:
        """Without augmentation: decodes, resamples and extracts the clips on parallel threads until the cache is
        full or a clip turns out to need random crops. Returns how many were kept."""
        if self.augmentation is not None:
            return 0
        kept = self._cache.fill(
            len(self.examples), lambda i: self._process(i, ahead=True), threads, lambda: not self.cropped_at_random
        )
        if self.cropped_at_random:
            self._cache.clear()
            return 0
        return kept


def collate_audio(items: list[dict[str, Any]]) -> Batch:
    """Every clip has the same length, so inputs stack."""
    batch = {key: torch.stack([item[key] for item in items]) for key in items[0] if key != "labels"}
    batch["labels"] = torch.tensor([item["labels"] for item in items], dtype=torch.long)
    return batch


class AudioClassificationRuntime(ClassifierRuntime):
    """Any transformers audio classifier, at its feature extractor's sample rate."""

    model_class = "AutoModelForAudioClassification"
    processor_class = "AutoFeatureExtractor"
    export_tolerance = 1e-3
    """The convolutional feature encoder over a clip makes onnxruntime and PyTorch differ by float32 rounding alone
    (up to 1.1e-4 of the largest logit on a tiny wav2vec2, the same for a clip alone as in a batch)."""

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
        sets = (
            AudioDataset(data.train, extractor, clip_seconds, spec.data.augmentation, True),
            AudioDataset(data.validation, extractor, clip_seconds, None, False),
        )
        return prepared_media(model, extractor, data, sets, collate_audio, "clips", log)

    def decode(self, loaded: LoadedModel, value: str | bytes) -> Any:
        """A mono wave at the model's rate, cut or padded to the clip length training used."""
        rate = int(loaded.processor.sampling_rate)
        length = int((loaded.data.get("clip_seconds") or DEFAULT_CLIP_SECONDS) * rate)
        return crop_or_pad(load_mono(value, "the clip", rate), length, False, None).numpy()

    def batch(self, loaded: LoadedModel, decoded: list[Any]) -> Batch:
        rate = int(loaded.processor.sampling_rate)
        return dict(loaded.processor(decoded, sampling_rate=rate, return_tensors="pt"))

    def sample_input(self, rng: np.random.Generator, index: int) -> tuple[str, bytes | str]:
        return "audio", sample_wav(rng, index)


RUNTIME = AudioClassificationRuntime()
