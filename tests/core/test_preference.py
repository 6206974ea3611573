"""Preference optimisation (DPO) in the core: the three layouts read into the same pairs with bad lines named, the
loss on a fixed batch equal to TRL's DPOTrainer (same tokens, loss within 1e-4), label smoothing as conservative
DPO, a LoRA reference that is the model with its adapters off, and a tiny Llama that learns to prefer the right
answer with full fine-tuning and with LoRA."""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.core.test_training_core import FAST, make_spec, run
from tests.tiny import keyword_rows, make_tiny_llama, preference_rows, write_jsonl
from tuneforge.workers.core.errors import InvalidDataset
from tuneforge.workers.core.lora import apply_lora
from tuneforge.workers.messages import DataFile, EvaluationDone, Outcome
from tuneforge.workers.spec import (
    AdaptationMethod,
    AdaptationSettings,
    DataSettings,
    EvaluationSettings,
    LoraSettings,
)
from tuneforge.workers.tasks.preference_optimization.data import Preference, read_preferences
from tuneforge.workers.tasks.preference_optimization.runtime import (
    Reference,
    answer_logps,
    collate,
    dpo_losses,
    encode_pair,
)


def read(rows: list[dict[str, Any]], tmp_path: Path, name: str = "pairs.jsonl") -> list[Preference]:
    path = write_jsonl(tmp_path / name, rows)
    return read_preferences(DataFile(str(path), name))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("dpo")
    return make_tiny_llama(folder / "policy", seed=4), make_tiny_llama(folder / "reference", seed=0)


def test_every_layout_reads_into_the_same_pairs(tmp_path: Path) -> None:
    read_layouts = {name: read(rows, tmp_path, f"{name}.jsonl") for name, rows in preference_rows(6).items()}
    conversational = read_layouts["messages"]
    assert read_layouts["trl_conversational"] == conversational == read_layouts["openai"]
    assert conversational[0].prompt == (("user", keyword_rows(6, seed=1)[0]["text"]),)
    assert isinstance(read_layouts["plain"][0].prompt, str)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ({"prompt": "p", "chosen": "a", "rejected": "a"}, "`chosen` and `rejected` are the same answer"),
        ({"prompt": "p", "chosen": "", "rejected": "b"}, "`chosen` must be a non-empty answer"),
        ({"prompt": "p", "completion": "c"}, "not a preference pair (its keys: completion, prompt)"),
        ({"input": {}, "preferred_output": "a"}, "OpenAI's preference format needs `input` with `messages`"),
        (
            {
                "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "chosen": "b",
                "rejected": "c",
            },
            "the prompt's last message is the assistant's",
        ),
        ({"prompt": "p", "chosen": {"role": "user", "content": "b"}, "rejected": "c"}, "not a 'user' message"),
    ],
)
def test_a_bad_line_is_named(tmp_path: Path, line: dict[str, Any], problem: str) -> None:
    good = preference_rows(2)["plain"]
    with pytest.raises(InvalidDataset) as refused:
        read([*good, line], tmp_path)
    assert str(refused.value).startswith("pairs.jsonl line 3: ") and problem in str(refused.value)


@pytest.mark.parametrize("layout", ["plain", "trl_conversational"])
def test_the_loss_on_a_fixed_batch_equals_trls_dpo_trainer(
    layout: str, models: tuple[Path, Path], tmp_path: Path
) -> None:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    policy_folder, reference_folder = models
    tokenizer = AutoTokenizer.from_pretrained(policy_folder)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    policy = AutoModelForCausalLM.from_pretrained(policy_folder).eval()
    reference_model = AutoModelForCausalLM.from_pretrained(reference_folder).eval()
    rows = preference_rows(6)[layout]
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(dir=tmp_path), beta=0.3, report_to=[], max_length=None, use_cpu=True, bf16=False
    )
    trainer = DPOTrainer(
        model=policy,
        ref_model=reference_model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    # bf16=False: TRL otherwise wraps the reference model in bf16 autocast where the CPU supports it, and both sides
    # are compared in fp32 here.
    theirs = [trainer.train_dataset[i] for i in range(len(rows))]
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(policy, trainer.data_collator(theirs)))

    ours = [encode_pair(pair, tokenizer, 256) for pair in read(rows, tmp_path)]
    assert [(o["prompt"], o["chosen"], o["rejected"]) for o in ours if o] == [
        (t["prompt_ids"], t["chosen_ids"], t["rejected_ids"]) for t in theirs
    ]
    batch = collate(tokenizer.pad_token_id)([o for o in ours if o])
    with torch.no_grad():
        reference = Reference(reference_model, lora=False)
        losses, _, _ = dpo_losses(answer_logps(policy, batch), reference.logps(policy, batch), 0.3, 0.0)
    assert abs(float(losses.mean()) - trl_loss) < 1e-4
    assert abs(trl_loss - math.log(2)) > 1e-3, "the two models differ, so the loss is not the trivial log 2"


def test_label_smoothing_is_conservative_dpo() -> None:
    policy, reference = torch.tensor([-3.0, -2.0, -5.0, -1.0]), torch.tensor([-4.0, -2.5, -4.0, -2.0])
    losses, chosen, rejected = dpo_losses(policy, reference, 0.5, 0.2)
    margin = (policy[:2] - reference[:2]) - (policy[2:] - reference[2:])
    sigmoid = torch.sigmoid(0.5 * margin)
    assert torch.allclose(losses, -(0.8 * sigmoid.log() + 0.2 * (1 - sigmoid).log()))
    assert torch.allclose(chosen, 0.5 * (policy[:2] - reference[:2]))
    assert torch.allclose(rejected, 0.5 * (policy[2:] - reference[2:]))


def test_a_lora_reference_is_the_model_with_its_adapters_off(models: tuple[Path, Path], tmp_path: Path) -> None:
    policy_folder, _ = models
    tokenizer = AutoTokenizer.from_pretrained(policy_folder)
    base = AutoModelForCausalLM.from_pretrained(policy_folder).eval()
    wrapped = apply_lora(AutoModelForCausalLM.from_pretrained(policy_folder), LoraSettings(rank=4, alpha=8)).eval()
    for name, parameter in wrapped.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)  # adapters that change the model
    pairs = [encode_pair(pair, tokenizer, 256) for pair in read(preference_rows(4)["plain"], tmp_path)]
    batch = collate(tokenizer.eos_token_id)([pair for pair in pairs if pair])
    reference = Reference(wrapped, lora=True).logps(wrapped, batch)
    assert torch.allclose(reference, answer_logps(base, batch), atol=1e-5)
    assert not torch.allclose(answer_logps(wrapped, batch), reference, atol=1e-3)
    assert sum(p.numel() for p in wrapped.parameters()) < 1.1 * sum(p.numel() for p in base.parameters())


@pytest.mark.parametrize("method", [AdaptationMethod.FULL, AdaptationMethod.LORA])
def test_a_tiny_llama_learns_to_prefer_the_right_topic(
    models: tuple[Path, Path], tmp_path: Path, method: AdaptationMethod
) -> None:
    policy_folder, _ = models
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(100)["messages"])
    spec = make_spec(
        policy_folder,
        task="preference_optimization",
        data=DataSettings(training_file="files/train", validation_fraction=0.2),
        adaptation=AdaptationSettings(method=method, lora=LoraSettings(rank=8, alpha=16, dropout=0.0)),
        hyperparameters=dataclasses.replace(
            FAST, epochs=8, learning_rate=1e-2 if method is AdaptationMethod.LORA else 1e-3, preference_beta=0.5
        ),
        evaluation=EvaluationSettings(
            log_every_steps=4, evaluate_before_training=True, best_metric="eval_reward_accuracy"
        ),
    )
    finished, events = run(spec, data, tmp_path / "work")
    assert finished.outcome is Outcome.SUCCEEDED, finished.message
    evaluations = [event.metrics for event in events if isinstance(event, EvaluationDone)]
    before, after = evaluations[0], evaluations[-1]
    assert before["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)  # the model is its own reference at first
    assert before["eval_reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert after["eval_reward_accuracy"] >= 0.9 and after["eval_loss"] < 0.7 * math.log(2)
    assert after["eval_chosen_reward"] > after["eval_rejected_reward"]
