"""Which GPUs each local worker sees: the machine's GPUs split evenly among the workers, so that worker i trains on
its own GPUs (and a data-parallel job's ranks on its own set) instead of every worker landing on GPU 0."""

from __future__ import annotations

import os

AUTO = -1


def visible_gpus() -> list[str]:
    """The GPUs this server may hand out: its own CUDA_VISIBLE_DEVICES if set, else every GPU NVML sees."""
    declared = os.environ.get("CUDA_VISIBLE_DEVICES")
    if declared is not None:
        return [d.strip() for d in declared.split(",") if d.strip()]
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no GPU: workers run on the CPU
        return []


def partition(workers: int, gpus_per_worker: int, gpus: list[str]) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES for each worker, or None when every worker sees every GPU. AUTO gives each worker an
    equal share when there are at least as many GPUs as workers; 0 turns partitioning off."""
    if gpus_per_worker == 0 or not gpus or workers <= 0:
        return None
    if gpus_per_worker == AUTO:
        if len(gpus) < workers:
            return None  # fewer GPUs than workers: they share (set --gpus-per-worker to decide otherwise)
        gpus_per_worker = len(gpus) // workers
    if gpus_per_worker * workers > len(gpus):
        raise ValueError(f"{workers} workers x {gpus_per_worker} GPUs need more than the {len(gpus)} GPUs visible")
    return [",".join(gpus[i * gpus_per_worker : (i + 1) * gpus_per_worker]) for i in range(workers)]
