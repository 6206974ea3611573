"""Classification evaluation: the loop over validation batches and the metrics of its predictions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from tuneforge.workers.core.prepared_task import Batch


@dataclass
class Evaluation:
    """Scalar metrics for events and the job (`eval_*`), and per-class details for metrics.json."""

    metrics: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)


def classification_metrics(predictions: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro-F1 (over every class seen in either tensor, as scikit-learn does)."""
    if labels.numel() == 0:
        return {"accuracy": 0.0, "macro_f1": 0.0}
    accuracy = (predictions == labels).float().mean().item()
    classes = torch.unique(torch.cat([predictions, labels]))
    f1_scores = [per_class(predictions, labels, int(c))[2] for c in classes]
    return {"accuracy": accuracy, "macro_f1": sum(f1_scores) / len(f1_scores)}


def per_class(predictions: torch.Tensor, labels: torch.Tensor, cls: int) -> tuple[float, float, float]:
    """Precision, recall and F1 of one class (0 where undefined)."""
    tp = int(((predictions == cls) & (labels == cls)).sum())
    fp = int(((predictions == cls) & (labels != cls)).sum())
    fn = int(((predictions != cls) & (labels == cls)).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return precision, recall, f1


def class_report(predictions: torch.Tensor, labels: torch.Tensor, names: list[str]) -> dict[str, Any]:
    """Per-class precision, recall, F1 and support, and the confusion matrix (rows: true, columns: predicted)."""
    confusion = torch.zeros(len(names), len(names), dtype=torch.long)
    for true, predicted in zip(labels.tolist(), predictions.tolist(), strict=True):
        confusion[true, predicted] += 1
    report = {}
    for index, name in enumerate(names):
        precision, recall, f1 = per_class(predictions, labels, index)
        report[name] = {"precision": precision, "recall": recall, "f1": f1, "support": int((labels == index).sum())}
    return {"per_class": report, "confusion_matrix": confusion.tolist(), "labels": names}


CALIBRATION_BINS = 10


def calibration(confidences: torch.Tensor, correct: torch.Tensor) -> dict[str, Any]:
    """Expected calibration error over equal-width confidence bins (Guo et al., 2017), with the bins for a
    reliability diagram: how often the model is right when it says it is p sure."""
    bins = []
    ece = 0.0
    total = max(1, confidences.numel())
    edges = torch.linspace(0, 1, CALIBRATION_BINS + 1)
    for low, high in zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True):
        inside = (confidences > low) & (confidences <= high) if low > 0 else (confidences <= high)
        count = int(inside.sum())
        if count == 0:
            continue
        confidence = float(confidences[inside].mean())
        accuracy = float(correct[inside].float().mean())
        ece += count / total * abs(accuracy - confidence)
        bins.append({"low": low, "high": high, "count": count, "confidence": confidence, "accuracy": accuracy})
    return {"ece": ece, "bins": bins}


def evaluate(
    model: nn.Module,
    loader: DataLoader[Any],
    device: torch.device,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    label_names: list[str],
    to_device: Callable[[Batch], Batch],
) -> Evaluation:
    """Loss (unsmoothed, unweighted), accuracy and macro-F1 over the whole validation set, with a class report."""
    model.eval()
    total_loss, count = 0.0, 0
    predictions, labels, confidences = [], [], []
    with torch.inference_mode():
        for batch in loader:
            batch = to_device(batch)
            targets = batch.pop("labels")
            logits = model(**batch).logits.float()
            total_loss += float(loss_fn(logits, targets)) * targets.shape[0]
            count += targets.shape[0]
            predictions.append(logits.argmax(dim=-1).cpu())
            confidences.append(logits.softmax(dim=-1).amax(dim=-1).cpu())
            labels.append(targets.cpu())
    model.train()
    predicted, true = torch.cat(predictions), torch.cat(labels)
    scalars = classification_metrics(predicted, true)
    metrics = {"eval_loss": total_loss / max(1, count), **{f"eval_{k}": v for k, v in scalars.items()}}
    details = class_report(predicted, true, label_names)
    details["calibration"] = calibration(torch.cat(confidences), predicted == true)
    return Evaluation(metrics, details)
