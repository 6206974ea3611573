"""Generate's decoding loop on a tiny Llama: greedy rows write exactly what transformers' generate writes (batched
with left padding or alone), a seeded sampled row writes the same text whatever shares its batch, stop strings cut
the text without ever sending part of one, a caller that goes away stops its row at once, and the context's end
finishes a row with LENGTH."""

from __future__ import annotations

import time
from typing import Any

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.tiny import make_tiny_llama
from tuneforge.workers.core.prediction import PredictionServer, as_loaded
from tuneforge.workers.messages import GenerateBatch, GeneratedPiece, GenerationRequest, StopGeneration, TextGenerated
from tuneforge.workers.tasks.text_generation.streaming import prompt_text, stream

PROMPTS = ("the match was won", "rain and wind over the", "bank")


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    folder = make_tiny_llama(tmp_path_factory.mktemp("llama") / "model", seed=4)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(folder).eval(), tokenizer


def run(
    llama: tuple[Any, Any], requests: list[GenerationRequest], gone: Any = frozenset()
) -> tuple[list[list[GeneratedPiece]], int]:
    model, tokenizer = llama
    pieces: list[list[GeneratedPiece]] = [[] for _ in requests]

    def emit(step: list[GeneratedPiece]) -> None:
        for piece in step:
            assert not pieces[piece.row] or not pieces[piece.row][-1].finish, "nothing after a row's last piece"
            pieces[piece.row].append(piece)

    steps = stream(model, tokenizer, requests, 64, emit, gone if callable(gone) else lambda: set(gone))
    return pieces, steps


def text(pieces: list[GeneratedPiece]) -> str:
    return "".join(piece.text for piece in pieces)


def test_greedy_rows_write_what_transformers_generate_writes(llama: tuple[Any, Any]) -> None:
    model, tokenizer = llama
    requests = [GenerationRequest(prompt=p, max_new_tokens=12) for p in PROMPTS]
    pieces, _ = run(llama, requests)
    for prompt, row in zip(PROMPTS, pieces, strict=True):
        ids = tokenizer(prompt, return_tensors="pt")
        expected = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        written = tokenizer.decode(expected[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        assert text(row) == written
        assert row[-1].finish in ("stop", "length") and row[-1].prompt_tokens == ids["input_ids"].shape[1]
        assert len(row) > 2  # streamed in pieces, not at the end


def test_a_seeded_row_writes_the_same_text_whatever_shares_its_batch(llama: tuple[Any, Any]) -> None:
    sampled = GenerationRequest(prompt=PROMPTS[1], max_new_tokens=16, temperature=1.5, top_p=0.9, seed=7)
    alone, _ = run(llama, [sampled])
    shared, _ = run(llama, [GenerationRequest(prompt=PROMPTS[0], temperature=1.0), sampled, GenerationRequest("x")])
    other_seed, _ = run(llama, [GenerationRequest(prompt=PROMPTS[1], max_new_tokens=16, temperature=1.5, seed=8)])
    greedy, _ = run(llama, [GenerationRequest(prompt=PROMPTS[1], max_new_tokens=16)])
    assert text(alone[0]) == text(shared[1])
    assert text(alone[0]) != text(greedy[0]) and text(alone[0]) != text(other_seed[0])


def test_a_stop_string_ends_the_text_before_it_and_no_part_of_it_is_sent(llama: tuple[Any, Any]) -> None:
    full, _ = run(llama, [GenerationRequest(prompt=PROMPTS[0], max_new_tokens=24)])
    written = text(full[0])
    stop = written[len(written) // 2 : len(written) // 2 + 3]
    assert len(stop.strip()) == 3, written
    pieces, _ = run(llama, [GenerationRequest(prompt=PROMPTS[0], max_new_tokens=24, stop=("never there", stop))])
    assert text(pieces[0]) == written[: written.index(stop)]
    assert pieces[0][-1].finish == "stop"
    assert all(stop not in piece.text for piece in pieces[0])


def test_a_caller_that_goes_away_stops_its_row_and_the_loop_ends_with_the_last(llama: tuple[Any, Any]) -> None:
    requests = [GenerationRequest(prompt=p, max_new_tokens=40) for p in PROMPTS[:2]]
    asked = {"count": 0}

    def gone() -> set[int]:
        asked["count"] += 1
        return {0, 1} if asked["count"] > 6 else {0} if asked["count"] > 3 else set()

    pieces, steps = run(llama, requests, gone)
    assert not any(piece.finish for row in pieces for piece in row), "a gone row gets no last message"
    assert max(p.generated_tokens for p in pieces[0]) <= 3 < max(p.generated_tokens for p in pieces[1]) <= 6
    assert steps == 6  # the loop ended when the last caller went, not at max_new_tokens
    pieces_all_gone, steps_all_gone = run(llama, requests, lambda: {0, 1})
    assert pieces_all_gone == [[], []] and steps_all_gone == 0


def test_the_end_of_the_context_finishes_a_row_with_length(llama: tuple[Any, Any]) -> None:
    model, tokenizer = llama
    context = model.config.max_position_embeddings
    long_prompt = " ".join(["word"] * 400)
    pieces: list[GeneratedPiece] = []
    stream(
        model, tokenizer, [GenerationRequest(prompt=long_prompt, max_new_tokens=50)], context - 3, pieces.extend, set
    )
    assert pieces[-1].finish == "length" and pieces[-1].generated_tokens == 3
    assert pieces[-1].prompt_tokens == context - 3


def test_chat_messages_are_rendered_with_the_models_template(llama: tuple[Any, Any]) -> None:
    _, tokenizer = llama
    rendered = prompt_text(tokenizer, GenerationRequest(messages=(("system", "be brief"), ("user", "hello"))))
    assert rendered.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nhello" in rendered


class OneModel:
    """The worker's model cache, holding one loaded model."""

    def __init__(self, loaded: Any) -> None:
        self.loaded = loaded
        self.asked = 0

    def get(self, artifact: str, sha256: str) -> Any:
        self.asked += 1
        return self.loaded


def test_the_worker_stops_a_row_when_its_caller_goes_and_drops_a_batch_nobody_waits_for(
    llama: tuple[Any, Any],
) -> None:
    model, tokenizer = llama
    cache = OneModel(as_loaded(model, tokenizer, {"task": "text_generation", "data": {}}))
    events: list[TextGenerated] = []

    def send(event: Any) -> None:
        events.append(event)
        if len(events) == 1:  # the first piece is out: caller 0 goes away (as the command thread would say)
            server.submit(StopGeneration(1, (0,)))

    server = PredictionServer("worker-1", send, cache, start=False)  # type: ignore[arg-type]
    long = GenerationRequest(prompt=PROMPTS[0], max_new_tokens=200, temperature=1.0, seed=1)
    server.submit(
        GenerateBatch(1, "job", "a.tar", "sha", [long, GenerationRequest(prompt=PROMPTS[1], max_new_tokens=30)])
    )
    server.serve_one()
    stopped = [piece for event in events for piece in event.pieces if piece.row == 0]
    other = [piece for event in events for piece in event.pieces if piece.row == 1]
    assert max(piece.generated_tokens for piece in stopped) <= 2 and not any(piece.finish for piece in stopped)
    assert other[-1].finish in ("stop", "length")

    events.clear()
    server.submit(GenerateBatch(2, "job", "a.tar", "sha", [long]))
    server.submit(StopGeneration(2, (0,)))  # gone before its batch was reached
    server.submit(GenerateBatch(3, "job", "a.tar", "sha", [long], deadline=time.time() - 1))
    server.serve_one()
    server.serve_one()
    assert events == [] and cache.asked == 1, "neither batch loaded the model or wrote a token"


def test_a_finished_row_leaves_the_batch_and_the_others_write_the_same(llama: tuple[Any, Any]) -> None:
    """A short answer beside a long one: once it ends, the forward passes carry only the long row (and its cache),
    and the long row writes exactly what it writes alone."""
    model, _ = llama
    widths: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: widths.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        requests = [
            GenerationRequest(prompt=PROMPTS[0], max_new_tokens=2),
            GenerationRequest(prompt=PROMPTS[1], max_new_tokens=20),
        ]
        together, _ = run(llama, requests)
    finally:
        hook.remove()
    alone, _ = run(llama, [requests[1]])
    assert text(together[1]) == text(alone[0]) and together[0][-1].finish in ("stop", "length")
    short = together[0][-1].generated_tokens
    assert widths == sorted(widths, reverse=True) and widths[0] == 2 and widths[-1] == 1, widths
    assert widths.count(2) <= short, "the short row's last token is its last pass in the batch"
