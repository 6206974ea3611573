"""Training faults in the core: out of memory backs off to smaller micro-batches with the same effective batch,
non-finite steps are skipped up to a limit, max_runtime ends the run after a checkpoint, retention keeps K
checkpoints, and a full disk is recognised however a library wraps it."""

from __future__ import annotations

import dataclasses
import errno
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.core.test_resume import assert_same_run
from tests.core.test_training_core import FAST, make_spec, of_type, run
from tuneforge.workers.core.faults import ENVIRONMENT_VARIABLE, injected_faults
from tuneforge.workers.core.runner import MEMORY_PLAN, is_disk_full
from tuneforge.workers.messages import CheckpointWritten, LogEmitted, Outcome, TrainingProgress
from tuneforge.workers.spec import EvaluationSettings


@pytest.fixture
def inject(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """Sets the worker's injected faults for one test (the core reads them once per process)."""

    def set_faults(**faults: object) -> None:
        monkeypatch.setenv(ENVIRONMENT_VARIABLE, json.dumps(faults))
        injected_faults.cache_clear()

    yield set_faults
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    injected_faults.cache_clear()


def warnings(events: list[object]) -> list[str]:
    return [e.message for e in of_type(events, LogEmitted)]  # type: ignore[arg-type]


def test_out_of_memory_halves_the_micro_batch_and_the_run_is_the_same(
    tiny_bert: Path, keyword_dataset: Path, tmp_path: Path, inject: object
) -> None:
    spec = make_spec(tiny_bert, hyperparameters=dataclasses.replace(FAST, epochs=2, seed=3))
    inject(oom_above_micro_batch=2)  # type: ignore[operator]
    finished, events = run(spec, keyword_dataset, tmp_path / "backed-off")
    assert finished.outcome is Outcome.SUCCEEDED, finished.message
    notes = [n for n in warnings(events) if n.startswith("out of memory")]
    assert len(notes) == 2
    assert "micro-batch of 8" in notes[0] and "micro-batches of 4 and 2 accumulation steps" in notes[0]
    assert "micro-batches of 2 and 4 accumulation steps (effective batch 8 unchanged)" in notes[1]
    plan = json.loads((tmp_path / "backed-off" / "checkpoints" / MEMORY_PLAN).read_text())
    assert plan == {"micro_batch_size": 2}, "later attempts keep the micro-batch that fits"

    inject()  # type: ignore[operator]
    reference = make_spec(
        tiny_bert, hyperparameters=dataclasses.replace(FAST, epochs=2, seed=3, gradient_accumulation_steps=4)
    )
    finished, _ = run(reference, keyword_dataset, tmp_path / "reference")
    assert finished.outcome is Outcome.SUCCEEDED
    assert_same_run(tmp_path / "reference", tmp_path / "backed-off")


def test_out_of_memory_mid_accumulation_restarts_the_step_cleanly(
    tiny_bert: Path, keyword_dataset: Path, tmp_path: Path, inject: object
) -> None:
    """Micro-batches of 4, two per step: the 6th micro-batch (the second half of step 3) runs out of memory after
    the first half's gradients were added up. The retry must not carry them over: the run equals one made with
    micro-batches of 2 from the start."""
    hp = dataclasses.replace(FAST, epochs=2, seed=3, gradient_accumulation_steps=2)
    spec = make_spec(
        tiny_bert, hyperparameters=hp, evaluation=EvaluationSettings(log_every_steps=1, eval_every_steps=6)
    )
    inject(oom_at_micro_batches=[6])  # type: ignore[operator]
    finished, events = run(spec, keyword_dataset, tmp_path / "backed-off")
    assert finished.outcome is Outcome.SUCCEEDED, finished.message
    notes = [n for n in warnings(events) if n.startswith("out of memory")]
    assert notes == [
        "out of memory with a micro-batch of 4 (injected: micro-batch 6 ran out of memory): retrying with "
        "micro-batches of 2 and 4 accumulation steps (effective batch 8 unchanged), from the newest checkpoint"
    ]
    steps = [e.step for e in of_type(events, TrainingProgress)]
    assert steps[:5] == [1, 2, 1, 2, 3], "steps 1-2, the lost step 3, then from the start (no checkpoint yet)"

    inject()  # type: ignore[operator]
    reference = dataclasses.replace(spec, hyperparameters=dataclasses.replace(hp, gradient_accumulation_steps=4))
    finished, _ = run(reference, keyword_dataset, tmp_path / "reference")
    assert finished.outcome is Outcome.SUCCEEDED
    assert_same_run(tmp_path / "reference", tmp_path / "backed-off")


def test_out_of_memory_at_a_micro_batch_of_one_fails(
    tiny_bert: Path, keyword_dataset: Path, tmp_path: Path, inject: object
) -> None:
    inject(oom_above_micro_batch=0)  # type: ignore[operator]
    finished, events = run(make_spec(tiny_bert), keyword_dataset, tmp_path)
    assert (finished.outcome, finished.reason) == (Outcome.FAILED, "OUT_OF_MEMORY"), finished
    assert "even with a micro-batch of 1" in finished.message
    assert len([n for n in warnings(events) if n.startswith("out of memory")]) == 3  # 8 -> 4 -> 2 -> 1


def test_a_non_finite_step_is_skipped_when_allowed(
    tiny_bert: Path, keyword_dataset: Path, tmp_path: Path, inject: object
) -> None:
    inject(non_finite_loss_at_steps=[3])  # type: ignore[operator]
    hp = dataclasses.replace(FAST, epochs=1, max_skipped_non_finite_steps=1)
    finished, events = run(make_spec(tiny_bert, hyperparameters=hp), keyword_dataset, tmp_path)
    assert finished.outcome is Outcome.SUCCEEDED, finished.message
    assert [n for n in warnings(events) if "skipped without an update" in n] == [
        "step 3: the loss was nan; skipped without an update (1 of 1)"
    ]
    assert all(e.loss == e.loss for e in of_type(events, TrainingProgress)), "reported losses stay finite"


@pytest.mark.parametrize(
    ("skips", "message"),
    [
        (0, r"the training loss became (nan|inf|-inf) at step \d+; lower the learning rate or enable clipping"),
        (
            2,
            r"the training loss was (nan|inf|-inf) at step \d+, after 2 skipped steps; lower the learning rate or "
            r"enable clipping",
        ),
    ],
    ids=["no-skips", "after-two-skips"],
)
def test_a_diverging_run_fails_with_the_step(
    tiny_bert: Path, keyword_dataset: Path, tmp_path: Path, skips: int, message: str
) -> None:
    """Diverging for real (a learning rate of 1e30, no clipping): without skips allowed, the first report with a
    non-finite mean fails the job; with two allowed, the third non-finite step does."""
    hp = dataclasses.replace(FAST, learning_rate=1e30, max_grad_norm=0.0, max_skipped_non_finite_steps=skips)
    finished, events = run(make_spec(tiny_bert, hyperparameters=hp), keyword_dataset, tmp_path)
    assert (finished.outcome, finished.reason) == (Outcome.FAILED, "NON_FINITE_LOSS"), finished
    assert re.fullmatch(message, finished.message), finished.message
    assert len([n for n in warnings(events) if "skipped without an update" in n]) == skips


def test_max_runtime_ends_the_run_after_a_checkpoint(tiny_bert: Path, keyword_dataset: Path, tmp_path: Path) -> None:
    spec = make_spec(tiny_bert, hyperparameters=dataclasses.replace(FAST, epochs=1000))
    finished, events = run(spec, keyword_dataset, tmp_path, time_limit_s=3.0)
    assert (finished.outcome, finished.reason) == (Outcome.FAILED, "DEADLINE_EXCEEDED"), finished
    assert "a checkpoint was saved" in finished.message
    last = of_type(events, CheckpointWritten)[-1]
    assert f"at step {last.step} of 12000" in finished.message, "the final checkpoint is at the step it stopped"
    assert (tmp_path / "checkpoints" / f"step-{last.step:06d}").is_dir()


def test_retention_keeps_the_newest_k_and_the_best(tiny_bert: Path, keyword_dataset: Path, tmp_path: Path) -> None:
    spec = make_spec(
        tiny_bert,
        hyperparameters=dataclasses.replace(FAST, epochs=2),
        evaluation=EvaluationSettings(log_every_steps=4, checkpoint_every_steps=4, keep_checkpoints=3),
    )
    finished, events = run(spec, keyword_dataset, tmp_path)
    assert finished.outcome is Outcome.SUCCEEDED
    assert len(of_type(events, CheckpointWritten)) == 6
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if not p.name.endswith(".json"))
    assert kept == ["best", "serving", "step-000016", "step-000020", "step-000024"]  # serving/: Predict


def test_a_full_disk_is_recognised_through_wrappers() -> None:
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("could not write the checkpoint") from inner
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped)
    assert is_disk_full(Exception("Error while serializing: IoError(Os { code: 28, message: No space left on device"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
