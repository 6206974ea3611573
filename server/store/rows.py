"""Records <-> table rows, shared by every SQL store: the columns queried directly, the rest as a JSON body."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import Any

from tuneforge.server.job_states import JobState
from tuneforge.server.records import EventRecord, FileRecord, JobRecord
from tuneforge.server.sweep_records import SweepRecord, SweepState, TrialRecord, TrialState

Row = Mapping[str, Any]


# Job columns queried directly; everything else of a JobRecord lives in the JSON `body`.
_COLUMNS = {"id", "state", "priority", "spec", "order", "tenant"}


def job_body(record: JobRecord) -> str:
    return json.dumps({k: v for k, v in asdict(record).items() if k not in _COLUMNS})


def job_from_row(row: Row) -> JobRecord:
    body: dict[str, Any] = json.loads(row["body"])
    known = {f.name for f in fields(JobRecord)}
    return JobRecord(
        id=row["id"],
        state=JobState(row["state"]),
        priority=row["priority"],
        spec=bytes(row["spec"]),
        order=row["ord"],
        tenant=row["tenant"],
        **{k: v for k, v in body.items() if k in known},
    )


def file_from_row(row: Row) -> FileRecord:
    return FileRecord(
        row["id"], row["filename"], row["purpose"], row["size_bytes"], row["sha256"], row["create_time"], row["tenant"]
    )


def event_from_row(row: Row) -> EventRecord:
    return EventRecord(row["job_id"], row["sequence"], row["time"], row["attempt"], row["kind"], bytes(row["payload"]))


_SWEEP_COLUMNS = {"id", "state", "spec", "order", "tenant"}


def sweep_body(record: SweepRecord) -> str:
    return json.dumps({k: v for k, v in asdict(record).items() if k not in _SWEEP_COLUMNS})


def sweep_from_row(row: Row) -> SweepRecord:
    body: dict[str, Any] = json.loads(row["body"])
    trials = [
        TrialRecord(**{**t, "state": TrialState(t["state"]), "reports": [(int(i), float(v)) for i, v in t["reports"]]})
        for t in body.pop("trials", [])
    ]
    known = {f.name for f in fields(SweepRecord)}
    return SweepRecord(
        id=row["id"],
        state=SweepState(row["state"]),
        spec=bytes(row["spec"]),
        order=row["ord"],
        tenant=row["tenant"],
        trials=trials,
        **{k: v for k, v in body.items() if k in known},
    )


def cursor_of(before_order: int | None) -> int:
    """A page's position: rows before this insertion order (the first page: before every row)."""
    return before_order if before_order is not None else 2**62


def owned(query: str, params: list[Any], tenant: str | None) -> tuple[str, list[Any]]:
    """Adds `AND tenant = ?` unless tenant is None (an admin's view of every tenant)."""
    if tenant is None:
        return query, params
    return query + " AND tenant = ?", [*params, tenant]
