"""The acceptance path: upload, two jobs on two real workers, watchers (one reconnecting mid-way), artifact loaded
with plain transformers."""

from __future__ import annotations

import tarfile
import threading
from pathlib import Path

import pytest
import torch

from tests.integration.helpers import STATE, text_spec
from tests.tiny import keyword_rows
from tuneforge.clients.client import TuneforgeClient
from tuneforge.clients.local_server import LocalServer
from tuneforge.v1 import jobs_pb2

pytestmark = pytest.mark.integration


def collect(client: TuneforgeClient, name: str, into: list[jobs_pb2.JobEvent]) -> None:
    into.extend(client.watch(name, timeout_s=180))


def test_two_jobs_end_to_end_with_a_reconnecting_watcher(
    server: LocalServer, client: TuneforgeClient, dataset_file: str, tiny_bert: Path, tmp_path: Path
) -> None:
    jobs = [client.create_job(text_spec(tiny_bert, dataset_file), display_name=f"e2e-{i}") for i in range(2)]
    assert all(job.state == STATE.QUEUED for job in jobs)

    # One uninterrupted watcher per job, in threads.
    full: dict[str, list[jobs_pb2.JobEvent]] = {job.name: [] for job in jobs}
    threads = [threading.Thread(target=collect, args=(client, job.name, full[job.name])) for job in jobs]
    for thread in threads:
        thread.start()

    # A second watcher on job 0 drops its stream after a few events and reconnects from its last sequence.
    first_part: list[jobs_pb2.JobEvent] = []
    with TuneforgeClient(server.target) as second:
        for event in second.watch(jobs[0].name, timeout_s=180):
            first_part.append(event)
            if event.WhichOneof("payload") == "training_metrics":
                break  # leaving the loop cancels the stream mid-way
        rest = list(second.watch(jobs[0].name, after_sequence=first_part[-1].sequence, timeout_s=180))

    for thread in threads:
        thread.join(200)
        assert not thread.is_alive()
    for job in jobs:
        final = client.get_job(job.name)
        assert final.state == STATE.SUCCEEDED, final.error
        stored = client.list_job_events(job.name)
        sequences = [e.sequence for e in full[job.name]]
        assert sequences == list(range(1, len(sequences) + 1)), "gap-free, each once, in order"
        assert full[job.name] == stored  # message equality: map fields have no fixed byte order
        kinds = {e.WhichOneof("payload") for e in stored}
        assert {
            "state_change",
            "training_metrics",
            "evaluation_metrics",
            "log",
            "checkpoint_saved",
            "artifact_ready",
        } <= kinds
        assert final.progress.step == final.progress.total_steps == 96
        losses = [e.training_metrics.loss for e in stored if e.WhichOneof("payload") == "training_metrics"]
        assert losses[-1] < losses[0] * 0.5, losses
        assert final.latest_metrics["eval_accuracy"] >= 0.85, dict(final.latest_metrics)
        evaluations = [
            dict(e.evaluation_metrics.metrics) for e in stored if e.WhichOneof("payload") == "evaluation_metrics"
        ]
        latest_evaluation = {k: v for k, v in final.latest_metrics.items() if k.startswith("eval_")}
        assert latest_evaluation == evaluations[-1]
        assert dict(final.best_metrics) == min(evaluations, key=lambda metrics: metrics["eval_loss"]), (
            "best by eval_loss"
        )
        assert final.artifact.metrics["eval_accuracy"] == final.latest_metrics["eval_accuracy"]
        assert final.artifact.sha256 and final.attempt == 1
        assert not (server.data_dir / "work" / job.name.removeprefix("jobs/") / "attempt-1").exists(), "pruned"
    reconnected = first_part + rest
    assert [e.sequence for e in reconnected] == [e.sequence for e in full[jobs[0].name]], "nothing lost or doubled"
    workers = {e.log.message for e in full[jobs[0].name] if e.WhichOneof("payload") == "log"}
    assert any("preparing text_classification" in m for m in workers)

    # The artifact loads with plain transformers and beats chance on the training data.
    archive = tmp_path / "model.tar"
    artifact = client.download_artifact(jobs[1].name, archive)
    assert artifact.size_bytes == archive.stat().st_size
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "model", filter="data")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model", use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    rows = keyword_rows(120)
    with torch.inference_mode():
        logits = model(**tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")).logits
    predicted = [model.config.id2label[int(i)] for i in logits.argmax(-1)]
    accuracy = sum(p == r["label"] for p, r in zip(predicted, rows, strict=True)) / len(rows)
    assert accuracy > 0.8, f"accuracy {accuracy} is not far above chance (1/3)"
    assert (tmp_path / "model" / "metrics.json").exists() and (tmp_path / "model" / "job_spec.json").exists()
