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

from workers.core.adaptation import apply_adaptation, replace_head
from workers.core.adapters import adapter_for
from workers.core.artifact import write_artifact
from workers.core.errors import JobFailure, TrainingCancelled
from workers.core.reporting import Reporter
from workers.core.trainer import Trainer
from workers.messages import JobFinished, Outcome, RunJob, Severity, WorkerEvent


def run_job(
    job: RunJob, worker: str, device: torch.device, send: Callable[[WorkerEvent], None], cancel: threading.Event
) -> JobFinished:
    """Trains one attempt; never raises for a job-level problem."""
    reporter = Reporter(send, worker, job.job, job.attempt, cancel)

    def finished(outcome: Outcome, reason: str = "", message: str = "") -> JobFinished:
        return JobFinished(worker, job.job, job.attempt, outcome=outcome, reason=reason, message=message)

    try:
        _train_and_save(job, device, reporter)
    except TrainingCancelled:
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
    reporter.log(f"adaptation {spec.adaptation.method.value}: {summary.describe()}")
    trainer = Trainer(task, spec, device, reporter, work_dir / "checkpoints")
    result = trainer.train()
    reporter.check_cancelled()
    metrics = {
        "final": result.final_metrics,
        "best": result.best_metrics,
        "history": result.history,
        "steps": result.steps,
        "labels": task.labels,
    }
    size, sha256 = write_artifact(trainer.model.cpu(), task.processor, spec, metrics, work_dir, Path(job.artifact_path))
    reporter.artifact(size, sha256, result.final_metrics)
    reporter.log(f"artifact written: {size} bytes, sha256 {sha256[:12]}")
