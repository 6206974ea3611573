"""Operators' view of a real server: /metrics scraped before, during and after a job whose worker is killed and
replaced, checked series by series and by promtool; and the JSON log, with the job on every job line."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import yaml

from tests.integration.conftest import SERVER_ARGS
from tests.integration.helpers import (
    STATE,
    Samples,
    sample,
    scrape,
    scrape_until,
    text_spec,
    wait_for_exit,
    worker_pids,
)
from tuneforge.clients.client import TuneforgeClient, TuneforgeError
from tuneforge.clients.local_server import LocalServer, start_local_server
from tuneforge.v1 import files_pb2, files_pb2_grpc, jobs_pb2

pytestmark = pytest.mark.integration

METRICS_ARGS = [
    *[a for a in SERVER_ARGS if a not in ("--log-level", "WARNING")],
    *("--log-level", "INFO", "--log-format", "json", "--restart-backoff-s", "0"),
]


def promtool_check(exposition: str) -> None:
    """`promtool check metrics`: the exposition is well formed and follows Prometheus naming."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: install Debian's prometheus package (.ci/run does)"
    result = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@dataclass
class Run:
    """What the test saw of one job: scrapes at each moment and the events."""

    job: jobs_pb2.Job
    before: Samples
    during: Samples
    after_restart: Samples
    after: Samples
    texts: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_root: Path) -> Iterator[LocalServer]:
    data_dir = tmp_path_factory.mktemp("metrics-server")
    log_path = data_dir.parent / "metrics-server.log"
    running = start_local_server(
        data_dir, workers=1, model_roots=[model_root], extra_args=METRICS_ARGS, log_path=log_path
    )
    try:
        with TuneforgeClient(running.target) as client:
            client.wait_until_serving(120)
        yield running
    finally:
        assert running.stop() == 0


@pytest.fixture(scope="module")
def run(server: LocalServer, tiny_bert: Path, keyword_dataset: Path) -> Run:
    """One job: scraped before it, at its first training report, after its killed worker's replacement took it
    up again, and after it ended."""
    text, before = scrape(server.metrics_url)
    texts = [text]
    with TuneforgeClient(server.target, timeout_s=30) as client:
        file = client.upload_file(keyword_dataset).name
        spec = text_spec(tiny_bert, file, epochs=12)
        spec.evaluation.log_every_steps = 1
        job = client.create_job(spec)
        during = after_restart = {}
        for event in client.watch(job.name, timeout_s=240):
            kind = event.WhichOneof("payload")
            if kind == "training_metrics" and event.attempt == 1 and not during:
                text, during = scrape(server.metrics_url)
                texts.append(text)
                (pid,) = worker_pids(server.process.pid).values()
                os.kill(pid, signal.SIGKILL)
                assert wait_for_exit(pid, 30)
            if kind == "state_change" and event.state_change.to_state == STATE.RUNNING and event.attempt == 2:
                text, after_restart = scrape(server.metrics_url)
                texts.append(text)
        final = client.get_job(job.name)
        with pytest.raises(TuneforgeError):
            client.get_job("jobs/ft-doesnotexist")
        bad = files_pb2.UploadFileMetadata(
            filename="x.jsonl", purpose=files_pb2.File.DATASET, size_bytes=3, sha256="0" * 64
        )
        with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as refused:
            requests = iter([files_pb2.UploadFileRequest(metadata=bad), files_pb2.UploadFileRequest(chunk=b"abc")])
            files_pb2_grpc.FileServiceStub(channel).UploadFile(requests, timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # grpc.aio sends an aborted call's status before the handler unwinds, so the client can see the error a moment
    # before the interceptor counts it: scrape until both refused calls are in (or the deadline passes).
    text, after = scrape_until(server.metrics_url, lambda s: _refused_calls_counted(s) == 2, timeout_s=10)
    texts.append(text)
    assert during and after_restart, "the job never reported, or never resumed after its worker was killed"
    return Run(final, before, during, after_restart, after, texts)


def _refused_calls_counted(samples: Samples) -> float:
    not_found = {"grpc_service": "tuneforge.v1.JobService", "grpc_method": "GetJob", "grpc_type": "unary"}
    invalid = {"grpc_service": "tuneforge.v1.FileService", "grpc_method": "UploadFile", "grpc_type": "client_stream"}
    return sample(samples, "grpc_server_handled_total", **not_found, grpc_code="NOT_FOUND") + sample(
        samples, "grpc_server_handled_total", **invalid, grpc_code="INVALID_ARGUMENT"
    )


def test_job_series_follow_the_job(run: Run) -> None:
    assert run.job.state == STATE.SUCCEEDED
    assert run.job.restart_count == 1
    jobs = "tuneforge_jobs"
    assert sample(run.before, jobs, state="running") == 0
    assert sample(run.during, jobs, state="running") == 1
    assert sample(run.during, jobs, state="succeeded") == 0
    assert sample(run.after, jobs, state="running") == 0
    assert sample(run.after, jobs, state="succeeded") == 1
    assert sample(run.after, "tuneforge_jobs_submitted_total", origin="api") == 1
    assert sample(run.during, "tuneforge_jobs_finished_total", state="succeeded") == 0
    assert sample(run.after, "tuneforge_jobs_finished_total", state="succeeded") == 1
    assert sample(run.after, "tuneforge_job_run_seconds_count", state="succeeded") == 1
    # One queue wait and one start-up per attempt.
    assert sample(run.during, "tuneforge_job_queue_wait_seconds_count") == 1
    assert sample(run.after, "tuneforge_job_queue_wait_seconds_count") == 2
    assert sample(run.during, "tuneforge_job_startup_seconds_count") == 1
    assert sample(run.after, "tuneforge_job_startup_seconds_count") == 2


def test_worker_series_survive_the_worker_being_killed(run: Run) -> None:
    assert sample(run.before, "tuneforge_workers", state="idle") == 1
    assert sample(run.during, "tuneforge_workers", state="busy") == 1
    assert sample(run.after_restart, "tuneforge_workers", state="busy") == 1
    assert sample(run.after, "tuneforge_workers", state="idle") == 1
    assert sample(run.during, "tuneforge_worker_restarts_total", reason="signal") == 0
    assert sample(run.after_restart, "tuneforge_worker_restarts_total", reason="signal") == 1
    assert sample(run.after_restart, "tuneforge_job_retries_total", reason="worker_exited") == 1
    steps = [sample(s, "tuneforge_training_steps_total", worker="worker-0") for s in (run.during, run.after_restart)]
    final_steps = sample(run.after, "tuneforge_training_steps_total", worker="worker-0")
    assert 0 < steps[0] <= steps[1] < final_steps, "the step counter went back or stood still"
    assert final_steps >= run.job.progress.total_steps  # attempt 2 redid the steps after the last checkpoint
    assert sample(run.after, "tuneforge_training_step_seconds_count") == final_steps
    assert sample(run.after, "tuneforge_training_samples_total", worker="worker-0") >= final_steps
    assert sample(run.after, "tuneforge_checkpoint_save_seconds_count") >= 12
    heartbeats = [sample(s, "tuneforge_worker_last_heartbeat_timestamp_seconds", worker="worker-0") for s in
                  (run.before, run.during, run.after)]  # fmt: skip
    assert heartbeats == sorted(heartbeats) and heartbeats[0] < heartbeats[2]


def test_grpc_series_count_calls_by_code(run: Run) -> None:
    def handled(samples: Samples, service: str, method: str, kind: str, code: str) -> float:
        labels = {"grpc_service": f"tuneforge.v1.{service}", "grpc_method": method, "grpc_type": kind}
        return sample(samples, "grpc_server_handled_total", **labels, grpc_code=code)

    assert handled(run.before, "JobService", "CreateJob", "unary", "OK") == 0
    assert handled(run.after, "JobService", "CreateJob", "unary", "OK") == 1
    assert handled(run.after, "JobService", "GetJob", "unary", "NOT_FOUND") == 1
    assert handled(run.after, "JobService", "WatchJob", "server_stream", "OK") >= 1
    assert handled(run.after, "FileService", "UploadFile", "client_stream", "OK") == 1
    assert handled(run.after, "FileService", "UploadFile", "client_stream", "INVALID_ARGUMENT") == 1
    labels = {"grpc_service": "tuneforge.v1.JobService", "grpc_method": "CreateJob", "grpc_type": "unary"}
    assert sample(run.after, "grpc_server_started_total", **labels) == 1
    assert sample(run.after, "grpc_server_handling_seconds_count", **labels) == 1
    assert sample(run.after, "tuneforge_uploads_rejected_total", reason="digest_mismatch") == 1
    assert sample(run.after, "tuneforge_store_operation_seconds_count", operation="create_job") == 1
    assert sample(run.after, "tuneforge_storage_bytes", kind="artifacts") == run.job.artifact.size_bytes
    assert sample(run.after, "tuneforge_data_dir_free_bytes") > 0


def test_every_scrape_passes_promtool(run: Run) -> None:
    for text in run.texts:
        promtool_check(text)


def test_json_log_lines_name_their_job(run: Run, server: LocalServer) -> None:
    lines = [json.loads(line) for line in (server.data_dir.parent / "metrics-server.log").read_text().splitlines()
             if line.startswith("{")]  # fmt: skip
    assert lines and all({"time", "level", "logger", "message", "process"} <= line.keys() for line in lines)
    job_id = run.job.name.removeprefix("jobs/")
    mine = [line for line in lines if line.get("job") == job_id]
    server_lines = [line["message"] for line in mine if line["process"] == "server"]
    assert "QUEUED -> RUNNING on worker-0" in server_lines
    assert "RUNNING -> QUEUED" in server_lines and "RUNNING -> SUCCEEDED" in server_lines
    worker_lines = [line for line in mine if line["process"] == "worker-0"]
    assert {line["attempt"] for line in worker_lines} == {1, 2}
    assert any(line["message"].startswith("training: ") for line in worker_lines)
    assert all("job_event_sent" not in line for line in lines)


DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
METRIC_NAME = re.compile(r"\b((?:tuneforge|grpc_server)_[a-z0-9_]+)\b")


def exported_names(expositions: list[str]) -> set[str]:
    """Every series name the server can export: families from `# TYPE` lines (a GPU family exists without GPUs,
    with no samples) with their histogram and counter suffixes."""
    names = set()
    for text in expositions:
        for match in re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):
            name, kind = match.groups()
            names.add(name)
            if kind == "histogram":
                names.update(f"{name}_{suffix}" for suffix in ("bucket", "count", "sum"))
    return names


def dashboard_queries() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana/dashboards/tuneforge.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def alert_queries() -> list[str]:
    groups = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def test_the_dashboard_is_well_formed_and_uses_the_provisioned_datasource() -> None:
    dashboard = json.loads((DEPLOY / "grafana/dashboards/tuneforge.json").read_text())
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    uid = datasources["datasources"][0]["uid"]
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    titles = " ".join(panel["title"].lower() for panel in panels)
    for topic in ("queue", "jobs by state", "utilisation", "step time", "gpu memory", "rpc rate", "errors"):
        assert topic in titles, f"no panel on {topic}"
    for panel in panels:
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= grid.keys() and grid["x"] + grid["w"] <= 24
        assert panel["type"] in {"timeseries", "stat", "gauge", "table", "bargauge"}
        assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"])
        assert panel["datasource"]["uid"] == uid and all(t["datasource"]["uid"] == uid for t in panel["targets"])


def test_every_series_the_dashboard_and_alerts_query_exists(run: Run) -> None:
    exported = exported_names(run.texts)
    for query in dashboard_queries() + alert_queries():
        used = set(METRIC_NAME.findall(query))
        assert used or query.startswith("up{"), f"no Tuneforge series in {query!r}"  # `up` is Prometheus's own
        assert used <= exported, f"{query!r} queries {sorted(used - exported)}, which the server does not export"


def test_the_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query (as a recording rule)."""
    rules = [{"record": f"tuneforge:dashboard_query_{i}", "expr": q} for i, q in enumerate(dashboard_queries())]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: install Debian's prometheus package (.ci/run does)"
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
