"""What the scheduler knows of each worker (its slot), and the questions asked of the pool as a whole: which
worker answers a Predict or export call, how many GPUs a worker has, what metrics show."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from tuneforge.server.metrics.snapshots import WorkerView
from tuneforge.workers.messages import WorkerReady


@dataclass
class WorkerSlot:
    """What the scheduler knows of one worker."""

    state: str = "starting"
    """starting, idle or busy."""
    device: str = ""
    job: str | None = None
    attempt: int = 0
    last_heard: float = field(default_factory=time.monotonic)
    """When the worker last sent anything (monotonic clock): the lease runs from here."""
    lease_expired: bool = False
    """The job was taken from this worker; whatever it still reports about it is ignored."""
    kill_at: float | None = None
    """Monotonic time at which a worker that has not let go of its job is killed."""
    killed: bool = False
    """The scheduler had the process killed: its death is no surprise."""
    dispatched_at: float = 0.0
    """Monotonic time the current job was sent (its start-up time runs from here)."""
    loop_started: bool = False
    """The current attempt reported that its training loop began."""
    gpu_uuid: str = ""
    gpu_name: str = ""
    gpus: int = 0
    host: str = ""

    def holds(self, job: str, attempt: int) -> bool:
        return (self.job, self.attempt) == (job, attempt)


class WorkerSlots:
    """Every worker's slot, by name."""

    def __init__(self, names: list[str] | None = None):
        self._slots: dict[str, WorkerSlot] = {name: WorkerSlot() for name in names or []}

    def reset(self, names: list[str]) -> None:
        """The pool (re)started: every worker is starting."""
        self._slots = {name: WorkerSlot() for name in names}

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._slots))

    def __len__(self) -> int:
        return len(self._slots)

    def get(self, worker: str) -> WorkerSlot | None:
        return self._slots.get(worker)

    def items(self) -> list[tuple[str, WorkerSlot]]:
        return list(dict(self._slots).items())  # a copy: metrics read it from another thread

    def ready(self, event: WorkerReady) -> bool:
        """A worker said it is ready: its slot is idle with what it has. True once no worker is still starting."""
        self._slots[event.worker] = _idle_as(event)
        return all(slot.state != "starting" for slot in self._slots.values())

    def restarting(self, worker: str) -> WorkerSlot:
        """A worker died and is being replaced: its slot starts over. Returns what it was."""
        before = self._slots.get(worker, WorkerSlot())
        self._slots[worker] = WorkerSlot()
        return before

    def freed(self, worker: str) -> None:
        """The worker's job ended: its bookkeeping goes, what the worker is (device, GPUs, host) stays."""
        self._slots[worker] = _idle_as(self._slots[worker])

    def idle(self) -> list[str]:
        return [name for name, slot in self.items() if slot.state == "idle"]

    def for_calls(self) -> str | None:
        """A ready worker for a Predict batch or an export: an idle one first (the same one each time, so the models
        it loaded get used), else a busy one (it answers on a side thread while it trains)."""
        ready = [(slot.state != "idle", name) for name, slot in self.items() if slot.state in ("idle", "busy")]
        return min(ready)[1] if ready else None

    def gpus_per_worker(self) -> int | None:
        """The most GPUs one worker has; None until every worker has said which device it has."""
        slots = [slot for _, slot in self.items()]
        if not slots or any(slot.state == "starting" for slot in slots):
            return None
        return max(slot.gpus for slot in slots)

    def views(self) -> list[WorkerView]:
        """The pool as it is now, for metrics (wall-clock times)."""
        wall_offset = time.time() - time.monotonic()
        return [
            WorkerView(name, slot.state, slot.last_heard + wall_offset, slot.device, slot.gpu_uuid, slot.gpu_name)
            for name, slot in sorted(self.items())
        ]


IDENTITY = ("device", "gpu_uuid", "gpu_name", "gpus", "host")
"""What a worker is, as its WorkerReady says and its slot keeps across jobs."""


def _idle_as(source: WorkerReady | WorkerSlot) -> WorkerSlot:
    """An idle slot for the worker `source` describes, with no job's bookkeeping."""
    return WorkerSlot(state="idle", **{name: getattr(source, name) for name in IDENTITY})
