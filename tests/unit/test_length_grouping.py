"""Length-grouped batches: every example exactly once, similar lengths together, the longest batch first, and the
same batches for the same seed."""

from __future__ import annotations

import random

import torch

from tuneforge.workers.core.length_grouping import LengthGroupedBatchSampler


def batches(lengths: list[int], size: int, seed: int) -> list[list[int]]:
    return list(LengthGroupedBatchSampler(lengths, size, torch.Generator().manual_seed(seed)))


def test_each_example_once_similar_lengths_together_longest_first() -> None:
    rng = random.Random(3)
    lengths = [rng.randint(4, 120) for _ in range(1000)]
    grouped = batches(lengths, 16, seed=1)
    assert sorted(i for batch in grouped for i in batch) == list(range(1000))
    assert len(grouped) == len(LengthGroupedBatchSampler(lengths, 16, torch.Generator())) == 63
    assert max(lengths[i] for i in grouped[0]) == max(lengths)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in grouped)
    shuffled = list(range(1000))
    random.Random(1).shuffle(shuffled)
    padded_random = sum(16 * max(lengths[i] for i in shuffled[s : s + 16]) for s in range(0, 1000, 16))
    assert padded < 0.7 * padded_random, "much less padding than random batches"


def test_the_same_seed_gives_the_same_batches() -> None:
    lengths = list(range(200))
    assert batches(lengths, 8, seed=5) == batches(lengths, 8, seed=5)
    assert batches(lengths, 8, seed=5) != batches(lengths, 8, seed=6)
