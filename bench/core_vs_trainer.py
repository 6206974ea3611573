"""The same fine-tuning run three ways, each in its own process: (a) transformers' Trainer, (b) a minimal hand-written
PyTorch loop over batches tensorised in advance (the practical limit), (c) Tuneforge's training core. Prints training
samples/s, the ratios c/a and c/b, and peak memory, for a small BERT, a small ViT and a small wav2vec2. Then the
frozen-backbone comparison: the backbone frozen, 5 epochs, Trainer against the core, end to end (data preparation,
model loading, training, and for the core its checkpoints and artifact).

    .venv/bin/python bench/core_vs_trainer.py [--workloads text,image,audio] [--epochs 2] [--frozen-epochs 5]
                                              [--repeats 2]

Models come from configs (random weights, fixed seed); the data is synthetic: sentences of varied length, coloured
squares on noise, tones. The same hyperparameters everywhere (batch 32, AdamW 5e-5, weight decay 0.01, constant
rate, clipping at 1.0, seed 0). Training time is what each spends in its training loop: the core's includes its
per-epoch checkpoints and, for images and audio, decoding the files each epoch (the others get tensors made once).
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = [f"w{i}" for i in range(400)]
TOPICS = {"alpha": ["apple", "apricot"], "beta": ["banana", "berry"], "gamma": ["grape", "guava"], "delta": ["date"]}
BATCH, LEARNING_RATE, WEIGHT_DECAY, SEED = 32, 5e-5, 0.01, 0


@dataclass(frozen=True)
class Workload:
    """One model and its data, as each contender needs them."""

    description: str
    examples: int
    build: Callable[[Path], None]
    """Writes the model folder (weights and processor)."""
    write_data: Callable[[Path], Path]
    """Writes the training file the core reads (JSONL or a zip archive) into a folder."""
    items: Callable[[Path, Path], list[dict[str, Any]]]
    """items(model, data file): one dict of tensors or lists per example, made once (what Trainer scripts do)."""
    collate: Callable[[Path], Callable[[list[dict[str, Any]]], dict[str, Any]]]
    model_class: str
    task: str
    clip_seconds: float = 0.0


# ---------------------------------------------------------------- text: a small BERT on sentences of varied length


def write_sentences(folder: Path) -> Path:
    rng = random.Random(SEED)
    rows = []
    for _ in range(2000):
        label = rng.choice(sorted(TOPICS))
        words = [*rng.choices(WORDS, k=rng.randint(4, 100)), rng.choice(TOPICS[label])]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def build_bert(folder: Path) -> None:
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


def sentence_items(model: Path, data: Path) -> list[dict[str, Any]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    labels = {name: i for i, name in enumerate(sorted(TOPICS))}
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    return [{**tokenizer(r["text"], truncation=True, max_length=128), "labels": labels[r["label"]]} for r in rows]


def pad_collate(model: Path) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    from transformers import AutoTokenizer, DataCollatorWithPadding

    collate: Callable[[list[dict[str, Any]]], dict[str, Any]] = DataCollatorWithPadding(
        AutoTokenizer.from_pretrained(model)
    )
    return collate


# ---------------------------------------------------------------- images and audio: folders of files in a zip


def build_vit(folder: Path) -> None:
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(SEED)
    config = ViTConfig(
        image_size=64, patch_size=8, hidden_size=192, num_hidden_layers=4, num_attention_heads=3,
        intermediate_size=768, num_labels=3,
    )  # fmt: skip
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)


def build_wav2vec2(folder: Path) -> None:
    from tests.media import save_tiny_wav2vec2

    save_tiny_wav2vec2(
        folder,
        "Wav2Vec2ForSequenceClassification",
        SEED,
        False,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=512,
        conv_dim=(64, 64, 64),
        num_labels=3,
    )


def write_images(folder: Path) -> Path:
    from tests.media import write_shapes_zip

    return write_shapes_zip(folder / "shapes.zip", per_class=300)


def write_tones(folder: Path) -> Path:
    from tests.media import write_tones_zip

    return write_tones_zip(folder / "tones.zip", per_class=200)


def archive_members(data: Path) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(data) as archive:
        return [(name.split("/")[-2], archive.read(name)) for name in sorted(archive.namelist()) if "." in name]


def image_items(model: Path, data: Path) -> list[dict[str, Any]]:
    from PIL import Image
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(model)
    members = archive_members(data)
    names = sorted({label for label, _ in members})
    return [
        {
            "pixel_values": processor(Image.open(io.BytesIO(raw)).convert("RGB"), return_tensors="pt")["pixel_values"][
                0
            ],
            "labels": names.index(label),
        }
        for label, raw in members
    ]


def tone_items(model: Path, data: Path) -> list[dict[str, Any]]:
    import soundfile
    from transformers import AutoFeatureExtractor

    extractor = AutoFeatureExtractor.from_pretrained(model)
    members = archive_members(data)
    names = sorted({label for label, _ in members})
    items = []
    for label, raw in members:
        wave, rate = soundfile.read(io.BytesIO(raw), dtype="float32")
        values = extractor(wave, sampling_rate=rate, return_tensors="pt")["input_values"][0]
        items.append({"input_values": values, "labels": names.index(label)})
    return items


def stack_collate(model: Path) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    import torch

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        return {key: torch.stack([item[key] for item in items]) if key != "labels" else
                torch.tensor([item[key] for item in items]) for key in items[0]}  # fmt: skip

    return collate


WORKLOADS = {
    "text": Workload(
        "BERT (4 layers, hidden 256), 2000 sentences of 5-101 words",
        2000, build_bert, write_sentences, sentence_items, pad_collate, "AutoModelForSequenceClassification",
        "TEXT_CLASSIFICATION",
    ),
    "image": Workload(
        "ViT (4 layers, hidden 192, 64x64 images), 900 PNGs",
        900, build_vit, write_images, image_items, stack_collate, "AutoModelForImageClassification",
        "IMAGE_CLASSIFICATION",
    ),
    "audio": Workload(
        "wav2vec2 (4 layers, hidden 128), 600 clips of 0.5 s at 16 kHz",
        600, build_wav2vec2, write_tones, tone_items, stack_collate, "AutoModelForAudioClassification",
        "AUDIO_CLASSIFICATION", clip_seconds=0.5,
    ),
}  # fmt: skip


# ---------------------------------------------------------------- the three contenders (each in a child process)


def run_trainer(workload: Workload, model: Path, data: Path, epochs: int, frozen: bool) -> float:
    import torch
    import transformers
    from transformers import Trainer, TrainingArguments

    network = getattr(transformers, workload.model_class).from_pretrained(model)
    if frozen:
        network.base_model.requires_grad_(False)

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
        model=network,
        args=arguments,
        train_dataset=workload.items(model, data),  # type: ignore[arg-type]
        data_collator=workload.collate(model),
    )
    started = time.perf_counter()
    trainer.train()
    return time.perf_counter() - started


def run_hand_loop(workload: Workload, model: Path, data: Path, epochs: int, frozen: bool) -> float:
    import torch
    import transformers

    torch.manual_seed(SEED)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    collate = workload.collate(model)
    items = workload.items(model, data)
    random.Random(SEED).shuffle(items)
    batches = [{k: v.to(device) for k, v in collate(items[i : i + BATCH]).items()} for i in range(0, len(items), BATCH)]
    network = getattr(transformers, workload.model_class).from_pretrained(model).to(device)
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


def training_flops(workload: Workload, model: Path, data: Path) -> float:
    """Floating-point operations of one training epoch: 3x the forward pass's (backward costs about twice the
    forward), counted by torch's FlopCounterMode over every batch. The same work for every contender."""
    import torch
    import transformers
    from torch.utils.flop_counter import FlopCounterMode

    collate = workload.collate(model)
    items = workload.items(model, data)
    network = getattr(transformers, workload.model_class).from_pretrained(model)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        for i in range(0, len(items), BATCH):
            network(**collate(items[i : i + BATCH]))
    return 3.0 * counter.get_total_flops()


def core_spec(
    task: str, model: Path, epochs: int, clip_seconds: float = 0.0, frozen: bool = False, max_steps: int = 0
) -> Any:
    """The resolved spec the core gets for these benchmarks' shared hyperparameters (every step logged when
    `max_steps` is set, for first-step timings)."""
    from workers.spec import (
        AdaptationMethod,
        AdaptationSettings,
        DataSettings,
        EvaluationSettings,
        Hyperparameters,
        ScheduleKind,
        ScheduleSettings,
        TaskKind,
        TrainingSpec,
    )

    return TrainingSpec(
        task=TaskKind[task],
        base_model=str(model),
        data=DataSettings(training_file="files/train", max_sequence_length=128, clip_seconds=clip_seconds),
        hyperparameters=Hyperparameters(
            epochs=epochs,
            batch_size=BATCH,
            learning_rate=LEARNING_RATE,
            weight_decay=WEIGHT_DECAY,
            seed=SEED,
            schedule=ScheduleSettings(kind=ScheduleKind.CONSTANT),
            max_steps=max_steps,
        ),
        evaluation=EvaluationSettings(log_every_steps=1 if max_steps else 50),
        adaptation=AdaptationSettings(AdaptationMethod.FROZEN_BACKBONE if frozen else AdaptationMethod.FULL),
    )


def run_core_job(spec: Any, data: Path, send: Callable[[Any], None]) -> None:
    """`run_job` in this process, on CUDA when present; the job must succeed."""
    import torch

    from workers.core.runner import run_job
    from workers.messages import DataFile, Outcome, RunJob

    work = Path(tempfile.mkdtemp())
    job = RunJob(
        "bench", 1, spec, DataFile(str(data), data.name), None, str(work), str(work / "ckpt"), str(work / "a.tar")
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    finished = run_job(job, "bench", device, send, threading.Event())
    assert finished.outcome is Outcome.SUCCEEDED, finished.message


def run_core(workload: Workload, model: Path, data: Path, epochs: int, frozen: bool) -> float:
    from workers.messages import JobStarted, TrainingProgress, WorkerEvent

    marks: dict[str, float] = {}

    def send(event: WorkerEvent) -> None:
        if isinstance(event, JobStarted):
            marks["start"] = time.perf_counter()
        elif isinstance(event, TrainingProgress):
            marks["end"] = time.perf_counter()

    run_core_job(core_spec(workload.task, model, epochs, workload.clip_seconds, frozen), data, send)
    return marks["end"] - marks["start"]


CONTENDERS = {"trainer": run_trainer, "hand_loop": run_hand_loop, "core": run_core}
IMPORTS = {
    "trainer": ["transformers.trainer"],
    "hand_loop": ["transformers"],
    "core": [
        "workers.core.runner",
        "workers.core.text_adapter",
        "workers.core.image_adapter",
        "workers.core.audio_adapter",
    ],
}
"""Imported before the clock starts: a script pays them once, a Tuneforge worker when it starts (warm workers)."""


def child(name: str, workload: Workload, model: Path, data: Path, epochs: int, frozen: bool) -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    for module in IMPORTS[name]:
        importlib.import_module(module)
    started = time.perf_counter()
    seconds = CONTENDERS[name](workload, model, data, epochs, frozen)
    end_to_end = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cuda_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    flops = training_flops(workload, model, data) if name == "hand_loop" and not frozen else 0.0
    row = {"seconds": seconds, "end_to_end": end_to_end, "peak_rss_mb": peak_mb, "cuda_peak_mb": cuda_mb}
    print(json.dumps({**row, "epoch_flops": flops}))


def measure(
    name: str, workload: Workload, epochs: int, contenders: list[str], frozen: bool, repeats: int
) -> dict[str, dict[str, float]]:
    """Runs each contender in its own process on the same model folder and data file, `repeats` rounds in turn,
    and keeps each one's fastest run (this machine's speed drifts between processes; the minimum is the run least
    disturbed)."""
    scratch = Path(tempfile.mkdtemp())
    model = scratch / "model"
    workload.build(model)
    data = workload.write_data(scratch)
    results: dict[str, dict[str, float]] = {}
    for _ in range(repeats):
        for contender in contenders:
            command = [sys.executable, __file__, "--child", contender, "--workloads", name]
            command += ["--model", str(model), "--data", str(data), "--epochs", str(epochs)]
            command += ["--frozen"] if frozen else []
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()
            row = json.loads(output.splitlines()[-1])
            row["samples_per_s"] = workload.examples * epochs / row["seconds"]
            if contender not in results or row["seconds"] < results[contender]["seconds"]:
                results[contender] = row
    return results


def print_rows(results: dict[str, dict[str, float]], epochs: int) -> None:
    """One row per contender; TFLOP/s from the epoch's counted operations (full fine-tuning only)."""
    epoch_flops = max(row.get("epoch_flops", 0.0) for row in results.values())
    print(
        f"{'':>10} {'samples/s':>10} {'train s':>8} {'total s':>8} {'TFLOP/s':>8} {'peak RSS MB':>12} "
        f"{'CUDA peak MB':>13}"
    )
    for contender, row in results.items():
        tflops = f"{epoch_flops * epochs / row['seconds'] / 1e12:8.3f}" if epoch_flops else f"{'-':>8}"
        print(
            f"{contender:>10} {row['samples_per_s']:>10.1f} {row['seconds']:>8.1f} {row['end_to_end']:>8.1f} "
            f"{tflops} {row['peak_rss_mb']:>12.0f} {row['cuda_peak_mb']:>13.0f}"
        )


def compare(name: str, workload: Workload, epochs: int, repeats: int) -> None:
    results = measure(name, workload, epochs, list(CONTENDERS), False, repeats)
    print(f"{workload.description}, {epochs} epochs, batch {BATCH}, full fine-tuning, fastest of {repeats}")
    print_rows(results, epochs)
    core = results["core"]["samples_per_s"]
    print(f"core / trainer {core / results['trainer']['samples_per_s']:.3f}")
    print(f"core / hand loop {core / results['hand_loop']['samples_per_s']:.3f}\n", flush=True)


def compare_frozen(name: str, workload: Workload, epochs: int, repeats: int) -> None:
    """Frozen backbone: the core computes the backbone's output once; Trainer runs it every step."""
    results = measure(name, workload, epochs, ["trainer", "core"], True, repeats)
    print(f"{workload.description}, {epochs} epochs, batch {BATCH}, frozen backbone")
    print_rows(results, epochs)
    ratio = results["trainer"]["end_to_end"] / results["core"]["end_to_end"]
    print(f"frozen backbone, end to end: core {ratio:.2f}x faster than trainer\n", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="text,image,audio")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--frozen-epochs", type=int, default=5, help="epochs of the frozen-backbone run (0: skip it)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of runs; each contender's fastest is kept")
    parser.add_argument("--frozen", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=sorted(CONTENDERS))
    parser.add_argument("--model", type=Path)
    parser.add_argument("--data", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child:
        child(args.child, WORKLOADS[args.workloads], args.model, args.data, args.epochs, args.frozen)
        return 0
    for name in args.workloads.split(","):
        compare(name, WORKLOADS[name], args.epochs, args.repeats)
    for name in args.workloads.split(",") if args.frozen_epochs else []:
        compare_frozen(name, WORKLOADS[name], args.frozen_epochs, args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
