"""bench/gpu.py runs only where a GPU is lent; its dry run (tiny models on the CPU, every contender, the loss
check, the table) runs here, so the script cannot rot between GPU runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_bench_dry_run_compares_every_contender_on_every_workload() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for workload in ("BERT", "ViT", "wav2vec2"):
        assert any(line.startswith(workload) for line in lines), done.stdout
    for contender in ("trainer", "hand_loop", "core"):
        rows = [line.split() for line in lines if line.split()[:1] == [contender] and "/" not in line]
        assert len(rows) == 3, done.stdout
        assert all(float(row[1]) > 0 for row in rows), rows  # samples/s
    assert sum("same training" in line for line in lines) == 3, done.stdout
    assert sum(line.startswith("core / trainer samples/s:") for line in lines) == 3
    assert "bf16 peak unknown" in done.stdout  # on the CPU there is no peak, so no MFU is claimed
