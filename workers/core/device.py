"""Device choice and the per-device speed and precision settings (TF32, bf16/fp16 autocast) in one place."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from tuneforge.workers.core.errors import JobFailure
from tuneforge.workers.spec import Precision


def select_device(preference: str) -> torch.device:
    """`auto` picks CUDA when present, else the CPU; anything else is taken as a torch device string."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def gpu_identity(device: torch.device) -> tuple[str, str]:
    """The GPU's NVML UUID (`GPU-...`, as DCGM and nvidia-smi show it) and its name; empty strings on the CPU."""
    if device.type != "cuda":
        return "", ""
    properties = torch.cuda.get_device_properties(device)
    return f"GPU-{properties.uuid}", str(properties.name)


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


def wants_channels_last(model: nn.Module, device: torch.device) -> bool:
    """Convolutional nets (ResNet, ConvNeXt, EfficientNet...) train channels-last (NHWC) on CUDA, cuDNN's native
    layout under mixed precision, as PyTorch's performance guide recommends. A single convolution (a ViT's patch
    embedding) does not count."""
    return device.type == "cuda" and sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1


def to_channels_last(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Image batches (4-d floating-point tensors) in channels-last layout; everything else as it is."""
    return {
        key: value.contiguous(memory_format=torch.channels_last)
        if value.dim() == 4 and value.is_floating_point()
        else value
        for key, value in batch.items()
    }


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Mixed precision where asked for; full precision otherwise."""
    if dtype is None:
        yield
    else:
        with torch.autocast(device.type, dtype=dtype):
            yield
