"""JobSpec (API) -> TrainingSpec (worker): every rule checked, every problem reported at once, defaults filled.

Bad values become BadRequest field violations named by their path from the request (`job.spec.data...`);
options the server cannot run yet are listed separately so the caller gets UNIMPLEMENTED naming them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.v1 import job_spec_pb2 as pb

from server.errors import FieldViolation
from workers.spec import (
    Activation,
    AdaptationMethod,
    AdaptationSettings,
    DataSettings,
    EvaluationSettings,
    HeadSettings,
    Hyperparameters,
    OptimizerKind,
    ScheduleKind,
    ScheduleSettings,
    TaskKind,
    TrainingSpec,
)

ROOT = "job.spec"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[\w.-]{1,96})?$")
FILE_NAME = re.compile(r"^files/[a-z0-9][a-z0-9-]{0,62}$")

TASKS = {
    pb.TEXT_CLASSIFICATION: TaskKind.TEXT_CLASSIFICATION,
    pb.IMAGE_CLASSIFICATION: TaskKind.IMAGE_CLASSIFICATION,
    pb.AUDIO_CLASSIFICATION: TaskKind.AUDIO_CLASSIFICATION,
    pb.SPEECH_RECOGNITION: TaskKind.SPEECH_RECOGNITION,
}
IMPLEMENTED_TASKS = {TaskKind.TEXT_CLASSIFICATION}
METHODS = {
    pb.Adaptation.METHOD_UNSPECIFIED: AdaptationMethod.FULL,
    pb.Adaptation.FULL: AdaptationMethod.FULL,
    pb.Adaptation.FROZEN_BACKBONE: AdaptationMethod.FROZEN_BACKBONE,
    pb.Adaptation.FREEZE_FIRST_BLOCKS: AdaptationMethod.FREEZE_FIRST_BLOCKS,
    pb.Adaptation.LORA: AdaptationMethod.LORA,
}
ACTIVATIONS = {
    pb.HeadSpec.ACTIVATION_UNSPECIFIED: Activation.RELU,
    pb.HeadSpec.RELU: Activation.RELU,
    pb.HeadSpec.GELU: Activation.GELU,
    pb.HeadSpec.TANH: Activation.TANH,
}
OPTIMIZERS = {
    pb.Hyperparameters.OPTIMIZER_UNSPECIFIED: OptimizerKind.ADAMW,
    pb.Hyperparameters.ADAMW: OptimizerKind.ADAMW,
    pb.Hyperparameters.SGD: OptimizerKind.SGD,
}
SCHEDULES = {
    pb.Schedule.KIND_UNSPECIFIED: ScheduleKind.LINEAR,
    pb.Schedule.CONSTANT: ScheduleKind.CONSTANT,
    pb.Schedule.LINEAR: ScheduleKind.LINEAR,
    pb.Schedule.COSINE: ScheduleKind.COSINE,
    pb.Schedule.STEP: ScheduleKind.STEP,
    pb.Schedule.EXPONENTIAL: ScheduleKind.EXPONENTIAL,
}


@dataclass
class ValidationResult:
    """The converted spec (when valid), the bad fields, and the options not built yet."""

    spec: TrainingSpec | None = None
    violations: list[FieldViolation] = field(default_factory=list)
    unimplemented: list[FieldViolation] = field(default_factory=list)


class _Checker:
    """Collects violations while converting, so a caller learns every problem in one round trip."""

    def __init__(self) -> None:
        self.violations: list[FieldViolation] = []
        self.unimplemented: list[FieldViolation] = []

    def bad(self, path: str, description: str) -> None:
        self.violations.append(FieldViolation(f"{ROOT}.{path}", description))

    def not_built(self, path: str, description: str) -> None:
        self.unimplemented.append(FieldViolation(f"{ROOT}.{path}", description))

    def int_range(self, path: str, value: int, low: int, high: int) -> int:
        if not low <= value <= high:
            self.bad(path, f"must be between {low} and {high}, got {value}")
        return value

    def float_range(self, path: str, value: float, low: float, high: float, high_open: bool = False) -> float:
        ok = math.isfinite(value) and low <= value and (value < high if high_open else value <= high)
        if not ok:
            self.bad(path, f"must be in [{low}, {high}{')' if high_open else ']'}, got {value}")
        return value


def validate_spec(spec: pb.JobSpec, model_roots: list[Path]) -> ValidationResult:
    """Checks and converts a JobSpec; the result has a spec only when nothing is wrong."""
    check = _Checker()
    task = _task(check, spec)
    _base_model(check, spec.base_model, model_roots)
    data = _data(check, spec.data) if spec.HasField("data") else None
    if data is None:
        check.bad("data", "required: at least data.training_file")
    adaptation = _adaptation(check, spec.adaptation)
    head = _head(check, spec.head) if spec.HasField("head") else None
    hyperparameters = _hyperparameters(check, spec.hyperparameters, adaptation.method)
    evaluation = _evaluation(check, spec.evaluation)
    gpus = check.int_range("resources.gpus", spec.resources.gpus, 0, 64)
    if gpus > 1:
        check.not_built("resources.gpus", f"multi-GPU jobs ({gpus} GPUs) are not available on this server yet")
    priority = check.int_range("priority", spec.priority, -100, 100)
    result = ValidationResult(violations=check.violations, unimplemented=check.unimplemented)
    if not check.violations and not check.unimplemented and task is not None and data is not None:
        result.spec = TrainingSpec(
            task=task,
            base_model=spec.base_model,
            data=data,
            adaptation=adaptation,
            head=head,
            hyperparameters=hyperparameters,
            evaluation=evaluation,
            gpus=gpus,
            priority=priority,
        )
    return result


def _task(check: _Checker, spec: pb.JobSpec) -> TaskKind | None:
    task = TASKS.get(spec.task)
    if task is None:
        check.bad(
            "task",
            "required: one of TEXT_CLASSIFICATION, IMAGE_CLASSIFICATION, AUDIO_CLASSIFICATION, SPEECH_RECOGNITION",
        )
    elif task not in IMPLEMENTED_TASKS:
        check.not_built("task", f"{pb.Task.Name(spec.task)} is not available on this server yet")
    return task


def _base_model(check: _Checker, base_model: str, model_roots: list[Path]) -> None:
    if not base_model:
        check.bad("base_model", "required: a hub id or a model folder under a model root")
        return
    if base_model.startswith(("/", ".", "~")):
        _local_model(check, base_model, model_roots)
    elif not HUB_ID.match(base_model):
        check.bad("base_model", f"{base_model!r} is neither a hub id (`org/name`) nor an absolute path")


def _local_model(check: _Checker, base_model: str, model_roots: list[Path]) -> None:
    path = Path(base_model)
    if not path.is_absolute() or ".." in path.parts:
        check.bad("base_model", "a local model must be an absolute path without `..`")
        return
    resolved = path.resolve()
    roots = [root.resolve() for root in model_roots]
    if not any(resolved.is_relative_to(root) for root in roots):
        allowed = ", ".join(str(r) for r in roots) or "none configured (serve --model-root DIR)"
        check.bad("base_model", f"{base_model} is not under a model root; allowed roots: {allowed}")
    elif not (resolved / "config.json").is_file():
        check.bad("base_model", f"{base_model} is not a model folder (no config.json)")


def _data(check: _Checker, data: pb.DataSpec) -> DataSettings:
    if not FILE_NAME.match(data.training_file):
        check.bad("data.training_file", f"required: a files/{{id}} name, got {data.training_file!r}")
    if data.validation_file and not FILE_NAME.match(data.validation_file):
        check.bad("data.validation_file", f"must be a files/{{id}} name, got {data.validation_file!r}")
    check.float_range("data.validation_fraction", data.validation_fraction, 0.0, 0.5)
    if data.validation_file and data.validation_fraction:
        check.bad("data.validation_fraction", "give validation_file or validation_fraction, not both")
    check.int_range("data.max_sequence_length", data.max_sequence_length, 0, 8192)
    return DataSettings(
        training_file=data.training_file,
        validation_file=data.validation_file or None,
        validation_fraction=data.validation_fraction,
        text_column=data.text_column or "text",
        text_pair_column=data.text_pair_column or None,
        label_column=data.label_column or "label",
        max_sequence_length=data.max_sequence_length,
    )


def _adaptation(check: _Checker, adaptation: pb.Adaptation) -> AdaptationSettings:
    method = METHODS.get(adaptation.method)
    if method is None:
        check.bad("adaptation.method", f"unknown value {adaptation.method}")
        method = AdaptationMethod.FULL
    if method is AdaptationMethod.FREEZE_FIRST_BLOCKS:
        check.int_range("adaptation.num_frozen_blocks", adaptation.num_frozen_blocks, 1, 1000)
    elif adaptation.num_frozen_blocks:
        check.bad("adaptation.num_frozen_blocks", "only used with method FREEZE_FIRST_BLOCKS")
    if method is AdaptationMethod.LORA:
        check.not_built("adaptation.method", "LORA is not available on this server yet")
    elif adaptation.HasField("lora"):
        check.bad("adaptation.lora", "only used with method LORA")
    return AdaptationSettings(method=method, num_frozen_blocks=adaptation.num_frozen_blocks)


def _head(check: _Checker, head: pb.HeadSpec) -> HeadSettings:
    if len(head.hidden_sizes) > 8:
        check.bad("head.hidden_sizes", f"at most 8 hidden layers, got {len(head.hidden_sizes)}")
    for i, size in enumerate(head.hidden_sizes):
        check.int_range(f"head.hidden_sizes[{i}]", size, 1, 65536)
    activation = ACTIVATIONS.get(head.activation)
    if activation is None:
        check.bad("head.activation", f"unknown value {head.activation}")
    check.float_range("head.dropout", head.dropout, 0.0, 1.0, high_open=True)
    return HeadSettings(tuple(head.hidden_sizes), activation or Activation.RELU, head.dropout)


def _hyperparameters(check: _Checker, hp: pb.Hyperparameters, method: AdaptationMethod) -> Hyperparameters:
    path = "hyperparameters"
    epochs = check.int_range(f"{path}.epochs", hp.epochs, 0, 1000) or 3
    batch_size = check.int_range(f"{path}.batch_size", hp.batch_size, 0, 65536) or 16
    accumulation = check.int_range(f"{path}.gradient_accumulation_steps", hp.gradient_accumulation_steps, 0, 1024) or 1
    if batch_size % accumulation:
        check.bad(
            f"{path}.gradient_accumulation_steps",
            f"batch_size {batch_size} must be divisible by gradient_accumulation_steps {accumulation}",
        )
    default_lr = 5e-5 if method in (AdaptationMethod.FULL, AdaptationMethod.FREEZE_FIRST_BLOCKS) else 1e-3
    learning_rate = check.float_range(f"{path}.learning_rate", hp.learning_rate, 0.0, 10.0) or default_lr
    weight_decay = (
        check.float_range(f"{path}.weight_decay", hp.weight_decay, 0.0, 1.0) if hp.HasField("weight_decay") else 0.01
    )
    optimizer = OPTIMIZERS.get(hp.optimizer)
    if optimizer is None:
        check.bad(f"{path}.optimizer", f"unknown value {hp.optimizer}")
    if hp.HasField("momentum") and optimizer is not OptimizerKind.SGD:
        check.bad(f"{path}.momentum", "only used with optimizer SGD")
    momentum = (
        check.float_range(f"{path}.momentum", hp.momentum, 0.0, 1.0, high_open=True) if hp.HasField("momentum") else 0.9
    )
    max_grad_norm = (
        check.float_range(f"{path}.max_grad_norm", hp.max_grad_norm, 0.0, 1e6) if hp.HasField("max_grad_norm") else 1.0
    )
    if hp.seed < 0 or hp.seed >= 2**32:
        check.bad(f"{path}.seed", f"must be in [0, 2^32), got {hp.seed}")
    max_steps = check.int_range(f"{path}.max_steps", hp.max_steps, 0, 10_000_000)
    return Hyperparameters(
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        optimizer=optimizer or OptimizerKind.ADAMW,
        momentum=momentum,
        schedule=_schedule(check, hp.schedule),
        max_grad_norm=max_grad_norm,
        gradient_accumulation_steps=accumulation,
        seed=hp.seed,
        max_steps=max_steps,
    )


def _schedule(check: _Checker, schedule: pb.Schedule) -> ScheduleSettings:
    path = "hyperparameters.schedule"
    kind = SCHEDULES.get(schedule.kind)
    if kind is None:
        check.bad(f"{path}.kind", f"unknown value {schedule.kind}")
        kind = ScheduleKind.LINEAR
    check.int_range(f"{path}.warmup_steps", schedule.warmup_steps, 0, 10_000_000)
    check.float_range(f"{path}.warmup_ratio", schedule.warmup_ratio, 0.0, 1.0, high_open=True)
    if schedule.warmup_steps and schedule.warmup_ratio:
        check.bad(f"{path}.warmup_ratio", "give warmup_steps or warmup_ratio, not both")
    check.int_range(f"{path}.step_size", schedule.step_size, 0, 10_000_000)
    if schedule.step_size and kind is not ScheduleKind.STEP:
        check.bad(f"{path}.step_size", "only used with kind STEP")
    check.float_range(f"{path}.gamma", schedule.gamma, 0.0, 1.0)
    if schedule.gamma and kind not in (ScheduleKind.STEP, ScheduleKind.EXPONENTIAL):
        check.bad(f"{path}.gamma", "only used with kinds STEP and EXPONENTIAL")
    check.float_range(f"{path}.min_lr_ratio", schedule.min_lr_ratio, 0.0, 1.0, high_open=True)
    if schedule.min_lr_ratio and kind is not ScheduleKind.COSINE:
        check.bad(f"{path}.min_lr_ratio", "only used with kind COSINE")
    return ScheduleSettings(
        kind=kind,
        warmup_steps=schedule.warmup_steps,
        warmup_ratio=schedule.warmup_ratio,
        step_size=schedule.step_size,
        gamma=schedule.gamma,
        min_lr_ratio=schedule.min_lr_ratio,
    )


def _evaluation(check: _Checker, evaluation: pb.EvaluationSpec) -> EvaluationSettings:
    path = "evaluation"
    return EvaluationSettings(
        eval_every_steps=check.int_range(f"{path}.eval_every_steps", evaluation.eval_every_steps, 0, 10_000_000),
        log_every_steps=check.int_range(f"{path}.log_every_steps", evaluation.log_every_steps, 0, 10_000_000) or 10,
        checkpoint_every_steps=check.int_range(
            f"{path}.checkpoint_every_steps", evaluation.checkpoint_every_steps, 0, 10_000_000
        ),
        evaluate_before_training=evaluation.evaluate_before_training,
    )
