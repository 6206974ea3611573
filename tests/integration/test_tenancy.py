"""Two tenants and an admin against every RPC of a real server with bearer tokens: each tenant sees only its own
files, jobs, sweeps, events and artifacts; another tenant's resource is NOT_FOUND exactly like a missing one; admins
see both. Unauthenticated calls are refused, health stays open, and every mutating call is in the audit log."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from tuneforge.v1 import files_pb2, jobs_pb2, sweeps_pb2

from clients.client import TuneforgeClient, TuneforgeError
from clients.credentials import Credentials
from clients.local_server import LocalServer, start_local_server
from server.auth.access import token_digest
from tests.integration.conftest import SERVER_ARGS
from tests.integration.helpers import STATE, poll_pause, text_spec, wait_for_end
from tests.integration.test_sweeps import sweep_spec

pytestmark = pytest.mark.integration

TOKENS = {"alice": ("team-a", "user"), "bob": ("team-b", "user"), "root": ("ops", "admin")}


def access_file(path: Path, extra: str = "") -> Path:
    lines = [
        f'[[tokens]]\nname = "{name}"\nsha256 = "{token_digest(name + "-secret")}"\n'
        f'tenant = "{tenant}"\nrole = "{role}"\n'
        for name, (tenant, role) in TOKENS.items()
    ]
    path.write_text("\n".join(lines) + extra)
    return path


def connect(server: LocalServer, who: str | None) -> TuneforgeClient:
    token = f"{who}-secret" if who else None
    return TuneforgeClient(server.target, timeout_s=30, credentials=Credentials(token=token))


def outcome(call: Callable[[], Any]) -> tuple[str, str]:
    """(status code name, reason) of a call; streams are read to their end."""
    try:
        result = call()
        if isinstance(result, Iterator):
            list(result)
        return "OK", ""
    except TuneforgeError as error:
        return error.code.name, error.reason
    except grpc.RpcError as error:
        failed = TuneforgeError.from_rpc_error(error)
        return failed.code.name, failed.reason


@dataclass
class World:
    server: LocalServer
    log: Path
    file: str
    job: str
    sweep: str
    bob_job: str


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, model_root: Path, tiny_bert: Path, keyword_dataset: Path) -> World:
    data = tmp_path_factory.mktemp("tenancy")
    log = data.parent / "tenancy.log"
    args = [a for a in SERVER_ARGS if a not in ("--log-level", "WARNING")] + ["--log-format", "json"]
    args += ["--access-file", str(access_file(data.parent / "access.toml"))]
    server = start_local_server(data, workers=1, model_roots=[model_root], extra_args=args, log_path=log)
    try:
        with connect(server, "alice") as alice, connect(server, "bob") as bob:
            alice.wait_until_serving(120)
            file = alice.upload_file(keyword_dataset).name
            job = alice.create_job(text_spec(tiny_bert, file, epochs=2), request_id="shared-request-id")
            spec = sweep_spec(tiny_bert, file)
            spec.max_trials, spec.parallelism = 1, 1
            spec.base.hyperparameters.epochs = 1
            sweep = alice.create_sweep(spec)
            assert wait_for_end(alice, job.name).state == STATE.SUCCEEDED
            for _ in alice.watch_sweep(sweep.name, timeout_s=180):
                pass
            bob_file = bob.upload_file(keyword_dataset).name
            bob_job = bob.create_job(text_spec(tiny_bert, bob_file, epochs=1), request_id="shared-request-id")
            assert bob_job.name != job.name and bob_job.tenant == "team-b"  # request ids are per tenant
            wait_for_end(bob, bob_job.name)
        yield World(server, log, file, job.name, sweep.name, bob_job.name)
    finally:
        assert server.stop() == 0


def reads(w: World) -> dict[str, Callable[[TuneforgeClient, dict[str, str]], Any]]:
    """Every RPC that reads or acts on one existing resource, given {kind: name}."""
    return {
        "GetFile": lambda c, n: c.get_file(n["file"]),
        "DownloadFile": lambda c, n: c.files.DownloadFile(files_pb2.DownloadFileRequest(name=n["file"]), timeout=30),
        "GetJob": lambda c, n: c.get_job(n["job"]),
        "ListJobEvents": lambda c, n: c.list_job_events(n["job"]),
        "WatchJob": lambda c, n: c.jobs.WatchJob(jobs_pb2.WatchJobRequest(name=n["job"]), timeout=30),
        "DownloadArtifact": lambda c, n: c.jobs.DownloadArtifact(
            jobs_pb2.DownloadArtifactRequest(name=n["job"]), timeout=30
        ),
        "CancelJob": lambda c, n: c.cancel_job(n["job"]),
        "PauseJob": lambda c, n: c.pause_job(n["job"]),
        "ResumeJob": lambda c, n: c.resume_job(n["job"]),
        "GetSweep": lambda c, n: c.get_sweep(n["sweep"]),
        "WatchSweep": lambda c, n: c.sweeps.WatchSweep(sweeps_pb2.WatchSweepRequest(name=n["sweep"]), timeout=30),
        "CancelSweep": lambda c, n: c.cancel_sweep(n["sweep"]),
    }


def test_another_tenants_resources_are_not_found_like_missing_ones(world: World) -> None:
    mine = {"file": world.file, "job": world.job, "sweep": world.sweep}
    missing = {"file": "files/file-0000000000", "job": "jobs/ft-000000000000", "sweep": "sweeps/sw-000000000000"}
    with connect(world.server, "alice") as alice, connect(world.server, "bob") as bob, connect(
        world.server, "root"
    ) as root:  # fmt: skip
        for rpc, call in reads(world).items():
            owner = outcome(lambda c=call: c(alice, mine))
            assert owner[0] != "NOT_FOUND", f"{rpc}: the owner was refused: {owner}"
            assert outcome(lambda c=call: c(root, mine)) == owner, f"{rpc}: the admin saw something else"
            stranger, nobody = outcome(lambda c=call: c(bob, mine)), outcome(lambda c=call: c(bob, missing))
            assert stranger[0] == "NOT_FOUND" and stranger == nobody, f"{rpc}: {stranger} leaks (missing: {nobody})"


def test_lists_show_only_the_callers_tenant_and_admins_see_all(world: World) -> None:
    with connect(world.server, "alice") as alice, connect(world.server, "bob") as bob, connect(
        world.server, "root"
    ) as root:  # fmt: skip
        assert {j.tenant for j in alice.list_jobs()} == {"team-a"}
        assert [j.name for j in bob.list_jobs()] == [world.bob_job]
        assert {f.tenant for f in bob.list_files()} == {"team-b"} and world.file in {f.name for f in alice.list_files()}
        assert bob.list_sweeps() == [] and [s.name for s in alice.list_sweeps()] == [world.sweep]
        everything = root.list_jobs()
        assert {world.job, world.bob_job} <= {j.name for j in everything}
        assert {j.tenant for j in everything} == {"team-a", "team-b"}
        assert {f.tenant for f in root.list_files()} == {"team-a", "team-b"}
        assert [s.tenant for s in root.list_sweeps()] == ["team-a"]


def test_another_tenants_file_cannot_be_trained_on(world: World, tiny_bert: Path) -> None:
    with connect(world.server, "bob") as bob:
        creations: list[Callable[[str], Any]] = [
            lambda file: bob.create_job(text_spec(tiny_bert, file)),
            lambda file: bob.create_sweep(sweep_spec(tiny_bert, file)),
        ]
        for create in creations:
            results = []
            for file in (world.file, "files/file-0000000000"):
                with pytest.raises(TuneforgeError) as refused:
                    create(file)
                results.append((refused.value.code, sorted(refused.value.field_violations)))
            assert results[0] == results[1] and results[0][0] == grpc.StatusCode.INVALID_ARGUMENT


def test_deleting_another_tenants_resources_is_not_found(world: World) -> None:
    with connect(world.server, "bob") as bob, connect(world.server, "alice") as alice:
        for delete, name in ((bob.delete_job, world.job), (bob.delete_file, world.file)):
            with pytest.raises(TuneforgeError) as refused:
                delete(name)
            assert refused.value.code == grpc.StatusCode.NOT_FOUND
        assert alice.get_job(world.job).state == STATE.SUCCEEDED
        assert alice.get_file(world.file).name == world.file


def test_credentials_are_required_except_for_health(world: World) -> None:
    with connect(world.server, None) as anonymous:
        assert anonymous.health() == "SERVING"
        for call in (anonymous.list_jobs, anonymous.list_files):
            assert outcome(call) == ("UNAUTHENTICATED", "MISSING_CREDENTIALS")
    wrong = TuneforgeClient(world.server.target, credentials=Credentials(token="guessed"))
    with wrong:
        assert outcome(wrong.list_jobs) == ("UNAUTHENTICATED", "INVALID_TOKEN")


def audit_lines(log: Path, until: Callable[[list[dict[str, Any]]], bool], timeout_s: float = 10) -> list[Any]:
    """The audit lines of the server's JSON log, read again until `until` holds (an aborted call's status reaches
    the client a moment before its audit line is written) or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        lines = [json.loads(line) for line in log.read_text().splitlines() if '"audit": true' in line]
        if until(lines) or time.monotonic() > deadline:
            return lines
        poll_pause()


def test_mutating_calls_are_audited(world: World) -> None:
    with connect(world.server, "bob") as bob:
        outcome(lambda: bob.cancel_job(world.job))

    def refused_cancel(line: dict[str, Any]) -> bool:
        return line["method"] == "CancelJob" and line["subject"] == "bob" and line["target"] == world.job

    audit = audit_lines(world.log, lambda lines: any(refused_cancel(line) for line in lines))
    created = [a for a in audit if a["method"] == "CreateJob" and a["target"] == world.job]
    assert created and created[0]["subject"] == "alice" and created[0]["tenant"] == "team-a"
    assert created[0]["code"] == "OK"
    assert {a["code"] for a in audit if refused_cancel(a)} == {"NOT_FOUND"}
    assert {a["method"] for a in audit} >= {"UploadFile", "CreateJob", "CreateSweep", "CancelJob"}
    assert not any(a["method"].startswith(("Get", "List", "Watch")) for a in audit)
