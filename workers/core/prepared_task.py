"""What a task hands the shared trainer: the model, its processor, data sets, collate, and its loss and evaluation.

The trainer only sees `PreparedTask`; everything task-specific (decoding, tokenisation, model class) stays in the
task's runtime (`workers/tasks/<task>/runtime.py`), which builds it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Batch = dict[str, torch.Tensor]


@dataclass
class PreparedTask:
    """What the shared trainer needs from any modality."""

    model: nn.Module
    processor: Any
    """Tokenizer, image processor or feature extractor; saved with the artifact (`save_pretrained`)."""
    train_set: Sequence[Any]
    validation_set: Sequence[Any]
    collate: Callable[[list[Any]], Batch]
    labels: list[str]
    train_labels: list[int]
    """The label id of each training example (class weights, balanced sampling)."""
    compute_loss: Callable[[nn.Module, Batch], torch.Tensor] | None = None
    """The training loss, when it is not classification cross-entropy (CTC computes its own)."""
    evaluate: Callable[..., Any] | None = None
    """evaluate(model, loader, to_device) -> Evaluation, when it is not classification's."""
    lengths: list[int] | None = None
    """Each training example's size (tokens), when known: training batches are then grouped by length."""
    learned_tokens: int | None = None
    """Tokens the loss covers over the training set, for tasks where that, not the example count, measures how much
    there is to learn (language models): automatic epochs follow it."""
