"""Greedy generation, as Predict answers and as evaluation answers held-out prompts, which it scores: exact match and
ROUGE-L against the held-out answers (rouge-score, Google's reference implementation), with the untuned model's
answers kept for the report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from rouge_score import rouge_scorer
from torch import nn

from tuneforge.workers.core.errors import InvalidDataset
from tuneforge.workers.tasks.text_generation.data import Conversation, Example

MAX_NEW_TOKENS = 128
"""The longest answer written, by Predict or an evaluation."""
SHOWN_CHARS = 400
"""Characters of a prompt, answer or reference kept in metrics.json and the report."""


@dataclass(frozen=True)
class Sample:
    prompt: str
    """Rendered as the model sees it (a chat prompt ends with the template's assistant header)."""
    reference: str


def draw_samples(examples: list[Example], tokenizer: Any, count: int) -> list[Sample]:
    """The first `count` validation examples that have a prompt: a conversation up to its last learned assistant
    turn, or a prompt and its completion. Plain text has none to answer."""
    samples: list[Sample] = []
    for example in examples:
        if len(samples) == count:
            break
        if isinstance(example, Conversation):
            last = max(i for i, (_, _, trained) in enumerate(example.turns) if trained)
            messages = [{"role": role, "content": content} for role, content, _ in example.turns[:last]]
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            samples.append(Sample(prompt, example.turns[last][1]))
        elif len(example.segments) == 2:
            samples.append(Sample(example.segments[0].text, example.segments[1].text))
    if count and not samples:
        raise InvalidDataset(
            "evaluation.generation_samples needs prompts to answer: chat or prompt/completion validation data"
        )
    return samples


def left_padded(tokenizer: Any, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Token ids padded and cut on the left (to max_length tokens): generation continues from each text's end."""
    return dict(
        tokenizer(
            texts,
            return_tensors="pt",
            padding=True,
            padding_side="left",
            truncation=True,
            truncation_side="left",
            max_length=max_length,
        )
    )


def answer(model: nn.Module, tokenizer: Any, prompts: list[str], max_length: int, batch: int = 8) -> list[str]:
    """Greedy answers up to MAX_NEW_TOKENS, ending at the end-of-sequence token, `batch` prompts at a time."""
    generator: Any = getattr(model, "module", model)  # under data parallelism, the wrapped model
    generator = getattr(generator, "_orig_mod", generator)  # compiled: the original
    device = next(generator.parameters()).device
    answers: list[str] = []
    was_training = generator.training
    generator.eval()
    for start in range(0, len(prompts), batch):
        inputs = {
            name: value.to(device)
            for name, value in left_padded(tokenizer, prompts[start : start + batch], max_length).items()
        }
        with torch.inference_mode():
            produced = generator.generate(
                **inputs,
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
            )
        answers += tokenizer.batch_decode(produced[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    generator.train(was_training)
    return answers


def scorer() -> Callable[[list[str], list[str]], dict[str, float]]:
    rouge = rouge_scorer.RougeScorer(["rougeL"])

    def score(answers: list[str], references: list[str]) -> dict[str, float]:
        pairs = list(zip(answers, references, strict=True))
        exact = sum(a.strip() == r.strip() for a, r in pairs) / len(pairs)
        overlap = sum(rouge.score(r, a)["rougeL"].fmeasure for a, r in pairs) / len(pairs)
        return {"eval_exact_match": exact, "eval_rouge_l": overlap}

    return score


def shown(samples: list[Sample], before: list[str], after: list[str]) -> list[dict[str, str]]:
    return [
        {
            "prompt": sample.prompt[-SHOWN_CHARS:],
            "reference": sample.reference[:SHOWN_CHARS],
            "before": untuned[:SHOWN_CHARS],
            "after": tuned[:SHOWN_CHARS],
        }
        for sample, untuned, tuned in zip(samples, before, after, strict=True)
    ]
