"""The same fine-tuning run three ways, each in its own process: (a) transformers' Trainer, (b) a minimal hand-written
PyTorch loop over batches tensorised in advance (the practical limit), (c) Tuneforge's training core. Prints training
samples/s, the ratios c/a and c/b, and peak memory.

    .venv/bin/python bench/core_vs_trainer.py [--examples 2000] [--epochs 2]

A small BERT from a config (random weights, fixed seed) on synthetic sentences of varied length; the same
hyperparameters everywhere (batch 32, AdamW 5e-5, weight decay 0.01, constant rate, clipping at 1.0, seed 0).
Training time is what each spends in its training loop: the core's includes its per-epoch checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = [f"w{i}" for i in range(400)]
TOPICS = {"alpha": ["apple", "apricot"], "beta": ["banana", "berry"], "gamma": ["grape", "guava"], "delta": ["date"]}
BATCH, LEARNING_RATE, WEIGHT_DECAY, SEED = 32, 5e-5, 0.01, 0


def sentences(count: int) -> list[dict[str, str]]:
    rng = random.Random(SEED)
    rows = []
    for _ in range(count):
        label = rng.choice(sorted(TOPICS))
        words = [*rng.choices(WORDS, k=rng.randint(4, 100)), rng.choice(TOPICS[label])]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def make_model(folder: Path) -> None:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    torch.manual_seed(SEED)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *(w for ws in TOPICS.values() for w in ws)]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, model_max_length=128).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        max_position_embeddings=128,
        num_labels=len(TOPICS),
    )
    BertForSequenceClassification(config).save_pretrained(folder)


# ---------------------------------------------------------------- the three contenders (each in a child process)


def tokenized(model: Path, rows: list[dict[str, str]]) -> list[dict[str, Any]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    labels = {name: i for i, name in enumerate(sorted(TOPICS))}
    return [{**tokenizer(row["text"], truncation=True, max_length=128), "labels": labels[row["label"]]} for row in rows]


def run_trainer(model: Path, rows: list[dict[str, str]], epochs: int) -> float:
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    data = tokenized(model, rows)
    arguments = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=BATCH,
        num_train_epochs=epochs,
        learning_rate=LEARNING_RATE,
        weight_decay=WEIGHT_DECAY,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        logging_steps=10**9,
        save_strategy="no",
        report_to=[],
        seed=SEED,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),
    )
    trainer = Trainer(
        model=AutoModelForSequenceClassification.from_pretrained(model),
        args=arguments,
        train_dataset=data,  # type: ignore[arg-type]
        data_collator=DataCollatorWithPadding(AutoTokenizer.from_pretrained(model)),
    )
    started = time.perf_counter()
    trainer.train()
    return time.perf_counter() - started


def run_hand_loop(model: Path, rows: list[dict[str, str]], epochs: int) -> float:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    torch.manual_seed(SEED)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    collate = DataCollatorWithPadding(AutoTokenizer.from_pretrained(model))
    data = tokenized(model, rows)
    random.Random(SEED).shuffle(data)
    batches = [{k: v.to(device) for k, v in collate(data[i : i + BATCH]).items()} for i in range(0, len(data), BATCH)]
    network = AutoModelForSequenceClassification.from_pretrained(model).to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    network.train()
    started = time.perf_counter()
    for _ in range(epochs):
        for batch in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = network(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def run_core(model: Path, rows: list[dict[str, str]], epochs: int) -> float:
    import torch

    from workers.core.runner import run_job
    from workers.messages import DataFile, JobFinished, JobStarted, Outcome, RunJob, TrainingProgress, WorkerEvent
    from workers.spec import (
        DataSettings,
        EvaluationSettings,
        Hyperparameters,
        ScheduleKind,
        ScheduleSettings,
        TaskKind,
        TrainingSpec,
    )

    work = Path(tempfile.mkdtemp())
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = TrainingSpec(
        task=TaskKind.TEXT_CLASSIFICATION,
        base_model=str(model),
        data=DataSettings(training_file="files/train", max_sequence_length=128),
        hyperparameters=Hyperparameters(
            epochs=epochs,
            batch_size=BATCH,
            learning_rate=LEARNING_RATE,
            weight_decay=WEIGHT_DECAY,
            seed=SEED,
            schedule=ScheduleSettings(kind=ScheduleKind.CONSTANT),
        ),
        evaluation=EvaluationSettings(log_every_steps=50),
    )
    marks: dict[str, float] = {}

    def send(event: WorkerEvent) -> None:
        if isinstance(event, JobStarted):
            marks["start"] = time.perf_counter()
        elif isinstance(event, TrainingProgress):
            marks["end"] = time.perf_counter()

    job = RunJob(
        "bench", 1, spec, DataFile(str(data), data.name), None, str(work), str(work / "ckpt"), str(work / "a.tar")
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    finished: JobFinished = run_job(job, "bench", device, send, threading.Event())
    assert finished.outcome is Outcome.SUCCEEDED, finished.message
    return marks["end"] - marks["start"]


CONTENDERS = {"trainer": run_trainer, "hand_loop": run_hand_loop, "core": run_core}


def child(name: str, model: Path, examples: int, epochs: int) -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    seconds = CONTENDERS[name](model, sentences(examples), epochs)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cuda_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_mb, "cuda_peak_mb": cuda_mb}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--child", choices=sorted(CONTENDERS))
    parser.add_argument("--model", type=Path)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.model, args.examples, args.epochs)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    model = Path(tempfile.mkdtemp()) / "bench-bert"
    make_model(model)
    results = {}
    for name in CONTENDERS:
        command = [sys.executable, __file__, "--child", name, "--model", str(model)]
        command += ["--examples", str(args.examples), "--epochs", str(args.epochs)]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results[name] = json.loads(output)
        results[name]["samples_per_s"] = args.examples * args.epochs / results[name]["seconds"]
    print(f"BERT (4 layers, hidden 256), {args.examples} sentences of 5-101 words, {args.epochs} epochs, batch {BATCH}")
    print(f"{'':>10} {'samples/s':>10} {'train s':>8} {'peak RSS MB':>12} {'CUDA peak MB':>13}")
    for name, row in results.items():
        print(
            f"{name:>10} {row['samples_per_s']:>10.1f} {row['seconds']:>8.1f} {row['peak_rss_mb']:>12.0f} "
            f"{row['cuda_peak_mb']:>13.0f}"
        )
    core = results["core"]["samples_per_s"]
    print(f"core / trainer {core / results['trainer']['samples_per_s']:.3f}")
    print(f"core / hand loop {core / results['hand_loop']['samples_per_s']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
