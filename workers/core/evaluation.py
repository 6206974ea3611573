"""Classification metrics from predicted and true label ids."""

from __future__ import annotations

import torch


def classification_metrics(predictions: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro-F1 (over every class seen in either tensor, as scikit-learn does)."""
    if labels.numel() == 0:
        return {"accuracy": 0.0, "macro_f1": 0.0}
    accuracy = (predictions == labels).float().mean().item()
    classes = torch.unique(torch.cat([predictions, labels]))
    f1_scores = []
    for cls in classes:
        tp = ((predictions == cls) & (labels == cls)).sum().item()
        fp = ((predictions == cls) & (labels != cls)).sum().item()
        fn = ((predictions != cls) & (labels == cls)).sum().item()
        denominator = 2 * tp + fp + fn
        f1_scores.append(2 * tp / denominator if denominator else 0.0)
    return {"accuracy": accuracy, "macro_f1": sum(f1_scores) / len(f1_scores)}
