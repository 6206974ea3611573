"""A real server subprocess with two real spawned workers, shared by the module (each worker pays its imports once)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tuneforge.clients.client import TuneforgeClient
from tuneforge.clients.local_server import LocalServer, start_local_server

SERVER_ARGS = ["--device", "cpu", "--torch-threads", "1", "--log-level", "WARNING"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_root: Path) -> Iterator[LocalServer]:
    data_dir = tmp_path_factory.mktemp("server-data")
    running = start_local_server(data_dir, workers=2, model_roots=[model_root], extra_args=SERVER_ARGS)
    try:
        with TuneforgeClient(running.target) as client:
            client.wait_until_serving(120)
        yield running
    finally:
        code = running.stop()
        assert code == 0, f"the server exited with {code} on SIGTERM"


@pytest.fixture
def client(server: LocalServer) -> Iterator[TuneforgeClient]:
    with TuneforgeClient(server.target, timeout_s=30) as connected:
        yield connected


@pytest.fixture(scope="module")
def dataset_file(server: LocalServer, keyword_dataset: Path) -> str:
    with TuneforgeClient(server.target) as connected:
        return connected.upload_file(keyword_dataset).name
