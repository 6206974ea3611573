"""The real server on a real PostgreSQL store (`--store postgresql://...`): a job trains end to end, and files,
jobs and events are still there after the server restarts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import SERVER_ARGS
from tests.integration.helpers import STATE, text_spec, wait_for_end
from tuneforge.clients.client import TuneforgeClient
from tuneforge.clients.local_server import start_local_server

pytestmark = pytest.mark.integration


def test_a_job_on_postgresql_survives_a_restart(
    tmp_path: Path, postgres: Any, model_root: Path, tiny_bert: Path, keyword_dataset: Path
) -> None:
    args = [*SERVER_ARGS, "--store", postgres.new_database()]
    server = start_local_server(tmp_path / "data", workers=1, model_roots=[model_root], extra_args=args)
    try:
        with TuneforgeClient(server.target) as client:
            client.wait_until_serving(120)
            file = client.upload_file(keyword_dataset)
            job = client.create_job(text_spec(tiny_bert, file.name, epochs=2))
            final = wait_for_end(client, job.name)
            assert final.state == STATE.SUCCEEDED, final.error
            events = client.list_job_events(job.name)
    finally:
        assert server.stop() == 0
    assert not (tmp_path / "data" / "tuneforge.db").exists()  # nothing went to SQLite
    again = start_local_server(tmp_path / "data", workers=1, model_roots=[model_root], extra_args=args)
    try:
        with TuneforgeClient(again.target) as client:
            assert client.get_job(job.name).state == STATE.SUCCEEDED
            assert [e.sequence for e in client.list_job_events(job.name)] == [e.sequence for e in events]
            assert [f.name for f in client.list_files()] == [file.name]
            assert client.download_artifact(job.name, tmp_path / "model.tar").sha256 == final.artifact.sha256
    finally:
        assert again.stop() == 0
