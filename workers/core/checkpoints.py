"""Checkpoints on disk: the newest one (weights and position) and the best one by the chosen metric."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_model, save_model
from torch import nn

WEIGHTS = "model.safetensors"


def _write_atomically(model: nn.Module, final: Path, state: dict[str, float | int]) -> int:
    temporary = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    save_model(model, str(temporary / WEIGHTS))
    (temporary / "trainer_state.json").write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    temporary.rename(final)
    return sum(f.stat().st_size for f in final.iterdir())


def save_checkpoint(model: nn.Module, directory: Path, step: int, epoch: int) -> tuple[Path, int]:
    """Writes `step-NNNNNN/` atomically and keeps only the newest such checkpoint."""
    final = directory / f"step-{step:06d}"
    size = _write_atomically(model, final, {"step": step, "epoch": epoch})
    for older in directory.glob("step-*"):
        if older != final:
            shutil.rmtree(older, ignore_errors=True)
    return final, size


def save_best(model: nn.Module, directory: Path, step: int, metric: str, value: float) -> None:
    """Replaces `best/` with the current weights."""
    _write_atomically(model, directory / "best", {"step": step, metric: value})


def restore_best(model: nn.Module, directory: Path) -> int | None:
    """Loads `best/` into the model; returns its step, or None when there is no best checkpoint."""
    best = directory / "best"
    if not (best / WEIGHTS).exists():
        return None
    load_model(model, str(best / WEIGHTS))
    return int(json.loads((best / "trainer_state.json").read_text())["step"])
