"""A sweep the server cannot rebuild when it starts (a grid stored before grids were capped, a base model that no
longer validates) ends FAILED with its reason; the server starts, stays SERVING and keeps its memory, and the
sweeps it can rebuild go on."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.hostile.conftest import ADDRESS_SPACE_BYTES
from tests.integration.conftest import SERVER_ARGS
from tuneforge.clients.client import TuneforgeClient
from tuneforge.clients.local_server import start_local_server
from tuneforge.server.store.sqlite import SqliteJobStore
from tuneforge.server.sweep_convert import state_event
from tuneforge.server.sweep_records import SweepRecord, SweepState
from tuneforge.v1 import job_spec_pb2 as pb
from tuneforge.v1 import sweeps_pb2 as sw

pytestmark = pytest.mark.integration


def stored_sweep(store: SqliteJobStore, sweep_id: str, spec: sw.SweepSpec) -> None:
    """A RUNNING sweep as an earlier server version stored it."""
    now = time.time()
    record = SweepRecord(sweep_id, sweep_id, spec.SerializeToString(), SweepState.RUNNING, now, now)
    store.create_sweep(record, [state_event(None, SweepState.RUNNING)], None)


def base(model: str) -> pb.JobSpec:
    return pb.JobSpec(
        task=pb.TEXT_CLASSIFICATION,
        base_model=model,
        data=pb.DataSpec(training_file="files/f", validation_fraction=0.2),
    )


def test_sweeps_that_cannot_be_rebuilt_end_failed_and_the_server_serves(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    store = SqliteJobStore(data / "tuneforge.db")
    seeds = sw.Parameter(field="hyperparameters.seed", int_range=sw.IntRange(min=0, max=150_000_000))
    stored_sweep(
        store, "sw-grid", sw.SweepSpec(base=base("org/model"), parameters=[seeds], algorithm=sw.SweepSpec.GRID)
    )
    gone = sw.Parameter(field="hyperparameters.seed", int_range=sw.IntRange(min=0, max=3))
    stored_sweep(store, "sw-gone", sw.SweepSpec(base=base(str(tmp_path / "removed-model")), parameters=[gone]))
    store.close()
    server = start_local_server(data, workers=0, extra_args=SERVER_ARGS, address_space_bytes=ADDRESS_SPACE_BYTES)
    try:
        with TuneforgeClient(server.target, timeout_s=30) as client:
            client.wait_until_serving(60)
            grid, gone_sweep = client.get_sweep("sweeps/sw-grid"), client.get_sweep("sweeps/sw-gone")
            assert (grid.state, grid.error.reason) == (sw.Sweep.FAILED, "RESTORE_FAILED")
            assert "the grid has 150,000,001 points" in grid.error.message
            assert (gone_sweep.state, gone_sweep.error.reason) == (sw.Sweep.FAILED, "RESTORE_FAILED")
            assert "base_model" in gone_sweep.error.message and "is not under a model root" in gone_sweep.error.message
            assert client.health() == "SERVING" and client.list_files() == []
    finally:
        assert server.stop() == 0
