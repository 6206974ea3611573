"""Image classification through the runner: coloured shapes on a tiny ViT, augmentation, and safe archives."""

from __future__ import annotations

import dataclasses
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.core.test_training_core import FAST, make_spec, of_type, run
from tests.media import make_tiny_vit, shape_png, write_shapes_zip, write_tar
from tuneforge.workers.messages import EvaluationDone, Outcome, TrainingProgress
from tuneforge.workers.spec import AugmentationSettings, DataSettings


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_vit(tmp_path_factory.mktemp("models") / "tiny-vit")


def image_spec(model: Path, **data: object):  # type: ignore[no-untyped-def]
    spec = make_spec(
        model,
        task="image_classification",
        hyperparameters=dataclasses.replace(FAST, epochs=6, learning_rate=3e-3),
    )
    return dataclasses.replace(spec, data=DataSettings(training_file="files/t", validation_fraction=0.25, **data))


def test_shapes_are_learned_and_the_artifact_reloads(tiny_vit: Path, tmp_path: Path) -> None:
    archive = write_shapes_zip(tmp_path / "shapes.zip", per_class=24)
    finished, events = run(image_spec(tiny_vit), archive, tmp_path / "work")
    assert finished.outcome is Outcome.SUCCEEDED, finished.message
    losses = [e.loss for e in of_type(events, TrainingProgress)]
    assert losses[-1] < losses[0] * 0.5, losses
    assert max(e.metrics["eval_accuracy"] for e in of_type(events, EvaluationDone)) >= 0.8  # chance is 1/3
    with tarfile.open(tmp_path / "work" / "artifact.tar") as tar:
        tar.extractall(tmp_path / "model", filter="data")
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(tmp_path / "model", use_safetensors=True).eval()
    processor = AutoImageProcessor.from_pretrained(tmp_path / "model")
    assert model.config.id2label == {0: "blue", 1: "green", 2: "red"}
    import io
    import random

    from PIL import Image

    rng = random.Random(99)
    images = [Image.open(io.BytesIO(shape_png(c, rng))).convert("RGB") for c in ("red", "green", "blue") * 5]
    with torch.inference_mode():
        predicted = model(**processor(images=images, return_tensors="pt")).logits.argmax(-1).tolist()
    correct = sum(model.config.id2label[p] == c for p, c in zip(predicted, ("red", "green", "blue") * 5, strict=True))
    assert correct >= 12, predicted


def test_a_manifest_archive_with_augmentation_trains(tiny_vit: Path, tmp_path: Path) -> None:
    archive = write_shapes_zip(tmp_path / "shapes.zip", per_class=12, manifest=True)
    spec = image_spec(tiny_vit, augmentation=AugmentationSettings(crop_scale_min=0.6, color_jitter=0.1))
    finished, events = run(spec, archive, tmp_path / "work")
    assert finished.outcome is Outcome.SUCCEEDED, finished.message
    assert "read 27 training and 9 validation images with 3 labels" in [getattr(e, "message", "") for e in events]


def failure_of(tiny_vit: Path, archive: Path, tmp_path: Path) -> str:
    finished, _ = run(image_spec(tiny_vit), archive, tmp_path / "work")
    assert finished.outcome is Outcome.FAILED and finished.reason == "INVALID_DATASET", finished
    return finished.message


def test_corrupt_images_fail_with_the_file(tiny_vit: Path, tmp_path: Path) -> None:
    archive = write_shapes_zip(tmp_path / "shapes.zip", per_class=3)
    with zipfile.ZipFile(archive, "a") as zipped:
        zipped.writestr("shapes/red/broken.png", b"\x89PNG\r\n\x1a\n garbage")
    assert "shapes.zip:red/broken.png: not a readable image" in failure_of(tiny_vit, archive, tmp_path)


@pytest.mark.parametrize(
    ("members", "links", "message"),
    [
        ({"../escape.png": b"x"}, {}, "points outside the archive"),
        ({"red/a.png": b"x"}, {"blue/link.png": "/etc/passwd"}, "is a link"),
        ({}, {}, "no .jpg/.jpeg"),
    ],
    ids=["dotdot", "symlink", "empty"],
)
def test_unsafe_archives_fail_precisely(
    tiny_vit: Path,
    tmp_path: Path,
    members: dict,
    links: dict,  # type: ignore[type-arg]
    message: str,
) -> None:
    archive = write_tar(tmp_path / "bad.tar.gz", members, links)
    assert message in failure_of(tiny_vit, archive, tmp_path)


def test_bombs_and_floods_are_refused_before_unpacking(tiny_vit: Path, tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zipped:
        zipped.writestr("red/a.png", b"\0" * (64 << 20))
    assert "decompression bomb" in failure_of(tiny_vit, bomb, tmp_path)
    assert not (tmp_path / "work" / "data" / "train" / "red").exists(), "nothing was unpacked"

    from tuneforge.workers.core.archives import ArchiveLimits, extract_archive
    from tuneforge.workers.core.errors import InvalidDataset
    from tuneforge.workers.messages import DataFile

    flood = write_tar(tmp_path / "flood.tar", {f"red/{i}.png": b"x" for i in range(20)})
    with pytest.raises(InvalidDataset, match="20 members is more than the limit of 10"):
        extract_archive(DataFile(str(flood), "flood.tar"), tmp_path / "out", ArchiveLimits(max_members=10))
    with pytest.raises(InvalidDataset, match="unpacks to 20 bytes, more than the limit of 10"):
        extract_archive(DataFile(str(flood), "flood.tar"), tmp_path / "out", ArchiveLimits(max_unpacked_bytes=10))
    not_archive = tmp_path / "plain.zip"
    not_archive.write_bytes(b"hello")
    assert "not a zip or tar archive" in failure_of(tiny_vit, not_archive, tmp_path)


def unpacked_shapes(tiny_vit: Path, tmp_path: Path, per_class: int) -> tuple[list[Any], Any]:
    """Shape images unpacked as examples, and the tiny ViT's image processor."""
    from transformers import AutoImageProcessor

    from tuneforge.workers.core.media_data import MediaExample

    archive = write_shapes_zip(tmp_path / "shapes.zip", per_class=per_class)
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(tmp_path / "images")
    examples = [MediaExample(p, 0, p.name) for p in sorted((tmp_path / "images").rglob("*.png"))]
    return examples, AutoImageProcessor.from_pretrained(tiny_vit)


def test_processed_pixels_are_kept_only_when_nothing_is_random(tiny_vit: Path, tmp_path: Path) -> None:
    from tuneforge.workers.spec import AugmentationSettings
    from tuneforge.workers.tasks.image_classification.runtime import ImageDataset, image_augmentation

    examples, processor = unpacked_shapes(tiny_vit, tmp_path, per_class=2)
    plain = ImageDataset(examples, processor, None)
    first = plain[0]["pixel_values"]
    examples[0].path.unlink()  # a second read could not decode it: it must come from memory
    assert plain[0]["pixel_values"] is first
    augmented = ImageDataset(examples[1:], processor, image_augmentation(AugmentationSettings(), (32, 32)))
    assert augmented[0]["pixel_values"] is not augmented[0]["pixel_values"], "augmented pixels are never reused"
    assert augmented.process_ahead(2) == 0


def test_images_are_processed_ahead_in_parallel_as_they_would_be_one_by_one(
    tiny_vit: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tuneforge.workers.core import processed_cache
    from tuneforge.workers.tasks.image_classification.runtime import ImageDataset

    examples, processor = unpacked_shapes(tiny_vit, tmp_path, per_class=10)
    monkeypatch.setattr(processed_cache, "THREADED_FROM_S", 0.0)  # these small images would stay on one thread
    ahead = ImageDataset(examples, processor, None)
    assert ahead.process_ahead(threads=3) == len(examples)
    one_by_one = ImageDataset(examples, processor, None)
    for index in range(len(examples)):
        assert torch.equal(ahead[index]["pixel_values"], one_by_one[index]["pixel_values"])
    size = one_by_one[0]["pixel_values"].nelement() * 4
    monkeypatch.setattr(processed_cache, "PROCESSED_CACHE_BYTES", size * 4)  # room for four
    assert ImageDataset(examples, processor, None).process_ahead(threads=2) == 4
