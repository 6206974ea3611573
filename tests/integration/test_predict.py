"""Predict through the server: the same labels and probabilities as the artifact loaded with plain transformers;
fifty concurrent calls batched into fewer forward passes, every one answered; wrong inputs refused precisely."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.integration.helpers import STATE, long_spec, sample, scrape, text_spec, wait_for_end
from tests.tiny import keyword_rows
from tuneforge.clients.client import TuneforgeClient, TuneforgeError
from tuneforge.clients.local_server import LocalServer
from tuneforge.v1 import job_spec_pb2

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(server: LocalServer, dataset_file: str, tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    with TuneforgeClient(server.target, timeout_s=30) as client:
        job = client.create_job(text_spec(tiny_bert, dataset_file, epochs=10))
        assert wait_for_end(client, job.name).state == STATE.SUCCEEDED
        return job.name


def local_predictions(client: TuneforgeClient, job: str, texts: list[str], folder: Path) -> list[tuple[str, float]]:
    client.download_artifact(job, folder / "artifact.tar")
    with tarfile.open(folder / "artifact.tar") as tar:
        tar.extractall(folder / "model", filter="data")
    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    model = AutoModelForSequenceClassification.from_pretrained(folder / "model", use_safetensors=True).eval()
    with torch.inference_mode():
        probabilities = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
    best = probabilities.max(dim=-1)
    return [(model.config.id2label[int(i)], float(p)) for p, i in zip(best.values, best.indices, strict=True)]


def test_predict_matches_the_artifact_loaded_locally(client: TuneforgeClient, trained: str, tmp_path: Path) -> None:
    texts = [row["text"] for row in keyword_rows(9, seed=42)]
    predictions = client.predict(trained, texts=texts, top_k=2)
    expected = local_predictions(client, trained, texts, tmp_path)
    assert [(p.labels[0].label, round(p.labels[0].probability, 4)) for p in predictions] == [
        (label, round(probability, 4)) for label, probability in expected
    ]
    assert all(len(p.labels) == 2 and p.labels[0].probability >= p.labels[1].probability for p in predictions)


def test_fifty_concurrent_calls_are_all_answered_in_fewer_passes(
    server: LocalServer, client: TuneforgeClient, trained: str
) -> None:
    """Through the real server, calls from 50 connections arrive spread out, so how many share a pass varies; the
    batching window itself is counted exactly in tests/unit/test_prediction_batching.py."""
    texts = [row["text"] for row in keyword_rows(50, seed=7)]
    reference = {p.labels[0].label for p in client.predict(trained, texts=texts[:3])}
    assert reference
    assert server.metrics_url is not None
    _, before = scrape(server.metrics_url)

    def call(text: str) -> str:
        with TuneforgeClient(server.target, timeout_s=60) as own:
            return own.predict(trained, texts=[text], top_k=1)[0].labels[0].label

    with ThreadPoolExecutor(50) as threads:
        answers = list(threads.map(call, texts))
    _, after = scrape(server.metrics_url)
    assert len(answers) == 50 and all(answers)
    batched = client.predict(trained, texts=texts, top_k=1)  # one call with all 50 gives the same labels
    assert answers == [p.labels[0].label for p in batched]
    passes = sample(after, "tuneforge_prediction_forward_passes_total") - sample(
        before, "tuneforge_prediction_forward_passes_total"
    )
    calls = sample(after, "tuneforge_prediction_inputs_total") - sample(before, "tuneforge_prediction_inputs_total")
    assert calls == 50
    assert 1 <= passes < 50, f"{passes} forward passes for 50 calls"


def test_wrong_inputs_and_unfinished_jobs_are_refused(
    client: TuneforgeClient, trained: str, dataset_file: str, tiny_bert: Path
) -> None:
    with pytest.raises(TuneforgeError) as raised:
        client.predict(trained, texts=["fine"], images=[b"\x89PNG not really"])
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "takes text, not image" in raised.value.field_violations["inputs[1]"]
    with pytest.raises(TuneforgeError) as raised:
        client.predict(trained, texts=[])
    assert raised.value.field_violations["inputs"].startswith("give 1 to 64 inputs")
    running = client.create_job(long_spec(tiny_bert, dataset_file))
    try:
        with pytest.raises(TuneforgeError) as raised:
            client.predict(running.name, texts=["too early"])
        assert (raised.value.code, raised.value.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MODEL_NOT_READY")
    finally:
        client.cancel_job(running.name)


def test_predict_from_the_command_line(server: LocalServer, trained: str) -> None:
    command = [sys.executable, "-m", "tuneforge.clients.cli", "--server", server.target, "--json", "predict", trained]
    command += ["goal match team", "bank stock profit"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    assert [a["labels"][0]["label"] for a in answers] == ["sport", "finance"]


def test_export_model_makes_a_checked_onnx_file_once(client: TuneforgeClient, trained: str, tmp_path: Path) -> None:
    import onnxruntime

    export = client.export_model(trained, job_spec_pb2.ONNX, tmp_path / "model.onnx")
    assert export.check.passed and export.check.samples == 3 and export.onnx_opset == 18
    assert export.check.max_abs_difference <= export.check.tolerance
    texts = [row["text"] for row in keyword_rows(5, seed=3)]
    folder = tmp_path / "local"
    folder.mkdir()
    client.download_artifact(trained, folder / "artifact.tar")
    with tarfile.open(folder / "artifact.tar") as tar:
        tar.extractall(folder / "model", filter="data")
    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], dict(tokenizer(texts, padding=True, return_tensors="np")))[0]
    labels = json.loads((folder / "model" / "config.json").read_text())["id2label"]
    served = [p.labels[0].label for p in client.predict(trained, texts=texts, top_k=1)]
    assert [labels[str(i)] for i in logits.argmax(-1)] == served
    again = client.export_model(trained, job_spec_pb2.ONNX, tmp_path / "again.onnx", timeout_s=10)
    assert again.sha256 == export.sha256  # kept from the first call, not made again
    assert (tmp_path / "again.onnx").read_bytes() == (tmp_path / "model.onnx").read_bytes()


def test_export_of_an_impossible_format_fails_with_the_reason(
    client: TuneforgeClient, trained: str, tmp_path: Path
) -> None:
    with pytest.raises(TuneforgeError) as raised:
        client.export_model(trained, job_spec_pb2.MERGED_LORA, tmp_path / "merged.tar")
    assert (raised.value.code, raised.value.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NOT_LORA")
    assert not (tmp_path / "merged.tar").exists()


def test_predict_on_a_paused_job_s_checkpoint(
    server: LocalServer, client: TuneforgeClient, dataset_file: str, tiny_bert: Path
) -> None:
    from safetensors.torch import load_model
    from transformers import AutoConfig

    spec = long_spec(tiny_bert, dataset_file)
    spec.evaluation.checkpoint_every_steps = 5
    job = client.create_job(spec)
    for event in client.watch(job.name, timeout_s=120):
        if event.WhichOneof("payload") == "checkpoint_saved":
            client.pause_job(job.name)
            break
    for event in client.watch(job.name, timeout_s=120):
        if event.WhichOneof("payload") == "state_change" and event.state_change.to_state == STATE.PAUSED:
            break
    texts = [row["text"] for row in keyword_rows(6, seed=11)]
    predictions = client.predict(job.name, texts=texts, top_k=1, checkpoint="latest")
    folder = server.data_dir / "work" / job.name.removeprefix("jobs/") / "checkpoints"
    newest = sorted(folder.glob("step-*"))[-1]  # what `latest` means, rebuilt here with plain transformers
    model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(folder / "serving")).eval()
    load_model(model, str(newest / "model.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(folder / "serving")
    with torch.inference_mode():
        best = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.softmax(-1).max(-1)
    expected = [(model.config.id2label[int(i)], round(float(p), 4)) for p, i in zip(*best, strict=True)]
    assert [(p.labels[0].label, round(p.labels[0].probability, 4)) for p in predictions] == expected
    with pytest.raises(TuneforgeError) as raised:
        client.predict(job.name, texts=texts, checkpoint="step-999999")
    assert raised.value.reason == "CHECKPOINT_NOT_FOUND"
    client.cancel_job(job.name)
    assert wait_for_end(client, job.name).state == STATE.CANCELLED
    with pytest.raises(TuneforgeError) as raised:
        client.predict(job.name, texts=texts, checkpoint="latest")
    assert (raised.value.code, raised.value.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CHECKPOINTS_REMOVED")
