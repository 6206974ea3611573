"""Finds the examples of an image or audio data set in an unpacked archive: a manifest, or class folders.

A manifest (`metadata.jsonl`, `metadata.csv`, `manifest.jsonl` or `manifest.csv` at the root) names each file and
its label (or transcript); without one, every top-level folder is a class and holds its examples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tuneforge.workers.core.archives import ArchiveLimits, extract_archive, is_hidden
from tuneforge.workers.core.errors import InvalidDataset
from tuneforge.workers.core.splits import training_split
from tuneforge.workers.core.text_data import (
    MAX_LABEL_CHARS,
    check_label_count,
    label_rule,
    label_text,
    raw_records,
    sorted_labels,
)
from tuneforge.workers.messages import DataFile
from tuneforge.workers.spec import DataSettings

MANIFESTS = ("metadata.jsonl", "metadata.csv", "manifest.jsonl", "manifest.csv")


@dataclass(frozen=True)
class MediaItem:
    """One example as found: its file, its target text (a label or a transcript), and where it was declared."""

    path: Path
    target: str
    source: str


@dataclass(frozen=True)
class MediaExample:
    """A classification example ready for decoding."""

    path: Path
    label: int
    source: str


@dataclass(frozen=True)
class MediaDataset:
    """Training and validation examples with the label names."""

    train: list[MediaExample]
    validation: list[MediaExample]
    labels: list[str]


def find_items(
    root: Path,
    archive: str,
    settings: DataSettings,
    extensions: tuple[str, ...],
    target_column: str,
    max_target_chars: int = MAX_LABEL_CHARS,
) -> list[MediaItem]:
    """The archive's examples, from its manifest or its class folders."""
    manifest = next((root / name for name in MANIFESTS if (root / name).is_file()), None)
    columns = (settings.file_column, target_column, max_target_chars)
    items = (
        _manifest_items(root, manifest, archive, columns, extensions)
        if manifest is not None
        else _folder_items(root, archive, extensions)
    )
    if not items:
        raise InvalidDataset(
            f"{archive}: no {'/'.join(extensions)} files found; use class folders (`cat/001.jpg`) or a manifest "
            f"({' or '.join(MANIFESTS)}) with `{settings.file_column}` and `{target_column}` columns"
        )
    return items


def _manifest_items(
    root: Path, manifest: Path, archive: str, columns: tuple[str, str, int], extensions: tuple[str, ...]
) -> list[MediaItem]:
    items = []
    where = f"{archive}:{manifest.name}"
    file_column, target_column, max_chars = columns
    for line, record in raw_records(DataFile(str(manifest), manifest.name)):
        name, target = record.get(file_column), label_text(record.get(target_column), max_chars)
        if not isinstance(name, str) or not name:
            raise InvalidDataset(f"{where} line {line}: missing column {file_column!r}")
        if target is None:
            raise InvalidDataset(f"{where} line {line}: {target_column!r} {label_rule(max_chars)}")
        path = (root / name).resolve()
        if not path.is_relative_to(root.resolve()):
            raise InvalidDataset(f"{where} line {line}: {name!r} points outside the archive")
        if not path.is_file():
            raise InvalidDataset(f"{where} line {line}: {name!r} is not in the archive")
        if path.suffix.lower() not in extensions:
            raise InvalidDataset(f"{where} line {line}: {name!r} is not one of {', '.join(extensions)}")
        items.append(MediaItem(path, target, f"{where} line {line} ({name})"))
    return items


def _folder_items(root: Path, archive: str, extensions: tuple[str, ...]) -> list[MediaItem]:
    items = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not is_hidden(p.name)):
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not is_hidden(path.name) and path.suffix.lower() in extensions:
                items.append(MediaItem(path, folder.name, f"{archive}:{path.relative_to(root)}"))
    return items


def load_media_dataset(
    training: DataFile,
    validation: DataFile | None,
    settings: DataSettings,
    seed: int,
    work_dir: Path,
    extensions: tuple[str, ...],
    check: Callable[[MediaItem], object],
    limits: ArchiveLimits | None = None,
) -> MediaDataset:
    """Unpacks the archives, finds and checks every example, maps labels and applies the validation split."""
    train_root = extract_archive(training, work_dir / "data" / "train", limits)
    train_items = find_items(train_root, training.filename, settings, extensions, settings.label_column)
    names = {item.target for item in train_items}
    check_label_count(training.filename, names)
    given: list[MediaItem] | None = None
    if validation is not None:
        val_root = extract_archive(validation, work_dir / "data" / "validation", limits)
        given = find_items(val_root, validation.filename, settings, extensions, settings.label_column)
        unknown = next((item for item in given if item.target not in names), None)
        if unknown is not None:
            raise InvalidDataset(f"{unknown.source}: label {unknown.target!r} does not occur in the training data")
    train_items, val_items = training_split(
        train_items, given, lambda i: i.target, settings.validation_fraction, settings.shots_per_class, seed
    )
    for item in (*train_items, *val_items):
        check(item)
    labels = sorted_labels(names)
    index = {name: i for i, name in enumerate(labels)}

    def examples(items: list[MediaItem]) -> list[MediaExample]:
        return [MediaExample(item.path, index[item.target], item.source) for item in items]

    return MediaDataset(examples(train_items), examples(val_items), labels)
