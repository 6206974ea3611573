"""Specs and data a hostile tenant writes, refused or bounded where they enter: a grid too large to build, a hub
id that is a relative path, a head or rank count no worker can hold, a label the size of a book, a message that
would make its job unreadable, a data file read whole, and a worker crash whose traceback names server paths."""

from __future__ import annotations

import contextvars
import json
import logging
import time
import tracemalloc
from pathlib import Path

import optuna
import pytest

from tests.unit.test_search_space import spec as sweep_spec
from tests.unit.test_search_space import values
from tuneforge.server.auth.caller import Caller, Role, calling_as
from tuneforge.server.bounded import MAX_MESSAGE_CHARS, bounded
from tuneforge.server.job_changes import finish
from tuneforge.server.job_states import JobState
from tuneforge.server.memory_estimate import RANK_PROCESS_BYTES, estimate_job_memory, memory_problem
from tuneforge.server.pagination import fit_page, fitting
from tuneforge.server.records import JobRecord
from tuneforge.server.search_space import MAX_GRID_POINTS, make_sampler, plan_search
from tuneforge.server.spec_validation import validate_spec
from tuneforge.v1 import job_spec_pb2 as pb
from tuneforge.v1 import jobs_pb2
from tuneforge.v1 import sweeps_pb2 as sw
from tuneforge.workers.core.errors import InvalidDataset, JobFailure
from tuneforge.workers.core.models import load_pretrained
from tuneforge.workers.core.text_data import MAX_LABEL_CHARS, load_text_dataset, raw_records
from tuneforge.workers.messages import DataFile, RunJob
from tuneforge.workers.process import _crashed
from tuneforge.workers.spec import DataSettings, HeadSettings, TrainingSpec

SEEDS = sw.Parameter(field="hyperparameters.seed", int_range=sw.IntRange(min=0, max=150_000_000))


def test_a_huge_grid_is_refused_from_its_size_without_being_built() -> None:
    began = time.perf_counter()
    plan, bad = plan_search(sweep_spec(SEEDS, algorithm=sw.SweepSpec.GRID), [])
    assert time.perf_counter() - began < 1.0
    assert plan is None and [v.field for v in bad] == ["sweep.spec.parameters"]
    assert f"150,000,001 points (hyperparameters.seed 150,000,001), more than the limit of {MAX_GRID_POINTS:,}" in (
        bad[0].description
    )


def test_a_grid_runs_to_its_end_under_ask_and_tell() -> None:
    """Optuna's own GridSampler calls study.stop() after the last point, which raises outside optimize()."""
    schedule = sw.Parameter(field="hyperparameters.schedule.kind", categorical=values("COSINE", "LINEAR"))
    seeds = sw.Parameter(field="hyperparameters.seed", int_range=sw.IntRange(min=1, max=3))
    plan, bad = plan_search(sweep_spec(schedule, seeds, algorithm=sw.SweepSpec.GRID, max_trials=100), [])
    assert plan is not None and not bad and plan.max_trials == 6
    study = optuna.create_study(sampler=make_sampler(plan))
    seen = set()
    for value in range(plan.max_trials):
        trial = study.ask(plan.distributions)
        seen.add(tuple(sorted(trial.params.items())))
        study.tell(trial, float(value))
    assert len(seen) == 6 and len(study.trials) == 6


def test_a_hub_id_that_exists_as_a_relative_path_is_a_local_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "outside" / "evil").mkdir(parents=True)
    (tmp_path / "outside" / "evil" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    spec = pb.JobSpec(task=pb.TEXT_CLASSIFICATION, base_model="outside/evil", data=pb.DataSpec(training_file="files/f"))
    violations = {v.field: v.description for v in validate_spec(spec, [tmp_path]).violations}
    assert violations == {"job.spec.base_model": "a local model must be an absolute path without `..`"}
    spec.base_model = "org/elsewhere"  # a true hub id (nothing of that name here) still validates
    assert not validate_spec(spec, [tmp_path]).violations
    with pytest.raises(JobFailure, match="relative to the worker's working directory") as failure:
        load_pretrained(object(), "outside/evil")
    assert failure.value.reason == "UNSAFE_MODEL"


def training(head: tuple[int, ...] = (), ranks: int = 1, base_model: str = "org/m") -> TrainingSpec:
    return TrainingSpec(
        "text_classification",
        base_model,
        DataSettings("files/f"),
        head=HeadSettings(head) if head else None,
        ranks=ranks,
    )


def test_heads_and_ranks_that_no_worker_holds_are_refused_with_the_estimate(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 32}))
    (model / "model.safetensors").write_bytes(b"\0" * 1000)
    head = estimate_job_memory(training((65536,) * 8, base_model=str(model)))
    layers = 32 * 65536 + 7 * 65536 * 65536 + 65536 * 2
    assert head.parts["custom head training state per rank"] == layers * 16
    assert head.parts["base model weights per rank"] == 1000
    limit = 12 << 30
    problem = memory_problem(training((65536,) * 8, base_model=str(model)), limit)
    assert problem is not None and problem[0].total_bytes > limit
    assert memory_problem(training((512, 256), base_model=str(model)), limit) is None
    assert estimate_job_memory(training(ranks=64)).total_bytes == 63 * RANK_PROCESS_BYTES
    assert memory_problem(training(ranks=64), limit) is not None
    assert memory_problem(training(ranks=4), limit) is None
    assert memory_problem(training(ranks=64), 0) is None, "no budget: nothing is refused"


def test_a_long_label_is_refused_without_being_quoted(tmp_path: Path) -> None:
    rows = [{"text": "a", "label": "x" * (MAX_LABEL_CHARS + 1)}, {"text": "b", "label": "y"}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InvalidDataset) as failure:
        load_text_dataset(DataFile(str(path), "d.jsonl"), None, DataSettings("files/f"), 0)
    assert f"'label' must be a non-empty string of at most {MAX_LABEL_CHARS} characters" in str(failure.value)
    assert len(str(failure.value)) < 200


def test_stored_failure_messages_and_log_lines_are_bounded() -> None:
    now = time.time()
    record = JobRecord("ft-1", "j", b"", 0, JobState.RUNNING, now, now, start_time=now)
    failed = finish(record, False, "INVALID_DATASET", "label " + "x" * 5_000_000)
    assert failed.record.state is JobState.FAILED
    message = failed.record.error_message
    assert len(message) < MAX_MESSAGE_CHARS + 60 and message.endswith("[... 4,995,910 more characters cut]")
    assert bounded("short") == "short"


def test_a_list_page_ends_early_rather_than_pass_the_message_limit() -> None:
    big = [jobs_pb2.Job(display_name="x" * 1_000_000) for _ in range(5)]
    assert fitting(big) == 3  # 3 MB a page
    assert fitting([jobs_pb2.Job(display_name="x" * 5_000_000)]) == 1, "a page always holds one"
    assert fitting([jobs_pb2.Job(name="jobs/a")] * 50) == 50
    shown, cursor = fit_page(big, [50, 49, 48, 47, 46], None)
    assert (len(shown), cursor) == (3, 48), "the next page starts after the last job shown"
    small = [jobs_pb2.Job(name="jobs/a")] * 2
    assert fit_page(small, [2, 1], 7) == (small, 7), "a page that fits keeps the store's cursor"


def test_text_data_is_read_as_a_stream(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    line = json.dumps({"text": "w " * 500, "label": "a"}) + "\n"
    path.write_text(line * 20_000)  # 20 MB
    tracemalloc.start()
    try:
        count = sum(1 for _ in raw_records(DataFile(str(path), "big.jsonl")))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 20_000 and peak < 2 << 20, f"peak {peak:,} bytes for a 20 MB file read record by record"


def test_a_worker_crash_tells_the_tenant_the_kind_and_an_incident_not_the_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    command = RunJob("ft-1", 1, training(), DataFile("/srv/data/files/x", "x.jsonl"), None, "/srv/w", "/srv/c", "a")
    try:
        [][1]
    except IndexError as exc:
        with caplog.at_level(logging.ERROR):
            finished = _crashed("worker-1", command, exc)
    assert finished.reason == "INTERNAL" and "IndexError" in finished.message
    assert "Traceback" not in finished.message and "/" not in finished.message.replace("operators'", "")
    incident = finished.message.rsplit(" ", 1)[-1]
    assert (
        f"incident {incident}" in caplog.text and "Traceback" in caplog.text and "test_hostile_specs.py" in caplog.text
    )


def test_column_names_are_bounded() -> None:
    spec = pb.JobSpec(task=pb.TEXT_CLASSIFICATION, base_model="org/m", data=pb.DataSpec(training_file="files/f"))
    spec.data.label_column = "c" * 257
    violations = {v.field: v.description for v in validate_spec(spec, []).violations}
    assert violations == {"job.spec.data.label_column": "a column name of at most 256 characters"}


def test_a_caller_set_for_a_stream_is_reset_quietly_from_another_context() -> None:
    """A stream the caller resets is closed by gRPC from another context than the one that set its caller."""
    scope = calling_as(Caller("team-a", Role.USER, "alice"))
    scope.__enter__()
    contextvars.Context().run(scope.__exit__, None, None, None)  # raised "created in a different Context"
