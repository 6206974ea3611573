"""Generate's decoding loop: several callers' prompts in one batch, one token a step with a key-value cache, each row
with its own temperature, nucleus, seed, stop strings and length, and its new text handed out after every step.

transformers' `generate` takes one sampling setting and one random stream for a whole batch and cannot drop a row
whose caller went away, so the loop is written here; greedy rows write exactly the tokens `generate` writes."""

from __future__ import annotations

import inspect
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tuneforge.workers.messages import GeneratedPiece, GenerationRequest
from tuneforge.workers.tasks.text_generation.samples import left_padded

INCOMPLETE = "\ufffd"
"""What a decoder writes for a character whose bytes are not all generated yet: held back until they are."""


@dataclass
class Row:
    """One caller's answer as it grows."""

    request: GenerationRequest
    prompt_tokens: int
    limit: int
    """New tokens this row may write: its max_new_tokens, or fewer when the context ends first."""
    random: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    sent: int = 0
    """Characters of the decoded answer already handed out."""
    finish: str = ""


def prompt_text(tokenizer: Any, request: GenerationRequest) -> str:
    """The prompt as given, or the conversation rendered by the model's chat template with its assistant header."""
    if request.prompt:
        return request.prompt
    messages = [{"role": role, "content": content} for role, content in request.messages]
    rendered: str = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return rendered


def end_tokens(model: nn.Module, tokenizer: Any) -> set[int]:
    """Every token that ends an answer: the generation config's (several for some chat models) and the tokenizer's."""
    ends = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    found = set(ends if isinstance(ends, list) else [] if ends is None else [ends])
    if tokenizer.eos_token_id is not None:
        found.add(int(tokenizer.eos_token_id))
    return found


def next_tokens(logits: torch.Tensor, rows: list[Row]) -> list[int]:
    """Each row's next token: the most likely one, or one drawn from its temperature-scaled nucleus with its own
    random stream (so a seeded row writes the same text whatever shares its batch)."""
    chosen = logits.argmax(-1).tolist()
    for index, row in enumerate(rows):
        settings = row.request
        if settings.temperature <= 0 or row.finish:
            continue
        probabilities = torch.softmax(logits[index].float().cpu() / settings.temperature, -1)
        if 0 < settings.top_p < 1:
            ordered, order = probabilities.sort(descending=True)
            outside = ordered.cumsum(0) - ordered >= settings.top_p  # the first token is always kept
            probabilities[order[outside]] = 0.0
        chosen[index] = int(torch.multinomial(probabilities, 1, generator=row.random))
    return chosen


def new_text(tokenizer: Any, row: Row, done: bool) -> str:
    """The row's text not handed out yet; cut at its first stop string (which then finishes the row). While the row
    goes on, a tail that may still become a stop string, or an incomplete character, waits."""
    text: str = tokenizer.decode(row.tokens, skip_special_tokens=True)
    stops = [text.find(stop) for stop in row.request.stop if stop in text]
    if stops:
        text, row.finish = text[: min(stops)], "stop"
    elif not done:
        held = max(
            (k for stop in row.request.stop for k in range(1, len(stop)) if text.endswith(stop[:k])),
            default=0,
        )
        text = text[: len(text) - held]
        text = text.rstrip(INCOMPLETE)
    piece = text[row.sent :]
    row.sent = max(row.sent, len(text))
    return piece


def stream(
    model: nn.Module,
    tokenizer: Any,
    requests: list[GenerationRequest],
    max_prompt_tokens: int,
    emit: Callable[[list[GeneratedPiece]], None],
    gone: Callable[[], set[int]],
) -> int:
    """Writes every row's answer, calling `emit` with each step's pieces; rows in `gone()` stop at once, and so does
    the whole loop once no row is left. Returns the steps (forward passes after the prompt's) it ran."""
    device = next(model.parameters()).device
    prompts = [prompt_text(tokenizer, request) for request in requests]
    inputs = {name: value.to(device) for name, value in left_padded(tokenizer, prompts, max_prompt_tokens).items()}
    mask = inputs["attention_mask"]
    rows = start_rows(model, requests, mask.sum(-1).tolist())
    ends = end_tokens(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(ends), 0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    steps = 0
    keyword = cache_keyword(model)
    live = list(range(len(rows)))
    """The rows the batch still computes, in its order: a finished row leaves it (and its cache) at once."""
    with torch.inference_mode():
        out = model(input_ids=inputs["input_ids"], attention_mask=mask, position_ids=positions, use_cache=True)
        cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
        logits = out.logits[:, -1]
        while True:
            emit(close_rows(tokenizer, rows, gone()))
            if all(row.finish for row in rows):
                return steps
            chosen = next_tokens(logits, [rows[index] for index in live])
            emit(advance(tokenizer, rows, live, chosen, ends))
            if all(row.finish for row in rows):
                return steps
            keep = [place for place, index in enumerate(live) if not rows[index].finish]
            if len(keep) < len(live) and hasattr(cache, "batch_select_indices"):
                cache.batch_select_indices(torch.tensor(keep, device=device))
                mask, positions = mask[keep], positions[keep]
                live, chosen = [live[place] for place in keep], [chosen[place] for place in keep]
            step = torch.tensor(
                [pad if rows[index].finish else token for index, token in zip(live, chosen, strict=True)]
            )
            mask = torch.cat([mask, mask.new_ones((len(live), 1))], -1)
            positions = positions[:, -1:] + 1
            out = model(
                input_ids=step.to(device).unsqueeze(-1),
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{keyword: cache},
            )
            cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
            logits = out.logits[:, -1]
            steps += 1


def cache_keyword(model: nn.Module) -> str:
    """The name the model's forward takes its key-value cache by: `cache` from transformers 5.24 on (where
    `past_key_values` is deprecated), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def start_rows(model: nn.Module, requests: list[GenerationRequest], prompt_lengths: list[int]) -> list[Row]:
    """A row per request: its room before the model's context ends, and its random stream when it samples."""
    context = int(getattr(getattr(model, "config", None), "max_position_embeddings", 0) or 0)
    rows = []
    for request, length in zip(requests, prompt_lengths, strict=True):
        room = request.max_new_tokens if not context else max(0, min(request.max_new_tokens, context - length))
        seed = request.seed if request.seed is not None else secrets.randbits(63)
        random = torch.Generator().manual_seed(seed) if request.temperature > 0 else None
        rows.append(Row(request, int(length), room, random))
    return rows


def close_rows(tokenizer: Any, rows: list[Row], gone: set[int]) -> list[GeneratedPiece]:
    """Rows whose callers went away stop silently; rows out of room end with the text they held back."""
    for index in gone:
        if 0 <= index < len(rows) and not rows[index].finish:
            rows[index].finish = "gone"
    closing = []
    for index, row in enumerate(rows):
        if not row.finish and len(row.tokens) >= row.limit:
            row.finish = "length"
            text = new_text(tokenizer, row, done=True)
            closing.append(GeneratedPiece(index, text, len(row.tokens), row.finish, row.prompt_tokens))
    return closing


def advance(
    tokenizer: Any, rows: list[Row], live: list[int], chosen: list[int], ends: set[int]
) -> list[GeneratedPiece]:
    """Each open row of the batch (`live`, in its order, with `chosen` its tokens) takes its token (an end token
    finishes it) and hands out the text that is ready."""
    pieces = []
    for index, token in zip(live, chosen, strict=True):
        row = rows[index]
        if row.finish:
            continue
        if token in ends:
            row.finish = "stop"
        else:
            row.tokens.append(token)
            if len(row.tokens) >= row.limit:
                row.finish = "length"  # now, not a step later: the batch drops the row before its next pass
        piece = new_text(tokenizer, row, done=bool(row.finish))
        if row.finish:  # an end token, or a stop string new_text found
            pieces.append(GeneratedPiece(index, piece, len(row.tokens), row.finish, row.prompt_tokens))
        elif piece:
            pieces.append(GeneratedPiece(index, piece, len(row.tokens)))
    return pieces
