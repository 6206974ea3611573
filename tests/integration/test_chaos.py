"""Chaos: SIGKILL random workers and, separately, the server, while several jobs train. At the end every job
SUCCEEDED with the same weights and metrics as the same spec run without interruption, no attempt reported while
another held the job, event sequences have no gaps or repeats, no file or artifact was lost or changed, a half-sent
upload left nothing behind, and the store passes its integrity check."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sqlite3
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load
from tuneforge.v1 import files_pb2, files_pb2_grpc, jobs_pb2

from clients.client import TuneforgeClient
from clients.local_server import LocalServer, start_local_server
from tests.integration.conftest import SERVER_ARGS
from tests.integration.helpers import STATE, text_spec, wait_for_end, wait_for_exit, worker_pids

pytestmark = pytest.mark.integration

CHAOS_ARGS = [*SERVER_ARGS, "--restart-backoff-s", "0", "--max-restarts", "50"]
ROUNDS = 8
SERVER_KILL_ROUNDS = {2, 5}


def kill_server(server: LocalServer) -> None:
    """SIGKILL: no drain, no checkpoint. Its workers notice the broken pipe and exit at once."""
    workers = list(worker_pids(server.process.pid).values())
    server.process.kill()
    server.process.wait(30)
    if server.process.stdout:
        server.process.stdout.close()
    for pid in workers:
        assert wait_for_exit(pid, 30), f"worker {pid} outlived its server"


def start_half_upload(target: str) -> tuple[threading.Event, threading.Thread]:
    """An upload that sends its metadata and one chunk, then stalls until released (the server dies meanwhile)."""
    release = threading.Event()
    sent_chunk = threading.Event()

    def requests() -> Iterator[files_pb2.UploadFileRequest]:
        metadata = files_pb2.UploadFileMetadata(
            filename="half.jsonl", purpose=files_pb2.File.DATASET, size_bytes=2 << 20, sha256="0" * 64
        )
        yield files_pb2.UploadFileRequest(metadata=metadata)
        yield files_pb2.UploadFileRequest(chunk=b"x" * (1 << 20))
        sent_chunk.set()
        release.wait(60)

    def upload() -> None:
        with grpc.insecure_channel(target) as channel:
            try:
                files_pb2_grpc.FileServiceStub(channel).UploadFile(requests(), timeout=60)
            except grpc.RpcError as error:
                assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), error

    thread = threading.Thread(target=upload)
    thread.start()
    assert sent_chunk.wait(30)
    return release, thread


def assert_same_model(resumed: Path, uninterrupted: Path, scratch: Path) -> None:
    contents = []
    for archive in (resumed, uninterrupted):
        with tarfile.open(archive) as tar:
            weights = tar.extractfile("model.safetensors")
            metrics = tar.extractfile("metrics.json")
            assert weights is not None and metrics is not None
            contents.append((load(weights.read()), json.loads(metrics.read())))
    (weights_a, metrics_a), (weights_b, metrics_b) = contents
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.allclose(weights_a[name], weights_b[name], atol=1e-6), name
    assert [row["eval_loss"] for row in metrics_a["history"]] == pytest.approx(
        [row["eval_loss"] for row in metrics_b["history"]]
    )


def wait_for_progress(client: TuneforgeClient, job: jobs_pb2.Job) -> bool:
    """True once the job reports new training progress; False if it ended first."""
    for event in client.watch(job.name, after_sequence=job.last_event_sequence, timeout_s=120):
        if event.WhichOneof("payload") == "training_metrics":
            return True
    return False


def check_history(job: jobs_pb2.Job, events: list[jobs_pb2.JobEvent]) -> None:
    """Gap-free sequences, and every report belongs to the attempt that held the job when it was stored."""
    assert [e.sequence for e in events] == list(range(1, len(events) + 1)), job.name
    holder = 0
    for event in events:
        if event.WhichOneof("payload") == "state_change":
            to_state = event.state_change.to_state
            if to_state == STATE.RUNNING:
                assert holder == 0, f"{job.name}: attempt {event.attempt} started while {holder} held it"
                holder = event.attempt
            elif to_state in (STATE.QUEUED, STATE.SUCCEEDED):
                holder = 0
        elif event.WhichOneof("payload") in ("training_metrics", "evaluation_metrics", "checkpoint_saved"):
            assert event.attempt == holder, f"{job.name}: attempt {event.attempt} reported while {holder} held it"


def test_random_kills_of_workers_and_the_server_lose_nothing(
    tmp_path: Path, model_root: Path, tiny_bert: Path, keyword_dataset: Path
) -> None:
    rng = random.Random(20261128)
    data_dir = tmp_path / "data"
    server = start_local_server(data_dir, 2, [model_root], CHAOS_ARGS)
    port = int(server.target.rsplit(":", 1)[1])
    client = TuneforgeClient(server.target, timeout_s=30)
    try:
        client.wait_until_serving(120)
        uploaded = client.upload_file(keyword_dataset)
        specs = []
        for index in range(4):
            spec = text_spec(tiny_bert, uploaded.name, epochs=5)
            spec.hyperparameters.seed = index
            spec.evaluation.checkpoint_every_steps = 4
            spec.evaluation.log_every_steps = 2
            specs.append(spec)
        jobs = [client.create_job(spec, display_name=f"chaos-{i}") for i, spec in enumerate(specs)]

        kills = 0
        for round_number in range(ROUNDS):
            running = client.list_jobs(states=[STATE.RUNNING])
            if not running:
                break
            victim = rng.choice(running)
            progressed = wait_for_progress(client, victim)
            if round_number in SERVER_KILL_ROUNDS:
                release, uploader = start_half_upload(server.target)
                kill_server(server)
                release.set()
                uploader.join(60)
                with sqlite3.connect(data_dir / "tuneforge.db") as db:
                    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
                server = start_local_server(data_dir, 2, [model_root], CHAOS_ARGS, port=port)
                client.wait_until_serving(120)
                assert list((data_dir / "uploads").iterdir()) == [], "the half-written upload was discarded"
                kills += 1
            elif progressed:
                current = client.get_job(victim.name)
                pid = worker_pids(server.process.pid).get(current.worker)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    kills += 1
        assert kills >= 4, "the chaos actually happened"

        finals = [wait_for_end(client, job.name, timeout_s=300) for job in jobs]
        assert [f.state for f in finals] == [STATE.SUCCEEDED] * len(jobs), [f.error for f in finals]
        assert sum(f.attempt for f in finals) > len(jobs), "some job was interrupted and resumed"
        for final in finals:
            check_history(final, client.list_job_events(final.name))
            artifact = client.download_artifact(final.name, tmp_path / f"{final.name.split('/')[1]}.tar")
            assert artifact.sha256 == final.artifact.sha256

        # The same specs without interruption: the killed and resumed runs ended with the same weights and metrics.
        references = [client.create_job(spec) for spec in specs]
        for final, reference in zip(finals, references, strict=True):
            assert wait_for_end(client, reference.name, timeout_s=300).state == STATE.SUCCEEDED
            client.download_artifact(reference.name, tmp_path / "reference.tar")
            assert_same_model(tmp_path / f"{final.name.split('/')[1]}.tar", tmp_path / "reference.tar", tmp_path)
        assert [f.name for f in client.list_files()] == [uploaded.name], "the half upload left no file"
        stored = (data_dir / "files" / uploaded.name.split("/")[1]).read_bytes()
        assert hashlib.sha256(stored).hexdigest() == uploaded.sha256
        assert uploaded.sha256 == hashlib.sha256(keyword_dataset.read_bytes()).hexdigest()
        assert not any((data_dir / "work").iterdir()), "finished jobs left no checkpoints behind"
    finally:
        client.close()
        code = server.stop()
    assert code == 0
    with sqlite3.connect(data_dir / "tuneforge.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
