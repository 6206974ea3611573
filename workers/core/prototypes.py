"""The few-shot baseline: each validation example goes to the class whose mean embedding (over the training shots,
from the pretrained backbone before any training) is nearest by cosine. Reported beside the fine-tuned accuracy, it
tells a user whether fine-tuning helped."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from tuneforge.workers.core.prepared_task import Batch, PreparedTask


def embed(model: nn.Module, batch: Batch) -> torch.Tensor:
    """One vector per example: the backbone's last hidden state, averaged over tokens, frames or pixels."""
    inputs = {name: value for name, value in batch.items() if name != "labels"}
    backbone: Any = getattr(model, "base_model", model)
    output = backbone(**inputs)
    hidden: torch.Tensor = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    if hidden.dim() == 4:  # convolutional feature maps (B, C, H, W)
        return hidden.mean(dim=(2, 3))
    mask = inputs.get("attention_mask")
    if mask is not None and mask.shape[:2] == hidden.shape[:2]:  # tokens (audio masks count samples, not frames)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
    return hidden.mean(dim=1)


@torch.no_grad()
def prototype_accuracy(task: PreparedTask, device: torch.device, batch_size: int = 32) -> float | None:
    """Nearest-class-mean accuracy on the validation set; None without validation data."""
    if not task.validation_set or not task.train_set:
        return None
    model = task.model.to(device)
    model.eval()
    train_vectors, train_labels = _embed_all(model, task, task.train_set, device, batch_size)
    val_vectors, val_labels = _embed_all(model, task, task.validation_set, device, batch_size)
    means = torch.zeros(len(task.labels), train_vectors.shape[1])
    for label in set(train_labels.tolist()):
        means[label] = train_vectors[train_labels == label].mean(dim=0)
    predictions = (val_vectors @ F.normalize(means, dim=-1).T).argmax(dim=1)
    return float((predictions == val_labels).float().mean())


def _embed_all(
    model: nn.Module, task: PreparedTask, dataset: Any, device: torch.device, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    vectors, labels = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=task.collate):
        on_device = {name: value.to(device) for name, value in batch.items()}
        vectors.append(F.normalize(embed(model, on_device).float(), dim=-1).cpu())
        labels.append(batch["labels"].cpu())
    return torch.cat(vectors), torch.cat(labels)
