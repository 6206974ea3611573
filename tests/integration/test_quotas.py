"""Tenant quotas and fair scheduling on a real server: each limit is refused with RESOURCE_EXHAUSTED and a
QuotaFailure naming it (or, for running jobs, makes the job wait and says why), a job that could never fit the pool
is refused at creation, and a tenant that queues after another's twenty jobs gets the next free worker."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.integration.conftest import SERVER_ARGS
from tests.integration.helpers import STATE, long_spec, poll_pause, refused, text_spec, wait_for_end, watch_until
from tests.tiny import keyword_rows, write_jsonl
from tuneforge.clients.client import TuneforgeClient, TuneforgeError
from tuneforge.clients.credentials import Credentials
from tuneforge.clients.local_server import LocalServer, start_local_server
from tuneforge.server.auth.access import token_digest
from tuneforge.v1 import jobs_pb2, jobs_pb2_grpc

pytestmark = pytest.mark.integration

QUOTAS = """
[tenants.team-q]
max_running_jobs = 1
max_queued_jobs = 2
max_upload_bytes = 10000
max_stored_bytes = 20000
max_gpus_per_job = 0
max_streams = 2
"""


def tokens(*pairs: tuple[str, str]) -> str:
    return "".join(
        f'[[tokens]]\nname = "{name}"\nsha256 = "{token_digest(name)}"\ntenant = "{tenant}"\n' for name, tenant in pairs
    )


def as_user(server: LocalServer, name: str) -> TuneforgeClient:
    return TuneforgeClient(server.target, timeout_s=30, credentials=Credentials(token=name))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_root: Path) -> Iterator[LocalServer]:
    data = tmp_path_factory.mktemp("quotas")
    access = data.parent / "quotas-access.toml"
    access.write_text(tokens(("q-user", "team-q"), ("free-user", "team-free")) + QUOTAS)
    running = start_local_server(
        data, workers=2, model_roots=[model_root], extra_args=[*SERVER_ARGS, "--access-file", str(access)]
    )
    try:
        with as_user(running, "q-user") as client:
            client.wait_until_serving(120)
        yield running
    finally:
        assert running.stop() == 0


def test_upload_size_and_stored_bytes(server: LocalServer, keyword_dataset: Path, tmp_path: Path) -> None:
    big = tmp_path / "big.jsonl"
    big.write_bytes(b" " * 12_000)
    with as_user(server, "q-user") as client:
        error = refused(lambda: client.upload_file(big))
        assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED")
        assert list(error.quota_violations) == ["tenants/team-q"]
        assert error.quota_violations["tenants/team-q"].startswith("max_upload_bytes = 10000")
        size = keyword_dataset.stat().st_size
        assert 2 * size <= 20_000 < 3 * size
        client.upload_file(keyword_dataset)
        client.upload_file(keyword_dataset)
        error = refused(lambda: client.upload_file(keyword_dataset))
        assert error.quota_violations["tenants/team-q"].startswith("max_stored_bytes = 20000")
    with as_user(server, "free-user") as other:  # another tenant is not limited by team-q's quota
        other.upload_file(big)


def test_running_queued_gpus_and_streams(server: LocalServer, tiny_bert: Path, keyword_dataset: Path) -> None:
    with as_user(server, "q-user") as client, as_user(server, "free-user") as other:
        file = next(f.name for f in client.list_files())
        first = client.create_job(long_spec(tiny_bert, file))
        watch_until(client, first.name, "training_metrics")
        second, third = client.create_job(long_spec(tiny_bert, file)), client.create_job(long_spec(tiny_bert, file))
        waiting = client.get_job(second.name)
        assert waiting.state == STATE.QUEUED and waiting.queue_position == 1
        assert "max_running_jobs" in waiting.wait_reason, waiting.wait_reason
        assert client.get_job(third.name).queue_position == 2
        error = refused(lambda: client.create_job(long_spec(tiny_bert, file)))
        assert error.quota_violations["tenants/team-q"].startswith("max_queued_jobs = 2")
        # The second worker is free, and another tenant's job takes it at once.
        other_file = other.upload_file(keyword_dataset).name
        theirs = other.create_job(text_spec(tiny_bert, other_file, epochs=1))
        assert wait_for_end(other, theirs.name).state == STATE.SUCCEEDED
        assert client.get_job(second.name).state == STATE.QUEUED
        # GPUs: over team-q's quota; for anyone, more than this CPU-only pool has.
        gpu_spec = text_spec(tiny_bert, file)
        gpu_spec.resources.gpus = 1
        error = refused(lambda: client.create_job(gpu_spec))
        assert error.quota_violations["tenants/team-q"].startswith("max_gpus_per_job = 0")
        gpu_spec.data.training_file = other_file
        error = refused(lambda: other.create_job(gpu_spec))
        assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NEVER_FITS")
        # Streams: two open watches are team-q's limit; closing one makes room.
        request = jobs_pb2.WatchJobRequest(name=first.name)
        streams = [client.jobs.WatchJob(request, timeout=60) for _ in range(2)]
        for stream in streams:
            next(stream)
        third_stream = client.jobs.WatchJob(request, timeout=60)
        with pytest.raises(grpc.RpcError) as error_info:
            next(third_stream)
        assert error_info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (
            TuneforgeError.from_rpc_error(error_info.value)
            .quota_violations["tenants/team-q"]
            .startswith("max_streams = 2")
        )
        streams[0].cancel()
        assert next_stream_opens(client, request), "a closed stream did not free its place"
        for job in (first, second, third):
            client.cancel_job(job.name)
        streams[1].cancel()


def next_stream_opens(client: TuneforgeClient, request: jobs_pb2.WatchJobRequest, timeout_s: float = 10) -> bool:
    """Opens a watch until one is admitted (the server releases a cancelled stream's place a moment later)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stream = client.jobs.WatchJob(request, timeout=30)
        try:
            next(stream)
            stream.cancel()
            return True
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
        poll_pause()
    return False


def test_a_second_tenant_gets_the_next_free_worker(tmp_path: Path, model_root: Path, tiny_bert: Path) -> None:
    """Tenant A queues 20 jobs on one worker, then tenant B queues 2: B's first job is the very next to start and
    its second starts right after A's next one (A and B take turns), not after A's 20."""
    access = tmp_path / "access.toml"
    access.write_text(tokens(("a-user", "team-a"), ("b-user", "team-b")))
    server = start_local_server(
        tmp_path / "data", workers=1, model_roots=[model_root], extra_args=[*SERVER_ARGS, "--access-file", str(access)]
    )
    try:
        data = write_jsonl(tmp_path / "train.jsonl", keyword_rows(60))
        with as_user(server, "a-user") as a, as_user(server, "b-user") as b:
            a.wait_until_serving(120)
            a_file, b_file = a.upload_file(data).name, b.upload_file(data).name
            a_jobs = [a.create_job(text_spec(tiny_bert, a_file, epochs=1)).name for _ in range(20)]
            b_jobs = [b.create_job(text_spec(tiny_bert, b_file, epochs=1)).name for _ in range(2)]
            b_queued = b.get_job(b_jobs[0]).create_time.ToDatetime()
            for name in b_jobs:
                assert wait_for_end(b, name).state == STATE.SUCCEEDED
            for name in a_jobs:
                with contextlib.suppress(TuneforgeError):  # already ended
                    a.cancel_job(name)
            jobs = [a.get_job(name) for name in a_jobs] + [b.get_job(name) for name in b_jobs]
        started = sorted((j for j in jobs if j.HasField("start_time")), key=lambda j: j.start_time.ToDatetime())
        order = [j.name for j in started]
        before_b = sum(1 for j in started if j.tenant == "team-a" and j.start_time.ToDatetime() < b_queued)
        assert order.index(b_jobs[0]) == before_b, order
        assert order.index(b_jobs[1]) <= before_b + 2, order
    finally:
        assert server.stop() == 0


def test_message_size_and_deadlines_are_enforced(server: LocalServer, tiny_bert: Path) -> None:
    """A message over the server's 4 MiB limit is RESOURCE_EXHAUSTED; a watch whose deadline passes ends with
    DEADLINE_EXCEEDED and gives its stream back to the tenant."""
    metadata = [("authorization", "Bearer q-user")]
    with grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        request = jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(display_name="x" * (5 << 20)))
        with pytest.raises(grpc.RpcError) as too_big:
            jobs_pb2_grpc.JobServiceStub(channel).CreateJob(request, timeout=30, metadata=metadata)
        assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with as_user(server, "q-user") as client:
        file = next(f.name for f in client.list_files())
        job = client.create_job(long_spec(tiny_bert, file))
        watch_until(client, job.name, "training_metrics")
        request_watch = jobs_pb2.WatchJobRequest(name=job.name)
        streams = [client.jobs.WatchJob(request_watch, timeout=1.5) for _ in range(2)]  # the tenant's two
        for stream in streams:
            with pytest.raises(grpc.RpcError) as expired:
                for _ in stream:
                    pass
            assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert streams_open(client, request_watch, 2), "expired watches kept their streams"
        client.cancel_job(job.name)


def streams_open(client: TuneforgeClient, request: jobs_pb2.WatchJobRequest, count: int, timeout_s: float = 10) -> bool:
    """Whether `count` watches can be open at once (tried until the deadline: the server frees a place a moment
    after a stream ends)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        streams = [client.jobs.WatchJob(request, timeout=30) for _ in range(count)]
        try:
            for stream in streams:
                next(stream)
            return True
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
        finally:
            for stream in streams:
                stream.cancel()
    return False
