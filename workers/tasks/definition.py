"""What a task declares to the server and the client: plain data, no torch and no gRPC, so every side can read it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

TASK_FIELDS = (
    "data.text_column",
    "data.text_pair_column",
    "data.max_sequence_length",
    "data.augmentation",
    "data.clip_seconds",
    "data.transcript_column",
    "data.shots_per_class",
    "head",
    "hyperparameters.label_smoothing",
    "hyperparameters.class_balance",
    "data.train_on_all_tokens",
    "data.packing",
    "evaluation.generation_samples",
    "hyperparameters.preference_beta",
    "data.language",
)
"""JobSpec fields that only some tasks read. A task lists those it reads in `TaskDefinition.reads`; a request that
sets one its task does not read is refused (naming the tasks that do), never silently ignored. Every other field
applies to every task."""


def field_holder(message: Any, path: str) -> tuple[Any, str]:
    """The message that holds a dotted JobSpec field, and the field's own name (`data.clip_seconds` -> data,
    `clip_seconds`): how the server reads a task field and the client's flags set one."""
    *parents, name = path.split(".")
    for parent in parents:
        message = getattr(message, parent)
    return message, name


@dataclass(frozen=True)
class TaskFlag:
    """A `tuneforge submit` flag that sets one JobSpec field (tasks that share a field share the flag)."""

    flag: str
    field: str
    """Its JobSpec path, e.g. `data.clip_seconds`; one of TASK_FIELDS or a field every task reads."""
    type: Callable[[str], object]
    help: str


@dataclass(frozen=True)
class TaskDefinition:
    """One task as the API sees it. `name` is its package's name; its proto enum value (`Task` in job_spec.proto)
    is the name in upper case and its CLI name has dashes, so registering a task is adding its package and the enum
    value."""

    name: str
    modality: str
    """The Predict input it takes: `text`, `image` or `audio` (the PredictInput oneof)."""
    metrics: tuple[str, ...]
    """What its evaluation reports; `evaluation.best_metric` must be one of them."""
    reads: frozenset[str]
    """The TASK_FIELDS it reads."""
    metric_needs: Mapping[str, str] = field(default_factory=dict)
    """Metrics reported only when a field is set (metric -> its TASK_FIELDS path)."""
    methods: frozenset[str] | None = None
    """The adaptation methods (AdaptationMethod values) it trains with; None: every one."""
    lower_is_better: frozenset[str] = frozenset({"eval_loss"})
    """Its metrics that improve downwards (losses, error rates); the others improve upwards."""
    flags: tuple[TaskFlag, ...] = ()
    generates: bool = False
    """Its models write text token by token: the Generate RPC serves them."""
    field_ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    """Numeric JobSpec fields this task allows only in [low, high), narrower than every task's range."""

    @property
    def enum_name(self) -> str:
        return self.name.upper()

    @property
    def cli_name(self) -> str:
        return self.name.replace("_", "-")

    def maximizes(self, metric: str) -> bool:
        """Whether a higher value of the metric is better (early stopping, the best checkpoint, sweeps, reports)."""
        return metric not in self.lower_is_better and not metric.endswith("loss")

    @property
    def classifies(self) -> bool:
        """Trains on labels: class balance, label smoothing and few-shot apply."""
        return "data.shots_per_class" in self.reads


CLASSIFICATION_METRICS = ("eval_loss", "eval_accuracy", "eval_macro_f1")
CLASSIFIER_FIELDS = frozenset(
    {"head", "hyperparameters.label_smoothing", "hyperparameters.class_balance", "data.shots_per_class"}
)
"""What every classifier reads, whatever its modality."""
