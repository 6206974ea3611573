"""The helper ranks of a data-parallel job: the worker process is rank 0 and spawns ranks 1..k-1 beside it.

Helpers train silently (rank 0 reports, evaluates and writes). A helper that dies takes the attempt with it: rank 0
cannot finish the step without it, so the worker exits and the server resumes the job from its checkpoint, as it
does for any lost worker.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import traceback
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path

from tuneforge.workers.core.distributed import Ranks, free_port
from tuneforge.workers.messages import RunJob

log = logging.getLogger(__name__)

HELPER_EXIT_GRACE_S = 30.0


class RankGroup:
    """Spawned helper ranks of one attempt, watched for unexpected deaths."""

    def __init__(
        self,
        job: RunJob,
        device: str,
        world_size: int,
        threads: int,
        on_death: Callable[[str], None],
        threads_before: int,
    ):
        """`threads` per rank; `threads_before` is what rank 0 goes back to after the attempt."""
        self.threads_before = threads_before
        port = free_port()
        self.ranks = Ranks(0, world_size, "127.0.0.1", port)
        context = multiprocessing.get_context("spawn")  # never fork a process holding CUDA or gRPC state
        self._processes: list[BaseProcess] = []
        for rank in range(1, world_size):
            helper_job = dataclasses.replace(job, work_dir=str(Path(job.work_dir) / f"rank-{rank}"))
            process = context.Process(
                target=run_helper,
                args=(helper_job, dataclasses.replace(self.ranks, rank=rank), device, threads),
                name=f"tuneforge-rank-{rank}",
                daemon=True,
            )
            process.start()
            self._processes.append(process)
        self._closing = threading.Event()
        self._on_death = on_death
        self._watcher = threading.Thread(target=self._watch, name="rank-watcher", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        sentinels = {process.sentinel: process for process in self._processes}
        while sentinels and not self._closing.is_set():
            ready = multiprocessing.connection.wait(list(sentinels), timeout=1.0)
            for sentinel in ready:
                process = sentinels.pop(int(sentinel))  # type: ignore[arg-type]
                process.join()
                if process.exitcode != 0 and not self._closing.is_set():
                    self._on_death(f"{process.name} exited with code {process.exitcode} during the step")
                    return

    def lost_a_helper(self, timeout_s: float = 5.0) -> bool:
        """Whether a helper ended (waiting up to timeout_s for one to). Rank 0's collective fails with a transport
        error the moment its peer dies, often before the watcher has seen the death: the watcher is given the time
        to report it (with the helper's exit code) and end the worker. A helper never ends before rank 0 has
        finished, so an ended helper means the attempt is lost."""
        if not multiprocessing.connection.wait([p.sentinel for p in self._processes], timeout=timeout_s):
            return False
        self._watcher.join(timeout_s)  # normally it never returns: the watcher ends the process
        return True

    def report_loss(self) -> None:
        """The attempt is lost with its helper (the watcher did not get to say so)."""
        self._on_death("a helper rank ended during the step")

    def close(self, finished: bool) -> None:
        """Waits for the helpers after a finished run; ends them at once otherwise (they wait on rank 0)."""
        self._closing.set()
        for process in self._processes:
            process.join(HELPER_EXIT_GRACE_S if finished else 0.5)
            if process.is_alive():
                process.kill()
                process.join(5)
        self._watcher.join(5)


def _die_with_parent() -> None:
    """Linux: the kernel kills this helper when its worker dies, even by SIGKILL (no collective waits for it)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


PR_SET_PDEATHSIG = 1


def run_helper(job: RunJob, ranks: Ranks, device_name: str, threads: int) -> None:
    """Entry point of a helper rank: trains in step with rank 0, says nothing to the server."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as comm:
        comm.write(f"tf-rank-{ranks.rank}")  # operators (and tests) see what the process is
    _die_with_parent()
    import torch

    from tuneforge.workers.core.device import configure_torch
    from tuneforge.workers.core.distributed import join, leave, rank_device
    from tuneforge.workers.core.errors import JobFailure, TrainingCancelled
    from tuneforge.workers.core.reporting import Reporter
    from tuneforge.workers.core.runner import train_rank
    from tuneforge.workers.tasks.runtime import import_every_runtime

    import_every_runtime()
    configure_torch(threads)
    device = rank_device(torch.device(device_name), ranks.rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    Path(job.work_dir).mkdir(parents=True, exist_ok=True)
    reporter = Reporter(lambda event: None, f"rank-{ranks.rank}", job.job, job.attempt, threading.Event())
    try:
        join(ranks, device)
        train_rank(job, device, reporter, ranks)
    except (JobFailure, TrainingCancelled):
        pass  # rank 0 meets the same end and reports it
    except Exception:
        traceback.print_exc()
        raise SystemExit(1) from None
    finally:
        leave()
