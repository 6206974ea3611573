"""Length-grouped batches: examples of similar length train together, so dynamic padding pads little.

Like transformers' `group_by_length`: a seeded shuffle, then windows of 50 batches each sorted by length and cut into
batches, the batches shuffled, and the longest batch first (an out-of-memory error shows at the first step, not the
last). The same seed gives the same batches, so a resumed run skips exactly the batches the lost run consumed.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

WINDOW_BATCHES = 50


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of indices grouped by length; `lengths[i]` is example i's size (tokens or samples)."""

    def __init__(self, lengths: list[int], batch_size: int, generator: torch.Generator):
        super().__init__()
        self.lengths, self.batch_size, self.generator = lengths, batch_size, generator

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        window = self.batch_size * WINDOW_BATCHES
        batches: list[list[int]] = []
        for start in range(0, len(order), window):
            group = sorted(order[start : start + window], key=lambda i: -self.lengths[i])
            batches += [group[i : i + self.batch_size] for i in range(0, len(group), self.batch_size)]
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=self.generator).tolist()]
        longest = max(range(len(shuffled)), key=lambda b: max(self.lengths[i] for i in shuffled[b]))
        shuffled.insert(0, shuffled.pop(longest))
        return iter(shuffled)
