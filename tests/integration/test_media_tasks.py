"""Image, audio, speech and text generation jobs through the real server and worker processes: each learns its
synthetic data, and its artifact reloads with the matching AutoModelFor... class and reproduces the job's evaluation."""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import tarfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile
import torch

from tests.integration.helpers import (
    STATE,
    refused,
    sample,
    scrape,
    scrape_until,
    wait_for_end,
    wait_for_state,
    worker_pids,
)
from tests.media import (
    make_tiny_vit,
    make_tiny_wav2vec2,
    make_tiny_wav2vec2_ctc,
    write_shapes_zip,
    write_tones_zip,
    write_words_zip,
)
from tests.tiny import chat_rows, keyword_rows, make_tiny_gpt2, make_tiny_llama, preference_rows, write_jsonl
from tuneforge.clients.cli import main
from tuneforge.clients.client import TuneforgeClient
from tuneforge.clients.local_server import LocalServer
from tuneforge.v1 import job_spec_pb2 as pb
from tuneforge.v1 import jobs_pb2

pytestmark = pytest.mark.integration
CER_BOUND = 0.6
"""Outputting nothing scores a CER of 1; the tiny model reaches about 0.3-0.45 on the tone 'words'."""


@pytest.fixture(scope="module")
def media_models(model_root: Path) -> dict[str, Path]:
    """Tiny media models under the server's model root (made before the server reads them)."""
    return {
        "vit": make_tiny_vit(model_root / "tiny-vit"),
        "wav2vec2": make_tiny_wav2vec2(model_root / "tiny-wav2vec2"),
        "ctc": make_tiny_wav2vec2_ctc(model_root / "tiny-wav2vec2-ctc"),
    }


def media_spec(
    task: int,
    model: Path,
    train: str,
    validation: str,
    epochs: int,
    lr: float,
    best_metric: str = "eval_loss",
    **data: object,
) -> pb.JobSpec:
    return pb.JobSpec(
        task=task,  # type: ignore[arg-type]
        base_model=str(model),
        data=pb.DataSpec(training_file=train, validation_file=validation, **data),  # type: ignore[arg-type]
        hyperparameters=pb.Hyperparameters(
            epochs=epochs, batch_size=8, learning_rate=lr, seed=0, schedule=pb.Schedule(kind=pb.Schedule.CONSTANT)
        ),
        evaluation=pb.EvaluationSpec(log_every_steps=4, best_metric=best_metric),
    )


def finish(client: TuneforgeClient, spec: pb.JobSpec, tmp_path: Path) -> tuple[jobs_pb2.Job, list[float], Path]:
    """Runs the job to its end; returns it, its training losses and the unpacked artifact."""
    job = client.create_job(spec)
    final = wait_for_end(client, job.name, timeout_s=300)
    assert final.state == STATE.SUCCEEDED, final.error
    events = client.list_job_events(job.name)
    losses = [e.training_metrics.loss for e in events if e.WhichOneof("payload") == "training_metrics"]
    client.download_artifact(job.name, tmp_path / "model.tar")
    with tarfile.open(tmp_path / "model.tar") as tar:
        tar.extractall(tmp_path / "model", filter="data")
    return final, losses, tmp_path / "model"


def members(archive: Path, suffix: str) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(archive) as zipped:
        return [(n, zipped.read(n)) for n in sorted(zipped.namelist()) if n.endswith(suffix)]


def test_image_classification_job(client: TuneforgeClient, media_models: dict[str, Path], tmp_path: Path) -> None:
    train = client.upload_file(write_shapes_zip(tmp_path / "train.zip", per_class=24, seed=1)).name
    validation_zip = write_shapes_zip(tmp_path / "validation.zip", per_class=8, seed=2)
    validation = client.upload_file(validation_zip).name
    spec = media_spec(pb.IMAGE_CLASSIFICATION, media_models["vit"], train, validation, 6, 3e-3, "eval_accuracy")
    job, losses, folder = finish(client, spec, tmp_path)
    assert losses[-1] < losses[0] * 0.5
    assert job.best_metrics["eval_accuracy"] >= 0.8  # chance is 1/3

    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(folder, use_safetensors=True).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    files = members(validation_zip, ".png")
    images = [Image.open(io.BytesIO(data)).convert("RGB") for _, data in files]
    with torch.inference_mode():
        predicted = model(**processor(images=images, return_tensors="pt")).logits.argmax(-1).tolist()
    truth = [name.split("/")[1] for name, _ in files]
    accuracy = sum(model.config.id2label[p] == t for p, t in zip(predicted, truth, strict=True)) / len(truth)
    assert accuracy == pytest.approx(job.artifact.metrics["eval_accuracy"], abs=1 / len(truth) + 1e-6)


def test_audio_classification_job(client: TuneforgeClient, media_models: dict[str, Path], tmp_path: Path) -> None:
    train = client.upload_file(write_tones_zip(tmp_path / "train.zip", 16, seed=1, rates=(16000, 8000))).name
    validation_zip = write_tones_zip(tmp_path / "validation.zip", per_class=6, seed=2)
    validation = client.upload_file(validation_zip).name
    spec = media_spec(
        pb.AUDIO_CLASSIFICATION, media_models["wav2vec2"], train, validation, 6, 3e-3, "eval_accuracy", clip_seconds=0.5
    )
    job, losses, folder = finish(client, spec, tmp_path)
    assert losses[-1] < losses[0] * 0.7
    assert job.best_metrics["eval_accuracy"] >= 0.8

    from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

    model = AutoModelForAudioClassification.from_pretrained(folder, use_safetensors=True).eval()
    extractor = AutoFeatureExtractor.from_pretrained(folder)
    files = members(validation_zip, ".wav")
    waves = [soundfile.read(io.BytesIO(data), dtype="float32")[0] for _, data in files]
    with torch.inference_mode():
        inputs = extractor([np.asarray(w) for w in waves], sampling_rate=16000, return_tensors="pt")
        predicted = model(**inputs).logits.argmax(-1).tolist()
    truth = [name.split("/")[0] for name, _ in files]
    accuracy = sum(model.config.id2label[p] == t for p, t in zip(predicted, truth, strict=True)) / len(truth)
    assert accuracy == pytest.approx(job.artifact.metrics["eval_accuracy"], abs=1 / len(truth) + 1e-6)


def test_speech_recognition_job(client: TuneforgeClient, media_models: dict[str, Path], tmp_path: Path) -> None:
    train = client.upload_file(write_words_zip(tmp_path / "train.zip", 120, seed=1)).name
    validation_zip = write_words_zip(tmp_path / "validation.zip", 16, seed=2)
    validation = client.upload_file(validation_zip).name
    spec = media_spec(pb.SPEECH_RECOGNITION, media_models["ctc"], train, validation, 20, 3e-3, "eval_cer")
    job, losses, folder = finish(client, spec, tmp_path)
    assert losses[-1] < losses[0] / 4
    assert job.best_metrics["eval_cer"] <= CER_BOUND

    import jiwer
    from transformers import AutoModelForCTC, AutoProcessor

    model = AutoModelForCTC.from_pretrained(folder, use_safetensors=True).eval()
    processor = AutoProcessor.from_pretrained(folder)
    import json

    with zipfile.ZipFile(validation_zip) as zipped:
        rows = [json.loads(line) for line in zipped.read("metadata.jsonl").decode().splitlines()]
        waves = [soundfile.read(io.BytesIO(zipped.read(r["file"])), dtype="float32")[0] for r in rows]
    with torch.inference_mode():  # one padded batch, as the worker evaluated it
        inputs = processor(waves, sampling_rate=16000, padding=True, return_attention_mask=True, return_tensors="pt")
        hypotheses = processor.batch_decode(model(**inputs).logits.argmax(-1))
    references = [r["transcript"].lower() for r in rows]
    cer = jiwer.cer(references, [" ".join(h.split()) for h in hypotheses])
    assert cer == pytest.approx(job.artifact.metrics["eval_cer"], abs=0.02)


def test_malformed_archives_fail_their_jobs_and_the_server_stays_healthy(
    client: TuneforgeClient, media_models: dict[str, Path], tmp_path: Path
) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tests.media import write_tar

    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zipped:
        zipped.writestr("red/a.png", b"\0" * (64 << 20))
    cases = {
        bomb: "decompression bomb",
        write_tar(tmp_path / "link.tar", {"red/a.png": b"x"}, {"blue/b.png": "/etc/passwd"}): "is a link",
        write_tar(tmp_path / "escape.tar.gz", {"../../evil.png": b"x"}): "points outside the archive",
    }
    jobs = {}
    for archive, message in cases.items():
        name = client.upload_file(archive).name
        spec = media_spec(pb.IMAGE_CLASSIFICATION, media_models["vit"], name, "", 1, 1e-3)
        spec.data.validation_fraction = 0.2
        jobs[client.create_job(spec).name] = message
    for name, message in jobs.items():
        final = wait_for_end(client, name)
        assert final.state == STATE.FAILED and final.error.reason == "INVALID_DATASET"
        assert message in final.error.message
    health = health_pb2_grpc.HealthStub(client._channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    good = client.upload_file(write_shapes_zip(tmp_path / "good.zip", per_class=4)).name
    spec = media_spec(pb.IMAGE_CLASSIFICATION, media_models["vit"], good, "", 1, 1e-3)
    spec.data.validation_fraction = 0.25
    assert wait_for_end(client, client.create_job(spec).name).state == STATE.SUCCEEDED


@dataclass(frozen=True)
class ChatJob:
    job: jobs_pb2.Job
    losses: list[float]
    folder: Path
    base: Path


@pytest.fixture(scope="module")
def chat_job(server: LocalServer, model_root: Path, tmp_path_factory: pytest.TempPathFactory) -> ChatJob:
    """A tiny Llama taught to answer a chat with the topic of the user's words, trained once for the module."""
    tmp_path = tmp_path_factory.mktemp("chat-job")
    llama = make_tiny_llama(model_root / "tiny-llama")
    with TuneforgeClient(server.target, timeout_s=30) as client:
        train = client.upload_file(write_jsonl(tmp_path / "chat.jsonl", chat_rows(120))).name
        validation = client.upload_file(write_jsonl(tmp_path / "held.jsonl", chat_rows(24, seed=3))).name
        spec = media_spec(pb.TEXT_GENERATION, llama, train, validation, 30, 3e-3, "eval_perplexity")
        job, losses, folder = finish(client, spec, tmp_path)
    return ChatJob(job, losses, folder, llama)


def chat(text: str) -> list[tuple[str, str]]:
    return [("system", "answer with the topic"), ("user", text)]


def test_text_generation_job_learns_a_format_and_predict_answers_in_it(
    client: TuneforgeClient, chat_job: ChatJob, tmp_path: Path
) -> None:
    job, losses, folder, llama = chat_job.job, chat_job.losses, chat_job.folder, chat_job.base
    assert losses[-1] < losses[0] / 4
    assert job.best_metrics["eval_perplexity"] < 1.5 and (folder / "tokenizer_config.json").exists()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = keyword_rows(12, seed=5)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": role, "content": content} for role, content in chat(row["text"])],
            tokenize=False,
            add_generation_prompt=True,
        )
        for row in rows
    ]
    answers = client.predict(job.name, texts=prompts)
    assert sum(a.text.strip() == row["label"] for a, row in zip(answers, rows, strict=True)) >= 10

    validation = job.spec.data.validation_file
    broken = write_jsonl(tmp_path / "broken.jsonl", [*chat_rows(3), {"prompt": "a", "completion": "b"}])
    bad = client.create_job(media_spec(pb.TEXT_GENERATION, llama, client.upload_file(broken).name, validation, 1, 1e-3))
    failed = wait_for_end(client, bad.name, timeout_s=120)
    assert failed.state == STATE.FAILED and failed.error.reason == "INVALID_DATASET"
    assert failed.error.message == (
        "broken.jsonl line 4: the file is in the chat format (from its first line): this line needs `messages` (a "
        "list of {role, content})"
    )


def test_generate_streams_the_answer_that_predict_and_the_artifact_give(
    client: TuneforgeClient, chat_job: ChatJob, server: LocalServer
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = keyword_rows(6, seed=9)
    tokenizer = AutoTokenizer.from_pretrained(chat_job.folder)
    model = AutoModelForCausalLM.from_pretrained(chat_job.folder).eval()
    _, before = scrape(server.metrics_url)
    with ThreadPoolExecutor(len(rows)) as threads:  # arriving together: batched on a worker
        streams = list(
            threads.map(lambda row: list(client.generate(chat_job.job.name, messages=chat(row["text"]))), rows)
        )
    _, after = scrape(server.metrics_url)
    for row, pieces in zip(rows, streams, strict=True):
        text = "".join(piece.text for piece in pieces)
        assert text == row["label"]
        assert len(pieces) >= 2 and not any(p.finish_reason for p in pieces[:-1])  # streamed, then ended
        assert pieces[-1].finish_reason == jobs_pb2.GenerateResponse.STOP and pieces[-1].prompt_tokens > 10
        # The artifact, loaded with plain transformers, writes the same tokens greedily.
        prompt = tokenizer.apply_chat_template(
            [{"role": r, "content": c} for r, c in chat(row["text"])],
            add_generation_prompt=True,
            return_dict=True,
            return_tensors="pt",
        )
        written = model.generate(**prompt, max_new_tokens=20, do_sample=False)[0, prompt["input_ids"].shape[1] :]
        assert tokenizer.decode(written, skip_special_tokens=True) == text
    batches = sample(after, "tuneforge_generation_batches_total") - sample(before, "tuneforge_generation_batches_total")
    assert 1 <= batches < len(rows)
    ended = sample(after, "tuneforge_generate_calls_total", end="stop") - sample(
        before, "tuneforge_generate_calls_total", end="stop"
    )
    assert ended == len(rows)

    stream = client.generate(chat_job.job.name, prompt="goal match", max_new_tokens=1024, temperature=2.0, seed=3)
    next(stream)
    stream.close()  # the caller goes away: the server counts it and tells the worker to stop its row
    scrape_until(server.metrics_url, lambda s: sample(s, "tuneforge_generate_calls_total", end="cancelled") >= 1, 30)
    again = list(client.generate(chat_job.job.name, prompt="goal match", max_new_tokens=1024, temperature=2.0, seed=3))
    assert again[-1].finish_reason in (jobs_pb2.GenerateResponse.STOP, jobs_pb2.GenerateResponse.LENGTH)
    seeded = list(client.generate(chat_job.job.name, prompt="goal match", max_new_tokens=1024, temperature=2.0, seed=3))
    assert "".join(p.text for p in seeded) == "".join(p.text for p in again)


def test_generate_refuses_what_it_cannot_serve(client: TuneforgeClient, chat_job: ChatJob) -> None:
    name = chat_job.job.name
    bad = refused(
        lambda: list(
            client.generate(name, prompt="a", messages=[("robot", "b")], temperature=9, max_new_tokens=5000, stop=[""])
        )
    )
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(bad.field_violations) == {"prompt", "messages[0].role", "temperature", "max_new_tokens", "stop[0]"}
    gone = refused(lambda: list(client.generate(name, prompt="a", checkpoint="latest")))
    assert gone.code == grpc.StatusCode.FAILED_PRECONDITION and gone.reason == "CHECKPOINTS_REMOVED"


def test_the_cli_prints_a_generation_and_holds_a_chat(
    chat_job: ChatJob, server: LocalServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    name, row = chat_job.job.name, keyword_rows(1, seed=11)[0]
    system = ["--system", "answer with the topic"]
    assert main(["--server", server.target, "--json", "generate", name, row["text"], "--chat", *system]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["text"] == row["label"] and printed["finish_reason"] == "stop" and printed["generated_tokens"] > 0

    lines = keyword_rows(2, seed=12)
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line["text"] + "\n" for line in lines) + "/exit\n"))
    assert main(["--server", server.target, "chat", name, *system]) == 0
    said = capsys.readouterr().out.splitlines()
    assert said[0] == f"model> {lines[0]['label']}"  # the second answer reads the first exchange too
    assert len(said) == 2 and said[1].removeprefix("model> ") in {row["label"] for row in keyword_rows(40)}


def generative_specs(client: TuneforgeClient, model_root: Path, tmp_path: Path) -> dict[str, pb.JobSpec]:
    """Prompt/completion with LoRA and packing on a GPT-2, plain text in full on a Llama, and DPO with LoRA: long
    enough (checkpoints every 4 steps) to be interrupted."""
    gpt2 = make_tiny_gpt2(model_root / "tiny-gpt2")
    llama = model_root / "tiny-llama"
    if not llama.exists():
        make_tiny_llama(llama)
    rows = keyword_rows(64, seed=7)
    completions = [{"prompt": r["text"] + " ->", "completion": " " + r["label"]} for r in rows]
    texts = [{"text": f"{r['text']} is about {r['label']}"} for r in rows]
    files = {
        name: client.upload_file(write_jsonl(tmp_path / f"{name}.jsonl", lines)).name
        for name, lines in (
            ("completions", completions),
            ("texts", texts),
            ("pairs", preference_rows(64, seed=7)["messages"]),
        )
    }
    specs = {
        "completions": media_spec(pb.TEXT_GENERATION, gpt2, files["completions"], "", 6, 3e-3, packing=True),
        "texts": media_spec(pb.TEXT_GENERATION, llama, files["texts"], "", 6, 3e-3),
        "pairs": media_spec(pb.PREFERENCE_OPTIMIZATION, llama, files["pairs"], "", 6, 1e-2),
    }
    for name, spec in specs.items():
        spec.data.validation_fraction = 0.2
        spec.evaluation.checkpoint_every_steps = 4
        spec.evaluation.log_every_steps = 2
        if name != "texts":
            spec.adaptation.method = pb.Adaptation.LORA
    return specs


def test_generative_jobs_resume_exactly_after_a_worker_sigkill_and_a_pause(
    client: TuneforgeClient, server: LocalServer, model_root: Path, tmp_path: Path
) -> None:
    from tests.integration.test_chaos import assert_same_model, check_resumes, wait_for_checkpoint

    specs = generative_specs(client, model_root, tmp_path)
    interrupted = {}
    for name, spec in specs.items():
        job = client.create_job(spec)
        assert wait_for_checkpoint(client, job), f"{name} ended before its first checkpoint"
        if name == "texts":
            client.pause_job(job.name)
            paused = wait_for_state(client, job.name, STATE.PAUSED)
            assert paused.worker == ""
            client.resume_job(job.name)
        else:
            current = client.get_job(job.name)
            os.kill(worker_pids(server.process.pid)[current.worker], signal.SIGKILL)
        interrupted[name] = job
    for name, job in interrupted.items():
        final = wait_for_end(client, job.name, timeout_s=300)
        assert final.state == STATE.SUCCEEDED and final.attempt == 2, (name, final.error)
        assert check_resumes(final, client.list_job_events(job.name)) == 1
        client.download_artifact(job.name, tmp_path / f"{name}-interrupted.tar")
    for name, spec in specs.items():  # the same specs, uninterrupted: the same weights and metrics, bit for bit
        reference = wait_for_end(client, client.create_job(spec).name, timeout_s=300)
        assert reference.state == STATE.SUCCEEDED, reference.error
        client.download_artifact(reference.name, tmp_path / f"{name}-reference.tar")
        assert_same_model(tmp_path / f"{name}-interrupted.tar", tmp_path / f"{name}-reference.tar")


def test_a_whisper_speech_recognition_job_through_the_server(
    client: TuneforgeClient, model_root: Path, tmp_path: Path
) -> None:
    """The encoder-decoder family end to end: it trains, its transcripts match the downloaded artifact's own
    `generate`, Predict answers with transcripts, and ONNX is refused with the reason."""
    from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor

    from tests.media import make_tiny_whisper

    whisper = make_tiny_whisper(model_root / "tiny-whisper")
    train = client.upload_file(write_words_zip(tmp_path / "train.zip", 60, seed=1)).name
    validation_zip = write_words_zip(tmp_path / "validation.zip", 8, seed=2)
    validation = client.upload_file(validation_zip).name
    spec = media_spec(pb.SPEECH_RECOGNITION, whisper, train, validation, 25, 3e-3, "eval_cer")
    job, losses, folder = finish(client, spec, tmp_path)
    assert losses[-1] < losses[0] / 2 and job.best_metrics["eval_cer"] <= CER_BOUND

    with zipfile.ZipFile(validation_zip) as zipped:
        rows = [json.loads(line) for line in zipped.read("metadata.jsonl").decode().splitlines()]
        clips = [zipped.read(row["file"]) for row in rows[:3]]
    answers = client.predict(job.name, audio=clips)
    model = AutoModelForSpeechSeq2Seq.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    waves = [soundfile.read(io.BytesIO(clip), dtype="float32")[0] for clip in clips]
    with torch.inference_mode():
        features = processor.feature_extractor(waves, sampling_rate=16000, return_tensors="pt").input_features
        written = processor.batch_decode(
            model.generate(input_features=features, max_new_tokens=60), skip_special_tokens=True
        )
    assert [a.transcript for a in answers] == [" ".join(text.lower().split()) for text in written]

    onnx = refused(lambda: client.export_model(job.name, pb.ONNX, tmp_path / "model.onnx"))
    assert onnx.code == grpc.StatusCode.FAILED_PRECONDITION and onnx.reason == "EXPORT_UNSUPPORTED"
    assert "token by token" in onnx.message
