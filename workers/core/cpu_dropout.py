"""Dropout that is cheaper on CPUs. torch's CPU dropout fills its mask with `bernoulli_`, which the profile of a
training step shows as the costliest operator after the matrix products (12% of a BERT step, 29% of a wav2vec2
step on 2 cores, `bench/profile_step.py`). A uniform draw compared with p in place gives the same distribution
(keep with probability 1 - p, scale by 1 / (1 - p)) at about half the cost, forward and backward together. CUDA's
fused dropout is fast already and is left as is.
"""

from __future__ import annotations

import torch
from torch import nn


class UniformMaskDropout(nn.Dropout):
    """nn.Dropout with its mask drawn as `uniform >= p` (from torch's generator, like any dropout), in float32
    so that p keeps its precision for half-precision inputs."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return input
        if self.p == 1.0:
            return torch.zeros_like(input)
        mask = torch.empty(input.shape, dtype=torch.float32, device=input.device).uniform_()
        mask.ge_(self.p).mul_(1.0 / (1.0 - self.p))  # 1 / (1 - p) where kept, 0 where dropped
        return input * mask.to(input.dtype)


def use_cpu_dropout(model: nn.Module) -> int:
    """Turns every plain nn.Dropout of `model` into UniformMaskDropout (same p); returns how many."""
    swapped = 0
    for module in model.modules():
        if type(module) is nn.Dropout:
            module.__class__ = UniformMaskDropout
            swapped += 1
    return swapped
