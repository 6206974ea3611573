"""Speech recognition through the runner: CTC on tone 'words' with a vocabulary built from the transcripts."""

from __future__ import annotations

import dataclasses
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.core.test_training_core import FAST, make_spec, of_type, run
from tests.media import make_tiny_wav2vec2_ctc, spoken_word, write_words_zip
from tuneforge.workers.messages import EvaluationDone, LogEmitted, Outcome, TrainingProgress
from tuneforge.workers.spec import DataSettings, EvaluationSettings


@pytest.fixture(scope="module")
def tiny_ctc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_wav2vec2_ctc(tmp_path_factory.mktemp("models") / "tiny-ctc")


def speech_spec(model: Path, epochs: int = 30, **data: object):  # type: ignore[no-untyped-def]
    spec = make_spec(
        model,
        task="speech_recognition",
        hyperparameters=dataclasses.replace(FAST, epochs=epochs, learning_rate=3e-3),
        evaluation=EvaluationSettings(log_every_steps=10, best_metric="eval_cer"),
    )
    return dataclasses.replace(spec, data=DataSettings(training_file="files/t", validation_fraction=0.2, **data))


def test_ctc_learns_and_reports_error_rates(tiny_ctc: Path, tmp_path: Path) -> None:
    archive = write_words_zip(tmp_path / "words.zip", 80)
    finished, events = run(speech_spec(tiny_ctc), archive, tmp_path / "work")
    assert finished.outcome is Outcome.SUCCEEDED, finished.message
    logs = [e.message for e in of_type(events, LogEmitted)]
    assert "the base model has no CTC vocabulary: building one from the transcripts" in logs
    losses = [e.loss for e in of_type(events, TrainingProgress)]
    assert losses[-1] < losses[0] / 4, losses
    evaluations = [e.metrics for e in of_type(events, EvaluationDone)]
    assert {"eval_loss", "eval_wer", "eval_cer"} <= set(evaluations[0])
    assert min(m["eval_cer"] for m in evaluations) <= 0.6  # outputting nothing scores 1
    with tarfile.open(tmp_path / "work" / "artifact.tar") as tar:
        tar.extractall(tmp_path / "model", filter="data")
    vocabulary = json.loads((tmp_path / "model" / "vocab.json").read_text())
    assert {"a", "b", "c", "|", "<pad>", "<unk>"} <= set(vocabulary)
    metrics = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert metrics["classes"]["utterances"] == 16 and "error_examples" in metrics["classes"]
    report = (tmp_path / "model" / "report.html").read_text()  # WER and CER against the untuned model, errors
    assert all(f"<td>{name}</td>" in report for name in ("eval_wer", "eval_cer"))
    assert metrics["baseline"]["eval_cer"] >= min(m["eval_cer"] for m in evaluations)
    examples = metrics["classes"]["error_examples"]
    assert bool(examples) == (metrics["best"]["eval_wer"] > 0), "error examples exactly when some word was wrong"
    assert all(example["reference"] != example["hypothesis"] for example in examples)
    for example in examples:
        assert f"<tr><td>{example['reference']}</td><td>{example['hypothesis']}</td></tr>" in report


def test_bad_transcripts_and_long_clips_fail_precisely(tiny_ctc: Path, tmp_path: Path) -> None:
    archive = write_words_zip(tmp_path / "words.zip", 6)
    import random

    with zipfile.ZipFile(archive, "a") as zipped:
        zipped.writestr("long.wav", spoken_word("abc abc abc", random.Random(0)))
    with zipfile.ZipFile(archive) as zipped:
        manifest = zipped.read("metadata.jsonl").decode()
    rebuilt = tmp_path / "long.zip"
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(rebuilt, "w") as target:
        for name in source.namelist():
            if name != "metadata.jsonl":
                target.writestr(name, source.read(name))
        target.writestr("metadata.jsonl", manifest + json.dumps({"file": "long.wav", "transcript": "abc abc abc"}))
    finished, _ = run(speech_spec(tiny_ctc, epochs=1, clip_seconds=1.0), rebuilt, tmp_path / "work")
    assert (finished.outcome, finished.reason) == (Outcome.FAILED, "INVALID_DATASET")
    assert "long.zip:metadata.jsonl line 7 (long.wav): 2.2 s is longer than data.clip_seconds (1 s)" in finished.message
