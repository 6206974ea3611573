"""Checkpoints on disk: full training state for exact resume (the newest one), and the best weights by the chosen
metric. Each is written to a temporary folder and renamed into place, so a crash never leaves a half checkpoint.

A checkpoint holds the weights (safetensors), the optimizer, scheduler and gradient-scaler state, the python, numpy,
torch and CUDA random states, and the trainer's position and bookkeeping (JSON). Tensors load with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from tuneforge.workers.core.checkpoint_state import CheckpointState
from tuneforge.workers.core.faults import check_disk_write

WEIGHTS = "model.safetensors"
STATE = "state.pt"
POSITION = "trainer_state.json"


def rng_state() -> dict[str, Any]:
    """Every random generator training draws from, in a form `weights_only` loading accepts."""
    version, python_state, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(python_state), gauss],
        "numpy": [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


DISPLACED = ".old-"


def _replace_atomically(temporary: Path, final: Path) -> int:
    """Renames temporary to final. A folder already at final is moved aside first and removed last, so a crash at
    any point leaves a complete copy that `latest_checkpoint` finds."""
    displaced = final.with_name(f"{DISPLACED}{final.name}")
    if final.exists():
        shutil.rmtree(displaced, ignore_errors=True)
        final.rename(displaced)
    temporary.rename(final)
    shutil.rmtree(displaced, ignore_errors=True)
    return sum(f.stat().st_size for f in final.iterdir())


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def save_checkpoint(
    directory: Path, model: nn.Module, training: dict[str, Any], state: CheckpointState, keep: int = 1
) -> tuple[Path, int]:
    """Writes `step-NNNNNN/` (weights, training state, position) and keeps the `keep` newest such checkpoints.

    The temporary folder is private to this process, and pruning keeps the highest steps, so a stale attempt that
    is still writing cannot remove a newer attempt's checkpoints.
    """
    step = state.step
    final = directory / f"step-{step:06d}"
    temporary = _fresh(directory / f".step-{step:06d}.{os.getpid()}.tmp")
    try:
        check_disk_write(temporary / WEIGHTS)
        save_model(model, str(temporary / WEIGHTS))
        torch.save({**training, "rng": rng_state()}, temporary / STATE)
        (temporary / POSITION).write_text(state.to_json())
        size = _replace_atomically(temporary, final)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)  # a failed write (disk full) leaves nothing behind
    for older in sorted(directory.glob("step-*"), key=lambda p: p.name, reverse=True)[max(1, keep) :]:
        shutil.rmtree(older, ignore_errors=True)
    return final, size


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint, if any (one moved aside by an interrupted replacement counts too)."""
    candidates = [*directory.glob("step-*"), *directory.glob(f"{DISPLACED}step-*")]
    complete = [p for p in candidates if (p / POSITION).exists() and (p / STATE).exists()]
    return max(complete, key=lambda p: (p.name.removeprefix(DISPLACED), not p.name.startswith(DISPLACED)), default=None)


def load_checkpoint(path: Path, model: nn.Module) -> tuple[dict[str, Any], CheckpointState]:
    """Loads the weights into model; returns the training state (optimizer, scheduler, scaler, rng) and the run's
    position. JobFailure(CHECKPOINT_INCOMPATIBLE) before anything is loaded when this version cannot resume it."""
    state = CheckpointState.from_json((path / POSITION).read_text(), path.name)
    load_model(model, str(path / WEIGHTS))
    training: dict[str, Any] = torch.load(path / STATE, weights_only=True)
    return training, state


def save_best(model: nn.Module, directory: Path, step: int, metric: str, value: float) -> None:
    """Replaces `best/` with the current weights."""
    temporary = _fresh(directory / f".best.{os.getpid()}.tmp")
    try:
        check_disk_write(temporary / WEIGHTS)
        save_model(model, str(temporary / WEIGHTS))
        (temporary / POSITION).write_text(json.dumps({"step": step, metric: value}))
        _replace_atomically(temporary, directory / "best")
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def restore_best(model: nn.Module, directory: Path) -> int | None:
    """Loads `best/` into the model; returns its step, or None when there is no best checkpoint."""
    best = directory / "best"
    if not (best / WEIGHTS).exists():
        return None
    load_model(model, str(best / WEIGHTS))
    return int(json.loads((best / POSITION).read_text())["step"])


def write_json_atomically(path: Path, value: object) -> None:
    """A small JSON file beside the checkpoints (memory plan, automatic choices), replaced atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value))
    temporary.replace(path)
