"""Runs one job attempt end to end: seed, prepare the task, adapt, train, write the artifact.

Every way an attempt can end becomes one JobFinished event: succeeded, cancelled, or failed with a reason.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers

from tuneforge.workers.core.artifact import spec_to_json, write_artifact
from tuneforge.workers.core.auto_tuning import apply_choices, choose_all, chosen_micro_batch, load_choices, save_choices
from tuneforge.workers.core.checkpoints import write_json_atomically
from tuneforge.workers.core.distributed import SINGLE, Ranks, join, leave, rank_device, share_object
from tuneforge.workers.core.errors import JobFailure, TrainingCancelled
from tuneforge.workers.core.export import ExportFormat, export_or_record
from tuneforge.workers.core.faults import check_job_start
from tuneforge.workers.core.few_shot import prepare_few_shot
from tuneforge.workers.core.lineage import write_manifest
from tuneforge.workers.core.model_cache import CACHE
from tuneforge.workers.core.model_setup import adapt_model
from tuneforge.workers.core.optimization import plan_steps
from tuneforge.workers.core.rank_group import RankGroup
from tuneforge.workers.core.report import write_report
from tuneforge.workers.core.reporting import Reporter
from tuneforge.workers.core.trainer import Trainer, TrainResult
from tuneforge.workers.messages import JobFinished, Outcome, RunJob, Severity, WorkerEvent
from tuneforge.workers.spec import TrainingSpec
from tuneforge.workers.tasks import registry


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

    deadline = time.monotonic() + job.time_limit_s if job.time_limit_s > 0 else None
    ranks: RankGroup | None = None
    succeeded = False
    try:
        check_job_start(job.training_data.filename)
        if job.spec.ranks > 1:
            ranks = _start_ranks(job, device, reporter)
            _train_and_save(job, rank_device(device, 0), reporter, 0, deadline, ranks.ranks)
        else:
            _train_within_memory(job, device, reporter, deadline)
        succeeded = True
    except TrainingCancelled:
        if pausing.is_set():
            reporter.log("stopped at the server's request; the next attempt resumes here", Severity.WARNING)
            return finished(Outcome.PAUSED)
        reporter.log("cancelled at the server's request", Severity.WARNING)
        return finished(Outcome.CANCELLED)
    except JobFailure as failure:
        reporter.log(f"{failure.reason}: {failure.message}", Severity.ERROR)
        return finished(Outcome.FAILED, failure.reason, failure.message)
    except Exception as exc:
        if ranks is not None and ranks.lost_a_helper():
            ranks.report_loss()  # exits the worker: the job resumes from its checkpoint
        if not is_disk_full(exc):
            raise
        message = f"the server's disk is full ({exc}); free space on the server or keep fewer checkpoints"
        reporter.log(message, Severity.ERROR)
        return finished(Outcome.FAILED, "DISK_FULL", message)
    finally:
        if ranks is not None:
            leave()
            ranks.close(finished=succeeded)
            torch.set_num_threads(ranks.threads_before)
        shutil.rmtree(Path(job.work_dir) / "artifact", ignore_errors=True)
    return finished(Outcome.SUCCEEDED)


def _start_ranks(job: RunJob, device: torch.device, reporter: Reporter) -> RankGroup:
    """Spawns the helper ranks and joins their process group as rank 0. On the CPU the ranks share the worker's
    threads. A helper that dies ends this worker: the server resumes the job from its checkpoint."""
    world = job.spec.ranks
    threads_before = torch.get_num_threads()
    threads = max(1, threads_before // world) if device.type == "cpu" else threads_before

    def helper_died(message: str) -> None:
        reporter.log(f"{message}: the attempt is lost; the job resumes from its checkpoint", Severity.ERROR)
        os._exit(75)  # rank 0 may be blocked in a collective that will never complete

    group = RankGroup(job, str(device), world, threads, helper_died, threads_before)
    torch.set_num_threads(threads)
    backend = "NCCL" if device.type == "cuda" else "gloo"
    reporter.log(f"data-parallel over {world} ranks ({backend}); each takes its share of every micro-batch")
    if device.type == "cuda":
        torch.cuda.set_device(rank_device(device, 0))
    join(group.ranks, rank_device(device, 0))
    return group


MEMORY_PLAN = "memory.json"


def _train_within_memory(job: RunJob, device: torch.device, reporter: Reporter, deadline: float | None) -> None:
    """Out of memory: halve the micro-batch and double the accumulation (the effective batch stays), then resume
    from the newest checkpoint; below a micro-batch of 1 the job fails. The smaller micro-batch is remembered in
    the job's checkpoint folder, so later attempts keep it."""
    plan_file = Path(job.checkpoint_dir) / MEMORY_PLAN
    micro = json.loads(plan_file.read_text())["micro_batch_size"] if plan_file.exists() else 0
    while True:
        try:
            _train_and_save(job, device, reporter, micro, deadline, SINGLE)
            return
        except torch.OutOfMemoryError as exc:
            message = str(exc).splitlines()[0] if str(exc) else "out of memory"
        gc.collect()  # outside the except block: the traceback's frames held the step's tensors
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        chosen = chosen_micro_batch(load_choices(Path(job.checkpoint_dir)) or [])
        current = micro or chosen or plan_steps(1, job.spec.hyperparameters).micro_batch_size
        if current <= 1:
            raise JobFailure(
                "OUT_OF_MEMORY",
                f"out of memory even with a micro-batch of 1 ({message}); use a smaller model, max_sequence_length "
                "or clip_seconds, or LoRA",
            )
        micro = current // 2
        write_json_atomically(plan_file, {"micro_batch_size": micro})
        accumulation = plan_steps(1, job.spec.hyperparameters, micro).accumulation
        reporter.log(
            f"out of memory with a micro-batch of {current} ({message}): retrying with micro-batches of {micro} "
            f"and {accumulation} accumulation steps (effective batch {job.spec.hyperparameters.batch_size} "
            "unchanged), from the newest checkpoint",
            Severity.WARNING,
        )


def _train_and_save(
    job: RunJob, device: torch.device, reporter: Reporter, micro_batch_size: int, deadline: float | None, ranks: Ranks
) -> None:
    trainer, result, spec, extra_metrics = train_rank(job, device, reporter, ranks, micro_batch_size, deadline)
    task = trainer.task
    best_step = trainer.restore_best()
    if best_step is not None and best_step != result.steps:
        reporter.log(f"the artifact holds the best model, from step {best_step} ({spec.evaluation.best_metric})")
    metrics: dict[str, Any] = {
        "final": result.final_metrics,
        "best": result.best_metrics,
        "best_step": best_step,
        "stopped_early": result.stopped_early,
        "classes": result.best_details,
        "history": result.history,
        "train_history": result.train_history,
        "baseline": {**result.baseline_metrics, **extra_metrics},
        "steps": result.steps,
        "labels": task.labels,
    }
    metrics.update(extra_metrics)
    saved_metrics = {**(result.best_metrics or result.final_metrics), **extra_metrics}  # baseline beside the result
    work_dir = Path(job.work_dir)
    choices = load_choices(Path(job.checkpoint_dir)) or []

    def finish(folder: Path) -> None:
        for format in spec.export_formats:
            export_or_record(folder, ExportFormat(format), spec.onnx_opset, reporter)
        write_report(folder, f"jobs/{job.job}", spec_to_json(spec), metrics)
        write_manifest(folder, spec, choices, job.training_data, job.validation_data, job.job, job.attempt)

    model = trainer.model.cpu()
    size, sha256 = write_artifact(model, task.processor, spec, metrics, work_dir, Path(job.artifact_path), finish)
    reporter.artifact(size, sha256, saved_metrics)
    reporter.log(f"artifact written: {size} bytes, sha256 {sha256[:12]}")


def train_rank(
    job: RunJob,
    device: torch.device,
    reporter: Reporter,
    ranks: Ranks,
    micro_batch_size: int = 0,
    deadline: float | None = None,
) -> tuple[Trainer, TrainResult, TrainingSpec, dict[str, float]]:
    """Prepares the task, makes the automatic choices (rank 0 probes, every rank uses its answer), resumes and
    trains. Every rank of a data-parallel job runs this in step."""
    spec = job.spec
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    transformers.utils.logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # the job log reports what matters
    transformers.set_seed(spec.hyperparameters.seed)  # before loading: the new head's init depends on it
    reporter.log(f"preparing {spec.task} on {device} from {spec.base_model}")
    hits = CACHE.model_hits
    task = registry.runtime(spec.task).prepare(job, reporter.log)
    if CACHE.model_hits > hits:
        reporter.log(f"warm start: {spec.base_model} was still in this worker's memory")
    reporter.check_cancelled()
    extra_metrics: dict[str, float] = {}
    if spec.data.shots_per_class:
        spec, extra_metrics = prepare_few_shot(job, spec, device, reporter, task)
    parameters, unfreezer = adapt_model(task, spec, reporter.log)
    checkpoint_dir = Path(job.checkpoint_dir)
    choices = load_choices(checkpoint_dir)
    if choices is None and spec.hyperparameters.auto.any and ranks.is_main:
        prober = Trainer(
            task, spec, device, reporter, checkpoint_dir, parameters, unfreezer, micro_batch_size, deadline
        )
        choices = choose_all(prober, parameters)
        for choice in choices:
            reporter.auto_chosen(choice.field, choice.value, choice.reason, choice.evidence)
            reporter.log(f"chose {choice.field}: {choice.reason}")
        save_choices(checkpoint_dir, choices)
        transformers.set_seed(spec.hyperparameters.seed)  # training then draws as it would have without the probes
    elif choices:
        reporter.log("using the automatic choices of an earlier attempt")
    if ranks.distributed:
        choices = share_object(choices)
    if choices:
        spec = apply_choices(spec, choices, bool(task.validation_set))
        micro_batch_size = micro_batch_size or chosen_micro_batch(choices)
    trainer = Trainer(
        task, spec, device, reporter, checkpoint_dir, parameters, unfreezer, micro_batch_size, deadline, ranks
    )
    resumed_from = trainer.resume()
    if resumed_from is not None:
        reporter.log(f"resumed from the checkpoint at step {resumed_from} (attempt {job.attempt})", Severity.WARNING)
    result = trainer.train()
    reporter.check_cancelled()
    return trainer, result, spec, extra_metrics


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC anywhere in the chain; libraries that wrap it (safetensors, torch.save) keep only its text."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen) or "Disk quota exceeded" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
