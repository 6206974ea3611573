"""The same fine-tuning, every contender at its best: transformers' Trainer as its documentation recommends, a
minimal hand-written loop (the practical limit), and Tuneforge's training core, each in its own process, on a small
BERT, ViT and wav2vec2; then the frozen backbone, end to end, against Trainer and against the "features once" script
a user would write.

    .venv/bin/python bench/core_vs_trainer.py [--workloads text,image,audio] [--epochs 1] [--frozen-epochs 5]
                                              [--rounds 5] [--no-full]

Fair by construction:
- The same work: one model folder (random weights from a config, fixed seed) and one data file for all; batch 32,
  AdamW 5e-5 (fused where torch has it), weight decay 0.01 except biases and norm weights, constant rate, clipping
  at 1.0, seed 0, bf16 autocast on CUDA and fp32 on CPU; wav2vec2's feature encoder frozen everywhere.
- Text in length-grouped batches for everyone (Trainer's `group_by_length`, the core's own grouping, the hand
  loop replaying the core's order); each contender's padding share is printed.
- The same timed window: from the training loop's first batch to the last optimizer step, the device synchronised
  at both ends; set-up (data, model, optimizer) is reported apart. The core's per-epoch checkpoints fall inside it.
- Rounds interleaved (A B C A B C ...), at least 5: each figure is the median with its range, each ratio is taken
  round by round.
- A check that they do the same training: the mean loss over the first 10 steps agrees within 25% of the core's
  (see LOSS_TOLERANCE for why not tighter).
- TFLOP/s counts the model's work on real tokens only (padding is not work).
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import random
import resource
import statistics
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


def write_sentences(folder: Path, count: int = 2000) -> Path:
    rng = random.Random(SEED)
    rows = []
    for _ in range(count):
        label = rng.choice(sorted(TOPICS))
        words = [*rng.choices(WORDS, k=rng.randint(4, 100)), rng.choice(TOPICS[label])]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def build_bert(folder: Path, hidden: int = 256, layers: int = 4, heads: int = 4, vocab_size: int = 0) -> None:
    """A BERT classifier from a config (`vocab_size` 0: just the sentences' words)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    torch.manual_seed(SEED)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *(w for ws in TOPICS.values() for w in ws)]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, model_max_length=128).save_pretrained(folder)
    config = BertConfig(
        vocab_size=max(vocab_size, len(vocab)),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
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


def build_vit(
    folder: Path, image_size: int = 64, patch: int = 8, hidden: int = 192, layers: int = 4, heads: int = 3
) -> None:
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(SEED)
    config = ViTConfig(
        image_size=image_size, patch_size=patch, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=4 * hidden, num_labels=3,
    )  # fmt: skip
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)


def build_wav2vec2(
    folder: Path, hidden: int = 128, layers: int = 4, heads: int = 4, conv: tuple[int, ...] = (64, 64, 64)
) -> None:
    """A wav2vec2 classifier: three convolutions (strides 5, 4, 4), or with seven the base model's feature
    encoder (strides 5, 2, 2, 2, 2, 2, 2)."""
    from tests.media import save_tiny_wav2vec2

    base_encoder = {
        "conv_stride": (5, 2, 2, 2, 2, 2, 2),
        "conv_kernel": (10, 3, 3, 3, 3, 2, 2),
        "num_conv_pos_embeddings": 128,
        "num_conv_pos_embedding_groups": 16,
    }
    save_tiny_wav2vec2(
        folder,
        "Wav2Vec2ForSequenceClassification",
        SEED,
        False,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        conv_dim=conv,
        **(base_encoder if len(conv) == 7 else {}),
        num_labels=3,
    )


def write_images(folder: Path, per_class: int = 300) -> Path:
    from tests.media import write_shapes_zip

    return write_shapes_zip(folder / "shapes.zip", per_class=per_class)


def write_tones(folder: Path, per_class: int = 200, seconds: float = 0.5) -> Path:
    from tests.media import write_tones_zip

    return write_tones_zip(folder / "tones.zip", per_class=per_class, seconds=seconds)


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


# ---------------------------------------------------------------- what every contender measures the same way

LOSS_STEPS = 10
"""The loss check compares the mean training loss over the first LOSS_STEPS optimizer steps (each contender logs
it at step LOSS_STEPS: one host sync, as the core's default log cadence makes)."""
LOSS_TOLERANCE = 0.25
"""Most the first-steps mean loss may differ between contenders, relative to the core's, for them to count as
doing the same training. Dropout draws and Trainer's batch order differ from the core's, and the coloured squares
are learned within a few steps, so the early mean moves with the order (seen: 15% apart on images, under 1% on
text); a frozen model, wrong labels or a learning rate off by 10x move it further."""


def synchronized_now() -> float:
    """perf_counter after the device has finished its queued work (the ends of every timed window)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


@dataclass
class Tokens:
    """Real (attention-mask) tokens against padded positions in the batches a contender trained on."""

    real: int = 0
    padded: int = 0

    def count(self, batch: dict[str, Any]) -> None:
        mask = batch.get("attention_mask")
        if mask is not None:
            self.real += int(mask.sum())
            self.padded += int(mask.numel())


def core_batches(lengths: list[int] | None, examples: int, epoch: int) -> list[list[int]]:
    """The core's training batch order for an epoch (its loader's seed is seed * 1000 + epoch): length-grouped when
    example lengths are known (text), a seeded shuffle otherwise."""
    import torch
    from torch.utils.data import DataLoader

    from tuneforge.workers.core.length_grouping import LengthGroupedBatchSampler

    generator = torch.Generator().manual_seed(SEED * 1000 + epoch)
    if lengths is not None:
        return list(LengthGroupedBatchSampler(lengths, BATCH, generator))
    # built as the core builds its loader (which draws from the generator before shuffling)
    loader = DataLoader(range(examples), batch_size=BATCH, shuffle=True, generator=generator)
    return [batch.tolist() for batch in loader]


def load_network(workload: Workload, model: Path, frozen: bool) -> Any:
    """The model as each contender trains it: wav2vec2's convolutional feature encoder frozen (what its
    documentation recommends and the core does), the whole backbone frozen when asked."""
    import transformers

    network = getattr(transformers, workload.model_class).from_pretrained(model)
    if hasattr(network, "freeze_feature_encoder"):
        network.freeze_feature_encoder()
    if frozen:
        network.base_model.requires_grad_(False)
    return network


def optimizer_for(network: Any) -> Any:
    """The core's optimizer: AdamW (fused where torch has it for the device), no weight decay on biases and norm
    weights, only trainable parameters."""
    import torch

    from tuneforge.workers.core.optimization import NO_DECAY_MARKERS, fused_available

    trainable = [(n, p) for n, p in network.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in trainable if not n.endswith(NO_DECAY_MARKERS)], "weight_decay": WEIGHT_DECAY},
        {"params": [p for n, p in trainable if n.endswith(NO_DECAY_MARKERS)], "weight_decay": 0.0},
    ]
    device = next(network.parameters()).device
    return torch.optim.AdamW(groups, lr=LEARNING_RATE, fused=fused_available(device))


# ---------------------------------------------------------------- the contenders (each in a child process)

TRAINER_CALLBACKS: list[Any] = []
"""Extra Trainer callbacks (profile_step.py starts its profiler from one)."""
TRAINER_MAX_STEPS = -1
"""Trainer's max_steps (-1: the epochs decide); profile_step.py runs a few steps."""


def run_trainer(workload: Workload, model: Path, data: Path, epochs: int, frozen: bool) -> dict[str, Any]:
    """transformers' Trainer as its documentation recommends for the job: length-grouped batches for text, the
    frozen backbone in eval mode, no NaN filter (a sync per step), its fused AdamW, bf16 on CUDA."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    marks: dict[str, float] = {"begun": time.perf_counter()}
    network = load_network(workload, model, frozen)
    if frozen:  # Trainer calls model.train() every step; the frozen backbone stays in eval mode (no dropout)
        backbone = network.base_model.eval()
        backbone.train = lambda mode=True: backbone
    tokens = Tokens()
    collate = workload.collate(model)

    def counting_collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(items)
        tokens.count(batch)
        return batch

    class Window(TrainerCallback):  # type: ignore[misc]
        def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            marks.setdefault("start", synchronized_now())

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == state.max_steps:
                marks["end"] = synchronized_now()

    arguments = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=BATCH,
        num_train_epochs=epochs,
        max_steps=TRAINER_MAX_STEPS,
        learning_rate=LEARNING_RATE,
        weight_decay=WEIGHT_DECAY,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        train_sampling_strategy="group_by_length" if workload.task == "TEXT_CLASSIFICATION" else "random",
        logging_steps=LOSS_STEPS,
        logging_nan_inf_filter=False,
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
        data_collator=counting_collate,
        callbacks=[Window(), *TRAINER_CALLBACKS],
    )
    output = trainer.train()
    trainer.save_model(tempfile.mkdtemp())
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        **marks,
        "done": time.perf_counter(),
        "first_loss": logged[0],
        "mean_loss": output.training_loss,
        "real_tokens": tokens.real,
        "padded_tokens": tokens.padded,
    }


def run_hand_loop(workload: Workload, model: Path, data: Path, epochs: int, frozen: bool) -> dict[str, Any]:
    """A minimal PyTorch loop over batches tensorised and moved to the device in advance, in the core's batch
    order, with the core's optimizer and precision: the practical limit for the core."""
    import torch

    marks: dict[str, float] = {"begun": time.perf_counter()}
    torch.manual_seed(SEED)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    collate = workload.collate(model)
    items = workload.items(model, data)
    lengths = [len(item["input_ids"]) for item in items] if "input_ids" in items[0] else None
    tokens = Tokens()
    batches = []
    for epoch in range(1, epochs + 1):
        for indices in core_batches(lengths, len(items), epoch):
            batch = collate([items[i] for i in indices])
            tokens.count(batch)
            batches.append({k: v.to(device) for k, v in batch.items()})
    network = load_network(workload, model, frozen).to(device)
    optimizer = optimizer_for(network)
    network.train()
    loss_sum = torch.zeros((), device=device)
    first_loss = 0.0
    marks["start"] = synchronized_now()
    for step, batch in enumerate(batches, 1):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = network(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        if step == LOSS_STEPS:
            first_loss = float(loss_sum) / LOSS_STEPS
    marks["end"] = synchronized_now()
    network.save_pretrained(tempfile.mkdtemp())
    return {
        **marks,
        "done": time.perf_counter(),
        "first_loss": first_loss,
        "mean_loss": float(loss_sum) / len(batches),
        "real_tokens": tokens.real,
        "padded_tokens": tokens.padded,
    }


def backbone_features(workload: Workload, network: Any, batch: dict[str, Any]) -> Any:
    """What the classifier head reads from the frozen backbone, as a user's script takes it."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    output = network.base_model(**inputs)
    if workload.task == "TEXT_CLASSIFICATION":
        return output.pooler_output  # BERT: pooled [CLS] -> dropout -> classifier
    if workload.task == "IMAGE_CLASSIFICATION":
        return output.last_hidden_state[:, 0]  # ViT: normalised [CLS] -> classifier
    return output.last_hidden_state  # wav2vec2: frames -> projector -> mean -> classifier


def head_logits(workload: Workload, network: Any, features: Any) -> Any:
    if workload.task == "TEXT_CLASSIFICATION":
        return network.classifier(network.dropout(features))
    if workload.task == "IMAGE_CLASSIFICATION":
        return network.classifier(features)
    return network.classifier(network.projector(features).mean(dim=1))


def run_features_once(workload: Workload, model: Path, data: Path, epochs: int, frozen: bool) -> dict[str, Any]:
    """The script any user would write for a frozen backbone: the backbone's output computed once (no grad, eval
    mode, batches in file order), then the head trained on it for every epoch."""
    import torch

    marks: dict[str, float] = {"begun": time.perf_counter()}
    torch.manual_seed(SEED)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    collate = workload.collate(model)
    items = workload.items(model, data)
    network = load_network(workload, model, frozen=True).to(device)
    network.eval()
    marks["features_start"] = synchronized_now()
    features, labels = [], []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for start in range(0, len(items), BATCH):
            batch = {k: v.to(device) for k, v in collate(items[start : start + BATCH]).items()}
            features += list(backbone_features(workload, network, batch).float())
            labels += batch["labels"].tolist()
    labels_tensor = torch.tensor(labels, device=device)
    optimizer = optimizer_for(network)
    network.train()
    loss_sum = torch.zeros((), device=device)
    first_loss, steps = 0.0, 0
    marks["start"] = synchronized_now()
    for epoch in range(1, epochs + 1):
        for indices in core_batches(None, len(items), epoch):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = head_logits(workload, network, torch.stack([features[i] for i in indices]))
            loss = torch.nn.functional.cross_entropy(logits.float(), labels_tensor[indices])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            steps += 1
            if steps == LOSS_STEPS:
                first_loss = float(loss_sum) / LOSS_STEPS
    marks["end"] = synchronized_now()
    network.save_pretrained(tempfile.mkdtemp())
    return {**marks, "done": time.perf_counter(), "first_loss": first_loss, "mean_loss": float(loss_sum) / steps}


def core_spec(
    task: str, model: Path, epochs: int, clip_seconds: float = 0.0, frozen: bool = False, max_steps: int = 0
) -> Any:
    """The resolved spec the core gets for these benchmarks' shared hyperparameters (every step logged when
    `max_steps` is set, for first-step timings)."""
    from tuneforge.workers.spec import (
        AdaptationMethod,
        AdaptationSettings,
        DataSettings,
        EvaluationSettings,
        Hyperparameters,
        ScheduleKind,
        ScheduleSettings,
        TrainingSpec,
    )

    return TrainingSpec(
        task=task.lower(),
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
        evaluation=EvaluationSettings(log_every_steps=1 if max_steps else LOSS_STEPS),
        adaptation=AdaptationSettings(AdaptationMethod.FROZEN_BACKBONE if frozen else AdaptationMethod.FULL),
    )


def run_core_job(spec: Any, data: Path, send: Callable[[Any], None]) -> None:
    """`run_job` in this process, on CUDA when present; the job must succeed."""
    import torch

    from tuneforge.workers.core.runner import run_job
    from tuneforge.workers.messages import DataFile, Outcome, RunJob

    work = Path(tempfile.mkdtemp())
    job = RunJob(
        "bench", 1, spec, DataFile(str(data), data.name), None, str(work), str(work / "ckpt"), str(work / "a.tar")
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    finished = run_job(job, "bench", device, send, threading.Event())
    assert finished.outcome is Outcome.SUCCEEDED, finished.message


def run_core(workload: Workload, model: Path, data: Path, epochs: int, frozen: bool) -> dict[str, Any]:
    """Tuneforge's training core (`run_job`, in this process): its window runs from its training loop's start to
    the last step's report; its per-epoch checkpoints fall inside, its set-up and final artifact outside."""
    from tuneforge.workers.messages import LogEmitted, TrainingProgress, WorkerEvent

    marks: dict[str, float] = {"begun": time.perf_counter()}
    reports: list[TrainingProgress] = []

    def send(event: WorkerEvent) -> None:
        now = time.perf_counter()  # the core syncs the device for each report (its loss .item())
        if isinstance(event, LogEmitted) and event.message.startswith("training: "):
            marks["features_start"] = now
        elif isinstance(event, TrainingProgress):
            if not reports:
                marks["start"] = now - event.window_seconds
            marks["end"] = now
            reports.append(event)

    spec = core_spec(workload.task, model, epochs, workload.clip_seconds, frozen)
    run_core_job(spec, data, send)
    row: dict[str, Any] = {**marks, "done": time.perf_counter(), "first_loss": reports[0].loss}
    row["mean_loss"] = sum(r.loss * r.window_steps for r in reports) / sum(r.window_steps for r in reports)
    if workload.task == "TEXT_CLASSIFICATION":
        lengths = [len(item["input_ids"]) for item in workload.items(model, data)]
        tokens = Tokens()
        for epoch in range(1, epochs + 1):
            for indices in core_batches(lengths, len(lengths), epoch):
                tokens.real += sum(lengths[i] for i in indices)
                tokens.padded += max(lengths[i] for i in indices) * len(indices)
        row |= {"real_tokens": tokens.real, "padded_tokens": tokens.padded}
    return row


def useful_flops(workload: Workload, model: Path, data: Path) -> float:
    """Floating-point operations of one training epoch without padding: 3x the forward pass (backward costs about
    twice the forward), counted by torch's FlopCounterMode over batches of equally long examples."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    collate = workload.collate(model)
    items = workload.items(model, data)
    by_length: dict[int, list[dict[str, Any]]] = {}
    for item in items:
        by_length.setdefault(len(item["input_ids"]) if "input_ids" in item else 0, []).append(item)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    network = load_network(workload, model, frozen=False).to(device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        for group in by_length.values():
            for start in range(0, len(group), BATCH):
                network(**{k: v.to(device) for k, v in collate(group[start : start + BATCH]).items()})
    return 3.0 * counter.get_total_flops()


CONTENDERS: dict[str, Callable[[Workload, Path, Path, int, bool], dict[str, Any]]] = {
    "trainer": run_trainer,
    "hand_loop": run_hand_loop,
    "features_once": run_features_once,
    "core": run_core,
}
FULL = ["trainer", "hand_loop", "core"]
FROZEN = ["trainer", "features_once", "core"]
IMPORTS = {
    "trainer": ["transformers.trainer"],
    "hand_loop": ["transformers"],
    "features_once": ["transformers"],
    "core": [
        "tuneforge.workers.core.runner",
        "tuneforge.workers.tasks.text_classification.runtime",
        "tuneforge.workers.tasks.image_classification.runtime",
        "tuneforge.workers.tasks.audio_classification.runtime",
    ],
}
"""Imported before the clock starts: a script pays them once, a Tuneforge worker when it starts (warm workers)."""


def child(name: str, workload: Workload, model: Path, data: Path, epochs: int, frozen: bool) -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    for module in IMPORTS[name]:
        importlib.import_module(module)
    row = CONTENDERS[name](workload, model, data, epochs, frozen)
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    if name == "hand_loop":
        row["epoch_flops"] = useful_flops(workload, model, data)
    print(json.dumps(row))


# ---------------------------------------------------------------- rounds, medians, ratios


def run_child(
    name: str, contender: str, model: Path, data: Path, epochs: int, frozen: bool, script: list[str]
) -> dict[str, Any]:
    command = [sys.executable, *script, "--child", contender, "--workloads", name]
    command += ["--model", str(model), "--data", str(data), "--epochs", str(epochs)]
    command += ["--frozen"] if frozen else []
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{contender} on {name} failed:\n{done.stderr[-4000:]}")
    row: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return row


def measure(
    name: str,
    workload: Workload,
    epochs: int,
    contenders: list[str],
    frozen: bool,
    rounds: int,
    script: list[str] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Every contender in its own process on the same model folder and data file, rounds interleaved (A B C A B
    C ...), so drift on a shared machine falls on all of them alike. `script` runs the children (this file)."""
    scratch = Path(tempfile.mkdtemp())
    model = scratch / "model"
    workload.build(model)
    data = workload.write_data(scratch)
    runs: dict[str, list[dict[str, Any]]] = {contender: [] for contender in contenders}
    for _ in range(rounds):
        for contender in contenders:
            row = run_child(name, contender, model, data, epochs, frozen, script or [__file__])
            row["window_s"] = row["end"] - row["start"]
            row["samples_per_s"] = workload.examples * epochs / row["window_s"]
            row["setup_s"] = row["start"] - row["begun"]
            row["end_to_end_s"] = row["done"] - row["begun"]
            runs[contender].append(row)
    return runs


def spread(values: list[float]) -> str:
    """The median and the range of a list of figures."""
    return f"{statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]"


def ratios(runs: dict[str, list[dict[str, Any]]], key: str, over: str, higher_is_better: bool = True) -> list[float]:
    """The core's figure over another contender's, round by round."""
    pairs = zip(runs["core"], runs[over], strict=True)
    return [c[key] / o[key] if higher_is_better else o[key] / c[key] for c, o in pairs]


def loss_check(runs: dict[str, list[dict[str, Any]]]) -> tuple[bool, str]:
    """Whether every contender's first-steps mean loss lies within LOSS_TOLERANCE of the core's."""
    first = {name: statistics.median(r["first_loss"] for r in rows) for name, rows in runs.items()}
    core = first["core"]
    ok = all(abs(value - core) <= LOSS_TOLERANCE * abs(core) for value in first.values())
    text = ", ".join(f"{name} {value:.4f}" for name, value in first.items())
    return ok, f"mean loss over the first {LOSS_STEPS} steps: {text} (tolerance {LOSS_TOLERANCE:.0%} of the core's)"


def print_table(runs: dict[str, list[dict[str, Any]]], epochs: int, with_flops: bool, peak_tflops: float = 0.0) -> None:
    """One row per contender: medians (samples/s with its range), padding share, achieved TFLOP/s on real tokens
    (and MFU against `peak_tflops` when given), mean training loss, peak memory."""
    flops = statistics.median(r["epoch_flops"] for r in runs.get("hand_loop", [])) if with_flops else 0.0
    print(
        f"{'':>13} {'samples/s median [min-max]':>28} {'setup s':>8} {'padding':>8} {'TFLOP/s':>8} "
        f"{'MFU':>6} {'mean loss':>10} {'peak RSS MB':>12} {'CUDA MB':>8}"
    )
    for contender, rows in runs.items():
        real, padded = sum(r.get("real_tokens", 0) for r in rows), sum(r.get("padded_tokens", 0) for r in rows)
        padding = f"{1 - real / padded:8.1%}" if padded else f"{'-':>8}"
        window = statistics.median(r["window_s"] for r in rows)
        achieved = flops * epochs / window / 1e12
        tflops = f"{achieved:8.3f}" if flops else f"{'-':>8}"
        mfu = f"{achieved / peak_tflops:6.1%}" if flops and peak_tflops else f"{'-':>6}"
        print(
            f"{contender:>13} {spread([r['samples_per_s'] for r in rows]):>28} "
            f"{statistics.median(r['setup_s'] for r in rows):>8.1f} {padding} {tflops} {mfu} "
            f"{statistics.median(r['mean_loss'] for r in rows):>10.4f} "
            f"{max(r['peak_rss_mb'] for r in rows):>12.0f} {max(r['cuda_peak_mb'] for r in rows):>8.0f}"
        )


def compare(name: str, workload: Workload, epochs: int, rounds: int) -> bool:
    runs = measure(name, workload, epochs, FULL, False, rounds)
    print(f"{workload.description}: full fine-tuning, {epochs} epochs, batch {BATCH}, {rounds} interleaved rounds")
    print_table(runs, epochs, with_flops=True)
    print(f"core / trainer samples/s: {spread(ratios(runs, 'samples_per_s', 'trainer'))}")
    print(f"core / hand loop samples/s: {spread(ratios(runs, 'samples_per_s', 'hand_loop'))}")
    ok, text = loss_check(runs)
    print(f"{'same training' if ok else 'DIFFERENT TRAINING'}: {text}\n", flush=True)
    return ok


def compare_frozen(name: str, workload: Workload, epochs: int, rounds: int) -> bool:
    """Frozen backbone, end to end (data, model, training, saving the model): the core against Trainer and
    against the features-once script; the one-time feature pass and the per-epoch cost apart."""
    runs = measure(name, workload, epochs, FROZEN, True, rounds)
    print(f"{workload.description}: frozen backbone, {epochs} epochs, batch {BATCH}, {rounds} interleaved rounds")
    print(f"{'':>13} {'end to end s':>24} {'feature pass s':>15} {'per epoch s':>12} {'mean loss':>10}")
    for contender, rows in runs.items():
        passes = [r["start"] - r["features_start"] for r in rows if "features_start" in r]
        passed = f"{statistics.median(passes):>15.2f}" if passes and contender != "trainer" else f"{'-':>15}"
        print(
            f"{contender:>13} {spread([r['end_to_end_s'] for r in rows]):>24} {passed} "
            f"{statistics.median(r['window_s'] for r in rows) / epochs:>12.3f} "
            f"{statistics.median(r['mean_loss'] for r in rows):>10.4f}"
        )
    print(f"end to end, core speed-up over trainer: {spread(ratios(runs, 'end_to_end_s', 'trainer', False))}")
    once = ratios(runs, "end_to_end_s", "features_once", False)
    print(f"end to end, core speed-up over features once: {spread(once)}")
    ok, text = loss_check(runs)
    print(f"{'same training' if ok else 'DIFFERENT TRAINING'}: {text}\n", flush=True)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="text,image,audio")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--frozen-epochs", type=int, default=5, help="epochs of the frozen-backbone run (0: skip it)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of runs (medians and ranges)")
    parser.add_argument("--full", action=argparse.BooleanOptionalAction, default=True, help="the full fine-tuning runs")
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
    same = True
    for name in args.workloads.split(",") if args.full else []:
        same &= compare(name, WORKLOADS[name], args.epochs, args.rounds)
    for name in args.workloads.split(",") if args.frozen_epochs else []:
        same &= compare_frozen(name, WORKLOADS[name], args.frozen_epochs, args.rounds)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
