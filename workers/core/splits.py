"""Stratified hold-out splits, shared by every modality."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def stratified_split(
    items: list[T], label_of: Callable[[T], str], fraction: float, seed: int
) -> tuple[list[T], list[T]]:
    """Holds out about `fraction` of each label's items (keeping at least one for training); order is preserved."""
    by_label = _indices_by_label(items, label_of)
    rng = random.Random(seed)
    held: set[int] = set()
    for label in sorted(by_label):
        group = by_label[label][:]
        rng.shuffle(group)
        held.update(group[: min(len(group) - 1, round(fraction * len(group)))])
    train = [item for i, item in enumerate(items) if i not in held]
    return train, [item for i, item in enumerate(items) if i in held]


FEW_SHOT_VALIDATION_CAP = 1000
"""Few-shot mode validates on the examples not drawn as shots, at most this many (stratified)."""


def sample_shots(items: list[T], label_of: Callable[[T], str], shots: int, seed: int) -> tuple[list[T], list[T]]:
    """`shots` items of each label (all of a smaller one), drawn with the seed; returns them and the rest, in order."""
    by_label = _indices_by_label(items, label_of)
    rng = random.Random(seed + 1)
    chosen: set[int] = set()
    for label in sorted(by_label):
        group = by_label[label][:]
        rng.shuffle(group)
        chosen.update(group[:shots])
    return [item for i, item in enumerate(items) if i in chosen], [
        item for i, item in enumerate(items) if i not in chosen
    ]


def training_split(
    train: list[T],
    validation: list[T] | None,
    label_of: Callable[[T], str],
    fraction: float,
    shots: int,
    seed: int,
) -> tuple[list[T], list[T]]:
    """The validation split (a given file, a stratified fraction, or none), then few-shot sampling: with no other
    validation data, the examples not drawn as shots are held out (up to FEW_SHOT_VALIDATION_CAP)."""
    if validation is None:
        train, validation = stratified_split(train, label_of, fraction, seed) if fraction > 0 else (train, [])
    if not shots:
        return train, validation
    train, rest = sample_shots(train, label_of, shots, seed)
    if not validation and rest:
        if len(rest) > FEW_SHOT_VALIDATION_CAP:
            _, rest = stratified_split(rest, label_of, FEW_SHOT_VALIDATION_CAP / len(rest), seed)
        validation = rest
    return train, validation


def _indices_by_label(items: list[T], label_of: Callable[[T], str]) -> dict[str, list[int]]:
    by_label: dict[str, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        by_label[label_of(item)].append(index)
    return by_label
