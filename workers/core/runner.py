"""Runs one job attempt end to end: seed, prepare the task, adapt, train, write the artifact.

Every way an attempt can end becomes one JobFinished event: succeeded, cancelled, or failed with a reason.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from workers.core.adaptation import (
    GradualUnfreezer,
    apply_adaptation,
    plan_parameters,
    replace_head,
    summarize,
)
from workers.core.adapters import adapter_for
from workers.core.artifact import write_artifact
from workers.core.errors import JobFailure, TrainingCancelled
from workers.core.lora import apply_lora
from workers.core.reporting import Reporter
from workers.core.trainer import Trainer
from workers.messages import JobFinished, Outcome, RunJob, Severity, WorkerEvent
from workers.spec import AdaptationMethod


def run_job(
    job: RunJob,
    worker: str,
    device: torch.device,
    send: Callable[[WorkerEvent], None],
    cancel: threading.Event,
    checkpoint_first: threading.Event | None = None,
) -> JobFinished:
    """Trains one attempt; never raises for a job-level problem. With `checkpoint_first` set before `cancel` (a
    pause or a shutdown), the attempt checkpoints before it stops and ends PAUSED, so the next one resumes there."""
    pausing = checkpoint_first or threading.Event()
    reporter = Reporter(send, worker, job.job, job.attempt, cancel, pausing)

    def finished(outcome: Outcome, reason: str = "", message: str = "") -> JobFinished:
        return JobFinished(worker, job.job, job.attempt, outcome=outcome, reason=reason, message=message)

    try:
        _train_and_save(job, device, reporter)
    except TrainingCancelled:
        if pausing.is_set():
            reporter.log("stopped at the server's request; the next attempt resumes here", Severity.WARNING)
            return finished(Outcome.PAUSED)
        reporter.log("cancelled at the server's request", Severity.WARNING)
        return finished(Outcome.CANCELLED)
    except JobFailure as failure:
        reporter.log(f"{failure.reason}: {failure.message}", Severity.ERROR)
        return finished(Outcome.FAILED, failure.reason, failure.message)
    except torch.OutOfMemoryError as exc:
        return finished(
            Outcome.FAILED, "OUT_OF_MEMORY", f"out of memory ({exc}); lower batch_size or max_sequence_length"
        )
    finally:
        shutil.rmtree(Path(job.work_dir) / "artifact", ignore_errors=True)
    return finished(Outcome.SUCCEEDED)


def _train_and_save(job: RunJob, device: torch.device, reporter: Reporter) -> None:
    spec = job.spec
    work_dir = Path(job.work_dir)
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    transformers.utils.logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # the job log reports what matters
    transformers.set_seed(spec.hyperparameters.seed)  # before loading: the new head's init depends on it
    reporter.log(f"preparing {spec.task.value} on {device} from {spec.base_model}")
    task = adapter_for(spec.task).prepare(job, reporter.log)
    reporter.check_cancelled()
    if spec.head is not None:
        replaced = replace_head(task.model, len(task.labels), spec.head)
        reporter.log(f"replaced {replaced} with a head of hidden sizes {list(spec.head.hidden_sizes)}")
    summary = apply_adaptation(task.model, spec.adaptation)
    unfreezer = None
    if spec.adaptation.method is AdaptationMethod.GRADUAL_UNFREEZING:
        unfreezer = GradualUnfreezer(task.model, spec.adaptation.unfreeze_every_epochs)
    if spec.adaptation.method is AdaptationMethod.LORA and spec.adaptation.lora is not None:
        task.model = apply_lora(task.model, spec.adaptation.lora)
        summary = summarize(task.model)
    reporter.log(f"adaptation {spec.adaptation.method.value}: {summary.describe()}")
    parameters = plan_parameters(task.model, spec.hyperparameters.layer_decay != 1.0, unfreezer)
    trainer = Trainer(task, spec, device, reporter, Path(job.checkpoint_dir), parameters, unfreezer)
    resumed_from = trainer.resume()
    if resumed_from is not None:
        reporter.log(f"resumed from the checkpoint at step {resumed_from} (attempt {job.attempt})", Severity.WARNING)
    result = trainer.train()
    reporter.check_cancelled()
    best_step = trainer.restore_best()
    if best_step is not None and best_step != result.steps:
        reporter.log(f"the artifact holds the best model, from step {best_step} ({spec.evaluation.best_metric})")
    metrics = {
        "final": result.final_metrics,
        "best": result.best_metrics,
        "best_step": best_step,
        "stopped_early": result.stopped_early,
        "classes": result.best_details,
        "history": result.history,
        "steps": result.steps,
        "labels": task.labels,
    }
    saved_metrics = result.best_metrics or result.final_metrics
    size, sha256 = write_artifact(trainer.model.cpu(), task.processor, spec, metrics, work_dir, Path(job.artifact_path))
    reporter.artifact(size, sha256, saved_metrics)
    reporter.log(f"artifact written: {size} bytes, sha256 {sha256[:12]}")
