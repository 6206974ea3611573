"""Text generation in the core: the three data formats read and checked by line, the label mask token by token (only
what the model should learn to write), perplexity per scored token, LoRA that keeps a tied output layer shared, a
tiny Llama that learns to answer in a format, Predict's greedy continuation against plain transformers, and the
exports that cannot apply refused with a reason."""

from __future__ import annotations

import dataclasses
import json
import math
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch
from rouge_score import rouge_scorer
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.core.test_training_core import FAST, make_spec, run
from tests.tiny import chat_rows, keyword_rows, make_tiny_gguf, make_tiny_gpt2, make_tiny_llama, write_jsonl
from tuneforge.workers.core.errors import InvalidDataset, JobFailure
from tuneforge.workers.core.export import ExportFailed, ExportFormat, export_model
from tuneforge.workers.core.lora import apply_lora, head_module_names
from tuneforge.workers.core.model_setup import checkpoint_activations
from tuneforge.workers.core.prediction import load_model
from tuneforge.workers.messages import DataFile, LogEmitted, Outcome
from tuneforge.workers.spec import (
    AdaptationMethod,
    AdaptationSettings,
    DataSettings,
    EvaluationSettings,
    LoraSettings,
    ScheduleKind,
    ScheduleSettings,
)
from tuneforge.workers.tasks.text_generation import token_loss
from tuneforge.workers.tasks.text_generation.data import Conversation, Plain, Segment, read_examples
from tuneforge.workers.tasks.text_generation.runtime import (
    DEFAULT_CHAT_TEMPLATE,
    IGNORED,
    collate,
    encode,
    evaluate_lm,
    packed_collate,
    sequences_in,
)
from tuneforge.workers.tasks.text_generation.token_loss import causal_lm_loss, projects_in_chunks

SYSTEM = ("system", "answer with the topic", False)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_gpt2(tmp_path_factory.mktemp("gpt2") / "model")


def trained_text(tokenizer: Any, item: dict[str, list[int]]) -> str:
    """The tokens the loss covers, decoded in order (special tokens kept)."""
    return "".join(
        tokenizer.decode([token])
        for token, label in zip(item["input_ids"], item["labels"], strict=True)
        if label != IGNORED
    )


def test_chat_labels_cover_exactly_the_trained_assistant_turns(llama: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(llama)
    turns = (
        SYSTEM,
        ("user", "goal match team", False),
        ("assistant", "sport", True),
        ("user", "rain and wind", False),
        ("assistant", "storm", False),  # weight 0: shown, not learned
        ("user", "bank loan", False),
        ("assistant", "finance", True),
    )
    item = encode(Conversation(1, turns), tokenizer, 256, all_tokens=False)
    assert item is not None
    messages = [{"role": role, "content": content} for role, content, _ in turns]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert item["input_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    for token, label in zip(item["input_ids"], item["labels"], strict=True):
        assert label in (token, IGNORED)
    assert trained_text(tokenizer, item) == "sport<|im_end|>\nfinance<|im_end|>\n"
    everything = encode(Conversation(1, turns), tokenizer, 256, all_tokens=True)
    assert everything is not None and everything["labels"] == everything["input_ids"]


def test_a_model_without_a_chat_template_gets_the_default_one(gpt2: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(gpt2)
    assert tokenizer.chat_template is None
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE  # what prepare() does
    item = encode(
        Conversation(1, (SYSTEM, ("user", "goal", False), ("assistant", "sport", True))), tokenizer, 256, False
    )
    assert item is not None
    text = tokenizer.decode(item["input_ids"])
    assert text == "<|system|>\nanswer with the topic\n<|user|>\ngoal\n<|assistant|>\nsport<|endoftext|>\n"
    assert trained_text(tokenizer, item) == "sport<|endoftext|>\n"


def test_a_completion_and_plain_text_are_learned_to_their_end(gpt2: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(gpt2)
    pair = encode(Plain(1, (Segment("goal match", False), Segment(" sport", True))), tokenizer, 256, False)
    assert pair is not None and trained_text(tokenizer, pair) == " sport<|endoftext|>"
    assert tokenizer.decode(pair["input_ids"]) == "goal match sport<|endoftext|>"
    straddling = encode(Plain(1, (Segment("goal match ", False), Segment("sport", True))), tokenizer, 256, False)
    assert straddling is not None and trained_text(tokenizer, straddling) == " sport<|endoftext|>"
    plain = encode(Plain(1, (Segment("rain and wind", True),)), tokenizer, 256, False)
    assert plain is not None and plain["labels"] == plain["input_ids"]


def test_an_example_whose_answer_is_cut_away_is_left_out(gpt2: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(gpt2)
    long_prompt = " ".join(["goal"] * 40)
    assert encode(Plain(1, (Segment(long_prompt, False), Segment("sport", True))), tokenizer, 8, False) is None


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, {"text": "c"}],
            "data.jsonl line 2: the file is in the chat format (from its first line): this line needs `messages` "
            "(a list of {role, content})",
        ),
        (
            [{"messages": [{"role": "robot", "content": "a"}]}],
            "data.jsonl line 1: messages[0].role must be one of system, user, assistant, got 'robot'",
        ),
        (
            [{"messages": [{"role": "user", "content": "a", "weight": 0}, {"role": "assistant", "content": "b"}]}],
            "data.jsonl line 1: messages[0].weight must be 0 or 1, and only on assistant messages",
        ),
        (
            [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0}]}],
            "data.jsonl line 1: no assistant message to learn from (every one has weight 0, or there is none)",
        ),
        (
            [{"prompt": "a", "completion": ""}],
            "data.jsonl line 1: `prompt` must be a string and `completion` a non-empty string",
        ),
        (
            [{"question": "a"}],
            "data.jsonl line 1: not a text generation record (its keys: question); give `messages` (a list of "
            "{role, content}), or `prompt` and `completion`, or `text` on every line",
        ),
    ],
)
def test_bad_lines_are_named(tmp_path: Path, lines: list[dict[str, Any]], message: str) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", lines)
    with pytest.raises(InvalidDataset) as refused:
        read_examples(DataFile(str(path), "data.jsonl"))
    assert str(refused.value) == message


def test_each_format_is_found_from_the_file(tmp_path: Path) -> None:
    rows = {
        "chat": chat_rows(3),
        "prompt_completion": [{"prompt": r["text"], "completion": r["label"]} for r in keyword_rows(3)],
        "text": [{"text": r["text"]} for r in keyword_rows(3)],
    }
    for name, lines in rows.items():
        path = write_jsonl(tmp_path / f"{name}.jsonl", lines)
        found, examples = read_examples(DataFile(str(path), f"{name}.jsonl"))
        assert (found, len(examples)) == (name, 3)


def test_perplexity_is_per_scored_token_over_the_whole_set(gpt2: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(gpt2)
    model = AutoModelForCausalLM.from_pretrained(gpt2).eval()
    items = [
        encode(Plain(1, (Segment(r["text"] + " ", False), Segment(r["label"], True))), tokenizer, 256, False)
        for r in keyword_rows(5)
    ] + [encode(Plain(1, (Segment("rain and wind and snow today", True),)), tokenizer, 256, False)]
    batches = [collate(tokenizer.eos_token_id)([item]) for item in items if item is not None]
    result = evaluate_lm(model, batches, lambda batch: batch)  # type: ignore[arg-type]
    total, count = 0.0, 0
    model.eval()  # evaluation hands the model back in training mode
    with torch.inference_mode():
        for batch in batches:  # independently: summed cross-entropy over the shifted, scored positions
            logits = model(input_ids=batch["input_ids"]).logits[0, :-1]
            targets = batch["labels"][0, 1:]
            keep = targets != IGNORED
            total += float(torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum"))
            count += int(keep.sum())
    assert result.metrics["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    assert result.metrics["eval_perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result.details == {"sequences": 6, "tokens": count}


def train(model: Path, rows: list[dict[str, Any]], tmp_path: Path, **changes: Any) -> tuple[Path, list[str]]:
    """Trains to the end; the unpacked artifact and the job's log lines."""
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    hyperparameters = dataclasses.replace(
        FAST, epochs=30, learning_rate=3e-3, schedule=ScheduleSettings(kind=ScheduleKind.CONSTANT)
    )
    spec = make_spec(
        model,
        task="text_generation",
        data=changes.pop("data", DataSettings(training_file="files/train", validation_fraction=0.2)),
        hyperparameters=changes.pop("hyperparameters", hyperparameters),
        evaluation=changes.pop("evaluation", EvaluationSettings(log_every_steps=20, evaluate_before_training=True)),
        **changes,
    )
    finished, events = run(spec, data, tmp_path / "work")
    assert finished.outcome is Outcome.SUCCEEDED, finished.message
    with tarfile.open(tmp_path / "work" / "artifact.tar") as tar:
        tar.extractall(tmp_path / "model", filter="data")
    return tmp_path / "model", [event.message for event in events if isinstance(event, LogEmitted)]


def topic_prompts(tokenizer: Any, count: int) -> tuple[list[str], list[str]]:
    rows = keyword_rows(count, seed=5)  # sentences the training data did not hold
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "system", "content": SYSTEM[1]}, {"role": "user", "content": row["text"]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for row in rows
    ]
    return prompts, [row["label"] for row in rows]


def test_a_tiny_llama_learns_to_answer_in_the_format_and_predict_matches_transformers(
    llama: Path, tmp_path: Path
) -> None:
    evaluation = EvaluationSettings(log_every_steps=20, evaluate_before_training=True, generation_samples=12)
    folder, _ = train(llama, chat_rows(120), tmp_path, evaluation=evaluation)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["final"]["eval_perplexity"] < metrics["baseline"]["eval_perplexity"] / 10
    samples = metrics["classes"]["samples"]  # the held-out prompts, answered before and after tuning
    assert len(samples) == 12 and all(s["prompt"].endswith("<|im_start|>assistant\n") for s in samples)
    rouge = rouge_scorer.RougeScorer(["rougeL"])
    for moment, key in (("before", "baseline"), ("after", "final")):
        exact = sum(s[moment].strip() == s["reference"] for s in samples) / 12
        overlap = sum(rouge.score(s["reference"], s[moment])["rougeL"].fmeasure for s in samples) / 12
        assert metrics[key]["eval_exact_match"] == pytest.approx(exact)
        assert metrics[key]["eval_rouge_l"] == pytest.approx(overlap)
    assert metrics["baseline"]["eval_exact_match"] == 0.0 and metrics["final"]["eval_exact_match"] >= 10 / 12
    loaded = load_model(folder)
    prompts, labels = topic_prompts(loaded.processor, 12)
    answers = loaded.answer([loaded.decode(("text", prompt)) for prompt in prompts], top_k=1)
    assert sum(answer["text"].strip() == label for answer, label in zip(answers, labels, strict=True)) >= 10

    untuned = AutoModelForCausalLM.from_pretrained(llama).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()  # the artifact as a user loads it
    for prompt, answer in zip(prompts[:3], answers[:3], strict=True):
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            greedy = plain.generate(**inputs, max_new_tokens=128, do_sample=False)
            before = untuned.generate(**inputs, max_new_tokens=8, do_sample=False)
        written = tokenizer.decode(greedy[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        assert written == answer["text"]
        assert tokenizer.decode(before[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip() not in (
            "sport",
            "finance",
            "weather",
        )
    report = (folder / "report.html").read_text()
    assert report.count("</td></tr>") >= 10 and f"<td>{samples[0]['after']}</td>" in report
    assert f"{metrics['classes']['sequences']} sequences, {metrics['classes']['tokens']} tokens scored" in report
    assert f"Perplexity before tuning {metrics['baseline']['eval_perplexity']:.3f}" in report


def test_lora_keeps_a_tied_output_layer_shared(gpt2: Path, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(gpt2)
    assert head_module_names(model) == []  # lm_head is the input embedding: nothing of its own to train
    rows = [{"prompt": row["text"] + " ->", "completion": " " + row["label"]} for row in keyword_rows(60)]
    lora = AdaptationSettings(AdaptationMethod.LORA, lora=LoraSettings(rank=4, alpha=8.0, dropout=0.0))
    folder, _ = train(gpt2, rows, tmp_path, adaptation=lora)
    config = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert not config.get("modules_to_save") and set(config["target_modules"]) == {"c_attn"}
    tuned = AutoModelForCausalLM.from_pretrained(folder)
    assert tuned.lm_head.weight.data_ptr() == tuned.transformer.wte.weight.data_ptr()
    assert torch.equal(tuned.transformer.wte.weight, model.transformer.wte.weight)  # LoRA left the embeddings
    assert not torch.equal(tuned.transformer.h[0].attn.c_attn.weight, model.transformer.h[0].attn.c_attn.weight)


def test_torchscript_is_refused_with_a_reason_and_onnx_is_checked(gpt2: Path, tmp_path: Path) -> None:
    rows = [{"text": row["text"]} for row in keyword_rows(20)]
    hyperparameters = dataclasses.replace(FAST, epochs=1)
    folder, _ = train(gpt2, rows, tmp_path, hyperparameters=hyperparameters)
    with pytest.raises(ExportFailed) as refused:
        export_model(folder, ExportFormat.TORCHSCRIPT)
    assert refused.value.reason == "EXPORT_UNSUPPORTED" and "cannot generate" in refused.value.message
    made = export_model(folder, ExportFormat.ONNX)
    assert made.check is not None and made.check.passed
    assert made.check.input_shapes["input_ids"][0] == 3


def token_losses(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each position's loss on the next token (0 where the label is ignored), and the labels it was scored on."""
    inputs = {name: value for name, value in batch.items() if name != "labels"}
    logits = model(**inputs, use_cache=False).logits[:, :-1]  # as training runs it (prepare() turns the cache off)
    targets = batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORED, reduction="none"
    )
    return losses.view(targets.shape), targets


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_packed_rows_give_each_example_its_own_loss_and_gradient(name: str, request: pytest.FixtureRequest) -> None:
    folder: Path = request.getfixturevalue(name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()  # no dropout: the two runs are comparable
    rows = keyword_rows(7, seed=2)
    items = [
        encode(
            Plain(1, (Segment(" ".join([row["text"]] * (1 + i % 3)), False), Segment(" " + row["label"], True))),
            tokenizer,
            256,
            False,
        )
        for i, row in enumerate(rows)
    ]
    examples = [item for item in items if item is not None]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    packed = packed_collate(pad, 48)(examples)
    assert packed["input_ids"].shape[0] < len(examples) and packed["input_ids"].shape[1] <= 48
    assert sequences_in(packed) == len(examples)

    model.zero_grad()
    losses, targets = token_losses(model, packed)
    losses.sum().backward()
    packed_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    segments = (packed["position_ids"] == 0).cumsum(-1)  # which example (or padding) each token is part of
    per_example_packed: dict[tuple[int, ...], float] = {}
    for row in range(packed["input_ids"].shape[0]):
        for segment in segments[row].unique().tolist():
            scored = segments[row, 1:] == segment  # the positions whose next token is in this segment
            if (targets[row][scored] != IGNORED).any():
                ids = packed["input_ids"][row][segments[row] == segment].tolist()
                per_example_packed[tuple(ids)] = float(losses[row][scored].sum())

    model.zero_grad()
    per_example_alone: dict[tuple[int, ...], float] = {}
    for example in examples:
        alone_losses, _ = token_losses(model, collate(pad)([example]))
        alone_losses.sum().backward()
        per_example_alone[tuple(example["input_ids"])] = float(alone_losses.sum())
    alone_grads = [p.grad for p in model.parameters() if p.grad is not None]

    assert per_example_packed.keys() == per_example_alone.keys()
    for ids, loss in per_example_alone.items():
        assert per_example_packed[ids] == pytest.approx(loss, rel=1e-5, abs=1e-5)
    for with_packing, alone in zip(packed_grads, alone_grads, strict=True):
        assert torch.allclose(with_packing, alone, rtol=1e-4, atol=1e-6)


def test_a_packed_job_trains(gpt2: Path, tmp_path: Path) -> None:
    rows = [{"prompt": row["text"] + " ->", "completion": " " + row["label"]} for row in keyword_rows(40)]
    hyperparameters = dataclasses.replace(FAST, epochs=2)
    data = DataSettings(training_file="files/train", validation_fraction=0.2, packing=True, max_sequence_length=64)
    folder, _ = train(gpt2, rows, tmp_path, hyperparameters=hyperparameters, data=data)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["classes"]["sequences"] == 8  # the held-out fifth, counted as examples, not packed rows
    # Trained without a key-value cache: with one, transformers ignores packed positions and examples see each other.
    assert json.loads((folder / "config.json").read_text())["use_cache"] is False


def test_gradient_checkpointing_trains_the_same_model(gpt2: Path, tmp_path: Path) -> None:
    rows = [{"prompt": row["text"] + " ->", "completion": " " + row["label"]} for row in keyword_rows(24)]
    runs = {}
    for checkpointing in (False, True):
        hyperparameters = dataclasses.replace(FAST, epochs=2, gradient_checkpointing=checkpointing)
        (tmp_path / str(checkpointing)).mkdir()
        folder, lines = train(gpt2, rows, tmp_path / str(checkpointing), hyperparameters=hyperparameters)
        runs[checkpointing] = AutoModelForCausalLM.from_pretrained(folder).state_dict()
        said = "gradient checkpointing: each block's activations are recomputed in the backward pass" in lines
        assert said is checkpointing
    plain, recomputed = runs[False], runs[True]
    assert plain.keys() == recomputed.keys()
    for name, weight in plain.items():  # dropout included: the recomputation draws the same masks
        assert torch.allclose(weight, recomputed[name], rtol=1e-5, atol=1e-6), name


def test_gradient_checkpointing_turns_on_in_the_model_or_fails_with_a_reason(gpt2: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(gpt2)
    checkpoint_activations(model)
    assert model.is_gradient_checkpointing and model.config.use_cache is False
    with pytest.raises(JobFailure) as refused:
        checkpoint_activations(torch.nn.Linear(2, 2))
    assert refused.value.reason == "INVALID_SPEC" and "does not support gradient checkpointing" in str(refused.value)


@pytest.mark.parametrize(
    ("name", "packing", "lora"), [("gpt2", False, False), ("llama", True, False), ("llama", False, True)]
)
def test_the_chunked_loss_equals_transformers_loss_and_gradients(
    name: str, packing: bool, lora: bool, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several chunks of a few tokens each: the loss and every gradient match the full-logits loss."""
    folder: Path = request.getfixturevalue(name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model: Any = AutoModelForCausalLM.from_pretrained(folder).eval()
    model.config.use_cache = False
    if lora:
        model = apply_lora(model, LoraSettings(rank=4, alpha=8)).eval()  # no adapter dropout either
    assert projects_in_chunks(model)
    items = [
        encode(Plain(1, (Segment(row["text"] + " ->", False), Segment(" " + row["label"], True))), tokenizer, 64, False)
        for row in keyword_rows(6, seed=3)
    ]
    examples = [item for item in items if item is not None]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = packed_collate(pad, 64)(examples) if packing else collate(pad)(examples)
    trained = [p for p in model.parameters() if p.requires_grad]

    model.zero_grad()
    expected = model(**batch).loss
    expected.backward()
    expected_grads = [p.grad.clone() for p in trained]
    model.zero_grad()
    monkeypatch.setattr(token_loss, "CHUNK_ELEMENTS", 3 * model.get_output_embeddings().out_features)  # 16-token chunks
    chunked = causal_lm_loss(model, batch)
    chunked.backward()

    assert chunked.item() == pytest.approx(expected.item(), rel=1e-5)
    assert int((batch["labels"][:, 1:] != IGNORED).sum()) > 16  # more than one chunk
    for want, got in zip(expected_grads, [p.grad for p in trained], strict=True):
        assert torch.allclose(want, got, rtol=1e-4, atol=1e-6)


def test_a_model_whose_logits_are_not_its_heads_projection_keeps_its_own_forward(gpt2: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(gpt2)
    assert projects_in_chunks(model)
    model.config.final_logit_softcapping = 30.0  # as Gemma 2 has
    assert not projects_in_chunks(model)
    assert not projects_in_chunks(torch.nn.Linear(2, 2))


def test_a_gguf_base_model_trains_once_loaded_and_its_artifact_is_a_plain_folder(tmp_path: Path) -> None:
    """llama.cpp's format as users hold their models: loaded (dequantised) with the same tokens and logits as the model
    it was written from, kept by a warm worker, and saved as a normal safetensors folder without GGUF's marks."""
    from tuneforge.workers.core import model_cache

    gguf_file = make_tiny_gguf(tmp_path / "models" / "tiny.Q-F32.gguf")
    source = tmp_path / "models" / ".tiny.Q-F32-source"
    rows = [{"prompt": row["text"] + " ->", "completion": " " + row["label"]} for row in keyword_rows(24)]
    model_cache.configure(64 * 2**20)
    try:
        for attempt in ("cold", "warm"):
            (tmp_path / attempt).mkdir()
            folder, lines = train(gguf_file, rows, tmp_path / attempt, hyperparameters=dataclasses.replace(FAST))
            assert any("warm start" in line for line in lines) is (attempt == "warm"), lines
    finally:
        model_cache.configure(0)
        model_cache.CACHE._entries.clear()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and (folder / "model.safetensors").exists()
    tuned = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    original = AutoModelForCausalLM.from_pretrained(source)
    ids = AutoTokenizer.from_pretrained(source)("goal match team ->", return_tensors="pt")
    assert tokenizer("goal match team ->")["input_ids"] == ids["input_ids"][0].tolist()
    assert not torch.equal(tuned(**ids).logits, original(**ids).logits)  # trained from the GGUF's weights ...
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    assert torch.allclose(loaded(**ids).logits, original(**ids).logits, atol=1e-6)  # ... which are the source's


def test_automatic_hyperparameters_choose_for_a_language_model_by_its_tokens(llama: Path, tmp_path: Path) -> None:
    """The micro-batch probe, the learning-rate range test (on the task's own loss) and epochs from the learned
    tokens, each reported with its evidence; the job then trains with them."""
    from tuneforge.workers.messages import AutoChosen
    from tuneforge.workers.spec import AutoSettings

    rows = chat_rows(40)
    auto = AutoSettings(learning_rate=True, micro_batch_size=True, epochs=True, range_test_steps=20)
    hyperparameters = dataclasses.replace(FAST, batch_size=8, auto=auto)
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    spec = make_spec(
        llama,
        task="text_generation",
        data=DataSettings(training_file="files/train", validation_fraction=0.2),
        hyperparameters=hyperparameters,
    )
    finished, events = run(spec, data, tmp_path / "work")
    assert finished.outcome is Outcome.SUCCEEDED, finished.message
    chosen = {event.field: event for event in events if isinstance(event, AutoChosen)}
    assert set(chosen) == {"micro_batch_size", "hyperparameters.epochs", "hyperparameters.learning_rate"}
    epochs = chosen["hyperparameters.epochs"]
    assert "learned tokens in 32 training examples" in epochs.reason and epochs.value == 10
    assert len(chosen["hyperparameters.learning_rate"].evidence) >= 3


def test_a_lora_artifacts_adapter_and_merged_model_write_what_generate_writes(llama: Path, tmp_path: Path) -> None:
    """The merged model loads with AutoModelForCausalLM, `adapter/` loads onto the base model with peft, and both
    write greedily exactly the tokens Generate's loop writes from the loaded artifact."""
    from peft import PeftModel

    from tuneforge.workers.messages import GeneratedPiece, GenerationRequest
    from tuneforge.workers.tasks.text_generation.streaming import stream

    adaptation = AdaptationSettings(method=AdaptationMethod.LORA, lora=LoraSettings(rank=8, alpha=16, dropout=0.0))
    hyperparameters = dataclasses.replace(FAST, epochs=4, learning_rate=1e-2)
    folder, _ = train(llama, chat_rows(40), tmp_path, adaptation=adaptation, hyperparameters=hyperparameters)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts, _ = topic_prompts(tokenizer, 3)
    merged = AutoModelForCausalLM.from_pretrained(folder).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama), folder / "adapter").eval()
    loaded = load_model(folder)
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        width = ids["input_ids"].shape[1]
        written = [
            tokenizer.decode(
                model.generate(**ids, max_new_tokens=12, do_sample=False)[0, width:], skip_special_tokens=True
            )
            for model in (merged, adapted)
        ]
        pieces: list[GeneratedPiece] = []
        request = GenerationRequest(prompt=prompt, max_new_tokens=12)
        stream(loaded.model, loaded.processor, [request], 256, pieces.extend, set)
        assert written[0] == written[1] == "".join(piece.text for piece in pieces), prompt
