"""The per-modality contract: an adapter turns a RunJob into a model, its processor, data sets and a collate function.

The trainer only sees `PreparedTask`; everything modality-specific (decoding, tokenisation, model class) stays in
the adapter. Adding a modality means writing one adapter and registering it here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from workers.messages import RunJob
from workers.spec import TaskKind

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


class TaskAdapter(Protocol):
    """Builds a PreparedTask for one task kind."""

    def prepare(self, job: RunJob, log: Callable[[str], None]) -> PreparedTask: ...


def import_all_adapters() -> None:
    """Imports every adapter and the model classes they use (a worker does this at start, not at its first job)."""
    for task in TaskKind:
        adapter_for(task)
    import peft  # noqa: F401  # LoRA
    import transformers
    import transformers.trainer_utils  # set_seed

    for name in MODEL_CLASSES:
        getattr(transformers, name)


MODEL_CLASSES = (
    "AutoModelForSequenceClassification",
    "AutoModelForImageClassification",
    "AutoModelForAudioClassification",
    "AutoModelForCTC",
    "AutoTokenizer",
    "AutoImageProcessor",
    "AutoFeatureExtractor",
)


ADAPTERS: dict[TaskKind, str] = {
    TaskKind.TEXT_CLASSIFICATION: "workers.core.text_adapter:TextClassificationAdapter",
    TaskKind.IMAGE_CLASSIFICATION: "workers.core.image_adapter:ImageClassificationAdapter",
    TaskKind.AUDIO_CLASSIFICATION: "workers.core.audio_adapter:AudioClassificationAdapter",
    TaskKind.SPEECH_RECOGNITION: "workers.core.speech_adapter:SpeechRecognitionAdapter",
}
"""Every task's adapter, imported when first asked for (tests/core/test_task_contract.py walks each one)."""


def adapter_for(task: TaskKind) -> TaskAdapter:
    """The adapter for a task (every TaskKind has one: the task contract test fails otherwise)."""
    module, _, name = ADAPTERS[task].partition(":")
    adapter: TaskAdapter = getattr(importlib.import_module(module), name)()
    return adapter
