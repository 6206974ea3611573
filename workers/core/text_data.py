"""Reads text classification data from JSONL or CSV, checks every row, maps labels and splits off validation.

Every problem is reported with the file, the line number and what to fix, and fails the job as INVALID_DATASET.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, TypeVar

from tuneforge.workers.core.errors import InvalidDataset
from tuneforge.workers.core.splits import training_split
from tuneforge.workers.messages import DataFile
from tuneforge.workers.spec import DataSettings

T = TypeVar("T")
MAX_ERRORS_SHOWN = 5
MAX_LABEL_CHARS = 1000
"""A label is a class name: longer text is a column mix-up, and it would be quoted in every message and report."""
MAX_LABELS = 10_000
"""Distinct labels one classifier head may have (each costs a row of the head)."""


@dataclass(frozen=True)
class TextRow:
    """One example as read from the file, label not yet mapped."""

    line: int
    text: str
    text_pair: str | None
    label: str


@dataclass(frozen=True)
class TextExample:
    """One example ready for tokenisation."""

    text: str
    text_pair: str | None
    label: int


@dataclass(frozen=True)
class TextDataset:
    """Training and validation examples with the label mapping."""

    train: list[TextExample]
    validation: list[TextExample]
    labels: list[str]
    """Label names; an example's label is an index into this list."""


def raw_records(file: DataFile) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields (line number, record) from a JSONL or CSV file, by the file name's extension. The file is read as a
    stream, a line at a time: only the records kept cost memory, never the whole text (or three copies of it)."""
    suffix = Path(file.filename).suffix.lower()
    if suffix not in (".jsonl", ".json", ".ndjson", ".csv", ".tsv"):
        raise InvalidDataset(f"{file.filename}: unsupported file type {suffix!r}; use .jsonl or .csv for text")
    with open(file.path, encoding="utf-8-sig", newline="") as text:
        try:
            if suffix in (".csv", ".tsv"):
                yield from _csv_records(file.filename, text, "\t" if suffix == ".tsv" else ",")
            else:
                yield from _jsonl_records(file.filename, text)
        except UnicodeDecodeError as exc:
            raise InvalidDataset(f"{file.filename}: not UTF-8 text ({exc.reason} in a line's bytes)") from exc


def _jsonl_records(filename: str, text: TextIO) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidDataset(f"{filename} line {number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise InvalidDataset(f"{filename} line {number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def _lines(text: TextIO) -> Iterator[str]:
    """Lines as `str.splitlines` splits them (a lone \\r ends a line too), read a line at a time."""
    for line in text:
        yield from line.splitlines() or [""]


def _csv_records(filename: str, text: TextIO, delimiter: str) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(text, delimiter=delimiter, strict=True)
    try:
        for record in reader:
            if None in record:
                raise InvalidDataset(f"{filename} line {reader.line_num}: more fields than the header has")
            yield reader.line_num, record
    except csv.Error as exc:
        raise InvalidDataset(f"{filename} line {reader.line_num}: malformed CSV ({exc})") from exc


def label_text(value: Any, limit: int = MAX_LABEL_CHARS) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip() and len(value.strip()) <= limit:
        return value.strip()
    return None


def label_rule(limit: int = MAX_LABEL_CHARS) -> str:
    """What label_text accepts, in words."""
    return f"must be a non-empty string of at most {limit} characters, or an integer"


def check_label_count(filename: str, names: set[str]) -> None:
    """A classifier needs 2 labels and can hold MAX_LABELS; the message quotes a few labels, bounded."""
    if len(names) < 2:
        raise InvalidDataset(f"{filename}: needs at least 2 distinct labels, found {sorted(names)}")
    if len(names) > MAX_LABELS:
        raise InvalidDataset(
            f"{filename}: {len(names):,} distinct labels, more than the limit of {MAX_LABELS:,}; is the label column "
            "right?"
        )


def checked_records(file: DataFile, check: Callable[[int, dict[str, Any]], tuple[str, T | None]]) -> list[T]:
    """Every record of the file through `check(line, record) -> (problem, item)`; InvalidDataset naming the first few
    bad lines, or saying the file holds no examples."""
    items: list[T] = []
    errors: list[str] = []
    for number, record in raw_records(file):
        problem, item = check(number, record)
        if problem:
            errors.append(f"{file.filename} line {number}: {problem}")
            if len(errors) >= MAX_ERRORS_SHOWN:
                break
        elif item is not None:
            items.append(item)
    if errors:
        raise InvalidDataset("; ".join(errors))
    if not items:
        raise InvalidDataset(f"{file.filename}: no examples")
    return items


def read_rows(file: DataFile, settings: DataSettings) -> list[TextRow]:
    """Reads and checks every row; raises InvalidDataset naming the first few bad lines."""
    return checked_records(file, lambda number, record: _check_record(number, record, settings))


def _check_record(number: int, record: dict[str, Any], settings: DataSettings) -> tuple[str, TextRow | None]:
    text = record.get(settings.text_column)
    if text is None:
        return f"missing column {settings.text_column!r}", None
    if not isinstance(text, str) or not text.strip():
        return f"{settings.text_column!r} must be a non-empty string", None
    pair: str | None = None
    if settings.text_pair_column:
        pair_value = record.get(settings.text_pair_column)
        if not isinstance(pair_value, str) or not pair_value.strip():
            return f"{settings.text_pair_column!r} must be a non-empty string", None
        pair = pair_value
    if settings.label_column not in record:
        return f"missing column {settings.label_column!r}", None
    label = label_text(record[settings.label_column])
    if label is None:
        return f"{settings.label_column!r} {label_rule()}", None
    return "", TextRow(number, text, pair, label)


def sorted_labels(names: set[str]) -> list[str]:
    """Integer labels sort numerically (so `2` < `10`), others alphabetically."""
    if all(name.lstrip("-").isdigit() for name in names):
        return sorted(names, key=int)
    return sorted(names)


def load_text_dataset(
    training: DataFile, validation: DataFile | None, settings: DataSettings, seed: int
) -> TextDataset:
    """Reads the files, builds the label list from the training data and applies the validation split."""
    train_rows = read_rows(training, settings)
    names = {row.label for row in train_rows}
    check_label_count(training.filename, names)
    given: list[TextRow] | None = None
    if validation is not None:
        given = read_rows(validation, settings)
        unknown = [row for row in given if row.label not in names]
        if unknown:
            first = unknown[0]
            raise InvalidDataset(
                f"{validation.filename} line {first.line}: label {first.label!r} does not occur in the training data"
            )
    train_rows, val_rows = training_split(
        train_rows, given, lambda row: row.label, settings.validation_fraction, settings.shots_per_class, seed
    )
    labels = sorted_labels(names)
    index = {name: i for i, name in enumerate(labels)}

    def examples(rows: list[TextRow]) -> list[TextExample]:
        return [TextExample(row.text, row.text_pair, index[row.label]) for row in rows]

    return TextDataset(examples(train_rows), examples(val_rows), labels)
