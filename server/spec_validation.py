"""JobSpec (API) -> TrainingSpec (worker): every rule checked, every problem reported at once, defaults filled.

Bad values become BadRequest field violations named by their path from the request (`job.spec.data...`).
"""

from __future__ import annotations

import json
import math
import os
import re
import urllib.parse
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from tuneforge.server.errors import FieldViolation
from tuneforge.v1 import job_spec_pb2 as pb
from tuneforge.workers.spec import (
    Activation,
    AdaptationMethod,
    AdaptationSettings,
    AugmentationSettings,
    AutoSettings,
    ClassBalance,
    DataSettings,
    EvaluationSettings,
    HeadSettings,
    Hyperparameters,
    LoraSettings,
    OptimizerKind,
    Precision,
    ScheduleKind,
    ScheduleSettings,
    TrainingSpec,
)
from tuneforge.workers.tasks import registry
from tuneforge.workers.tasks.definition import TASK_FIELDS, TaskDefinition, field_holder

T = TypeVar("T")
ROOT = "job.spec"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[\w.-]{1,96})?$")
FILE_NAME = re.compile(r"^files/[a-z0-9][a-z0-9-]{0,62}$")
MAX_COLUMN_CHARS = 256
MODULE_NAME = re.compile(r"^[A-Za-z_][\w.]{0,127}$")
METHODS = {
    pb.Adaptation.METHOD_UNSPECIFIED: AdaptationMethod.FULL,
    pb.Adaptation.FULL: AdaptationMethod.FULL,
    pb.Adaptation.FROZEN_BACKBONE: AdaptationMethod.FROZEN_BACKBONE,
    pb.Adaptation.FREEZE_FIRST_BLOCKS: AdaptationMethod.FREEZE_FIRST_BLOCKS,
    pb.Adaptation.LORA: AdaptationMethod.LORA,
    pb.Adaptation.LAST_BLOCKS_TRAINABLE: AdaptationMethod.LAST_BLOCKS_TRAINABLE,
    pb.Adaptation.GRADUAL_UNFREEZING: AdaptationMethod.GRADUAL_UNFREEZING,
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
    pb.Hyperparameters.ADAM: OptimizerKind.ADAM,
}
CLASS_BALANCES = {
    pb.Hyperparameters.CLASS_BALANCE_UNSPECIFIED: ClassBalance.NONE,
    pb.Hyperparameters.NONE: ClassBalance.NONE,
    pb.Hyperparameters.WEIGHTED_LOSS: ClassBalance.WEIGHTED_LOSS,
    pb.Hyperparameters.BALANCED_SAMPLING: ClassBalance.BALANCED_SAMPLING,
}
PRECISIONS = {
    pb.Hyperparameters.PRECISION_UNSPECIFIED: Precision.AUTO,
    pb.Hyperparameters.AUTO: Precision.AUTO,
    pb.Hyperparameters.FP32: Precision.FP32,
    pb.Hyperparameters.BF16: Precision.BF16,
    pb.Hyperparameters.FP16: Precision.FP16,
}
SCHEDULES = {
    pb.Schedule.KIND_UNSPECIFIED: ScheduleKind.LINEAR,
    pb.Schedule.CONSTANT: ScheduleKind.CONSTANT,
    pb.Schedule.LINEAR: ScheduleKind.LINEAR,
    pb.Schedule.COSINE: ScheduleKind.COSINE,
    pb.Schedule.STEP: ScheduleKind.STEP,
    pb.Schedule.EXPONENTIAL: ScheduleKind.EXPONENTIAL,
    pb.Schedule.COSINE_WITH_RESTARTS: ScheduleKind.COSINE_WITH_RESTARTS,
    pb.Schedule.MULTI_STEP: ScheduleKind.MULTI_STEP,
    pb.Schedule.POLYNOMIAL: ScheduleKind.POLYNOMIAL,
    pb.Schedule.ONE_CYCLE: ScheduleKind.ONE_CYCLE,
    pb.Schedule.REDUCE_ON_PLATEAU: ScheduleKind.REDUCE_ON_PLATEAU,
}


@dataclass
class ValidationResult:
    """The converted spec (when valid) and the bad fields."""

    spec: TrainingSpec | None = None
    violations: list[FieldViolation] = field(default_factory=list)


class _Checker:
    """Collects violations while converting, so a caller learns every problem in one round trip."""

    def __init__(self) -> None:
        self.violations: list[FieldViolation] = []

    def bad(self, path: str, description: str) -> None:
        self.violations.append(FieldViolation(f"{ROOT}.{path}", description))

    def int_range(self, path: str, value: int, low: int, high: int) -> int:
        if not low <= value <= high:
            self.bad(path, f"must be between {low} and {high}, got {value}")
        return value

    def float_range(self, path: str, value: float, low: float, high: float, high_open: bool = False) -> float:
        ok = math.isfinite(value) and low <= value and (value < high if high_open else value <= high)
        if not ok:
            self.bad(path, f"must be in [{low}, {high}{')' if high_open else ']'}, got {value}")
        return value


MAX_WEBHOOKS = 5
ONNX_OPSETS = (13, 20)
"""What torch's ONNX exporter writes."""


def _exports(check: _Checker, spec: pb.ExportSpec) -> tuple[tuple[str, ...], int]:
    formats = []
    for index, value in enumerate(spec.formats):
        if value == pb.EXPORT_FORMAT_UNSPECIFIED or value not in pb.ExportFormat.values():
            check.bad(f"export.formats[{index}]", f"not an export format: {value}")
        elif value != pb.HUGGING_FACE:  # every artifact has the Hugging Face folder
            formats.append(pb.ExportFormat.Name(value).lower())
    opset = spec.onnx_opset or 18
    if not ONNX_OPSETS[0] <= opset <= ONNX_OPSETS[1]:
        check.bad("export.onnx_opset", f"must be between {ONNX_OPSETS[0]} and {ONNX_OPSETS[1]}, got {opset}")
    return tuple(dict.fromkeys(formats)), opset


def _webhooks(check: _Checker, urls: list[str]) -> None:
    """Webhook URLs must be absolute http(s) URLs; where they may point is checked when they are called."""
    if len(urls) > MAX_WEBHOOKS:
        check.bad("notifications.webhook_urls", f"at most {MAX_WEBHOOKS} webhooks, got {len(urls)}")
    for index, url in enumerate(urls):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or len(url) > 2048 or parts.username:
            check.bad(
                f"notifications.webhook_urls[{index}]",
                f"must be an http:// or https:// URL with a host and no credentials, at most 2048 characters: {url!r}",
            )


def validate_spec(spec: pb.JobSpec, model_roots: list[Path]) -> ValidationResult:
    """Checks and converts a JobSpec; the result has a spec only when nothing is wrong."""
    check = _Checker()
    task = _task(check, spec)
    _base_model(check, spec.base_model, model_roots)
    data = _data(check, spec.data) if spec.HasField("data") else None
    if data is None:
        check.bad("data", "required: at least data.training_file")
    adaptation = _adaptation(check, spec.adaptation)
    if spec.data.shots_per_class and not spec.adaptation.method:
        # What works on tiny data: bench/few_shot.py measured LoRA level with or above the prototype baseline,
        # a frozen backbone (a head on an untrained pooler) well below it.
        adaptation = replace(adaptation, method=AdaptationMethod.LORA, lora=_lora(check, spec.adaptation.lora))
    head = _head(check, spec.head) if spec.HasField("head") else None
    hyperparameters = _hyperparameters(check, spec.hyperparameters, adaptation.method)
    evaluation = _evaluation(check, spec.evaluation)
    gpus = check.int_range("resources.gpus", spec.resources.gpus, 0, 64)
    ranks = check.int_range("resources.ranks", spec.resources.ranks, 0, 64) or max(1, gpus)
    if gpus and ranks != gpus:
        check.bad("resources.ranks", f"a job with {gpus} GPUs trains on {gpus} ranks (one per GPU), not {ranks}")
    priority = check.int_range("priority", spec.priority, -100, 100)
    _webhooks(check, list(spec.notifications.webhook_urls))
    export_formats, onnx_opset = _exports(check, spec.export)
    max_runtime_s = spec.resources.max_runtime.ToTimedelta().total_seconds()
    if max_runtime_s < 0 or spec.resources.max_runtime.nanos < 0:
        check.bad("resources.max_runtime", f"must not be negative, got {max_runtime_s} s")
    result = ValidationResult(violations=check.violations)
    if task is not None and data is not None:
        candidate = TrainingSpec(
            task=task.name,
            base_model=spec.base_model,
            data=data,
            adaptation=adaptation,
            head=head,
            hyperparameters=hyperparameters,
            evaluation=evaluation,
            gpus=gpus,
            ranks=ranks,
            export_formats=export_formats,
            onnx_opset=onnx_opset,
            priority=priority,
            max_runtime_s=max(0.0, max_runtime_s),
        )
        if spec.base_model.lower().endswith(GGUF_SUFFIX) and not task.generates:
            check.bad(
                "base_model",
                f"a GGUF file holds a causal language model: use it with TEXT_GENERATION, not {task.enum_name}",
            )
        candidate = _few_shot(check, candidate, spec)
        _needs_validation(check, candidate)
        _task_rules(check, task, candidate, spec)
        if not check.violations:
            result.spec = candidate
    return result


def task_of(spec: pb.JobSpec) -> TaskDefinition | None:
    """The task a JobSpec names (None when unset or unknown)."""
    return registry.by_enum_name(pb.Task.Name(spec.task)) if spec.task in pb.Task.values() else None


def _task(check: _Checker, spec: pb.JobSpec) -> TaskDefinition | None:
    task = task_of(spec)
    if task is None:
        names = ", ".join(definition.enum_name for definition in registry.definitions().values())
        check.bad("task", f"required: one of {names}")
    return task


def _base_model(check: _Checker, base_model: str, model_roots: list[Path]) -> None:
    if not base_model:
        check.bad("base_model", "required: a hub id or a model folder under a model root")
        return
    if base_model.startswith(("/", ".", "~")) or os.path.lexists(base_model):
        # A name that exists as a path (relative to the server's working directory) is a local path, and the
        # loader would open it as one: it must pass the local checks, which refuse relative paths.
        _local_model(check, base_model, model_roots)
    elif not HUB_ID.fullmatch(base_model):
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
    elif resolved.suffix.lower() == GGUF_SUFFIX:
        problem = not_gguf(resolved)
        if problem:
            check.bad("base_model", f"{base_model} {problem}")
    elif not (resolved / "config.json").is_file():
        check.bad("base_model", f"{base_model} is not a model folder (no config.json) nor a .gguf file")
    else:
        problem = unsafe_model_folder(resolved, roots)
        if problem:
            check.bad("base_model", f"{base_model} {problem}")


PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
GGUF_SUFFIX = ".gguf"
LANGUAGE = re.compile(r"[A-Za-z][A-Za-z ]{1,31}")
GGUF_MAGIC = b"GGUF"


def not_gguf(path: Path) -> str | None:
    """Why a `.gguf` path is not a GGUF file (llama.cpp's format, which holds no code); None when it is one."""
    try:
        with open(path, "rb") as handle:
            magic = handle.read(len(GGUF_MAGIC))
    except IsADirectoryError:
        return "is a folder, not a GGUF file"
    except OSError:
        return "cannot be read (no such GGUF file)"
    return None if magic == GGUF_MAGIC else "is not a GGUF file (it does not start with `GGUF`)"


def unsafe_model_folder(folder: Path, roots: list[Path]) -> str | None:
    """Why loading this folder could run code or read outside the model roots; None when it is safe."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return "has a config.json that is not valid JSON"
    if isinstance(config, dict) and "auto_map" in config:
        return "needs remote code (`auto_map` in config.json), which this server never runs"
    names = []
    for entry in folder.rglob("*"):
        if entry.is_symlink() and not any(entry.resolve().is_relative_to(root) for root in roots):
            return f"links outside the model roots ({entry.relative_to(folder)})"
        names.append(entry.name)
    pickled = sorted(n for n in names if n.endswith(PICKLED_WEIGHTS))
    if pickled and not any(n.endswith(".safetensors") for n in names):
        return (
            f"has only pickled weights ({', '.join(pickled[:3])}), which can run code when loaded; only safetensors "
            "weights are loaded: convert them (transformers `save_pretrained(safe_serialization=True)`)"
        )
    return None


def _data(check: _Checker, data: pb.DataSpec) -> DataSettings:
    if not FILE_NAME.fullmatch(data.training_file):
        check.bad("data.training_file", f"required: a files/{{id}} name, got {data.training_file!r}")
    if data.validation_file and not FILE_NAME.fullmatch(data.validation_file):
        check.bad("data.validation_file", f"must be a files/{{id}} name, got {data.validation_file!r}")
    check.float_range("data.validation_fraction", data.validation_fraction, 0.0, 0.5)
    if data.validation_file and data.validation_fraction:
        check.bad("data.validation_fraction", "give validation_file or validation_fraction, not both")
    check.int_range("data.max_sequence_length", data.max_sequence_length, 0, 8192)
    check.float_range("data.clip_seconds", data.clip_seconds, 0.0, 600.0)
    if data.language and not LANGUAGE.fullmatch(data.language):
        check.bad("data.language", f"a language code or name (letters, at most 32), got {data.language!r}")
    for column in ("text_column", "text_pair_column", "label_column", "file_column", "transcript_column"):
        if len(getattr(data, column)) > MAX_COLUMN_CHARS:
            check.bad(f"data.{column}", f"a column name of at most {MAX_COLUMN_CHARS} characters")
    return DataSettings(
        training_file=data.training_file,
        validation_file=data.validation_file or None,
        validation_fraction=data.validation_fraction,
        text_column=data.text_column or "text",
        text_pair_column=data.text_pair_column or None,
        label_column=data.label_column or "label",
        max_sequence_length=data.max_sequence_length,
        augmentation=_augmentation(check, data.augmentation) if data.augmentation.enabled else None,
        clip_seconds=data.clip_seconds,
        file_column=data.file_column or "file",
        transcript_column=data.transcript_column or "transcript",
        train_on_all_tokens=data.train_on_all_tokens,
        packing=data.packing,
        language=data.language.lower(),
    )


def _augmentation(check: _Checker, augmentation: pb.Augmentation) -> AugmentationSettings:
    recipe = AugmentationSettings()
    path = "data.augmentation"

    def number(name: str, low: float, high: float) -> float:
        if not augmentation.HasField(name):  # type: ignore[arg-type]
            return float(getattr(recipe, name))
        return check.float_range(f"{path}.{name}", getattr(augmentation, name), low, high)

    def flag(name: str) -> bool:
        return bool(getattr(augmentation if augmentation.HasField(name) else recipe, name))  # type: ignore[arg-type]

    return AugmentationSettings(
        crop_scale_min=number("crop_scale_min", 0.0, 1.0),
        horizontal_flip=flag("horizontal_flip"),
        color_jitter=number("color_jitter", 0.0, 1.0),
        max_gain_db=number("max_gain_db", 0.0, 40.0),
        noise_snr_db=number("noise_snr_db", 0.0, 100.0),
        max_shift_seconds=number("max_shift_seconds", 0.0, 10.0),
        spec_augment=flag("spec_augment"),
    )


def _adaptation(check: _Checker, adaptation: pb.Adaptation) -> AdaptationSettings:
    method = METHODS.get(adaptation.method)
    if method is None:
        check.bad("adaptation.method", f"unknown value {adaptation.method}")
        method = AdaptationMethod.FULL
    _only_for(
        check,
        "adaptation.num_frozen_blocks",
        adaptation.num_frozen_blocks,
        method is AdaptationMethod.FREEZE_FIRST_BLOCKS,
        "FREEZE_FIRST_BLOCKS",
        1,
        1000,
    )
    _only_for(
        check,
        "adaptation.num_trainable_blocks",
        adaptation.num_trainable_blocks,
        method is AdaptationMethod.LAST_BLOCKS_TRAINABLE,
        "LAST_BLOCKS_TRAINABLE",
        1,
        1000,
    )
    if adaptation.unfreeze_every_epochs and method is not AdaptationMethod.GRADUAL_UNFREEZING:
        check.bad("adaptation.unfreeze_every_epochs", "only used with method GRADUAL_UNFREEZING")
    check.int_range("adaptation.unfreeze_every_epochs", adaptation.unfreeze_every_epochs, 0, 1000)
    lora = None
    if method is AdaptationMethod.LORA:
        lora = _lora(check, adaptation.lora)
    elif adaptation.HasField("lora"):
        check.bad("adaptation.lora", "only used with method LORA")
    return AdaptationSettings(
        method=method,
        num_frozen_blocks=adaptation.num_frozen_blocks,
        lora=lora,
        num_trainable_blocks=adaptation.num_trainable_blocks,
        unfreeze_every_epochs=adaptation.unfreeze_every_epochs or 1,
    )


def _only_for(check: _Checker, path: str, value: int, applies: bool, method: str, low: int, high: int) -> None:
    """A count that one method requires and every other method must leave unset."""
    if applies:
        check.int_range(path, value, low, high)
    elif value:
        check.bad(path, f"only used with method {method}")


def _lora(check: _Checker, lora: pb.LoraSpec) -> LoraSettings:
    rank = check.int_range("adaptation.lora.rank", lora.rank, 0, 1024) or 8
    alpha = check.float_range("adaptation.lora.alpha", lora.alpha, 0.0, 1e4) or 2.0 * rank
    dropout = check.float_range("adaptation.lora.dropout", lora.dropout, 0.0, 1.0, high_open=True) or 0.05
    for i, name in enumerate(lora.target_modules):
        if not MODULE_NAME.fullmatch(name):
            check.bad(f"adaptation.lora.target_modules[{i}]", f"{name!r} is not a module name")
    return LoraSettings(rank=rank, alpha=alpha, dropout=dropout, target_modules=tuple(lora.target_modules))


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
    full = method in (
        AdaptationMethod.FULL,
        AdaptationMethod.FREEZE_FIRST_BLOCKS,
        AdaptationMethod.LAST_BLOCKS_TRAINABLE,
    )
    learning_rate = check.float_range(f"{path}.learning_rate", hp.learning_rate, 0.0, 10.0) or (5e-5 if full else 1e-3)
    if hp.seed < 0 or hp.seed >= 2**32:
        check.bad(f"{path}.seed", f"must be in [0, 2^32), got {hp.seed}")
    return Hyperparameters(
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        weight_decay=_optional(check, hp, "weight_decay", 0.01, 0.0, 1.0),
        max_grad_norm=_optional(check, hp, "max_grad_norm", 1.0, 0.0, 1e6),
        schedule=_schedule(check, hp.schedule),
        gradient_accumulation_steps=accumulation,
        seed=hp.seed,
        max_steps=check.int_range(f"{path}.max_steps", hp.max_steps, 0, 10_000_000),
        head_learning_rate=check.float_range(f"{path}.head_learning_rate", hp.head_learning_rate, 0.0, 10.0),
        layer_decay=check.float_range(f"{path}.layer_decay", hp.layer_decay, 0.0, 1.0) or 1.0,
        label_smoothing=check.float_range(f"{path}.label_smoothing", hp.label_smoothing, 0.0, 1.0, high_open=True),
        preference_beta=check.float_range(f"{path}.preference_beta", hp.preference_beta, 0.0, 10.0) or 0.1,
        class_balance=_enum(check, f"{path}.class_balance", hp.class_balance, CLASS_BALANCES, ClassBalance.NONE),
        precision=_enum(check, f"{path}.precision", hp.precision, PRECISIONS, Precision.AUTO),
        max_skipped_non_finite_steps=check.int_range(
            f"{path}.max_skipped_non_finite_steps", hp.max_skipped_non_finite_steps, 0, 1_000_000
        ),
        auto=_auto(check, hp),
        compile=hp.compile,
        gradient_checkpointing=hp.gradient_checkpointing,
        **_optimizer(check, hp),
    )


FEW_SHOT_EPOCHS = 30
FEW_SHOT_PATIENCE = 5


def _few_shot(check: _Checker, candidate: TrainingSpec, raw: pb.JobSpec) -> TrainingSpec:
    """shots_per_class: defaults that suit tiny data, wherever the spec left them unset."""
    shots = raw.data.shots_per_class
    if not shots:
        return candidate
    check.int_range("data.shots_per_class", shots, 1, 10_000)
    if not registry.definition(candidate.task).classifies:
        return candidate  # refused with the other fields its task does not read
    hp, evaluation, data = candidate.hyperparameters, candidate.evaluation, candidate.data
    if not raw.hyperparameters.epochs and not hp.auto.epochs:
        hp = replace(hp, epochs=FEW_SHOT_EPOCHS)
    if not raw.evaluation.early_stopping_patience:
        evaluation = replace(evaluation, early_stopping_patience=FEW_SHOT_PATIENCE)
    if "data.augmentation" in registry.definition(candidate.task).reads and not raw.data.augmentation.enabled:
        data = replace(data, augmentation=AugmentationSettings())
    return replace(candidate, hyperparameters=hp, evaluation=evaluation, data=replace(data, shots_per_class=shots))


def _auto(check: _Checker, hp: pb.Hyperparameters) -> AutoSettings:
    """A value is chosen automatically or set by hand, never both."""
    auto, path = hp.auto, "hyperparameters.auto"
    for chosen, name, value in (
        (auto.learning_rate, "learning_rate", hp.learning_rate),
        (auto.epochs, "epochs", hp.epochs),
        (auto.micro_batch_size, "gradient_accumulation_steps", hp.gradient_accumulation_steps),
    ):
        if chosen and value:
            check.bad(f"hyperparameters.{name}", f"set by hand while {path} chooses it: leave it unset")
    low = auto.range_test_min_learning_rate or 1e-7
    high = auto.range_test_max_learning_rate or 1.0
    if not 0 < low < high <= 10:
        check.bad(f"{path}.range_test_max_learning_rate", f"needs 0 < min < max <= 10, got {low} and {high}")
    steps = check.int_range(f"{path}.range_test_steps", auto.range_test_steps, 0, 10_000) or 100
    if 0 < steps < 10:
        check.bad(f"{path}.range_test_steps", "at least 10 steps")
    return AutoSettings(
        learning_rate=auto.learning_rate,
        micro_batch_size=auto.micro_batch_size,
        epochs=auto.epochs,
        range_test_min_learning_rate=low,
        range_test_max_learning_rate=high,
        range_test_steps=steps,
    )


def _optional(check: _Checker, hp: pb.Hyperparameters, name: str, default: float, low: float, high: float) -> float:
    """A field where an explicit zero differs from unset."""
    if not hp.HasField(name):  # type: ignore[arg-type]
        return default
    return check.float_range(f"hyperparameters.{name}", getattr(hp, name), low, high)


def _enum(check: _Checker, path: str, value: int, table: dict[Any, T], default: T) -> T:
    if value not in table:
        check.bad(path, f"unknown value {value}")
        return default
    return table[value]


def _optimizer(check: _Checker, hp: pb.Hyperparameters) -> dict[str, Any]:
    path = "hyperparameters"
    optimizer = _enum(check, f"{path}.optimizer", hp.optimizer, OPTIMIZERS, OptimizerKind.ADAMW)
    if hp.HasField("momentum") and optimizer is not OptimizerKind.SGD:
        check.bad(f"{path}.momentum", "only used with optimizer SGD")
    if hp.nesterov and optimizer is not OptimizerKind.SGD:
        check.bad(f"{path}.nesterov", "only used with optimizer SGD")
    momentum = _optional(check, hp, "momentum", 0.9, 0.0, 0.999)
    if hp.nesterov and momentum == 0:
        check.bad(f"{path}.nesterov", "Nesterov momentum needs a momentum above 0")
    return {"optimizer": optimizer, "momentum": momentum, "nesterov": hp.nesterov}


# Which schedule fields each kind reads (every other kind must leave them unset).
SCHEDULE_FIELDS = {
    "step_size": (ScheduleKind.STEP,),
    "gamma": (ScheduleKind.STEP, ScheduleKind.MULTI_STEP, ScheduleKind.EXPONENTIAL, ScheduleKind.REDUCE_ON_PLATEAU),
    "min_lr_ratio": (ScheduleKind.COSINE, ScheduleKind.POLYNOMIAL),
    "milestones": (ScheduleKind.MULTI_STEP,),
    "num_cycles": (ScheduleKind.COSINE_WITH_RESTARTS,),
    "power": (ScheduleKind.POLYNOMIAL,),
    "patience": (ScheduleKind.REDUCE_ON_PLATEAU,),
}


def _schedule(check: _Checker, schedule: pb.Schedule) -> ScheduleSettings:
    path = "hyperparameters.schedule"
    kind = _enum(check, f"{path}.kind", schedule.kind, SCHEDULES, ScheduleKind.LINEAR)
    check.int_range(f"{path}.warmup_steps", schedule.warmup_steps, 0, 10_000_000)
    check.float_range(f"{path}.warmup_ratio", schedule.warmup_ratio, 0.0, 1.0, high_open=True)
    if schedule.warmup_steps and schedule.warmup_ratio:
        check.bad(f"{path}.warmup_ratio", "give warmup_steps or warmup_ratio, not both")
    for name, kinds in SCHEDULE_FIELDS.items():
        if getattr(schedule, name) and kind not in kinds:
            check.bad(f"{path}.{name}", f"only used with kind {' or '.join(k.name for k in kinds)}")
    check.int_range(f"{path}.step_size", schedule.step_size, 0, 10_000_000)
    check.float_range(f"{path}.gamma", schedule.gamma, 0.0, 1.0)
    check.float_range(f"{path}.min_lr_ratio", schedule.min_lr_ratio, 0.0, 1.0, high_open=True)
    check.int_range(f"{path}.num_cycles", schedule.num_cycles, 0, 1000)
    check.float_range(f"{path}.power", schedule.power, 0.0, 100.0)
    check.int_range(f"{path}.patience", schedule.patience, 0, 1000)
    milestones = list(schedule.milestones)
    if kind is ScheduleKind.MULTI_STEP and not milestones:
        check.bad(f"{path}.milestones", "MULTI_STEP needs at least one milestone")
    if milestones != sorted(set(milestones)) or any(m <= 0 for m in milestones):
        check.bad(f"{path}.milestones", "must be positive and strictly increasing")
    return ScheduleSettings(
        kind=kind,
        warmup_steps=schedule.warmup_steps,
        warmup_ratio=schedule.warmup_ratio,
        step_size=schedule.step_size,
        gamma=schedule.gamma,
        min_lr_ratio=schedule.min_lr_ratio,
        milestones=tuple(milestones),
        num_cycles=schedule.num_cycles or 1,
        power=schedule.power or 1.0,
        patience=schedule.patience or 1,
    )


def _evaluation(check: _Checker, evaluation: pb.EvaluationSpec) -> EvaluationSettings:
    path = "evaluation"
    best_metric = evaluation.best_metric or "eval_loss"
    return EvaluationSettings(
        eval_every_steps=check.int_range(f"{path}.eval_every_steps", evaluation.eval_every_steps, 0, 10_000_000),
        log_every_steps=check.int_range(f"{path}.log_every_steps", evaluation.log_every_steps, 0, 10_000_000) or 10,
        checkpoint_every_steps=check.int_range(
            f"{path}.checkpoint_every_steps", evaluation.checkpoint_every_steps, 0, 10_000_000
        ),
        evaluate_before_training=evaluation.evaluate_before_training,
        best_metric=best_metric,
        early_stopping_patience=check.int_range(
            f"{path}.early_stopping_patience", evaluation.early_stopping_patience, 0, 1000
        ),
        early_stopping_min_delta=check.float_range(
            f"{path}.early_stopping_min_delta", evaluation.early_stopping_min_delta, 0.0, 1e6
        ),
        keep_checkpoints=check.int_range(f"{path}.keep_checkpoints", evaluation.keep_checkpoints, 0, 100) or 1,
        generation_samples=check.int_range(f"{path}.generation_samples", evaluation.generation_samples, 0, 64),
    )


def _task_rules(check: _Checker, task: TaskDefinition, spec: TrainingSpec, raw: pb.JobSpec) -> None:
    """The task's metrics; fields that only some tasks read are refused elsewhere rather than ignored."""
    if spec.evaluation.best_metric not in task.metrics:
        check.bad(
            "evaluation.best_metric",
            f"must be one of {', '.join(task.metrics)} for {task.enum_name}, got {spec.evaluation.best_metric!r}",
        )
    needs = task.metric_needs.get(spec.evaluation.best_metric)
    if needs and not _is_set(raw, needs):
        check.bad("evaluation.best_metric", f"{spec.evaluation.best_metric} is measured only when {needs} is set")
    if task.methods is not None and spec.adaptation.method.value not in task.methods:
        allowed = " or ".join(sorted(method.upper() for method in task.methods))
        check.bad("adaptation.method", f"{task.enum_name} trains with {allowed}, not {spec.adaptation.method.name}")
    for path in TASK_FIELDS:
        if path not in task.reads and _is_set(raw, path):
            readers = " or ".join(reader.enum_name for reader in registry.readers(path)) or "no task"
            check.bad(path, f"only used with {readers}, not {task.enum_name}")
    for path, (low, high) in task.field_ranges.items():
        holder, name = field_holder(raw, path)
        value = getattr(holder, name)
        if not low <= value < high:
            check.bad(path, f"must be in [{low}, {high}) for {task.enum_name}, got {value}")


def _is_set(spec: pb.JobSpec, path: str) -> bool:
    """Whether the request gives a task-specific field: a message that is present (augmentation: enabled), a value
    other than its zero (class balance: other than NONE)."""
    holder, name = field_holder(spec, path)
    value = getattr(holder, name)
    if name == "augmentation":
        return bool(value.enabled)
    if name == "class_balance":
        return value not in (pb.Hyperparameters.CLASS_BALANCE_UNSPECIFIED, pb.Hyperparameters.NONE)
    if hasattr(value, "ListFields"):
        return bool(holder.HasField(name))
    return bool(value)


def _needs_validation(check: _Checker, spec: TrainingSpec) -> None:
    """Options driven by evaluation results need validation data to evaluate on (few-shot jobs validate on the
    examples not drawn as shots)."""
    if spec.data.validation_file or spec.data.validation_fraction or spec.data.shots_per_class:
        return
    if spec.hyperparameters.schedule.kind is ScheduleKind.REDUCE_ON_PLATEAU:
        check.bad(
            "hyperparameters.schedule.kind",
            "REDUCE_ON_PLATEAU needs validation data (validation_file or validation_fraction)",
        )
    if spec.evaluation.early_stopping_patience:
        check.bad(
            "evaluation.early_stopping_patience",
            "early stopping needs validation data (validation_file or validation_fraction)",
        )
