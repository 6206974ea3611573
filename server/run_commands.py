"""A queued job's next attempt as the worker's RunJob: the spec stored when the job was accepted (so a restart with
other model roots or defaults changes nothing for it), its tenant's data files, its remaining max_runtime and its
folders; or why it cannot run (a file deleted meanwhile, max_runtime used up, no room on disk)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from tuneforge.server.auth.access import UNLIMITED, QuotaLookup
from tuneforge.server.db import StoreRunner
from tuneforge.server.errors import is_disk_full
from tuneforge.server.records import JobRecord
from tuneforge.server.spec_validation import validate_spec
from tuneforge.server.storage import AttemptPlaces, Storage
from tuneforge.server.store.base import JobStore
from tuneforge.v1 import job_spec_pb2
from tuneforge.workers.messages import DataFile, RunJob
from tuneforge.workers.spec import TrainingSpec
from tuneforge.workers.spec_json import spec_from_json


@dataclass(frozen=True)
class CannotRun:
    """Why the attempt cannot start: the job fails with this reason and message."""

    reason: str
    message: str


class RunCommands:
    """Builds attempts' commands."""

    def __init__(
        self, store: JobStore, db: StoreRunner, storage: Storage, model_roots: list[Path], quotas: QuotaLookup
    ):
        self._store, self._db, self._storage = store, db, storage
        self._model_roots, self._quotas = model_roots, quotas

    async def build(self, record: JobRecord) -> RunJob | CannotRun:
        spec_proto = job_spec_pb2.JobSpec.FromString(record.spec)
        spec, problem = await self._accepted_spec(record, spec_proto)
        files: dict[str, DataFile] = {}
        for resource in filter(None, [spec_proto.data.training_file, spec_proto.data.validation_file]):
            file = await self._db.call(self._store.get_file, resource.removeprefix("files/"))
            if file is None or file.tenant != record.tenant:  # another tenant's file is as good as missing
                problem = problem or f"{resource} was deleted before the job started"
            else:
                files[resource] = DataFile(self._storage.file_location(file.id), file.filename)
        reason = "INVALID_INPUT"
        time_limit_s = 0.0
        if spec is not None and spec.max_runtime_s:
            time_limit_s = spec.max_runtime_s - record.run_seconds
            if time_limit_s <= 0 and not problem:
                reason, problem = "DEADLINE_EXCEEDED", f"max_runtime of {spec.max_runtime_s:g} s is used up"
        folders: AttemptPlaces | None = None
        if not problem and spec is not None:
            try:
                folders = await asyncio.to_thread(self._storage.prepare_attempt, record.id, record.attempt)
            except OSError as exc:  # a full disk must fail the job, not the scheduler
                reason = "DISK_FULL" if is_disk_full(exc) else "INTERNAL"
                problem = f"could not create the job's folders on the server: {exc}"
        if problem or spec is None or folders is None:
            return CannotRun(reason, problem)
        return RunJob(
            job=record.id,
            attempt=record.attempt,
            spec=spec,
            training_data=files[spec.data.training_file],
            validation_data=files.get(spec.data.validation_file or ""),
            work_dir=folders.work_dir,
            checkpoint_dir=folders.checkpoint_dir,
            artifact_path=folders.artifact,
            time_limit_s=time_limit_s,
            max_unpacked_bytes=self._unpack_cap(record.tenant),
        )

    async def _accepted_spec(
        self, record: JobRecord, spec_proto: job_spec_pb2.JobSpec
    ) -> tuple[TrainingSpec | None, str]:
        """The job's resolved spec as stored at creation; a job stored before specs were kept is validated now, as
        it used to be."""
        if record.resolved_spec:
            return spec_from_json(record.resolved_spec), ""
        result = await asyncio.to_thread(validate_spec, spec_proto, self._model_roots)  # reads model folders
        return result.spec, "; ".join(f"{v.field}: {v.description}" for v in result.violations)

    def _unpack_cap(self, tenant: str) -> int:
        """What the job's archives may unpack to: its tenant's storage quota (0: the worker's own cap)."""
        quota = self._quotas(tenant).max_stored_bytes
        return quota if quota < UNLIMITED else 0
