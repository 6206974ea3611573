"""What both speech recognition families share: the transcript form references and hypotheses are compared in, the
dataset that decodes clips lazily into the model's input and label ids, and the error rates of an evaluation."""

from __future__ import annotations

from typing import Any

import jiwer
import torch

from tuneforge.workers.core.audio import load_mono
from tuneforge.workers.core.evaluation import Evaluation
from tuneforge.workers.core.media_data import MediaItem

ERROR_EXAMPLES = 10


def normalise(transcript: str) -> str:
    """Lower case with single spaces: the form the vocabulary and the error rates use."""
    return " ".join(transcript.lower().split())


class SpeechDataset(torch.utils.data.Dataset[dict[str, Any]]):
    """Decodes lazily: each item is the feature extractor's input for the clip (`input_values` for CTC models,
    log-mel `input_features` for Whisper: its first model input) and the transcript's token ids. With `start_token`
    (an encoder-decoder's decoder start) a leading one is left out: the model puts it back when it shifts the labels
    right."""

    def __init__(self, items: list[MediaItem], processor: Any, start_token: int | None = None):
        self.items = items
        self.processor = processor
        self.start_token = start_token
        self.rate = int(processor.feature_extractor.sampling_rate)
        self.input_name = processor.feature_extractor.model_input_names[0]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        wave = load_mono(item.path, item.source, self.rate)
        features = self.processor.feature_extractor(wave.numpy(), sampling_rate=self.rate, return_tensors="pt")
        labels = list(self.processor.tokenizer(item.target).input_ids)
        if self.start_token is not None and labels and labels[0] == self.start_token:
            labels = labels[1:]
        return {self.input_name: features[self.input_name][0], "labels": labels}


def transcript_evaluation(loss_sum: float, count: int, references: list[str], hypotheses: list[str]) -> Evaluation:
    """Mean loss, word and character error rates (jiwer) of normalised transcripts, and the first few errors."""
    hypotheses = [normalise(text) for text in hypotheses]
    references = [normalise(text) for text in references]
    wer = jiwer.wer(references, hypotheses) if references else 0.0
    cer = jiwer.cer(references, hypotheses) if references else 0.0
    errors = [{"reference": r, "hypothesis": h} for r, h in zip(references, hypotheses, strict=True) if r != h]
    metrics = {"eval_loss": loss_sum / max(1, count), "eval_wer": float(wer), "eval_cer": float(cer)}
    return Evaluation(metrics, {"error_examples": errors[:ERROR_EXAMPLES], "utterances": len(references)})
