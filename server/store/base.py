"""The job store interface, implemented by SQLite (the default) and PostgreSQL (for replicas), so callers never
know which one they talk to.

Every mutation of a job is a pure function (JobRecord -> JobChange) applied inside one write transaction, so the
state machine lives in Python and the store only guarantees atomicity and gap-free event sequences.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from tuneforge.server.job_states import JobState
from tuneforge.server.records import EventRecord, FileRecord, JobChange, JobRecord, NewEvent
from tuneforge.server.sweep_records import SweepRecord, SweepState

ChangeFn = Callable[[JobRecord], JobChange | None]
"""Returns the changed job with its events, or None to leave it as it is."""
SweepChangeFn = Callable[[SweepRecord], tuple[SweepRecord, list[NewEvent]] | None]
"""The same for a sweep."""


class QuotaExceeded(Exception):
    """A create would pass the tenant's quota; checked in the same transaction as the write it guards."""

    def __init__(self, quota: str, used: int, limit: int):
        super().__init__(f"{quota}: {used} used, limit {limit}")
        self.quota, self.used, self.limit = quota, used, limit


@dataclass(frozen=True)
class QueueHead:
    """A tenant's next claimable job."""

    tenant: str
    priority: int
    order: int
    job_id: str


class JobStore(Protocol):
    """Durable files, jobs and events."""

    def create_file(
        self, record: FileRecord, request_id: str | None, max_stored_bytes: int | None = None
    ) -> FileRecord:
        """Inserts a file; with a request_id already used, returns the first file instead. QuotaExceeded when the
        tenant's stored bytes would pass max_stored_bytes (checked in the insert's transaction)."""

    def get_file(self, file_id: str) -> FileRecord | None: ...

    def list_files(
        self, limit: int, before_order: int | None, tenant: str | None = None
    ) -> tuple[list[FileRecord], int | None]:
        """Newest first, one tenant's or (None) every tenant's; returns the page and the next page's cursor (None
        at the end)."""

    def delete_file(self, file_id: str) -> bool: ...

    def file_for_request(self, request_id: str) -> FileRecord | None: ...

    def create_job(
        self, record: JobRecord, events: Sequence[NewEvent], request_id: str | None, max_queued: int | None = None
    ) -> tuple[JobRecord, bool]:
        """Inserts a job with its first events; with a used request_id returns (first job, False). QuotaExceeded
        when the tenant would have more than max_queued QUEUED jobs (checked in the insert's transaction)."""

    def get_job(self, job_id: str) -> JobRecord | None: ...

    def list_jobs(
        self, states: Sequence[JobState], limit: int, before_order: int | None, tenant: str | None = None
    ) -> tuple[list[JobRecord], int | None]:
        """Newest first, optionally only in the given states and of one tenant."""

    def update_job(self, job_id: str, change: ChangeFn) -> tuple[JobRecord, list[EventRecord]] | None:
        """Applies change atomically; None when the job does not exist."""

    def claim_next_job(self, change: ChangeFn, tenant: str | None = None) -> tuple[JobRecord, list[EventRecord]] | None:
        """Applies change to the first QUEUED job (highest priority, then oldest; of one tenant unless None) whose
        `not_before` has passed; None when none waits."""

    def queue_heads(self) -> list[QueueHead]:
        """Each tenant's next claimable job."""

    def count_jobs(self, tenant: str, states: Sequence[JobState]) -> int: ...

    def active_jobs_by_tenant(self, states: Sequence[JobState]) -> dict[str, int]: ...

    def queue_position(self, record: JobRecord) -> int:
        """1 for the tenant's next queued job, 2 for the one after, and so on."""

    def stored_bytes(self, tenant: str) -> int:
        """Bytes of the tenant's files and artifacts."""

    def jobs_in_states(self, states: Sequence[JobState]) -> list[JobRecord]: ...

    def count_jobs_by_state(self) -> dict[JobState, int]:
        """How many jobs are in each state (states without jobs may be missing)."""

    def delete_job(self, job_id: str) -> bool: ...

    def create_sweep(
        self, record: SweepRecord, events: Sequence[NewEvent], request_id: str | None
    ) -> tuple[SweepRecord, bool]:
        """Inserts a sweep with its first events; with a used request_id returns (first sweep, False)."""

    def get_sweep(self, sweep_id: str) -> SweepRecord | None: ...

    def list_sweeps(
        self, limit: int, before_order: int | None, tenant: str | None = None
    ) -> tuple[list[SweepRecord], int | None]: ...

    def sweeps_in_states(self, states: Sequence[SweepState]) -> list[SweepRecord]: ...

    def update_sweep(self, sweep_id: str, change: SweepChangeFn) -> tuple[SweepRecord, list[EventRecord]] | None:
        """Applies change atomically; None when the sweep does not exist."""

    def list_events(self, job_id: str, after_sequence: int, limit: int) -> list[EventRecord]:
        """A job's or a sweep's events (ids never collide: `ft-...`, `sw-...`)."""

    def close(self) -> None: ...
