"""The one shared training loop, for every modality: micro-batches with gradient accumulation, mixed precision,
clipping, the schedule, gradual unfreezing, periodic evaluation with early stopping and the best checkpoint, logging
and checkpoints. It sees only a PreparedTask, the parameters to train and the resolved spec.

It does not decode data, pick models or talk to the server: the task runtimes and the Reporter do that.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.amp.grad_scaler import GradScaler
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from tuneforge.workers.core.adaptation import GradualUnfreezer, TrainableParameter, frozen_backbone, summarize
from tuneforge.workers.core.checkpoint_state import CheckpointState, PlateauState
from tuneforge.workers.core.checkpoints import (
    latest_checkpoint,
    load_checkpoint,
    restore_best,
    restore_rng,
    save_best,
    save_checkpoint,
)
from tuneforge.workers.core.cpu_dropout import use_cpu_dropout
from tuneforge.workers.core.device import autocast, autocast_dtype, to_channels_last, wants_channels_last
from tuneforge.workers.core.distributed import (
    SINGLE,
    Ranks,
    ShardedBatches,
    WeightedRows,
    agree,
    all_reduce_step,
    counting_collate,
    share_object,
    share_weight,
)
from tuneforge.workers.core.errors import JobFailure, TrainingCancelled
from tuneforge.workers.core.evaluation import evaluate
from tuneforge.workers.core.faults import check_micro_batch, corrupt_loss
from tuneforge.workers.core.feature_cache import (
    FrozenBackboneModel,
    KeptFeatures,
    budget_bytes,
    collate_kept,
    keep_features,
    varies_per_epoch,
)
from tuneforge.workers.core.first_position import FirstPositionBlock, first_position_block
from tuneforge.workers.core.length_grouping import LengthGroupedBatchSampler
from tuneforge.workers.core.optimization import balanced_sampler, build_optimizer, classification_loss, plan_steps
from tuneforge.workers.core.prepared_task import Batch, PreparedTask
from tuneforge.workers.core.reporting import Reporter
from tuneforge.workers.core.schedules import PlateauScale, lr_multiplier
from tuneforge.workers.core.serving import save_serving_skeleton
from tuneforge.workers.messages import Severity
from tuneforge.workers.spec import ClassBalance, ScheduleKind, TrainingSpec


@dataclass
class TrainResult:
    """What a finished run learned about itself."""

    steps: int
    final_metrics: dict[str, float] = field(default_factory=dict)
    best_metrics: dict[str, float] = field(default_factory=dict)
    best_step: int | None = None
    best_details: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    train_history: list[dict[str, float]] = field(default_factory=list)
    """Training loss and learning rate at each report (the report's curves)."""
    baseline_metrics: dict[str, float] = field(default_factory=dict)
    """The untuned model on the validation set: what the tuning is measured against."""
    stopped_early: bool = False


@dataclass
class LogWindow:
    """Training statistics since the last report; the loss is summed on the device to avoid a sync per step."""

    loss_sum: torch.Tensor
    steps: int = 0
    samples: int = 0
    grad_norm: torch.Tensor | float = 0.0
    start: float = field(default_factory=time.perf_counter)

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.steps, self.samples, self.start = 0, 0, time.perf_counter()


class Trainer:
    """Trains a PreparedTask as the spec says, reporting as it goes."""

    def __init__(
        self,
        task: PreparedTask,
        spec: TrainingSpec,
        device: torch.device,
        reporter: Reporter,
        checkpoint_dir: Path,
        parameters: list[TrainableParameter],
        unfreezer: GradualUnfreezer | None = None,
        micro_batch_size: int = 0,
        deadline: float | None = None,
        ranks: Ranks = SINGLE,
    ):
        """`micro_batch_size` overrides the spec's split (after running out of memory); `deadline` (monotonic) is
        when max_runtime runs out; `ranks` places this trainer among a job's data-parallel ranks."""
        self.ranks = ranks
        self.task, self.spec, self.hp, self.device, self.reporter = task, spec, spec.hyperparameters, device, reporter
        self.checkpoint_dir = checkpoint_dir
        self.unfreezer = unfreezer
        self.plan = plan_steps(len(task.train_set), self.hp, micro_batch_size)
        self.deadline = deadline
        self.skipped_non_finite = 0
        self.keeps_state = True
        """False for throwaway runs (cross-validation folds): no checkpoints, no best weights on disk."""
        self.model = task.model.to(device)
        if device.type == "cpu":
            use_cpu_dropout(self.model)
        self.channels_last = wants_channels_last(self.model, device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.first_position = self._first_position_block()
        """The last block computing only the position the head reads, while training (see first_position)."""
        backbone = frozen_backbone(self.model, unfreezer)
        self.forward_model: nn.Module = self.model if backbone is None else FrozenBackboneModel(self.model, backbone)
        """What batches go through: the model, or the model with its frozen backbone held in eval mode (compiled
        when asked)."""
        if self.hp.compile:
            import torch._inductor.config as inductor

            inductor.fallback_random = True  # dropout draws as eager does: the same seed gives the same run
            self.forward_model = torch.compile(self.forward_model, dynamic=True)  # type: ignore[assignment]
        self.train_set: Any = task.train_set
        self.validation_set: Any = task.validation_set
        self.optimizer = build_optimizer(parameters, self.hp, device)
        self.plateau = (
            PlateauScale(self.hp.schedule.gamma or 0.5, self.hp.schedule.patience, self.spec.maximize)
            if self.hp.schedule.kind is ScheduleKind.REDUCE_ON_PLATEAU
            else None
        )
        multiplier = lr_multiplier(self.hp.schedule, self.plan.total_steps, self.plan.steps_per_epoch, self.plateau)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, multiplier)
        self.dtype = autocast_dtype(self.hp.precision, device)
        self.scaler = GradScaler("cuda") if self.dtype == torch.float16 else None  # fp16 needs loss scaling
        self.loss_fn = (
            classification_loss(self.hp, task.train_labels, len(task.labels), device)
            if task.compute_loss is None
            else None
        )
        self.eval_loss_fn = nn.CrossEntropyLoss()
        self.evaluations_without_improvement = 0
        self.result = TrainResult(steps=0)
        self.position: dict[str, Any] = {"step": 0, "epoch": 1, "step_in_epoch": 0}
        self.window: LogWindow | None = None
        """The open log window while training runs (a checkpoint keeps its unreported steps)."""
        self.pending_rng: dict[str, Any] | None = None

    def _first_position_block(self) -> FirstPositionBlock | None:
        """Installs the first-position last block when a few training examples show the same logits with it."""
        task = self.task
        if task.compute_loss is not None or task.evaluate is not None or not len(task.train_set):
            return None
        sample = task.collate([task.train_set[i] for i in range(min(4, len(task.train_set)))])
        sample.pop("labels", None)
        block = first_position_block(self.model, self.on_device(sample))
        if block is not None:
            self.reporter.log("the last block computes only the first position, the one the head reads")
        return block

    # ------------------------------------------------------------ data

    def on_device(self, batch: Batch) -> Batch:
        """A batch moved to the training device (channels-last images for convolutional nets on CUDA)."""
        moved = {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}
        return to_channels_last(moved) if self.channels_last else moved

    def loader(self, dataset: Any, train: bool, batch_size: int, seed: int) -> DataLoader[Any]:
        """Batches in a seeded order: grouped by length for the training set when lengths are known, class-balanced
        when asked, shuffled otherwise; in order for evaluation."""
        generator = torch.Generator().manual_seed(seed)
        balanced = train and self.hp.class_balance is ClassBalance.BALANCED_SAMPLING
        lengths = self.task.lengths
        grouped = train and not balanced and dataset is self.train_set
        collate = collate_kept if isinstance(dataset, KeptFeatures) else self.task.collate
        if train and self.ranks.distributed:  # the same global micro-batches as one rank, each rank taking its share
            batches: Any
            if grouped and lengths is not None:
                batches = LengthGroupedBatchSampler(lengths, batch_size, generator)
            else:
                order: Any = (
                    balanced_sampler(self.task.train_labels, generator)
                    if balanced
                    else RandomSampler(dataset, generator=generator)
                )
                batches = BatchSampler(order, batch_size, drop_last=False)
            return DataLoader(
                WeightedRows(dataset),
                batch_sampler=ShardedBatches(batches, self.ranks),
                collate_fn=counting_collate(collate),
                pin_memory=self.device.type == "cuda",
            )
        if grouped and lengths is not None:
            return DataLoader(
                dataset,
                batch_sampler=LengthGroupedBatchSampler(lengths, batch_size, generator),
                collate_fn=collate,
                pin_memory=self.device.type == "cuda",
            )
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train and not balanced,
            sampler=balanced_sampler(self.task.train_labels, generator) if balanced else None,
            collate_fn=collate,
            generator=generator,
            pin_memory=self.device.type == "cuda",
        )

    # ------------------------------------------------------------ evaluation, best checkpoint, early stopping

    def _evaluate(self, step: int, epoch: int) -> None:
        """With several ranks, rank 0 evaluates and every rank applies its metrics (plateau, early stopping), so
        their decisions cannot drift apart."""
        if not self.validation_set:
            return
        metrics, details = self._measure()
        self.reporter.evaluation(step, epoch, metrics)
        self.result.final_metrics = metrics
        self.result.history.append({"step": float(step), "epoch": float(epoch), **metrics})
        if self.plateau is not None and self.plateau.observe(metrics[self.spec.evaluation.best_metric]):
            self.reporter.log(
                f"{self.spec.evaluation.best_metric} stopped improving: learning rate x{self.plateau.gamma}"
            )
        if step > 0:
            self._track_best(step, metrics, details)

    def _measure(self) -> tuple[dict[str, float], dict[str, Any]]:
        """The model's metrics and details on the validation set (rank 0 measures; every rank gets the metrics)."""
        metrics: dict[str, float] = {}
        details: dict[str, Any] = {}
        if self.ranks.is_main:
            loader = self.loader(self.validation_set, False, self.plan.micro_batch_size * 2, 0)
            model, labels = self.forward_model, self.task.labels
            with autocast(self.device, self.dtype):
                if self.task.evaluate is not None:
                    evaluation = self.task.evaluate(model, loader, self.on_device)
                else:
                    evaluation = evaluate(model, loader, self.device, self.eval_loss_fn, labels, self.on_device)
            metrics, details = evaluation.metrics, evaluation.details
        if self.ranks.distributed:
            metrics = share_object(metrics)
        return metrics, details

    def _track_best(self, step: int, metrics: dict[str, float], details: dict[str, Any]) -> None:
        ev = self.spec.evaluation
        value, best = metrics[ev.best_metric], self.result.best_metrics.get(ev.best_metric)
        gain = math.inf if best is None else (value - best if self.spec.maximize else best - value)
        if gain > ev.early_stopping_min_delta:
            self.result.best_metrics, self.result.best_step, self.result.best_details = metrics, step, details
            self.evaluations_without_improvement = 0
            if self.keeps_state and self.ranks.is_main:
                save_best(self.model, self.checkpoint_dir, step, ev.best_metric, value)
        else:
            self.evaluations_without_improvement += 1

    def _should_stop_early(self) -> bool:
        patience = self.spec.evaluation.early_stopping_patience
        return bool(patience) and self.evaluations_without_improvement >= patience

    def _checkpoint(self, step: int, epoch: int, step_in_epoch: int, epoch_complete: bool) -> None:
        """Everything an exact resume needs: weights, optimizer, schedule, scaler, RNG, position, bookkeeping."""
        if not self.keeps_state or not self.ranks.is_main:
            return
        training = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else {},
        }
        plateau = self.plateau
        state = CheckpointState(
            step=step,
            epoch=epoch,
            step_in_epoch=step_in_epoch,
            epoch_complete=epoch_complete,
            final_metrics=self.result.final_metrics,
            best_metrics=self.result.best_metrics,
            best_step=self.result.best_step,
            best_details=self.result.best_details,
            history=self.result.history,
            train_history=self.result.train_history,
            baseline_metrics=self.result.baseline_metrics,
            without_improvement=self.evaluations_without_improvement,
            plateau=PlateauState(plateau.scale, plateau.best, plateau.bad_evaluations) if plateau else None,
            skipped_non_finite=self.skipped_non_finite,
            window_loss=float(self.window.loss_sum) if self.window else 0.0,
            window_steps=self.window.steps if self.window else 0,
            window_samples=self.window.samples if self.window else 0,
        )
        keep = self.spec.evaluation.keep_checkpoints
        began = time.perf_counter()
        path, size = save_checkpoint(self.checkpoint_dir, self.model, training, state, keep)
        save_serving_skeleton(self.checkpoint_dir, self.model, self.task.processor, self.spec)
        self.reporter.checkpoint(step, size, str(path), time.perf_counter() - began)

    def resume(self) -> int | None:
        """Continues from the newest checkpoint, if there is one; returns the step it resumes from."""
        path = latest_checkpoint(self.checkpoint_dir)
        if path is None:
            return None
        training, state = load_checkpoint(path, self.model)
        self.optimizer.load_state_dict(training["optimizer"])
        self.scheduler.load_state_dict(training["scheduler"])
        if self.scaler and training["scaler"]:
            self.scaler.load_state_dict(training["scaler"])
        self.result.steps = state.step
        self.result.final_metrics = state.final_metrics
        self.result.best_metrics = state.best_metrics
        self.result.best_step = state.best_step
        self.result.best_details = state.best_details
        self.result.history = state.history
        self.result.train_history = state.train_history
        self.result.baseline_metrics = state.baseline_metrics
        self.evaluations_without_improvement = state.without_improvement
        self.skipped_non_finite = state.skipped_non_finite
        if self.plateau is not None and state.plateau is not None:
            self.plateau.scale, self.plateau.best = state.plateau.scale, state.plateau.best
            self.plateau.bad_evaluations = state.plateau.bad_evaluations
        done = state.epoch_complete
        self.position = {
            "step": state.step,
            "epoch": state.epoch + 1 if done else state.epoch,
            "step_in_epoch": 0 if done else state.step_in_epoch,
            "window_loss": state.window_loss,
            "window_steps": state.window_steps,
            "window_samples": state.window_samples,
        }
        self.pending_rng = training["rng"]  # restored after the consumed batches are skipped
        return state.step

    # ------------------------------------------------------------ frozen backbone: its output once, not every epoch

    def _keep_frozen_features(self) -> None:
        """With a frozen backbone and inputs that stay the same every epoch, computes the backbone's output once
        for the training and validation sets; the epochs then run only the head (see feature_cache)."""
        model = self.forward_model
        if not isinstance(model, FrozenBackboneModel) or self.task.compute_loss or self.task.evaluate:
            return
        budget = budget_bytes()
        if budget <= 0:
            return
        if varies_per_epoch(self.task.train_set):
            self.reporter.log("the frozen backbone's output is recomputed every step (augmentation or random crops)")
            return
        started = time.perf_counter()
        size = self.plan.micro_batch_size * 2
        with autocast(self.device, self.dtype):
            kept = keep_features(model, self.task.train_set, self.task.collate, self.on_device, size, budget)
            if kept is None or varies_per_epoch(self.task.train_set):  # random crops show up while decoding
                self.reporter.log("the frozen backbone's output is recomputed every step (it does not fit or varies)")
                return
            left = budget - kept.nbytes
            validation = keep_features(model, self.task.validation_set, self.task.collate, self.on_device, size, left)
        self.train_set = kept
        self.validation_set = validation or self.task.validation_set
        kept_bytes = kept.nbytes + (validation.nbytes if validation else 0)
        self.reporter.log(
            f"the backbone is frozen and its inputs do not change: kept its output ({', '.join(kept.fields)}: what "
            f"the head reads) for {len(kept)} training and {len(validation) if validation else 0} validation examples "
            f"({kept_bytes / 2**20:.1f} MiB, "
            f"{time.perf_counter() - started:.1f} s); training runs only the head"
        )

    # ------------------------------------------------------------ one step

    def _optimizer_step(self, step: int, group: list[Batch], window: LogWindow) -> None:
        """Forward and backward over one step's micro-batches, then clip, step and advance the schedule."""
        step_loss = torch.zeros((), device=self.device)
        samples = 0
        for batch in group:
            rows, weight = share_weight(batch, len(group)) if self.ranks.distributed else (0, 1 / len(group))
            samples += rows if self.ranks.distributed else batch["labels"].shape[0]
            loss = self.loss_on(batch) * weight
            scaled: torch.Tensor = self.scaler.scale(loss) if self.scaler else loss
            scaled.backward()  # type: ignore[no-untyped-call]
            step_loss += loss.detach()
        if self.ranks.distributed:  # every rank now holds the gradient of the step's loss over all its rows
            trainable = [p for p in self.model.parameters() if p.requires_grad]
            samples, mean_loss = all_reduce_step(trainable, samples, step_loss)
            step_loss = torch.tensor(mean_loss, device=self.device)
        step_loss = corrupt_loss(step + 1, step_loss)
        if self.hp.max_skipped_non_finite_steps and not torch.isfinite(step_loss).item():  # a sync, only when asked
            self._skip_non_finite(step, float(step_loss))
            return
        window.loss_sum += step_loss
        window.samples += samples
        window.steps += 1
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.hp.max_grad_norm > 0:
            window.grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.hp.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _skip_non_finite(self, step: int, loss: float) -> None:
        """Drops the step's gradients (no update; the schedule still advances, so the plan holds)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.skipped_non_finite += 1
        allowed = self.hp.max_skipped_non_finite_steps
        if self.skipped_non_finite > allowed:
            raise JobFailure(
                "NON_FINITE_LOSS",
                f"the training loss was {loss} at step {step + 1}, after {allowed} skipped steps; lower the learning "
                "rate or enable clipping",
            )
        self.reporter.log(
            f"step {step + 1}: the loss was {loss}; skipped without an update ({self.skipped_non_finite} of {allowed})",
            Severity.WARNING,
        )

    def _stop_if_asked(self, step: int, epoch: int, in_epoch: int) -> None:
        """Between optimizer steps: a cancel stops at once; a pause or shutdown first saves a checkpoint; so does
        running out of max_runtime, which then fails the job. With several ranks, rank 0's view decides for all."""
        reporter = self.reporter
        flags = [
            self.deadline is not None and time.monotonic() >= self.deadline,
            reporter.stop_requested,
            reporter.checkpoint_flag.is_set(),
        ]
        out_of_time, stop, pause = agree(flags) if self.ranks.distributed else flags
        if out_of_time:
            if step > 0:
                self._checkpoint(step, epoch, in_epoch, epoch_complete=False)
            raise JobFailure(
                "DEADLINE_EXCEEDED",
                f"max_runtime ran out at step {step} of {self.plan.total_steps}; a checkpoint was saved",
            )
        if not stop:
            return
        if pause and step > 0:
            self._checkpoint(step, epoch, in_epoch, epoch_complete=False)
            reporter.log(f"stopping: checkpointed at step {step} to resume from")
        raise TrainingCancelled()

    def loss_on(self, batch: Batch) -> torch.Tensor:
        """The training loss of one micro-batch (moved to the device, under autocast), ready for backward."""
        batch = self.on_device(batch)
        check_micro_batch(batch["labels"].shape[0])
        with autocast(self.device, self.dtype):
            return self._loss(batch)

    def _loss(self, batch: Batch) -> torch.Tensor:
        if self.task.compute_loss is not None:
            return self.task.compute_loss(self.forward_model, batch)
        assert self.loss_fn is not None
        labels = batch.pop("labels")
        loss: torch.Tensor = self.loss_fn(self.forward_model(**batch).logits, labels)
        return loss

    def _report(self, step: int, epoch: int, window: LogWindow) -> None:
        """Training metrics for the steps since the last report (the only host sync in the loop)."""
        if not window.steps:  # every step since the last report was skipped
            return
        mean_loss = (window.loss_sum / window.steps).item()
        if not math.isfinite(mean_loss):
            raise JobFailure(
                "NON_FINITE_LOSS",
                f"the training loss became {mean_loss} at step {step}; lower the learning rate or enable clipping",
            )
        elapsed = time.perf_counter() - window.start
        learning_rate = float(self.scheduler.get_last_lr()[0])
        self.result.train_history.append(
            {"step": float(step), "epoch": float(epoch), "loss": mean_loss, "learning_rate": learning_rate}
        )
        self.reporter.progress(
            step=step,
            total_steps=self.plan.total_steps,
            epoch=epoch,
            loss=mean_loss,
            learning_rate=learning_rate,
            samples_per_second=window.samples / max(elapsed, 1e-9),
            grad_norm=float(window.grad_norm),
            window_steps=window.steps,
            window_samples=window.samples,
            window_seconds=elapsed,
        )
        window.reset()

    def _start_epoch(self, epoch: int) -> None:
        if self.unfreezer is None:
            return
        blocks = self.unfreezer.apply(epoch)
        self.reporter.log(f"epoch {epoch}: {blocks} top blocks unfrozen; {summarize(self.model).describe()}")

    # ------------------------------------------------------------ the loop

    def _micro_batches(self, epoch: int, skip_steps: int) -> Any:
        """The epoch's micro-batches in their seeded order, past the first `skip_steps` optimizer steps (resume)."""
        loader = self.loader(self.train_set, True, self.plan.micro_batch_size, self.hp.seed * 1000 + epoch)
        micro_batches = iter(loader)
        for _ in range(skip_steps * self.plan.accumulation):
            next(micro_batches, None)
        if self.pending_rng is not None:  # after skipping, so the next draws are the ones the lost run made
            restore_rng(self.pending_rng)
            self.pending_rng = None
        return micro_batches

    def _before_training(self, step: int) -> None:
        """Keeps a frozen backbone's output, and at step 0 measures the untuned model (reported when asked for,
        kept in any case as the baseline the report compares with)."""
        self._keep_frozen_features()
        if step > 0 or not self.validation_set:
            return
        if self.spec.evaluation.evaluate_before_training:
            self._evaluate(0, 0)
        self.result.baseline_metrics = self.result.final_metrics or self._measure()[0]

    def train(self) -> TrainResult:
        """Trains (see _train); the model's last block is whole again afterwards, for saving and exporting."""
        try:
            return self._train()
        finally:
            if self.first_position is not None:
                self.first_position.remove()

    def _train(self) -> TrainResult:
        """The loop, top to bottom. After `resume()` it continues exactly where the checkpoint left off."""
        plan, ev = self.plan, self.spec.evaluation
        self.reporter.started(plan.total_steps, plan.epochs)
        self.reporter.log(
            f"training: {plan.total_steps} steps over {plan.epochs} epochs, micro-batches of {plan.micro_batch_size} "
            f"x {plan.accumulation} accumulation on {self.device}"
        )
        step, first_epoch, skip = self.position["step"], self.position["epoch"], self.position["step_in_epoch"]
        self._before_training(step)
        self.forward_model.train()
        # A window a checkpoint interrupted carries on, so the report after a resume averages the same steps.
        window = LogWindow(torch.full((), float(self.position.get("window_loss", 0.0)), device=self.device))
        window.steps = int(self.position.get("window_steps", 0))
        window.samples = int(self.position.get("window_samples", 0))
        self.window = window
        for epoch in range(first_epoch, plan.epochs + 1):
            self._start_epoch(epoch)
            # --- a new data order each epoch, fixed by the seed
            micro_batches = self._micro_batches(epoch, skip if epoch == first_epoch else 0)
            in_epoch = skip if epoch == first_epoch else 0
            while step < plan.total_steps:
                self._stop_if_asked(step, epoch, in_epoch)
                group = [b for _, b in zip(range(plan.accumulation), micro_batches, strict=False)]
                if not group:
                    break  # epoch done
                self._optimizer_step(step, group, window)
                step, in_epoch = step + 1, in_epoch + 1
                self.result.steps = step
                # --- report, evaluate, checkpoint on their cadences
                if step % ev.log_every_steps == 0 or step == plan.total_steps:
                    self._report(step, epoch, window)
                if ev.eval_every_steps and step % ev.eval_every_steps == 0:
                    self._evaluate(step, epoch)
                if ev.checkpoint_every_steps and step % ev.checkpoint_every_steps == 0:
                    self._checkpoint(step, epoch, in_epoch, epoch_complete=False)
                if self._should_stop_early():
                    break
            # --- epoch end: evaluate and checkpoint (unless just done at this step)
            if not (ev.eval_every_steps and step % ev.eval_every_steps == 0):
                self._evaluate(step, epoch)
            if not (ev.checkpoint_every_steps and step % ev.checkpoint_every_steps == 0):
                self._checkpoint(step, epoch, in_epoch, epoch_complete=True)
            if self._should_stop_early():
                self.result.stopped_early = True
                self.reporter.log(
                    f"early stop at step {step}: {ev.best_metric} did not improve for {ev.early_stopping_patience} "
                    f"evaluations (best {self.result.best_metrics.get(ev.best_metric)} at step {self.result.best_step})"
                )
                break
        return self.result

    def restore_best(self) -> int | None:
        """Puts the best checkpoint's weights back (the artifact holds the best model, not the last)."""
        return restore_best(self.model, self.checkpoint_dir)
