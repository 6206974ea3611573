"""Speech recognition's torch side: archive of utterances with a transcript manifest -> CTC fine-tuning of
wav2vec2-style models (AutoModelForCTC). When the base model has no tokenizer, a character vocabulary is built from
the transcripts. Evaluation decodes greedily and reports word and character error rates (jiwer); Predict decodes the
same way."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModelForCTC,
    AutoModelForSpeechSeq2Seq,
    AutoProcessor,
    AutoTokenizer,
    Wav2Vec2CTCTokenizer,
    Wav2Vec2Processor,
)

from tuneforge.workers.core.archives import ArchiveLimits, archive_limits, extract_archive
from tuneforge.workers.core.audio import AUDIO_EXTENSIONS, check_audio, load_mono, sample_wav
from tuneforge.workers.core.errors import InvalidDataset, JobFailure
from tuneforge.workers.core.evaluation import Evaluation
from tuneforge.workers.core.media_data import MediaItem, find_items
from tuneforge.workers.core.models import load_pretrained
from tuneforge.workers.core.prepared_task import Batch, PreparedTask
from tuneforge.workers.core.splits import stratified_split
from tuneforge.workers.messages import DataFile, RunJob
from tuneforge.workers.spec import DataSettings
from tuneforge.workers.tasks.runtime import logits_of
from tuneforge.workers.tasks.speech_recognition.seq2seq import (
    collate_seq2seq,
    evaluate_seq2seq,
    is_seq2seq,
    prefix,
    seq2seq_loss,
    transcribe,
)
from tuneforge.workers.tasks.speech_recognition.transcripts import SpeechDataset, normalise, transcript_evaluation

if TYPE_CHECKING:
    from tuneforge.workers.core.prediction import LoadedModel

DEFAULT_MAX_SECONDS = 30.0
SEQ2SEQ_EXPORT_REFUSAL = (
    "an encoder-decoder speech model writes its transcript token by token with a key-value cache, which a single "
    "traced graph does not capture; use the Hugging Face folder (HUGGING_FACE) with transformers or a runtime built "
    "for Whisper"
)
MAX_TRANSCRIPT_CHARS = 100_000
SPECIAL_TOKENS = {"pad": "<pad>", "unk": "<unk>", "delimiter": "|"}
FIXED_SECONDS = 10.0
"""The clip length a TorchScript export is traced at."""
ERRORS_SECTION = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string(
    """{% if error_examples %}<h2 id="errors">Example errors</h2>
<table id="error-examples"><tr><th>reference</th><th>hypothesis</th></tr>
{% for example in error_examples %}<tr><td>{{ example.reference }}</td><td>{{ example.hypothesis }}</td></tr>
{% endfor %}</table>{% endif %}"""
)


def build_tokenizer(transcripts: list[str], folder: Path) -> Any:
    """A character CTC tokenizer for exactly the characters of the transcripts (space is `|`)."""
    characters = sorted({c for text in transcripts for c in text if c != " "})
    vocab = {SPECIAL_TOKENS["pad"]: 0, SPECIAL_TOKENS["unk"]: 1, SPECIAL_TOKENS["delimiter"]: 2}
    vocab.update({c: i + 3 for i, c in enumerate(characters)})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    return Wav2Vec2CTCTokenizer(  # type: ignore[no-untyped-call]
        str(folder / "vocab.json"),
        unk_token=SPECIAL_TOKENS["unk"],
        pad_token=SPECIAL_TOKENS["pad"],
        word_delimiter_token=SPECIAL_TOKENS["delimiter"],
    )


def load_items(
    file: DataFile, settings: DataSettings, root: Path, limits: ArchiveLimits | None = None
) -> list[MediaItem]:
    data_root = extract_archive(file, root, limits)
    items = find_items(
        data_root, file.filename, settings, AUDIO_EXTENSIONS, settings.transcript_column, MAX_TRANSCRIPT_CHARS
    )
    return [MediaItem(item.path, normalise(item.target), item.source) for item in items]


def collate_speech(items: list[dict[str, Any]]) -> Batch:
    """Pads audio with zeros (masked) and label ids with -100 (ignored by the CTC loss)."""
    longest = max(item["input_values"].shape[0] for item in items)
    values = torch.zeros(len(items), longest)
    mask = torch.zeros(len(items), longest, dtype=torch.long)
    label_length = max(len(item["labels"]) for item in items)
    labels = torch.full((len(items), label_length), -100, dtype=torch.long)
    for row, item in enumerate(items):
        length = item["input_values"].shape[0]
        values[row, :length], mask[row, :length] = item["input_values"], 1
        labels[row, : len(item["labels"])] = torch.tensor(item["labels"], dtype=torch.long)
    return {"input_values": values, "attention_mask": mask, "labels": labels}


def ctc_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    loss: torch.Tensor = model(**batch).loss
    return loss


def evaluate_ctc(tokenizer: Any) -> Callable[..., Evaluation]:
    """Greedy CTC decoding; loss, word error rate and character error rate, with example errors."""

    def run(model: nn.Module, loader: DataLoader[Any], to_device: Callable[[Batch], Batch]) -> Evaluation:
        model.eval()
        total_loss, count, references, hypotheses = 0.0, 0, [], []
        with torch.inference_mode():
            for batch in loader:
                batch = to_device(batch)
                output = model(**batch)
                size = batch["labels"].shape[0]
                total_loss, count = total_loss + float(output.loss) * size, count + size
                hypotheses += tokenizer.batch_decode(output.logits.argmax(dim=-1).cpu())
                labels = batch["labels"].cpu().masked_fill(batch["labels"].cpu() == -100, tokenizer.pad_token_id)
                references += tokenizer.batch_decode(labels, group_tokens=False)
        model.train()
        return transcript_evaluation(total_loss, count, references, hypotheses)

    return run


class SpeechRecognitionRuntime:
    """Two families: CTC fine-tuning of wav2vec2, HuBERT, WavLM and other AutoModelForCTC models, and sequence-to-
    sequence fine-tuning of Whisper and other AutoModelForSpeechSeq2Seq models (seq2seq.py); the base model's config
    says which."""

    model_class = "AutoModelForCTC"
    model_classes = ("AutoModelForCTC", "AutoModelForSpeechSeq2Seq")
    processor_class = "AutoProcessor"

    @staticmethod
    def model_class_for(config: Any) -> str:
        return "AutoModelForSpeechSeq2Seq" if is_seq2seq(config) else "AutoModelForCTC"

    def export_refusal_for(self, loaded: LoadedModel, format: str) -> str | None:
        if is_seq2seq(loaded.model.config) and format in ("onnx", "torchscript"):
            return SEQ2SEQ_EXPORT_REFUSAL
        return self.export_refusals.get(format)

    export_tolerance = 1e-3
    """As for audio classification: the feature encoder's float32 rounding over 10 s of samples."""
    export_refusals: Mapping[str, str] = {}

    def prepare(self, job: RunJob, log: Callable[[str], None]) -> PreparedTask:
        spec, work_dir = job.spec, Path(job.work_dir)
        max_seconds = spec.data.clip_seconds or DEFAULT_MAX_SECONDS
        limits = archive_limits(job)
        train = load_items(job.training_data, spec.data, work_dir / "data" / "train", limits)
        if job.validation_data is not None:
            validation = load_items(job.validation_data, spec.data, work_dir / "data" / "validation", limits)
        elif spec.data.validation_fraction > 0:
            train, validation = stratified_split(
                train, lambda _: "", spec.data.validation_fraction, spec.hyperparameters.seed
            )
        else:
            validation = []
        seq2seq = is_seq2seq(self._config(spec.base_model))
        processor = load_pretrained(AutoProcessor, spec.base_model) if seq2seq else None
        if processor is not None:  # the encoder hears one window (Whisper's 30 s): a longer clip cannot be heard whole
            max_seconds = min(max_seconds, float(processor.feature_extractor.chunk_length))
        for item in (*train, *validation):
            if not item.target:
                raise InvalidDataset(f"{item.source}: the transcript is empty")
            check_audio(item, max_seconds)
        if processor is not None:
            return self._prepare_seq2seq(job, processor, train, validation, log)
        if spec.data.language:
            raise JobFailure("INVALID_SPEC", "data.language applies to encoder-decoder models (Whisper), not to CTC")
        extractor = load_pretrained(AutoFeatureExtractor, spec.base_model)
        tokenizer = self._tokenizer(spec.base_model, [i.target for i in train], work_dir / "vocabulary", log)
        processor = Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer)  # type: ignore[no-untyped-call]
        unknown = sorted(
            {c for item in (*train, *validation) for c in item.target.replace(" ", "")} - set(tokenizer.get_vocab())
        )
        if unknown:
            raise InvalidDataset(f"transcripts use characters the model's vocabulary lacks: {''.join(unknown)!r}")
        model = load_pretrained(
            AutoModelForCTC,
            spec.base_model,
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            ctc_loss_reduction="mean",
            use_safetensors=True,
            ignore_mismatched_sizes=True,
        )
        log(f"read {len(train)} training and {len(validation)} validation utterances; vocabulary of {len(tokenizer)}")
        return PreparedTask(
            model=model,
            processor=processor,
            train_set=SpeechDataset(train, processor),  # type: ignore[arg-type]
            validation_set=SpeechDataset(validation, processor),  # type: ignore[arg-type]
            collate=collate_speech,
            labels=[],
            train_labels=[],
            compute_loss=ctc_loss,
            evaluate=evaluate_ctc(tokenizer),
        )

    @staticmethod
    def _config(base_model: str) -> Any:
        """The base model's config, which says its family (loading it fails the way loading the model would)."""
        return load_pretrained(AutoConfig, base_model)

    @staticmethod
    def _prepare_seq2seq(
        job: RunJob, processor: Any, train: list[MediaItem], validation: list[MediaItem], log: Callable[[str], None]
    ) -> PreparedTask:
        spec = job.spec
        window = float(processor.feature_extractor.chunk_length)
        model = load_pretrained(AutoModelForSpeechSeq2Seq, spec.base_model, use_safetensors=True)
        start = int(model.config.decoder_start_token_id)
        train_set = SpeechDataset(train, processor, start)
        language = prefix(model, processor, spec.data.language, log, train_set)
        model.generation_config.forced_decoder_ids = None  # the language and task come from the prefix tokens
        if language:
            model.generation_config.language, model.generation_config.task = language, "transcribe"
        log(
            f"read {len(train)} training and {len(validation)} validation utterances; encoder-decoder "
            f"({type(model).__name__}){f', language {language}' if language else ''}; every clip is padded to the "
            f"{window:g}-second input window"
        )
        return PreparedTask(
            model=model,
            processor=processor,
            train_set=train_set,  # type: ignore[arg-type]
            validation_set=SpeechDataset(validation, processor, start),  # type: ignore[arg-type]
            collate=collate_seq2seq,
            labels=[],
            train_labels=[],
            compute_loss=seq2seq_loss,
            evaluate=evaluate_seq2seq(processor.tokenizer, language),
        )

    @staticmethod
    def _tokenizer(base_model: str, transcripts: list[str], folder: Path, log: Callable[[str], None]) -> Any:
        """The model's own CTC tokenizer when it has one; otherwise one built from the transcripts."""
        try:
            tokenizer = AutoTokenizer.from_pretrained(base_model, trust_remote_code=False)
        except (OSError, ValueError, KeyError, TypeError):
            tokenizer = None
        if isinstance(tokenizer, Wav2Vec2CTCTokenizer):
            return tokenizer
        log("the base model has no CTC vocabulary: building one from the transcripts")
        return build_tokenizer(transcripts, folder)

    def decode(self, loaded: LoadedModel, value: str | bytes) -> Any:
        """A mono wave at the model's rate; longer than training allowed is refused (CTC memory grows with it)."""
        rate = int(loaded.processor.feature_extractor.sampling_rate)
        wave = load_mono(value, "the clip", rate)
        longest = loaded.data.get("clip_seconds") or DEFAULT_MAX_SECONDS
        if wave.shape[0] > longest * rate:
            raise InvalidDataset(f"the clip is longer than the model was trained for ({longest:g} s)")
        return wave.numpy()

    def batch(self, loaded: LoadedModel, decoded: list[Any]) -> Batch:
        extractor = loaded.processor.feature_extractor
        rate = int(extractor.sampling_rate)
        if is_seq2seq(loaded.model.config):
            return {"input_features": extractor(decoded, sampling_rate=rate, return_tensors="pt")["input_features"]}
        return dict(
            extractor(decoded, sampling_rate=rate, return_tensors="pt", padding=True, return_attention_mask=True)
        )

    def answer(self, loaded: LoadedModel, decoded: list[Any], top_k: int) -> list[dict[str, Any]]:
        """Greedy decoding (CTC, or the encoder-decoder's `generate`), normalised as training's references were."""
        tokenizer = loaded.processor.tokenizer
        if is_seq2seq(loaded.model.config):
            features = loaded.batch(decoded)["input_features"].to(next(loaded.model.parameters()).device)
            with torch.inference_mode():
                written = transcribe(loaded.model, features, "")  # the language the model was tuned in
            return [
                {"transcript": normalise(text)} for text in tokenizer.batch_decode(written, skip_special_tokens=True)
            ]
        texts = tokenizer.batch_decode(logits_of(loaded, decoded).argmax(dim=-1))
        return [{"transcript": normalise(text)} for text in texts]

    def sample_input(self, rng: np.random.Generator, index: int) -> tuple[str, bytes | str]:
        return "audio", sample_wav(rng, index)

    def fixed_shape_inputs(self, loaded: LoadedModel, items: list[tuple[str, Any]]) -> Batch:
        """Every clip zero-padded (or cut) to FIXED_SECONDS."""
        inputs = loaded.inputs(items)
        samples = int(FIXED_SECONDS * loaded.processor.feature_extractor.sampling_rate)
        padded = {}
        for name, tensor in inputs.items():
            grown = torch.zeros(tensor.shape[0], samples, dtype=tensor.dtype)
            grown[:, : tensor.shape[1]] = tensor[:, :samples]
            padded[name] = grown
        return padded

    def report_sections(self, metrics: dict[str, Any]) -> list[str]:
        """The validation utterances it got wrong, reference beside hypothesis."""
        errors = (metrics.get("classes") or {}).get("error_examples", [])
        return [ERRORS_SECTION.render(error_examples=errors)]


RUNTIME = SpeechRecognitionRuntime()
