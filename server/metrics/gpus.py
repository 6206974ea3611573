"""GPU memory and utilisation through NVML (`nvidia-ml-py`), looked up by the UUID each worker reports.

The server process samples NVML itself: it needs no CUDA context, and the numbers survive a worker's restart. On a
machine without NVIDIA's driver, NVML does not load and no GPU series are exported.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuSample:
    memory_used_bytes: int
    memory_total_bytes: int
    utilization_ratio: float


class GpuSampler:
    """Samples one GPU by UUID; NVML is initialised on first use and shut down by close()."""

    def __init__(self, nvml: ModuleType | Any | None = None):
        """`nvml` is the `pynvml` module (the default) or anything with its functions."""
        self._nvml = nvml
        self._lock = threading.Lock()
        self._state = "new"  # new, ready or unavailable

    def _ready(self) -> Any | None:
        with self._lock:
            if self._state == "new":
                try:
                    if self._nvml is None:
                        import pynvml

                        self._nvml = pynvml
                    self._nvml.nvmlInit()
                    self._state = "ready"
                except Exception as exc:  # no driver, no library: no GPU series, said once
                    log.info("NVML is not available (%s): no GPU metrics", exc)
                    self._state = "unavailable"
            return self._nvml if self._state == "ready" else None

    def sample(self, uuid: str) -> GpuSample | None:
        nvml = self._ready()
        if nvml is None:
            return None
        try:
            handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            rates = nvml.nvmlDeviceGetUtilizationRates(handle)
        except Exception as exc:  # the GPU went away or the UUID is unknown to this driver
            log.warning("NVML could not sample %s: %s", uuid, exc)
            return None
        return GpuSample(int(memory.used), int(memory.total), float(rates.gpu) / 100.0)

    def close(self) -> None:
        with self._lock:
            if self._state == "ready" and self._nvml is not None:
                try:
                    self._nvml.nvmlShutdown()
                except Exception as exc:
                    log.warning("NVML shutdown failed: %s", exc)
            self._state = "new"
