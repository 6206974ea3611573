"""Text classification's torch side: JSONL/CSV rows -> tokenised examples -> AutoModelForSequenceClassification;
Predict tokenises the same way, cut to the same length."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tuneforge.workers.core.models import load_classifier, load_pretrained, sequence_limit
from tuneforge.workers.core.prepared_task import Batch, PreparedTask
from tuneforge.workers.core.text_data import TextExample, load_text_dataset
from tuneforge.workers.messages import RunJob
from tuneforge.workers.tasks.classifier import ClassifierRuntime

if TYPE_CHECKING:
    from tuneforge.workers.core.prediction import LoadedModel

FIXED_TEXT_LENGTH = 128
"""The sequence length a TorchScript export is traced at (or the job's own, when shorter)."""
SAMPLE_WORDS = ("sample", "input", "text", "model", "check", "export", "value", "token")


class TextClassificationRuntime(ClassifierRuntime):
    """Single texts or text pairs to one of N labels."""

    model_class = "AutoModelForSequenceClassification"
    processor_class = "AutoTokenizer"

    def prepare(self, job: RunJob, log: Callable[[str], None]) -> PreparedTask:
        spec = job.spec
        data = load_text_dataset(job.training_data, job.validation_data, spec.data, spec.hyperparameters.seed)
        log(
            f"read {len(data.train)} training and {len(data.validation)} validation examples "
            f"with {len(data.labels)} labels"
        )
        tokenizer = load_pretrained(AutoTokenizer, spec.base_model)
        model = load_classifier(AutoModelForSequenceClassification, spec.base_model, data.labels)
        max_length = sequence_limit(spec.data.max_sequence_length, tokenizer, model)
        train_set = self._encode(data.train, tokenizer, max_length)
        return PreparedTask(
            model=model,
            processor=tokenizer,
            train_set=train_set,
            validation_set=self._encode(data.validation, tokenizer, max_length),
            collate=self._collate(tokenizer),
            labels=data.labels,
            train_labels=[example.label for example in data.train],
            lengths=[len(item["input_ids"]) for item in train_set],
        )

    @staticmethod
    def _encode(examples: list[TextExample], tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
        if not examples:
            return []
        texts = [example.text for example in examples]
        pairs = [example.text_pair for example in examples]
        encoded = tokenizer(
            texts, pairs if all(p is not None for p in pairs) else None, truncation=True, max_length=max_length
        )
        keys = list(encoded.keys())
        return [
            {**{key: encoded[key][i] for key in keys}, "labels": example.label} for i, example in enumerate(examples)
        ]

    @staticmethod
    def _collate(tokenizer: Any) -> Callable[[list[Any]], Batch]:
        """Dynamic padding: each batch pads only to its own longest example."""

        def collate(items: list[dict[str, Any]]) -> Batch:
            labels = torch.tensor([item["labels"] for item in items], dtype=torch.long)
            features = [{k: v for k, v in item.items() if k != "labels"} for item in items]
            batch: Batch = dict(tokenizer.pad(features, return_tensors="pt"))
            batch["labels"] = labels
            return batch

        return collate

    def decode(self, loaded: LoadedModel, value: str | bytes) -> Any:
        return str(value)

    def batch(self, loaded: LoadedModel, decoded: list[Any]) -> Batch:
        limit = sequence_limit(int(loaded.data.get("max_sequence_length") or 0), loaded.processor, loaded.model)
        return dict(loaded.processor(decoded, truncation=True, max_length=limit, padding=True, return_tensors="pt"))

    def sample_input(self, rng: np.random.Generator, index: int) -> tuple[str, bytes | str]:
        return "text", " ".join(rng.choice(SAMPLE_WORDS, size=3 + 4 * index))

    def fixed_shape_inputs(self, loaded: LoadedModel, items: list[tuple[str, Any]]) -> Batch:
        """Padded to the job's sequence length, at most FIXED_TEXT_LENGTH and what the model takes."""
        length = min(
            int(loaded.data.get("max_sequence_length") or FIXED_TEXT_LENGTH),
            sequence_limit(FIXED_TEXT_LENGTH, loaded.processor, loaded.model),
        )
        texts = [str(value) for _, value in items]
        encoded = loaded.processor(texts, truncation=True, max_length=length, padding="max_length", return_tensors="pt")
        return dict(encoded)


RUNTIME = TextClassificationRuntime()
