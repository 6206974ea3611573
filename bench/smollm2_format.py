"""Quality on real weights, through the service and its CLI: teach SmolLM2-135M-Instruct (shipped offline as a GGUF
file, given to the server as is) to answer a BBC News article with only its topic in one word, a format it does not
follow before tuning, and report exact match on held-out articles before and after.

    .venv/bin/python bench/smollm2_format.py [--per-topic 20] [--held-out-per-topic 6] [--epochs 2]

It starts a local server whose model root is the GGUF file's folder, then runs the CLI as a user would:
`tuneforge upload`, `tuneforge create --spec` (LoRA on the attention projections, held-out prompts answered greedily
at every evaluation: evaluation.generation_samples), `tuneforge watch`, `tuneforge download`, and
`tuneforge generate` on a few held-out articles. The figures come from the artifact's metrics.json: the baseline
evaluation (the untuned model) and the best one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.sft_vs_trl import SYSTEM, smollm2_gguf
from tuneforge.clients.client import TuneforgeClient
from tuneforge.clients.demo import write_bbc_subset
from tuneforge.clients.local_server import start_local_server


def chats(path: Path, out: Path) -> Path:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    lines = [
        {
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": row["text"]},
                {"role": "assistant", "content": row["label"]},
            ]
        }
        for row in rows
    ]
    out.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return out


def cli(target: str, *words: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "tuneforge.clients.cli", "--server", target, "--timeout", "600", *words],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise SystemExit(f"tuneforge {' '.join(words[:2])} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done.stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-topic", type=int, default=20)
    parser.add_argument("--held-out-per-topic", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--words", type=int, default=60)
    args = parser.parse_args()
    gguf = smollm2_gguf()
    scratch = Path(tempfile.mkdtemp())
    train_rows, held_rows = write_bbc_subset(
        scratch, args.per_topic, args.held_out_per_topic, seed=1, max_words=args.words
    )
    train, held = chats(train_rows, scratch / "train.jsonl"), chats(held_rows, scratch / "held.jsonl")
    held_count = len(held.read_text().splitlines())
    spec = {
        "task": "TEXT_GENERATION",
        "baseModel": str(gguf),
        "data": {"maxSequenceLength": 256},
        "adaptation": {
            "method": "LORA",
            "lora": {"rank": 16, "alpha": 32, "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        },
        "hyperparameters": {"epochs": args.epochs, "batchSize": 8, "learningRate": 0.001, "seed": 0},
        "evaluation": {
            "evaluateBeforeTraining": True,
            "generationSamples": held_count,
            "bestMetric": "eval_exact_match",
        },
    }
    (scratch / "spec.json").write_text(json.dumps(spec))
    server = start_local_server(scratch / "data", 1, [gguf.parent], ["--device", "auto", "--log-level", "WARNING"])
    began = time.perf_counter()
    try:
        target = server.target
        with TuneforgeClient(target) as client:
            client.wait_until_serving(300)  # the worker imports torch and every task first
        cli(target, "health")
        train_file = cli(target, "upload", str(train))
        held_file = cli(target, "upload", str(held))
        job = cli(
            target, "create", "--spec", str(scratch / "spec.json"), "--train", train_file, "--validation", held_file
        )
        subprocess.run([sys.executable, "-m", "tuneforge.clients.cli", "--server", target, "watch", job], check=True)
        cli(target, "download", job, "-o", str(scratch / "model"))
        metrics = json.loads((scratch / "model" / "metrics.json").read_text())
        shown = [json.loads(line) for line in held_rows.read_text().splitlines()][:3]
        answers = [
            json.loads(cli(target, "--json", "generate", job, row["text"], "--chat", "--system", SYSTEM))["text"]
            for row in shown
        ]
    finally:
        server.stop()
    before, after = metrics["baseline"], metrics["best"]
    print(
        f"\nSmolLM2-135M-Instruct (GGUF, LoRA r16 on q/k/v/o), {args.per_topic * 5} training chats, {held_count} "
        f"held-out articles of {args.words} words, {args.epochs} epochs; {time.perf_counter() - began:.0f} s"
    )
    print(f"exact match before {before['eval_exact_match']:.3f}, after {after['eval_exact_match']:.3f}")
    print(f"ROUGE-L before {before['eval_rouge_l']:.3f}, after {after['eval_rouge_l']:.3f}")
    for sample in metrics["classes"]["samples"][:3]:
        print(f"- reference {sample['reference']!r}; before {sample['before'][:80]!r}; after {sample['after']!r}")
    for row, answer in zip(shown, answers, strict=True):
        print(f"- tuneforge generate: {answer!r} (reference {row['label']!r})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
