"""Tiny, fast, randomly initialised models and synthetic datasets for tests (nothing is downloaded)."""

from __future__ import annotations

import json
import random
from pathlib import Path

TOPIC_WORDS = {
    "sport": ["goal", "match", "team", "league", "coach", "striker"],
    "finance": ["bank", "stock", "market", "profit", "shares", "loan"],
    "weather": ["rain", "sunny", "storm", "wind", "cloud", "snow"],
}
FILLER = ["the", "a", "today", "news", "report", "about", "very", "and", "new", "big"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def keyword_rows(count: int, seed: int = 0) -> list[dict[str, str]]:
    """Sentences whose topic words give away the label: learnable by a tiny model in a few steps."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        label = sorted(TOPIC_WORDS)[i % len(TOPIC_WORDS)]
        words = rng.choices(TOPIC_WORDS[label], k=3) + rng.choices(FILLER, k=3)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def make_tiny_bert(folder: Path, num_labels: int = 2, seed: int = 0, dropout: float = 0.1) -> Path:
    """A 2-layer BERT (hidden 32) with a word-level vocabulary of the test sentences, saved as a model folder.
    The seed fixes its random weights, so every test session starts from the same model."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    torch.manual_seed(seed)

    folder.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL + FILLER + sorted(w for words in TOPIC_WORDS.values() for w in words)
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(vocab)}, model_max_length=64)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        initializer_range=0.2,  # ~1/sqrt(hidden): with BERT's 0.02 a model this narrow barely mixes tokens at first
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
