"""API behaviour against the real server: idempotency, pagination, errors with details, cancel, delete, health."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.integration.helpers import STATE, long_spec, text_spec, wait_for_end, watch_until
from tests.tiny import keyword_rows, write_jsonl
from tuneforge.clients.client import TuneforgeClient, TuneforgeError
from tuneforge.clients.local_server import LocalServer
from tuneforge.v1 import files_pb2, jobs_pb2

pytestmark = pytest.mark.integration


def test_create_with_the_same_request_id_makes_one_job(
    client: TuneforgeClient, dataset_file: str, tiny_bert: Path
) -> None:
    request_id = str(uuid.uuid4())
    spec = text_spec(tiny_bert, dataset_file, epochs=1)
    first = client.create_job(spec, display_name="idem", request_id=request_id)
    second = client.create_job(spec, display_name="idem", request_id=request_id)
    assert first.name == second.name
    assert [j.name for j in client.list_jobs() if j.display_name == "idem"] == [first.name]
    assert wait_for_end(client, first.name).state == STATE.SUCCEEDED


def test_jobs_and_files_paginate_newest_first(client: TuneforgeClient, tiny_bert: Path, tmp_path: Path) -> None:
    names = []
    for i in range(5):
        path = write_jsonl(tmp_path / f"page{i}.jsonl", keyword_rows(6, seed=i))
        names.append(client.upload_file(path).name)
    response = client.files.ListFiles(files_pb2.ListFilesRequest(page_size=2))
    assert [f.name for f in response.files] == names[::-1][:2] and response.next_page_token
    assert [f.name for f in client.list_files(page_size=2)][:5] == names[::-1]

    created = [client.create_job(text_spec(tiny_bert, name, epochs=1)).name for name in names]
    listed = client.list_jobs(page_size=2)
    assert [j.name for j in listed][:5] == created[::-1]
    page = client.jobs.ListJobs(jobs_pb2.ListJobsRequest(page_size=3))
    assert len(page.jobs) == 3 and page.next_page_token
    for name in created:
        wait_for_end(client, name)
    succeeded = client.list_jobs(states=[STATE.SUCCEEDED])
    assert {j.name for j in succeeded} >= set(created)
    assert all(j.state == STATE.SUCCEEDED for j in succeeded)
    with pytest.raises(grpc.RpcError) as raised:
        client.jobs.ListJobs(
            jobs_pb2.ListJobsRequest(page_size=3, page_token=page.next_page_token, states=[STATE.FAILED])
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(TuneforgeError) as negative:
        client.list_jobs(page_size=-1)
    assert negative.value.field_violations.keys() == {"page_size"}


def test_bad_spec_fields_are_named(client: TuneforgeClient, dataset_file: str, tiny_bert: Path) -> None:
    spec = text_spec(tiny_bert, dataset_file)
    spec.hyperparameters.epochs = -3
    spec.hyperparameters.learning_rate = -1.0
    spec.data.validation_file = "files/file-doesnotexist"
    spec.data.validation_fraction = 0.0
    with pytest.raises(TuneforgeError) as raised:
        client.create_job(spec)
    error = raised.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.reason == "INVALID_ARGUMENT"
    assert set(error.field_violations) == {
        "job.spec.hyperparameters.epochs",
        "job.spec.hyperparameters.learning_rate",
        "job.spec.data.validation_file",
    }
    assert "does not exist" in error.field_violations["job.spec.data.validation_file"]


def test_a_model_outside_the_model_roots_is_rejected(
    client: TuneforgeClient, dataset_file: str, tmp_path: Path
) -> None:
    with pytest.raises(TuneforgeError) as raised:
        client.create_job(text_spec(tmp_path, dataset_file))
    assert "not under a model root" in raised.value.field_violations["job.spec.base_model"]


def test_ranks_other_than_one_per_gpu_are_invalid(client: TuneforgeClient, dataset_file: str, tiny_bert: Path) -> None:
    spec = text_spec(tiny_bert, dataset_file)
    spec.resources.gpus, spec.resources.ranks = 2, 3
    with pytest.raises(TuneforgeError) as raised:
        client.create_job(spec)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "one per GPU" in raised.value.field_violations["job.spec.resources.ranks"]


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.get_job("jobs/ft-missing"),
        lambda c: c.cancel_job("jobs/ft-missing"),
        lambda c: c.delete_job("jobs/ft-missing"),
        lambda c: list(c.watch("jobs/ft-missing")),
        lambda c: c.list_job_events("jobs/ft-missing"),
        lambda c: c.get_file("files/file-missing"),
        lambda c: c.delete_file("files/file-missing"),
    ],
)
def test_unknown_ids_are_not_found(client: TuneforgeClient, call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TuneforgeError) as raised:
        call(client)
    assert raised.value.code == grpc.StatusCode.NOT_FOUND
    assert raised.value.reason.endswith("_NOT_FOUND")


def test_malformed_names_are_invalid(client: TuneforgeClient) -> None:
    with pytest.raises(TuneforgeError) as raised:
        client.get_job("files/file-abc")
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT and "name" in raised.value.field_violations


def stored_files(server: LocalServer) -> set[str]:
    return {p.name for p in (server.data_dir / "files").iterdir()} | {
        p.name for p in (server.data_dir / "uploads").iterdir()
    }


def test_an_upload_with_a_wrong_digest_or_size_stores_nothing(
    server: LocalServer, client: TuneforgeClient, tmp_path: Path
) -> None:
    before_files, before_listed = stored_files(server), len(client.list_files())
    content = b'{"text": "a", "label": "x"}\n' * 1000

    def upload(sha256: str, size: int) -> TuneforgeError:
        metadata = files_pb2.UploadFileMetadata(
            filename="d.jsonl", purpose=files_pb2.File.DATASET, size_bytes=size, sha256=sha256
        )
        messages = [
            files_pb2.UploadFileRequest(metadata=metadata),
            files_pb2.UploadFileRequest(chunk=content[:10000]),
            files_pb2.UploadFileRequest(chunk=content[10000:]),
        ]
        with pytest.raises(grpc.RpcError) as raised:
            client.files.UploadFile(iter(messages), timeout=30)
        return TuneforgeError.from_rpc_error(raised.value)

    wrong_digest = upload(hashlib.sha256(b"other").hexdigest(), len(content))
    assert (wrong_digest.code, wrong_digest.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "DIGEST_MISMATCH")
    short = upload(hashlib.sha256(content).hexdigest(), len(content) + 5)
    assert short.reason == "SIZE_MISMATCH"
    long = upload(hashlib.sha256(content).hexdigest(), 100)
    assert long.reason == "SIZE_MISMATCH"
    assert stored_files(server) == before_files
    assert len(client.list_files()) == before_listed


def test_a_malformed_dataset_fails_the_job_with_the_line(
    client: TuneforgeClient, tiny_bert: Path, tmp_path: Path
) -> None:
    path = write_jsonl(tmp_path / "broken.jsonl", keyword_rows(9))
    path.write_text(path.read_text() + "{not json}\n")
    job = client.create_job(text_spec(tiny_bert, client.upload_file(path).name))
    final = wait_for_end(client, job.name)
    assert final.state == STATE.FAILED
    assert final.error.reason == "INVALID_DATASET"
    assert "broken.jsonl line 10: not valid JSON" in final.error.message
    with pytest.raises(TuneforgeError) as raised:
        client.download_artifact(job.name, tmp_path / "none.tar")
    assert raised.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_cancel_queued_and_running_jobs_frees_the_worker(
    client: TuneforgeClient, dataset_file: str, tiny_bert: Path
) -> None:
    running = [client.create_job(long_spec(tiny_bert, dataset_file)) for _ in range(2)]
    for job in running:
        watch_until(client, job.name, "training_metrics")  # both workers are busy now
    queued = client.create_job(text_spec(tiny_bert, dataset_file, epochs=1))
    waiting = client.create_job(text_spec(tiny_bert, dataset_file, epochs=1))
    assert client.get_job(queued.name).state == STATE.QUEUED

    cancelled = client.cancel_job(waiting.name)
    assert cancelled.state == STATE.CANCELLED  # a queued job is cancelled at once
    with pytest.raises(TuneforgeError) as again:
        client.cancel_job(waiting.name)
    assert again.value.code == grpc.StatusCode.FAILED_PRECONDITION

    with pytest.raises(TuneforgeError) as busy:
        client.delete_job(running[0].name)
    assert busy.value.code == grpc.StatusCode.FAILED_PRECONDITION

    assert client.cancel_job(running[0].name).state in (STATE.CANCELLING, STATE.CANCELLED)
    assert wait_for_end(client, running[0].name).state == STATE.CANCELLED
    # The freed worker takes the queued job and finishes it while the other worker is still busy.
    assert wait_for_end(client, queued.name).state == STATE.SUCCEEDED
    assert client.get_job(running[1].name).state == STATE.RUNNING
    client.cancel_job(running[1].name)
    assert wait_for_end(client, running[1].name).state == STATE.CANCELLED
    assert client.get_job(waiting.name).attempt == 0, "the cancelled queued job never ran"

    client.delete_job(running[0].name)
    with pytest.raises(TuneforgeError) as gone:
        client.get_job(running[0].name)
    assert gone.value.code == grpc.StatusCode.NOT_FOUND


def test_health_and_reflection(server: LocalServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "tuneforge.v1.JobService", "tuneforge.v1.FileService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(stub.ServerReflectionInfo(iter([request]), timeout=10))
        names = {s.name for s in response.list_services_response.service}
        assert {"tuneforge.v1.JobService", "tuneforge.v1.FileService", "grpc.health.v1.Health"} <= names


def test_concurrent_creates_with_one_request_id_make_one_job(
    client: TuneforgeClient, dataset_file: str, tiny_bert: Path
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    request_id = str(uuid.uuid4())
    spec = text_spec(tiny_bert, dataset_file, epochs=1)
    with ThreadPoolExecutor(max_workers=8) as pool:
        names = set(pool.map(lambda _: client.create_job(spec, "race", request_id).name, range(16)))
    assert len(names) == 1
    assert [j.name for j in client.list_jobs() if j.display_name == "race"] == list(names)
    assert wait_for_end(client, names.pop()).state == STATE.SUCCEEDED
