"""Fault injection for tests: makes a worker run out of memory or die where nothing real would.

Read once per process from the `TUNEFORGE_TEST_FAULTS` environment variable (JSON). Unset in production, where every
check here is a cheap no-op.
"""

from __future__ import annotations

import errno
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

ENVIRONMENT_VARIABLE = "TUNEFORGE_TEST_FAULTS"
POISON_EXIT_CODE = 70


@dataclass(frozen=True)
class InjectedFaults:
    """What to break."""

    oom_above_micro_batch: int = -1
    """Raise out-of-memory for every micro-batch larger than this (0: always; -1: never)."""
    non_finite_loss_at_steps: tuple[int, ...] = ()
    """Optimizer steps (from 1) whose loss is made NaN."""
    non_finite_only_for_training_file: str = ""
    """If set, only jobs whose training file has this name get the NaN losses."""
    exit_when_training_file: str = ""
    """Kill the worker process when it starts a job whose training file has this name (a poison job)."""
    raise_when_training_file: str = ""
    """Raise an unexpected error (a bug, its message naming a server path) when a job with this file starts."""
    disk_full_for_training_file: str = ""
    """Every checkpoint of a job with this training file fails as a full disk does (ENOSPC), without needing a
    small file system to fill."""
    oom_at_micro_batches: tuple[int, ...] = ()
    """Training micro-batches (counted from 1 in this process) that run out of memory, once each: a later
    micro-batch of an accumulation step fails after the earlier ones' gradients were added up."""


@functools.cache
def injected_faults() -> InjectedFaults:
    text = os.environ.get(ENVIRONMENT_VARIABLE, "")
    if not text:
        return InjectedFaults()
    values = json.loads(text)
    values["non_finite_loss_at_steps"] = tuple(values.get("non_finite_loss_at_steps", ()))
    values["oom_at_micro_batches"] = tuple(values.get("oom_at_micro_batches", ()))
    return InjectedFaults(**values)


_micro_batches_seen = 0


def check_micro_batch(samples: int) -> None:
    global _micro_batches_seen
    faults = injected_faults()
    limit = faults.oom_above_micro_batch
    if limit >= 0 and samples > limit:
        raise torch.OutOfMemoryError(f"injected: a micro-batch of {samples} does not fit (limit {limit})")
    if faults.oom_at_micro_batches:
        _micro_batches_seen += 1
        if _micro_batches_seen in faults.oom_at_micro_batches:
            raise torch.OutOfMemoryError(f"injected: micro-batch {_micro_batches_seen} ran out of memory")


_current_training_file = ""


def corrupt_loss(step: int, loss: torch.Tensor) -> torch.Tensor:
    """The loss of optimizer step `step` (from 1), made NaN if the test asked for it."""
    faults = injected_faults()
    only = faults.non_finite_only_for_training_file
    if step in faults.non_finite_loss_at_steps and (not only or only == _current_training_file):
        return loss * float("nan")
    return loss


def check_job_start(training_filename: str) -> None:
    """A job starts on this worker: a poison job kills the process here."""
    global _current_training_file
    _current_training_file = training_filename
    poison = injected_faults().exit_when_training_file
    if poison and training_filename == poison:
        os._exit(POISON_EXIT_CODE)
    bug = injected_faults().raise_when_training_file
    if bug and training_filename == bug:
        raise IndexError(f"injected: list index out of range in {os.path.abspath(__file__)}")


def check_disk_write(what: Path) -> None:
    """About to write `what`: a job whose training file the test named finds the disk full."""
    full = injected_faults().disk_full_for_training_file
    if full and _current_training_file == full:
        raise OSError(errno.ENOSPC, "No space left on device (injected)", str(what))
