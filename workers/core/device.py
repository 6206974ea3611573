"""Device choice and the per-device speed and precision settings (TF32, bf16/fp16 autocast) in one place."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from workers.core.errors import JobFailure
from workers.spec import Precision


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


def autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision on a device; None runs in full precision."""
    match precision:
        case Precision.AUTO:
            return torch.bfloat16 if device.type == "cuda" else None
        case Precision.FP32:
            return None
        case Precision.BF16:
            return torch.bfloat16
        case Precision.FP16:
            if device.type != "cuda":
                raise JobFailure("INVALID_SPEC", "hyperparameters.precision FP16 needs a CUDA worker; use BF16 or AUTO")
            return torch.float16
    raise ValueError(f"unknown precision {precision}")


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Mixed precision where asked for; full precision otherwise."""
    if dtype is None:
        yield
    else:
        with torch.autocast(device.type, dtype=dtype):
            yield
