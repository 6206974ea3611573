"""What turns a spec into optimisation machinery: step plan, optimizer with its parameter groups, the loss."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tuneforge.workers.core.adaptation import TrainableParameter
from tuneforge.workers.spec import ClassBalance, Hyperparameters, OptimizerKind

NO_DECAY_MARKERS = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


@dataclass(frozen=True)
class StepPlan:
    """How the data divides into micro-batches and optimizer steps."""

    micro_batch_size: int
    accumulation: int
    steps_per_epoch: int
    total_steps: int
    epochs: int


def plan_steps(num_examples: int, hp: Hyperparameters, micro_batch_size: int = 0) -> StepPlan:
    """Optimizer steps per epoch and in total (max_steps caps the total). A `micro_batch_size` (after running out of
    memory) overrides the spec's split; the accumulation grows so that the effective batch stays batch_size."""
    micro = micro_batch_size or max(1, hp.batch_size // hp.gradient_accumulation_steps)
    accumulation = math.ceil(hp.batch_size / micro) if micro_batch_size else hp.gradient_accumulation_steps
    micro_batches = math.ceil(num_examples / micro)
    steps_per_epoch = math.ceil(micro_batches / accumulation)
    total = steps_per_epoch * hp.epochs
    if hp.max_steps:
        total = min(total, hp.max_steps)
    epochs = math.ceil(total / steps_per_epoch) if steps_per_epoch else 0
    return StepPlan(micro, accumulation, steps_per_epoch, total, epochs)


def learning_rate_of(item: TrainableParameter, hp: Hyperparameters) -> float:
    """Head rate for the head, layer-wise decayed rate for the backbone."""
    if item.is_head:
        return hp.head_learning_rate or hp.learning_rate
    return hp.learning_rate * hp.layer_decay**item.depth


def fused_available(device: torch.device) -> bool:
    """Whether torch has fused Adam/AdamW kernels for the device: CUDA, and CPU (the fused CPU step is about 3x
    faster than the default multi-tensor one on 2 cores, and is what Trainer's default `adamw_torch_fused` uses)."""
    return device.type in ("cuda", "cpu")


def build_optimizer(
    parameters: Sequence[TrainableParameter], hp: Hyperparameters, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW, Adam or SGD with one group per (learning rate, weight decay); no decay on biases and norm weights."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for item in parameters:
        decay = 0.0 if item.name.endswith(NO_DECAY_MARKERS) else hp.weight_decay
        groups.setdefault((learning_rate_of(item, hp), decay), []).append(item.parameter)
    param_groups = [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]
    fused = fused_available(device)
    match hp.optimizer:
        case OptimizerKind.SGD:
            return torch.optim.SGD(param_groups, lr=hp.learning_rate, momentum=hp.momentum, nesterov=hp.nesterov)
        case OptimizerKind.ADAM:
            return torch.optim.Adam(param_groups, lr=hp.learning_rate, fused=fused)
        case OptimizerKind.ADAMW:
            return torch.optim.AdamW(param_groups, lr=hp.learning_rate, fused=fused)
    raise ValueError(f"unknown optimizer {hp.optimizer}")


def class_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, normalised so a balanced data set gets weight 1 everywhere."""
    counts = Counter(labels)
    return torch.tensor([len(labels) / (num_classes * max(1, counts.get(c, 0))) for c in range(num_classes)])


def classification_loss(
    hp: Hyperparameters, labels: Sequence[int], num_classes: int, device: torch.device
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy with the spec's label smoothing and, for WEIGHTED_LOSS, inverse-frequency class weights."""
    weight = class_weights(labels, num_classes).to(device) if hp.class_balance is ClassBalance.WEIGHTED_LOSS else None
    loss = nn.CrossEntropyLoss(weight=weight, label_smoothing=hp.label_smoothing)
    return lambda logits, targets: loss(logits.float(), targets)


def balanced_sampler(labels: Sequence[int], generator: torch.Generator) -> torch.utils.data.WeightedRandomSampler:
    """Draws examples with replacement so that every class is equally likely in each batch."""
    counts = Counter(labels)
    weights = [1.0 / counts[label] for label in labels]
    return torch.utils.data.WeightedRandomSampler(weights, num_samples=len(labels), generator=generator)
