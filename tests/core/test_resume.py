"""Exact resume: a run stopped mid-way and resumed from its last checkpoint ends with the same weights and metrics as
the same run without interruption (dropout, shuffling, accumulation, schedule and augmentation included)."""

from __future__ import annotations

import dataclasses
import json
import tarfile
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.core.test_training_core import FAST, make_spec, of_type, run
from tests.media import make_tiny_vit, write_shapes_zip
from tuneforge.workers.messages import EvaluationDone, LogEmitted, Outcome, TrainingProgress, WorkerEvent
from tuneforge.workers.spec import (
    AugmentationSettings,
    DataSettings,
    EvaluationSettings,
    ScheduleKind,
    ScheduleSettings,
    TrainingSpec,
)


def artifact_state(work: Path) -> tuple[dict[str, torch.Tensor], dict]:  # type: ignore[type-arg]
    with tarfile.open(work / "artifact.tar") as tar:
        tar.extractall(work / "unpacked", filter="data")
    return load_file(work / "unpacked" / "model.safetensors"), json.loads(
        (work / "unpacked" / "metrics.json").read_text()
    )


def interrupted_then_resumed(spec: TrainingSpec, data: Path, work: Path, stop_at: int) -> list[WorkerEvent]:
    cancel = threading.Event()

    def stop(event: WorkerEvent) -> None:
        if isinstance(event, TrainingProgress) and event.step >= stop_at:
            cancel.set()

    first, _ = run(spec, data, work, cancel, stop)
    assert first.outcome is Outcome.CANCELLED
    second, events = run(spec, data, work)
    assert second.outcome is Outcome.SUCCEEDED, second.message
    return events


def assert_same_run(uninterrupted: Path, resumed: Path) -> None:
    """Bit for bit: every weight and the whole metrics.json. On the CPU the core is deterministic, and resuming
    restores everything a step depends on, so no tolerance is needed (or allowed)."""
    weights_a, metrics_a = artifact_state(uninterrupted)
    weights_b, metrics_b = artifact_state(resumed)
    assert weights_a.keys() == weights_b.keys()
    different = [name for name in weights_a if not torch.equal(weights_a[name], weights_b[name])]
    assert not different, f"weights differ: {different}"
    assert metrics_a == metrics_b


def test_text_resume_equals_uninterrupted(tiny_bert: Path, keyword_dataset: Path, tmp_path: Path) -> None:
    spec = make_spec(
        tiny_bert,
        hyperparameters=dataclasses.replace(
            FAST,
            epochs=3,
            gradient_accumulation_steps=2,
            seed=3,
            schedule=ScheduleSettings(kind=ScheduleKind.COSINE, warmup_ratio=0.2),
        ),
        evaluation=EvaluationSettings(log_every_steps=1, eval_every_steps=7, checkpoint_every_steps=5),
    )
    plain, _ = run(spec, keyword_dataset, tmp_path / "plain")
    assert plain.outcome is Outcome.SUCCEEDED
    events = interrupted_then_resumed(spec, keyword_dataset, tmp_path / "resumed", stop_at=17)
    assert "resumed from the checkpoint at step 15 (attempt 1)" in [e.message for e in of_type(events, LogEmitted)]
    assert of_type(events, TrainingProgress)[0].step == 16
    assert_same_run(tmp_path / "plain", tmp_path / "resumed")


def test_resume_at_an_epoch_boundary_with_augmented_images(tmp_path: Path) -> None:
    model = make_tiny_vit(tmp_path / "vit")
    archive = write_shapes_zip(tmp_path / "shapes.zip", per_class=8)
    spec = make_spec(
        model,
        task="image_classification",
        hyperparameters=dataclasses.replace(FAST, epochs=3, learning_rate=3e-3, seed=5),
        evaluation=EvaluationSettings(log_every_steps=1),
    )
    spec = dataclasses.replace(
        spec,
        data=DataSettings(
            training_file="files/t", validation_fraction=0.25, augmentation=AugmentationSettings(crop_scale_min=0.6)
        ),
    )
    plain, _ = run(spec, archive, tmp_path / "plain")
    assert plain.outcome is Outcome.SUCCEEDED
    events = interrupted_then_resumed(spec, archive, tmp_path / "resumed", stop_at=4)  # 3 steps an epoch
    assert len(of_type(events, EvaluationDone)) == 2, "the finished epoch is not evaluated again"
    assert_same_run(tmp_path / "plain", tmp_path / "resumed")


def test_a_report_window_a_checkpoint_cut_averages_the_same_steps_after_resuming(
    tiny_bert: Path, keyword_dataset: Path, tmp_path: Path
) -> None:
    """Reports every 4 steps, a checkpoint at step 6: the report at step 8 averages steps 5 to 8 whether or not the
    run stopped in between (the checkpoint keeps the open window's loss)."""
    spec = make_spec(
        tiny_bert,
        hyperparameters=dataclasses.replace(FAST, epochs=2, seed=3),
        evaluation=EvaluationSettings(log_every_steps=4, checkpoint_every_steps=6),
    )
    plain, plain_events = run(spec, keyword_dataset, tmp_path / "plain")
    assert plain.outcome is Outcome.SUCCEEDED
    events = interrupted_then_resumed(spec, keyword_dataset, tmp_path / "resumed", stop_at=8)
    assert "resumed from the checkpoint at step 6 (attempt 1)" in [e.message for e in of_type(events, LogEmitted)]
    first = of_type(events, TrainingProgress)[0]
    same = next(e for e in of_type(plain_events, TrainingProgress) if e.step == 8)
    assert (first.step, first.window_steps, first.window_samples) == (8, 4, same.window_samples)
    assert_same_run(tmp_path / "plain", tmp_path / "resumed")


def stopped_at_a_checkpoint(tiny_bert: Path, data: Path, work: Path) -> tuple[TrainingSpec, Path]:
    """A run cancelled at step 7, its newest checkpoint at step 5; the spec and that checkpoint's state file."""
    spec = make_spec(
        tiny_bert,
        hyperparameters=dataclasses.replace(FAST, epochs=2, seed=3),
        evaluation=EvaluationSettings(log_every_steps=1, checkpoint_every_steps=5),
    )
    cancel = threading.Event()
    first, _ = run(spec, data, work, cancel, lambda e: isinstance(e, TrainingProgress) and e.step >= 7 and cancel.set())
    assert first.outcome is Outcome.CANCELLED
    return spec, work / "checkpoints" / "step-000005" / "trainer_state.json"


def test_a_checkpoint_in_the_older_layout_resumes(tiny_bert: Path, keyword_dataset: Path, tmp_path: Path) -> None:
    """Layout 1: no `layout`, no train_history, baseline_metrics or skipped_non_finite, plateau as a list. It is
    upgraded and resumes exactly (the weights and the evaluation history are the uninterrupted run's)."""
    spec, state_file = stopped_at_a_checkpoint(tiny_bert, keyword_dataset, tmp_path / "resumed")
    state = json.loads(state_file.read_text())
    assert state["layout"] == 3
    for newer in (
        "layout",
        "train_history",
        "baseline_metrics",
        "skipped_non_finite",
        "window_loss",
        "window_steps",
        "window_samples",
    ):
        del state[newer]
    state_file.write_text(json.dumps(state))
    resumed, events = run(spec, keyword_dataset, tmp_path / "resumed")
    assert resumed.outcome is Outcome.SUCCEEDED, resumed.message
    assert "resumed from the checkpoint at step 5 (attempt 1)" in [e.message for e in of_type(events, LogEmitted)]
    plain, _ = run(spec, keyword_dataset, tmp_path / "plain")
    assert plain.outcome is Outcome.SUCCEEDED
    weights_a, metrics_a = artifact_state(tmp_path / "plain")
    weights_b, metrics_b = artifact_state(tmp_path / "resumed")
    assert all(torch.equal(weights_a[name], weights_b[name]) for name in weights_a)
    assert metrics_a["history"] == metrics_b["history"] and metrics_a["best"] == metrics_b["best"]
    assert metrics_b["train_history"] == metrics_a["train_history"][5:], "the older layout kept no training history"


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"layout": 4}, "it has layout 4, and this version reads layouts 1 to 3"),
        ({"epoch": None, "step_in_epoch": None}, "its state lacks ['epoch', 'step_in_epoch'] and has unknown []"),
    ],
    ids=["newer-layout", "fields-missing"],
)
def test_a_checkpoint_this_version_cannot_read_fails_the_job_with_the_reason(
    tiny_bert: Path, keyword_dataset: Path, tmp_path: Path, change: dict[str, object], why: str
) -> None:
    spec, state_file = stopped_at_a_checkpoint(tiny_bert, keyword_dataset, tmp_path)
    state = json.loads(state_file.read_text())
    for key, value in change.items():
        if value is None:
            del state[key]
        else:
            state[key] = value
    state_file.write_text(json.dumps(state))
    finished, _ = run(spec, keyword_dataset, tmp_path)
    assert (finished.outcome, finished.reason) == (Outcome.FAILED, "CHECKPOINT_INCOMPATIBLE"), finished
    assert finished.message == (
        f"the checkpoint step-000005 cannot be resumed by this version: {why}; cancel the job and start it again "
        "(or resume it with the Tuneforge version that wrote the checkpoint)"
    )
