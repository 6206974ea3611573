"""The training core on a tiny randomly initialised BERT: it learns, repeats itself exactly, freezes what it is told,
stops when cancelled, and fails with actionable reasons."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tarfile
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from tests.tiny import keyword_rows, write_jsonl
from tuneforge.workers.core.artifact import load_artifact_model
from tuneforge.workers.core.runner import run_job
from tuneforge.workers.messages import (
    CheckpointWritten,
    DataFile,
    EvaluationDone,
    JobFinished,
    JobStarted,
    Outcome,
    RunJob,
    TrainingProgress,
    WorkerEvent,
)
from tuneforge.workers.spec import (
    AdaptationMethod,
    AdaptationSettings,
    DataSettings,
    EvaluationSettings,
    HeadSettings,
    Hyperparameters,
    OptimizerKind,
    ScheduleKind,
    ScheduleSettings,
    TrainingSpec,
)

FAST = Hyperparameters(
    epochs=8, batch_size=8, learning_rate=2e-3, schedule=ScheduleSettings(kind=ScheduleKind.CONSTANT)
)


def make_spec(model: Path, **changes: Any) -> TrainingSpec:
    spec = TrainingSpec(
        task="text_classification",
        base_model=str(model),
        data=DataSettings(training_file="files/train", validation_fraction=0.25),
        hyperparameters=FAST,
        evaluation=EvaluationSettings(log_every_steps=4),
    )
    return dataclasses.replace(spec, **changes)


def run(
    spec: TrainingSpec,
    data: Path,
    work: Path,
    cancel: threading.Event | None = None,
    on_event: Any = None,
    device: str = "cpu",
    **job_fields: Any,
) -> tuple[JobFinished, list[WorkerEvent]]:
    events: list[WorkerEvent] = []

    def send(event: WorkerEvent) -> None:
        events.append(event)
        if on_event:
            on_event(event)

    job = RunJob(
        job="job-1",
        attempt=1,
        spec=spec,
        training_data=DataFile(str(data), data.name),
        validation_data=None,
        work_dir=str(work),
        checkpoint_dir=str(work / "checkpoints"),
        artifact_path=str(work / "artifact.tar"),
        **job_fields,
    )
    finished = run_job(job, "worker-0", torch.device(device), send, cancel or threading.Event())
    return finished, events


def of_type(events: list[WorkerEvent], kind: type) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


def test_it_learns_and_writes_a_loadable_artifact(tiny_bert: Path, keyword_dataset: Path, tmp_path: Path) -> None:
    finished, events = run(make_spec(tiny_bert), keyword_dataset, tmp_path)
    assert finished.outcome is Outcome.SUCCEEDED, finished.message
    started = of_type(events, JobStarted)[0]
    assert (started.total_steps, started.total_epochs) == (96, 8)  # 90 examples / 8 -> 12 steps x 8 epochs
    losses = [e.loss for e in of_type(events, TrainingProgress)]
    assert losses[-1] < losses[0] * 0.5, f"loss did not fall: {losses}"
    evaluations = of_type(events, EvaluationDone)
    assert len(evaluations) == 8 and evaluations[-1].metrics["eval_accuracy"] >= 0.85
    assert len(of_type(events, CheckpointWritten)) == 8
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["best", "serving", "step-000096"], "only the newest checkpoint and the best one are kept"
    assert (tmp_path / "checkpoints" / "serving" / "job_spec.json").exists()  # Predict on a checkpoint needs it
    with tarfile.open(tmp_path / "artifact.tar") as tar:
        assert {"config.json", "model.safetensors", "metrics.json", "job_spec.json"} <= set(tar.getnames())


def test_same_seed_gives_the_same_run_twice(tiny_bert: Path, keyword_dataset: Path, tmp_path: Path) -> None:
    spec = make_spec(tiny_bert, hyperparameters=dataclasses.replace(FAST, epochs=2, seed=7))
    runs = []
    for name in ("a", "b"):
        finished, events = run(spec, keyword_dataset, tmp_path / name)
        assert finished.outcome is Outcome.SUCCEEDED
        with tarfile.open(tmp_path / name / "artifact.tar") as tar:
            tar.extract("model.safetensors", tmp_path / name / "unpacked", filter="data")
        runs.append(
            (
                [e.loss for e in of_type(events, TrainingProgress)],
                load_file(tmp_path / name / "unpacked" / "model.safetensors"),
            )
        )
    (losses_a, weights_a), (losses_b, weights_b) = runs
    assert losses_a == losses_b
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    other, events = run(
        dataclasses.replace(spec, hyperparameters=dataclasses.replace(FAST, epochs=2, seed=8)),
        keyword_dataset,
        tmp_path / "c",
    )
    assert other.outcome is Outcome.SUCCEEDED
    assert [e.loss for e in of_type(events, TrainingProgress)] != losses_a, "another seed, another run"


def trained_weights(work: Path) -> dict[str, torch.Tensor]:
    with tarfile.open(work / "artifact.tar") as tar:
        tar.extract("model.safetensors", work / "unpacked", filter="data")
    return load_file(work / "unpacked" / "model.safetensors")


def test_frozen_backbone_trains_only_the_head(tiny_bert: Path, keyword_dataset: Path, tmp_path: Path) -> None:
    initial = load_file(tiny_bert / "model.safetensors")
    spec = make_spec(tiny_bert, adaptation=AdaptationSettings(method=AdaptationMethod.FROZEN_BACKBONE))
    finished, events = run(spec, keyword_dataset, tmp_path)
    assert finished.outcome is Outcome.SUCCEEDED
    assert any("of 21,475 parameters train" in getattr(e, "message", "") for e in events)
    after = trained_weights(tmp_path)
    backbone = [k for k in after if k.startswith("bert.")]
    assert backbone and all(torch.equal(after[k], initial[k]) for k in backbone)


def test_freeze_first_blocks_freezes_embeddings_and_those_blocks(
    tiny_bert: Path, keyword_dataset: Path, tmp_path: Path
) -> None:
    initial = load_file(tiny_bert / "model.safetensors")
    spec = make_spec(tiny_bert, adaptation=AdaptationSettings(AdaptationMethod.FREEZE_FIRST_BLOCKS, 1))
    finished, _ = run(spec, keyword_dataset, tmp_path)
    assert finished.outcome is Outcome.SUCCEEDED
    after = trained_weights(tmp_path)
    frozen = [k for k in after if k.startswith(("bert.embeddings.", "bert.encoder.layer.0."))]
    trained = [k for k in after if k.startswith("bert.encoder.layer.1.")]
    assert frozen and all(torch.equal(after[k], initial[k]) for k in frozen)
    assert any(not torch.equal(after[k], initial[k]) for k in trained)


def test_too_many_frozen_blocks_fails_with_the_count(tiny_bert: Path, keyword_dataset: Path, tmp_path: Path) -> None:
    spec = make_spec(tiny_bert, adaptation=AdaptationSettings(AdaptationMethod.FREEZE_FIRST_BLOCKS, 5))
    finished, _ = run(spec, keyword_dataset, tmp_path)
    assert (finished.outcome, finished.reason) == (Outcome.FAILED, "INVALID_SPEC")
    assert "has only 2 blocks" in finished.message


def test_custom_head_round_trips_through_the_artifact(tiny_bert: Path, keyword_dataset: Path, tmp_path: Path) -> None:
    spec = make_spec(tiny_bert, head=HeadSettings(hidden_sizes=(24,), dropout=0.1))
    finished, events = run(spec, keyword_dataset, tmp_path)
    assert finished.outcome is Outcome.SUCCEEDED
    assert of_type(events, EvaluationDone)[-1].metrics["eval_accuracy"] >= 0.85
    with tarfile.open(tmp_path / "artifact.tar") as tar:
        tar.extractall(tmp_path / "model", filter="data")
    model = load_artifact_model(tmp_path / "model", AutoModelForSequenceClassification)
    head = model.get_submodule("classifier")
    assert isinstance(head, torch.nn.Sequential) and head[0].out_features == 24
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    rows = keyword_rows(30, seed=5)
    with torch.inference_mode():
        logits = model(**tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")).logits
    predicted = [model.config.id2label[int(i)] for i in logits.argmax(-1)]
    assert sum(p == r["label"] for p, r in zip(predicted, rows, strict=True)) >= 25  # chance is 10


def test_accumulation_sgd_step_schedule_and_max_steps(tiny_bert: Path, keyword_dataset: Path, tmp_path: Path) -> None:
    hp = Hyperparameters(
        epochs=5,
        batch_size=8,
        gradient_accumulation_steps=2,
        optimizer=OptimizerKind.SGD,
        learning_rate=0.1,
        schedule=ScheduleSettings(kind=ScheduleKind.STEP, step_size=5, gamma=0.5),
        max_steps=12,
    )
    finished, events = run(
        make_spec(tiny_bert, hyperparameters=hp, evaluation=EvaluationSettings(log_every_steps=1)),
        keyword_dataset,
        tmp_path,
    )
    assert finished.outcome is Outcome.SUCCEEDED
    progress = of_type(events, TrainingProgress)
    assert [p.step for p in progress] == list(range(1, 13))
    assert [p.learning_rate for p in progress][3:6] == pytest.approx([0.1, 0.05, 0.05])  # rate after steps 4, 5, 6
    assert all(p.samples_per_second > 0 for p in progress)


def test_cancel_stops_at_the_next_step(tiny_bert: Path, keyword_dataset: Path, tmp_path: Path) -> None:
    cancel = threading.Event()

    def cancel_after_first_report(event: WorkerEvent) -> None:
        if isinstance(event, TrainingProgress):
            cancel.set()

    spec = make_spec(tiny_bert, hyperparameters=dataclasses.replace(FAST, epochs=50))
    finished, events = run(spec, keyword_dataset, tmp_path, cancel, cancel_after_first_report)
    assert finished.outcome is Outcome.CANCELLED
    assert len(of_type(events, TrainingProgress)) == 1
    assert not (tmp_path / "artifact.tar").exists()


def test_bad_rows_fail_the_job_with_the_line(tiny_bert: Path, tmp_path: Path) -> None:
    rows = keyword_rows(10)
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    data.write_text(data.read_text() + '{"text": "oops"}\n')
    finished, _ = run(make_spec(tiny_bert), data, tmp_path)
    assert (finished.outcome, finished.reason) == (Outcome.FAILED, "INVALID_DATASET")
    assert "bad.jsonl line 11: missing column 'label'" in finished.message


def test_an_unloadable_model_fails_with_model_load_failed(keyword_dataset: Path, tmp_path: Path) -> None:
    finished, _ = run(make_spec(Path("no-such-org/no-such-model")), keyword_dataset, tmp_path)
    assert (finished.outcome, finished.reason) == (Outcome.FAILED, "MODEL_LOAD_FAILED")
    assert "no-such-org/no-such-model" in finished.message


def test_models_that_could_run_code_fail_as_unsafe(tiny_bert: Path, keyword_dataset: Path, tmp_path: Path) -> None:
    """As a hub model would arrive (the server checks local folders before a job starts): pickled weights only, or
    code of its own. Neither is ever loaded."""
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_bert / "config.json", pickled / "config.json")
    for name in ("vocab.txt", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json"):
        if (tiny_bert / name).exists():
            shutil.copy(tiny_bert / name, pickled / name)
    torch.save(load_file(tiny_bert / "model.safetensors"), pickled / "pytorch_model.bin")
    remote = tmp_path / "remote"
    shutil.copytree(tiny_bert, remote)
    config = json.loads((remote / "config.json").read_text())
    config.update(model_type="tuneforge-remote-test", auto_map={"AutoConfig": "configuration_x.XConfig"})
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "configuration_x.py").write_text("raise SystemExit('remote code ran')\n")
    for folder, words in ((pickled, "no safetensors weights"), (remote, "needs remote code")):
        finished, _ = run(make_spec(folder), keyword_dataset, tmp_path / f"work-{folder.name}")
        assert (finished.outcome, finished.reason) == (Outcome.FAILED, "UNSAFE_MODEL"), finished.message
        assert words in finished.message


@pytest.mark.needs_gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trains_on_cuda_with_bf16_autocast(tiny_bert: Path, keyword_dataset: Path, tmp_path: Path) -> None:
    finished, events = run(make_spec(tiny_bert), keyword_dataset, tmp_path, device="cuda")
    assert finished.outcome is Outcome.SUCCEEDED, finished.message
    assert of_type(events, EvaluationDone)[-1].metrics["eval_accuracy"] >= 0.85
    assert any("on cuda" in getattr(e, "message", "") for e in events)
