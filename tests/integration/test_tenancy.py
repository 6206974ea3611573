"""Two tenants and an admin against every RPC of a real server with bearer tokens. Each RPC has one exact expected
outcome (status and reason) for the owner, another tenant and an admin: another tenant's resource is NOT_FOUND exactly
like a missing one, admins act as the owner does. Lists show only the caller's tenant; unauthenticated calls are
refused while health stays open; and the audit log holds exactly the mutating calls made, each once."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.integration.conftest import SERVER_ARGS
from tests.integration.helpers import STATE, poll_pause, text_spec, wait_for_end
from tests.integration.test_sweeps import sweep_spec
from tuneforge.clients.client import TuneforgeClient, TuneforgeError
from tuneforge.clients.credentials import Credentials
from tuneforge.clients.local_server import LocalServer, start_local_server
from tuneforge.server.auth.access import token_digest
from tuneforge.v1 import job_spec_pb2, jobs_pb2, sweeps_pb2

pytestmark = pytest.mark.integration

TOKENS = {
    "alice": ("team-a", "user"),
    "bob": ("team-b", "user"),
    "carol": ("team-c", "user"),
    "root": ("ops", "admin"),
}


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


OK = ("OK", "")
ENDED = ("FAILED_PRECONDITION", "ILLEGAL_STATE")
Call = Callable[[TuneforgeClient, dict[str, str], Path], Any]
RPCS: dict[str, tuple[Call, tuple[str, str]]] = {
    # every RPC that acts on one existing resource: (the call, the owner's and the admin's outcome)
    "GetFile": (lambda c, n, _: c.get_file(n["file"]), OK),
    "DownloadFile": (lambda c, n, to: c.download_file(n["file"], to / "file"), OK),
    "GetJob": (lambda c, n, _: c.get_job(n["job"]), OK),
    "ListJobEvents": (lambda c, n, _: c.list_job_events(n["job"]), OK),
    "WatchJob": (lambda c, n, _: c.jobs.WatchJob(jobs_pb2.WatchJobRequest(name=n["job"]), timeout=30), OK),
    "DownloadArtifact": (lambda c, n, to: c.download_artifact(n["job"], to / "artifact.tar"), OK),
    "Predict": (lambda c, n, _: c.predict(n["job"], texts=["the striker scored a goal"]), OK),
    "ExportModel": (lambda c, n, to: c.export_model(n["job"], job_spec_pb2.TORCHSCRIPT, to / "model.pt"), OK),
    "CancelJob": (lambda c, n, _: c.cancel_job(n["job"]), ENDED),  # the job SUCCEEDED: nothing to cancel
    "PauseJob": (lambda c, n, _: c.pause_job(n["job"]), ENDED),
    "ResumeJob": (lambda c, n, _: c.resume_job(n["job"]), ENDED),
    "GetSweep": (lambda c, n, _: c.get_sweep(n["sweep"]), OK),
    "WatchSweep": (lambda c, n, _: c.sweeps.WatchSweep(sweeps_pb2.WatchSweepRequest(name=n["sweep"]), timeout=30), OK),
    "CancelSweep": (lambda c, n, _: c.cancel_sweep(n["sweep"]), ENDED),
}
NOT_FOUND = {"file": ("NOT_FOUND", "FILE_NOT_FOUND"), "job": ("NOT_FOUND", "JOB_NOT_FOUND")}
NOT_FOUND["sweep"] = ("NOT_FOUND", "SWEEP_NOT_FOUND")


def kind_of(rpc: str) -> str:
    return "file" if "File" in rpc else "sweep" if "Sweep" in rpc else "job"


@pytest.mark.parametrize("rpc", list(RPCS))
def test_every_rpc_has_one_outcome_for_owner_stranger_and_admin(world: World, rpc: str, tmp_path: Path) -> None:
    call, expected = RPCS[rpc]
    mine = {"file": world.file, "job": world.job, "sweep": world.sweep}
    missing = {"file": "files/file-0000000000", "job": "jobs/ft-000000000000", "sweep": "sweeps/sw-000000000000"}
    with connect(world.server, "alice") as alice, connect(world.server, "bob") as bob, connect(
        world.server, "root"
    ) as root:  # fmt: skip
        seen = {
            "owner": outcome(lambda: call(alice, mine, tmp_path)),
            "stranger": outcome(lambda: call(bob, mine, tmp_path)),
            "missing": outcome(lambda: call(bob, missing, tmp_path)),
            "admin": outcome(lambda: call(root, mine, tmp_path)),
        }
    gone = NOT_FOUND[kind_of(rpc)]
    assert seen == {"owner": expected, "stranger": gone, "missing": gone, "admin": expected}


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


@pytest.mark.parametrize("deleter", ["bob", "root"])
def test_deleting_is_not_found_for_a_stranger_and_allowed_to_the_owner_and_an_admin(
    world: World, tiny_bert: Path, keyword_dataset: Path, deleter: str
) -> None:
    with connect(world.server, "alice") as alice, connect(world.server, "bob") as bob, connect(
        world.server, deleter
    ) as owner_or_admin:  # fmt: skip
        file = bob.upload_file(keyword_dataset).name
        job = bob.create_job(text_spec(tiny_bert, file, epochs=1)).name
        bob.cancel_job(job)
        assert wait_for_end(bob, job).state == STATE.CANCELLED  # ended, so deletable
        assert outcome(lambda: alice.delete_job(job)) == NOT_FOUND["job"]
        assert outcome(lambda: alice.delete_file(file)) == NOT_FOUND["file"]
        assert bob.get_job(job).name == job and bob.get_file(file).name == file, "a refused delete kept both"
        assert outcome(lambda: owner_or_admin.delete_job(job)) == OK
        assert outcome(lambda: owner_or_admin.delete_file(file)) == OK
        assert outcome(lambda: bob.get_job(job)) == NOT_FOUND["job"]
        assert outcome(lambda: bob.get_file(file)) == NOT_FOUND["file"]


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


def test_exactly_the_mutating_calls_are_audited(
    world: World, tiny_bert: Path, keyword_dataset: Path, tmp_path: Path
) -> None:
    """carol (a tenant no other test uses) makes every kind of call; the audit log then holds exactly her mutating
    calls, in order, with their targets and codes, and none of her reads."""
    with connect(world.server, "carol") as carol:
        file = carol.upload_file(keyword_dataset).name
        job = carol.create_job(text_spec(tiny_bert, file, epochs=1)).name
        made: list[tuple[str, str, str]] = [("UploadFile", file, "OK"), ("CreateJob", job, "OK")]
        assert outcome(lambda: carol.cancel_job(job)) == OK
        assert wait_for_end(carol, job).state == STATE.CANCELLED
        assert outcome(lambda: carol.pause_job(job)) == ENDED
        assert outcome(lambda: carol.resume_job(job)) == ENDED
        made += [("CancelJob", job, "OK"), ("PauseJob", job, ENDED[0]), ("ResumeJob", job, ENDED[0])]
        reads: list[Callable[[], Any]] = [lambda: carol.get_job(job), carol.list_jobs, carol.list_files]
        reads += [lambda: carol.list_job_events(job), lambda: carol.get_file(file), lambda: carol.watch(job)]
        assert [outcome(read) for read in reads] == [OK] * len(reads), "reads are not audited"
        unready = ("FAILED_PRECONDITION", "MODEL_NOT_READY")  # a cancelled job has no model
        assert outcome(lambda: carol.predict(job, texts=["a goal"])) == unready  # Predict is not audited
        nowhere = tmp_path / "no-such-folder" / "model.pt"  # the server's refusal comes before the client writes
        assert outcome(lambda: carol.export_model(job, job_spec_pb2.TORCHSCRIPT, nowhere)) == unready
        made.append(("ExportModel", job, unready[0]))
        spec = sweep_spec(tiny_bert, file)
        spec.max_trials, spec.parallelism = 1, 1
        sweep = carol.create_sweep(spec).name
        assert carol.cancel_sweep(sweep).state == sweeps_pb2.Sweep.CANCELLED
        made += [("CreateSweep", sweep, "OK"), ("CancelSweep", sweep, "OK")]
        assert [outcome(lambda: carol.get_sweep(sweep)), outcome(carol.list_sweeps)] == [OK, OK]
        assert outcome(lambda: carol.delete_file("files/file-0000000000")) == NOT_FOUND["file"]
        made.append(("DeleteFile", "files/file-0000000000", "NOT_FOUND"))
        for trial in carol.get_sweep(sweep).trials:
            wait_for_end(carol, trial.job)
        assert outcome(lambda: carol.delete_job(job)) == OK
        made.append(("DeleteJob", job, "OK"))

    def carols(lines: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
        return [(a["method"], a["target"], a["code"]) for a in lines if a["subject"] == "carol"]

    audit = audit_lines(world.log, lambda lines: len(carols(lines)) >= len(made))
    assert carols(audit) == made
    assert {(a["tenant"], a["role"]) for a in audit if a["subject"] == "carol"} == {("team-c", "user")}
