"""Gauges computed when Prometheus scrapes: jobs by state, the pool, storage and the GPUs.

Values that describe the present are read at scrape time from their owners (the store, the scheduler, the disk),
never kept as running totals that could drift from the truth. Collectors run on the exposition server's threads.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tuneforge.server.job_states import JobState
from tuneforge.server.metrics.gpus import GpuSampler

log = logging.getLogger(__name__)
WORKER_STATES = ("starting", "idle", "busy")


@dataclass(frozen=True)
class WorkerView:
    """One worker slot as the scheduler sees it."""

    worker: str
    state: str
    last_heard_time: float
    """Unix time of the worker's last message (heartbeat or any event)."""
    device: str = ""
    gpu_uuid: str = ""
    gpu_name: str = ""


class JobsCollector(Collector):
    """`tuneforge_jobs{state}`: current jobs in each state, counted by the store."""

    def __init__(self, count_by_state: Callable[[], dict[JobState, int]]):
        self._count = count_by_state

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield self._family()

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily("tuneforge_jobs", "Jobs currently in each state.", labels=["state"])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = self._family()
        try:
            counts = self._count()
        except Exception:  # a scrape must not fail because the store is busy; the gap shows on the dashboard
            log.exception("could not count jobs for /metrics")
            return
        for state in JobState:
            family.add_metric([state.value.lower()], counts.get(state, 0))
        yield family


class PoolCollector(Collector):
    """Workers by state, each worker's last message, and its GPU (info, memory, utilisation) where it has one."""

    def __init__(self, workers: Callable[[], list[WorkerView]], gpus: GpuSampler | None = None):
        self._workers = workers
        self._gpus = gpus

    def describe(self) -> Iterator[GaugeMetricFamily]:
        """The families without reading the pool or NVML (the registry asks once, at registration)."""
        yield from self._families([])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families(self._workers())

    def _families(self, views: list[WorkerView]) -> Iterator[GaugeMetricFamily]:
        by_state = GaugeMetricFamily("tuneforge_workers", "Worker processes in each state.", labels=["state"])
        for state in WORKER_STATES:
            by_state.add_metric([state], sum(1 for view in views if view.state == state))
        yield by_state
        heard = GaugeMetricFamily(
            "tuneforge_worker_last_heartbeat_timestamp_seconds",
            "When each worker last reported (Unix time); a busy worker reports at least every heartbeat interval.",
            labels=["worker"],
        )
        for view in views:
            heard.add_metric([view.worker], view.last_heard_time)
        yield heard
        yield from self._gpu_families(views)

    def _gpu_families(self, views: list[WorkerView]) -> Iterator[GaugeMetricFamily]:
        info = GaugeMetricFamily(
            "tuneforge_worker_gpu_info",
            "Always 1: the GPU each worker trains on (join DCGM exporter series on gpu_uuid).",
            labels=["worker", "gpu_uuid", "gpu_name"],
        )
        used = GaugeMetricFamily("tuneforge_gpu_memory_used_bytes", "GPU memory in use.", labels=["worker"])
        total = GaugeMetricFamily("tuneforge_gpu_memory_total_bytes", "GPU memory installed.", labels=["worker"])
        busy = GaugeMetricFamily(
            "tuneforge_gpu_utilization_ratio", "Fraction of the last sample period the GPU was busy.", labels=["worker"]
        )
        for view in views:
            if not view.gpu_uuid:
                continue
            info.add_metric([view.worker, view.gpu_uuid, view.gpu_name], 1)
            sample = self._gpus.sample(view.gpu_uuid) if self._gpus is not None else None
            if sample is not None:
                used.add_metric([view.worker], sample.memory_used_bytes)
                total.add_metric([view.worker], sample.memory_total_bytes)
                busy.add_metric([view.worker], sample.utilization_ratio)
        yield from (info, used, total, busy)


class StorageCollector(Collector):
    """Bytes under the data dir by kind, and the free space left on its filesystem.

    Walking a big data dir takes time, so its sizes are kept for `reuse_factor` times as long as the last walk took:
    a small dir is measured at every scrape, a huge one at most a tenth of the time. Free space is always live.
    """

    KINDS = ("files", "artifacts", "work")

    def __init__(self, data_dir: Path, reuse_factor: float = 10.0):
        self._data_dir = data_dir
        self._reuse_factor = reuse_factor
        self._lock = threading.Lock()
        self._sizes: dict[str, int] = {}
        self._measured = float("-inf")
        self._walk_s = 0.0

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families(measure=False)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families(measure=True)

    def _families(self, measure: bool) -> Iterator[GaugeMetricFamily]:
        stored = GaugeMetricFamily(
            "tuneforge_storage_bytes",
            "Bytes stored under the data dir: uploaded files, artifacts, and work (checkpoints, scratch).",
            labels=["kind"],
        )
        free = GaugeMetricFamily("tuneforge_data_dir_free_bytes", "Free space on the data dir's filesystem.")
        capacity = GaugeMetricFamily("tuneforge_data_dir_capacity_bytes", "Size of the data dir's filesystem.")
        if measure:
            for kind, size in self._kind_sizes().items():
                stored.add_metric([kind], size)
            usage = shutil.disk_usage(self._data_dir)
            free.add_metric([], usage.free)
            capacity.add_metric([], usage.total)
        yield from (stored, free, capacity)

    def _kind_sizes(self) -> dict[str, int]:
        with self._lock:
            began = time.monotonic()
            if began - self._measured > self._walk_s * self._reuse_factor:
                self._sizes = {kind: _tree_bytes(self._data_dir / kind) for kind in self.KINDS}
                self._measured = time.monotonic()
                self._walk_s = self._measured - began
            return dict(self._sizes)


def _tree_bytes(root: Path) -> int:
    total = 0
    for folder, _, names in os.walk(root):
        for name in names:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:  # removed while walking
                continue
    return total
