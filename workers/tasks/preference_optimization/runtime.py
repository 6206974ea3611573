"""Preference optimisation's torch side: DPO with the sigmoid loss (Rafailov et al. 2023), label smoothing as
conservative DPO. Each pair becomes the prompt's tokens followed by the chosen answer and by the rejected one
(tokenised as TRL's DPOTrainer does, so the two agree on a batch to 1e-4: tests/core/test_preference.py); an
answer's log-probability is the sum over its tokens, computed with the chunked projection of token_loss. The
reference is the starting model: with LoRA the same weights with the adapters switched off, otherwise a frozen copy
taken before training. A tuned model generates like a text generation model (Predict, Generate, export)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import jinja2
import torch
from torch import nn
from torch.nn import functional
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneforge.workers.core.errors import InvalidDataset, JobFailure
from tuneforge.workers.core.evaluation import Evaluation
from tuneforge.workers.core.lora import is_lora
from tuneforge.workers.core.models import load_pretrained, sequence_limit
from tuneforge.workers.core.prepared_task import Batch, PreparedTask
from tuneforge.workers.core.splits import training_split
from tuneforge.workers.messages import RunJob
from tuneforge.workers.tasks.preference_optimization.data import Preference, read_preferences
from tuneforge.workers.tasks.text_generation.runtime import DEFAULT_CHAT_TEMPLATE, TextGenerationRuntime, encode_all
from tuneforge.workers.tasks.text_generation.token_loss import IGNORED, scored_tokens

Pair = dict[str, Any]
"""An encoded pair: `prompt` ids, `chosen` and `rejected` answer ids."""
SECTION = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string(
    """<h2 id="preferences">Preferences</h2>
<p id="rewards">Validation: {{ pairs }} pairs. The tuned model prefers the chosen answer over the rejected one more
than the reference does in {{ "%.1f"|format(100 * accuracy) }}% of them; mean reward of the chosen answers
{{ "%.3f"|format(chosen) }}, of the rejected {{ "%.3f"|format(rejected) }}, margin {{ "%.3f"|format(margin) }}
(a reward is beta times the answer's log-probability gain over the reference).</p>"""
)


def _common_prefix(first: list[int], second: list[int]) -> int:
    length = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        length += 1
    return length


def encode_pair(pair: Preference, tokenizer: Any, max_length: int) -> Pair | None:
    """The prompt's ids and each answer's, the answer starting where prompt and prompt+answer tokenise apart; cut
    to max_length from the end (the prompt kept whole). None when the prompt alone fills max_length."""
    if not isinstance(pair.prompt, str):
        messages = [{"role": role, "content": content} for role, content in pair.prompt]

        def ids(answer: str | None) -> list[int]:
            turns = messages + ([{"role": "assistant", "content": answer}] if answer is not None else [])
            text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=answer is None)
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])

        prompt, chosen, rejected = ids(None), ids(pair.chosen), ids(pair.rejected)
    else:
        text = pair.prompt
        eos = tokenizer.eos_token or ""

        def plain(answer: str) -> list[int]:
            return list(tokenizer(text + answer + ("" if answer.endswith(eos) else eos))["input_ids"])

        prompt, chosen, rejected = list(tokenizer(text)["input_ids"]), plain(pair.chosen), plain(pair.rejected)
    length = min(_common_prefix(prompt, chosen), _common_prefix(prompt, rejected))
    if length >= max_length:
        return None
    room = max_length - length
    return {"prompt": prompt[:length], "chosen": chosen[length:][:room], "rejected": rejected[length:][:room]}


def collate(pad_id: int) -> Callable[[list[Pair]], Batch]:
    """The chosen sequences, then the rejected ones, padded on the right; labels only on the answers."""

    def pad(pairs: list[Pair]) -> Batch:
        rows = [(p["prompt"], p["chosen"]) for p in pairs] + [(p["prompt"], p["rejected"]) for p in pairs]
        longest = max(len(prompt) + len(answer) for prompt, answer in rows)
        ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORED, dtype=torch.long)
        for row, (prompt, answer) in enumerate(rows):
            size = len(prompt) + len(answer)
            ids[row, :size] = torch.tensor(prompt + answer)
            mask[row, :size] = 1
            labels[row, len(prompt) : size] = torch.tensor(answer)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return pad


def answer_logps(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Each row's answer log-probability: the sum of its tokens' (the prompt and padding score nothing)."""
    scored = scored_tokens(model, batch)
    totals = torch.zeros(batch["labels"].shape[0], device=scored.losses.device, dtype=scored.losses.dtype)
    return -totals.index_add(0, scored.rows, scored.losses)


def dpo_losses(
    policy: torch.Tensor, reference: torch.Tensor, beta: float, smoothing: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the chosen and rejected rewards, from the rows' log-probabilities (chosen rows first):
    -(1 - e) log sigmoid(beta * margin) - e log sigmoid(-beta * margin), margin the chosen answer's log-ratio to the
    reference minus the rejected one's."""
    chosen, rejected = (policy - reference).chunk(2)
    margin = chosen - rejected
    losses = -(1 - smoothing) * functional.logsigmoid(beta * margin) - smoothing * functional.logsigmoid(-beta * margin)
    return losses, beta * chosen.detach(), beta * rejected.detach()


class Reference:
    """The starting model's log-probabilities: the LoRA-wrapped model with its adapters off, or a frozen copy."""

    def __init__(self, model: nn.Module, lora: bool):
        self._copy = None if lora else copy.deepcopy(model).eval().requires_grad_(False)

    def logps(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        with torch.no_grad(), self._adapters_off(model):
            if self._copy is None:
                return answer_logps(model, batch)
            device = batch["input_ids"].device
            if next(self._copy.parameters()).device != device:
                self._copy.to(device)
            return answer_logps(self._copy, batch)

    def _adapters_off(self, model: nn.Module) -> AbstractContextManager[Any]:
        if self._copy is not None:
            return nullcontext()
        inner: Any = getattr(model, "module", model)  # under data parallelism, the wrapped model
        inner = getattr(inner, "_orig_mod", inner)  # compiled: the original
        if not is_lora(inner):
            raise JobFailure("INTERNAL", "a LoRA preference job's model has no adapters to switch off")
        context: AbstractContextManager[Any] = inner.disable_adapter()
        return context


def dpo_loss(reference: Reference, beta: float, smoothing: float) -> Callable[[nn.Module, Batch], torch.Tensor]:
    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        losses, _, _ = dpo_losses(answer_logps(model, batch), reference.logps(model, batch), beta, smoothing)
        return losses.mean()

    return loss


def evaluate_preferences(reference: Reference, beta: float, smoothing: float) -> Callable[..., Evaluation]:
    """Mean DPO loss over the validation pairs, the share the tuned model ranks as the data does (relative to the
    reference), and the mean rewards."""

    def evaluate(model: nn.Module, loader: DataLoader[Any], to_device: Callable[[Batch], Batch]) -> Evaluation:
        model.eval()
        losses, chosen, rejected = [], [], []
        with torch.inference_mode():
            for batch in loader:
                batch = to_device(batch)
                pair_losses, chosen_rewards, rejected_rewards = dpo_losses(
                    answer_logps(model, batch), reference.logps(model, batch), beta, smoothing
                )
                losses.append(pair_losses.float().cpu())
                chosen.append(chosen_rewards.float().cpu())
                rejected.append(rejected_rewards.float().cpu())
        model.train()
        loss, good, bad = torch.cat(losses), torch.cat(chosen), torch.cat(rejected)
        metrics = {
            "eval_loss": float(loss.mean()),
            "eval_reward_accuracy": float((good > bad).float().mean()),
            "eval_reward_margin": float((good - bad).mean()),
            "eval_chosen_reward": float(good.mean()),
            "eval_rejected_reward": float(bad.mean()),
        }
        return Evaluation(metrics, {"pairs": len(loss)})

    return evaluate


def without_dropout(model: nn.Module) -> None:
    """DPO compares the model with its reference on the same tokens: dropout would make the two differ by noise (TRL
    turns it off too)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


class PreferenceRuntime(TextGenerationRuntime):
    """DPO on any transformers causal language model; generation, export and Predict as text generation."""

    def prepare(self, job: RunJob, log: Callable[[str], None]) -> PreparedTask:
        spec = job.spec
        train = read_preferences(job.training_data)
        validation: list[Preference] = []
        if job.validation_data is not None:
            validation = read_preferences(job.validation_data)
        elif spec.data.validation_fraction > 0:
            train, validation = training_split(
                train, None, lambda _: "", spec.data.validation_fraction, 0, spec.hyperparameters.seed
            )
        tokenizer = load_pretrained(AutoTokenizer, spec.base_model)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if tokenizer.chat_template is None:
            tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        model = load_pretrained(AutoModelForCausalLM, spec.base_model, use_safetensors=True)
        model.config.pad_token_id = tokenizer.pad_token_id
        model.config.use_cache = False
        without_dropout(model)
        max_length = sequence_limit(spec.data.max_sequence_length, tokenizer, model)
        train_set = self._encode_pairs(train, tokenizer, max_length, job.training_data.filename, log)
        validation_set = self._encode_pairs(validation, tokenizer, max_length, "validation", log)
        hp = spec.hyperparameters
        reference = Reference(model, lora=spec.adaptation.method.value == "lora")
        log(
            f"read {len(train_set)} training and {len(validation_set)} validation preference pairs; DPO with beta "
            f"{hp.preference_beta:g}, label smoothing {hp.label_smoothing:g}; the reference is the starting model "
            + ("with its adapters off" if spec.adaptation.method.value == "lora" else "(a frozen copy)")
        )
        return PreparedTask(
            model=model,
            processor=tokenizer,
            train_set=train_set,
            validation_set=validation_set,
            collate=collate(int(tokenizer.pad_token_id)),
            labels=[],
            train_labels=[],
            compute_loss=dpo_loss(reference, hp.preference_beta, hp.label_smoothing),
            evaluate=evaluate_preferences(reference, hp.preference_beta, hp.label_smoothing),
            lengths=[len(p["prompt"]) * 2 + len(p["chosen"]) + len(p["rejected"]) for p in train_set],
            learned_tokens=sum(len(p["chosen"]) + len(p["rejected"]) for p in train_set),
        )

    @staticmethod
    def _encode_pairs(
        pairs: list[Preference], tokenizer: Any, max_length: int, name: str, log: Callable[[str], None]
    ) -> list[Pair]:
        def encode_one(pair: Preference) -> Pair | None:
            try:
                return encode_pair(pair, tokenizer, max_length)
            except jinja2.TemplateError as exc:
                raise InvalidDataset(f"line {pair.line}: the model's chat template refused it: {exc}") from exc

        return encode_all(pairs, encode_one, name, f"the prompt alone fills {max_length} tokens", log)

    def report_sections(self, metrics: dict[str, Any]) -> list[str]:
        tuned = metrics.get("best") or metrics.get("final") or {}
        if "eval_reward_accuracy" not in tuned:
            return []
        return [
            SECTION.render(
                pairs=(metrics.get("classes") or {}).get("pairs", 0),
                accuracy=tuned["eval_reward_accuracy"],
                chosen=tuned["eval_chosen_reward"],
                rejected=tuned["eval_rejected_reward"],
                margin=tuned["eval_reward_margin"],
            )
        ]


RUNTIME = PreferenceRuntime()
