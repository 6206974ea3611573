"""The one shared training loop, for every modality: micro-batches with gradient accumulation, clipping, the
schedule, periodic evaluation, logging and checkpoints. It sees only a PreparedTask and the resolved spec.

It does not decode data, pick models or talk to the server: adapters and the Reporter do that.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from torch import nn
from torch.utils.data import DataLoader

from workers.core.adapters import Batch, PreparedTask
from workers.core.device import autocast
from workers.core.errors import JobFailure
from workers.core.evaluation import classification_metrics
from workers.core.reporting import Reporter
from workers.core.schedules import lr_multiplier
from workers.spec import Hyperparameters, OptimizerKind, TrainingSpec

NO_DECAY_MARKERS = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


@dataclass
class TrainResult:
    """What a finished run learned about itself."""

    steps: int
    final_metrics: dict[str, float] = field(default_factory=dict)
    best_metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)


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


@dataclass(frozen=True)
class StepPlan:
    """How the data divides into micro-batches and optimizer steps."""

    micro_batch_size: int
    accumulation: int
    steps_per_epoch: int
    total_steps: int
    epochs: int


def plan_steps(num_examples: int, hp: Hyperparameters) -> StepPlan:
    """Optimizer steps per epoch and in total (max_steps caps the total)."""
    micro = max(1, hp.batch_size // hp.gradient_accumulation_steps)
    micro_batches = math.ceil(num_examples / micro)
    steps_per_epoch = math.ceil(micro_batches / hp.gradient_accumulation_steps)
    total = steps_per_epoch * hp.epochs
    if hp.max_steps:
        total = min(total, hp.max_steps)
    epochs = math.ceil(total / steps_per_epoch) if steps_per_epoch else 0
    return StepPlan(micro, hp.gradient_accumulation_steps, steps_per_epoch, total, epochs)


def build_optimizer(model: nn.Module, hp: Hyperparameters, device: torch.device) -> torch.optim.Optimizer:
    """AdamW or SGD over the trainable parameters; no weight decay on biases and norm weights."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if name.endswith(NO_DECAY_MARKERS) else decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": hp.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if hp.optimizer is OptimizerKind.SGD:
        return torch.optim.SGD(groups, lr=hp.learning_rate, momentum=hp.momentum)
    return torch.optim.AdamW(groups, lr=hp.learning_rate, fused=device.type == "cuda")


def evaluate(model: nn.Module, loader: DataLoader[Any], device: torch.device) -> dict[str, float]:
    """Loss, accuracy and macro-F1 over the whole validation set."""
    model.eval()
    total_loss, count = 0.0, 0
    predictions, labels = [], []
    with torch.inference_mode(), autocast(device):
        for batch in loader:
            batch = _to_device(batch, device)
            output = model(**batch)
            size = batch["labels"].shape[0]
            total_loss += output.loss.float().item() * size
            count += size
            predictions.append(output.logits.argmax(dim=-1).cpu())
            labels.append(batch["labels"].cpu())
    model.train()
    metrics = classification_metrics(torch.cat(predictions), torch.cat(labels))
    return {"eval_loss": total_loss / max(1, count), **{f"eval_{k}": v for k, v in metrics.items()}}


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def save_checkpoint(model: nn.Module, directory: Path, step: int, epoch: int) -> tuple[Path, int]:
    """Writes the weights (safetensors) and the position atomically; keeps only the newest checkpoint."""
    final = directory / f"step-{step:06d}"
    temporary = directory / f".step-{step:06d}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    save_model(model, str(temporary / "model.safetensors"))
    (temporary / "trainer_state.json").write_text(json.dumps({"step": step, "epoch": epoch}))
    shutil.rmtree(final, ignore_errors=True)
    temporary.rename(final)
    for older in directory.glob("step-*"):
        if older != final:
            shutil.rmtree(older, ignore_errors=True)
    return final, sum(f.stat().st_size for f in final.iterdir())


class Trainer:
    """Trains a PreparedTask as the spec says, reporting as it goes."""

    def __init__(
        self, task: PreparedTask, spec: TrainingSpec, device: torch.device, reporter: Reporter, checkpoint_dir: Path
    ):
        self.task = task
        self.spec = spec
        self.hp = spec.hyperparameters
        self.device = device
        self.reporter = reporter
        self.checkpoint_dir = checkpoint_dir
        self.plan = plan_steps(len(task.train_set), self.hp)
        self.model = task.model.to(device)
        self.optimizer = build_optimizer(self.model, self.hp, device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_multiplier(self.hp.schedule, self.plan.total_steps, self.plan.steps_per_epoch)
        )
        self.result = TrainResult(steps=0)

    def _loader(self, dataset: Any, shuffle: bool, batch_size: int, seed: int) -> DataLoader[Any]:
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=self.task.collate,
            generator=generator,
            pin_memory=self.device.type == "cuda",
        )

    def _evaluate(self, step: int, epoch: int) -> None:
        if not self.task.validation_set:
            return
        loader = self._loader(self.task.validation_set, False, self.plan.micro_batch_size * 2, 0)
        metrics = evaluate(self.model, loader, self.device)
        self.reporter.evaluation(step, epoch, metrics)
        self.result.final_metrics = metrics
        self.result.history.append({"step": float(step), "epoch": float(epoch), **metrics})
        best = self.result.best_metrics
        if not best or metrics["eval_loss"] < best["eval_loss"]:
            self.result.best_metrics = metrics

    def _checkpoint(self, step: int, epoch: int) -> None:
        path, size = save_checkpoint(self.model, self.checkpoint_dir, step, epoch)
        self.reporter.checkpoint(step, size, str(path))

    def _optimizer_step(self, group: list[Batch], window: LogWindow) -> None:
        """Forward and backward over one step's micro-batches, then clip, step and advance the schedule."""
        for batch in group:
            self.reporter.check_cancelled()
            batch = _to_device(batch, self.device)
            with autocast(self.device):
                loss = self.model(**batch).loss / len(group)
            loss.backward()
            window.loss_sum += loss.detach()
            window.samples += batch["labels"].shape[0]
        window.steps += 1
        if self.hp.max_grad_norm > 0:
            window.grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.hp.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _report(self, step: int, epoch: int, window: LogWindow) -> None:
        """Training metrics for the steps since the last report (the only host sync in the loop)."""
        mean_loss = (window.loss_sum / window.steps).item()
        if not math.isfinite(mean_loss):
            raise JobFailure(
                "NON_FINITE_LOSS",
                f"the training loss became {mean_loss} at step {step}; lower the learning rate or enable clipping",
            )
        elapsed = time.perf_counter() - window.start
        self.reporter.progress(
            step=step,
            total_steps=self.plan.total_steps,
            epoch=epoch,
            loss=mean_loss,
            learning_rate=float(self.scheduler.get_last_lr()[0]),
            samples_per_second=window.samples / max(elapsed, 1e-9),
            grad_norm=float(window.grad_norm),
        )
        window.reset()

    def train(self) -> TrainResult:
        """The loop, top to bottom."""
        plan, ev = self.plan, self.spec.evaluation
        self.reporter.started(plan.total_steps, plan.epochs)
        if ev.evaluate_before_training:
            self._evaluate(0, 0)
        self.model.train()
        step = 0
        window = LogWindow(torch.zeros((), device=self.device))
        for epoch in range(1, plan.epochs + 1):
            # --- a new data order each epoch, fixed by the seed
            loader = self._loader(self.task.train_set, True, plan.micro_batch_size, self.hp.seed * 1000 + epoch)
            micro_batches = iter(loader)
            while step < plan.total_steps:
                group = [b for _, b in zip(range(plan.accumulation), micro_batches, strict=False)]
                if not group:
                    break  # epoch done
                self._optimizer_step(group, window)
                step += 1
                self.result.steps = step
                # --- report, evaluate, checkpoint on their cadences
                if step % ev.log_every_steps == 0 or step == plan.total_steps:
                    self._report(step, epoch, window)
                if ev.eval_every_steps and step % ev.eval_every_steps == 0:
                    self._evaluate(step, epoch)
                if ev.checkpoint_every_steps and step % ev.checkpoint_every_steps == 0:
                    self._checkpoint(step, epoch)
            # --- epoch end: evaluate and checkpoint (unless just done at this step)
            if not (ev.eval_every_steps and step % ev.eval_every_steps == 0):
                self._evaluate(step, epoch)
            if not (ev.checkpoint_every_steps and step % ev.checkpoint_every_steps == 0):
                self._checkpoint(step, epoch)
        return self.result
