"""How much memory a job will need on its worker, estimated at creation from the spec alone (no torch here), so a
job that can never fit is refused with the estimate instead of taking a worker down with it.

The estimate is deliberately rough and errs low, so no job that fits is refused: the base model's weights (a
local folder's safetensors files; unknown for a hub id), the training state of the custom head (weights,
gradients and two Adam moments in fp32), and per data-parallel rank a copy of the weights plus the fixed cost of a
process that has imported the training stack.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path

from tuneforge.workers.spec import TrainingSpec

BYTES_PER_TRAINED_PARAMETER = 16
"""fp32 weight, gradient and Adam's two moments."""
RANK_PROCESS_BYTES = 768 << 20
"""A rank's own process with torch and transformers imported (measured at about 0.75 GiB on CPU)."""
DEFAULT_HIDDEN_SIZE = 768
"""The backbone's output width when its config cannot be read here (a hub id)."""
HEAD_OUTPUTS = 2
"""Classes a head is assumed to end in before the data is read (the fewest a classifier has: the estimate errs
low)."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a job needs, and what they are made of (for the error message)."""

    total_bytes: int
    parts: dict[str, int]

    def describe(self) -> str:
        return ", ".join(f"{name} {size / 2**30:.2f} GiB" for name, size in self.parts.items() if size)

    def refusal(self, limit_bytes: int) -> str:
        """Why a job this size is refused (the API's NEVER_FITS and a sweep trial's failure say the same)."""
        return (
            f"the job needs about {self.total_bytes / 2**30:.1f} GiB ({self.describe()}) but a worker of this server "
            f"can give one job {limit_bytes / 2**30:.1f} GiB; use fewer ranks or a smaller head"
        )


def physical_memory_bytes() -> int:
    """This machine's memory (0 where the system does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def _local_config(base_model: str) -> tuple[dict[str, object], int]:
    """A local model folder's config and the size of its weights; ({}, 0) for a hub id."""
    folder = Path(base_model)
    if not folder.is_absolute() or not (folder / "config.json").is_file():
        return {}, 0
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}, 0
    weights = sum(path.stat().st_size for path in folder.glob("*.safetensors"))
    return (config if isinstance(config, dict) else {}), weights


def _hidden_size(config: dict[str, object]) -> int:
    for key in ("hidden_size", "d_model", "dim"):
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    sizes = config.get("hidden_sizes")
    if isinstance(sizes, list) and sizes and isinstance(sizes[-1], int):
        return sizes[-1]
    return DEFAULT_HIDDEN_SIZE


def estimate_job_memory(spec: TrainingSpec) -> MemoryEstimate:
    config, weights = _local_config(spec.base_model)
    head_parameters = 0
    if spec.head is not None and spec.head.hidden_sizes:
        widths = [_hidden_size(config), *spec.head.hidden_sizes, HEAD_OUTPUTS]
        head_parameters = sum(a * b for a, b in itertools.pairwise(widths))
    ranks = max(1, spec.ranks)
    parts = {
        "base model weights per rank": weights,
        "custom head training state per rank": head_parameters * BYTES_PER_TRAINED_PARAMETER,
        "processes of the extra ranks": (ranks - 1) * RANK_PROCESS_BYTES,
    }
    per_rank = parts["base model weights per rank"] + parts["custom head training state per rank"]
    return MemoryEstimate(per_rank * ranks + parts["processes of the extra ranks"], parts)


def memory_problem(spec: TrainingSpec, limit_bytes: int) -> tuple[MemoryEstimate, int] | None:
    """(estimate, limit) when the job cannot fit a worker; None when it can or nothing is enforced."""
    if not limit_bytes:
        return None
    estimate = estimate_job_memory(spec)
    return (estimate, limit_bytes) if estimate.total_bytes > limit_bytes else None
