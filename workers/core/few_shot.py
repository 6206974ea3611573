"""Few-shot mode at run time: the prototype baseline on the validation data or, with none left, k-fold
cross-validation over the shots to choose the epochs and measure both. A resumed attempt reuses the folds' result."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import transformers

from tuneforge.workers.core.checkpoints import write_json_atomically
from tuneforge.workers.core.cross_validation import CrossValidation, cross_validate
from tuneforge.workers.core.prepared_task import PreparedTask
from tuneforge.workers.core.prototypes import prototype_accuracy
from tuneforge.workers.core.reporting import Reporter
from tuneforge.workers.messages import RunJob, Severity
from tuneforge.workers.spec import TrainingSpec

CROSS_VALIDATION_FILE = "cross_validation.json"


def prepare_few_shot(
    job: RunJob, spec: TrainingSpec, device: torch.device, reporter: Reporter, task: PreparedTask
) -> tuple[TrainingSpec, dict[str, float]]:
    """The prototype baseline on the validation data; with none, k-fold cross-validation over the shots chooses
    the epochs and measures both. Returns the spec to train with and the figures to report."""
    reporter.log(
        f"few-shot: training on {len(task.train_set)} examples ({spec.data.shots_per_class} per class at most)"
    )
    if task.validation_set:
        accuracy = prototype_accuracy(task, device)
        assert accuracy is not None
        reporter.log(
            f"few-shot baseline: the nearest class mean of the pretrained embeddings scores accuracy {accuracy:.4f} "
            f"on {len(task.validation_set)} validation examples"
        )
        return spec, {"prototype_accuracy": accuracy}
    saved = Path(job.checkpoint_dir) / CROSS_VALIDATION_FILE
    cv = CrossValidation(**json.loads(saved.read_text())) if saved.exists() else None
    if cv is None:
        cv = cross_validate(job, spec, device, reporter, task.train_labels)
        if cv is None:
            reporter.log("few-shot: a class has a single example, so nothing can be held out", Severity.WARNING)
            return spec, {}
        write_json_atomically(saved, dataclasses.asdict(cv))
        reason = (
            f"{cv.folds}-fold cross-validation over the shots: mean {cv.metric} {cv.value:.4f} after {cv.epochs} epochs"
        )
        reporter.auto_chosen("hyperparameters.epochs", float(cv.epochs), reason, cv.curve)
        transformers.set_seed(spec.hyperparameters.seed)  # the folds drew from the generators
    reporter.log(
        f"few-shot: no data left to validate on; {cv.folds}-fold cross-validation chose {cv.epochs} epochs "
        f"({cv.metric} {cv.value:.4f}, prototype baseline {cv.prototype if cv.prototype is not None else 'n/a'})"
    )
    hp = dataclasses.replace(spec.hyperparameters, epochs=cv.epochs)
    spec = dataclasses.replace(
        spec, hyperparameters=hp, evaluation=dataclasses.replace(spec.evaluation, early_stopping_patience=0)
    )
    figures = {f"cross_validated_{name}": value for name, value in cv.metrics.items()}
    if cv.prototype is not None:
        figures["prototype_accuracy"] = cv.prototype
    return spec, figures
