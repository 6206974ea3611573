"""A task's torch side, as the shared trainer, Predict, export and the report use it.

Each task package's `runtime.py` defines `RUNTIME`, an object with these members; `registry.runtime(name)` imports
it. Classifiers share most of theirs (`classifier.ClassifierRuntime`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch

from tuneforge.workers.core.prepared_task import Batch, PreparedTask
from tuneforge.workers.messages import GeneratedPiece, GenerationRequest, RunJob

if TYPE_CHECKING:
    from tuneforge.workers.core.prediction import LoadedModel


class TaskRuntime(Protocol):
    """Training, Predict, export checks and report sections for one task."""

    model_class: str
    """The transformers auto class its models load with (`AutoModelForCTC` ...)."""
    processor_class: str
    """The transformers auto class its processor loads with (saved with every artifact)."""
    export_tolerance: float
    """How far an export's logits may be from the model's, relative to their largest magnitude."""
    export_refusals: Mapping[str, str]
    """Export formats (ExportFormat values) that cannot apply to the task, with the reason a caller is given."""

    def prepare(self, job: RunJob, log: Callable[[str], None]) -> PreparedTask:
        """Reads the job's data and loads the model: what the shared trainer trains."""
        ...

    def decode(self, loaded: LoadedModel, value: str | bytes) -> Any:
        """One raw Predict input made ready for the processor; InvalidDataset or ValueError when unreadable."""
        ...

    def batch(self, loaded: LoadedModel, decoded: list[Any]) -> Batch:
        """The model's inputs for decoded items, batched and padded."""
        ...

    def answer(self, loaded: LoadedModel, decoded: list[Any], top_k: int) -> list[dict[str, Any]]:
        """One answer per decoded item, from one run of the model: `{"labels": [(label, p), ...]}`,
        `{"transcript": text}` or `{"text": continuation}`."""
        ...

    def sample_input(self, rng: np.random.Generator, index: int) -> tuple[str, bytes | str]:
        """A made-up Predict input (kind, value), longer as index grows: export checks need no real data."""
        ...

    def fixed_shape_inputs(self, loaded: LoadedModel, items: list[tuple[str, Any]]) -> Batch:
        """Inputs padded to the one shape a traced (TorchScript) model accepts."""
        ...

    def report_sections(self, metrics: dict[str, Any]) -> list[str]:
        """The report's task-specific sections (HTML, escaped), from the artifact's metrics.json."""
        ...


@runtime_checkable
class GeneratingRuntime(Protocol):
    """A task whose models write text token by token (TEXT_GENERATION), which Generate streams."""

    def generate(
        self,
        loaded: LoadedModel,
        requests: list[GenerationRequest],
        emit: Callable[[list[GeneratedPiece]], None],
        gone: Callable[[], set[int]],
    ) -> int:
        """Writes each request's answer, emitting pieces as they come; rows in `gone()` stop. Returns the steps run."""
        ...


def logits_of(loaded: LoadedModel, decoded: list[Any]) -> torch.Tensor:
    """One forward pass over decoded items, the logits in float32."""
    with torch.inference_mode():
        logits: torch.Tensor = loaded.model(**loaded.batch(decoded)).logits.float()
    return logits


def model_class_of(runtime: TaskRuntime, config: Any) -> Any:
    """The auto class a task's model loads with: its runtime's `model_class`, or, for a task with several model
    families (CTC and encoder-decoder speech recognition), the one `model_class_for(config)` names."""
    choose = getattr(runtime, "model_class_for", None)
    return auto_class(choose(config) if choose is not None else runtime.model_class)


def export_refusal(loaded: LoadedModel, format: str) -> str | None:
    """Why this model cannot be exported in this format (None when it can): the runtime's `export_refusal_for`
    when its families differ, else its `export_refusals`."""
    choose = getattr(loaded.runtime, "export_refusal_for", None)
    return choose(loaded, format) if choose is not None else loaded.runtime.export_refusals.get(format)


def auto_class(name: str) -> Any:
    """A transformers auto class by name (imported when first used)."""
    import transformers

    return getattr(transformers, name)


def import_every_runtime() -> None:
    """Imports every task's runtime and the model classes they use (a worker does this at start, not at its first
    job)."""
    from tuneforge.workers.tasks import registry

    for name in registry.definitions():
        runtime = registry.runtime(name)
        for model_class in getattr(runtime, "model_classes", (runtime.model_class,)):
            auto_class(model_class)
        auto_class(runtime.processor_class)
    import peft  # noqa: F401  # LoRA
    import transformers.trainer_utils  # noqa: F401  # set_seed
