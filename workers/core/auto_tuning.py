"""Hyperparameters a job chooses for itself, each with the evidence for it: the micro-batch by probing memory, the
learning rate by a range test on the job's own model and data, the epochs by the size of the data.

Probes and the range test leave the model's weights as they found them, and their choices are kept in the job's
checkpoint folder, so a resumed attempt uses the same values instead of measuring again.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from itertools import cycle, islice
from pathlib import Path

import torch

from tuneforge.workers.core.adaptation import TrainableParameter
from tuneforge.workers.core.checkpoints import write_json_atomically
from tuneforge.workers.core.errors import JobFailure
from tuneforge.workers.core.optimization import build_optimizer
from tuneforge.workers.core.trainer import Trainer
from tuneforge.workers.spec import TrainingSpec

CHOICES_FILE = "auto.json"
SMOOTHING = 0.95
DIVERGENCE = 4.0
"""The range test stops once the smoothed loss exceeds this multiple of its best."""


@dataclass(frozen=True)
class Choice:
    """One automatic choice: the spec field, the value, why, and the measurements behind it."""

    field: str
    value: float
    reason: str
    evidence: list[tuple[float, float]]


def choose_all(trainer: Trainer, parameters: list[TrainableParameter]) -> list[Choice]:
    """Every choice the spec asks for, in an order where each can use the previous ones."""
    auto = trainer.spec.hyperparameters.auto
    choices = []
    if auto.micro_batch_size:
        choices.append(probe_micro_batch(trainer))
    if auto.epochs:
        tokens = trainer.task.learned_tokens
        examples = len(trainer.task.train_set)
        choices.append(choose_epochs(examples) if tokens is None else choose_epochs_by_tokens(tokens, examples))
    if auto.learning_rate:
        micro = int(choices[0].value) if auto.micro_batch_size else trainer.plan.micro_batch_size
        choices.append(range_test(trainer, parameters, micro))
    return choices


def apply_choices(spec: TrainingSpec, choices: list[Choice], has_validation: bool) -> TrainingSpec:
    """The spec with the chosen values written in (the micro-batch goes to the Trainer separately)."""
    hp, evaluation = spec.hyperparameters, spec.evaluation
    for choice in choices:
        if choice.field == "hyperparameters.learning_rate":
            hp = replace(hp, learning_rate=choice.value)
        elif choice.field == "hyperparameters.epochs":
            hp = replace(hp, epochs=int(choice.value))
            if has_validation and not evaluation.early_stopping_patience:
                evaluation = replace(evaluation, early_stopping_patience=3)  # the guard on a generous choice
    return replace(spec, hyperparameters=hp, evaluation=evaluation)


def chosen_micro_batch(choices: list[Choice]) -> int:
    return next((int(c.value) for c in choices if c.field == "micro_batch_size"), 0)


def save_choices(directory: Path, choices: list[Choice]) -> None:
    write_json_atomically(directory / CHOICES_FILE, [asdict(c) for c in choices])


def load_choices(directory: Path) -> list[Choice] | None:
    path = directory / CHOICES_FILE
    if not path.exists():
        return None
    return [
        Choice(c["field"], c["value"], c["reason"], [tuple(p) for p in c["evidence"]])
        for c in json.loads(path.read_text())
    ]


# ---------------------------------------------------------------- the three choices


def probe_micro_batch(trainer: Trainer) -> Choice:
    """The largest power of two up to batch_size whose forward and backward pass fits in memory."""
    batch_size = trainer.hp.batch_size
    sizes = [2**i for i in range(int(math.log2(batch_size)) + 1)]
    evidence: list[tuple[float, float]] = []
    fitting = 0
    for size in sizes:
        fits = _fits(trainer, size)
        evidence.append((float(size), 1.0 if fits else 0.0))
        if not fits:
            break
        fitting = size
    if not fitting:
        raise JobFailure("OUT_OF_MEMORY", "not even a micro-batch of 1 fits in memory; use a smaller model or LoRA")
    accumulation = math.ceil(batch_size / fitting)
    tried = ", ".join(f"{int(s)} {'fits' if ok else 'does not fit'}" for s, ok in evidence)
    reason = (
        f"micro-batches of {fitting} with {accumulation} accumulation steps keep the effective batch at {batch_size} "
        f"({tried})"
    )
    return Choice("micro_batch_size", float(fitting), reason, evidence)


def choose_epochs(num_examples: int) -> Choice:
    """More passes over small data, fewer over large; early stopping guards the choice."""
    epochs = max(3, min(50, round(300 / math.sqrt(max(1, num_examples)))))
    reason = f"{epochs} epochs for {num_examples} training examples (300/sqrt(n), between 3 and 50), early stopping on"
    return Choice("hyperparameters.epochs", float(epochs), reason, [(float(num_examples), float(epochs))])


TOKENS_FOR_ONE_EPOCH = 1_000_000
"""Learned tokens past which one pass is enough for a language model (and where 3 epochs fall, at a ninth of it)."""


def choose_epochs_by_tokens(tokens: int, num_examples: int) -> Choice:
    """For language models the tokens to learn, not the examples, say how much data there is: sqrt(1M / tokens)
    epochs between 1 and 10 (3 at about 110,000 tokens, as instruction tuning recipes use); early stopping on."""
    epochs = max(1, min(10, round(math.sqrt(TOKENS_FOR_ONE_EPOCH / max(1, tokens)))))
    reason = (
        f"{epochs} epochs for {tokens:,} learned tokens in {num_examples} training examples (sqrt(1M/tokens), "
        "between 1 and 10), early stopping on"
    )
    return Choice("hyperparameters.epochs", float(epochs), reason, [(float(tokens), float(epochs))])


def range_test(trainer: Trainer, parameters: list[TrainableParameter], micro_batch_size: int) -> Choice:
    """Trains briefly with the learning rate rising exponentially from the lowest to the highest of the range and
    records the smoothed loss; takes a tenth of the rate at its minimum (where the loss still falls fast)."""
    auto = trainer.spec.hyperparameters.auto
    low, high, steps = auto.range_test_min_learning_rate, auto.range_test_max_learning_rate, auto.range_test_steps
    model = trainer.model
    saved = {name: value.detach().to("cpu", copy=True) for name, value in model.state_dict().items()}
    optimizer = build_optimizer(parameters, replace(trainer.hp, learning_rate=1.0), trainer.device)
    relative = [group["lr"] for group in optimizer.param_groups]
    loader = trainer.loader(trainer.task.train_set, True, micro_batch_size, trainer.hp.seed)
    accumulation = max(1, math.ceil(trainer.hp.batch_size / micro_batch_size))
    batches = cycle(loader)
    evidence: list[tuple[float, float]] = []
    average, best = 0.0, math.inf
    model.train()
    try:
        for step in range(steps):
            rate = low * (high / low) ** (step / (steps - 1))
            for group, scale in zip(optimizer.param_groups, relative, strict=True):
                group["lr"] = rate * scale
            loss_value = 0.0
            for batch in islice(batches, accumulation):
                loss = trainer.loss_on(batch) / accumulation
                loss.backward()  # type: ignore[no-untyped-call]
                loss_value += float(loss.detach())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            average = SMOOTHING * average + (1 - SMOOTHING) * loss_value
            smoothed = average / (1 - SMOOTHING ** (step + 1))
            if not math.isfinite(smoothed) or smoothed > DIVERGENCE * best:
                break
            best = min(best, smoothed)
            evidence.append((rate, smoothed))
    finally:
        model.load_state_dict(saved)
        optimizer.zero_grad(set_to_none=True)
    if len(evidence) < 3:
        raise JobFailure(
            "RANGE_TEST_FAILED", f"the loss diverged at once from {low:g}; lower range_test_min_learning_rate"
        )
    at_minimum = min(evidence, key=lambda point: point[1])[0]
    chosen = max(low, at_minimum / 10)
    reason = (
        f"learning rate {chosen:.3g}: a tenth of {at_minimum:.3g}, where the smoothed loss was lowest in a "
        f"{len(evidence)}-step range test from {low:g} to {high:g}"
    )
    return Choice("hyperparameters.learning_rate", chosen, reason, evidence)


def _fits(trainer: Trainer, size: int) -> bool:
    """One forward and backward pass at this micro-batch size (no update); False on out-of-memory."""
    batch = next(iter(trainer.loader(trainer.task.train_set, True, size, trainer.hp.seed)))
    try:
        trainer.loss_on(batch).backward()  # type: ignore[no-untyped-call]
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        trainer.model.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
