"""Plain records of sweeps and their trials, as the store keeps them. No protobuf, no SQL, no Optuna."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from tuneforge.server.records import DEFAULT_TENANT


class SweepState(StrEnum):
    """Where a sweep is in its life (values match the API's names)."""

    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


SWEEP_TERMINAL = frozenset({SweepState.SUCCEEDED, SweepState.FAILED, SweepState.CANCELLED})


class TrialState(StrEnum):
    """Where a trial is in its life (values match the API's names)."""

    RUNNING = "RUNNING"
    COMPLETE = "COMPLETE"
    PRUNED = "PRUNED"
    FAILED = "FAILED"


@dataclass(frozen=True)
class TrialRecord:
    """One point of the search and what became of it. `reports` are (evaluation index, objective value) pairs: with
    `params` they are all a restarted server needs to rebuild the study."""

    number: int
    job_id: str
    params: dict[str, Any]
    state: TrialState = TrialState.RUNNING
    value: float | None = None
    reports: list[tuple[int, float]] = field(default_factory=list)
    pruning: bool = False
    """The pruner stopped it; its job is being cancelled."""
    error_reason: str = ""
    error_message: str = ""


@dataclass(frozen=True)
class SweepRecord:
    """Everything the server knows about a sweep."""

    id: str
    display_name: str
    spec: bytes
    """The SweepSpec as the client sent it (serialized protobuf)."""
    state: SweepState
    create_time: float
    update_time: float
    end_time: float | None = None
    trials: list[TrialRecord] = field(default_factory=list)
    best_trial: int | None = None
    worker_seconds: float = 0.0
    """Worker time of the trials that ended."""
    error_reason: str = ""
    error_message: str = ""
    last_event_sequence: int = 0
    order: int = 0
    tenant: str = DEFAULT_TENANT
    """Who owns the sweep (and its trials' jobs)."""
    driver: str = ""
    """The replica driving the sweep (empty without replicas): only it starts trials and applies their outcomes."""
    driver_heartbeat: float = 0.0
    """When the driver last renewed its lease (wall clock); a lease older than the lease timeout may be taken."""
