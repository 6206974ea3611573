"""Device choice and the per-device speed settings (TF32, bf16 autocast) in one place."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def select_device(preference: str) -> torch.device:
    """`auto` picks CUDA when present, else the CPU; anything else is taken as a torch device string."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def configure_torch(num_threads: int) -> None:
    """Process-wide settings: CPU thread count, and TF32 matmuls on CUDA (free speed on Ampere and later)."""
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


@contextlib.contextmanager
def autocast(device: torch.device) -> Iterator[None]:
    """bf16 autocast on CUDA (no loss scaling needed); full precision on the CPU."""
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield
