"""Tiny, fast, randomly initialised models and synthetic datasets for tests (nothing is downloaded)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

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


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
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


CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""A chat template of the ChatML family (Qwen, SmolLM2), for the Llama-style tiny model."""


def tiny_bpe_tokenizer(chat_template: str | None = None) -> object:
    """A byte-level BPE tokenizer trained here on the test sentences (a few hundred tokens, nothing downloaded)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    corpus = [row["text"] for row in keyword_rows(200)] + ["user assistant system answer question topic"] * 20
    trained = ByteLevelBPETokenizer()
    trained.train_from_iterator(corpus, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=trained, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    if chat_template is not None:  # as ChatML models ship: a turn ends with the end-of-sequence token
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tokenizer.eos_token = "<|im_end|>"
        tokenizer.chat_template = chat_template
    return tokenizer


def make_tiny_gpt2(folder: Path, seed: int = 0) -> Path:
    """A 2-layer GPT-2 (hidden 32) with its own byte-level BPE vocabulary and no chat template."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer: Any = tiny_bpe_tokenizer()
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=2, n_head=2, eos_token_id=tokenizer.eos_token_id
    )
    GPT2LMHeadModel(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def make_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """A 2-layer Llama-style model (hidden 32) with a ChatML chat template, as instruct models ship."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer: Any = tiny_bpe_tokenizer(CHATML_TEMPLATE)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def chat_rows(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """Conversations whose answer is the topic of the user's sentence: a format a tiny model learns."""
    rows = []
    for row in keyword_rows(count, seed):
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "answer with the topic"},
                    {"role": "user", "content": row["text"]},
                    {"role": "assistant", "content": row["label"]},
                ]
            }
        )
    return rows
