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


def test_a_whisper_model_learns_the_words_and_its_artifact_transcribes(tmp_path: Path) -> None:
    """The encoder-decoder family: decoder labels behind Whisper's prefix tokens, transcripts generated at every
    evaluation (WER and CER), the artifact reloaded as AutoModelForSpeechSeq2Seq and answering Predict, ONNX refused
    with its reason, and data.language refused for an English-only model."""
    import random

    from transformers import AutoModelForSpeechSeq2Seq

    from tests.media import make_tiny_whisper
    from tuneforge.workers.core.export import ExportFailed, ExportFormat, export_model
    from tuneforge.workers.core.prediction import load_model

    whisper = make_tiny_whisper(tmp_path / "whisper")
    archive = write_words_zip(tmp_path / "words.zip", 60)
    spec = speech_spec(whisper, epochs=25)
    finished, events = run(spec, archive, tmp_path / "work")
    assert finished.outcome is Outcome.SUCCEEDED, finished.message
    assert any("encoder-decoder (WhisperForConditionalGeneration)" in e.message for e in of_type(events, LogEmitted))
    evaluations = [e.metrics for e in of_type(events, EvaluationDone)]
    assert {"eval_loss", "eval_wer", "eval_cer"} <= set(evaluations[0])
    assert min(m["eval_cer"] for m in evaluations) <= 0.6  # outputting nothing scores 1
    with tarfile.open(tmp_path / "work" / "artifact.tar") as tar:
        tar.extractall(tmp_path / "model", filter="data")
    assert (
        type(AutoModelForSpeechSeq2Seq.from_pretrained(tmp_path / "model")).__name__
        == "WhisperForConditionalGeneration"
    )
    loaded = load_model(tmp_path / "model")
    clips = [spoken_word(word, random.Random(3)) for word in ("abc", "ca")]
    answers = loaded.answer([loaded.decode(("audio", clip)) for clip in clips], top_k=1)
    assert [set(answer) for answer in answers] == [{"transcript"}, {"transcript"}]
    assert all(isinstance(answer["transcript"], str) for answer in answers)
    with pytest.raises(ExportFailed) as refused:
        export_model(tmp_path / "model", ExportFormat.ONNX)
    assert refused.value.reason == "EXPORT_UNSUPPORTED" and "token by token" in refused.value.message

    language = dataclasses.replace(spec, data=dataclasses.replace(spec.data, language="en"))
    finished, _ = run(language, archive, tmp_path / "refused")
    assert (finished.outcome, finished.reason) == (Outcome.FAILED, "INVALID_SPEC")
    assert "the base model is English-only" in finished.message


def test_a_multilingual_whisper_detects_the_language_or_takes_it_from_the_spec(tmp_path: Path) -> None:
    """Without data.language the model's own detection on the first training clips chooses (and the log says so);
    with it, the labels carry that language and task token; the artifact's generation config keeps the language."""
    from tests.media import make_tiny_whisper

    whisper = make_tiny_whisper(tmp_path / "whisper", multilingual=True)
    archive = write_words_zip(tmp_path / "words.zip", 10)
    spec = speech_spec(whisper, epochs=1)
    finished, events = run(spec, archive, tmp_path / "detected")
    assert finished.outcome is Outcome.SUCCEEDED, finished.message
    logs = [e.message for e in of_type(events, LogEmitted)]
    assert "data.language unset: the model hears 'en' in the first training clips, and trains with it" in logs
    given = dataclasses.replace(spec, data=dataclasses.replace(spec.data, language="english"))
    finished, events = run(given, archive, tmp_path / "given")
    assert finished.outcome is Outcome.SUCCEEDED, finished.message
    assert any(", language english;" in e.message for e in of_type(events, LogEmitted))
    with tarfile.open(tmp_path / "given" / "artifact.tar") as tar:
        generation = json.loads(tar.extractfile("generation_config.json").read())  # type: ignore[union-attr]
    assert (generation["language"], generation["task"]) == ("english", "transcribe")
    unknown = dataclasses.replace(spec, data=dataclasses.replace(spec.data, language="klingon"))
    finished, _ = run(unknown, archive, tmp_path / "unknown")
    assert (finished.outcome, finished.reason) == (Outcome.FAILED, "INVALID_SPEC") and "klingon" in finished.message


@pytest.mark.parametrize("method", ["frozen_backbone", "lora"])
def test_whisper_trains_with_its_encoder_frozen_or_with_lora_in_encoder_and_decoder(
    method: str, tmp_path: Path
) -> None:
    from transformers import AutoModelForSpeechSeq2Seq

    from tests.media import make_tiny_whisper
    from tuneforge.workers.core.adaptation import apply_adaptation
    from tuneforge.workers.core.lora import apply_lora, default_target_modules
    from tuneforge.workers.spec import AdaptationMethod, AdaptationSettings, LoraSettings

    whisper = make_tiny_whisper(tmp_path / "whisper")
    model = AutoModelForSpeechSeq2Seq.from_pretrained(whisper)
    if method == "frozen_backbone":
        apply_adaptation(model, AdaptationSettings(method=AdaptationMethod.FROZEN_BACKBONE))
        assert not any(p.requires_grad for p in model.get_encoder().parameters())
        assert all(p.requires_grad for p in model.get_decoder().parameters())
    else:
        assert default_target_modules(model) == ["q_proj", "v_proj"]
        wrapped = apply_lora(model, LoraSettings(rank=4, alpha=8))
        adapted = {name.split(".lora_A")[0] for name, _ in wrapped.named_parameters() if ".lora_A" in name}
        assert any(".encoder." in name for name in adapted) and any(".decoder." in name for name in adapted)
        assert not any(p.requires_grad for n, p in wrapped.named_parameters() if "lora_" not in n)
    spec = speech_spec(whisper, epochs=2)
    spec = dataclasses.replace(spec, adaptation=AdaptationSettings(method=AdaptationMethod(method)))
    finished, _ = run(spec, write_words_zip(tmp_path / "words.zip", 10), tmp_path / "work")
    assert finished.outcome is Outcome.SUCCEEDED, finished.message


def test_a_whisper_job_resumes_exactly(tmp_path: Path) -> None:
    from tests.core.test_resume import assert_same_run, interrupted_then_resumed
    from tests.media import make_tiny_whisper

    whisper = make_tiny_whisper(tmp_path / "whisper")
    archive = write_words_zip(tmp_path / "words.zip", 20)
    spec = speech_spec(whisper, epochs=3)
    spec = dataclasses.replace(spec, evaluation=EvaluationSettings(log_every_steps=1, checkpoint_every_steps=2))
    plain, _ = run(spec, archive, tmp_path / "plain")
    assert plain.outcome is Outcome.SUCCEEDED, plain.message
    events = interrupted_then_resumed(spec, archive, tmp_path / "resumed", stop_at=3)
    assert "resumed from the checkpoint at step 2 (attempt 1)" in [e.message for e in of_type(events, LogEmitted)]
    assert_same_run(tmp_path / "plain", tmp_path / "resumed")
