"""Leases, as pure functions of the clock: a worker that sends nothing for a lease loses its job, and one that does
not let go after a cancel, a pause or a lost lease is killed. With replicas, a job held by another replica's worker
that has gone a lease without a report is taken over."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tuneforge.server.records import JobRecord
from tuneforge.server.worker_slots import WorkerSlot


@dataclass(frozen=True)
class LeaseAction:
    """What to do about one worker now."""

    worker: str
    kill: bool
    """True: it was told to let go and the grace ran out; False: its lease expired (silent for `silent_s`)."""
    silent_s: float = 0.0


def due(slots: Iterable[tuple[str, WorkerSlot]], now: float, lease_timeout_s: float) -> list[LeaseAction]:
    """The kills and lease expiries due at monotonic time `now` (a worker is killed or expired, never both)."""
    actions = []
    for worker, slot in slots:
        if slot.job is None:
            continue
        if slot.kill_at is not None and now >= slot.kill_at:
            actions.append(LeaseAction(worker, kill=True))
        elif not slot.lease_expired and now - slot.last_heard > lease_timeout_s:
            actions.append(LeaseAction(worker, kill=False, silent_s=now - slot.last_heard))
    return actions


def taken_over(
    records: Iterable[JobRecord], now: float, lease_timeout_s: float, owns: Callable[[str], bool]
) -> list[tuple[JobRecord, float]]:
    """Replicas: the active jobs held by another replica's worker that has not reported for a lease (wall clock),
    with how long it has been silent."""
    silent = []
    for record in records:
        if record.worker is None or owns(record.worker):
            continue
        heard = record.heartbeat_time or record.start_time or 0.0
        if heard < now - lease_timeout_s:
            silent.append((record, now - heard))
    return silent
