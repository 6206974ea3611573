"""Text classification: JSONL/CSV rows -> tokenised examples -> AutoModelForSequenceClassification."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from workers.core.adapters import Batch, PreparedTask
from workers.core.models import load_classifier, load_pretrained
from workers.core.text_data import TextExample, load_text_dataset
from workers.messages import RunJob

DEFAULT_MAX_LENGTH = 512


def sequence_limit(requested: int, tokenizer: Any, model: Any) -> int:
    """Tokens a text is cut to: the requested length, never more than the tokenizer or the model's positions take
    (training and Predict alike, so a long input is truncated, not an index error)."""
    limit = min(
        int(getattr(tokenizer, "model_max_length", DEFAULT_MAX_LENGTH) or DEFAULT_MAX_LENGTH),
        int(getattr(model.config, "max_position_embeddings", DEFAULT_MAX_LENGTH) or DEFAULT_MAX_LENGTH),
        DEFAULT_MAX_LENGTH,
    )
    return min(requested, limit) if requested > 0 else limit


class TextClassificationAdapter:
    """Single texts or text pairs to one of N labels."""

    def prepare(self, job: RunJob, log: Callable[[str], None]) -> PreparedTask:
        spec = job.spec
        data = load_text_dataset(job.training_data, job.validation_data, spec.data, spec.hyperparameters.seed)
        log(
            f"read {len(data.train)} training and {len(data.validation)} validation examples "
            f"with {len(data.labels)} labels"
        )
        tokenizer = load_pretrained(AutoTokenizer, spec.base_model)
        model = load_classifier(AutoModelForSequenceClassification, spec.base_model, data.labels)
        max_length = self._max_length(spec.data.max_sequence_length, tokenizer, model)
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
    def _max_length(requested: int, tokenizer: Any, model: Any) -> int:
        return sequence_limit(requested, tokenizer, model)

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
