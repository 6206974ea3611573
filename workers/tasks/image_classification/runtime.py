"""Image classification's torch side: archive of images -> decoded, augmented, processed pixels ->
AutoModelForImageClassification.

Augmentation (torchvision.transforms.v2) runs on the decoded image before the model's own image processor, so
every backbone keeps its exact preprocessing; evaluation never augments.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from transformers import AutoImageProcessor, AutoModelForImageClassification

from tuneforge.workers.core.archives import archive_limits
from tuneforge.workers.core.input_limits import check_image as check_image_source
from tuneforge.workers.core.input_limits import read_image
from tuneforge.workers.core.media_data import MediaExample, MediaItem, load_media_dataset
from tuneforge.workers.core.models import load_classifier, load_pretrained
from tuneforge.workers.core.prepared_task import Batch, PreparedTask
from tuneforge.workers.core.processed_cache import ProcessedCache
from tuneforge.workers.messages import RunJob
from tuneforge.workers.spec import AugmentationSettings
from tuneforge.workers.tasks.classifier import ClassifierRuntime, prepared_media

if TYPE_CHECKING:
    from tuneforge.workers.core.prediction import LoadedModel

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def check_image(item: MediaItem) -> None:
    """Reads the header and checks the file's integrity (and size) without decoding the pixels."""
    check_image_source(item.path, item.source)


def open_rgb(example: MediaExample) -> Image.Image:
    return read_image(example.path, example.source)


def input_size(processor: Any) -> tuple[int, int]:
    """The (height, width) the model sees, from its image processor (crop size first, then size)."""
    for attribute in ("crop_size", "size"):
        size: Any = getattr(processor, attribute, None)
        if not size:
            continue
        values = dict(size) if hasattr(size, "keys") else vars(size)
        if values.get("height") and values.get("width"):
            return int(values["height"]), int(values["width"])
        if values.get("shortest_edge"):
            return int(values["shortest_edge"]), int(values["shortest_edge"])
    return 224, 224


def image_augmentation(settings: AugmentationSettings | None, size: tuple[int, int]) -> Callable[[Any], Any] | None:
    """Random resized crop, horizontal flip and colour jitter, as configured; None when off."""
    if settings is None:
        return None
    steps: list[Any] = []
    if settings.crop_scale_min > 0:
        steps.append(v2.RandomResizedCrop(size, scale=(settings.crop_scale_min, 1.0), antialias=True))
    if settings.horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    if settings.color_jitter > 0:
        jitter = settings.color_jitter
        steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))
    return v2.Compose(steps) if steps else None


class ImageDataset(torch.utils.data.Dataset[dict[str, Any]]):
    """Decodes lazily. Without augmentation the processed pixels are the same every epoch, so they are kept (see
    processed_cache) and later epochs skip decoding and resizing."""

    def __init__(self, examples: list[MediaExample], processor: Any, augment: Callable[[Any], Any] | None):
        self.examples = examples
        self.processor = processor
        self.augment = augment
        self.varies_per_epoch = augment is not None
        self._cache = ProcessedCache()

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        processed = self._cache.get_or_process(index, self._process, lambda: self.augment is None)
        return {**processed, "labels": self.examples[index].label}

    def _process(self, index: int) -> dict[str, torch.Tensor]:
        image = open_rgb(self.examples[index])
        if self.augment is not None:
            image = self.augment(image)
        return {"pixel_values": self.processor(images=image, return_tensors="pt")["pixel_values"][0]}

    def process_ahead(self, threads: int) -> int:
        """Without augmentation: decodes and processes the examples on parallel threads until the cache is full, so
        the first epoch does not wait on them either. Returns how many were kept."""
        if self.augment is not None:
            return 0
        return self._cache.fill(len(self.examples), self._process, threads, lambda: True)


def collate_images(items: list[dict[str, Any]]) -> Batch:
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "labels": torch.tensor([item["labels"] for item in items], dtype=torch.long),
    }


class ImageClassificationRuntime(ClassifierRuntime):
    """Any transformers image classifier (ViT, ResNet, ConvNeXt, Swin, EfficientNet, MobileNet ...)."""

    model_class = "AutoModelForImageClassification"
    processor_class = "AutoImageProcessor"

    def prepare(self, job: RunJob, log: Callable[[str], None]) -> PreparedTask:
        spec = job.spec
        data = load_media_dataset(
            job.training_data,
            job.validation_data,
            spec.data,
            spec.hyperparameters.seed,
            Path(job.work_dir),
            IMAGE_EXTENSIONS,
            check_image,
            archive_limits(job),
        )
        log(
            f"read {len(data.train)} training and {len(data.validation)} validation images with "
            f"{len(data.labels)} labels"
        )
        processor = load_pretrained(AutoImageProcessor, spec.base_model)
        model = load_classifier(AutoModelForImageClassification, spec.base_model, data.labels)
        augment = image_augmentation(spec.data.augmentation, input_size(processor))
        sets = (ImageDataset(data.train, processor, augment), ImageDataset(data.validation, processor, None))
        return prepared_media(model, processor, data, sets, collate_images, "images", log)

    def decode(self, loaded: LoadedModel, value: str | bytes) -> Any:
        return read_image(value, "the image")

    def batch(self, loaded: LoadedModel, decoded: list[Any]) -> Batch:
        return {"pixel_values": loaded.processor(images=decoded, return_tensors="pt")["pixel_values"]}

    def sample_input(self, rng: np.random.Generator, index: int) -> tuple[str, bytes | str]:
        pixels = rng.integers(0, 256, size=(48 + 16 * index, 64, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return "image", buffer.getvalue()


RUNTIME = ImageClassificationRuntime()
