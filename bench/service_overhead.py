"""What the service adds around the training core: the same job through the full service (upload, CreateJob, watch,
download) against the core called in-process, and the time from CreateJob to the first training step, cold (a
fresh worker) and warm (the next job on the same model, while the worker still holds it).

    .venv/bin/python bench/service_overhead.py [--epochs 2] [--probes 3]

The job is core_vs_trainer's BERT (4 layers, hidden 256) on 2000 sentences, about a minute on 2 CPU cores at 2
epochs. Both sides run in fresh processes with torch, transformers and the core already imported (a worker imports
them when it starts); the in-process side is `run_job` in this script's child. "First step" is when the client sees
the job's `training:` log line, sent as the training loop begins (data read, model loaded, optimizer built); the
time to the first step's metrics (logged every step, so it includes one step of compute) is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from core_vs_trainer import (
    BATCH,
    LEARNING_RATE,
    SEED,
    WEIGHT_DECAY,
    build_bert,
    core_spec,
    run_core_job,
    write_sentences,
)

TRAINING_LINE = "training: "
"""How the core's log line at the start of the training loop begins."""


def in_process(model: Path, data: Path, epochs: int, max_steps: int) -> dict[str, float]:
    """The core called directly: seconds from run_job to its end and to the first training step."""
    from workers.core.adapters import import_all_adapters
    from workers.messages import LogEmitted, TrainingProgress, WorkerEvent

    import_all_adapters()  # before the clock, as a worker does when it starts
    spec = core_spec("TEXT_CLASSIFICATION", model, epochs, max_steps=max_steps)
    marks: dict[str, float] = {}

    def send(event: WorkerEvent) -> None:
        if isinstance(event, LogEmitted) and event.message.startswith(TRAINING_LINE):
            marks.setdefault("first_step", time.perf_counter())
        if isinstance(event, TrainingProgress):
            marks.setdefault("first_metrics", time.perf_counter())

    started = time.perf_counter()
    run_core_job(spec, data, send)
    return {
        "seconds": time.perf_counter() - started,
        "first_step": marks["first_step"] - started,
        "first_metrics": marks["first_metrics"] - started,
    }


def job_spec(model: Path, training_file: str, epochs: int, max_steps: int):  # type: ignore[no-untyped-def]
    from tuneforge.v1 import job_spec_pb2 as pb

    return pb.JobSpec(
        task=pb.TEXT_CLASSIFICATION,
        base_model=str(model),
        data=pb.DataSpec(training_file=training_file, max_sequence_length=128),
        hyperparameters=pb.Hyperparameters(
            epochs=epochs,
            batch_size=BATCH,
            learning_rate=LEARNING_RATE,
            weight_decay=WEIGHT_DECAY,
            seed=SEED,
            schedule=pb.Schedule(kind=pb.Schedule.CONSTANT),
            max_steps=max_steps,
        ),
        evaluation=pb.EvaluationSpec(log_every_steps=1 if max_steps else 50),
    )


def through_service(
    model: Path, data: Path, epochs: int, probes: int, repeats: int, core: Callable[[], float]
) -> dict[str, Any]:
    """One server, one worker: short jobs timing CreateJob -> first step, then the full job (upload to download)
    `repeats` times, each after the same job run by the core in its own process (alternating evens out drift in
    the machine's speed)."""
    from clients.client import TuneforgeClient
    from clients.local_server import local_server

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch, local_server(Path(scratch) / "data", 1, [model.parent]) as server:
        client = TuneforgeClient(server.target)
        client.wait_until_serving()
        first_steps, first_metrics = [], []
        for probe in range(probes + 1):  # the first runs on a fresh worker: cold
            file = client.upload_file(data)
            started = time.perf_counter()
            job = client.create_job(job_spec(model, file.name, 1, max_steps=2), display_name=f"probe {probe}")
            marks: dict[str, float] = {}
            for event in client.watch(job.name, timeout_s=600):
                kind = event.WhichOneof("payload")
                if kind == "log" and event.log.message.startswith(TRAINING_LINE):
                    marks.setdefault("step", time.perf_counter() - started)
                if kind == "training_metrics":
                    marks.setdefault("metrics", time.perf_counter() - started)
            assert client.get_job(job.name).state == client.get_job(job.name).SUCCEEDED
            first_steps.append(marks["step"])
            first_metrics.append(marks["metrics"])
        results["cold_first_step"], results["cold_first_metrics"] = first_steps[0], first_metrics[0]
        results["warm_first_step"] = statistics.median(first_steps[1:])
        results["warm_first_metrics"] = statistics.median(first_metrics[1:])
        results["core"], results["service"] = [], []
        for repeat in range(repeats):
            results["core"].append(core())
            started = time.perf_counter()
            file = client.upload_file(data)
            job = client.create_job(job_spec(model, file.name, epochs, max_steps=0), display_name=f"full {repeat}")
            for _ in client.watch(job.name, timeout_s=3600):
                pass
            finished = client.get_job(job.name)
            assert finished.state == finished.SUCCEEDED, finished.error
            client.download_artifact(job.name, Path(scratch) / f"artifact-{repeat}.tar")
            results["service"].append(time.perf_counter() - started)
        client.close()
    return results


def child(model: Path, data: Path, epochs: int, max_steps: int) -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    print(json.dumps(in_process(model, data, epochs, max_steps)))


def run_child(model: Path, data: Path, epochs: int, max_steps: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", "--model", str(model), "--data", str(data)]
    command += ["--epochs", str(epochs), "--max-steps", str(max_steps)]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    result: dict[str, float] = json.loads(output)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--probes", type=int, default=3, help="warm CreateJob -> first step measurements")
    parser.add_argument("--repeats", type=int, default=2, help="full jobs each way (medians are reported)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--max-steps", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child:
        child(args.model, args.data, args.epochs, args.max_steps)
        return 0
    scratch = Path(tempfile.mkdtemp())
    model = scratch / "models" / "bert"
    build_bert(model)
    data = write_sentences(scratch)
    core_probe = run_child(model, data, 1, 2)
    service = through_service(
        model, data, args.epochs, args.probes, args.repeats, lambda: run_child(model, data, args.epochs, 0)["seconds"]
    )
    core, seconds = statistics.median(service["core"]), statistics.median(service["service"])
    print(f"BERT (4 layers, hidden 256), 2000 sentences, {args.epochs} epochs, batch {BATCH}, 1 worker")
    print(f"core in-process      {core:7.1f} s  (runs: {', '.join(f'{s:.1f}' for s in service['core'])})")
    print(f"through the service  {seconds:7.1f} s  (upload, create, watch, download; runs: "
          f"{', '.join(f'{s:.1f}' for s in service['service'])})")  # fmt: skip
    ratio = seconds / core
    print(f"service overhead     {100 * (ratio - 1):+7.1f} %  (service / core {ratio:.3f})")
    for what in ("step", "metrics"):
        cold, warm = service[f"cold_first_{what}"], service[f"warm_first_{what}"]
        print(f"CreateJob -> first {what:<8} cold {cold:5.2f} s   warm {warm:5.2f} s (median of {args.probes})")
    print(
        f"the core in-process, cold: run_job -> first step {core_probe['first_step']:.2f} s, "
        f"-> first metrics {core_probe['first_metrics']:.2f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
