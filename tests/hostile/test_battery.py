"""Every attack a hostile tenant made on a shared server, run again against a real one with several tenants: each
gets its precise status (or its job ends FAILED with a reason a person can act on), the server stays SERVING,
the other tenants' calls keep their latency, and nothing is left on disk. The attacks that held when the server
was first attacked are here too, so they keep holding."""

from __future__ import annotations

import io
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from google.protobuf import struct_pb2
from PIL import Image

from tests.hostile.conftest import (
    CRASHING_FILE,
    IDLE_TIMEOUT_S,
    MAX_CONCURRENT_RPCS,
    MAX_TENANT_RPCS,
    Battery,
    as_user,
    assert_others_unharmed,
    token_of,
)
from tests.integration.helpers import STATE, refused, scrape_until, text_spec, wait_for_end
from tests.media import blank_png, shape_png, write_tar
from tests.tiny import keyword_rows, write_jsonl
from tuneforge.clients.client import TuneforgeClient, TuneforgeError
from tuneforge.clients.credentials import Credentials
from tuneforge.v1 import files_pb2, jobs_pb2
from tuneforge.v1 import job_spec_pb2 as pb
from tuneforge.v1 import sweeps_pb2 as sw

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def files(battery: Battery, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Each user's uploaded keyword data."""
    folder = tmp_path_factory.mktemp("hostile-files")
    names = {}
    for user in ("alice", "bob", "quota"):
        with as_user(battery, user) as client:
            names[user] = client.upload_file(write_jsonl(folder / f"{user}.jsonl", keyword_rows(24))).name
    return names


# ------------------------------------------------------------------ what held


def test_authentication_isolation_names_and_ranges_hold(battery: Battery, files: dict[str, str]) -> None:
    with TuneforgeClient(battery.server.target, credentials=Credentials()) as anonymous:
        error = refused(anonymous.list_files)
        assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "MISSING_CREDENTIALS")
        twice = [("authorization", f"Bearer {token_of('alice')}"), ("authorization", f"Bearer {token_of('bob')}")]
        with pytest.raises(grpc.RpcError) as raw:
            anonymous.files.ListFiles(files_pb2.ListFilesRequest(), metadata=twice, timeout=10)
        assert raw.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert TuneforgeError.from_rpc_error(raw.value).reason == "MALFORMED_CREDENTIALS"
    with as_user(battery, "bob") as bob:
        error = refused(lambda: bob.get_file(files["alice"]))
        assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "FILE_NOT_FOUND")
        spec = text_spec(battery.models / "tiny-bert", files["bob"])
        spec.base_model = "/etc"
        spec.hyperparameters.epochs = -1
        error = refused(lambda: bob.create_job(spec))
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert set(error.field_violations) == {"job.spec.base_model", "job.spec.hyperparameters.epochs"}
    assert_others_unharmed(battery)


def upload_messages(metadata: files_pb2.UploadFileMetadata, body: bytes = b"") -> Iterator[files_pb2.UploadFileRequest]:
    yield files_pb2.UploadFileRequest(metadata=metadata)
    if body:
        yield files_pb2.UploadFileRequest(chunk=body)


def metadata_for(body: bytes, filename: str = "d.jsonl", request_id: str = "") -> files_pb2.UploadFileMetadata:
    import hashlib

    return files_pb2.UploadFileMetadata(
        filename=filename,
        purpose=files_pb2.File.DATASET,
        size_bytes=len(body),
        sha256=hashlib.sha256(body).hexdigest(),
        request_id=request_id,
    )


def test_upload_names_and_request_ids_are_checked_exactly(battery: Battery) -> None:
    body = b'{"text": "a", "label": "x"}\n'
    with as_user(battery, "alice") as alice:
        for filename in ("d.jsonl\n", "../d.jsonl", "."):
            with pytest.raises(grpc.RpcError) as error:
                alice.files.UploadFile(upload_messages(metadata_for(body, filename), body), timeout=10)
            failure = TuneforgeError.from_rpc_error(error.value)
            assert (failure.code, list(failure.field_violations)) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                ["metadata.filename"],
            )
        with pytest.raises(grpc.RpcError) as error:
            alice.files.UploadFile(upload_messages(metadata_for(body, request_id="not a uuid!"), body), timeout=10)
        assert list(TuneforgeError.from_rpc_error(error.value).field_violations) == ["metadata.request_id"]


# ------------------------------------------------------------------ high


def file_parameter(*names: str) -> sw.Parameter:
    choices = [struct_pb2.Value(string_value=name) for name in names]
    return sw.Parameter(field="data.training_file", categorical=sw.Categorical(values=choices))


def test_a_sweep_cannot_train_on_another_tenants_file(battery: Battery, files: dict[str, str]) -> None:
    with as_user(battery, "bob") as bob:
        sweep = sw.SweepSpec(
            base=text_spec(battery.models / "tiny-bert", files["bob"], epochs=1),
            parameters=[file_parameter(files["bob"], files["alice"])],
            algorithm=sw.SweepSpec.GRID,
        )
        error = refused(lambda: bob.create_sweep(sweep))
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert error.field_violations == {
            "sweep.spec.parameters[0].categorical.values[1]": f"{files['alice']} does not exist"
        }
        assert not bob.list_sweeps() and not bob.list_jobs(), "nothing was made"
    assert_others_unharmed(battery)


def test_idle_uploads_lock_out_no_one_and_leave_nothing(battery: Battery) -> None:
    body = b'{"text": "a", "label": "x"}\n'
    release = threading.Event()

    def stalled() -> Iterator[files_pb2.UploadFileRequest]:
        yield files_pb2.UploadFileRequest(metadata=metadata_for(body))
        release.wait(60)  # sends nothing more: the server must not wait for ever

    with as_user(battery, "alice") as alice, as_user(battery, "quota") as quota:
        began = time.monotonic()
        try:
            uploads = Outcomes(
                [alice.files.UploadFile.future(stalled(), timeout=60) for _ in range(MAX_TENANT_RPCS + 5)]
            )
            # Alice holds her whole share: the calls over it are refused at once, and the others' calls go on.
            assert uploads.wait_for(5, timeout_s=20) == {"TENANT_BUSY": 5}
            assert_others_unharmed(battery)
            held = Outcomes([quota.files.UploadFile.future(stalled(), timeout=60) for _ in range(5)])
            assert held.wait_for(1, timeout_s=20) == {"QUOTA_EXCEEDED": 1}, "team-q's stream quota counts uploads"
            # Two more tenants fill the server: the calls past its total are refused, and probes still answer.
            with as_user(battery, "bob") as bob, as_user(battery, "root") as root:
                more = [bob.files.UploadFile.future(stalled(), timeout=60) for _ in range(MAX_TENANT_RPCS)]
                full = Outcomes([root.files.UploadFile.future(stalled(), timeout=60) for _ in range(MAX_TENANT_RPCS)])
                over_total = 3 * MAX_TENANT_RPCS + 4 - MAX_CONCURRENT_RPCS  # alice, bob, root and four of team-q
                assert full.wait_for(over_total, timeout_s=20) == {"SERVER_BUSY": over_total}
                assert bob.health() == "SERVING"
                assert _outcome(bob.list_files) == "SERVER_BUSY"
                Outcomes(more).wait_for(MAX_TENANT_RPCS, IDLE_TIMEOUT_S * 4)
                full.wait_for(MAX_TENANT_RPCS, IDLE_TIMEOUT_S * 4)
            # The stalled ones are dropped after the idle timeout, each with its reason.
            assert uploads.wait_for(MAX_TENANT_RPCS + 5, IDLE_TIMEOUT_S * 4) == {
                "TENANT_BUSY": 5,
                "UPLOAD_IDLE": MAX_TENANT_RPCS,
            }
            assert held.wait_for(5, IDLE_TIMEOUT_S * 4) == {"QUOTA_EXCEEDED": 1, "UPLOAD_IDLE": 4}
            assert time.monotonic() - began < IDLE_TIMEOUT_S * 4
        finally:
            release.set()
        assert alice.upload_file(write_jsonl(battery.log.parent / "after.jsonl", keyword_rows(4))).name
    assert list((battery.server.data_dir / "uploads").iterdir()) == [], "no half-written upload is left"
    assert_others_unharmed(battery)


class Outcomes:
    """The reasons calls ended with, as they end (no polling: each call's done callback counts it)."""

    def __init__(self, futures: list[grpc.Future]) -> None:
        self._ended = threading.Condition()
        self._reasons: dict[str, int] = {}
        for future in futures:
            future.add_done_callback(self._count)

    def _count(self, future: grpc.Future) -> None:
        error = future.exception()
        reason = TuneforgeError.from_rpc_error(error).reason if error is not None else "ok"
        with self._ended:
            self._reasons[reason] = self._reasons.get(reason, 0) + 1
            self._ended.notify_all()

    def wait_for(self, count: int, timeout_s: float) -> dict[str, int]:
        with self._ended:
            self._ended.wait_for(lambda: sum(self._reasons.values()) >= count, timeout_s)
            return dict(self._reasons)


def test_a_grid_too_large_to_build_is_refused_at_once(battery: Battery, files: dict[str, str]) -> None:
    seeds = sw.Parameter(field="hyperparameters.seed", int_range=sw.IntRange(min=0, max=150_000_000))
    with as_user(battery, "bob") as bob:
        sweep = sw.SweepSpec(
            base=text_spec(battery.models / "tiny-bert", files["bob"]), parameters=[seeds], algorithm=sw.SweepSpec.GRID
        )
        began = time.perf_counter()
        error = refused(lambda: bob.create_sweep(sweep))
        assert time.perf_counter() - began < 2.0
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "the grid has 150,000,001 points" in error.field_violations["sweep.spec.parameters"]
    assert_others_unharmed(battery)


@pytest.fixture(scope="module")
def image_job(battery: Battery, tmp_path_factory: pytest.TempPathFactory) -> str:
    """An image model trained from an archive made with `tar -C dir -czf data.tar.gz .` (its first member is `.`)."""
    import random

    folder = tmp_path_factory.mktemp("shapes")
    rng = random.Random(0)
    for colour in ("red", "blue"):
        (folder / colour).mkdir()
        for i in range(6):
            (folder / colour / f"{i}.png").write_bytes(shape_png(colour, rng))
    archive = folder.parent / "shapes.tar.gz"
    subprocess.run(["tar", "-C", str(folder), "-czf", str(archive), "."], check=True)
    spec = pb.JobSpec(
        task=pb.IMAGE_CLASSIFICATION,
        base_model=str(battery.models / "tiny-vit"),
        data=pb.DataSpec(validation_fraction=0.25),
        hyperparameters=pb.Hyperparameters(epochs=1, batch_size=4, seed=1),
    )
    with as_user(battery, "alice") as alice:
        spec.data.training_file = alice.upload_file(archive).name
        job = alice.create_job(spec)
        ended = wait_for_end(alice, job.name)
        assert ended.state == STATE.SUCCEEDED, ended.error
        return job.name


def test_image_bombs_in_predict_are_refused_from_their_header(battery: Battery, image_job: str) -> None:
    bomb = blank_png(13000, 13700)
    assert len(bomb) < 100_000
    with as_user(battery, "alice", timeout_s=60) as alice:
        error = refused(lambda: alice.predict(image_job, images=[bomb] * 16))
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT and len(error.field_violations) == 16
        assert "13000 x 13700 = 178,100,000 pixels, more than the limit" in error.field_violations["inputs[15]"]
        (answer,) = alice.predict(image_job, images=[blank_png(40, 40)], top_k=1)  # the worker is still there
        assert answer.labels[0].label in ("red", "blue")
    assert_others_unharmed(battery)


def test_an_archive_bomb_fails_its_job_before_filling_a_disk(battery: Battery, tmp_path: Path) -> None:
    bomb = write_tar(tmp_path / "bomb.tar.gz", {"red/a.png": b"\0" * (64 << 20), "blue/b.png": b"\0" * 10})
    spec = pb.JobSpec(
        task=pb.IMAGE_CLASSIFICATION,
        base_model=str(battery.models / "tiny-vit"),
        data=pb.DataSpec(validation_fraction=0.25),
    )
    with as_user(battery, "bob") as bob:
        spec.data.training_file = bob.upload_file(bomb).name
        job = bob.create_job(spec)
        ended = wait_for_end(bob, job.name)
        assert (ended.state, ended.error.reason) == (STATE.FAILED, "INVALID_DATASET")
        assert "looks like a decompression bomb" in ended.error.message
    work = battery.server.data_dir / "work" / job.name.removeprefix("jobs/")
    assert not work.exists(), "its work dir went before it was reported FAILED"
    assert not list(battery.server.data_dir.rglob("a.png")), "nothing was unpacked"
    assert_others_unharmed(battery)


# ------------------------------------------------------------------ medium


def test_quotas_hold_under_concurrent_calls(battery: Battery, tmp_path: Path, files: dict[str, str]) -> None:
    big = tmp_path / "big.jsonl"
    big.write_bytes(b" " * 4_000_000)
    with as_user(battery, "quota", timeout_s=60) as quota:
        stored_before = sum(f.size_bytes for f in quota.list_files())
        with ThreadPoolExecutor(6) as pool:
            outcomes = list(pool.map(lambda _: _outcome(lambda: quota.upload_file(big)), range(6)))
        stored = sum(f.size_bytes for f in quota.list_files())
        assert stored <= 10_000_000 and stored == stored_before + 4_000_000 * outcomes.count("ok")
        assert set(outcomes) == {"ok", "QUOTA_EXCEEDED"}
        spec = text_spec(battery.models / "tiny-bert", files["quota"], epochs=1)
        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(lambda _: _outcome(lambda: quota.create_job(spec)), range(8)))
        assert sorted(outcomes) == ["QUOTA_EXCEEDED"] * 7 + ["ok"]
        (queued,) = quota.list_jobs()
        quota.cancel_job(queued.name)
        sweep = quota.create_sweep(
            sw.SweepSpec(
                base=spec,
                parameters=[sw.Parameter(field="hyperparameters.seed", int_range=sw.IntRange(min=1, max=100))],
                algorithm=sw.SweepSpec.RANDOM,
                max_trials=6,
                parallelism=6,
            )
        )
        jobs = [job for job in quota.list_jobs() if job.state == STATE.QUEUED]
        assert len(jobs) == 1 and len(quota.get_sweep(sweep.name).trials) == 1
        quota.cancel_sweep(sweep.name)
    assert_others_unharmed(battery)


def _outcome(call: object) -> str:
    assert callable(call)
    try:
        call()
    except TuneforgeError as error:
        return error.reason
    return "ok"


def test_a_huge_label_leaves_its_job_readable_and_webhooks_reach_no_private_address(
    battery: Battery, tmp_path: Path
) -> None:
    rows = [*keyword_rows(8), {"text": "the label is a book", "label": "L" * 5_000_000}]
    spec = text_spec(battery.models / "tiny-bert", "", epochs=1)
    spec.notifications.webhook_urls.extend(
        ["http://100.64.0.1/hook", "http://[::ffff:127.0.0.1]:9/hook", "http://169.254.169.254/latest/meta-data"]
    )
    with as_user(battery, "bob") as bob, as_user(battery, "root") as admin:
        spec.data.training_file = bob.upload_file(write_jsonl(tmp_path / "book.jsonl", rows)).name
        job = bob.create_job(spec)
        ended = wait_for_end(bob, job.name)
        assert (ended.state, ended.error.reason) == (STATE.FAILED, "INVALID_DATASET")
        assert "at most 1000 characters" in ended.error.message and len(ended.error.message) < 1000
        assert any(j.name == job.name for j in admin.list_jobs())  # the admin's list of every tenant
        assert bob.list_job_events(job.name) and bob.get_job(job.name).state == STATE.FAILED
    _, samples = scrape_until(
        battery.server.metrics_url,
        lambda s: s.get(("tuneforge_webhook_deliveries_total", frozenset({("outcome", "refused")})), 0) >= 3,
        timeout_s=30,
    )
    assert samples.get(("tuneforge_webhook_deliveries_total", frozenset({("outcome", "refused")}))) == 3
    assert samples.get(("tuneforge_webhook_deliveries_total", frozenset({("outcome", "delivered")})), 0) == 0
    assert_others_unharmed(battery)


def test_specs_that_no_worker_can_hold_are_refused_with_the_estimate(battery: Battery, files: dict[str, str]) -> None:
    with as_user(battery, "alice") as alice:
        spec = text_spec(battery.models / "tiny-bert", files["alice"])
        spec.head.hidden_sizes.extend([65536] * 8)
        error = refused(lambda: alice.create_job(spec))
        assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NEVER_FITS")
        assert "but a worker of this server can give one job 4.0 GiB" in error.message
        spec = text_spec(battery.models / "tiny-bert", files["alice"])
        spec.resources.ranks = 64
        error = refused(lambda: alice.create_job(spec))
        assert error.reason == "NEVER_FITS" and "processes of the extra ranks 47.25 GiB" in error.message
    assert_others_unharmed(battery)


# ------------------------------------------------------------------ low


def test_a_long_text_is_truncated_to_the_model_and_a_reset_watch_is_quiet(
    battery: Battery, files: dict[str, str]
) -> None:
    with as_user(battery, "alice", timeout_s=60) as alice:
        job = alice.create_job(text_spec(battery.models / "tiny-bert", files["alice"], epochs=1))
        watch = alice.jobs.WatchJob(jobs_pb2.WatchJobRequest(name=job.name), timeout=60)
        next(watch)
        watch.cancel()  # the caller resets the stream: the server closes it from another context
        assert wait_for_end(alice, job.name).state == STATE.SUCCEEDED
        (answer,) = alice.predict(job.name, texts=[" ".join(["alpha beta"] * 100)], top_k=1)
        assert answer.labels[0].probability > 0
    assert_others_unharmed(battery)


def test_nothing_is_left_behind(battery: Battery) -> None:
    assert list((battery.server.data_dir / "uploads").iterdir()) == []
    with as_user(battery, "root") as admin:
        ended = {j.name.removeprefix("jobs/") for j in admin.list_jobs() if j.state in (STATE.SUCCEEDED, STATE.FAILED)}
    # A job's work dir (unpacked data and checkpoints) goes before its end is reported.
    leftovers = {p.name for p in (battery.server.data_dir / "work").iterdir()} & ended
    assert not leftovers, f"ended jobs kept work dirs: {leftovers}"


def test_a_grid_sweep_runs_to_its_end(battery: Battery, files: dict[str, str]) -> None:
    """Optuna's GridSampler stops the study after its last point, which raised under ask/tell: no grid ever ended."""
    seeds = sw.Parameter(field="hyperparameters.seed", int_range=sw.IntRange(min=1, max=2))
    with as_user(battery, "bob", timeout_s=60) as bob:
        sweep = bob.create_sweep(
            sw.SweepSpec(
                base=text_spec(battery.models / "tiny-bert", files["bob"], epochs=1),
                parameters=[seeds],
                algorithm=sw.SweepSpec.GRID,
                objective=sw.Objective(metric="eval_accuracy"),
                max_trials=10,
            )
        )
        for _ in bob.watch_sweep(sweep.name, timeout_s=120):
            pass
        final = bob.get_sweep(sweep.name)
        assert final.state == sw.Sweep.SUCCEEDED and final.HasField("best_trial")
        assert sorted(t.params["hyperparameters.seed"].number_value for t in final.trials) == [1.0, 2.0]
        assert {t.state for t in final.trials} == {sw.Trial.COMPLETE}
    text = battery.log.read_text()
    assert "failed to apply a change" not in text and "the sampler failed" not in text
    assert_others_unharmed(battery)


def test_a_hub_id_that_is_a_relative_path_is_refused(battery: Battery, files: dict[str, str]) -> None:
    """`outside/evil` matches the hub-id pattern and exists beside the server: it is a local path, and refused."""
    with as_user(battery, "alice") as alice:
        spec = text_spec(battery.models / "tiny-bert", files["alice"])
        spec.base_model = "outside/evil"
        error = refused(lambda: alice.create_job(spec))
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert error.field_violations == {"job.spec.base_model": "a local model must be an absolute path without `..`"}
    assert_others_unharmed(battery)


def test_a_worker_crash_tells_the_tenant_no_server_paths(battery: Battery, tmp_path: Path) -> None:
    with as_user(battery, "bob") as bob:
        file = bob.upload_file(write_jsonl(tmp_path / CRASHING_FILE, keyword_rows(8))).name
        job = bob.create_job(text_spec(battery.models / "tiny-bert", file, epochs=1))
        ended = wait_for_end(bob, job.name)
        assert (ended.state, ended.error.reason) == (STATE.FAILED, "INTERNAL")
        assert ended.error.message.startswith("the worker crashed (IndexError)")
        seen = [ended.error.message, *(str(event) for event in bob.list_job_events(job.name))]
        assert not any("Traceback" in text or "faults.py" in text for text in seen), "no traceback reaches the tenant"
    incident = ended.error.message.rsplit(" ", 1)[-1]
    log = battery.log.read_text()
    assert f"the job crashed (incident {incident})" in log and "faults.py" in log, "the operators have it"
    assert_others_unharmed(battery)


@pytest.fixture(scope="module")
def bob_model(battery: Battery, files: dict[str, str]) -> str:
    with as_user(battery, "bob") as bob:
        job = bob.create_job(text_spec(battery.models / "tiny-bert", files["bob"], epochs=1))
        assert wait_for_end(bob, job.name).state == STATE.SUCCEEDED
        return job.name


def test_one_tenants_expired_predictions_do_not_starve_another(
    battery: Battery, image_job: str, bob_model: str
) -> None:
    large = Image.new("RGB", (4000, 4000), (200, 30, 30))
    buffer = io.BytesIO()
    large.save(buffer, format="PNG")
    flood = [buffer.getvalue()] * 48
    inputs_before = _predicted_inputs(battery)
    with as_user(battery, "alice") as alice, as_user(battery, "bob") as bob:
        request = jobs_pb2.PredictRequest(name=image_job, inputs=[jobs_pb2.PredictInput(image=i) for i in flood])
        calls = [alice.jobs.Predict.future(request, timeout=1.0) for _ in range(12)]
        scrape_until(  # every one of alice's inputs has gone to the worker: bob queues behind all of them
            battery.server.metrics_url,
            lambda s: s.get(("tuneforge_prediction_inputs_total", frozenset()), 0) >= inputs_before + 12 * 48,
            timeout_s=30,
        )
        began = time.perf_counter()
        (answer,) = bob.predict(bob_model, texts=["alpha beta gamma"], top_k=1, timeout_s=20)
        waited = time.perf_counter() - began
        assert answer.labels and waited < 10.0, f"bob waited {waited:.1f} s behind alice's expired calls"
        assert {call.code() for call in calls} == {grpc.StatusCode.DEADLINE_EXCEEDED}
    assert_others_unharmed(battery)


def _predicted_inputs(battery: Battery) -> float:
    _, samples = scrape_until(battery.server.metrics_url, lambda s: True, timeout_s=5)
    return samples.get(("tuneforge_prediction_inputs_total", frozenset()), 0.0)
