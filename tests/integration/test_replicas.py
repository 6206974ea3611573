"""Two server replicas sharing one PostgreSQL store and one data dir: both place jobs, none is started twice, and
when one replica dies mid-job the other takes the job over once its lease runs out."""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import SERVER_ARGS
from tests.integration.helpers import STATE, sample, scrape, state_changes, text_spec, wait_for_end, watch_until
from tests.integration.test_sweeps import sweep_spec
from tuneforge.clients.client import TuneforgeClient
from tuneforge.clients.local_server import LocalServer, start_local_server
from tuneforge.v1 import sweeps_pb2 as sw

pytestmark = pytest.mark.integration


@pytest.fixture
def replicas(tmp_path: Path, postgres: Any, model_root: Path) -> Iterator[list[LocalServer]]:
    store = postgres.new_database()
    args = [*SERVER_ARGS, "--store", store, "--lease-timeout-s", "4", "--heartbeat-interval-s", "1"]
    args += ["--restart-backoff-s", "0"]
    started = []
    try:
        for name in ("r1", "r2"):
            started.append(
                start_local_server(
                    tmp_path / "data",
                    workers=1,
                    model_roots=[model_root],
                    extra_args=[*args, "--replica", name],
                    log_path=tmp_path / f"{name}.log",
                )
            )
        for server in started:
            with TuneforgeClient(server.target) as client:
                client.wait_until_serving(120)
        yield started
    finally:
        for server in started:
            server.stop()


def test_replicas_share_the_work_and_never_start_a_job_twice(
    replicas: list[LocalServer], tiny_bert: Path, keyword_dataset: Path
) -> None:
    first, second = replicas
    with TuneforgeClient(first.target) as one, TuneforgeClient(second.target) as two:
        file = one.upload_file(keyword_dataset).name
        names = [one.create_job(text_spec(tiny_bert, file, epochs=1)).name for _ in range(6)]
        names += [two.create_job(text_spec(tiny_bert, file, epochs=1)).name for _ in range(2)]
        finals = [wait_for_end(one, name, timeout_s=300) for name in names]  # replica 1 watches them all
        assert [f.state for f in finals] == [STATE.SUCCEEDED] * 8
        assert {f.attempt for f in finals} == {1}
        for name in names:
            assert state_changes(one.list_job_events(name)).count(STATE.RUNNING) == 1, name
    steps = [
        sample(scrape(server.metrics_url)[1], "tuneforge_training_steps_total", worker=f"r{n}-worker-0")
        for n, server in enumerate(replicas, start=1)
    ]
    assert all(count > 0 for count in steps), f"a replica never trained: steps {steps}"


def test_a_dead_replicas_job_is_taken_over_by_the_other(
    replicas: list[LocalServer], tiny_bert: Path, keyword_dataset: Path
) -> None:
    first, second = replicas
    with TuneforgeClient(first.target) as one:
        file = one.upload_file(keyword_dataset).name
        spec = text_spec(tiny_bert, file, epochs=8)
        spec.evaluation.log_every_steps = 1
        job = one.create_job(spec)
        watch_until(one, job.name, "training_metrics")
        holder = one.get_job(job.name).worker
    dying, surviving = (first, second) if holder.startswith("r1-") else (second, first)
    dying.process.send_signal(signal.SIGKILL)
    dying.process.wait(30)
    with TuneforgeClient(surviving.target) as client:
        final = wait_for_end(client, job.name, timeout_s=300)
        assert final.state == STATE.SUCCEEDED, final.error
        assert (final.attempt, final.restart_count) == (2, 1)
        events = client.list_job_events(job.name)
        assert state_changes(events).count(STATE.RUNNING) == 2
        lease = re.compile(
            rf"{re.escape(holder)} \(another replica\) sent nothing for \d+ s: its lease expired; queued again to "
            r"resume from the newest checkpoint( in \d+ s)? \(restart 1 of \d+\)"
        )
        logged = [e.log.message for e in events if e.WhichOneof("payload") == "log"]
        assert sum(bool(lease.fullmatch(message)) for message in logged) == 1, [m for m in logged if "lease" in m]


def test_a_sweep_goes_on_when_its_driving_replica_dies(
    replicas: list[LocalServer], tiny_bert: Path, keyword_dataset: Path, tmp_path: Path
) -> None:
    """r1 creates, so drives, a sweep of 4 trials, 2 at a time; once a trial has completed r1 is SIGKILLed. r2 takes
    the sweep's lease when it expires, follows the trials from the store (their jobs taken over too) and finishes
    it: 4 trials, each with exactly one job, none lost and none run twice."""
    first, second = replicas
    with TuneforgeClient(first.target) as one:
        file = one.upload_file(keyword_dataset).name
        spec = sweep_spec(tiny_bert, file)
        spec.algorithm, spec.pruner, spec.max_trials, spec.parallelism = sw.SweepSpec.RANDOM, sw.SweepSpec.NONE, 4, 2
        spec.base.hyperparameters.epochs = 2
        sweep = one.create_sweep(spec).name
        for event in one.watch_sweep(sweep, timeout_s=300):
            if event.HasField("trial") and event.trial.state == sw.Trial.COMPLETE:
                break
        assert one.get_sweep(sweep).state == sw.Sweep.RUNNING, "killed mid-sweep"
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(30)
    with TuneforgeClient(second.target) as two:
        for _ in two.watch_sweep(sweep, timeout_s=120):
            pass
        final = two.get_sweep(sweep)
        assert final.state == sw.Sweep.SUCCEEDED, final.error
        assert [(t.number, t.state) for t in final.trials] == [(n, sw.Trial.COMPLETE) for n in range(4)]
        sweep_jobs = sorted(j.name for j in two.list_jobs() if j.sweep == sweep)
        assert sweep_jobs == sorted(t.job for t in final.trials), "one job per trial: none lost, none run twice"
        for trial in final.trials:
            assert wait_for_end(two, trial.job).state == STATE.SUCCEEDED
    sweep_id = sweep.removeprefix("sweeps/")
    takeover = f"sweep {sweep_id}: r1 stopped renewing its lease; r2 drives it now"
    assert sum(takeover in line for line in (tmp_path / "r2.log").read_text().splitlines()) == 1
