"""What decoding media once, ahead of training, saves: core_vs_trainer's images (900 PNGs, a 64x64 ViT processor)
and clips (600 WAVs of 0.5 s, wav2vec2's feature extractor) read the way the training loop reads them.

    .venv/bin/python bench/media_decoding.py [--rounds 5]

For each data set: one pass of lazy decoding in the loop's thread (what every epoch paid for audio before, and for
images with augmentation), the one-time pass ahead of training on this machine's threads, and a pass served from
memory (every later epoch). Medians of the rounds, each round on fresh data set objects.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import core_vs_trainer as fair


def examples(archive: Path, folder: Path) -> list[Any]:
    from tuneforge.workers.core.media_data import MediaExample

    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".png", ".wav"))
    return [MediaExample(path, 0, path.name) for path in files]


def timed_pass(dataset: Any) -> float:
    started = time.perf_counter()
    for index in range(len(dataset)):
        dataset[index]
    return time.perf_counter() - started


def measure(make: Any, rounds: int) -> dict[str, float]:
    threads = os.cpu_count() or 1
    lazy, ahead, memory = [], [], []
    for _ in range(rounds):
        lazy.append(timed_pass(make()))
        dataset = make()
        started = time.perf_counter()
        dataset.process_ahead(threads)
        ahead.append(time.perf_counter() - started)
        memory.append(timed_pass(dataset))
    return {"lazy": statistics.median(lazy), "ahead": statistics.median(ahead), "memory": statistics.median(memory)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoFeatureExtractor, AutoImageProcessor

    from tuneforge.workers.tasks.audio_classification.runtime import AudioDataset
    from tuneforge.workers.tasks.image_classification.runtime import ImageDataset

    scratch = Path(tempfile.mkdtemp())
    fair.build_vit(scratch / "vit")
    fair.build_wav2vec2(scratch / "wav2vec2")
    images = examples(fair.write_images(scratch), scratch / "images")
    clips = examples(fair.write_tones(scratch), scratch / "clips")
    processor = AutoImageProcessor.from_pretrained(scratch / "vit")
    extractor = AutoFeatureExtractor.from_pretrained(scratch / "wav2vec2")
    results = {
        f"{len(images)} PNGs (ViT processor)": measure(lambda: ImageDataset(images, processor, None), args.rounds),
        f"{len(clips)} WAVs of 0.5 s (wav2vec2)": measure(
            lambda: AudioDataset(clips, extractor, 0.5, None, True), args.rounds
        ),
    }
    print(f"one pass over the data set, medians of {args.rounds} rounds, {os.cpu_count()} threads ahead")
    print(f"{'':>28} {'lazy, in the loop':>18} {'ahead, once':>12} {'from memory':>12} {'saved per epoch':>16}")
    for name, row in results.items():
        print(
            f"{name:>28} {row['lazy']:>17.2f}s {row['ahead']:>11.2f}s {row['memory']:>11.3f}s "
            f"{row['lazy'] - row['memory']:>15.2f}s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
