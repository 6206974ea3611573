"""The contract every task keeps, walked through for each registered task on a tiny model: it trains, its artifact
answers predictions of its own input kind, its ONNX export is made and checked against the model, and its report
shows its metrics, and the light parts (proto enum, metrics, flags, Predict input kind) agree with it. A task package
added under workers/tasks without a case here fails this test."""

from __future__ import annotations

import dataclasses
import json
import random
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.core.test_training_core import FAST, make_spec, run
from tests.media import (
    make_tiny_vit,
    make_tiny_wav2vec2,
    make_tiny_wav2vec2_ctc,
    make_tiny_whisper,
    shape_png,
    spoken_word,
    tone_wav,
    write_shapes_zip,
    write_tones_zip,
    write_words_zip,
)
from tests.tiny import chat_rows, keyword_rows, make_tiny_bert, make_tiny_llama, preference_rows, write_jsonl
from tuneforge.v1 import job_spec_pb2
from tuneforge.workers.core.prediction import load_model
from tuneforge.workers.messages import Outcome
from tuneforge.workers.spec import DataSettings, EvaluationSettings, HeadSettings
from tuneforge.workers.tasks import registry
from tuneforge.workers.tasks.runtime import export_refusal


@dataclass(frozen=True)
class Case:
    model: Callable[[Path], Path]
    data: Callable[[Path], Path]
    inputs: Callable[[random.Random], list[tuple[str, Any]]]
    metric: str
    epochs: int = 2


CASES = {
    "text_classification": Case(
        lambda folder: make_tiny_bert(folder, num_labels=3),
        lambda folder: write_jsonl(folder / "train.jsonl", keyword_rows(60)),
        lambda rng: [("text", "the striker scored a goal"), ("text", "rain and wind tonight")],
        "eval_accuracy",
    ),
    "image_classification": Case(
        make_tiny_vit,
        lambda folder: write_shapes_zip(folder / "shapes.zip", per_class=6),
        lambda rng: [("image", shape_png("red", rng)), ("image", shape_png("blue", rng))],
        "eval_accuracy",
    ),
    "audio_classification": Case(
        make_tiny_wav2vec2,
        lambda folder: write_tones_zip(folder / "tones.zip", per_class=6),
        lambda rng: [("audio", tone_wav(220.0, rng)), ("audio", tone_wav(880.0, rng))],
        "eval_accuracy",
    ),
    "text_generation": Case(
        make_tiny_llama,
        lambda folder: write_jsonl(folder / "chat.jsonl", chat_rows(40)),
        lambda rng: [("text", "goal match team"), ("text", "<|im_start|>user\nrain and wind<|im_end|>\n")],
        "eval_perplexity",
    ),
    "preference_optimization": Case(
        make_tiny_llama,
        lambda folder: write_jsonl(folder / "pairs.jsonl", preference_rows(40)["messages"]),
        lambda rng: [("text", "goal match team"), ("text", "<|im_start|>user\nrain and wind<|im_end|>\n")],
        "eval_reward_accuracy",
    ),
    "speech_recognition/whisper": Case(  # the encoder-decoder family of the same task
        make_tiny_whisper,
        lambda folder: write_words_zip(folder / "words.zip", 12),
        lambda rng: [("audio", spoken_word("abc", rng)), ("audio", spoken_word("ca", rng))],
        "eval_cer",
    ),
    "speech_recognition": Case(
        make_tiny_wav2vec2_ctc,
        lambda folder: write_words_zip(folder / "words.zip", 20),
        lambda rng: [("audio", spoken_word("abc", rng)), ("audio", spoken_word("ca", rng))],
        "eval_cer",
    ),
}


def test_every_task_has_a_case_and_a_proto_enum_value() -> None:
    proto = {name.lower() for name in job_spec_pb2.Task.DESCRIPTOR.values_by_name if name != "TASK_UNSPECIFIED"}
    assert {key.split("/")[0] for key in CASES} == set(registry.definitions()) == proto


@pytest.mark.parametrize("task", list(CASES))
def test_a_task_trains_predicts_exports_and_reports(task: str, tmp_path: Path) -> None:
    case, task = CASES[task], task.split("/")[0]  # "task/family" for a task's second model family
    model, data = case.model(tmp_path / "base"), case.data(tmp_path)
    spec = make_spec(
        model,
        task=task,
        data=DataSettings(training_file="files/train", validation_fraction=0.25),
        hyperparameters=dataclasses.replace(FAST, epochs=case.epochs, learning_rate=3e-3),
        evaluation=EvaluationSettings(log_every_steps=2),
        export_formats=("onnx",),
        head=HeadSettings(hidden_sizes=(16,)) if registry.definition(task).classifies else None,
    )
    finished, _ = run(spec, data, tmp_path / "work")
    assert finished.outcome is Outcome.SUCCEEDED, finished.message
    with tarfile.open(tmp_path / "work" / "artifact.tar") as tar:
        tar.extractall(tmp_path / "model", filter="data")

    checks = json.loads((tmp_path / "model" / "exports" / "checks.json").read_text())
    loaded = load_model(tmp_path / "model")
    refusal = export_refusal(loaded, "onnx")
    if refusal:  # a model the format cannot apply to: recorded with its reason, the job still succeeds
        assert checks["onnx"] == {"format": "onnx", "error": "EXPORT_UNSUPPORTED", "message": refusal}
    else:
        assert checks["onnx"]["check"]["passed"], checks

    definition = registry.definition(task)
    metrics = json.loads((tmp_path / "model" / "metrics.json").read_text())
    always = set(definition.metrics) - set(definition.metric_needs)  # the others need a setting (generation samples)
    assert case.metric in definition.metrics and always <= set(metrics["final"])
    report = (tmp_path / "model" / "report.html").read_text()
    assert f"<td>{case.metric}</td>" in report
    sections = registry.runtime(task).report_sections(metrics)
    assert sections and all(section in report for section in sections)

    loaded.model.save_pretrained(tmp_path / "again")  # the loaded model holds every trained weight, head included
    saved, again = (load_file(tmp_path / folder / "model.safetensors") for folder in ("model", "again"))
    assert set(saved) == set(again) and all(torch.equal(saved[name], again[name]) for name in saved)
    items = case.inputs(random.Random(3))
    samples = [loaded.runtime.sample_input(np.random.default_rng(0), index) for index in range(2)]
    assert {kind for kind, _ in items + samples} == {definition.modality}
    answers = loaded.answer([loaded.decode(item) for item in items], top_k=2)
    assert len(answers) == len(items)
    for answer in answers:
        if task == "speech_recognition":
            assert set(answer) == {"transcript"} and isinstance(answer["transcript"], str)
        elif registry.definition(task).generates:
            assert set(answer) == {"text"} and isinstance(answer["text"], str)
        else:
            labels = answer["labels"]
            assert len(labels) == 2 and {label for label, _ in labels} <= set(loaded.labels)
            assert labels[0][1] >= labels[1][1] and 0.0 < sum(p for _, p in labels) <= 1.0 + 1e-6
