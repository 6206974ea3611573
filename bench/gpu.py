"""The fair comparison of core_vs_trainer.py at realistic sizes, for one GPU: BERT-base, ViT-B/16 and wav2vec2-base
built from their configs (random weights), bf16 autocast, the same contenders, windows, rounds and loss check.
Prints samples/s, achieved TFLOP/s (real tokens only), MFU against the GPU's dense bf16 peak, and peak GPU memory,
for the core, Trainer and the hand-written loop. Sized to finish within 8 minutes on one modern GPU.

    .venv/bin/python bench/gpu.py [--rounds 3] [--workloads text,image,audio] [--peak-tflops N]
    .venv/bin/python bench/gpu.py --dry-run     # tiny models and data on the CPU: the script's own check (a test)
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import core_vs_trainer as fair

BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}
"""Dense bf16 tensor-core peaks (vendor datasheets, without sparsity), by a part of the device name."""


def workloads(dry_run: bool) -> dict[str, fair.Workload]:
    """Realistic sizes, or for the dry run tiny ones that show every code path in seconds."""
    if dry_run:
        bert = functools.partial(fair.build_bert, hidden=32, layers=2, heads=2, vocab_size=0)
        vit = functools.partial(fair.build_vit, image_size=32, patch=8, hidden=32, layers=2, heads=2)
        wav2vec2 = functools.partial(fair.build_wav2vec2, hidden=32, layers=2, heads=2, conv=(16, 16, 16))
        sentences, images, clips, seconds = 96, 16, 12, 0.5
    else:
        bert = functools.partial(fair.build_bert, hidden=768, layers=12, heads=12, vocab_size=30522)
        vit = functools.partial(fair.build_vit, image_size=224, patch=16, hidden=768, layers=12, heads=12)
        wav2vec2 = functools.partial(fair.build_wav2vec2, hidden=768, layers=12, heads=12, conv=(512,) * 7)
        sentences, images, clips, seconds = 8192, 1000, 400, 2.0
    return {
        "text": fair.Workload(
            f"BERT (hidden {'32, 2' if dry_run else '768, 12'} layers), {sentences} sentences of 5-101 words",
            sentences, bert, functools.partial(fair.write_sentences, count=sentences), fair.sentence_items,
            fair.pad_collate, "AutoModelForSequenceClassification", "TEXT_CLASSIFICATION",
        ),
        "image": fair.Workload(
            f"ViT ({'tiny, 32 px' if dry_run else 'B/16, 224 px'}), {images * 3} PNGs",
            images * 3, vit, functools.partial(fair.write_images, per_class=images), fair.image_items,
            fair.stack_collate, "AutoModelForImageClassification", "IMAGE_CLASSIFICATION",
        ),
        "audio": fair.Workload(
            f"wav2vec2 ({'tiny' if dry_run else 'base'}), {clips * 3} clips of {seconds:g} s at 16 kHz",
            clips * 3, wav2vec2, functools.partial(fair.write_tones, per_class=clips, seconds=seconds),
            fair.tone_items, fair.stack_collate, "AutoModelForAudioClassification", "AUDIO_CLASSIFICATION",
            clip_seconds=seconds,
        ),
    }  # fmt: skip


def bf16_peak(override: float) -> float:
    """The GPU's dense bf16 peak in TFLOP/s (0 when unknown or on the CPU)."""
    import torch

    if override or not torch.cuda.is_available():
        return override
    name = torch.cuda.get_device_name()
    return next((peak for part, peak in BF16_PEAK_TFLOPS.items() if part in name), 0.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="text,image,audio")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="the GPU's dense bf16 peak, if not listed")
    parser.add_argument("--dry-run", action="store_true", help="tiny models and data, one round, on the CPU")
    parser.add_argument("--child", choices=sorted(fair.CONTENDERS))
    parser.add_argument("--model", type=Path)
    parser.add_argument("--data", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # children inherit it: the dry run never touches a GPU
        fair.LOSS_STEPS = 2  # its tiny data sets make 2-3 steps
    suite = workloads(args.dry_run)
    if args.child:
        fair.child(args.child, suite[args.workloads], args.model, args.data, args.epochs, False)
        return 0
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here; nothing measured (--dry-run checks the script on the CPU)")
        return 0
    peak = bf16_peak(args.peak_tflops)
    rounds = 1 if args.dry_run else args.rounds
    same = True
    extra = ["--dry-run"] if args.dry_run else []
    for name in args.workloads.split(","):
        workload = suite[name]
        runs = fair.measure(name, workload, args.epochs, fair.FULL, False, rounds, [__file__, *extra])
        print(f"{workload.description}: {args.epochs} epoch, batch {fair.BATCH}, {rounds} interleaved rounds")
        fair.print_table(runs, args.epochs, with_flops=True, peak_tflops=peak)
        print(f"core / trainer samples/s: {fair.spread(fair.ratios(runs, 'samples_per_s', 'trainer'))}")
        print(f"core / hand loop samples/s: {fair.spread(fair.ratios(runs, 'samples_per_s', 'hand_loop'))}")
        ok, text = fair.loss_check(runs)
        same &= ok
        print(f"{'same training' if ok else 'DIFFERENT TRAINING'}: {text}\n", flush=True)
    print(f"bf16 peak {peak:g} TFLOP/s" if peak else "bf16 peak unknown (MFU not shown): pass --peak-tflops")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
