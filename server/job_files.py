"""Which files a job may read: only its own tenant's. Checked where every job is made (the API, each sweep trial)
and once more before each attempt starts, so no path can train one tenant's job on another tenant's data."""

from __future__ import annotations

from tuneforge.server.db import StoreRunner
from tuneforge.server.errors import FieldViolation
from tuneforge.server.store.base import JobStore
from tuneforge.v1 import job_spec_pb2, sweeps_pb2

FILE_FIELDS = ("data.training_file", "data.validation_file")
"""JobSpec fields that name a stored file."""


def _file_names(spec: job_spec_pb2.JobSpec) -> dict[str, str]:
    """The spec's file fields that name a stored file, by field path."""
    values = {"data.training_file": spec.data.training_file, "data.validation_file": spec.data.validation_file}
    return {path: name for path, name in values.items() if name.startswith("files/")}


async def missing_files(
    store: JobStore, db: StoreRunner, spec: job_spec_pb2.JobSpec, prefix: str, tenant: str
) -> list[FieldViolation]:
    """The spec's data files that do not exist for this tenant (another tenant's file is as good as missing), as
    field violations under prefix."""
    problems = []
    for path, name in _file_names(spec).items():
        if not await _owns_file(store, db, name, tenant):
            problems.append(FieldViolation(f"{prefix}.{path}", f"{name} does not exist"))
    return problems


async def missing_file_choices(
    store: JobStore, db: StoreRunner, spec: sweeps_pb2.SweepSpec, tenant: str
) -> list[FieldViolation]:
    """A sweep whose parameters choose among data files may only choose the tenant's own."""
    problems = []
    for index, parameter in enumerate(spec.parameters):
        if parameter.field not in FILE_FIELDS:
            continue
        for position, value in enumerate(parameter.categorical.values):
            name = value.string_value
            if name.startswith("files/") and not await _owns_file(store, db, name, tenant):
                where = f"sweep.spec.parameters[{index}].categorical.values[{position}]"
                problems.append(FieldViolation(where, f"{name} does not exist"))
    return problems


async def _owns_file(store: JobStore, db: StoreRunner, name: str, tenant: str) -> bool:
    record = await db.call(store.get_file, name.removeprefix("files/"))
    return record is not None and record.tenant == tenant
