"""The `tuneforge` command against the real server, as a script would use it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.integration.helpers import STATE, long_spec, wait_for_end, watch_until
from tests.tiny import keyword_rows, write_jsonl
from tuneforge.clients.client import TuneforgeClient
from tuneforge.clients.local_server import LocalServer

pytestmark = pytest.mark.integration


def tuneforge(server: LocalServer, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "tuneforge.clients.cli", "--server", server.target, *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env={**os.environ, "COLUMNS": "200"})
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_upload_submit_watch_list_get_download(
    server: LocalServer, tiny_bert: Path, keyword_dataset: Path, tmp_path: Path
) -> None:
    file_name = tuneforge(server, "upload", str(keyword_dataset)).stdout.strip()
    assert file_name.startswith("files/")
    job_name = tuneforge(
        server,
        "submit",
        "--task",
        "text-classification",
        "--model",
        str(tiny_bert),
        "--train",
        file_name,
        "--validation-fraction",
        "0.25",
        "--epochs",
        "8",
        "--batch-size",
        "8",
        "--learning-rate",
        "3e-3",
        "--schedule",
        "cosine",
        "--warmup-ratio",
        "0.1",
        "--log-every",
        "4",
        "--name",
        "from the cli",
    ).stdout.strip()
    assert job_name.startswith("jobs/")

    watched = tuneforge(server, "watch", job_name)
    assert "state SUCCEEDED" in watched.stderr and "eval at step" in watched.stderr

    listed = json.loads(tuneforge(server, "--json", "jobs", "--state", "succeeded").stdout)
    assert job_name in [job["name"] for job in listed]
    got = json.loads(tuneforge(server, "--json", "get", job_name).stdout)
    assert got["displayName"] == "from the cli" and got["state"] == "SUCCEEDED"
    assert got["spec"]["hyperparameters"]["schedule"]["kind"] == "COSINE"
    table = tuneforge(server, "jobs").stdout
    assert job_name in table and "SUCCEEDED" in table

    downloaded = json.loads(tuneforge(server, "--json", "download", job_name, "-o", str(tmp_path / "model")).stdout)
    assert "model.safetensors" in downloaded["files"]
    assert (tmp_path / "model" / "config.json").exists()
    saved = json.loads(tuneforge(server, "--json", "report", job_name, "-o", str(tmp_path / "r.html")).stdout)
    assert saved == {"report": str(tmp_path / "r.html")}
    assert (tmp_path / "r.html").read_text() == (tmp_path / "model" / "report.html").read_text()
    with tarfile.open(tmp_path / "again.tar", "w") as tar:  # the unpacked artifact, packed again, still verifies
        for path in sorted(p for p in (tmp_path / "model").rglob("*") if p.is_file()):
            tar.add(path, arcname=str(path.relative_to(tmp_path / "model")))
    verified = json.loads(tuneforge(server, "--json", "verify", str(tmp_path / "again.tar")).stdout)
    assert verified["ok"] and verified["checked"] == len(downloaded["files"]) - 1  # all but the manifest


def test_watch_exits_non_zero_for_a_failed_job_and_errors_name_fields(
    server: LocalServer, tiny_bert: Path, tmp_path: Path
) -> None:
    broken = write_jsonl(tmp_path / "broken.jsonl", keyword_rows(6))
    broken.write_text(broken.read_text() + '{"text": 5, "label": "x"}\n')
    file_name = tuneforge(server, "upload", str(broken)).stdout.strip()
    job_name = tuneforge(server, "submit", "--model", str(tiny_bert), "--train", file_name).stdout.strip()
    failed = tuneforge(server, "watch", job_name, check=False)
    assert failed.returncode == 1
    assert "INVALID_DATASET" in failed.stderr and "line 7" in failed.stderr

    rejected = tuneforge(
        server, "submit", "--model", str(tiny_bert), "--train", file_name, "--epochs", "-2", check=False
    )
    assert rejected.returncode == 1
    assert "job.spec.hyperparameters.epochs" in rejected.stderr
    missing = tuneforge(server, "get", "jobs/ft-nothere", check=False)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr


def test_create_from_a_spec_file(server: LocalServer, tiny_bert: Path, keyword_dataset: Path, tmp_path: Path) -> None:
    spec_file = tmp_path / "job.json"
    spec_file.write_text(
        json.dumps(
            {
                "task": "TEXT_CLASSIFICATION",
                "baseModel": str(tiny_bert),
                "data": {"trainingFile": "files/placeholder", "validationFraction": 0.25},
                "hyperparameters": {
                    "epochs": 8,
                    "batchSize": 8,
                    "learningRate": 2e-3,
                    "schedule": {"kind": "CONSTANT"},
                },
                "evaluation": {"bestMetric": "eval_accuracy", "logEverySteps": 4},
            }
        )
    )
    file_name = tuneforge(server, "upload", str(keyword_dataset)).stdout.strip()
    created = tuneforge(server, "create", "--spec", str(spec_file), "--train", file_name, "--watch")
    assert "state SUCCEEDED" in created.stderr
    job = json.loads(tuneforge(server, "--json", "get", created.stdout.strip().splitlines()[0]).stdout)
    assert job["spec"]["data"]["trainingFile"] == file_name
    assert job["spec"]["evaluation"]["bestMetric"] == "eval_accuracy"


def test_pause_resume_and_cancel_from_the_command_line(
    server: LocalServer, tiny_bert: Path, keyword_dataset: Path
) -> None:
    with TuneforgeClient(server.target) as client:
        job = client.create_job(long_spec(tiny_bert, client.upload_file(keyword_dataset).name))
        watch_until(client, job.name, "training_metrics")
        assert tuneforge(server, "pause", job.name).stdout.split() == [job.name, "PAUSING"]
        for event in client.watch(job.name, timeout_s=60):
            if event.state_change.to_state == STATE.PAUSED:
                break
        refused = tuneforge(server, "pause", job.name, check=False)
        assert refused.returncode != 0 and "FAILED_PRECONDITION" in refused.stderr + refused.stdout
        assert tuneforge(server, "resume", job.name).stdout.split() == [job.name, "QUEUED"]
        assert json.loads(tuneforge(server, "--json", "cancel", job.name).stdout)["name"] == job.name
        assert wait_for_end(client, job.name).state == STATE.CANCELLED


def test_a_sweep_from_the_command_line(
    server: LocalServer, tiny_bert: Path, keyword_dataset: Path, tmp_path: Path
) -> None:
    spec = {
        "base": {
            "task": "TEXT_CLASSIFICATION",
            "baseModel": str(tiny_bert),
            "data": {"validationFraction": 0.25},
            "hyperparameters": {"epochs": 2, "batchSize": 8, "learningRate": 2e-3},
        },
        "parameters": [
            {"field": "hyperparameters.learning_rate", "floatRange": {"min": 1e-4, "max": 5e-3, "log": True}}
        ],
        "objective": {"metric": "eval_accuracy"},
        "algorithm": "RANDOM",
        "maxTrials": 2,
        "parallelism": 2,
    }
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(spec))
    file_name = tuneforge(server, "upload", str(keyword_dataset)).stdout.strip()
    created = tuneforge(
        server, "sweep-create", "--spec", str(path), "--train", file_name, "--name", "cli sweep", "--watch"
    )
    sweep_name, best_job = created.stdout.split()
    assert sweep_name.startswith("sweeps/") and best_job.startswith("jobs/")
    assert "best: trial" in created.stderr
    listed = tuneforge(server, "sweeps").stdout
    assert sweep_name in listed and "SUCCEEDED" in listed and "cli sweep" in listed
    shown = tuneforge(server, "sweep", sweep_name).stdout
    assert shown.count("COMPLETE") == 2 and best_job in shown
    assert json.loads(tuneforge(server, "--json", "sweep", sweep_name).stdout)["bestTrial"]["job"] == best_job
    refused = tuneforge(server, "sweep-cancel", sweep_name, check=False)
    assert refused.returncode != 0 and "FAILED_PRECONDITION" in refused.stderr + refused.stdout


def test_health_exits_zero_only_when_serving(server: LocalServer) -> None:
    serving = tuneforge(server, "health")
    assert serving.stdout.strip() == "SERVING"
    job_service = tuneforge(server, "health", "--service", "tuneforge.v1.JobService")
    assert job_service.stdout.strip() == "SERVING"
    unknown = tuneforge(server, "health", "--service", "no.such.Service", check=False)
    assert (unknown.returncode, unknown.stdout.strip()) == (1, "SERVICE_UNKNOWN")
    nobody = subprocess.run(
        [sys.executable, "-m", "tuneforge.clients.cli", "--server", "127.0.0.1:1", "--timeout", "2", "health"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (nobody.returncode, nobody.stdout.strip()) == (1, "UNREACHABLE")


NOT_IN_THE_LIGHT_CLIENT = ("torch", "transformers", "numpy", "optuna", "safetensors", "peft")
"""The [server] extra's libraries, which a client-only install lacks."""
NEVER_LOADED_BY_THE_CLIENT = (
    "tuneforge.server",
    "tuneforge.workers.core",
    "tuneforge.workers.process",
    "tuneforge.workers.tasks.runtime",
)
"""Its own modules that need them (a task's runtime too): the client reads only the tasks' light definitions."""
LIGHT = f"""
import importlib.abc, sys
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        heavy = name.startswith({NEVER_LOADED_BY_THE_CLIENT!r}) or name.endswith(".runtime")
        if name.split(".")[0] in {NOT_IN_THE_LIGHT_CLIENT!r} or heavy:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not in the light client)", name=name)
sys.meta_path.insert(0, Missing())
from tuneforge.clients.cli import main
sys.exit(main(sys.argv[1:]))
"""


def light_tuneforge(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as `pip install tuneforge` (no extras) has it: the training stack and the server cannot be imported."""
    command = [sys.executable, "-c", LIGHT, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, env={**os.environ, "COLUMNS": "200"})


def test_the_light_client_works_without_the_server_extras(
    server: LocalServer, tiny_bert: Path, keyword_dataset: Path, tmp_path: Path
) -> None:
    assert light_tuneforge("--help").returncode == 0
    at = ["--server", server.target]
    uploaded = light_tuneforge(*at, "upload", str(keyword_dataset))
    assert uploaded.returncode == 0, uploaded.stderr
    spec = ["--task", "text-classification", "--model", str(tiny_bert), "--train", uploaded.stdout.strip()]
    submitted = light_tuneforge(*at, "submit", *spec, "--validation-fraction", "0.25", "--epochs", "1")
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip()
    watched = light_tuneforge(*at, "watch", job)
    assert watched.returncode == 0 and "state SUCCEEDED" in watched.stderr, watched.stderr
    downloaded = light_tuneforge(*at, "--json", "download", job, "-o", str(tmp_path / "model"))
    assert downloaded.returncode == 0, downloaded.stderr
    assert "model.safetensors" in json.loads(downloaded.stdout)["files"]
    serve = light_tuneforge("serve")
    assert serve.returncode == 2
    assert "`tuneforge serve` needs the server: `pip install 'tuneforge[server]'`" in serve.stdout + serve.stderr


def test_names_that_look_like_markup_are_printed_as_they_are(
    server: LocalServer, tiny_bert: Path, keyword_dataset: Path
) -> None:
    """A job's display name is printed verbatim: rich markup in it neither styles the terminal nor (an unmatched
    closing tag) crashes the listing, which an admin's view of every tenant shows."""
    with TuneforgeClient(server.target) as client:
        file = client.upload_file(keyword_dataset).name
        job = client.create_job(long_spec(tiny_bert, file), display_name="[/red] [bold]loud").name
        client.cancel_job(job)
    got = tuneforge(server, "get", job)
    assert "[/red] [bold]loud" in got.stdout, got.stdout
    assert "[/red] [bold]loud" in tuneforge(server, "jobs").stdout
