"""Sweeps through the real server: TPE with successive halving over learning rate and freeze policy, two trials at a
time on two workers, weak trials pruned (their workers freed), a server restart mid-way, the best trial's model
downloadable; and a bad search space refused field by field."""

from __future__ import annotations

import tarfile
from pathlib import Path

import grpc
import pytest
from google.protobuf import struct_pb2
from tuneforge.v1 import sweeps_pb2 as sw

from clients.client import TuneforgeClient, TuneforgeError
from clients.local_server import start_local_server
from tests.integration.conftest import SERVER_ARGS
from tests.integration.helpers import STATE, text_spec, wait_for_end

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


def test_a_bad_search_space_is_refused_field_by_field(tmp_path: Path, model_root: Path, tiny_bert: Path) -> None:
    server = start_local_server(tmp_path / "data", 0, [model_root], SERVER_ARGS)
    try:
        with TuneforgeClient(server.target) as client:
            client.wait_until_serving(60)
            spec = sweep_spec(tiny_bert, "files/does-not-exist")
            spec.parameters[0].float_range.max = 50.0  # the job validator caps learning_rate at 10
            spec.parameters.append(sw.Parameter(field="hyperparameters.nope", int_range=sw.IntRange(min=1, max=2)))
            spec.parameters.append(sw.Parameter(field="adaptation.method", categorical=choices("FULL", "SIDEWAYS")))
            spec.objective.metric = "eval_wer"
            with pytest.raises(TuneforgeError) as refused:
                client.create_sweep(spec)
            assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
            fields = set(refused.value.field_violations)
            assert {
                "sweep.spec.parameters[2].field",
                "sweep.spec.parameters[3].categorical.values[1]",
                "sweep.spec.objective.metric",
                "sweep.spec.base.data.training_file",
            } <= fields, fields
            assert client.list_sweeps() == []
    finally:
        assert server.stop() == 0


def test_budget_stops_new_trials_and_cancel_stops_running_ones(
    tmp_path: Path, model_root: Path, tiny_bert: Path, keyword_dataset: Path
) -> None:
    server = start_local_server(tmp_path / "data", 2, [model_root], SERVER_ARGS)
    try:
        with TuneforgeClient(server.target) as client:
            client.wait_until_serving(120)
            file = client.upload_file(keyword_dataset)
            budgeted = sweep_spec(tiny_bert, file.name)
            budgeted.pruner = sw.SweepSpec.NONE
            budgeted.algorithm = sw.SweepSpec.RANDOM
            budgeted.max_trials, budgeted.parallelism = 20, 1
            budgeted.worker_time_budget.FromMilliseconds(10)  # spent by the first trial, however fast
            swept = client.create_sweep(budgeted)
            for _ in client.watch_sweep(swept.name, timeout_s=300):
                pass
            final = client.get_sweep(swept.name)
            assert final.state == sw.Sweep.SUCCEEDED and len(final.trials) == 1, final
            assert final.worker_time_used.ToTimedelta().total_seconds() >= 0.01

            endless = sweep_spec(tiny_bert, file.name)
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
    finally:
        assert server.stop() == 0
