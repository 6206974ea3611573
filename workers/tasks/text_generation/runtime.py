"""Text generation's torch side: chat, prompt/completion or plain text -> token ids with a label mask (the loss covers
what the model should learn to write) -> AutoModelForCausalLM. Conversations are rendered by the model's own chat
template (DEFAULT_CHAT_TEMPLATE when it has none, saved with the artifact); Predict continues a text greedily."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import jinja2
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneforge.workers.core.errors import InvalidDataset, JobFailure
from tuneforge.workers.core.evaluation import Evaluation
from tuneforge.workers.core.models import load_pretrained, sequence_limit
from tuneforge.workers.core.prepared_task import Batch, PreparedTask
from tuneforge.workers.core.splits import training_split
from tuneforge.workers.messages import GeneratedPiece, GenerationRequest, RunJob
from tuneforge.workers.tasks.text_generation.data import Conversation, Example, Plain, read_examples
from tuneforge.workers.tasks.text_generation.samples import Sample, answer, draw_samples, left_padded, scorer, shown
from tuneforge.workers.tasks.text_generation.streaming import stream
from tuneforge.workers.tasks.text_generation.token_loss import IGNORED, causal_lm_loss, scored_tokens

T = TypeVar("T")
U = TypeVar("U")

if TYPE_CHECKING:
    from tuneforge.workers.core.prediction import LoadedModel

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
"""The chat template of a base model that has none: each turn opens with `<|role|>` and a new line, and an assistant
turn ends with the end-of-sequence token, so that a tuned model learns to stop."""
SHOWN_SAMPLES = 10
"""Held-out answers the report shows (metrics.json keeps every one)."""
SAMPLE_WORDS = ("once", "upon", "a", "time", "the", "model", "wrote", "text")
SECTION = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string(
    """<h2 id="generation">Language modelling</h2>
<p id="scored">Validation: {{ sequences }} sequences, {{ tokens }} tokens scored (the tokens the model learns to
write).{% if before is not none %} Perplexity before tuning {{ "%.3f"|format(before) }}{% endif %}{% if after is not
none %}, after {{ "%.3f"|format(after) }}{% endif %}.</p>
{% if samples %}<h2 id="samples">Held-out prompts, answered before and after tuning</h2>
<table id="generation-samples"><tr><th>prompt</th><th>reference</th><th>before</th><th>after</th></tr>
{% for sample in samples %}<tr><td>{{ sample.prompt }}</td><td>{{ sample.reference }}</td><td>{{ sample.before }}</td>
<td>{{ sample.after }}</td></tr>
{% endfor %}</table>{% endif %}"""
)


def trained_spans(example: Example, tokenizer: Any) -> tuple[str, list[tuple[int, int]], bool]:
    """The example's text, the character spans the model learns to write, and whether the tokenizer's own special
    tokens (BOS) must be added (a chat template writes its own)."""
    if isinstance(example, Plain):
        text, spans = "", []
        for segment in example.segments:
            start = len(text)
            text += segment.text
            if segment.trained:
                spans.append((start, len(text)))
        if tokenizer.eos_token:
            text += tokenizer.eos_token  # the model learns to stop after a completion
            spans[-1] = (spans[-1][0], len(text))
        return text, spans, True
    return _chat_spans(example, tokenizer)


def _chat_spans(conversation: Conversation, tokenizer: Any) -> tuple[str, list[tuple[int, int]], bool]:
    """Renders the conversation, and each trained assistant turn as the text between the conversation up to it
    (with the template's generation prompt) and the conversation through it."""
    messages = [{"role": role, "content": content} for role, content, _ in conversation.turns]

    def render(upto: int, prompt: bool) -> str:
        rendered: str = tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=prompt)
        return rendered

    try:
        full = render(len(messages), False)
        spans = []
        for index, (_, _, trained) in enumerate(conversation.turns):
            if trained:
                before, through = render(index, True), render(index + 1, False)
                if not (full.startswith(through) and through.startswith(before)):
                    raise InvalidDataset(
                        f"line {conversation.line}: the model's chat template does not render this conversation turn "
                        "by turn (a later turn changes earlier text), so the assistant turns cannot be found; set "
                        "data.train_on_all_tokens or use another base model"
                    )
                spans.append((len(before), len(through)))
    except jinja2.TemplateError as exc:
        raise InvalidDataset(f"line {conversation.line}: the model's chat template refused it: {exc}") from exc
    return full, spans, False


def encode(example: Example, tokenizer: Any, max_length: int, all_tokens: bool) -> dict[str, list[int]] | None:
    """Token ids and labels (IGNORED where the loss skips), cut to max_length; None when nothing trained is left."""
    text, spans, special = trained_spans(example, tokenizer)
    encoded = tokenizer(
        text, add_special_tokens=special, return_offsets_mapping=True, truncation=True, max_length=max_length
    )
    ids: list[int] = list(encoded["input_ids"])
    if all_tokens:
        labels = list(ids)
    else:
        # A token is learned when it overlaps a trained span: one that straddles the boundary (a prompt's last space
        # merged into the completion's first word) is learned whole, as the text tokenises at inference.
        offsets = encoded["offset_mapping"]
        labels = [
            i if any(s < b and e > a for a, b in spans) else IGNORED for i, (s, e) in zip(ids, offsets, strict=True)
        ]
    if all(label == IGNORED for label in labels[1:]):  # the first label is never predicted
        return None
    return {"input_ids": ids, "labels": labels}


def encode_all(
    items: Sequence[T], encode_one: Callable[[T], U | None], name: str, why: str, log: Callable[[str], None]
) -> list[U]:
    """Every item encoded, those that encode to nothing (`why`) left out and counted in the log; InvalidDataset,
    prefixed with the file's name, when an item is bad or none is left."""
    encoded = []
    for item in items:
        try:
            result = encode_one(item)
        except InvalidDataset as exc:
            raise InvalidDataset(f"{name} {exc}") from exc
        if result is not None:
            encoded.append(result)
    if items and not encoded:
        raise InvalidDataset(f"{name}: no example is left: {why}")
    if len(encoded) < len(items):
        log(f"{len(items) - len(encoded)} {name} examples left out: {why}")
    return encoded


def collate(pad_id: int) -> Callable[[list[dict[str, list[int]]]], Batch]:
    """Pads on the right: ids with the pad token, attention mask 0, labels IGNORED."""

    def pad(items: list[dict[str, list[int]]]) -> Batch:
        longest = max(len(item["input_ids"]) for item in items)
        ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), longest), dtype=torch.long)
        labels = torch.full((len(items), longest), IGNORED, dtype=torch.long)
        for row, item in enumerate(items):
            length = len(item["input_ids"])
            ids[row, :length] = torch.tensor(item["input_ids"])
            labels[row, :length] = torch.tensor(item["labels"])
            mask[row, :length] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return pad


def packed_collate(pad_id: int, capacity: int) -> Callable[[list[dict[str, list[int]]]], Batch]:
    """Packs a batch's examples into as few rows of at most `capacity` tokens as first-fit (longest first) allows.
    Positions restart at each example and there is no attention mask, so transformers' masking keeps each example to
    itself (a block-diagonal causal mask); an example's first token is never predicted from the previous example, and
    a row's padding is a segment of its own that nothing learns."""

    def pack(items: list[dict[str, list[int]]]) -> Batch:
        rows: list[list[dict[str, list[int]]]] = []
        filled: list[int] = []
        for item in sorted(items, key=lambda i: -len(i["input_ids"])):
            size = len(item["input_ids"])
            row = next((r for r, used in enumerate(filled) if used + size <= capacity), None)
            if row is None:
                rows.append([])
                filled.append(0)
                row = len(rows) - 1
            rows[row].append(item)
            filled[row] += size
        longest = max(filled)
        ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORED, dtype=torch.long)
        positions = torch.zeros((len(rows), longest), dtype=torch.long)
        for r, row_items in enumerate(rows):
            at = 0
            for item in row_items:
                size = len(item["input_ids"])
                ids[r, at : at + size] = torch.tensor(item["input_ids"])
                labels[r, at + 1 : at + size] = torch.tensor(item["labels"][1:])
                positions[r, at : at + size] = torch.arange(size)
                at += size
            positions[r, at:] = torch.arange(longest - at)
        return {"input_ids": ids, "position_ids": positions, "labels": labels}

    return pack


def sequences_in(batch: Batch) -> int:
    """The examples a batch holds: its rows, or in a packed batch the segments with a token to learn."""
    labels = batch["labels"]
    if "position_ids" not in batch:
        return int(labels.shape[0])
    count = 0
    for positions, row_labels in zip(batch["position_ids"], labels, strict=True):
        segment = (positions == 0).cumsum(0)
        count += len(set(segment[row_labels != IGNORED].tolist()))
    return count


def evaluate_with_samples(
    tokenizer: Any, samples: list[Sample], before: list[str], max_length: int
) -> Callable[..., Evaluation]:
    """evaluate_lm, then the held-out prompts answered and scored (the untuned answers beside the tuned ones)."""
    score = scorer()

    def run(model: nn.Module, loader: DataLoader[Any], to_device: Callable[[Batch], Batch]) -> Evaluation:
        evaluation = evaluate_lm(model, loader, to_device)
        after = answer(model, tokenizer, [sample.prompt for sample in samples], max_length)
        metrics = {**evaluation.metrics, **score(after, [sample.reference for sample in samples])}
        return Evaluation(metrics, {**evaluation.details, "samples": shown(samples, before, after)})

    return run


def evaluate_lm(model: nn.Module, loader: DataLoader[Any], to_device: Callable[[Batch], Batch]) -> Evaluation:
    """Loss per scored token over the whole validation set (not a mean of batch means), and its perplexity."""
    model.eval()
    total, tokens, sequences = 0.0, 0, 0
    with torch.inference_mode():
        for batch in loader:
            batch = to_device(batch)
            losses = scored_tokens(model, batch).losses
            total += float(losses.sum())
            tokens, sequences = tokens + losses.numel(), sequences + sequences_in(batch)
    model.train()
    loss = total / max(1, tokens)
    metrics = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}
    return Evaluation(metrics, {"sequences": sequences, "tokens": tokens})


class TextGenerationRuntime:
    """Supervised fine-tuning of any transformers causal language model (GPT-2, Llama, Qwen, SmolLM ...)."""

    model_class = "AutoModelForCausalLM"
    processor_class = "AutoTokenizer"
    export_tolerance = 1e-4
    export_refusals: Mapping[str, str] = {
        "torchscript": "a traced TorchScript model takes one fixed input length and keeps no cache between tokens, "
        "so it cannot generate; export ONNX (the logits of every position) or use the Hugging Face folder"
    }

    def prepare(self, job: RunJob, log: Callable[[str], None]) -> PreparedTask:
        spec = job.spec
        found, train = read_examples(job.training_data)
        validation: list[Example] = []
        if job.validation_data is not None:
            validation = read_examples(job.validation_data)[1]
        elif spec.data.validation_fraction > 0:
            train, validation = training_split(
                train, None, lambda _: "", spec.data.validation_fraction, 0, spec.hyperparameters.seed
            )
        tokenizer = load_pretrained(AutoTokenizer, spec.base_model)
        if not getattr(tokenizer, "is_fast", False):
            raise JobFailure("UNSUPPORTED_MODEL", f"{spec.base_model} has no fast tokenizer, which labels need")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if tokenizer.chat_template is None:
            tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        model = load_pretrained(AutoModelForCausalLM, spec.base_model, use_safetensors=True)
        model.config.pad_token_id = tokenizer.pad_token_id
        # Training never reuses keys and values: no cache is built, and without one transformers honours packed
        # positions (a block-diagonal mask). Generation asks for its cache itself.
        model.config.use_cache = False
        max_length = sequence_limit(spec.data.max_sequence_length, tokenizer, model)
        everything = spec.data.train_on_all_tokens
        train_set = self._encode(train, tokenizer, max_length, everything, job.training_data.filename, log)
        validation_set = self._encode(validation, tokenizer, max_length, everything, "validation", log)
        scored = sum(sum(label != IGNORED for label in item["labels"]) for item in train_set)
        pad = int(tokenizer.pad_token_id)
        evaluate: Callable[..., Evaluation] = evaluate_lm
        if spec.evaluation.generation_samples and validation:
            samples = draw_samples(validation, tokenizer, spec.evaluation.generation_samples)
            before = answer(model, tokenizer, [sample.prompt for sample in samples], max_length)  # the untuned model
            evaluate = evaluate_with_samples(tokenizer, samples, before, max_length)
            log(f"{len(samples)} held-out prompts are answered and scored at each evaluation")
        log(
            f"read {len(train_set)} training and {len(validation_set)} validation examples ({found}); "
            f"{scored:,} training tokens are learned, sequences cut to {max_length} tokens"
            + (f", examples packed into sequences of {max_length}" if spec.data.packing else "")
        )
        return PreparedTask(
            model=model,
            processor=tokenizer,
            train_set=train_set,
            validation_set=validation_set,
            collate=packed_collate(pad, max_length) if spec.data.packing else collate(pad),
            labels=[],
            train_labels=[],
            compute_loss=causal_lm_loss,
            evaluate=evaluate,
            lengths=[len(item["input_ids"]) for item in train_set],
            learned_tokens=scored,
        )

    @staticmethod
    def _encode(
        examples: list[Example],
        tokenizer: Any,
        max_length: int,
        everything: bool,
        name: str,
        log: Callable[[str], None],
    ) -> list[dict[str, list[int]]]:
        return encode_all(
            examples,
            lambda example: encode(example, tokenizer, max_length, everything),
            name,
            f"nothing to learn within {max_length} tokens",
            log,
        )

    def decode(self, loaded: LoadedModel, value: str | bytes) -> Any:
        return str(value)

    def batch(self, loaded: LoadedModel, decoded: list[Any]) -> Batch:
        return left_padded(loaded.processor, decoded, self._limit(loaded))

    def answer(self, loaded: LoadedModel, decoded: list[Any], top_k: int) -> list[dict[str, Any]]:
        """Greedy continuations of the whole batch at once, as evaluation writes them."""
        written = answer(loaded.model, loaded.processor, decoded, self._limit(loaded), batch=len(decoded))
        return [{"text": text} for text in written]

    def generate(
        self,
        loaded: LoadedModel,
        requests: list[GenerationRequest],
        emit: Callable[[list[GeneratedPiece]], None],
        gone: Callable[[], set[int]],
    ) -> int:
        """Generate's answers, streamed a step at a time (streaming.stream); prompts cut on the left as Predict's."""
        return stream(loaded.model, loaded.processor, requests, self._limit(loaded), emit, gone)

    @staticmethod
    def _limit(loaded: LoadedModel) -> int:
        """The prompt length training allowed."""
        return sequence_limit(int(loaded.data.get("max_sequence_length") or 0), loaded.processor, loaded.model)

    def sample_input(self, rng: np.random.Generator, index: int) -> tuple[str, bytes | str]:
        return "text", " ".join(rng.choice(SAMPLE_WORDS, size=3 + 4 * index))

    def fixed_shape_inputs(self, loaded: LoadedModel, items: list[tuple[str, Any]]) -> Batch:
        """Only a traced export needs one shape, and TorchScript is refused for this task (export_refusals)."""
        return loaded.inputs(items)

    def report_sections(self, metrics: dict[str, Any]) -> list[str]:
        details = metrics.get("classes") or {}
        tuned = metrics.get("best") or metrics.get("final") or {}
        return [
            SECTION.render(
                sequences=details.get("sequences", 0),
                tokens=details.get("tokens", 0),
                before=(metrics.get("baseline") or {}).get("eval_perplexity"),
                after=tuned.get("eval_perplexity"),
                samples=details.get("samples", [])[:SHOWN_SAMPLES],
            )
        ]


RUNTIME = TextGenerationRuntime()
