"""Verified exports of a finished model: ONNX (dynamic batch and length, any opset the exporter supports),
TorchScript (traced at a fixed input shape: batch free, sequence or clip length fixed and recorded), and the
merged-LoRA folder. Every export is run on sample inputs other than those it was made with and compared with the
PyTorch model; the figures go into `exports/checks.json`. A format that cannot be made for a model fails with a
reason a person can act on.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.jit._trace import TracerWarning

from tuneforge.workers.core.lineage import file_digest
from tuneforge.workers.core.prediction import LoadedModel, load_model
from tuneforge.workers.messages import Severity
from tuneforge.workers.tasks.runtime import export_refusal

EXPORTS = "exports"
CHECKS = "checks.json"
DEFAULT_OPSET = 18


class ExportFormat(StrEnum):
    HUGGING_FACE = "hugging_face"
    MERGED_LORA = "merged_lora"
    TORCHSCRIPT = "torchscript"
    ONNX = "onnx"


FILES = {ExportFormat.ONNX: "model.onnx", ExportFormat.TORCHSCRIPT: "model.torchscript.pt"}


class ExportFailed(Exception):
    """The format cannot be made for this model, or the made model does not answer as the original does."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


@dataclass
class ExportCheck:
    """How the export compared with the PyTorch model on held-back sample inputs."""

    samples: int
    max_abs_difference: float
    tolerance: float
    passed: bool
    input_shapes: dict[str, list[int]]


@dataclass
class ExportResult:
    format: str
    file: str
    """Relative to the artifact folder."""
    size_bytes: int
    sha256: str
    check: ExportCheck | None
    opset: int = 0


class LogitsOf(nn.Module):
    """The model as a function of positional tensors, returning its logits (what exporters want)."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(**dict(zip(self.names, tensors, strict=True))).logits
        return logits


def sample_items(loaded: LoadedModel, count: int, seed: int) -> list[tuple[str, Any]]:
    """Made-up inputs of the model's modality, of varied lengths (no real data is needed to check an export)."""
    rng = np.random.default_rng(seed)
    return [loaded.runtime.sample_input(rng, index) for index in range(count)]


def fixed_shape_inputs(loaded: LoadedModel, items: list[tuple[str, Any]]) -> dict[str, torch.Tensor]:
    """Inputs padded to the one shape a traced model accepts (the task decides the shape)."""
    return loaded.runtime.fixed_shape_inputs(loaded, items)


def _reference(loaded: LoadedModel, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    loaded.model.eval()  # exporters may leave the model in training mode (dropout on)
    with torch.inference_mode():
        return np.asarray(loaded.model(**inputs).logits.float().numpy())


def _compare(
    loaded: LoadedModel, reference: np.ndarray, produced: np.ndarray, inputs: dict[str, torch.Tensor]
) -> ExportCheck:
    tolerance = loaded.runtime.export_tolerance * max(1.0, float(np.abs(reference).max()))
    difference = float(np.abs(reference - produced).max()) if reference.shape == produced.shape else float("inf")
    shapes = {name: list(tensor.shape) for name, tensor in inputs.items()}
    return ExportCheck(int(reference.shape[0]), difference, tolerance, difference <= tolerance, shapes)


def _onnx(loaded: LoadedModel, target: Path, opset: int) -> ExportCheck:
    import onnxruntime

    made_with = loaded.inputs(sample_items(loaded, 2, seed=1))
    names = list(made_with)
    dynamic: dict[str, dict[int, str]] = {}
    for name, tensor in made_with.items():  # images keep their size; token and sample axes vary
        dynamic[name] = {0: "batch", 1: "length"} if tensor.dim() >= 2 and name != "pixel_values" else {0: "batch"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TracerWarning)  # shape-dependent branches: the check decides
            torch.onnx.export(
                LogitsOf(loaded.model, names),
                tuple(made_with.values()),
                str(target),
                input_names=names,
                output_names=["logits"],
                dynamic_axes={**dynamic, "logits": _logits_axes(loaded, made_with)},
                opset_version=opset,
                dynamo=False,
            )
    except Exception as exc:
        raise ExportFailed("EXPORT_UNSUPPORTED", f"ONNX (opset {opset}) cannot express this model: {exc}") from exc
    checked = loaded.inputs(sample_items(loaded, 3, seed=2))  # other batch size and lengths
    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    produced = session.run(["logits"], {name: tensor.numpy() for name, tensor in checked.items()})[0]
    return _compare(loaded, _reference(loaded, checked), produced, checked)


def _logits_axes(loaded: LoadedModel, inputs: dict[str, torch.Tensor]) -> dict[int, str]:
    """The batch axis, and the length axis too when the model answers per position (a language model's logits)."""
    return {0: "batch", 1: "length"} if _reference(loaded, inputs).ndim == 3 else {0: "batch"}


def _torchscript(loaded: LoadedModel, target: Path) -> ExportCheck:
    made_with = fixed_shape_inputs(loaded, sample_items(loaded, 2, seed=1))
    names = list(made_with)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TracerWarning)  # shape-dependent branches: the check decides
            with torch.inference_mode():
                traced = torch.jit.trace(  # type: ignore[no-untyped-call]
                    LogitsOf(loaded.model, names), tuple(made_with.values()), check_trace=False
                )
            torch.jit.save(traced, str(target))
    except Exception as exc:
        raise ExportFailed("EXPORT_UNSUPPORTED", f"TorchScript cannot trace this model: {exc}") from exc
    checked = fixed_shape_inputs(loaded, sample_items(loaded, 3, seed=2))
    reloaded = torch.jit.load(str(target))  # type: ignore[no-untyped-call]
    with torch.inference_mode():
        produced = reloaded(*checked.values()).float().numpy()
    return _compare(loaded, _reference(loaded, checked), produced, checked)


def _merged_lora(folder: Path, loaded: LoadedModel) -> ExportCheck:
    """The artifact's main folder holds the merged weights; checked against base model + adapter through peft."""
    adapter = folder / "adapter"
    if not adapter.is_dir():
        raise ExportFailed(
            "NOT_LORA",
            "merged_lora needs a job trained with LoRA adapters; this model was trained without them, and its "
            "folder is already a plain Hugging Face model",
        )
    from peft import PeftModel

    spec = json.loads((folder / "job_spec.json").read_text())
    base_model = type(loaded.model).from_pretrained(  # the head comes from the adapter (modules_to_save)
        spec["base_model"],
        num_labels=len(loaded.labels) or None,
        ignore_mismatched_sizes=True,
        use_safetensors=True,
        trust_remote_code=False,
    )
    with_adapter = PeftModel.from_pretrained(base_model, str(adapter)).eval()
    checked = loaded.inputs(sample_items(loaded, 3, seed=2))
    with torch.inference_mode():
        produced = with_adapter(**checked).logits.float().numpy()
    return _compare(loaded, _reference(loaded, checked), produced, checked)


def export_model(folder: Path, format: ExportFormat, opset: int = DEFAULT_OPSET) -> ExportResult:
    """Makes and checks one export of the artifact folder; ExportFailed with the reason when it cannot."""
    loaded = load_model(folder)
    refusal = export_refusal(loaded, format.value)
    if refusal:
        raise ExportFailed("EXPORT_UNSUPPORTED", refusal)
    out = folder / EXPORTS
    out.mkdir(exist_ok=True)
    check: ExportCheck | None = None
    match format:
        case ExportFormat.HUGGING_FACE:
            relative = "model.safetensors"
        case ExportFormat.MERGED_LORA:
            check, relative = _merged_lora(folder, loaded), "model.safetensors"
        case ExportFormat.ONNX:
            check, relative = _onnx(loaded, out / FILES[format], opset), f"{EXPORTS}/{FILES[format]}"
        case ExportFormat.TORCHSCRIPT:
            check, relative = _torchscript(loaded, out / FILES[format]), f"{EXPORTS}/{FILES[format]}"
    if check is not None and not check.passed:
        if relative.startswith(EXPORTS):
            (folder / relative).unlink(missing_ok=True)
        raise ExportFailed(
            "EXPORT_MISMATCH",
            f"the {format.value} export answers differently from the model: largest difference "
            f"{check.max_abs_difference:.3g} over {check.samples} samples, tolerance {check.tolerance:.3g}",
        )
    path = folder / relative
    used_opset = opset if format is ExportFormat.ONNX else 0
    result = ExportResult(format.value, relative, path.stat().st_size, file_digest(path), check, used_opset)
    record_check(folder, result.format, asdict(result))
    return result


def export_or_record(folder: Path, format: ExportFormat, opset: int, reporter: Any) -> None:
    """At the end of training: makes the export, or records why it could not be made (the job still succeeds)."""
    try:
        result = export_model(folder, format, opset)
    except Exception as exc:  # the model is trained and saved: a failed export is recorded, not fatal
        reason, message = (exc.reason, exc.message) if isinstance(exc, ExportFailed) else ("INTERNAL", repr(exc))
        record_check(folder, format.value, {"format": format.value, "error": reason, "message": message})
        reporter.log(f"export {format.value} not made: {reason}: {message}", Severity.WARNING)
        return
    check = result.check
    figures = (
        f"; checked on {check.samples} samples, largest difference {check.max_abs_difference:.2g}" if check else ""
    )
    reporter.log(f"export {format.value}: {result.file} ({result.size_bytes} bytes){figures}")


def record_check(folder: Path, format: str, entry: dict[str, Any]) -> None:
    """Sets one format's entry in exports/checks.json (its result, or why it was not made; the newest kept)."""
    path = folder / EXPORTS / CHECKS
    path.parent.mkdir(exist_ok=True)
    checks = json.loads(path.read_text()) if path.exists() else {}
    checks[format] = entry
    path.write_text(json.dumps(checks, indent=2, sort_keys=True))
