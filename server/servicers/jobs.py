"""JobService: create (idempotent), get, list, cancel, pause, resume, delete, watch (resumable), events, artifact
download."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeAlias

from google.protobuf import empty_pb2

from tuneforge.server import convert
from tuneforge.server.auth.access import UNLIMITED, QuotaLookup, no_quotas
from tuneforge.server.auth.caller import current_caller
from tuneforge.server.db import StoreRunner
from tuneforge.server.errors import FieldViolation, failed_precondition, invalid_argument, quota_exceeded
from tuneforge.server.event_hub import EventHub
from tuneforge.server.exports import Exports
from tuneforge.server.generate_inputs import check_generate_request
from tuneforge.server.generations import Generations
from tuneforge.server.job_factory import JobFactory
from tuneforge.server.job_files import missing_files
from tuneforge.server.job_states import TERMINAL, JobState
from tuneforge.server.memory_estimate import memory_problem
from tuneforge.server.model_exports import check_export_request, model_export
from tuneforge.server.names import parse_name
from tuneforge.server.pagination import fit_page, make_token, parse_page
from tuneforge.server.predict_inputs import check_predict_inputs
from tuneforge.server.predictions import Predictions
from tuneforge.server.records import JobRecord
from tuneforge.server.scheduler import Scheduler
from tuneforge.server.servicers.errors import streaming, unary
from tuneforge.server.servicers.streams import follow_events
from tuneforge.server.servicers.tenancy import check_request_id, scoped_request_id, visible
from tuneforge.server.spec_validation import validate_spec
from tuneforge.server.storage import Storage
from tuneforge.server.store.base import JobStore
from tuneforge.v1 import job_spec_pb2, jobs_pb2, jobs_pb2_grpc
from tuneforge.workers.spec import TrainingSpec

Context: TypeAlias = Any  # grpc.aio.ServicerContext (grpcio ships no type stubs)


DEFAULT_PREDICT_TIMEOUT_S = 60.0
DEFAULT_EXPORT_TIMEOUT_S = 600.0
DEFAULT_GENERATE_TIMEOUT_S = 600.0
UNFINISHED = jobs_pb2.GenerateResponse.FinishReason.FINISH_REASON_UNSPECIFIED
FINISH_REASONS = {
    "stop": jobs_pb2.GenerateResponse.FinishReason.STOP,
    "length": jobs_pb2.GenerateResponse.FinishReason.LENGTH,
}


class JobServicer(jobs_pb2_grpc.JobServiceServicer):
    """Thin: validates, reads and writes the store, and asks the scheduler to act."""

    def __init__(
        self,
        store: JobStore,
        db: StoreRunner,
        storage: Storage,
        scheduler: Scheduler,
        hub: EventHub,
        model_roots: list[Path],
        jobs: JobFactory,
        predictions: Predictions,
        exports: Exports,
        generations: Generations,
        quotas: QuotaLookup = no_quotas,
    ):
        self._generations = generations
        self._exports = exports
        self._predictions = predictions
        self._jobs = jobs
        self._quotas = quotas
        self._store = store
        self._db = db
        self._storage = storage
        self._scheduler = scheduler
        self._hub = hub
        self._model_roots = model_roots

    @unary
    async def CreateJob(self, request: jobs_pb2.CreateJobRequest, context: Context) -> jobs_pb2.Job:
        if request.request_id:
            check_request_id(request.request_id)
        job = request.job
        result = await asyncio.to_thread(validate_spec, job.spec, self._model_roots) if job.HasField("spec") else None
        violations = result.violations if result else [FieldViolation("job.spec", "required")]
        if len(job.display_name) > 200:
            violations.append(FieldViolation("job.display_name", "at most 200 characters"))
        tenant = current_caller().tenant
        violations += await missing_files(self._store, self._db, job.spec, "job.spec", tenant)
        if violations:
            raise invalid_argument(violations)
        assert result is not None and result.spec is not None
        await check_job_admission(self._store, self._db, self._scheduler, self._quotas, tenant, job.spec)
        await check_fits(self._scheduler, result.spec)
        stored = await self._jobs.create(
            job.spec, job.display_name, scoped_request_id(request.request_id), tenant=tenant, resolved=result.spec
        )
        return convert.job_to_proto(stored)

    @unary
    async def GetJob(self, request: jobs_pb2.GetJobRequest, context: Context) -> jobs_pb2.Job:
        record = await self._get(request.name)
        job = convert.job_to_proto(record)
        if record.state is JobState.QUEUED:
            job.queue_position = await self._db.call(self._store.queue_position, record)
            job.wait_reason = await self._scheduler.wait_reason(record, job.queue_position)
        return job

    @unary
    async def ListJobs(self, request: jobs_pb2.ListJobsRequest, context: Context) -> jobs_pb2.ListJobsResponse:
        states = []
        for i, value in enumerate(request.states):
            if value == jobs_pb2.Job.STATE_UNSPECIFIED or value not in jobs_pb2.Job.State.values():
                raise invalid_argument([FieldViolation(f"states[{i}]", f"not a job state: {value}")])
            states.append(convert.state_from_proto(value))
        query = ",".join(sorted(s.value for s in states))
        page = parse_page(request.page_size, request.page_token, query)
        scope = current_caller().scope
        records, cursor = await self._db.call(self._store.list_jobs, states, page.size, page.cursor, scope)
        jobs, cursor = fit_page([convert.job_to_proto(r) for r in records], [r.order for r in records], cursor)
        return jobs_pb2.ListJobsResponse(jobs=jobs, next_page_token=make_token(cursor, query))

    @unary
    async def CancelJob(self, request: jobs_pb2.CancelJobRequest, context: Context) -> jobs_pb2.Job:
        return await self._control(self._scheduler.cancel, request.name)

    @unary
    async def PauseJob(self, request: jobs_pb2.PauseJobRequest, context: Context) -> jobs_pb2.Job:
        return await self._control(self._scheduler.pause, request.name)

    @unary
    async def ResumeJob(self, request: jobs_pb2.ResumeJobRequest, context: Context) -> jobs_pb2.Job:
        return await self._control(self._scheduler.resume, request.name)

    async def _control(self, action: Callable[[str], Awaitable[JobRecord | None]], name: str) -> jobs_pb2.Job:
        """Cancel, pause, resume: one scheduler action on one job (IllegalTransition -> FAILED_PRECONDITION)."""
        record = await action((await self._get(name)).id)
        return convert.job_to_proto(visible(record, name))

    @unary
    async def DeleteJob(self, request: jobs_pb2.DeleteJobRequest, context: Context) -> empty_pb2.Empty:
        record = await self._get(request.name)
        if record.state not in TERMINAL:
            raise failed_precondition(
                "JOB_NOT_FINISHED", f"{request.name} is {record.state.value}; cancel it first", state=record.state.value
            )
        await self._db.call(self._store.delete_job, record.id)
        self._hub.forget(record.id)
        await asyncio.to_thread(self._storage.delete_job_data, record.id)
        return empty_pb2.Empty()

    @streaming
    async def WatchJob(self, request: jobs_pb2.WatchJobRequest, context: Context) -> AsyncIterator[jobs_pb2.JobEvent]:
        record = await self._get(request.name)
        events = follow_events(
            self._store, self._db, self._hub, record.id, request.after_sequence, self._store.get_job, TERMINAL
        )
        async for event in events:
            yield convert.shared_event_proto(event)

    @unary
    async def ListJobEvents(
        self, request: jobs_pb2.ListJobEventsRequest, context: Context
    ) -> jobs_pb2.ListJobEventsResponse:
        record = await self._get(request.parent, field="parent")
        page = parse_page(request.page_size, request.page_token, record.id, default_size=100)
        after = page.cursor or 0
        events = await self._db.call(self._store.list_events, record.id, after, page.size + 1)
        shown = events[: page.size]
        protos, cursor = fit_page(
            [convert.event_to_proto(e) for e in shown],
            [e.sequence for e in shown],
            shown[-1].sequence if len(events) > page.size else None,
        )
        return jobs_pb2.ListJobEventsResponse(events=protos, next_page_token=make_token(cursor, record.id))

    @streaming
    async def DownloadArtifact(
        self, request: jobs_pb2.DownloadArtifactRequest, context: Context
    ) -> AsyncIterator[jobs_pb2.DownloadArtifactResponse]:
        record = await self._get(request.name)
        ready = await asyncio.to_thread(self._storage.has_artifact, record.id)
        if record.state is not JobState.SUCCEEDED or not record.artifact_sha256 or not ready:
            raise failed_precondition(
                "ARTIFACT_NOT_READY",
                f"{request.name} is {record.state.value} and has no artifact; only SUCCEEDED jobs do",
                state=record.state.value,
            )
        yield jobs_pb2.DownloadArtifactResponse(artifact=convert.job_to_proto(record).artifact)
        for chunk in self._storage.read_artifact(record.id):
            yield jobs_pb2.DownloadArtifactResponse(chunk=chunk)

    @unary
    async def Predict(self, request: jobs_pb2.PredictRequest, context: Context) -> jobs_pb2.PredictResponse:
        record = await self._get(request.name)
        inputs = check_predict_inputs(request, job_spec_pb2.JobSpec.FromString(record.spec))
        location = self._model_location(record, request.name, request.checkpoint)
        remaining = context.time_remaining()
        timeout_s = DEFAULT_PREDICT_TIMEOUT_S if remaining is None else max(0.0, remaining - 0.05)
        answers = await self._predictions.predict(
            record.id,
            location,
            record.artifact_sha256,
            inputs,
            request.top_k or 5,
            timeout_s,
            request.checkpoint,
            current_caller().tenant,
        )
        bad = [FieldViolation(f"inputs[{i}]", a["error"]) for i, a in enumerate(answers) if "error" in a]
        if bad:
            raise invalid_argument(bad, "INVALID_INPUT")
        return jobs_pb2.PredictResponse(
            predictions=[
                jobs_pb2.Prediction(
                    labels=[jobs_pb2.LabelScore(label=label, probability=p) for label, p in a.get("labels", [])],
                    transcript=a.get("transcript", ""),
                    text=a.get("text", ""),
                )
                for a in answers
            ]
        )

    @streaming
    async def Generate(
        self, request: jobs_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[jobs_pb2.GenerateResponse]:
        record = await self._get(request.name)
        wanted = check_generate_request(request, job_spec_pb2.JobSpec.FromString(record.spec))
        location = self._model_location(record, request.name, request.checkpoint)
        remaining = context.time_remaining()
        timeout_s = DEFAULT_GENERATE_TIMEOUT_S if remaining is None else max(0.0, remaining - 0.05)
        pieces = self._generations.generate(
            record.id,
            location,
            record.artifact_sha256,
            wanted,
            timeout_s,
            request.checkpoint,
            current_caller().tenant,
        )
        async for piece in pieces:
            yield jobs_pb2.GenerateResponse(
                text=piece.text,
                generated_tokens=piece.generated_tokens,
                finish_reason=FINISH_REASONS.get(piece.finish, UNFINISHED),
                prompt_tokens=piece.prompt_tokens,
            )

    def _model_location(self, record: JobRecord, name: str, checkpoint: str) -> str:
        """Where the model a Predict or Generate call asks for lies: the finished model, or the named checkpoint's
        folder while the job still has checkpoints. FAILED_PRECONDITION otherwise."""
        if checkpoint:
            if record.state in TERMINAL:
                raise failed_precondition(
                    "CHECKPOINTS_REMOVED",
                    f"{name} is {record.state.value}: its checkpoints were removed when it ended; "
                    "call with its finished model (no checkpoint)",
                    state=record.state.value,
                )
            return self._storage.checkpoint_location(record.id)
        if record.state is not JobState.SUCCEEDED or not record.artifact_sha256:
            raise failed_precondition(
                "MODEL_NOT_READY",
                f"{name} is {record.state.value}; only a SUCCEEDED job's model answers (or one of its "
                "checkpoints while it runs or is paused)",
                state=record.state.value,
            )
        return self._storage.artifact_location(record.id)

    @streaming
    async def ExportModel(
        self, request: jobs_pb2.ExportModelRequest, context: Context
    ) -> AsyncIterator[jobs_pb2.ExportModelResponse]:
        record = await self._get(request.name)
        format_name, opset = check_export_request(request)
        if record.state is not JobState.SUCCEEDED or not record.artifact_sha256:
            raise failed_precondition(
                "MODEL_NOT_READY",
                f"{request.name} is {record.state.value}; only a SUCCEEDED job's model can be exported",
                state=record.state.value,
            )
        location = self._storage.export_location(record.id, f"{format_name}-opset{opset}" if opset else format_name)
        try:
            metadata = json.loads(b"".join(self._storage.read_location(location + ".json")))
        except FileNotFoundError:
            remaining = context.time_remaining()
            timeout_s = DEFAULT_EXPORT_TIMEOUT_S if remaining is None else max(0.0, remaining - 0.5)
            artifact = self._storage.artifact_location(record.id)
            metadata = await self._exports.export(
                record.id,
                artifact,
                record.artifact_sha256,
                format_name,
                opset or 18,
                location,
                timeout_s,
                current_caller().tenant,
            )
        own_file = str(metadata["file"]).startswith("exports/")
        yield jobs_pb2.ExportModelResponse(export=model_export(metadata, record, own_file))
        chunks = self._storage.read_location(location) if own_file else self._storage.read_artifact(record.id)
        for chunk in chunks:
            yield jobs_pb2.ExportModelResponse(chunk=chunk)

    async def _get(self, name: str, field: str = "name") -> JobRecord:
        return visible(await self._db.call(self._store.get_job, parse_name(name, "jobs", field)), name)


async def check_fits(scheduler: Scheduler, spec: TrainingSpec) -> None:
    """Refuses a job whose memory estimate is more than a worker can give it (NEVER_FITS, with the estimate)."""
    problem = await asyncio.to_thread(memory_problem, spec, scheduler.worker_memory_bytes)
    if problem is not None:
        estimate, limit = problem
        raise failed_precondition(
            "NEVER_FITS",
            estimate.refusal(limit),
            estimate_bytes=str(estimate.total_bytes),
            limit_bytes=str(limit),
        )


async def check_job_admission(
    store: JobStore,
    db: StoreRunner,
    scheduler: Scheduler,
    quotas: QuotaLookup,
    tenant: str,
    spec: job_spec_pb2.JobSpec,
    queued_jobs: int = 0,
) -> None:
    """Refuses at creation what could never run, or would break the tenant's quotas: GPUs per job, GPUs no worker
    of the pool has, and (for a sweep, whose trials are created later) no room for `queued_jobs` more queued jobs.
    A job's own queued-jobs check is made where it is stored (JobFactory), atomically."""
    quota = quotas(tenant)
    gpus = spec.resources.gpus
    if gpus > quota.max_gpus_per_job:
        limit = quota.max_gpus_per_job
        message = f"the job asks for {gpus} GPUs; tenant {tenant} may use at most {limit} per job"
        raise quota_exceeded(tenant, "max_gpus_per_job", limit, message)
    capacity = scheduler.gpus_per_worker()
    if capacity is not None and gpus > capacity:
        raise failed_precondition(
            "NEVER_FITS",
            f"the job asks for {gpus} GPUs but no worker of this server has more than {capacity}; it could never start",
            gpus=str(gpus),
            capacity=str(capacity),
        )
    if quota.max_queued_jobs < UNLIMITED:
        queued = await db.call(store.count_jobs, tenant, [JobState.QUEUED])
        if queued + queued_jobs > quota.max_queued_jobs:
            limit = quota.max_queued_jobs
            message = f"tenant {tenant} has {queued} queued jobs, its quota is {limit}; wait for some to start"
            raise quota_exceeded(tenant, "max_queued_jobs", limit, message)
