"""Plain records the store keeps: files, jobs and job events. No protobuf, no SQL."""

from __future__ import annotations

from dataclasses import dataclass, field

from tuneforge.server.job_states import JobState

DEFAULT_TENANT = "default"
"""The tenant of every caller when authentication is off, and of data stored before tenants existed."""


@dataclass(frozen=True)
class FileRecord:
    """An uploaded file's metadata (its bytes live in storage under the id)."""

    id: str
    filename: str
    purpose: str
    size_bytes: int
    sha256: str
    create_time: float
    tenant: str = DEFAULT_TENANT


@dataclass(frozen=True)
class JobRecord:
    """Everything the server knows about a job."""

    id: str
    display_name: str
    spec: bytes
    """The JobSpec as the client sent it (serialized protobuf)."""
    priority: int
    state: JobState
    create_time: float
    update_time: float
    start_time: float | None = None
    end_time: float | None = None
    attempt: int = 0
    worker: str | None = None
    heartbeat_time: float | None = None
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    total_epochs: int = 0
    latest_metrics: dict[str, float] = field(default_factory=dict)
    best_metrics: dict[str, float] = field(default_factory=dict)
    error_reason: str = ""
    error_message: str = ""
    artifact_size: int = 0
    artifact_sha256: str = ""
    artifact_metrics: dict[str, float] = field(default_factory=dict)
    restarts: int = 0
    """Attempts lost to a dead or hung worker so far (limited by max_restarts)."""
    not_before: float | None = None
    """A requeued job is not claimed before this time (restart back-off, so a poison job cannot hog the pool)."""
    run_seconds: float = 0.0
    """Time spent in ended attempts (max_runtime counts all of them)."""
    auto_choices: dict[str, float] = field(default_factory=dict)
    """Hyperparameters the job chose for itself."""
    queued_time: float | None = None
    """When the job last entered QUEUED (its queue wait runs from here)."""
    sweep_id: str = ""
    """The sweep that created this job as a trial; empty otherwise."""
    trial_number: int = 0
    last_event_sequence: int = 0
    order: int = 0
    """Insertion order (newest-first listing and FIFO within a priority)."""
    tenant: str = DEFAULT_TENANT
    """Who owns the job: only that tenant (and admins) can see or change it."""
    resolved_spec: str = ""
    """The TrainingSpec accepted at creation, every default filled (workers.spec_json): each attempt trains exactly
    this, whatever the server's model roots or defaults are by then. Empty for jobs stored before it existed."""


@dataclass(frozen=True)
class NewEvent:
    """An event to append; the store assigns the sequence number."""

    kind: str
    payload: bytes
    """The serialized event body (the store does not read it)."""
    attempt: int = 0


@dataclass(frozen=True)
class EventRecord:
    """A stored job event."""

    job_id: str
    sequence: int
    time: float
    attempt: int
    kind: str
    payload: bytes


@dataclass(frozen=True)
class JobChange:
    """The result of a pure change function: the new record and the events that describe the change."""

    record: JobRecord
    events: list[NewEvent] = field(default_factory=list)
