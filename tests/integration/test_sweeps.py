"""Sweeps through the real server: random search with the median pruner, two trials at a time, weak trials pruned
(their workers freed) across a server restart, the best trial's model downloadable; TPE with successive halving one
trial at a time, replayed decision by decision against Optuna; a grid run to its end; budgets and cancels; and a
bad search space refused field by field."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import optuna
import pytest
from google.protobuf import struct_pb2

from tests.integration.conftest import SERVER_ARGS
from tests.integration.helpers import STATE, text_spec, wait_for_end
from tuneforge.clients.client import TuneforgeClient, TuneforgeError
from tuneforge.clients.local_server import start_local_server
from tuneforge.v1 import sweeps_pb2 as sw

pytestmark = pytest.mark.integration
TRIAL = sw.Trial.State


def choices(*names: str) -> sw.Categorical:
    return sw.Categorical(values=[struct_pb2.Value(string_value=n) for n in names])


def sweep_spec(model: Path, training_file: str) -> sw.SweepSpec:
    base = text_spec(model, training_file, epochs=6)
    return sw.SweepSpec(
        base=base,
        parameters=[
            sw.Parameter(
                field="hyperparameters.learning_rate", float_range=sw.FloatRange(min=1e-5, max=3e-2, log=True)
            ),
            sw.Parameter(field="adaptation.method", categorical=choices("FULL", "FROZEN_BACKBONE")),
        ],
        objective=sw.Objective(metric="eval_accuracy"),
        algorithm=sw.SweepSpec.TPE,
        pruner=sw.SweepSpec.SUCCESSIVE_HALVING,
        min_evaluations=1,
        reduction_factor=2,
        max_trials=6,
        parallelism=2,
        seed=7,
    )


def test_a_sweep_prunes_weak_trials_survives_a_restart_and_keeps_the_best_model(
    tmp_path: Path, model_root: Path, tiny_bert: Path, keyword_dataset: Path
) -> None:
    data_dir = tmp_path / "data"
    server = start_local_server(data_dir, 2, [model_root], SERVER_ARGS)
    port = int(server.target.rsplit(":", 1)[1])
    client = TuneforgeClient(server.target, timeout_s=30)
    try:
        client.wait_until_serving(120)
        file = client.upload_file(keyword_dataset)
        spec = sweep_spec(tiny_bert, file.name)
        # What this test checks (pruned trials are cancelled and free their workers, across a restart) must not hang
        # on timing. Seeded random points do not depend on which trials finished first, as TPE's guided ones do;
        # and the median pruner compares each trial with the trials already completed, where successive halving
        # compares trials that race each other to each rung (on this easy data many tie at full accuracy).
        spec.algorithm = sw.SweepSpec.RANDOM
        spec.pruner = sw.SweepSpec.MEDIAN
        spec.base.hyperparameters.epochs = 16  # a pruned trial still has most of its run ahead when the cancel lands
        sweep = client.create_sweep(spec, display_name="lr and freezing")
        assert sweep.state == sw.Sweep.RUNNING and len(sweep.trials) == 2, "parallelism 2 starts two trials"

        events = []
        for event in client.watch_sweep(sweep.name, timeout_s=300):
            events.append(event)
            if sum(e.trial.state not in (0, TRIAL.RUNNING) for e in events if e.HasField("trial")) >= 2:
                break
        assert server.stop() == 0  # mid-way: two trials ended, others running
        server = start_local_server(data_dir, 2, [model_root], SERVER_ARGS, port=port)
        client.wait_until_serving(120)
        events += list(client.watch_sweep(sweep.name, after_sequence=events[-1].sequence, timeout_s=300))

        final = client.get_sweep(sweep.name)
        assert final.state == sw.Sweep.SUCCEEDED, final.error
        assert [t.number for t in final.trials] == list(range(6))
        assert [e.sequence for e in events] == list(range(1, len(events) + 1)), "no event lost or repeated"
        jobs = {job.name: job for job in client.list_jobs()}
        assert sorted(jobs) == sorted(t.job for t in final.trials), "one job per trial, none twice"
        assert all(job.sweep == sweep.name for job in jobs.values())

        pruned = [t for t in final.trials if t.state == TRIAL.PRUNED]
        assert pruned, f"the pruner stopped no trial: {[(t.number, t.state, t.value) for t in final.trials]}"
        for trial in pruned:
            # At which evaluation depends on which trials had completed by then; that its job stops does not.
            assert jobs[trial.job].state == STATE.CANCELLED, "pruned: its job was cancelled, its worker freed"
        completed = [t for t in final.trials if t.state == TRIAL.COMPLETE]
        assert completed and final.best_trial.value == max(t.value for t in completed)
        assert final.best_trial.number in {t.number for t in completed}
        assert final.best_trial.params["adaptation.method"].string_value in ("FULL", "FROZEN_BACKBONE")

        running, most = 0, 0
        for event in events:
            if event.HasField("trial"):
                running += 1 if event.trial.state == TRIAL.RUNNING else -1
                most = max(most, running)
        assert most == 2, "two trials at a time"

        best = wait_for_end(client, final.best_trial.job)
        client.download_artifact(best.name, tmp_path / "best.tar")
        with tarfile.open(tmp_path / "best.tar") as tar:
            assert "model.safetensors" in tar.getnames()
    finally:
        client.close()
        assert server.stop() == 0


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, model_root: Path, keyword_dataset: Path) -> Iterator[Shared]:
    """One server with two workers for the tests that need no restart of their own."""
    server = start_local_server(tmp_path_factory.mktemp("sweeps"), 2, [model_root], SERVER_ARGS)
    try:
        with TuneforgeClient(server.target, timeout_s=30) as client:
            client.wait_until_serving(120)
            yield Shared(client, client.upload_file(keyword_dataset).name)
    finally:
        assert server.stop() == 0


@dataclass
class Shared:
    client: TuneforgeClient
    file: str


def run_to_end(client: TuneforgeClient, spec: sw.SweepSpec) -> sw.Sweep:
    sweep = client.create_sweep(spec)
    for _ in client.watch_sweep(sweep.name, timeout_s=300):
        pass
    return client.get_sweep(sweep.name)


def param_value(value: struct_pb2.Value) -> object:
    return value.string_value if value.WhichOneof("kind") == "string_value" else value.number_value


def test_tpe_with_successive_halving_proposes_and_prunes_as_optuna_does(shared: Shared, tiny_bert: Path) -> None:
    """One trial at a time, so every decision is deterministic: Optuna's own TPE sampler and successive-halving
    pruner, fed the evaluations each trial's job reported, must propose the same points and prune the same trials
    at the same evaluation; a random search would have proposed other points."""
    spec = sweep_spec(tiny_bert, shared.file)
    spec.objective.metric = "eval_loss"  # continuous: no ties at full accuracy, so the rungs rank every trial
    spec.max_trials, spec.parallelism = 5, 1
    spec.base.hyperparameters.epochs = 3
    final = run_to_end(shared.client, spec)
    assert final.state == sw.Sweep.SUCCEEDED, final.error
    assert [t.number for t in final.trials] == list(range(5))

    distributions = {
        "hyperparameters.learning_rate": optuna.distributions.FloatDistribution(1e-5, 3e-2, log=True),
        "adaptation.method": optuna.distributions.CategoricalDistribution(["FULL", "FROZEN_BACKBONE"]),
    }
    sampler = optuna.samplers.TPESampler(seed=7, n_startup_trials=2, constant_liar=True)
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)
    study = optuna.create_study(sampler=sampler, pruner=pruner, direction="minimize")
    randomly = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=7))
    for trial in final.trials:
        proposed = study.ask(distributions)
        assert {k: param_value(v) for k, v in trial.params.items()} == proposed.params, trial.number
        if trial.number >= 2:
            assert randomly.ask(distributions).params != proposed.params, "TPE guided this point"
        events = shared.client.list_job_events(trial.job)
        losses = [e.evaluation_metrics.metrics["eval_loss"] for e in events if e.HasField("evaluation_metrics")]
        pruned_at = None
        for index, loss in enumerate(losses, start=1):
            proposed.report(loss, index)
            if proposed.should_prune():
                pruned_at = index
                break
        if pruned_at is None:
            assert trial.state == TRIAL.COMPLETE and trial.value == min(losses), trial
            study.tell(proposed, trial.value)
        else:
            assert (trial.state, trial.evaluations) == (TRIAL.PRUNED, pruned_at), trial
            study.tell(proposed, state=optuna.trial.TrialState.PRUNED)
    states = [t.state for t in final.trials]
    assert TRIAL.PRUNED in states and TRIAL.COMPLETE in states, "both paths were taken"


def test_a_grid_sweep_runs_every_point_to_its_end(shared: Shared, tiny_bert: Path) -> None:
    spec = sweep_spec(tiny_bert, shared.file)
    del spec.parameters[:]
    spec.parameters.extend([
        sw.Parameter(field="hyperparameters.epochs", int_range=sw.IntRange(min=1, max=2)),
        sw.Parameter(field="adaptation.method", categorical=choices("FULL", "FROZEN_BACKBONE")),
    ])  # fmt: skip
    spec.algorithm, spec.pruner, spec.max_trials = sw.SweepSpec.GRID, sw.SweepSpec.NONE, 0
    final = run_to_end(shared.client, spec)
    assert final.state == sw.Sweep.SUCCEEDED, final.error
    points = sorted((int(t.params["hyperparameters.epochs"].number_value), t.params["adaptation.method"].string_value)
                    for t in final.trials)  # fmt: skip
    assert points == [(1, "FROZEN_BACKBONE"), (1, "FULL"), (2, "FROZEN_BACKBONE"), (2, "FULL")]
    assert [t.state for t in final.trials] == [TRIAL.COMPLETE] * 4
    for trial in final.trials:
        assert wait_for_end(shared.client, trial.job).state == STATE.SUCCEEDED
    assert final.best_trial.value == max(t.value for t in final.trials)


def test_a_bad_search_space_is_refused_field_by_field(shared: Shared, tiny_bert: Path) -> None:
    before = shared.client.list_sweeps()
    spec = sweep_spec(tiny_bert, "files/does-not-exist")
    spec.parameters[0].float_range.max = 50.0  # the job validator caps learning_rate at 10
    spec.parameters.append(sw.Parameter(field="hyperparameters.nope", int_range=sw.IntRange(min=1, max=2)))
    spec.parameters.append(sw.Parameter(field="adaptation.method", categorical=choices("FULL", "SIDEWAYS")))
    spec.objective.metric = "eval_wer"
    with pytest.raises(TuneforgeError) as refused:
        shared.client.create_sweep(spec)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(refused.value.field_violations) == {
        "sweep.spec.parameters[0]",  # its upper end, 50, is a learning rate no job accepts
        "sweep.spec.parameters[2].field",
        "sweep.spec.parameters[3].categorical.values[1]",
        "sweep.spec.parameters[3].field",  # adaptation.method a second time
        "sweep.spec.objective.metric",
        "sweep.spec.base.data.training_file",
    }, sorted(refused.value.field_violations)
    assert shared.client.list_sweeps() == before


def test_budget_stops_new_trials_and_cancel_stops_running_ones(shared: Shared, tiny_bert: Path) -> None:
    client = shared.client
    budgeted = sweep_spec(tiny_bert, shared.file)
    budgeted.pruner = sw.SweepSpec.NONE
    budgeted.algorithm = sw.SweepSpec.RANDOM
    budgeted.max_trials, budgeted.parallelism = 20, 1
    budgeted.base.hyperparameters.epochs = 1
    budgeted.worker_time_budget.FromMilliseconds(10)  # spent by the first trial, however fast
    final = run_to_end(client, budgeted)
    assert final.state == sw.Sweep.SUCCEEDED and len(final.trials) == 1, final
    assert final.worker_time_used.ToTimedelta().total_seconds() >= 0.01

    endless = sweep_spec(tiny_bert, shared.file)
    endless.base.hyperparameters.epochs = 1000
    endless.pruner = sw.SweepSpec.NONE
    running = client.create_sweep(endless)
    cancelled = client.cancel_sweep(running.name)
    assert cancelled.state == sw.Sweep.CANCELLED
    assert {t.error.reason for t in cancelled.trials} == {"CANCELLED"}
    for trial in cancelled.trials:
        assert wait_for_end(client, trial.job).state == STATE.CANCELLED
    with pytest.raises(TuneforgeError) as again:
        client.cancel_sweep(running.name)
    assert again.value.code == grpc.StatusCode.FAILED_PRECONDITION
