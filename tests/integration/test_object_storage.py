"""Files, checkpoints and artifacts in object storage: a real server and its workers against a local S3-compatible
server (moto) on loopback. Uploads land in the bucket, a worker killed mid-job resumes from the checkpoint it wrote
there, the artifact is promoted there and downloads intact, and deleting the job removes its objects."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import s3fs

from tests.integration.conftest import SERVER_ARGS
from tests.integration.helpers import STATE, log_lines, text_spec, wait_for_end, worker_pids
from tests.s3 import CREDENTIALS, S3Server, s3_server
from tuneforge.clients.client import TuneforgeClient
from tuneforge.clients.local_server import start_local_server

pytestmark = pytest.mark.integration

BUCKET = "tuneforge-test"


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with s3_server() as server:
        s3fs.S3FileSystem(**server.options).mkdir(BUCKET)
        yield server


def storage_args(s3: S3Server, prefix: str) -> list[str]:
    return ["--storage", f"s3://{BUCKET}/{prefix}", "--storage-option", f"endpoint_url={s3.endpoint}"]


def test_files_checkpoints_and_artifacts_round_trip_through_s3(
    s3: S3Server, tmp_path: Path, model_root: Path, tiny_bert: Path, keyword_dataset: Path
) -> None:
    bucket = s3fs.S3FileSystem(**s3.options, use_listings_cache=False)
    args = [*SERVER_ARGS, *storage_args(s3, "prod"), "--restart-backoff-s", "0.2"]
    data = tmp_path / "data"
    server = start_local_server(data, workers=1, model_roots=[model_root], extra_args=args, env=CREDENTIALS)
    try:
        with TuneforgeClient(server.target, timeout_s=30) as client:
            client.wait_until_serving(120)
            file = client.upload_file(keyword_dataset)
            stored = f"{BUCKET}/prod/files/{file.name.removeprefix('files/')}"
            assert bucket.cat_file(stored) == keyword_dataset.read_bytes()
            downloaded = tmp_path / "back.jsonl"
            client.download_file(file.name, downloaded)
            assert downloaded.read_bytes() == keyword_dataset.read_bytes()

            spec = text_spec(tiny_bert, file.name, epochs=4)
            spec.evaluation.checkpoint_every_steps = 4
            job = client.create_job(spec)
            job_id = job.name.removeprefix("jobs/")
            killed = False
            for event in client.watch(job.name, timeout_s=240):
                kind = event.WhichOneof("payload")
                if kind == "checkpoint_saved" and event.attempt == 1 and not killed:
                    step = event.checkpoint_saved.step
                    remote = f"{BUCKET}/prod/work/{job_id}/checkpoints/step-{step:06d}"
                    assert bucket.exists(f"{remote}/trainer_state.json")  # in the bucket before the server heard
                    os.kill(worker_pids(server.process.pid)["worker-0"], signal.SIGKILL)
                    killed = True
            final = wait_for_end(client, job.name)
            assert killed
            assert final.state == STATE.SUCCEEDED, final.error
            assert final.attempt == 2
            lines = log_lines(client.list_job_events(job.name))
            assert any(line.startswith("resumed from the checkpoint at step 4") for line in lines), lines

            artifact = bucket.cat_file(f"{BUCKET}/prod/artifacts/{job_id}.tar")
            assert hashlib.sha256(artifact).hexdigest() == final.artifact.sha256
            local_copy = tmp_path / "artifact.tar"
            client.download_artifact(job.name, local_copy)
            assert local_copy.read_bytes() == artifact
            assert not bucket.exists(f"{BUCKET}/prod/work/{job_id}")  # an ended job keeps no checkpoints
            assert not list(data.glob("files/*")) and not list(data.glob("artifacts/*"))  # nothing kept locally

            client.delete_job(job.name)
            assert not bucket.exists(f"{BUCKET}/prod/artifacts/{job_id}.tar")
            client.delete_file(file.name)
            assert not bucket.exists(stored)
    finally:
        assert server.stop() == 0


def test_unreachable_storage_stops_the_start_with_the_reason(s3: S3Server, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "tuneforge.server", "--data-dir", str(tmp_path), "--port", "0", "--workers", "0"]
    command += ["--storage", "s3://no-such-bucket/x", "--storage-option", f"endpoint_url={s3.endpoint}"]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **CREDENTIALS}, timeout=120)
    assert result.returncode == 2
    assert "--storage s3://no-such-bucket/x cannot be used" in result.stderr
