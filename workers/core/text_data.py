"""Reads text classification data from JSONL or CSV, checks every row, maps labels and splits off validation.

Every problem is reported with the file, the line number and what to fix, and fails the job as INVALID_DATASET.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.core.errors import InvalidDataset
from workers.core.splits import training_split
from workers.messages import DataFile
from workers.spec import DataSettings

MAX_ERRORS_SHOWN = 5


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
    """Yields (line number, record) from a JSONL or CSV file, by the file name's extension."""
    suffix = Path(file.filename).suffix.lower()
    try:
        text = Path(file.path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidDataset(f"{file.filename}: not UTF-8 text (bad byte at offset {exc.start})") from exc
    if suffix in (".jsonl", ".json", ".ndjson"):
        yield from _jsonl_records(file.filename, text)
    elif suffix in (".csv", ".tsv"):
        yield from _csv_records(file.filename, text, "\t" if suffix == ".tsv" else ",")
    else:
        raise InvalidDataset(f"{file.filename}: unsupported file type {suffix!r}; use .jsonl or .csv for text")


def _jsonl_records(filename: str, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidDataset(f"{filename} line {number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise InvalidDataset(f"{filename} line {number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def _csv_records(filename: str, text: str, delimiter: str) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        for record in reader:
            if None in record:
                raise InvalidDataset(f"{filename} line {reader.line_num}: more fields than the header has")
            yield reader.line_num, record
    except csv.Error as exc:
        raise InvalidDataset(f"{filename} line {reader.line_num}: malformed CSV ({exc})") from exc


def label_text(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def read_rows(file: DataFile, settings: DataSettings) -> list[TextRow]:
    """Reads and checks every row; raises InvalidDataset naming the first few bad lines."""
    rows: list[TextRow] = []
    errors: list[str] = []
    for number, record in raw_records(file):
        problem, row = _check_record(number, record, settings)
        if problem:
            errors.append(f"{file.filename} line {number}: {problem}")
            if len(errors) >= MAX_ERRORS_SHOWN:
                break
        elif row is not None:
            rows.append(row)
    if errors:
        raise InvalidDataset("; ".join(errors))
    if not rows:
        raise InvalidDataset(f"{file.filename}: no examples")
    return rows


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
        return f"{settings.label_column!r} must be a non-empty string or an integer", None
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
    if len(names) < 2:
        raise InvalidDataset(f"{training.filename}: needs at least 2 distinct labels, found {sorted(names)}")
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
