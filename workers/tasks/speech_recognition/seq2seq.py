"""Speech recognition's encoder-decoder family (Whisper and other AutoModelForSpeechSeq2Seq models): log-mel features
of each clip, its transcript as decoder labels behind the language and task tokens, and transcripts written by the
model's own `generate` at every evaluation and in Predict.

Whisper's encoder takes a fixed 30-second window: every clip is padded to it, so a 2-second clip costs as much
encoder work as a 30-second one; `data.clip_seconds` bounds how long a clip may be, not what it costs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from tuneforge.workers.core.errors import JobFailure
from tuneforge.workers.core.evaluation import Evaluation
from tuneforge.workers.core.prepared_task import Batch
from tuneforge.workers.tasks.speech_recognition.transcripts import SpeechDataset, transcript_evaluation

IGNORED = -100
MAX_NEW_TOKENS = 225
"""Whisper's own cap on a transcript's tokens (448 positions less the prompt, halved as its fine-tuning guide does)."""
PROMPT_TOKENS = 4
"""The decoder prompt's tokens at most: start of transcript, language, task, no timestamps."""
DETECTION_CLIPS = 8


def is_seq2seq(config: Any) -> bool:
    return bool(getattr(config, "is_encoder_decoder", False))


def multilingual(model: Any) -> bool:
    return bool(
        getattr(model.generation_config, "is_multilingual", False)
        or getattr(model.generation_config, "lang_to_id", None)
    )


def collate_seq2seq(items: list[dict[str, Any]]) -> Batch:
    """Features stacked (every clip already fills the 30-second window); labels padded with IGNORED."""
    longest = max(len(item["labels"]) for item in items)
    labels = torch.full((len(items), longest), IGNORED, dtype=torch.long)
    for row, item in enumerate(items):
        labels[row, : len(item["labels"])] = torch.tensor(item["labels"], dtype=torch.long)
    return {"input_features": torch.stack([item["input_features"] for item in items]), "labels": labels}


def seq2seq_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    loss: torch.Tensor = model(**batch).loss
    return loss


def transcribe(model: Any, features: torch.Tensor, language: str) -> torch.Tensor:
    """Greedy transcripts of a batch of features, in the job's language (none for an English-only model)."""
    generator: Any = getattr(model, "module", model)
    generator = getattr(generator, "_orig_mod", generator)
    room = int(getattr(generator.config, "max_target_positions", 0) or 0) - PROMPT_TOKENS
    options: dict[str, Any] = {"max_new_tokens": min(MAX_NEW_TOKENS, room) if room > 0 else MAX_NEW_TOKENS}
    options["do_sample"] = False
    if multilingual(generator):
        options |= {"language": language or None, "task": "transcribe"}
    produced: torch.Tensor = generator.generate(input_features=features, **options)
    return produced


def detect_language(model: Any, dataset: SpeechDataset) -> str:
    """The language most of the first few training clips are in, by the model's own detection."""
    features = torch.stack([dataset[index]["input_features"] for index in range(min(DETECTION_CLIPS, len(dataset)))])
    with torch.inference_mode():
        found = model.detect_language(input_features=features.to(next(model.parameters()).device))
    tokenizer = dataset.processor.tokenizer
    code: str = Counter(tokenizer.decode([int(token)]) for token in found.reshape(-1).tolist()).most_common(1)[0][0]
    return code.strip("<|>")


def prefix(model: Any, processor: Any, language: str, log: Callable[[str], None], data: SpeechDataset) -> str:
    """Sets the tokenizer's language and task tokens for the labels; returns the language the job uses."""
    if not multilingual(model):
        if language:
            raise JobFailure(
                "INVALID_SPEC", "data.language is set, but the base model is English-only (no language tokens)"
            )
        processor.tokenizer.set_prefix_tokens(predict_timestamps=False)
        return ""
    if not language:
        language = detect_language(model, data)
        log(f"data.language unset: the model hears {language!r} in the first training clips, and trains with it")
    try:
        processor.tokenizer.set_prefix_tokens(language=language, task="transcribe", predict_timestamps=False)
    except ValueError as exc:
        raise JobFailure("INVALID_SPEC", f"data.language {language!r}: {exc}") from exc
    return language


def evaluate_seq2seq(tokenizer: Any, language: str) -> Callable[..., Evaluation]:
    """Loss by teacher forcing, and word and character error rates of the generated transcripts."""

    def run(model: nn.Module, loader: DataLoader[Any], to_device: Callable[[Batch], Batch]) -> Evaluation:
        model.eval()
        total, count, references, hypotheses = 0.0, 0, [], []
        with torch.inference_mode():
            for batch in loader:
                batch = to_device(batch)
                size = batch["labels"].shape[0]
                total, count = total + float(model(**batch).loss) * size, count + size
                written = transcribe(model, batch["input_features"], language)
                hypotheses += tokenizer.batch_decode(written, skip_special_tokens=True)
                labels = batch["labels"].masked_fill(batch["labels"] == IGNORED, tokenizer.pad_token_id)
                references += tokenizer.batch_decode(labels, skip_special_tokens=True)
        model.train()
        return transcript_evaluation(total, count, references, hypotheses)

    return run
