"""Automatic hyperparameters: the range test picks a learning rate inside the band where fixed rates train well, the
memory probe finds the largest micro-batch under an injected limit, epochs follow the data size, every choice comes
with its evidence, and a resumed attempt reuses the choices instead of measuring again."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.core.test_training_core import FAST, make_spec, of_type, run
from tuneforge.clients.artifacts import read_member
from tuneforge.workers.core.auto_tuning import CHOICES_FILE, choose_epochs, choose_epochs_by_tokens
from tuneforge.workers.core.faults import ENVIRONMENT_VARIABLE, injected_faults
from tuneforge.workers.messages import AutoChosen, EvaluationDone, JobStarted, LogEmitted, Outcome
from tuneforge.workers.spec import AutoSettings

GRID = [3e-4, 1e-3, 3e-3, 7e-3, 1.5e-2]
TRAINS_WELL = 0.8


def final_accuracy(events: list[object]) -> float:
    return float(of_type(events, EvaluationDone)[-1].metrics["eval_accuracy"])  # type: ignore[arg-type]


def test_the_range_test_picks_a_rate_where_fixed_rates_train_well(
    tiny_bert: Path, keyword_dataset: Path, tmp_path: Path
) -> None:
    good = []
    for rate in GRID:
        finished, events = run(
            make_spec(tiny_bert, hyperparameters=dataclasses.replace(FAST, learning_rate=rate, epochs=4)),
            keyword_dataset,
            tmp_path / f"grid-{rate}",
        )
        assert finished.outcome is Outcome.SUCCEEDED
        if final_accuracy(events) >= TRAINS_WELL:
            good.append(rate)
    assert 2 <= len(good) < len(GRID), f"the grid shows a band: {good}"

    auto = dataclasses.replace(FAST, learning_rate=0.0, epochs=4, auto=AutoSettings(learning_rate=True))
    finished, events = run(make_spec(tiny_bert, hyperparameters=auto), keyword_dataset, tmp_path / "auto")
    assert finished.outcome is Outcome.SUCCEEDED, finished.message
    [choice] = of_type(events, AutoChosen)
    assert choice.field == "hyperparameters.learning_rate"
    assert min(good) <= choice.value <= max(good), (choice.value, good)
    assert final_accuracy(events) >= TRAINS_WELL, "and it trains well at the chosen rate"
    assert len(choice.evidence) >= 20 and choice.evidence[0][0] == pytest.approx(1e-7), "the curve is the evidence"
    assert "range test" in choice.reason
    manifest = json.loads(read_member(tmp_path / "auto" / "artifact.tar", "manifest.json"))
    [recorded] = manifest["automatic_choices"]  # the lineage says what was chosen, why, and the spec it made
    assert (recorded["field"], recorded["value"]) == (choice.field, choice.value)
    assert manifest["spec"]["hyperparameters"]["learning_rate"] == pytest.approx(choice.value)


@pytest.fixture
def memory_limit(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, json.dumps({"oom_above_micro_batch": 6}))
    injected_faults.cache_clear()
    yield
    monkeypatch.delenv(ENVIRONMENT_VARIABLE)
    injected_faults.cache_clear()


def test_the_probe_finds_the_largest_micro_batch_under_a_memory_limit(
    tiny_bert: Path, keyword_dataset: Path, tmp_path: Path, memory_limit: None
) -> None:
    hp = dataclasses.replace(FAST, batch_size=32, epochs=2, auto=AutoSettings(micro_batch_size=True, epochs=True))
    finished, events = run(make_spec(tiny_bert, hyperparameters=hp), keyword_dataset, tmp_path)
    assert finished.outcome is Outcome.SUCCEEDED, finished.message
    micro, epochs = of_type(events, AutoChosen)
    assert (micro.field, micro.value) == ("micro_batch_size", 4.0)
    assert list(micro.evidence) == [(1.0, 1.0), (2.0, 1.0), (4.0, 1.0), (8.0, 0.0)]
    assert "8 accumulation steps keep the effective batch at 32" in micro.reason
    assert not any("out of memory" in e.message for e in of_type(events, LogEmitted)), "no back-off was needed"
    expected = choose_epochs(90).value  # 90 training examples after the validation split
    assert (epochs.field, epochs.value) == ("hyperparameters.epochs", expected)
    assert of_type(events, JobStarted)[0].total_epochs == expected

    # A later attempt (same checkpoint folder) uses the stored choices instead of measuring again.
    saved = json.loads((tmp_path / "checkpoints" / CHOICES_FILE).read_text())
    assert [c["field"] for c in saved] == ["micro_batch_size", "hyperparameters.epochs"]
    again, events = run(make_spec(tiny_bert, hyperparameters=hp), keyword_dataset, tmp_path)
    assert again.outcome is Outcome.SUCCEEDED
    assert of_type(events, AutoChosen) == []
    assert "using the automatic choices of an earlier attempt" in [e.message for e in of_type(events, LogEmitted)]


def test_epochs_shrink_as_data_grows() -> None:
    chosen = [choose_epochs(n).value for n in (10, 100, 1_000, 10_000, 1_000_000)]
    assert chosen == sorted(chosen, reverse=True) and chosen[0] == 50 and chosen[-1] == 3


def test_language_model_epochs_follow_the_tokens_to_learn() -> None:
    chosen = [choose_epochs_by_tokens(n, 100).value for n in (1_000, 10_000, 111_111, 1_000_000, 50_000_000)]
    assert chosen == [10, 10, 3, 1, 1]
    assert "111,111 learned tokens in 100 training examples" in choose_epochs_by_tokens(111_111, 100).reason
