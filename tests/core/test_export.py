"""Verified exports: ONNX (run with onnxruntime) and TorchScript of a text, an image and an audio model answer as
the PyTorch model does on inputs they were not made with; a format that cannot be made fails with its reason."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import tarfile
from pathlib import Path

import onnxruntime
import pytest
import torch

from tests.core.test_training_core import FAST, make_spec, of_type, run
from tests.media import make_tiny_vit, make_tiny_wav2vec2
from tests.tiny import make_tiny_bert
from tuneforge.workers.core import export
from tuneforge.workers.core.export import (
    EXPORTS,
    ExportFailed,
    ExportFormat,
    export_model,
    fixed_shape_inputs,
    sample_items,
)
from tuneforge.workers.core.prediction import load_model
from tuneforge.workers.messages import LogEmitted, Outcome
from tuneforge.workers.spec import AdaptationMethod, AdaptationSettings, LoraSettings


def artifact_folder(model: Path, task: str, target: Path, **data: object) -> Path:
    """A model folder laid out as an artifact (the model, its processor and the job's resolved spec)."""
    shutil.copytree(model, target)
    (target / "job_spec.json").write_text(json.dumps({"task": task, "base_model": str(model), "data": data}))
    return target


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    return {
        "text": artifact_folder(make_tiny_bert(root / "bert", num_labels=3), "text_classification", root / "t"),
        "image": artifact_folder(make_tiny_vit(root / "vit"), "image_classification", root / "i"),
        "audio": artifact_folder(
            make_tiny_wav2vec2(root / "w2v"), "audio_classification", root / "a", clip_seconds=0.5
        ),
    }


@pytest.mark.parametrize("modality", ["text", "image", "audio"])
@pytest.mark.parametrize("format", [ExportFormat.ONNX, ExportFormat.TORCHSCRIPT])
def test_exports_answer_as_the_model_does(folders: dict[str, Path], modality: str, format: ExportFormat) -> None:
    folder = folders[modality]
    result = export_model(folder, format, opset=18)
    assert result.check is not None and result.check.passed, result.check
    assert result.check.samples == 3 and result.check.max_abs_difference <= result.check.tolerance
    assert (folder / result.file).stat().st_size == result.size_bytes
    checks = json.loads((folder / EXPORTS / "checks.json").read_text())
    assert checks[format.value]["check"]["passed"] and checks[format.value]["sha256"] == result.sha256
    if format is ExportFormat.ONNX:  # a user's own run of the file, on yet another batch
        assert result.opset == 18
        loaded = load_model(folder)
        inputs = loaded.inputs(sample_items(loaded, 4, seed=9))
        session = onnxruntime.InferenceSession(str(folder / result.file), providers=["CPUExecutionProvider"])
        logits = session.run(["logits"], {k: v.numpy() for k, v in inputs.items()})[0]
        with torch.inference_mode():
            expected = loaded.model(**inputs).logits.numpy()
        assert abs(logits - expected).max() < 1e-3
    else:  # loaded and run here, not through the exporter's own check
        loaded = load_model(folder)
        inputs = fixed_shape_inputs(loaded, sample_items(loaded, 4, seed=9))
        traced = torch.jit.load(str(folder / result.file))
        with torch.inference_mode():
            produced = traced(*inputs.values())
            expected = loaded.model.eval()(**inputs).logits
        torch.testing.assert_close(produced, expected, rtol=1e-4, atol=1e-4)


class OffByAHalf(export.LogitsOf):
    """An exporter bug: the exported function answers 0.5 higher than the model."""

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return super().forward(*tensors) + 0.5


@pytest.mark.parametrize("format", [ExportFormat.ONNX, ExportFormat.TORCHSCRIPT])
def test_an_export_that_answers_differently_fails_and_is_not_kept(
    folders: dict[str, Path], format: ExportFormat, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    folder = shutil.copytree(folders["text"], tmp_path / "text")
    monkeypatch.setattr(export, "LogitsOf", OffByAHalf)
    with pytest.raises(ExportFailed) as failed:
        export_model(folder, format, opset=18)
    assert failed.value.reason == "EXPORT_MISMATCH"
    assert re.fullmatch(
        rf"the {format.value} export answers differently from the model: largest difference 0\.5 over 3 samples, "
        r"tolerance \S+",
        failed.value.message,
    ), failed.value.message
    assert not (folder / EXPORTS / export.FILES[format]).exists()


def test_a_model_the_exporter_cannot_trace_fails_as_unsupported(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    folder = shutil.copytree(folders["text"], tmp_path / "text")

    def cannot_trace(*args: object, **kwargs: object) -> None:
        raise RuntimeError("an operator tracing does not know")

    monkeypatch.setattr(torch.jit, "trace", cannot_trace)
    with pytest.raises(ExportFailed) as failed:
        export_model(folder, ExportFormat.TORCHSCRIPT)
    assert failed.value.reason == "EXPORT_UNSUPPORTED"
    assert failed.value.message == "TorchScript cannot trace this model: an operator tracing does not know"


def test_merged_lora_of_a_model_without_lora_fails_with_the_reason(folders: dict[str, Path]) -> None:
    with pytest.raises(ExportFailed) as failed:
        export_model(folders["text"], ExportFormat.MERGED_LORA)
    assert failed.value.reason == "NOT_LORA"
    assert "trained without them" in failed.value.message


def test_exports_asked_for_in_the_spec_are_made_checked_and_listed(
    tiny_bert: Path, keyword_dataset: Path, tmp_path: Path
) -> None:
    lora = AdaptationSettings(method=AdaptationMethod.LORA, lora=LoraSettings())
    spec = make_spec(tiny_bert, adaptation=lora, export_formats=("onnx", "torchscript", "merged_lora"))
    finished, events = run(
        dataclasses.replace(spec, hyperparameters=dataclasses.replace(FAST, epochs=2)), keyword_dataset, tmp_path
    )
    assert finished.outcome is Outcome.SUCCEEDED, finished.message
    with tarfile.open(tmp_path / "artifact.tar") as tar:
        tar.extractall(tmp_path / "model", filter="data")
    checks = json.loads((tmp_path / "model" / EXPORTS / "checks.json").read_text())
    assert set(checks) == {"onnx", "torchscript", "merged_lora"}
    merged_answers_as_base_plus_adapter(tmp_path / "model", tiny_bert)
    assert all(entry["check"]["passed"] for entry in checks.values()), checks
    manifest = json.loads((tmp_path / "model" / "manifest.json").read_text())
    assert {"exports/model.onnx", "exports/model.torchscript.pt", "exports/checks.json"} <= set(manifest["files"])
    logs = [e.message for e in of_type(events, LogEmitted)]
    assert any(line.startswith("export onnx: exports/model.onnx") for line in logs), logs


def merged_answers_as_base_plus_adapter(folder: Path, base: Path) -> None:
    """The merged weights, loaded as a plain model, answer as the base model with the LoRA adapter (peft), here."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = tokenizer(["alpha beta gamma", "sports match today", "a b"], padding=True, return_tensors="pt")
    merged = AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=True).eval()
    plain = AutoModelForSequenceClassification.from_pretrained(  # the head comes from the adapter
        base, num_labels=merged.config.num_labels, ignore_mismatched_sizes=True
    )
    with_adapter = PeftModel.from_pretrained(plain, str(folder / "adapter")).eval()
    with torch.inference_mode():
        torch.testing.assert_close(merged(**inputs).logits, with_adapter(**inputs).logits, rtol=1e-4, atol=1e-4)
