"""A typed Python client for Tuneforge: uploads with progress, jobs, resumable watching and verified downloads.

Only the generated stubs and grpc are used, so `pip install tuneforge` (without extras) is enough.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from tuneforge.clients.credentials import Credentials, open_channel
from tuneforge.v1 import (
    files_pb2,
    files_pb2_grpc,
    job_spec_pb2,
    jobs_pb2,
    jobs_pb2_grpc,
    sweeps_pb2,
    sweeps_pb2_grpc,
)

CHUNK_BYTES = 1 << 20
MAX_MESSAGE_BYTES = 4 << 20
TERMINAL_STATES = frozenset({jobs_pb2.Job.SUCCEEDED, jobs_pb2.Job.FAILED, jobs_pb2.Job.CANCELLED})
T = TypeVar("T")
Event = TypeVar("Event", jobs_pb2.JobEvent, sweeps_pb2.SweepEvent)

# Idempotent calls retry on UNAVAILABLE (CreateJob too: this client always sends a request_id).
_RETRY_CONFIG = {
    "methodConfig": [
        {
            "name": [
                {"service": "tuneforge.v1.FileService", "method": m} for m in ("GetFile", "ListFiles", "DownloadFile")
            ]
            + [
                {"service": "tuneforge.v1.JobService", "method": m}
                for m in ("GetJob", "ListJobs", "ListJobEvents", "DownloadArtifact", "CreateJob")
            ]
            + [
                {"service": "tuneforge.v1.SweepService", "method": m} for m in ("GetSweep", "ListSweeps", "CreateSweep")
            ],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.2s",
                "maxBackoff": "5s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}


@dataclass
class TuneforgeError(Exception):
    """A failed call, with the server's reason and the bad fields when it named them."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    field_violations: dict[str, str] = field(default_factory=dict)
    quota_violations: dict[str, str] = field(default_factory=dict)
    """For RESOURCE_EXHAUSTED by a quota: whose quota (`tenants/NAME`) and which limit."""

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        return f"{text} [{self.reason}]" if self.reason else text

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> TuneforgeError:
        call: Any = error
        status = rpc_status.from_call(call)
        reason, violations, quotas = "", {}, {}
        for detail in status.details if status else []:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations = {v.field: v.description for v in bad.field_violations}
            elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
                failure = error_details_pb2.QuotaFailure()
                detail.Unpack(failure)
                quotas = {v.subject: v.description for v in failure.violations}
        return cls(call.code(), call.details() or "", reason, violations, quotas)


def _calls(fn: Callable[..., T]) -> Callable[..., T]:
    """Raises TuneforgeError instead of a bare RpcError."""

    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except grpc.RpcError as error:
            raise TuneforgeError.from_rpc_error(error) from None

    wrapper.__doc__ = fn.__doc__
    wrapper.__name__ = fn.__name__
    return wrapper


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


class TuneforgeClient:
    """One channel to one server. Every call has a deadline (`timeout_s`); streams have none."""

    def __init__(self, target: str, timeout_s: float = 30.0, credentials: Credentials | None = None):
        """`credentials`: TLS and a bearer token; by default none, with the token from $TUNEFORGE_TOKEN."""
        self.target = target
        self.timeout_s = timeout_s
        self._channel = open_channel(
            target,
            credentials or Credentials.from_environment(),
            [
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.service_config", json.dumps(_RETRY_CONFIG)),
                ("grpc.enable_retries", 1),
                ("grpc.max_reconnect_backoff_ms", 5000),  # find a restarted server within seconds
            ],
        )
        self.files = files_pb2_grpc.FileServiceStub(self._channel)
        self.jobs = jobs_pb2_grpc.JobServiceStub(self._channel)
        self.sweeps = sweeps_pb2_grpc.SweepServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> TuneforgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ health

    def health(self, service: str = "") -> str:
        """The gRPC health status of the server ("") or one service: SERVING, NOT_SERVING, SERVICE_UNKNOWN, or
        UNREACHABLE when nothing answered within the deadline."""
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            response = self._health.Check(request, timeout=self.timeout_s)
        except grpc.RpcError as error:
            if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return "UNREACHABLE"
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            raise TuneforgeError.from_rpc_error(error) from None
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def wait_until_serving(self, timeout_s: float = 120.0) -> None:
        """Blocks until the server's health says SERVING (its workers are up), waiting for it to start listening."""
        request = health_pb2.HealthCheckRequest()
        try:
            for response in self._health.Watch(request, timeout=timeout_s, wait_for_ready=True):
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TimeoutError(f"{self.target} was not SERVING within {timeout_s:.0f} s") from None
            raise TuneforgeError.from_rpc_error(error) from None
        raise TuneforgeError(grpc.StatusCode.UNAVAILABLE, "the health stream ended before SERVING")

    # ------------------------------------------------------------ files

    @_calls
    def upload_file(
        self, path: Path, request_id: str | None = None, progress: Callable[[int, int], None] | None = None
    ) -> files_pb2.File:
        """Uploads a dataset file in 1 MiB chunks; progress(sent_bytes, total_bytes) after each chunk."""
        size = path.stat().st_size
        metadata = files_pb2.UploadFileMetadata(
            filename=path.name,
            purpose=files_pb2.File.DATASET,
            size_bytes=size,
            sha256=sha256_of(path),
            request_id=request_id or str(uuid.uuid4()),
        )

        def messages() -> Iterator[files_pb2.UploadFileRequest]:
            yield files_pb2.UploadFileRequest(metadata=metadata)
            sent = 0
            with open(path, "rb") as handle:
                while chunk := handle.read(CHUNK_BYTES):
                    yield files_pb2.UploadFileRequest(chunk=chunk)
                    sent += len(chunk)
                    if progress:
                        progress(sent, size)

        file: files_pb2.File = self.files.UploadFile(messages(), timeout=max(self.timeout_s, size / 1e6 + 60))
        return file

    @_calls
    def get_file(self, name: str) -> files_pb2.File:
        file: files_pb2.File = self.files.GetFile(files_pb2.GetFileRequest(name=name), timeout=self.timeout_s)
        return file

    @_calls
    def list_files(self, page_size: int = 100) -> list[files_pb2.File]:
        """Every file, newest first (all pages)."""
        return self._all_pages(
            lambda token: self.files.ListFiles(
                files_pb2.ListFilesRequest(page_size=page_size, page_token=token), timeout=self.timeout_s
            ),
            "files",
        )

    @_calls
    def delete_file(self, name: str) -> None:
        self.files.DeleteFile(files_pb2.DeleteFileRequest(name=name), timeout=self.timeout_s)

    # ------------------------------------------------------------ jobs

    @_calls
    def create_job(
        self, spec: job_spec_pb2.JobSpec, display_name: str = "", request_id: str | None = None
    ) -> jobs_pb2.Job:
        """Creates a job; safe to retry with the same request_id (one job results)."""
        request = jobs_pb2.CreateJobRequest(
            job=jobs_pb2.Job(display_name=display_name, spec=spec), request_id=request_id or str(uuid.uuid4())
        )
        job: jobs_pb2.Job = self.jobs.CreateJob(request, timeout=self.timeout_s)
        return job

    @_calls
    def get_job(self, name: str) -> jobs_pb2.Job:
        job: jobs_pb2.Job = self.jobs.GetJob(jobs_pb2.GetJobRequest(name=name), timeout=self.timeout_s)
        return job

    @_calls
    def list_jobs(
        self, states: Sequence[jobs_pb2.Job.State.ValueType] = (), page_size: int = 100, limit: int | None = None
    ) -> list[jobs_pb2.Job]:
        """Jobs newest first, optionally only in some states; up to limit (all pages when None)."""
        return self._all_pages(
            lambda token: self.jobs.ListJobs(
                jobs_pb2.ListJobsRequest(page_size=page_size, page_token=token, states=states), timeout=self.timeout_s
            ),
            "jobs",
            limit,
        )

    @_calls
    def cancel_job(self, name: str) -> jobs_pb2.Job:
        job: jobs_pb2.Job = self.jobs.CancelJob(jobs_pb2.CancelJobRequest(name=name), timeout=self.timeout_s)
        return job

    @_calls
    def pause_job(self, name: str) -> jobs_pb2.Job:
        job: jobs_pb2.Job = self.jobs.PauseJob(jobs_pb2.PauseJobRequest(name=name), timeout=self.timeout_s)
        return job

    @_calls
    def resume_job(self, name: str) -> jobs_pb2.Job:
        job: jobs_pb2.Job = self.jobs.ResumeJob(jobs_pb2.ResumeJobRequest(name=name), timeout=self.timeout_s)
        return job

    @_calls
    def delete_job(self, name: str) -> None:
        self.jobs.DeleteJob(jobs_pb2.DeleteJobRequest(name=name), timeout=self.timeout_s)

    @_calls
    def list_job_events(self, name: str, page_size: int = 1000) -> list[jobs_pb2.JobEvent]:
        return self._all_pages(
            lambda token: self.jobs.ListJobEvents(
                jobs_pb2.ListJobEventsRequest(parent=name, page_size=page_size, page_token=token),
                timeout=self.timeout_s,
            ),
            "events",
        )

    def watch(
        self, name: str, after_sequence: int = 0, reconnect_for_s: float = 60.0, timeout_s: float | None = None
    ) -> Iterator[jobs_pb2.JobEvent]:
        """Every event after after_sequence until the job ends. A dropped stream is resumed from the last
        sequence seen (for up to reconnect_for_s without progress), so nothing is lost or repeated.
        timeout_s bounds the whole watch (DEADLINE_EXCEEDED past it); None waits as long as the job runs."""
        return self._follow(
            lambda last, remaining: self.jobs.WatchJob(
                jobs_pb2.WatchJobRequest(name=name, after_sequence=last), timeout=remaining
            ),
            after_sequence,
            reconnect_for_s,
            timeout_s,
        )

    def _follow(
        self,
        open_stream: Callable[[int, float | None], Iterator[Event]],
        after_sequence: int,
        reconnect_for_s: float,
        timeout_s: float | None,
    ) -> Iterator[Event]:
        """A resumable event stream: reopened from the last sequence seen after UNAVAILABLE."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last = after_sequence
        down_since: float | None = None
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                for event in open_stream(last, remaining):
                    down_since = None
                    last = event.sequence
                    yield event
                return
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise TuneforgeError.from_rpc_error(error) from None
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > reconnect_for_s:
                    raise TuneforgeError.from_rpc_error(error) from None
            try:
                grpc.channel_ready_future(self._channel).result(timeout=reconnect_for_s)
            except grpc.FutureTimeoutError:
                raise TuneforgeError(grpc.StatusCode.UNAVAILABLE, f"{self.target} did not come back") from None

    # ------------------------------------------------------------ sweeps

    @_calls
    def create_sweep(
        self, spec: sweeps_pb2.SweepSpec, display_name: str = "", request_id: str | None = None
    ) -> sweeps_pb2.Sweep:
        """Creates a sweep; safe to retry with the same request_id (one sweep results)."""
        request = sweeps_pb2.CreateSweepRequest(
            sweep=sweeps_pb2.Sweep(display_name=display_name, spec=spec), request_id=request_id or str(uuid.uuid4())
        )
        sweep: sweeps_pb2.Sweep = self.sweeps.CreateSweep(request, timeout=self.timeout_s)
        return sweep

    @_calls
    def get_sweep(self, name: str) -> sweeps_pb2.Sweep:
        sweep: sweeps_pb2.Sweep = self.sweeps.GetSweep(sweeps_pb2.GetSweepRequest(name=name), timeout=self.timeout_s)
        return sweep

    @_calls
    def list_sweeps(self, page_size: int = 100) -> list[sweeps_pb2.Sweep]:
        return self._all_pages(
            lambda token: self.sweeps.ListSweeps(
                sweeps_pb2.ListSweepsRequest(page_size=page_size, page_token=token), timeout=self.timeout_s
            ),
            "sweeps",
        )

    @_calls
    def cancel_sweep(self, name: str) -> sweeps_pb2.Sweep:
        request = sweeps_pb2.CancelSweepRequest(name=name)
        sweep: sweeps_pb2.Sweep = self.sweeps.CancelSweep(request, timeout=self.timeout_s)
        return sweep

    def watch_sweep(
        self, name: str, after_sequence: int = 0, reconnect_for_s: float = 60.0, timeout_s: float | None = None
    ) -> Iterator[sweeps_pb2.SweepEvent]:
        """Every sweep event after after_sequence until the sweep ends; resumes like `watch`."""
        return self._follow(
            lambda last, remaining: self.sweeps.WatchSweep(
                sweeps_pb2.WatchSweepRequest(name=name, after_sequence=last), timeout=remaining
            ),
            after_sequence,
            reconnect_for_s,
            timeout_s,
        )

    @_calls
    def predict(
        self,
        name: str,
        texts: Sequence[str] = (),
        images: Sequence[bytes] = (),
        audio: Sequence[bytes] = (),
        top_k: int = 5,
        timeout_s: float | None = None,
        checkpoint: str = "",
    ) -> list[jobs_pb2.Prediction]:
        """Runs a SUCCEEDED job's model, or with `checkpoint` (`latest`, `step-N`) one of an unfinished job's
        checkpoints: one Prediction per input (texts, encoded images or encoded audio clips)."""
        inputs = [jobs_pb2.PredictInput(text=t) for t in texts]
        inputs += [jobs_pb2.PredictInput(image=i) for i in images]
        inputs += [jobs_pb2.PredictInput(audio=a) for a in audio]
        request = jobs_pb2.PredictRequest(name=name, inputs=inputs, top_k=top_k, checkpoint=checkpoint)
        response = self.jobs.Predict(request, timeout=timeout_s or self.timeout_s)
        return list(response.predictions)

    def generate(
        self,
        name: str,
        prompt: str = "",
        messages: Sequence[tuple[str, str]] = (),
        max_new_tokens: int = 0,
        temperature: float = 0.0,
        top_p: float = 0.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
        checkpoint: str = "",
        timeout_s: float | None = None,
    ) -> Iterator[jobs_pb2.GenerateResponse]:
        """A generative job's answer to a prompt, or to (role, content) messages as the next assistant turn, piece by
        piece as the model writes it; the last piece has its finish_reason. Closing the iterator early stops the
        generation on the worker. TuneforgeError on failure, even after some pieces came."""
        request = jobs_pb2.GenerateRequest(
            name=name,
            prompt=prompt,
            messages=[jobs_pb2.ChatMessage(role=role, content=content) for role, content in messages],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=list(stop),
            checkpoint=checkpoint,
        )
        if seed is not None:
            request.seed = seed
        call = self.jobs.Generate(request, timeout=timeout_s or self.timeout_s)
        try:
            yield from call
        except grpc.RpcError as error:
            raise TuneforgeError.from_rpc_error(error) from None
        finally:
            call.cancel()  # a no-op once the stream ended; otherwise the server stops writing

    @_calls
    def export_model(
        self, name: str, format: int, destination: Path, onnx_opset: int = 0, timeout_s: float = 600.0
    ) -> jobs_pb2.ModelExport:
        """Writes the job's model in an export format (job_spec_pb2.ONNX...) to destination, checking its SHA-256;
        returns the export's metadata with the figures of its check against the PyTorch model."""
        export = jobs_pb2.ModelExport()
        request = jobs_pb2.ExportModelRequest(name=name, format=format, onnx_opset=onnx_opset)  # type: ignore[arg-type]
        _write_checked(self.jobs.ExportModel(request, timeout=timeout_s), "export", export, destination)
        return export

    @_calls
    def download_artifact(self, name: str, destination: Path) -> jobs_pb2.Artifact:
        """Writes the job's artifact tar to destination and checks its SHA-256."""
        artifact = jobs_pb2.Artifact()
        stream = self.jobs.DownloadArtifact(jobs_pb2.DownloadArtifactRequest(name=name))
        _write_checked(stream, "artifact", artifact, destination)
        return artifact

    @_calls
    def download_file(self, name: str, destination: Path) -> files_pb2.File:
        """Writes an uploaded file's bytes to destination and checks its SHA-256."""
        file = files_pb2.File()
        _write_checked(self.files.DownloadFile(files_pb2.DownloadFileRequest(name=name)), "file", file, destination)
        return file

    @staticmethod
    def _all_pages(fetch: Callable[[str], Any], attribute: str, limit: int | None = None) -> list[Any]:
        items: list[Any] = []
        token = ""
        while True:
            response = fetch(token)
            items.extend(getattr(response, attribute))
            token = response.next_page_token
            if not token or (limit is not None and len(items) >= limit):
                return items[:limit] if limit is not None else items


def _write_checked(stream: Any, header: str, metadata: Any, destination: Path) -> None:
    """Writes a download stream (a header message with `sha256`, then chunks) to destination atomically, after
    checking the digest of what arrived. A refused call raises its status before anything is created, and a stream
    that breaks off leaves no partial file behind."""
    messages = iter(stream)
    first = next(messages, None)  # the server's refusal arrives here
    digest = hashlib.sha256()
    temporary = destination.with_name(destination.name + ".part")
    try:
        with open(temporary, "wb") as handle:
            for message in itertools.chain([] if first is None else [first], messages):
                if message.HasField(header):
                    metadata.CopyFrom(getattr(message, header))
                else:
                    handle.write(message.chunk)
                    digest.update(message.chunk)
        if digest.hexdigest() != metadata.sha256:
            raise TuneforgeError(
                grpc.StatusCode.DATA_LOSS,
                f"{header} digest {digest.hexdigest()} does not match the server's {metadata.sha256}",
                "DIGEST_MISMATCH",
            )
        temporary.replace(destination)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
