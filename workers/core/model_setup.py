"""Turns a prepared task's pretrained model into the model to train: the head, the freeze policy, LoRA, and the
parameters the optimizer gets. Shared by the run itself and by cross-validation folds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tuneforge.workers.core.adaptation import (
    GradualUnfreezer,
    TrainableParameter,
    apply_adaptation,
    plan_parameters,
    replace_head,
    summarize,
)
from tuneforge.workers.core.errors import JobFailure
from tuneforge.workers.core.lora import apply_lora
from tuneforge.workers.core.prepared_task import PreparedTask
from tuneforge.workers.spec import AdaptationMethod, TrainingSpec


def checkpoint_activations(model: Any) -> None:
    """Transformers' gradient checkpointing (non-reentrant: frozen inputs and LoRA need no special handling)."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model wraps it
    if not getattr(target, "supports_gradient_checkpointing", False):
        raise JobFailure(
            "INVALID_SPEC",
            f"{type(target).__name__} does not support gradient checkpointing; leave "
            "hyperparameters.gradient_checkpointing off",
        )
    target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    target.config.use_cache = False


def adapt_model(
    task: PreparedTask, spec: TrainingSpec, log: Callable[[str], None]
) -> tuple[list[TrainableParameter], GradualUnfreezer | None]:
    """Applies the spec's head and adaptation to task.model (LoRA replaces it); returns what to train."""
    if spec.head is not None:
        replaced = replace_head(task.model, len(task.labels), spec.head)
        log(f"replaced {replaced} with a head of hidden sizes {list(spec.head.hidden_sizes)}")
    summary = apply_adaptation(task.model, spec.adaptation)
    unfreezer = None
    if spec.adaptation.method is AdaptationMethod.GRADUAL_UNFREEZING:
        unfreezer = GradualUnfreezer(task.model, spec.adaptation.unfreeze_every_epochs)
    if spec.adaptation.method is AdaptationMethod.LORA and spec.adaptation.lora is not None:
        task.model = apply_lora(task.model, spec.adaptation.lora)
        summary = summarize(task.model)
    if spec.hyperparameters.gradient_checkpointing:
        checkpoint_activations(task.model)
        log("gradient checkpointing: each block's activations are recomputed in the backward pass")
    log(f"adaptation {spec.adaptation.method.value}: {summary.describe()}")
    return plan_parameters(task.model, spec.hyperparameters.layer_decay != 1.0, unfreezer), unfreezer
