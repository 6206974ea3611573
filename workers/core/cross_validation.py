"""Few-shot jobs with no data left to validate on: k-fold cross-validation over the shots chooses the number of
epochs (what early stopping would have done with validation data) and estimates the accuracy, for the fine-tuned
model and for the prototype baseline alike. The final model then trains on every shot for that many epochs."""

from __future__ import annotations

import random
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import transformers
from torch.utils.data import Subset

from tuneforge.workers.core.model_setup import adapt_model
from tuneforge.workers.core.prototypes import prototype_accuracy
from tuneforge.workers.core.reporting import Reporter
from tuneforge.workers.core.trainer import Trainer
from tuneforge.workers.messages import RunJob
from tuneforge.workers.spec import AutoSettings, TrainingSpec
from tuneforge.workers.tasks import registry

MAX_FOLDS = 5


@dataclass(frozen=True)
class CrossValidation:
    """What k folds found: the epochs to train for, the metric there, the baseline, and the mean curve."""

    folds: int
    epochs: int
    metric: str
    value: float
    metrics: dict[str, float]
    """Every validation metric, averaged over the folds, after the chosen epochs."""
    prototype: float | None
    curve: list[tuple[float, float]]
    """(epoch, mean of the metric over the folds)."""


def fold_indices(labels: list[int], folds: int, seed: int) -> list[list[int]]:
    """Stratified folds: each class's examples shuffled with the seed and dealt round-robin."""
    by_label: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_label[label].append(index)
    rng = random.Random(seed + 2)
    dealt: list[list[int]] = [[] for _ in range(folds)]
    position = 0
    for label in sorted(by_label):
        members = by_label[label][:]
        rng.shuffle(members)
        for index in members:
            dealt[position % folds].append(index)
            position += 1
    return [sorted(fold) for fold in dealt]


def cross_validate(
    job: RunJob, spec: TrainingSpec, device: torch.device, reporter: Reporter, labels: list[int]
) -> CrossValidation | None:
    """None when a class has a single example (nothing to hold out)."""
    folds = min(MAX_FOLDS, min(Counter(labels).values()))
    if folds < 2:
        return None
    metric, maximize = spec.evaluation.best_metric, spec.maximize
    fold_spec = replace(
        spec,
        hyperparameters=replace(spec.hyperparameters, auto=AutoSettings()),
        evaluation=replace(
            spec.evaluation, early_stopping_patience=0, eval_every_steps=0, evaluate_before_training=False
        ),
    )
    quiet = Reporter(lambda event: None, reporter.worker, reporter.job, reporter.attempt, reporter.cancel_flag)
    histories: list[list[dict[str, float]]] = []
    prototypes: list[float] = []
    for number, held_out in enumerate(fold_indices(labels, folds, spec.hyperparameters.seed)):
        work = Path(job.work_dir) / f"fold-{number}"
        try:
            history, prototype = _run_fold(replace(job, work_dir=str(work)), fold_spec, device, quiet, held_out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        histories.append(history)
        curve = [row[metric] for row in history]
        if prototype is not None:
            prototypes.append(prototype)
        best = max(curve) if maximize else min(curve)
        reporter.log(f"k-fold {number + 1}/{folds}: best {metric} {best:.4f} at epoch {curve.index(best) + 1}")
    epochs = min(len(history) for history in histories)
    mean = [sum(history[e][metric] for history in histories) / len(histories) for e in range(epochs)]
    value = max(mean) if maximize else min(mean)
    chosen = mean.index(value)
    names = [name for name in histories[0][chosen] if name.startswith("eval_")]
    return CrossValidation(
        folds=folds,
        epochs=chosen + 1,
        metric=metric,
        value=value,
        metrics={name: sum(h[chosen][name] for h in histories) / len(histories) for name in names},
        prototype=sum(prototypes) / len(prototypes) if prototypes else None,
        curve=[(float(e + 1), v) for e, v in enumerate(mean)],
    )


def _run_fold(
    job: RunJob, spec: TrainingSpec, device: torch.device, quiet: Reporter, held_out: list[int]
) -> tuple[list[dict[str, float]], float | None]:
    """A fresh pretrained model trained on the other folds and evaluated on this one after every epoch."""
    transformers.set_seed(spec.hyperparameters.seed)
    task = registry.runtime(spec.task).prepare(job, lambda message: None)
    held = set(held_out)
    kept = [i for i in range(len(task.train_set)) if i not in held]
    task.validation_set = Subset(task.train_set, held_out)  # type: ignore[arg-type,assignment]
    task.train_labels = [task.train_labels[i] for i in kept]
    task.lengths = [task.lengths[i] for i in kept] if task.lengths is not None else None
    task.train_set = Subset(task.train_set, kept)  # type: ignore[arg-type,assignment]
    prototype = prototype_accuracy(task, device)
    parameters, unfreezer = adapt_model(task, spec, lambda message: None)
    trainer = Trainer(task, spec, device, quiet, Path(job.work_dir) / "checkpoints", parameters, unfreezer)
    trainer.keeps_state = False
    result = trainer.train()
    return [row for row in result.history if row["epoch"] >= 1], prototype
