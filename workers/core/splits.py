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
    by_label: dict[str, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        by_label[label_of(item)].append(index)
    rng = random.Random(seed)
    held: set[int] = set()
    for label in sorted(by_label):
        group = by_label[label][:]
        rng.shuffle(group)
        held.update(group[: min(len(group) - 1, round(fraction * len(group)))])
    train = [item for i, item in enumerate(items) if i not in held]
    return train, [item for i, item in enumerate(items) if i in held]
