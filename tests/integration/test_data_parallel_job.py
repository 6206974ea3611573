"""A data-parallel job through the service: two gloo ranks on a CPU worker train it; a helper rank killed mid-job
takes the attempt with it, and the job resumes from its checkpoint on a new attempt."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.integration.helpers import STATE, log_lines, text_spec, wait_for_end, worker_pids
from tests.processes import processes
from tuneforge.clients.client import TuneforgeClient
from tuneforge.clients.local_server import LocalServer

pytestmark = pytest.mark.integration


def helper_rank_pids(server_pid: int) -> list[int]:
    """Helper ranks (`tf-rank-N`) whose parent is one of the server's workers."""
    workers = set(worker_pids(server_pid).values())
    return [p.pid for p in processes() if p.parent in workers and p.name.startswith("tf-rank-")]


def test_two_rank_job_survives_losing_a_rank(
    server: LocalServer, client: TuneforgeClient, dataset_file: str, tiny_bert: Path
) -> None:
    spec = text_spec(tiny_bert, dataset_file, epochs=6)
    spec.resources.ranks = 2
    spec.evaluation.log_every_steps = 1
    spec.evaluation.checkpoint_every_steps = 3
    job = client.create_job(spec)
    killed = False
    for event in client.watch(job.name, timeout_s=240):
        progress = event.training_metrics if event.WhichOneof("payload") == "training_metrics" else None
        if not killed and progress is not None and event.attempt == 1 and progress.step >= 5:
            helpers = helper_rank_pids(server.process.pid)
            assert len(helpers) == 1, helpers
            os.kill(helpers[0], signal.SIGKILL)
            killed = True
    final = wait_for_end(client, job.name)
    assert killed, (final, log_lines(client.list_job_events(job.name)))
    assert final.state == STATE.SUCCEEDED, final.error
    assert final.attempt == 2
    lines = log_lines(client.list_job_events(job.name))
    assert any("data-parallel over 2 ranks (gloo)" in line for line in lines)
    assert any("tuneforge-rank-1 exited with code -9" in line for line in lines), lines
    assert any("resumed from the checkpoint at step" in line for line in lines), lines
