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


def make_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """The tiny Llama written as llama.cpp writes a GGUF file (f32 tensors under llama.cpp's names, queries and keys
    permuted as its converter does, the byte-level BPE vocabulary and chat template as metadata): a base model as
    users hold them, in a few kilobytes."""
    import gguf
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = make_tiny_llama(path.parent / f".{path.stem}-source", seed)
    model: Any = AutoModelForCausalLM.from_pretrained(source)
    tokenizer: Any = AutoTokenizer.from_pretrained(source)
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocabulary = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([token for token, _ in vocabulary])
    writer.add_token_types([3 if token in special else 1 for token, _ in vocabulary])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([" ".join(merge) if isinstance(merge, list) else merge for merge in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)

    def permuted(weight: Any, heads: int) -> Any:  # llama.cpp's rotary layout for queries and keys
        return (
            weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2)
            .reshape(weight.shape)
        )

    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to the embeddings
        weight = tensor.numpy().astype(np.float32)
        if name in names:
            target = names[name]
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            module, kind = rest.rsplit(".", 1)
            target = f"blk.{layer}.{names[module]}.{kind}"
            if module == "self_attn.q_proj":
                weight = permuted(weight, config.num_attention_heads)
            elif module == "self_attn.k_proj":
                weight = permuted(weight, config.num_key_value_heads)
        writer.add_tensor(target, weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


WRONG = {"sport": "weather", "weather": "finance", "finance": "sport"}


def preference_rows(count: int, seed: int = 1) -> dict[str, list[dict[str, Any]]]:
    """The same pairs in each layout: the topic of the user's words chosen, another topic rejected."""
    rows = keyword_rows(count, seed=seed)
    wrong = {label: WRONG.get(label, "sport") for label in {row["label"] for row in rows}}
    return {
        "plain": [
            {"prompt": r["text"] + " ->", "chosen": " " + r["label"], "rejected": " " + wrong[r["label"]]} for r in rows
        ],
        "messages": [
            {"messages": [{"role": "user", "content": r["text"]}], "chosen": r["label"], "rejected": wrong[r["label"]]}
            for r in rows
        ],
        "trl_conversational": [
            {
                "prompt": [{"role": "user", "content": r["text"]}],
                "chosen": [{"role": "assistant", "content": r["label"]}],
                "rejected": [{"role": "assistant", "content": wrong[r["label"]]}],
            }
            for r in rows
        ],
        "openai": [
            {
                "input": {"messages": [{"role": "user", "content": r["text"]}]},
                "preferred_output": [{"role": "assistant", "content": r["label"]}],
                "non_preferred_output": [{"role": "assistant", "content": wrong[r["label"]]}],
            }
            for r in rows
        ],
    }
