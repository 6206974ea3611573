"""Chaos: SIGKILL random workers and, separately, the server, while several jobs train, each kill just after the
victim saved a checkpoint. At the end every job SUCCEEDED with exactly the same weights and metrics.json as the
same spec run without interruption, every later attempt resumed from its predecessors' newest checkpoint, no
attempt reported while another held the job, event sequences have no gaps or repeats, no file or artifact was lost
or changed, a half-sent upload left nothing behind, and the store passes its integrity check."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
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

from tests.integration.conftest import SERVER_ARGS
from tests.integration.helpers import STATE, text_spec, wait_for_end, wait_for_exit, worker_pids
from tuneforge.clients.client import TuneforgeClient
from tuneforge.clients.local_server import LocalServer, start_local_server
from tuneforge.v1 import files_pb2, files_pb2_grpc, jobs_pb2

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


def assert_same_model(resumed: Path, uninterrupted: Path) -> None:
    """Bit for bit: every weight, and the whole metrics.json (history, best, per-class report, steps). The core
    restores the model, optimizer, schedule, data order and random state exactly, so nothing may differ."""
    contents = []
    for archive in (resumed, uninterrupted):
        with tarfile.open(archive) as tar:
            weights = tar.extractfile("model.safetensors")
            metrics = tar.extractfile("metrics.json")
            assert weights is not None and metrics is not None
            contents.append((load(weights.read()), json.loads(metrics.read())))
    (weights_a, metrics_a), (weights_b, metrics_b) = contents
    assert weights_a.keys() == weights_b.keys()
    different = [name for name in weights_a if not torch.equal(weights_a[name], weights_b[name])]
    assert not different, f"weights differ: {different}"
    assert metrics_a == metrics_b


def wait_for_checkpoint(client: TuneforgeClient, job: jobs_pb2.Job) -> bool:
    """True once the job saves a new checkpoint (so a kill now loses the steps after one); False if it ended first."""
    for event in client.watch(job.name, after_sequence=job.last_event_sequence, timeout_s=120):
        if event.WhichOneof("payload") == "checkpoint_saved":
            return True
    return False


RESUMED = re.compile(r"resumed from the checkpoint at step (\d+) \(attempt (\d+)\)")


def check_resumes(job: jobs_pb2.Job, events: list[jobs_pb2.JobEvent]) -> int:
    """Each later attempt that trained resumed from at least the newest checkpoint its predecessors reported, and
    its first report comes after that step (a restart from step 0 fails here). Returns how many resumed."""
    resumed_count = 0
    for attempt in range(2, job.attempt + 1):
        mine = [e for e in events if e.attempt == attempt]
        steps = [e.training_metrics.step for e in mine if e.WhichOneof("payload") == "training_metrics"]
        if not steps:
            continue  # killed before it trained
        saved = [e.checkpoint_saved.step for e in events if e.attempt < attempt and e.HasField("checkpoint_saved")]
        lines = [RESUMED.fullmatch(e.log.message) for e in mine if e.WhichOneof("payload") == "log"]
        resumed = [int(m.group(1)) for m in lines if m is not None and int(m.group(2)) == attempt]
        if saved:
            assert resumed and resumed[0] >= max(saved) > 0, f"{job.name} attempt {attempt}: {resumed} < {saved}"
        start = resumed[0] if resumed else 0
        assert steps[0] > start, f"{job.name} attempt {attempt} reported step {steps[0]} after resuming at {start}"
        resumed_count += bool(resumed)
    return resumed_count


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
            progressed = wait_for_checkpoint(client, victim)
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
        resumes = 0
        for final in finals:
            events = client.list_job_events(final.name)
            check_history(final, events)
            resumes += check_resumes(final, events)
            artifact = client.download_artifact(final.name, tmp_path / f"{final.name.split('/')[1]}.tar")
            assert artifact.sha256 == final.artifact.sha256
        assert resumes >= kills, "every kill landed after a checkpoint, so each victim resumed from one"

        # The same specs without interruption: the killed and resumed runs ended with the same weights and metrics.
        references = [client.create_job(spec) for spec in specs]
        for final, reference in zip(finals, references, strict=True):
            assert wait_for_end(client, reference.name, timeout_s=300).state == STATE.SUCCEEDED
            client.download_artifact(reference.name, tmp_path / "reference.tar")
            assert_same_model(tmp_path / f"{final.name.split('/')[1]}.tar", tmp_path / "reference.tar")
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
